"""Proportional attention on or off, per method, on train images of each model (issue 9).

The method defaults for `prop_attn` are chosen from this table (train images only; no val):
KL to the unmodified model and top-1 agreement with it, at constant r.

    python benchmarks/prop_attn_defaults.py --r 16 --images 500
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import tokenmerge
from tokenmerge.evaluation.data import image_folder, image_loader
from tokenmerge.api import shared_copy
from tokenmerge.models import load_model

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT.parent / "shared" / "data" / "imagenette" / "train"
MODELS = {
    "vit_tiny (12 blocks, shipped)": lambda: load_model(),
    "vit_tiny_d6 (6 blocks)": lambda: load_model(
        "vit_tiny_patch16_224", checkpoint=ROOT / "benchmarks/models/vit_tiny_d6_patch16_224.imagenette.safetensors",
        num_classes=10, depth=6),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--methods", nargs="+", default=["tome", "mctf", "tcvit", "evit"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    images = torch.cat([x for x, _ in image_loader(image_folder(TRAIN, limit=args.images, spread=True), 125)])
    rows = []
    for model_name, build in MODELS.items():
        model = build()
        with torch.inference_mode():
            reference = model(images)
            for method in args.methods:
                for prop_attn in (True, False):
                    logits = tokenmerge.patch(shared_copy(model), method=method, r=args.r, prop_attn=prop_attn)(images)
                    kl = F.kl_div(logits.log_softmax(-1), reference.log_softmax(-1), log_target=True,
                                  reduction="batchmean").item()
                    agree = 100.0 * (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
                    rows.append({"model": model_name, "method": method, "prop_attn": prop_attn, "kl": kl, "agreement": agree})
                    print(json.dumps(rows[-1]), flush=True)
    print("| model | method | KL on | KL off | agreement on | agreement off | better |")
    print("|---|---|---|---|---|---|---|")
    for on, off in zip(rows[0::2], rows[1::2]):
        print(f"| {on['model']} | {on['method']} | {on['kl']:.4f} | {off['kl']:.4f} | {on['agreement']:.1f} | "
              f"{off['agreement']:.1f} | {'on' if on['kl'] < off['kl'] else 'off'} |")


if __name__ == "__main__":
    main()
