"""Top-1 of a reference checkpoint whose timm model needs extra arguments (e.g. depth=6).

``tokenmerge eval`` builds ``timm.create_model(name, num_classes=...)`` with no further
arguments, so it cannot load the 6-block ViT-Tiny; this script goes through the same
package code (``tokenmerge.models.load_model`` with timm keyword arguments, and
``tokenmerge.evaluation``), float32, and optionally token merging at given schedules.

    python benchmarks/eval_reference_model.py \
        --checkpoint benchmarks/models/vit_tiny_d6_patch16_224.imagenette.safetensors \
        --model-kwargs '{"depth": 6}' --data ../shared/data/imagenette/val
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import tokenmerge
from tokenmerge.core.schedule import format_schedule, parse_schedule
from tokenmerge.evaluation.accuracy import evaluate_accuracy
from tokenmerge.evaluation.data import load_images
from tokenmerge.models import load_model

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="vit_tiny_patch16_224")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--model-kwargs", type=json.loads, default={}, help="timm.create_model arguments as JSON")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "imagenette" / "val")
    parser.add_argument("--method", default=None, help="token merging method (default: none)")
    parser.add_argument("--r", nargs="+", type=parse_schedule, default=[], help="schedules for --method")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images (quick checks)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    images, labels, classes = load_images(args.data, limit=args.limit)
    print(f"{args.model} {args.model_kwargs} from {args.checkpoint}: {len(images)} images in {args.data}", flush=True)
    variants = [(None, None)] + ([(args.method, r) for r in args.r] if args.method else [])
    for method, schedule in variants:
        model = load_model(args.model, checkpoint=args.checkpoint, **args.model_kwargs)
        if method is not None:
            tokenmerge.patch(model, method=method, r=schedule)
        top1 = evaluate_accuracy(model, images, labels, num_classes=len(classes), batch_size=args.batch_size)
        label = "unmodified" if method is None else f"{method} r={format_schedule(schedule)}"
        print(f"{label}: top-1 {top1:.2f}%", flush=True)


if __name__ == "__main__":
    main()
