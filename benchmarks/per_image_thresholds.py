"""Per-image merging (ATC with calibrated thresholds) against fixed schedules, on val (issue 9).

The thresholds are calibrated on tune's 1,000 train calibration images for the budget of
ToMe at constant ``--budget-r`` (counted GFLOPs), from ATC at constant ``--reference-r``
(default: the same r), or from a fixed ATC configuration ``--reference-config`` (``tune``'s
``best.json``: what ``tune --per-image`` does with its best ATC candidate). Val is only
evaluated: full val, per-image GFLOPs counted as each image runs alone, and paired
differences against ToMe at the budget and the fixed ATC reference.

    python benchmarks/per_image_thresholds.py --budget-r 16 --threads 1 --out benchmarks/results/per_image/vit_tiny_r16
    python benchmarks/per_image_thresholds.py --checkpoint benchmarks/models/vit_tiny_d6_patch16_224.imagenette.safetensors \
        --model-kwargs '{"depth": 6}' --budget-r 16 --threads 1 --out benchmarks/results/per_image/vit_tiny_d6_r16
    python benchmarks/per_image_thresholds.py --budget-r 13 --reference-config benchmarks/results/atc/tune_atcs_r13/best.json \
        --threads 1 --out benchmarks/results/per_image/vit_tiny_r13_tuned
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

import tokenmerge
from tokenmerge.evaluation.data import image_folder
from tokenmerge.evaluation.flops import count_gflops
from tokenmerge.evaluation.statistics import paired_difference
from tokenmerge.evaluation.thresholds import PerImageCost, calibrate_thresholds
from tokenmerge.models import load_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenette"


def stacked(dataset) -> tuple:
    pairs = [dataset[i] for i in range(len(dataset))]
    return torch.stack([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])


@torch.inference_mode()
def batched_logits(model, images, batch_size=125):
    return torch.cat([model(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--model-kwargs", type=json.loads, default={})
    parser.add_argument("--budget-r", type=int, default=16)
    parser.add_argument("--reference-r", type=int, default=None)
    parser.add_argument("--reference-config", type=Path, default=None,
                        help="a fixed ATC best.json (method, r list, options) to start from instead of a constant r")
    parser.add_argument("--cap-factor", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=8, help="bisection steps (calibrate_thresholds' default)")
    parser.add_argument("--baselines-from", type=Path, default=None,
                        help="take the fixed-r rows' per-image results from an earlier run's correct.pt (same val)")
    parser.add_argument("--calibration-images", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")

    def load():
        if args.checkpoint is None:
            return load_model()
        return load_model(args.model, checkpoint=args.checkpoint, num_classes=10, **args.model_kwargs)

    started = time.time()
    model = load()
    if args.reference_config is not None and args.reference_r is not None:
        parser.error("give --reference-r or --reference-config, not both")
    reference = {"method": "atc", "r": args.reference_r or args.budget_r, "options": {}}
    if args.reference_config is not None:
        reference = json.loads(args.reference_config.read_text())
    budget = count_gflops(tokenmerge.patch(load(), method="tome", r=args.budget_r))
    calibration, _ = stacked(image_folder(DATA / "train", limit=args.calibration_images, spread=True))
    result = calibrate_thresholds(model, calibration, r=reference["r"], target_gflops=budget, method=reference["method"],
                                  options=reference.get("options", {}), cap_factor=args.cap_factor, steps=args.steps)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "best.json").write_text(json.dumps(result.config(), indent=1) + "\n")
    summary = {key: value for key, value in vars(result).items() if key not in ("options", "logits")}
    print(json.dumps(summary), flush=True)

    images, labels = stacked(image_folder(DATA / "val"))
    gflops, logits = PerImageCost(model, result.config(), images)()
    rows = {"per-image ATC": (logits.argmax(-1) == labels, gflops.mean().item())}
    fixed = tokenmerge.patch(load(), **reference).eval()
    tome = tokenmerge.patch(load(), method="tome", r=args.budget_r).eval()
    fixed_name = f"ATC r={reference['r']}" if isinstance(reference["r"], int) else "ATC reference (fixed)"
    baselines = {fixed_name: (fixed, count_gflops(fixed)), f"ToMe r={args.budget_r}": (tome, budget),
                 "unmodified": (model, count_gflops(model))}
    earlier = {} if args.baselines_from is None else torch.load(args.baselines_from / "correct.pt")
    for name, (baseline, cost) in baselines.items():
        correct = earlier[name] if name in earlier else batched_logits(baseline, images).argmax(-1) == labels
        rows[name] = (correct, cost)

    lines = [f"# Per-image ATC thresholds, budget = ToMe r={args.budget_r} ({budget:.4f} GFLOPs)", "",
             f"`python benchmarks/per_image_thresholds.py {' '.join(sys.argv[1:])}`, {time.strftime('%Y-%m-%d %H:%M')} UTC,"
             f" {len(images)} val images; calibration on {len(calibration)} train images:"
             f" {json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in summary.items()})}", "",
             "| configuration | GFLOPs (mean per image) | val top-1 | vs per-image ATC (paired, 95%) |",
             "|---|---|---|---|"]
    ours = rows["per-image ATC"][0]
    for name, (correct, g) in rows.items():
        accuracy = 100.0 * correct.float().mean().item()
        if name == "per-image ATC":
            versus = "-"
        else:
            diff, se = paired_difference(ours, correct)
            versus = f"{diff:+.2f} [{diff - 1.96 * se:+.2f}, {diff + 1.96 * se:+.2f}]"
        lines.append(f"| {name} | {g:.4f} | {accuracy:.2f} | {versus} |")
    lines.append("")
    lines.append(f"Per-image GFLOPs on val: min {gflops.min():.3f}, median {gflops.median():.3f}, max {gflops.max():.3f};"
                 f" wall time {time.time() - started:.0f} s (calibration {result.seconds:.0f} s).")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    torch.save({name: correct for name, (correct, _) in rows.items()}, args.out / "correct.pt")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
