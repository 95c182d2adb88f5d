"""lut_linear / lut_embedding (run a clustered weight from its file form) and the packed modules.

Oracle: the weight rebuilt in Python from the FORMAT.md rules (unpack, look up, write the
outliers), in float64, then F.linear / indexing."""

import json

import pytest
import torch
import torch.nn.functional as F

import edkm
from edkm import ops

CUDA = torch.cuda.is_available()


def make(rows, cols, bits, groups, d=1, n_out=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = 1 << bits
    idx = torch.randint(0, k, (rows * cols // d,), generator=g)
    lut = torch.randn(groups, k, d, generator=g)
    oi = ov = None
    if n_out:
        oi = torch.randperm(rows * cols, generator=g)[:n_out].sort().values.to(torch.int32)
        ov = torch.randn(n_out, generator=g)
    return idx, ops.pack_indices(idx, bits), lut, oi, ov


def naive_weight(idx, lut, rows, cols, oi=None, ov=None):
    groups, k, d = lut.shape
    n = idx.numel()
    per = n // groups
    grp = torch.arange(n) // per
    w = lut.double()[grp, idx.long()].reshape(rows, cols)  # [n, d] -> [rows, cols]
    if oi is not None:
        w.view(-1)[oi.long()] = ov.double()
    return w


LAYOUTS = [  # rows, cols, groups, cluster_dim, outliers
    (64, 72, 1, 1, 0),
    (48, 96, 6, 1, 40),  # groups of 8 rows
    (40, 96, 80, 1, 10),  # groups of half a row
    (33, 77, 3, 1, 25),  # odd widths: every row starts mid-byte
    (16, 96, 2, 2, 0),  # 2-vectors (scalar fallback)
    (24, 60, 3, 3, 0),
]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("batch", [1, 3, 5, 12, 20])  # 20: unpacked tiles + BLAS
def test_lut_linear_matches_the_rebuilt_weight(bits, layout, batch):
    rows, cols, groups, d, n_out = layout
    idx, packed, lut, oi, ov = make(rows, cols, bits, groups, d, n_out, seed=bits)
    w = naive_weight(idx, lut, rows, cols, oi, ov)
    x = torch.randn(batch, cols)
    bias = torch.randn(rows)
    ref = F.linear(x.double(), w, bias.double())
    y = ops.lut_linear(x, packed, lut, bits, rows, bias, oi, ov)
    assert y.dtype == torch.float32 and y.shape == (batch, rows)
    # float32 accumulation (the kernels' contract) in another order than the float64 oracle
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    y64 = ops.lut_linear(x.double(), packed, lut, bits, rows, bias, oi, ov)
    torch.testing.assert_close(y64, ref, rtol=1e-12, atol=1e-12)  # float64: summation order only


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lut_linear_16bit_input_any_leading_shape(dtype):
    idx, packed, lut, _, _ = make(96, 64, 4, 12)
    w = naive_weight(idx, lut, 96, 64)
    x = torch.randn(2, 3, 64).to(dtype)
    y = ops.lut_linear(x, packed, lut, 4, 96)
    assert y.dtype == dtype and y.shape == (2, 3, 96)
    ref = F.linear(x.double(), w).to(dtype)
    # both rounded to the 16-bit dtype after float32 vs float64 sums: at most about one bf16 ulp
    torch.testing.assert_close(y, ref, rtol=1e-2, atol=1e-2)


def test_lut_linear_lm_head_shape_and_threads():
    idx, packed, lut, oi, ov = make(4096, 576, 3, 256, n_out=500)
    x = torch.randn(2, 576)
    ref = F.linear(x.double(), naive_weight(idx, lut, 4096, 576, oi, ov))
    old = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            y = ops.lut_linear(x, packed, lut, 3, 4096, None, oi, ov)
            # float32 sums of 576 products (values up to ~30): absolute error ~1e-5
            torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("bits", [1, 3, 4, 6, 8])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_lut_embedding_is_exact(bits, layout):
    rows, cols, groups, d, n_out = layout
    idx, packed, lut, oi, ov = make(rows, cols, bits, groups, d, n_out, seed=bits + 10)
    w = naive_weight(idx, lut, rows, cols, oi, ov)
    ids = torch.tensor([[0, rows - 1, 3], [rows // 2, 0, 1]])
    e = ops.lut_embedding(ids, packed, lut, bits, rows, cols, oi, ov, torch.float32)
    assert e.shape == (2, 3, cols)
    assert torch.equal(e.double(), w[ids])
    e16 = ops.lut_embedding(ids, packed, lut.to(torch.bfloat16), bits, rows, cols, oi, ov)
    assert e16.dtype == torch.bfloat16


def test_opcheck_and_compile():
    idx, packed, lut, oi, ov = make(32, 64, 3, 4, n_out=12)
    x = torch.randn(3, 64)
    torch.library.opcheck(torch.ops.edkm.lut_linear.default, (x, packed, lut, 3, 32, None, oi, ov))
    torch.library.opcheck(torch.ops.edkm.lut_linear.default, (x.double(), packed, lut, 3, 32))
    ids = torch.tensor([1, 5, 31])
    torch.library.opcheck(torch.ops.edkm.lut_embedding.default, (ids, packed, lut, 3, 32, 64, oi, ov, torch.float32))

    def f(x, ids):
        return (
            ops.lut_linear(x, packed, lut, 3, 32, None, oi, ov).sum()
            + ops.lut_embedding(ids, packed, lut, 3, 32, 64, oi, ov).sum()
        )

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(x, ids), f(x, ids))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda p, l, x: ops.lut_linear(x, p, l, 4, 32), "2\\*\\*bits = 16"),
        (lambda p, l, x: ops.lut_linear(x, p[:-1], l, 3, 32), "bytes, but packed has"),
        (lambda p, l, x: ops.lut_linear(x[:, :63], p, l, 3, 32), "a \\[32, 63\\] weight"),
        (lambda p, l, x: ops.lut_linear(x, p, l, 3, 33), "cannot be cut|bytes, but packed"),
        (lambda p, l, x: ops.lut_linear(x, p, l, 9, 32), "bits must be in 1..8"),
        (lambda p, l, x: ops.lut_linear(x, p.to(torch.int32), l, 3, 32), "packed must be uint8"),
        (lambda p, l, x: ops.lut_linear(x, p, l[:, :, 0], 3, 32), "lut must be \\[groups"),
        (lambda p, l, x: ops.lut_linear(x, p, l.clone().fill_(float("nan")), 3, 32), "lut must be finite"),
        (lambda p, l, x: ops.lut_linear(x, p, l, 3, 32, torch.zeros(5)), "bias must be \\[out_features = 32\\]"),
        (
            lambda p, l, x: ops.lut_linear(
                x, p, l, 3, 32, None, torch.tensor([5, 3], dtype=torch.int32), torch.ones(2)
            ),
            "strictly increasing",
        ),
        (
            lambda p, l, x: ops.lut_linear(x, p, l, 3, 32, None, torch.tensor([5, 32 * 64]), torch.ones(2)),
            "must lie in \\[0, rows \\* cols\\)",
        ),
        (lambda p, l, x: ops.lut_linear(x, p, l, 3, 32, None, torch.tensor([5]), None), "go together"),
        (
            lambda p, l, x: ops.lut_linear(x, p, l, 3, 32, None, torch.tensor([5]), torch.tensor([float("inf")])),
            "outlier_values must be finite",
        ),
        (lambda p, l, x: ops.lut_embedding(torch.tensor([0, 32]), p, l, 3, 32, 64), "num_embeddings"),
        (lambda p, l, x: ops.lut_embedding(torch.tensor([-1]), p, l, 3, 32, 64), "num_embeddings"),
        (lambda p, l, x: ops.lut_embedding(torch.tensor([0.0]), p, l, 3, 32, 64), "int32 or int64"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bad_input_one_clear_error(call, match, dtype):
    _, packed, lut, _, _ = make(32, 64, 3, 4)
    with pytest.raises((ValueError, TypeError, IndexError), match=match):
        call(packed, lut, torch.randn(2, 64, dtype=dtype))


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("batch", [1, 4, 20])  # 20: unpacked tiles + cuBLAS
@pytest.mark.parametrize("layout", [(256, 128, 16, 1, 30), (33, 77, 3, 1, 25), (16, 96, 2, 2, 0)])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_cuda_matches_the_rebuilt_weight(batch, layout, bits):
    rows, cols, groups, d, n_out = layout
    idx, packed, lut, oi, ov = make(rows, cols, bits, groups, d, n_out, seed=bits)
    w = naive_weight(idx, lut, rows, cols, oi, ov)
    x = torch.randn(batch, cols)
    bias = torch.randn(rows)
    cu = {
        "packed": packed.cuda(),
        "lut": lut.cuda(),
        "oi": None if oi is None else oi.cuda(),
        "ov": None if ov is None else ov.cuda(),
    }
    y = ops.lut_linear(x.cuda(), cu["packed"], cu["lut"], bits, rows, bias.cuda(), cu["oi"], cu["ov"])
    # float32 accumulation in warp-shuffle / cuBLAS order against the float64 oracle
    torch.testing.assert_close(y.cpu().double(), F.linear(x.double(), w, bias.double()), rtol=1e-5, atol=1e-4)
    yb = ops.lut_linear(x.cuda().bfloat16(), cu["packed"], cu["lut"], bits, rows, None, cu["oi"], cu["ov"])
    assert yb.dtype == torch.bfloat16
    ids = torch.tensor([0, rows - 1, rows // 2])
    e = ops.lut_embedding(ids.cuda(), cu["packed"], cu["lut"], bits, rows, cols, cu["oi"], cu["ov"], torch.float32)
    assert torch.equal(e.cpu().double(), w[ids])
    torch.cuda.synchronize()


# ---- packed modules -------------------------------------------------------------------------


def tiny_llama(tied: bool, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
        max_position_embeddings=64,
    )
    return cfg, LlamaForCausalLM(cfg)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("outliers", [0.0, 0.02])
def test_packed_model_equals_the_loaded_model(tmp_path, tied, outliers):
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM
    from edkm.packed import PackedEmbedding, PackedLinear

    cfg, m = tiny_llama(tied)
    edkm.palettize_(m, edkm.Config(bits=3, group_size=8, outlier_fraction=outliers))
    edkm.finalize(m)
    path = tmp_path / "m.safetensors"
    edkm.save(m, str(path))
    dense = edkm.load(str(path), LlamaForCausalLM(cfg))
    with init_empty_weights(include_buffers=False):
        packed = LlamaForCausalLM(cfg)
    edkm.load(str(path), packed, packed=True)
    assert isinstance(packed.model.embed_tokens, PackedEmbedding)
    assert isinstance(packed.lm_head, PackedLinear)
    assert isinstance(packed.model.layers[1].mlp.down_proj, PackedLinear)
    if tied:  # one copy of the tied weight
        assert packed.lm_head.weight_packed is packed.model.embed_tokens.weight_packed
    # the packed weights are the loaded ones, exactly
    assert torch.equal(
        packed.model.layers[0].self_attn.q_proj.dense_weight(), dense.model.layers[0].self_attn.q_proj.weight
    )
    assert not any(p.is_meta for p in packed.parameters())
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        # same weights, float32 both; only the products' summation order differs
        torch.testing.assert_close(packed(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)
    from edkm.generate import generate

    a = generate(packed, ids[:1, :5], 8)
    b = generate(dense, ids[:1, :5], 8)
    assert a.tokens == b.tokens
    assert a.decode_steps == 7


def test_load_packed_rejects_another_model(tmp_path):
    cfg, m = tiny_llama(False)
    edkm.palettize_(m, edkm.Config(bits=3))
    edkm.finalize(m)
    path = tmp_path / "m.safetensors"
    edkm.save(m, str(path))
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(edkm.FormatError, match="does not match the model"):
        edkm.load(str(path), other, packed=True)
    with pytest.raises(ValueError, match="packed=True needs the model"):
        edkm.load(str(path), packed=True)


def test_generate_cli_packed_and_dense_agree(tmp_path, capsys):
    from edkm.cli import main

    cfg, m = tiny_llama(False)
    d = tmp_path / "tiny"
    m.save_pretrained(d)
    out = tmp_path / "tiny-3bit.safetensors"
    assert main(["compress", str(d), "--bits", "3", "--group-size", "16", "--out", str(out), "--json"]) == 0
    capsys.readouterr()
    runs = {}
    for extra in ([], ["--dense"]):
        assert (
            main(
                ["generate", str(out), "--prompt", "hello world", "--max-new-tokens", "6", "--threads", "1", "--json"]
                + extra
            )
            == 0
        )
        r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        runs[bool(extra)] = r
    assert runs[False]["packed"] is True and runs[True]["packed"] is False
    assert runs[False]["new_tokens"] == 6 and runs[False]["decode_tokens_per_second"] > 0
    assert runs[False]["text"] == runs[True]["text"]
    assert runs[False]["model_bytes"] < runs[True]["model_bytes"] / 2
    with pytest.raises(SystemExit, match="max-new-tokens must be >= 1"):
        main(["generate", str(out), "--prompt", "x", "--max-new-tokens", "0"])
