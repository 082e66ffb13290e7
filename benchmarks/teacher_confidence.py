"""How soft is the unmodified model's output on the images it was trained on, and on val?

Distillation and calibration both read the unmodified model's softmax. Whether it says more
than the label depends on how peaked it is: this prints, per image set and softmax
temperature, the mean top-1 probability, the mean entropy (uniform over K classes: ln K) and
the top-1 accuracy. Image sets: train images spread over the classes (the calibration set of
`tune`), the same images as `tokenmerge train` augments them (RandomResizedCrop + flip), and
val images spread over the classes.

    OMP_NUM_THREADS=1 python benchmarks/teacher_confidence.py --images 1000 --threads 1
"""

from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path

import torch

from tokenmerge.evaluation.data import load_images
from tokenmerge.models import load_model
from tokenmerge.training import train_transform

from holdout_kl import logits

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenette"


def softness(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> dict:
    """Mean top-1 probability, mean entropy (nats) and top-1 accuracy (%) of ``[N, K]`` logits."""
    p = (logits / temperature).softmax(-1)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(-1)
    return {"top1_prob": p.max(-1).values.mean().item(), "entropy": entropy.mean().item(),
            "accuracy": (logits.argmax(-1) == labels).float().mean().item() * 100}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000, help="per image set, spread over the classes")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    model = load_model()
    sets = {
        "train": (DATA / "train", None),
        "train, training crops": (DATA / "train", train_transform(224)),
        "val": (DATA / "val", None),
    }
    print(f"| images | T | mean top-1 prob | mean entropy (ln 10 = {math.log(10):.2f}) | top-1 % |")
    print("|---|---|---|---|---|")
    for name, (root, transform) in sets.items():
        torch.manual_seed(0)
        x, y, _ = load_images(root, limit=args.images, spread=True, transform=transform)
        outputs = logits(model, x)
        for t in args.temperatures:
            s = softness(outputs, y, t)
            print(f"| {name} ({len(x)}) | {t:g} | {s['top1_prob']:.3f} | {s['entropy']:.3f} | {s['accuracy']:.1f} |")


if __name__ == "__main__":
    main()
