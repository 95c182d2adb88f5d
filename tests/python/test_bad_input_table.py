"""The table of bad inputs against every public entry point, and the error each one gets.

``TABLE`` below (plus the op cases in test_bad_input.py) is the source of tests/BAD_INPUTS.md;
``test_markdown_is_current`` fails when the two drift apart. Regenerate with
``python tests/python/test_bad_input_table.py > tests/BAD_INPUTS.md``.
"""

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import edkm
from edkm.cli import main as cli

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from test_bad_input import CASES as OP_CASES  # noqa: E402


def _lin(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 4)).to(dtype)


def _palettized():
    return edkm.palettize_(_lin(), edkm.Config(bits=2, init="kmeans++"))


def _finalized():
    return edkm.finalize(_palettized())


def _nan_model():
    m = _lin()
    with torch.no_grad():
        m[0].weight[0, 0] = math.nan
    return m


def _saved(tmp):
    p = tmp / "m.safetensors"
    edkm.save(_finalized(), p)
    return p


def _truncated(tmp):
    p = _saved(tmp)
    p.write_bytes(p.read_bytes()[:-7])
    return p


def _k_above_distinct():
    lin = edkm.palettize_(nn.Linear(2, 1), edkm.Config(bits=8))  # 2 distinct weights, K = 256
    c = lin.centroids
    assert c.shape == (1, 256) and torch.unique(c).numel() == 2
    edkm.finalize(lin)
    return lin


def _tiny_lm(vocab=32, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=32,
        )
    )


def _finetune_with_teacher(vocab_student, vocab_teacher):
    from edkm.finetune import finetune

    blocks = ["x"]  # never reached: the teacher is checked first
    return finetune(
        _tiny_lm(vocab_student),
        None,
        blocks,
        1,
        config=edkm.TrainConfig(alpha=1.0),
        teacher=_tiny_lm(vocab_teacher),
        progress=False,
    )


def _fisher_short():
    return edkm.fisher(_tiny_lm(), torch.randint(0, 32, (2, 1, 8)), num_batches=3, progress=False)


def _budget_too_small():
    m = _lin()
    sens = {n: torch.ones_like(mod.weight) for n, mod in m.named_modules() if isinstance(mod, nn.Linear)}
    return edkm.mixed_precision_config(m, 0.5, sens, edkm.Config(), progress=False)


W = torch.randn(8, 16)


def _lut(bits=3, rows=8, cols=16, groups=2):
    idx = torch.randint(0, 1 << bits, (rows * cols,), generator=torch.Generator().manual_seed(0))
    return edkm.pack_indices(idx, bits), torch.randn(groups, 1 << bits, 1)


def _lut_call(**change):
    packed, lut = _lut()
    args = dict(input=torch.randn(2, 16), packed=packed, lut=lut, bits=3, out_features=8)
    args.update(change)
    return edkm.lut_linear(args["input"], args["packed"], args["lut"], args["bits"], args["out_features"])


def _packed_into_other_model(tmp):
    p = _saved(tmp)
    return edkm.load(p, nn.Sequential(nn.Linear(8, 6)), packed=True)


def _same_as_contiguous(view):
    """Views are accepted and give what their contiguous copy gives."""
    c = torch.linspace(-1, 1, 4).view(1, 4)
    a = edkm.dkm(view, c, 0.1).clustered
    b = edkm.dkm(view.contiguous(), c, 0.1).clustered
    assert a.shape == view.shape and torch.equal(a, b)


