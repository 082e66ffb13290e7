"""What `keep_norm=True` adds to a block's time (issue 9: a method option that costs more
than 5% of a block says so).

One ViT block of the given timm model (random weights) runs `forward_tokens` on a batch of
197 tokens, removing r of them with ToMe, with plain averaging and with norm-keeping merges,
timed interleaved (median of repeats) in one run; the merge alone is timed the same way.

    python benchmarks/keep_norm_cost.py --model vit_small_patch16_224 --batch-size 32 --threads 2
"""

from __future__ import annotations

import argparse
import statistics

import timm
import torch

import tokenmerge
from tokenmerge.evaluation.throughput import time_interleaved
from tokenmerge.core.matching import bipartite_soft_matching
from tokenmerge.core.merge import merge_tokens
from tokenmerge.methods.base import TokenState


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--r", type=int, default=13)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = timm.create_model(args.model)
    x = torch.randn(args.batch_size, base.patch_embed.num_patches + base.num_prefix_tokens, base.embed_dim)
    size = torch.ones(*x.shape[:2], 1)
    plan = bipartite_soft_matching(torch.randn(*x.shape[:2], 64), args.r, 1)
    calls = {}
    for keep in (False, True):
        model = tokenmerge.patch(timm.create_model(args.model).eval(), r=args.r, keep_norm=keep)
        block, reducer, config = model.blocks[1], model.token_reducer, model.tokenmerge_config
        calls["block", keep] = lambda b=block, red=reducer, c=config: b.forward_tokens(TokenState(x, size), args.r, red, c, 1)
        calls["merge", keep] = lambda keep=keep: merge_tokens(x, size, plan, keep)
    with torch.inference_mode():
        times = time_interleaved(calls, warmup=3, repeats=args.repeats)
    ms = {key: statistics.median(t) * 1e3 for key, t in times.items()}
    print(f"{args.model}, batch {args.batch_size}, r={args.r}, {args.threads} threads; median ms of {args.repeats}")
    print("| | plain average | keep_norm | added, % of the plain block |")
    print("|---|---|---|---|")
    for part in ("block", "merge"):
        added = (ms[part, True] - ms[part, False]) / ms["block", False] * 100
        print(f"| {part} | {ms[part, False]:.2f} | {ms[part, True]:.2f} | {added:+.1f} |")


if __name__ == "__main__":
    main()
