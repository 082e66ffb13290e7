"""Share of a block's time spent deciding the merge (the method's `plan`), per method.

One ViT block of the given timm model (random weights) runs `forward_tokens` on a batch of
197 tokens with r tokens removed; separately, the method's `plan` runs on the same
attention tensors. Both are timed interleaved (median of repeats) in one run, and the ratio
is reported: the issue's rule is that a method whose scoring costs more than 5% of a
block's time says so.

    python benchmarks/scoring_cost.py --model vit_small_patch16_224 --batch-size 32 --threads 2
    python benchmarks/scoring_cost.py --model vit_tiny_patch16_224 --methods tome dtem dtem:matching=agglomerative --r 16

A method may carry options as `tune --methods` takes them (`NAME:KEY=VALUE,...`).
"""

from __future__ import annotations

import argparse
import json
import statistics

import timm
import torch

import tokenmerge
from tokenmerge.commands.tune import parse_candidate
from tokenmerge.evaluation.throughput import time_interleaved
from tokenmerge.methods.base import TokenState


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--methods", nargs="+", default=["tome", "pitome", "mctf", "tcvit", "evit"])
    parser.add_argument("--r", type=int, default=13)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = timm.create_model(args.model).eval()
    x = torch.randn(args.batch_size, base.patch_embed.num_patches + base.num_prefix_tokens, base.embed_dim)
    size = torch.ones(*x.shape[:2], 1)
    models, calls = {}, {}
    for method in args.methods:
        name, options = parse_candidate(method)
        model = tokenmerge.patch(timm.create_model(args.model).eval(), method=name, r=args.r, **options)
        block, reducer, config = model.blocks[1], model.token_reducer, model.tokenmerge_config
        with torch.inference_mode():
            attn = block._tm_attend(block._tm_norm1(x), None, config.attention_impl)[1]
        state = TokenState(x, size)
        calls[method, "block"] = lambda b=block, s=state, red=reducer, c=config: b.forward_tokens(s, args.r, red, c, 1)
        calls[method, "plan"] = lambda red=reducer, a=attn: red.plan(x, a, args.r, config.num_protected, 1)
        models[method] = model
    with torch.inference_mode():
        times = time_interleaved(calls, warmup=2, repeats=args.repeats)
    rows = []
    for method in models:
        block = statistics.median(times[method, "block"])
        plan = statistics.median(times[method, "plan"])
        rows.append({"method": method, "block_ms": 1e3 * block, "plan_ms": 1e3 * plan, "share": plan / block})
        print(f"{method:30s} block {1e3 * block:8.2f} ms   plan {1e3 * plan:7.2f} ms   share {100 * plan / block:5.1f}%")
    print(json.dumps({"model": args.model, "batch_size": args.batch_size, "r": args.r,
                      "threads": args.threads, "rows": rows}))


if __name__ == "__main__":
    main()