# (entry point, bad input, call(tmp_path), exception, message regex)
TABLE = [
    ("Config", "bits 0", lambda t: edkm.Config(bits=0), ValueError, "bits must be an integer in 1..8"),
    ("Config", "bits 9", lambda t: edkm.Config(bits=9), ValueError, "bits must be an integer in 1..8"),
    ("Config", "unknown key", lambda t: edkm.Config.from_dict({"bitz": 3}), ValueError, "unknown config key"),
    ("Config", "group_size 0", lambda t: edkm.Config(group_size=0), ValueError, "group_size must be"),
    (
        "Config",
        "cluster_dtype float32",
        lambda t: edkm.Config(cluster_dtype=torch.float32),
        ValueError,
        "cluster_dtype must be",
    ),
    (
        "Config",
        "invalid regex",
        lambda t: edkm.Config(module_names={"(": None}),
        ValueError,
        "not a valid regular expression",
    ),
    (
        "palettize_",
        "pattern matching no module",
        lambda t: edkm.palettize_(_lin(), edkm.Config(module_names={"decoder": None})),
        ValueError,
        "matches no module",
    ),
    (
        "palettize_",
        "group size not dividing the rows",
        lambda t: edkm.palettize_(_lin(), edkm.Config(group_size=4)),
        ValueError,
        "group_size 4 must divide",
    ),
    (
        "palettize_",
        "cluster_dim not dividing the columns",
        lambda t: edkm.palettize_(_lin(), edkm.Config(cluster_dim=3, init="kmeans++")),
        ValueError,
        "cluster_dim 3 must divide",
    ),
    ("palettize_", "K larger than the distinct values", lambda t: _k_above_distinct(), None, ""),
    ("palettize_", "NaN in a weight", lambda t: edkm.palettize_(_nan_model(), edkm.Config()), ValueError, "NaN or Inf"),
    (
        "palettize_",
        "model palettized twice",
        lambda t: edkm.palettize_(_palettized(), edkm.Config()),
        ValueError,
        "already palettized",
    ),
    (
        "palettize_",
        "a dict instead of a Config",
        lambda t: edkm.palettize_(_lin(), {"bits": 3}),
        TypeError,
        "must be an edkm.Config",
    ),
    (
        "finalize",
        "model without clustered modules",
        lambda t: edkm.finalize(_lin()),
        ValueError,
        "no clustered modules",
    ),
    (
        "save",
        "model not finalized",
        lambda t: edkm.save(_palettized(), t / "m.safetensors"),
        ValueError,
        "not finalized",
    ),
    ("save", "directory instead of a file", lambda t: edkm.save(_finalized(), t), IsADirectoryError, "is a directory"),
    (
        "save",
        "missing directory",
        lambda t: edkm.save(_finalized(), t / "no" / "m.safetensors"),
        FileNotFoundError,
        "does not exist",
    ),
    (
        "save",
        "read-only output (a read-only file system)",
        lambda t: edkm.save(_finalized(), "/proc/m.safetensors"),
        PermissionError,
        "cannot write to directory '/proc'",
    ),
    ("load", "missing file", lambda t: edkm.load(t / "none.safetensors"), FileNotFoundError, "no such file"),
    ("load", "directory instead of a file", lambda t: edkm.load(t), edkm.FormatError, "is a directory"),
    (
        "load",
        "truncated file",
        lambda t: edkm.load(_truncated(t)),
        edkm.FormatError,
        "truncated|outside the data section|tile",
    ),
    (
        "load",
        "not a safetensors file",
        lambda t: (t / "x.bin").write_bytes(b"hello world, not a model") and edkm.load(t / "x.bin"),
        edkm.FormatError,
        "header length",
    ),
    (
        "load",
        "model of another shape",
        lambda t: edkm.load(_saved(t), nn.Sequential(nn.Linear(8, 6))),
        edkm.FormatError,
        "does not match the model",
    ),
    ("dkm", "0-d weight", lambda t: _same_as_contiguous(torch.tensor(0.5)), None, ""),
    ("dkm", "non-contiguous weight (a transposed view)", lambda t: _same_as_contiguous(W.t()), None, ""),
    ("dkm", "overlapping view (stride 0, expand)", lambda t: _same_as_contiguous(W[:1].expand(8, 16)), None, ""),
    ("pack_indices", "index out of range", lambda t: edkm.pack_indices(torch.tensor([0, 8]), 3), ValueError, "indices"),
    ("pack_indices", "bits 9", lambda t: edkm.pack_indices(torch.tensor([0, 1]), 9), ValueError, "bits"),
    (
        "unpack_indices",
        "packed too short",
        lambda t: edkm.unpack_indices(torch.zeros(1, dtype=torch.uint8), 3, 8),
        ValueError,
        "packed",
    ),
    (
        "optimal_kmeans_1d",
        "values not increasing",
        lambda t: edkm.optimal_kmeans_1d(
            torch.tensor([1.0, 0.0], dtype=torch.float64), torch.ones(2, dtype=torch.float64), 2
        ),
        ValueError,
        "increasing",
    ),
    (
        "saved_tensors",
        "shard_group without torch.distributed",
        lambda t: edkm.saved_tensors(shard_group=object()).__enter__(),
        ValueError,
        "shard_group needs torch.distributed",
    ),
    (
        "edkm compress",
        "unknown model",
        lambda t: cli(["compress", "nothing-here", "--out", str(t / "o")]),
        SystemExit,
        "neither a known name",
    ),
    (
        "edkm compress",
        "bits 9",
        lambda t: cli(["compress", "smollm2-135m", "--bits", "9", "--out", str(t / "o")]),
        SystemExit,
        "bits must be an integer in 1..8",
    ),
    (
        "Config",
        "outlier_fraction 0.2",
        lambda t: edkm.Config(outlier_fraction=0.2),
        ValueError,
        r"outlier_fraction must be a number in \[0, 0.1\]",
    ),
    (
        "Config",
        "outlier_criterion 'largest'",
        lambda t: edkm.Config(outlier_criterion="largest"),
        ValueError,
        "outlier_criterion must be one of",
    ),
    (
        "Config",
        "outliers with cluster_dim 2",
        lambda t: edkm.Config(outlier_fraction=0.01, cluster_dim=2, init="kmeans++"),
        ValueError,
        "outlier_fraction must be 0 when cluster_dim > 1",
    ),
    (
        "palettize_",
        "init 'sensitivity' without sensitivities",
        lambda t: edkm.palettize_(_lin(), edkm.Config(init="sensitivity")),
        ValueError,
        "needs its sensitivity",
    ),
    (
        "palettize_",
        "outlier_criterion 'sensitivity' without sensitivities",
        lambda t: edkm.palettize_(_lin(), edkm.Config(outlier_fraction=0.05, outlier_criterion="sensitivity")),
        ValueError,
        "needs its sensitivity",
    ),
    (
        "palettize_",
        "sensitivity of the wrong shape",
        lambda t: edkm.palettize_(_lin(), edkm.Config(init="sensitivity"), sensitivity={"0": torch.ones(3)}),
        ValueError,
        "must be a tensor of the weight's shape",
    ),
    (
        "palettize_",
        "sensitivity for a module that does not exist",
        lambda t: edkm.palettize_(_lin(), edkm.Config(), sensitivity={"decoder": torch.ones(3)}),
        ValueError,
        "names no Linear/Embedding module",
    ),
    (
        "TrainConfig",
        "schedule 'step'",
        lambda t: edkm.TrainConfig(schedule="step"),
        ValueError,
        "schedule must be one of",
    ),
    (
        "TrainConfig",
        "distillation weight alpha 1.5",
        lambda t: edkm.TrainConfig(alpha=1.5),
        ValueError,
        r"alpha must be a finite number in \[0, 1\]",
    ),
    (
        "TrainConfig",
        "distillation temperature 0",
        lambda t: edkm.TrainConfig(temperature=0),
        ValueError,
        "temperature must be a finite number",
    ),
    (
        "finetune",
        "teacher with another vocabulary",
        lambda t: _finetune_with_teacher(32, 40),
        ValueError,
        "teacher's vocabulary has 40 tokens, the student's 32",
    ),
    (
        "fisher",
        "calibration set shorter than num_batches",
        lambda t: _fisher_short(),
        ValueError,
        "has 2 batches, fewer than the num_batches=3",
    ),
    (
        "gptq_",
        "a model that is not palettized",
        lambda t: edkm.gptq_(_lin(), {}),
        ValueError,
        "the model has no clustered modules",
    ),
    (
        "gptq_",
        "a Hessian of the wrong size",
        lambda t: edkm.gptq_(_palettized(), {"0": torch.eye(3)}),
        ValueError,
        "must be a \\[8, 8\\] tensor",
    ),
    (
        "gptq_",
        "a Hessian key naming no module",
        lambda t: edkm.gptq_(_palettized(), {"decoder": torch.eye(8)}),
        ValueError,
        "names no module",
    ),
    (
        "gptq_quantize",
        "LUT groups not dividing the rows",
        lambda t: edkm.gptq_quantize(torch.randn(6, 4), torch.eye(4), torch.zeros(4, 2)),
        ValueError,
        "4 LUT groups do not divide",
    ),
    (
        "gptq_quantize",
        "a Hessian with NaN",
        lambda t: edkm.gptq_quantize(torch.randn(6, 4), torch.full((4, 4), math.nan), torch.zeros(1, 2)),
        ValueError,
        "the hessian has NaN or Inf values",
    ),
    (
        "edkm compress",
        "--gptq-batches 0",
        lambda t: cli(["compress", "smollm2-135m", "--gptq", "--gptq-batches", "0", "--out", str(t / "o")]),
        SystemExit,
        "--gptq-batches must be >= 1",
    ),
    (
        "mixed_precision_config",
        "target bits/weight below the smallest achievable",
        lambda t: _budget_too_small(),
        ValueError,
        "cannot be met: the smallest achievable file is",
    ),
    (
        "edkm compress",
        "--steps without a corpus and without --data-free 1",
        lambda t: cli(["compress", "smollm2-135m", "--steps", "2", "--data", "none", "--out", str(t / "o")]),
        SystemExit,
        "--data-free 1",
    ),
    (
        "edkm compress",
        "--target-bits with --embedding-bits",
        lambda t: cli(
            ["compress", "smollm2-135m", "--target-bits", "3.2", "--embedding-bits", "4", "--out", str(t / "o")]
        ),
        SystemExit,
        "drop --embedding-bits",
    ),
    ("edkm info", "missing file", lambda t: cli(["info", str(t / "none.safetensors")]), SystemExit, "no such file"),
    (
        "lut_linear",
        "packed one byte short",
        lambda t: _lut_call(packed=_lut()[0][:-1]),
        ValueError,
        "bytes, but packed has",
    ),
    (
        "lut_linear",
        "LUT of 2**bits entries for other bits",
        lambda t: _lut_call(bits=4),
        ValueError,
        "2\\*\\*bits = 16 entries",
    ),
    ("lut_linear", "bits 9", lambda t: _lut_call(bits=9), ValueError, "bits must be in 1..8"),
    (
        "lut_linear",
        "2-D LUT",
        lambda t: _lut_call(lut=torch.randn(2, 8)),
        ValueError,
        "lut must be \\[groups, 2\\*\\*bits, cluster_dim\\]",
    ),
    (
        "lut_linear",
        "int32 packed indices",
        lambda t: _lut_call(packed=_lut()[0].int()),
        TypeError,
        "packed must be uint8",
    ),
    (
        "lut_linear",
        "integer input",
        lambda t: _lut_call(input=torch.ones(2, 16, dtype=torch.int64)),
        TypeError,
        "input must be float16, bfloat16, float32 or float64",
    ),
    (
        "lut_linear",
        "input of the wrong width",
        lambda t: _lut_call(input=torch.randn(2, 15)),
        ValueError,
        "a \\[8, 15\\] weight",
    ),
    (
        "lut_linear",
        "LUT on another device (meta)",
        lambda t: _lut_call(lut=torch.empty(2, 8, 1, device="meta")),
        ValueError,
        "lut must be on packed's device",
    ),
    (
        "lut_embedding",
        "row out of range",
        lambda t: edkm.lut_embedding(torch.tensor([8]), *_lut(), 3, 8, 16),
        IndexError,
        "must lie in \\[0, num_embeddings\\)",
    ),
    (
        "load(packed=True)",
        "model of another shape",
        lambda t: _packed_into_other_model(t),
        edkm.FormatError,
        "does not match the model",
    ),
    (
        "edkm generate",
        "--max-new-tokens 0",
        lambda t: cli(["generate", str(_saved(t)), "--prompt", "x", "--max-new-tokens", "0"]),
        SystemExit,
        "max-new-tokens must be >= 1",
    ),
    (
        "edkm info",
        "corrupted file",
        lambda t: cli(["info", str(_truncated(t))]),
        SystemExit,
        "truncated|outside the data section|tile",
    ),
    (
        "save",
        "plain_dtype int8",
        lambda t: edkm.save(_finalized(), t / "m.safetensors", plain_dtype="int8"),
        ValueError,
        "plain_dtype must be one of",
    ),
    (
        "edkm export",
        "--hf into a non-empty directory without --force",
        lambda t: cli(["export", str(_saved(t)), "--hf", str(_non_empty_dir(t))]),
        SystemExit,
        "is not empty; pass --force",
    ),
    (
        "edkm export",
        "--hf of a file that does not record its base model",
        lambda t: cli(["export", str(_saved(t)), "--hf", str(t / "hf")]),
        SystemExit,
        "does not record its base model",
    ),
    (
        "export_hf",
        "dtype int8",
        lambda t: edkm.export_hf(str(_saved(t)), str(t / "hf"), dtype="int8"),
        ValueError,
        "dtype must be one of",
    ),
    (
        "edkm export",
        "--coreml to a name without .mlpackage",
        lambda t: cli(["export", str(_saved(t)), "--coreml", str(t / "m.zip")]),
        SystemExit,
        "must end in .mlpackage",
    ),
    (
        "edkm export",
        "--coreml onto an existing package without --force",
        lambda t: cli(["export", str(_saved(t)), "--coreml", str(_non_empty_dir(t, "m.mlpackage"))]),
        SystemExit,
        "exists; pass --force",
    ),
    (
        "edkm export",
        "--coreml of a file that does not record its base model",
        lambda t: cli(["export", str(_saved(t)), "--coreml", str(t / "m.mlpackage")]),
        SystemExit,
        "not an edkm file with a known base model",
    ),
    (
        "edkm eval --harness lm-eval",
        "a task lm-eval has no config for (ppl)",
        lambda t: cli(["eval", str(_saved(t)), "--harness", "lm-eval", "--tasks", "ppl"]),
        SystemExit,
        "'ppl' is edkm's own perplexity task",
    ),
]


