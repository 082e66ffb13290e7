"""KL to the unmodified model on train images that are NOT in tune's calibration set (issue 9).

Checks whether a lower calibration KL carries over to other images of the same split: the
1,000 calibration images are tune's (`--limit 1000`, spread over the classes); the holdout
is 600 of the remaining train images, evenly spaced. Compares MCTF at tune's -50% schedule
with its default temperatures and with the `tau_sim=0.5` that tune's option stage chose.

    OMP_NUM_THREADS=1 python benchmarks/holdout_kl.py
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import tokenmerge
from tokenmerge.evaluation.data import image_folder
from tokenmerge.models import load_model

TRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenette" / "train"
SCHEDULE = [20, 22, 15, 13, 17, 17, 17, 17, 13, 12, 7, 7]  # tune's -50% MCTF schedule (BENCHMARKS section 6)
CONFIGS = {"default temperatures": {}, "tau_sim=0.5": {"tau_sim": 0.5}}


def holdout_images(count: int = 600) -> torch.Tensor:
    calibration = set(image_folder(TRAIN, limit=1000, spread=True).indices)
    full = image_folder(TRAIN)
    rest = [i for i in range(len(full.samples)) if i not in calibration]
    picked = rest[3::len(rest) // count][:count]
    return torch.stack([full[i][0] for i in picked])


def logits(model, x: torch.Tensor, batch: int = 100) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


def compare(out: torch.Tensor, reference: torch.Tensor) -> tuple:
    """``(KL(reference || out), top-1 agreement in %)`` of two sets of logits."""
    kl = F.kl_div(out.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="batchmean").item()
    return kl, (out.argmax(-1) == reference.argmax(-1)).float().mean().item() * 100


def holdout_table(description: str, script: str, title: str, models, variants) -> None:
    """The command line shared by the holdout tables (``atc_options.py``, ``dtem_matching.py``).

    ``models``: ``(label, load, schedules)``; ``variants``: callables ``(label, load, r) ->
    (name, patched model)``. One Markdown row per model, r and variant: counted GFLOPs, KL to
    the unmodified model and top-1 agreement with it, on the holdout images; written to --out.
    """
    from tokenmerge.evaluation.flops import count_gflops

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    images = holdout_images(args.images)
    lines = ["| model | r | variant | GFLOPs | KL to unmodified | top-1 agreement (%) |", "|---|---|---|---|---|---|"]
    for label, load, schedules in models:
        reference = logits(load().eval(), images)
        for r in schedules:
            for variant in variants:
                name, model = variant(label, load, r)
                kl, agreement = compare(logits(model.eval(), images), reference)
                lines.append(f"| {label} | {r} | {name} | {count_gflops(model):.3f} | {kl:.4f} | {agreement:.1f} |")
                print(lines[-1], flush=True)
    header = (f"# {title}\n\n`OMP_NUM_THREADS=1 python benchmarks/{script} --images {args.images} --threads "
              f"{args.threads} --out {args.out}`, {time.strftime('%Y-%m-%d')}, {args.images} train images "
              "outside tune's calibration set.\n\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(header + "\n".join(lines) + "\n")


def main() -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    x = holdout_images()
    reference = logits(load_model(), x)
    print(f"{len(x)} train images outside the calibration set")
    for name, options in CONFIGS.items():
        kl, agreement = compare(logits(tokenmerge.patch(load_model(), method="mctf", r=SCHEDULE, **options).eval(), x),
                                reference)
        print(f"{name:22s} KL {kl:.4f}  top-1 agreement {agreement:.1f}%")


if __name__ == "__main__":
    main()
