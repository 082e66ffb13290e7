"""ToMe vs DTEM on the ViT-Tiny Imagenette checkpoint: top-1 on a val folder and GFLOPs.

Every DTEM row uses ONE merge-module file (trained at the largest r). Writes JSON.

    python benchmarks/dtem_imagenette.py --methods tome dtem \
        --modules runs/dtem_modular_r16/dtem_modules.safetensors --r 8 13 16 --out results.json
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

import tokenmerge
from tokenmerge.core.schedule import format_schedule, parse_schedule
from tokenmerge.evaluation.accuracy import evaluate_accuracy
from tokenmerge.evaluation.data import load_images
from tokenmerge.evaluation.flops import count_gflops
from tokenmerge.models import load_model

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--val", default=str(REPO.parent / "shared" / "data" / "imagenette" / "val"))
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--methods", nargs="+", default=["tome", "dtem"])
    parser.add_argument("--modules", help="DTEM merge-module file (for method dtem)")
    parser.add_argument("--checkpoint", help="a fine-tuned full model (.safetensors) instead of the embedded one")
    parser.add_argument("--label", default=None, help="row label prefix (default: the method)")
    parser.add_argument("--r", nargs="+", type=parse_schedule, default=[8, 13, 16])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")

    images, labels, classes = load_images(args.val, limit=args.limit)
    base_gflops = count_gflops(load_model())
    rows = []
    for method in args.methods:
        for schedule in args.r:
            model = load_model(None if args.checkpoint is None else "vit_tiny_patch16_224",
                               checkpoint=args.checkpoint, num_classes=10 if args.checkpoint else None)
            if args.checkpoint and method == "dtem":
                # An end2end checkpoint carries its merge modules in its state_dict.
                tokenmerge.patch(model, method="dtem", r=schedule)
                from tokenmerge.models import load_checkpoint

                model.load_state_dict(load_checkpoint(args.checkpoint))
            elif method == "dtem":
                tokenmerge.patch(model, method="dtem", r=schedule)
                tokenmerge.load_merge_modules(model, args.modules)
            else:
                tokenmerge.patch(model, method=method, r=schedule)
            started = time.time()
            acc = evaluate_accuracy(model, images, labels, num_classes=len(classes), batch_size=args.batch_size)
            gflops = count_gflops(model)
            row = {"method": args.label or method, "r": format_schedule(schedule), "top1": round(acc, 2),
                   "gflops": round(gflops, 3), "gflops_removed": round(1 - gflops / base_gflops, 3),
                   "images": len(labels), "eval_seconds": round(time.time() - started, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
