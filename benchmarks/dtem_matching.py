"""How DTEM's trained modules merge at inference: bipartite matching (the paper's) against
ATC's agglomerative clustering on the same learned embedding, on train images of two models
(issues 9 and 10).

KL to the unmodified model and top-1 agreement with it at constant r, on the 600 train images
outside tune's calibration set (`benchmarks/holdout_kl.py`'s holdout), with each model's
shipped module file (trained at r=16 on a frozen ViT): bipartite, clustering with complete
linkage, and complete linkage plus MCTF's size criterion (ATC's defaults).

    OMP_NUM_THREADS=1 python benchmarks/dtem_matching.py --threads 1 --out benchmarks/results/dtem_matching/holdout.md
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch

import tokenmerge
from tokenmerge.evaluation.flops import count_gflops

from atc_options import MODELS
from holdout_kl import compare, holdout_images, logits

ROOT = Path(__file__).resolve().parents[1]
MODULES = {
    "vit_tiny (12 blocks)": ROOT / "tokenmerge/assets/dtem_vit_tiny_patch16_224.imagenette.r16.safetensors",
    "vit_tiny_d6 (6 blocks)": ROOT / "benchmarks/models/dtem_vit_tiny_d6_patch16_224.imagenette.r16.safetensors",
}
VARIANTS = [{}, {"matching": "agglomerative", "tau_size": None}, {"matching": "agglomerative"}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    images = holdout_images(args.images)
    lines = ["| model | r | DTEM matching | GFLOPs | KL to unmodified | top-1 agreement (%) |", "|---|---|---|---|---|---|"]
    for label, load, schedules in MODELS:
        reference = logits(load().eval(), images)
        for r in schedules:
            for options in VARIANTS:
                model = tokenmerge.patch(load(), method="dtem", r=r, modules=str(MODULES[label]), **options).eval()
                kl, agreement = compare(logits(model, images), reference)
                reducer = model.token_reducer
                name = reducer.matching
                if reducer.matching == "agglomerative":
                    name += f" {reducer.linkage}, tau_size={reducer.tau_size}"
                lines.append(f"| {label} | {r} | {name} | {count_gflops(model):.3f} | {kl:.4f} | {agreement:.1f} |")
                print(lines[-1], flush=True)
    header = (f"# DTEM's matching at inference (issues 9, 10)\n\n`OMP_NUM_THREADS=1 python benchmarks/dtem_matching.py "
              f"--images {args.images} --threads {args.threads} --out {args.out}`, {time.strftime('%Y-%m-%d')}, "
              f"{args.images} train images outside tune's calibration set.\n\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(header + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
