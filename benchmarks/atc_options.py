"""ATC's options (linkage, size criterion), and ATC against ToMe, on train images of two
models (issue 9).

The defaults of `tokenmerge.patch(model, method="atc")` are chosen from this table
(train images only, no val): KL to the unmodified model and top-1 agreement with it at
constant r on the 600 train images outside tune's calibration set
(`benchmarks/holdout_kl.py`'s holdout), for ToMe and ATC with each linkage, and with complete
linkage plus MCTF's size criterion at MCTF's temperature (40), on the shipped 12-block
ViT-Tiny and the 6-block one.

    OMP_NUM_THREADS=1 python benchmarks/atc_options.py --threads 1 --out benchmarks/results/atc/options.md
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch

import tokenmerge
from tokenmerge.evaluation.flops import count_gflops
from tokenmerge.models import load_model

from holdout_kl import compare, holdout_images, logits

ROOT = Path(__file__).resolve().parents[1]
D6 = ROOT / "benchmarks/models/vit_tiny_d6_patch16_224.imagenette.safetensors"
MODELS = [
    ("vit_tiny (12 blocks)", lambda: load_model(), (16, 13)),
    ("vit_tiny_d6 (6 blocks)", lambda: load_model("vit_tiny_patch16_224", checkpoint=D6, num_classes=10, depth=6), (16,)),
]
VARIANTS = ([("tome", {})] + [("atc", {"linkage": linkage}) for linkage in ("complete", "average", "single")]
            + [("atc", {"linkage": "complete", "tau_size": 40.0})])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    images = holdout_images(args.images)
    lines = ["| model | r | method | GFLOPs | KL to unmodified | top-1 agreement (%) |", "|---|---|---|---|---|---|"]
    for label, load, schedules in MODELS:
        reference = logits(load().eval(), images)
        for r in schedules:
            for method, options in VARIANTS:
                model = tokenmerge.patch(load(), method=method, r=r, **options).eval()
                kl, agreement = compare(logits(model, images), reference)
                name = method + "".join(f" {k}={v}" for k, v in options.items())
                lines.append(f"| {label} | {r} | {name} | {count_gflops(model):.3f} | {kl:.4f} | {agreement:.1f} |")
                print(lines[-1], flush=True)
    header = (f"# ATC options (issue 9)\n\n`OMP_NUM_THREADS=1 python benchmarks/atc_options.py --images {args.images} "
              f"--threads {args.threads} --out {args.out}`, {time.strftime('%Y-%m-%d')}, {args.images} train images "
              "outside tune's calibration set.\n\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(header + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
