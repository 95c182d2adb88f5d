"""The coremltools side of `edkm export --coreml`; runs inside the coremltools environment
(edkm.coreml_env.EXPORT_REQUIREMENTS: numpy and coremltools, no torch, no edkm native code).

    python _coreml_export_side.py build SPEC.json WEIGHTS.npz OUT.mlpackage
    python _coreml_export_side.py read IN.mlpackage OUT.npz

``build``: the LLaMA program of ``_coreml_graph.forward`` with the MIL builder (fp16, iOS18).
Every clustered weight is one ``constexpr_lut_to_dense`` whose indices and LUT are the arrays
edkm wrote (indices [rows, cols / d], LUT [G, 1, K, d]), so nothing is clustered again.
``read``: the program read back from the package (MIL proto + weight file): per
``constexpr_lut_to_dense`` its indices, LUT and decompressed weight, and per weight with
outliers the decompressed ``constexpr_sparse_to_dense`` (NAME.outliers_dense), for the tests.
Both print one JSON line of facts on stdout.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run with -I: put back our folder only
import _coreml_graph  # noqa: E402

# Core ML's index types: 1, 2, 3, 4, 6 or 8 bits. 5 and 7 bits ride in the next width, with the
# LUT padded (the padding rows are never indexed).
INDEX_BITS = {1: 1, 2: 2, 3: 3, 4: 4, 5: 6, 6: 6, 7: 8, 8: 8}


def mil_name(name: str) -> str:
    return name.replace(".", "__")


class MilOps:
    mask_value = -3.0e4  # fp16: exp(-3e4 - max) is 0

    def __init__(self, spec, weights, mb, types):
        self.spec, self.weights, self.mb, self.types = spec, weights, mb, types
        self.cache = {}

    def weight(self, name):
        if name in self.cache:
            return self.cache[name]
        info = self.spec["weights"][name]
        if info["kind"] == "lut":
            bits = INDEX_BITS[info["bits"]]
            idx = self.weights[name + ".indices"].astype(getattr(self.types, f"np_uint{bits}_dtype"))
            lut = self.weights[name + ".lut"].astype(np.float16)
            if lut.shape[2] < (1 << bits):
                pad = np.zeros(lut.shape[:2] + ((1 << bits) - lut.shape[2],) + lut.shape[3:], np.float16)
                lut = np.concatenate([lut, pad], axis=2)
            kw = {"vector_axis": 1} if lut.shape[3] > 1 else {}
            v = self.mb.constexpr_lut_to_dense(indices=idx, lut=lut, name=mil_name(name), **kw)
            if info.get("outliers"):
                # Outliers: their values where the mask is set (positions sorted, so the values are
                # in the mask's row-major order), the LUT's elsewhere. No outlier is 0 (checked).
                mask = np.zeros(int(np.prod(info["shape"])), dtype=np.uint8)
                mask[self.weights[name + ".outlier_index"]] = 1
                mask = mask.reshape(info["shape"]).astype(self.types.np_uint1_dtype)
                sparse = self.mb.constexpr_sparse_to_dense(
                    nonzero_data=self.weights[name + ".outlier_values"].astype(np.float16),
                    mask=mask,
                    name=mil_name(name) + "___outliers",
                )
                v = self.mb.select(cond=self.mb.not_equal(x=sparse, y=np.float16(0)), a=sparse, b=v)
        else:
            v = self.mb.const(val=self.weights[name].astype(np.float16), name=mil_name(name))
        self.cache[name] = v
        return v

    def const(self, a):
        return np.asarray(a, dtype=np.float16)

    def gather(self, table, ids):
        return self.mb.gather(x=table, indices=ids, axis=0)

    def linear(self, x, w):
        return self.mb.linear(x=x, weight=w)

    def rmsnorm(self, x, w, eps):
        mb = self.mb
        xf = mb.cast(x=x, dtype="fp32")
        ms = mb.reduce_mean(x=mb.mul(x=xf, y=xf), axes=[-1], keep_dims=True)
        y = mb.cast(x=mb.mul(x=xf, y=mb.rsqrt(x=ms, epsilon=np.float32(eps))), dtype="fp16")
        return mb.mul(x=y, y=w)

    def reshape(self, x, shape):
        return self.mb.reshape(x=x, shape=np.array(shape, dtype=np.int32))

    def transpose(self, x, perm):
        return self.mb.transpose(x=x, perm=np.array(perm, dtype=np.int32))

    def split2(self, x):
        return self.mb.split(x=x, num_splits=2, axis=-1)

    def concat(self, xs):
        return self.mb.concat(values=xs, axis=-1)

    def neg(self, x):
        return self.mb.mul(x=x, y=np.float16(-1.0))

    def add(self, x, y):
        return self.mb.add(x=x, y=y)

    def mul(self, x, y):
        return self.mb.mul(x=x, y=y)

    def tile(self, x, reps):
        return self.mb.tile(x=x, reps=np.array(reps, dtype=np.int32))

    def matmul(self, x, y, transpose_y=False):
        return self.mb.matmul(x=x, y=y, transpose_y=transpose_y)

    def softmax(self, x):
        return self.mb.softmax(x=x, axis=-1)

    def silu(self, x):
        return self.mb.silu(x=x)


def build(spec_path: str, weights_path: str, out: str) -> dict:
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    with open(spec_path) as f:
        spec = json.load(f)
    weights = dict(np.load(weights_path))
    t = spec["seq_len"]

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, t), dtype=types.int32)], opset_version=ct.target.iOS18)
    def prog(input_ids):
        ops = MilOps(spec, weights, mb, types)
        return mb.identity(x=_coreml_graph.forward(ops, spec, input_ids), name="logits")

    # The program is fp16 already, with RMSNorm's statistics in fp32 on purpose: FLOAT32 here
    # means "leave the dtypes as built" (FLOAT16 would turn those fp32 ops into fp16 as well).
    model = ct.convert(
        prog,
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=ct.precision.FLOAT32,
        skip_model_load=True,
    )
    model.short_description = spec.get("description", "")
    model.save(out)
    weight_file = os.path.join(out, "Data", "com.apple.CoreML", "weights", "weight.bin")
    return {
        "path": out,
        "weight_bytes": os.path.getsize(weight_file),
        "clustered": sum(1 for w in spec["weights"].values() if w["kind"] == "lut"),
    }


def read(package: str, out_npz: str) -> dict:
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    model = ct.models.MLModel(package, skip_model_load=True)
    spec = model.get_spec()
    prog = milproto_load(spec, spec.specificationVersion, os.path.join(package, "Data", "com.apple.CoreML", "weights"))
    arrays, ops = {}, {}
    for op in prog.functions["main"].operations:
        ops[op.op_type] = ops.get(op.op_type, 0) + 1
        if op.op_type == "constexpr_sparse_to_dense" and op.name.endswith("___outliers"):
            name = op.name[: -len("___outliers")].replace("__", ".")
            arrays[name + ".outliers_dense"] = np.asarray(op.materialized_val_inference())
        if op.op_type == "constexpr_lut_to_dense":
            name = op.name.replace("__", ".")
            arrays[name + ".indices"] = np.asarray(op.indices.val).astype(np.uint8)
            arrays[name + ".lut"] = np.asarray(op.lut.val)
            arrays[name + ".dense"] = np.asarray(op.materialized_val_inference())
    np.savez(out_npz, **arrays)
    return {
        "ops": ops,
        "opset": str(prog.functions["main"].opset_version),
        "inputs": {k: list(v.shape) for k, v in prog.functions["main"].inputs.items()},
        "outputs": [list(o.shape) for o in prog.functions["main"].outputs],
    }


if __name__ == "__main__":
    cmd = sys.argv[1]
    result = build(*sys.argv[2:5]) if cmd == "build" else read(*sys.argv[2:4])
    print(json.dumps(result))
