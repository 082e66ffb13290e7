"""Merge in the early blocks, prune (or EViT-fuse) in the late ones: does it beat merging
throughout, at the same schedule? (issue 9; the idea of PPT, Wu et al., "PPT: Token Pruning
and Pooling for Efficient Vision Transformers", 2023: late blocks' class attention is peaked
enough to drop tokens, early blocks' is not.)

Scored like `tune` scores candidates, on train images spread over the classes: KL to the
unmodified model, top-1 agreement with it, and top-1 accuracy. The late method takes over at
block ``switch`` (12 = merging throughout). Schedules: `tune`'s -50% MCTF schedule and
constant r=16, the same for every row, so every row removes the same tokens per block.

    OMP_NUM_THREADS=1 python benchmarks/merge_then_prune.py --images 500 --threads 1
"""

from __future__ import annotations

import argparse
import warnings

import torch

import tokenmerge
from tokenmerge.evaluation.data import load_images
from tokenmerge.methods import TokenReducer, create_reducer
from tokenmerge.models import load_model

from holdout_kl import TRAIN, compare, logits

TUNED_50 = [20, 22, 15, 13, 17, 17, 17, 17, 13, 12, 7, 7]  # tune's -50% MCTF schedule (BENCHMARKS section 6)


class MergeThenPrune(TokenReducer):
    """``early`` in blocks ``< switch``, ``late`` from block ``switch`` on."""

    name = "merge_then_prune"

    def __init__(self, early: TokenReducer, late: TokenReducer, switch: int):
        super().__init__()
        self.early, self.late, self.switch = early, late, switch

    def max_reduction(self, num_tokens: int, num_protected: int) -> int:
        return min(self.early.max_reduction(num_tokens, num_protected),
                   self.late.max_reduction(num_tokens, num_protected))

    def check_protected(self, num_protected: int) -> None:
        self.early.check_protected(num_protected)
        self.late.check_protected(num_protected)

    def reduce(self, state, attn, r, num_protected, block_index):
        policy = self.early if block_index < self.switch else self.late
        return policy.reduce(state, attn, r, num_protected, block_index)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    x, y, _ = load_images(TRAIN, limit=args.images, spread=True)
    reference = logits(load_model(), x)
    print(f"{len(x)} train images, spread over the classes")
    print("| early | late | switch | schedule | KL | agreement % | top-1 % |")
    print("|---|---|---|---|---|---|---|")
    variants = [(late, switch) for late in ("prune", "evit") for switch in (10, 8, 6)]
    for early in ("mctf", "tome"):
        for late, switch in [("-", 12)] + variants:
            policy = MergeThenPrune(create_reducer(early), create_reducer("prune" if late == "-" else late), switch)
            for name, schedule in (("tune -50%", TUNED_50), ("16", 16)):
                # One proportional-attention setting for every row: the merging methods' default.
                model = tokenmerge.patch(load_model(), method=policy, r=schedule, prop_attn=True).eval()
                out = logits(model, x)
                kl, agreement = compare(out, reference)
                accuracy = (out.argmax(-1) == y).float().mean().item() * 100
                print(f"| {early} | {late} | {switch} | {name} | {kl:.4f} | {agreement:.1f} | {accuracy:.1f} |", flush=True)


if __name__ == "__main__":
    main()
