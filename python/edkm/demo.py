"""`make demo` / `edkm demo`: compress SmolLM2-135M and show that the compressed model still talks.

Runs from a plain clone, with no data folder: the fine-tuning data is text the original model
writes itself (data-free distillation), and quality is measured against the original on other
text it writes (KL divergence and top-1 next-token agreement). With the corpus beside the
project (``../shared/data`` or ``--data``), the held-out perplexity of the test split is added.

1. load the model; a frozen copy is the teacher;
2. post-training clustering (the recipe's clustering, no fine-tuning): each weight to its
   nearest centroid, then (``--gptq``, the default) the same LUTs with the error-compensated
   assignment of :mod:`edkm.gptq`, its input Hessians from the distillation's teacher-written
   blocks; quality and size of each;
3. eDKM: that clustering fine-tuned by distillation from the teacher on its own samples;
   finalized, saved, and loaded back into a fresh copy: what the file gives;
4. a table (size, bits/weight, KL, top-1 agreement, perplexity) and three prompts completed
   by the original and the compressed model side by side.
"""

from __future__ import annotations

import argparse
import copy
import resource
import time
from pathlib import Path

import torch

PROMPTS = ("The capital of France is", "To make a cup of tea, you", "The three primary colors are")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="model to compress (default smollm2-135m)")
    p.add_argument("--bits", type=int, default=4, help="bits per weight of every matrix (default 4)")
    p.add_argument("--group-size", type=int, default=None, help="output channels per LUT (default: one LUT per matrix)")
    p.add_argument(
        "--outlier-fraction",
        type=float,
        default=0.005,
        help="fraction of each matrix kept exactly in 16 bits (default 0.005)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=20,
        help="distillation steps (default 20: the demo fits about 11 minutes on 2 cores; more steps, better model)",
    )
    p.add_argument(
        "--gptq",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="error-compensated assignment (GPTQ over the LUTs) before the fine-tuning (default on)",
    )
    p.add_argument(
        "--gptq-blocks",
        type=int,
        default=80,
        help="teacher-written blocks for the input Hessians of --gptq: the first of the "
        "distillation's own (default 80, all of them at the default steps), or blocks of their "
        "own with --steps 0",
    )
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--block-len", type=int, default=128)
    p.add_argument(
        "--eval-blocks",
        type=int,
        default=8,
        help="held-out teacher-written blocks for KL and top-1 agreement (default 8)",
    )
    p.add_argument(
        "--eval-tokens",
        type=int,
        default=4096,
        help="held-out corpus tokens for perplexity, when the corpus is there (default 4096)",
    )
    p.add_argument(
        "--data",
        default=None,
        help="data directory for the held-out perplexity (default ../shared/data when present; "
        "'none': skip it, as in a plain clone)",
    )
    p.add_argument("--out", default="build/demo/smollm2-135m-edkm.safetensors")
    p.add_argument("--seed", type=int, default=0)


