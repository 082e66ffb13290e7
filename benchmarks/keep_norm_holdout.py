"""Norm-keeping merges (`keep_norm=True`) against plain averaging, on train images outside tune's
calibration set (issue 9).

For each model and configuration: KL to the unmodified model and top-1 agreement with it, on
the holdout train images of `holdout_kl.py` (600 by default, none of them among tune's 1,000
calibration images; val is never read). Both models of BENCHMARKS.md section 6.

    OMP_NUM_THREADS=1 python benchmarks/keep_norm_holdout.py --images 400
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch

import tokenmerge
from holdout_kl import compare, holdout_images, logits
from tokenmerge.models import load_model

RESULTS = Path(__file__).resolve().parent / "results"
D6 = dict(checkpoint=str(Path(__file__).resolve().parent / "models" / "vit_tiny_d6_patch16_224.imagenette.safetensors"),
          depth=6)
DTEM_R16 = json.loads((RESULTS / "dtem_tuned" / "tune_dtem_r16" / "best.json").read_text())
MCTF_R16 = [20, 22, 15, 13, 17, 17, 17, 17, 13, 12, 7, 7]  # tune's -50% MCTF schedule (section 6)
CASES = [  # (model, label, patch arguments)
    ("12 blocks", "ToMe r=16", dict(method="tome", r=16)),
    ("12 blocks", "ToMe r=13", dict(method="tome", r=13)),
    ("12 blocks", "MCTF r=18", dict(method="mctf", r=18)),
    ("12 blocks", "MCTF r=15", dict(method="mctf", r=15)),
    ("12 blocks", "MCTF, tune's -50% schedule", dict(method="mctf", r=MCTF_R16)),
    ("12 blocks", "DTEM modules, tuned -50% schedule", dict(method="dtem", r=DTEM_R16["r"], **DTEM_R16["options"])),
    ("6 blocks", "ToMe r=16", dict(method="tome", r=16)),
    ("6 blocks", "ToMe r=13", dict(method="tome", r=13)),
    ("6 blocks", "MCTF r=19", dict(method="mctf", r=19)),
]
MODELS = {"12 blocks": {}, "6 blocks": D6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    x = holdout_images(args.images)
    references = {name: logits(load_model(**kwargs), x) for name, kwargs in MODELS.items()}
    print(f"{len(x)} train images outside the calibration set\n")
    print("| model | configuration | KL, plain average | KL, keep_norm | agreement, plain | agreement, keep_norm |")
    print("|---|---|---|---|---|---|")
    for model_name, label, config in CASES:
        scores = [compare(logits(tokenmerge.patch(load_model(**MODELS[model_name]), keep_norm=keep, **config).eval(), x),
                          references[model_name]) for keep in (False, True)]
        print(f"| {model_name} | {label} | {scores[0][0]:.4f} | {scores[1][0]:.4f} | {scores[0][1]:.1f} | {scores[1][1]:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
