"""The LLaMA forward pass of the Core ML export, written once over a small set of ops.

It runs on two backends: :class:`NumpyOps` (float32 numpy; the tests compare its logits with
transformers', which checks the graph itself) and ``MilOps`` in ``_coreml_export_side.py``
(coremltools' MIL builder, fp16; that is the exported program). So the program Core ML gets is
the code that the tests ran.

Only numpy and the standard library are imported here: the module is loaded both by edkm and
inside the coremltools environment, which has no torch.

``spec``: {"hidden", "heads", "kv_heads", "head_dim", "intermediate", "eps", "rope_theta",
"vocab", "layers", "seq_len", "tie"}; weight names are Hugging Face LLaMA's.
"""

from __future__ import annotations

import math

import numpy as np


def rope_tables(spec: dict):
    """cos, sin [seq_len, head_dim] of positions 0..seq_len-1 (LLaMA's default RoPE)."""
    hd = spec["head_dim"]
    inv_freq = 1.0 / (spec["rope_theta"] ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    freqs = np.outer(np.arange(spec["seq_len"], dtype=np.float64), inv_freq)
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb), np.sin(emb)


def causal_mask(t: int, neg: float) -> np.ndarray:
    return np.triu(np.full((t, t), neg, dtype=np.float64), k=1)


def forward(ops, spec: dict, input_ids):
    """Logits [1, seq_len, vocab] of ``input_ids`` [1, seq_len] through ``spec["layers"]``
    decoder layers, the final norm and the LM head."""
    t, hd = spec["seq_len"], spec["head_dim"]
    nh, nkv = spec["heads"], spec["kv_heads"]
    w = ops.weight
    emb = w("model.embed_tokens.weight")
    x = ops.gather(emb, input_ids)  # [1, T, H]
    cos, sin = rope_tables(spec)
    cos, sin = ops.const(cos), ops.const(sin)
    mask = ops.const(causal_mask(t, ops.mask_value))
    scale = ops.const(np.array(1.0 / math.sqrt(hd)))

    def heads(y, n):  # [1, T, n*hd] -> [1, n, T, hd]
        return ops.transpose(ops.reshape(y, [1, t, n, hd]), [0, 2, 1, 3])

    def rope(y):
        y1, y2 = ops.split2(y)
        rotated = ops.concat([ops.neg(y2), y1])
        return ops.add(ops.mul(y, cos), ops.mul(rotated, sin))

    def repeat_kv(y):  # [1, nkv, T, hd] -> [1, nh, T, hd]
        if nh == nkv:
            return y
        y = ops.reshape(y, [1, nkv, 1, t, hd])
        y = ops.tile(y, [1, 1, nh // nkv, 1, 1])
        return ops.reshape(y, [1, nh, t, hd])

    for i in range(spec["layers"]):
        p = f"model.layers.{i}."
        a = ops.rmsnorm(x, w(p + "input_layernorm.weight"), spec["eps"])
        q = rope(heads(ops.linear(a, w(p + "self_attn.q_proj.weight")), nh))
        k = repeat_kv(rope(heads(ops.linear(a, w(p + "self_attn.k_proj.weight")), nkv)))
        v = repeat_kv(heads(ops.linear(a, w(p + "self_attn.v_proj.weight")), nkv))
        scores = ops.add(ops.mul(ops.matmul(q, k, transpose_y=True), scale), mask)
        o = ops.matmul(ops.softmax(scores), v)  # [1, nh, T, hd]
        o = ops.reshape(ops.transpose(o, [0, 2, 1, 3]), [1, t, nh * hd])
        x = ops.add(x, ops.linear(o, w(p + "self_attn.o_proj.weight")))
        m = ops.rmsnorm(x, w(p + "post_attention_layernorm.weight"), spec["eps"])
        gate = ops.silu(ops.linear(m, w(p + "mlp.gate_proj.weight")))
        up = ops.linear(m, w(p + "mlp.up_proj.weight"))
        x = ops.add(x, ops.linear(ops.mul(gate, up), w(p + "mlp.down_proj.weight")))
    x = ops.rmsnorm(x, w("model.norm.weight"), spec["eps"])
    head = emb if spec["tie"] else w("lm_head.weight")
    return ops.linear(x, head)


def lut_dense(indices: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """What ``constexpr_lut_to_dense`` computes for a 2-D weight: ``indices`` [rows, cols / d],
    ``lut`` [G, 1, K, d] with G blocks of rows; vectors of d run along the columns."""
    rows, n = indices.shape
    g, _, _, d = lut.shape
    group = np.repeat(np.arange(g), rows // g)[:, None]
    return lut[group, 0, indices.astype(np.int64), :].reshape(rows, n * d)


class NumpyOps:
    """float32 numpy backend; ``weights``: name -> array, or (indices, lut) for clustered ones."""

    mask_value = -1e9

    def __init__(self, weights: dict):
        self.weights = weights

    def weight(self, name):
        v = self.weights[name]
        if isinstance(v, tuple):
            dense = lut_dense(*v[:2])
            if len(v) == 4:  # outliers: flat positions and their values
                dense = dense.copy()
                dense.reshape(-1)[v[2]] = v[3]
            v = dense
        return np.asarray(v, dtype=np.float32)

    def const(self, a):
        return np.asarray(a, dtype=np.float32)

    def gather(self, table, ids):
        return table[np.asarray(ids)]

    def linear(self, x, w):
        return x @ w.T

    def rmsnorm(self, x, w, eps):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps)) * w

    def reshape(self, x, shape):
        return x.reshape(shape)

    def transpose(self, x, perm):
        return x.transpose(perm)

    def split2(self, x):
        half = x.shape[-1] // 2
        return x[..., :half], x[..., half:]

    def concat(self, xs):
        return np.concatenate(xs, axis=-1)

    def neg(self, x):
        return -x

    def add(self, x, y):
        return x + y

    def mul(self, x, y):
        return x * y

    def tile(self, x, reps):
        return np.tile(x, reps)

    def matmul(self, x, y, transpose_y=False):
        return x @ (np.swapaxes(y, -1, -2) if transpose_y else y)

    def softmax(self, x):
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    def silu(self, x):
        return x / (1 + np.exp(-x))