def complete(model, tok, prompt: str, new_tokens: int = 20) -> str:
    """Greedy continuation of ``prompt`` (deterministic)."""
    ids = torch.tensor([tok(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tok.eos_token_id,
        )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).replace("\n", " ").strip()


def main(args) -> int:
    import edkm
    from edkm.data import corpus_split, default_data_dir, read_texts
    from edkm.datafree import generate_blocks
    from edkm.evaluate import perplexity, teacher_agreement
    from edkm.finetune import TrainConfig, finetune
    from edkm.models import load_model
    from edkm.recipe import describe_training, frozen_copy

    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    luts = f"one LUT per {args.group_size} output channels" if args.group_size else "one LUT per matrix"
    print(
        f"edkm demo: {args.model} to {args.bits} bits ({luts}, {args.outlier_fraction:.2%} of each matrix "
        f"kept exact), {args.steps} distillation steps on text the model writes itself, "
        f"{torch.get_num_threads()} CPU threads"
    )
    model, tok = load_model(args.model, torch.float32)
    model.eval()
    teacher = frozen_copy(model)
    n_weights = sum(p.numel() for p in model.parameters())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cache = out.parent / ".edkm-cache"

    # Held-out quality text: teacher samples from a seed the training data never uses.
    held_out = generate_blocks(
        teacher,
        args.eval_blocks,
        args.block_len,
        seed=args.seed + 10_000,
        bos_token_id=tok.bos_token_id,
        cache_dir=cache,
        desc="edkm: held-out samples",
    )
    data_dir = None if args.data is not None and str(args.data).lower() == "none" else (args.data or default_data_dir())
    test_texts = None
    if data_dir is None:
        print(
            "edkm demo: no corpus (../shared/data or --data): held-out perplexity is skipped; "
            "quality is KL and top-1 agreement with the original on text it wrote"
        )
    else:
        test_texts = read_texts(corpus_split(data_dir)[1])

    def quality(m, label):
        a = teacher_agreement(m, teacher, held_out, progress=True)
        row = {"kl": a["kl"], "top1": a["top1"], "ppl": None}
        if test_texts is not None:
            row["ppl"] = perplexity(
                m, tok, test_texts, context_len=512, stride=256, max_tokens=args.eval_tokens, progress=True
            )["ppl"]
        ppl = f", held-out perplexity {row['ppl']:.2f}" if row["ppl"] is not None else ""
        print(f"  {label}: KL to the original {row['kl']:.4f}, top-1 agreement {row['top1']:.1%}{ppl}")
        return row

    cfg = edkm.Config(
        bits=args.bits, group_size=args.group_size, outlier_fraction=args.outlier_fraction, seed=args.seed
    )
    stages = {"load and held-out samples": time.perf_counter() - t_start}
    t0 = time.perf_counter()
    rows = [("original", n_weights * 2, quality(model, "original"))]
    stages["quality of the original"] = time.perf_counter() - t0

    # One clustering serves both rows: the post-training model is a finalized copy of it, and
    # eDKM fine-tunes the clustering itself.
    t0 = time.perf_counter()
    edkm.palettize_(model, cfg, progress=True)
    ptq = edkm.finalize(copy.deepcopy(model))
    ptq_path = out.with_name(out.stem + "-post-training.safetensors")
    ptq_size = edkm.save(ptq, ptq_path, metadata={"edkm.base_model": args.model})
    stages["post-training clustering"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    label = "post-training, nearest centroid"
    rows.append((label, ptq_size, quality(ptq, label)))
    stages["quality of post-training"] = time.perf_counter() - t0
    del ptq
    train = TrainConfig(
        lr=args.lr,
        schedule="cosine",
        batch_size=args.batch_size,
        block_len=args.block_len,
        seed=args.seed,
        alpha=1.0,
        data_free_fraction=1.0,
    )
    if args.gptq:
        from edkm.finetune import training_blocks
        from edkm.gptq import gptq_, input_hessians, median_ratio

        t0 = time.perf_counter()
        # The Hessians come from the distillation's own teacher-written blocks (sampled once,
        # cached for the fine-tuning), or from samples of their own when there is no training.
        if args.steps:
            calib = training_blocks(tok, None, args.steps, train, teacher, data_free_cache=cache)[: args.gptq_blocks]
        else:
            calib = generate_blocks(
                teacher,
                args.gptq_blocks,
                args.block_len,
                seed=args.seed + 20_000,
                bos_token_id=tok.bos_token_id,
                cache_dir=cache,
                desc="edkm: calibration samples",
            )
        stats = gptq_(model, input_hessians(teacher, calib.split(4), progress=True), progress=True)
        print(
            f"  error-compensated assignment of {len(stats)} matrices: median output error "
            f"{median_ratio(stats):.3f}x nearest rounding's on {calib.numel():,} teacher-written tokens"
        )
        ptq = edkm.finalize(copy.deepcopy(model))
        ptq_size = edkm.save(ptq, ptq_path, metadata={"edkm.base_model": args.model})
        stages["error-compensated assignment (incl. sampling the training text)"] = time.perf_counter() - t0
        label = "post-training, GPTQ assignment"
        rows.append((label, ptq_size, quality(ptq, label)))
        del ptq

    training = None
    if args.steps:
        t0 = time.perf_counter()
        training = finetune(
            model, tok, None, args.steps, config=train, teacher=teacher, data_free_cache=cache, progress=True
        )
        stages["distillation (incl. sampling its text)"] = time.perf_counter() - t0
    edkm.finalize(model)
    for line in describe_training(training):
        print(f"  {line}")
    t0 = time.perf_counter()
    size = edkm.save(model, out, metadata={"edkm.base_model": args.model})
    fresh, _ = load_model(args.model, torch.float32)
    edkm.load(out, fresh)
    rows.append((f"eDKM, {args.steps} steps (from the file)", size, quality(fresh, "eDKM, loaded from the file")))
    stages["save, reload, quality of eDKM"] = time.perf_counter() - t0

    print(f"\n{'model':<34} {'size':>10} {'bits/weight':>11} {'KL':>8} {'top-1':>7} {'held-out ppl':>13}")
    for label, nbytes, q in rows:
        ppl = f"{q['ppl']:.2f}" if q["ppl"] is not None else "skipped"
        print(
            f"{label:<34} {nbytes / 2**20:>6.1f} MiB {8 * nbytes / n_weights:>11.2f} {q['kl']:>8.4f} "
            f"{q['top1']:>7.1%} {ppl:>13}"
        )
    if test_texts is None:
        print("(held-out perplexity skipped: no corpus; pass --data DIR to add it)")
    print(
        "(size of the original: 16 bits per weight; KL and top-1 on "
        f"{held_out.numel():,} tokens of text the original wrote, never trained on)"
    )

    t0 = time.perf_counter()
    print("\nprompt completions (greedy), original | compressed:")
    for prompt in PROMPTS:
        print(
            f"  {prompt!r}\n    original:   {complete(teacher, tok, prompt)}\n"
            f"    compressed: {complete(fresh, tok, prompt)}"
        )
    stages["prompts"] = time.perf_counter() - t0
    print("\ntime per stage: " + ", ".join(f"{k} {v:.0f} s" for k, v in stages.items()))
    print(f"file: {out} (inspect with: edkm info {out})")
    print(
        f"done in {time.perf_counter() - t_start:.0f} s; peak RSS "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
    )
    return 0
