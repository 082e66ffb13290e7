"""CPU speed of per-image merging on real images: latency at batch size 1 and batched throughput.

Per-image merging costs what each image needs, so its speed depends on the images: random
inputs would say nothing. This times the shipped ViT-Tiny on val images (timing only; no
accuracy is read), interleaving the configurations image by image (batch 1) or batch by
batch, so load on the shared machine hits them alike. Each speedup is a ratio to the
unmodified model measured in the same run. ``--compile`` runs every model (the unmodified
one too) through ``torch.compile``, times them one after another instead of interleaved,
and reports each one's first call, which compiles it; ``--repeats 0`` times batch 1 only.
``--cascade-fraction F`` adds, for each configuration, a ``tokenmerge.ConfidenceCascade`` of it
by fraction (each batch runs ``floor(F x batch)`` images again unmodified; at batch 1 that is
none, so its batch-1 row times the member alone).

    python benchmarks/per_image_speed.py --configs benchmarks/results/per_image/vit_tiny_r16/best.json --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import statistics
import time
import warnings
from pathlib import Path

import torch

import tokenmerge
from tokenmerge.evaluation.data import image_folder
from tokenmerge.models import load_model

VAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenette" / "val"


def measure(models: dict, images: torch.Tensor, args) -> tuple:
    """Latencies at batch 1 and batched times, the models interleaved image by image (batch by
    batch), after warm-up calls on the first ``args.warmup`` images; and each model's first call."""
    latency = {name: [] for name in models}
    batched = {name: [] for name in models}
    first_call = {}
    with torch.inference_mode():
        for name, model in models.items():
            began = time.perf_counter()
            model(images[:1])
            first_call[name] = time.perf_counter() - began
            for i in range(1, args.warmup):
                model(images[i:i + 1])
            if args.repeats:
                model(images[:args.batch_size])
        for i in range(len(images)):
            for name, model in models.items():
                start = time.perf_counter()
                model(images[i:i + 1])
                latency[name].append(time.perf_counter() - start)
        for _ in range(args.repeats):
            for start in range(0, len(images) - args.batch_size + 1, args.batch_size):
                batch = images[start:start + args.batch_size]
                for name, model in models.items():
                    began = time.perf_counter()
                    model(batch)
                    batched[name].append(time.perf_counter() - began)
    return latency, batched, first_call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", type=Path, required=True)
    parser.add_argument("--r", type=int, default=16, help="ToMe and fixed ATC rows at this constant r")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="time torch.compile'd models, one at a time")
    parser.add_argument("--dynamic", action="store_true", help="torch.compile(dynamic=True)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed batch-1 calls per model first")
    parser.add_argument("--cascade-fraction", type=float, default=None,
                        help="also time a ConfidenceCascade of each configuration by this fraction")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")

    dataset = image_folder(VAL, limit=args.images, spread=True)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    models = {"unmodified": load_model(),
              f"ToMe r={args.r}": tokenmerge.patch(load_model(), method="tome", r=args.r),
              f"ATC r={args.r}": tokenmerge.patch(load_model(), method="atc", r=args.r)}
    for path in args.configs:
        models[str(path)] = tokenmerge.patch(load_model(), **json.loads(path.read_text()))
        if args.cascade_fraction is not None:
            models[f"cascade of {path}, fraction {args.cascade_fraction}"] = tokenmerge.ConfidenceCascade(
                load_model(), fraction=args.cascade_fraction, **json.loads(path.read_text()))
    models = {name: model.eval() for name, model in models.items()}
    if args.compile:
        latency, batched, first_call = {}, {}, {}
        for name, model in models.items():
            # One model at a time, each compiled afresh: patched models share code objects, so
            # one model's recompilations (a per-image model's token counts vary) would count
            # against the others' recompile limit and guards.
            torch._dynamo.reset()
            compiled = torch.compile(model, dynamic=args.dynamic)
            for timings, values in zip((latency, batched, first_call), measure({name: compiled}, images, args)):
                timings.update(values)
    else:
        latency, batched, first_call = measure(models, images, args)

    base_latency = statistics.mean(latency["unmodified"])
    header = "| configuration | batch 1: mean ms/image | speedup |"
    if args.repeats:
        base_batched = statistics.median(batched["unmodified"])
        header += f" batch {args.batch_size}: median ms/batch | speedup |"
    if args.compile:
        header += " first call (compiles), s |"
    lines = [f"`python benchmarks/per_image_speed.py {' '.join(sys.argv[1:])}`, {time.strftime('%Y-%m-%d %H:%M')} UTC, "
             f"{len(images)} val images, {args.threads} thread(s), torch {torch.__version__}", "",
             header, "|---" * header.count(" |") + "|"]
    for name in models:
        mean_latency = statistics.mean(latency[name])
        row = f"| {name} | {1000 * mean_latency:.2f} | x{base_latency / mean_latency:.2f} |"
        if args.repeats:
            median_batched = statistics.median(batched[name])
            row += f" {1000 * median_batched:.1f} | x{base_batched / median_batched:.2f} |"
        if args.compile:
            row += f" {first_call[name]:.0f} |"
        lines.append(row)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