def _non_empty_dir(t, name="out"):
    d = t / name
    d.mkdir()
    (d / "mine.txt").write_text("keep me")
    return d


@pytest.mark.parametrize("call,error,message", [c[2:] for c in TABLE], ids=[f"{c[0]}: {c[1]}" for c in TABLE])
def test_bad_input_table(tmp_path, call, error, message):
    if error is None:  # accepted, with a documented outcome (see the markdown)
        call(tmp_path)
        return
    with pytest.raises(error, match=message):
        call(tmp_path)
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers, f"half-written files left: {leftovers}"


def markdown() -> str:
    lines = [
        "# Bad inputs and the error each gets",
        "",
        "Generated from tests/python/test_bad_input_table.py and test_bad_input.py, which run every",
        "row (`python tests/python/test_bad_input_table.py > tests/BAD_INPUTS.md` to regenerate).",
        "",
        "| entry point | bad input | error | message (regex) |",
        "|---|---|---|---|",
    ]
    for entry, what, _, error, message in TABLE:
        err = (
            "accepted (same shape, same result as a contiguous copy)"
            if error is None and entry == "dkm"
            else "accepted (K centroids, duplicates allowed)"
            if error is None
            else error.__name__
        )
        lines.append(f"| `{entry}` | {what} | {err} | `{message.replace('|', ' or ')}` |")
    for name, _, error, message in OP_CASES:
        entry = name.split("-")[0] if name.split("-")[0] in ("assign", "dequantize", "reference") else "dkm"
        entry = "dkm_reference" if entry == "reference" else entry
        lines.append(f"| `{entry}` | {name.replace('-', ' ')} | {error.__name__} | `{message}` |")
    return "\n".join(lines) + "\n"


def test_markdown_is_current():
    assert (HERE.parent / "BAD_INPUTS.md").read_text() == markdown(), (
        "tests/BAD_INPUTS.md is stale: python tests/python/test_bad_input_table.py > tests/BAD_INPUTS.md"
    )


if __name__ == "__main__":
    sys.stdout.write(markdown())
