"""MCTF's official evaluation options (bidirectional matching, attention-weighted fusion), on or
off, on train images of two models (issue 9).

The defaults of `bidirectional` and `fusion` are chosen from this table (train images only, no
val): KL to the unmodified model and top-1 agreement with it, at fixed per-block schedules at
the -50% budget of the 12-block model (its constant start and the schedule `tune` found) and
the -25% budget of the 6-block one.

    python benchmarks/mctf_options.py --images 500 --threads 1 --out benchmarks/results/mctf_options.md
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import tokenmerge
from tokenmerge.evaluation.data import load_images
from tokenmerge.evaluation.flops import count_gflops
from tokenmerge.api import shared_copy
from tokenmerge.models import load_model

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT.parent / "shared" / "data" / "imagenette" / "train"
D6 = ROOT / "benchmarks/models/vit_tiny_d6_patch16_224.imagenette.safetensors"
# (model label, loader, {schedule label: per-block r})
MODELS = [
    ("vit_tiny (12 blocks)", lambda: load_model(), {
        "MCTF constant r=18 (-50%)": [18] * 9 + [17, 8, 4],
        "tune's -50% schedule": [20, 22, 15, 13, 17, 17, 17, 17, 13, 12, 7, 7],
    }),
    ("vit_tiny_d6 (6 blocks)", lambda: load_model("vit_tiny_patch16_224", checkpoint=D6, num_classes=10, depth=6), {
        "MCTF constant r=19 (-25%)": [19] * 6,
    }),
]
VARIANTS = [dict(bidirectional=b, fusion=f) for b in (False, True) for f in ("size", "attention")]


def logits(model, images, batch_size=125):
    with torch.inference_mode():
        return torch.cat([model(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=500, help="every other of 2x this many spread train images")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    # The tune runs' 1,000 spread calibration images, every other one.
    images, _, _ = load_images(TRAIN, limit=2 * args.images, spread=True)
    images = images[::2]
    lines = ["| model | schedule | bidirectional | fusion | GFLOPs | KL to unmodified | top-1 agreement (%) |",
             "|---|---|---|---|---|---|---|"]
    for label, loader, schedules in MODELS:
        model = loader().eval()
        reference = logits(model, images)
        for schedule_label, r in schedules.items():
            for options in VARIANTS:
                merged = tokenmerge.patch(shared_copy(model), method="mctf", r=r, **options).eval()
                started = time.time()
                out = logits(merged, images)
                kl = F.kl_div(out.log_softmax(-1), reference.log_softmax(-1), log_target=True,
                              reduction="batchmean").item()
                agreement = 100 * (out.argmax(-1) == reference.argmax(-1)).float().mean().item()
                row = (f"| {label} | {schedule_label} | {options['bidirectional']} | {options['fusion']} | "
                       f"{count_gflops(merged):.3f} | {kl:.4f} | {agreement:.1f} |")
                print(row, f"({time.time() - started:.0f} s)", flush=True)
                lines.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(f"{len(images)} train images (every other of {2 * args.images} spread over the classes), "
                        f"{args.threads} thread(s), fp32\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
