"""Training-free accuracy at fixed GFLOPs budgets (issue 9): ToMe, ToMe calibrated, PiToMe,
MCTF and the best configuration `tokenmerge.tune` finds, on an Imagenette ViT.

Everything is chosen on TRAIN images (1,000 spread over the classes by default); the val
split is only evaluated, once per configuration, for the report. The budgets are the counted
GFLOPs of ToMe at constant r=16 (-50%) and r=13 (-40%) on the same model.

    python benchmarks/tune_imagenette.py --out benchmarks/results/tune_vit_tiny
    python benchmarks/tune_imagenette.py --checkpoint benchmarks/models/vit_tiny_d6_patch16_224.imagenette.safetensors \
        --model-kwargs '{"depth": 6}' --out benchmarks/results/tune_vit_tiny_d6
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import tokenmerge
from tokenmerge.evaluation.accuracy import evaluate_accuracy
from tokenmerge.evaluation.data import image_folder, load_images
from tokenmerge.evaluation.flops import count_gflops
from tokenmerge.api import shared_copy
from tokenmerge.evaluation.tune import tune
from tokenmerge.mixing import mix_batch
from tokenmerge.models import load_model
from tokenmerge.training import train_transform

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenette"


def mixed_pairs(images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Each image blended with a random other one (Mixup 0.8 or CutMix 1.0 at even odds,
    one draw per pair): images the checkpoint has not fitted, on which the unmodified
    model's outputs are soft (see tokenmerge.mixing)."""
    rng = np.random.default_rng(seed)
    order = torch.from_numpy(rng.permutation(len(images)))
    mixed = images.clone()
    for start in range(0, len(order) - 1, 2):
        pair = order[start:start + 2]
        mixed[pair] = mix_batch(images[pair], rng, mixup_alpha=0.8, cutmix_alpha=1.0)[0]
    return mixed


def least_confident(model, root: Path, count: int, batch_size: int = 100) -> torch.Tensor:
    """The ``count`` images of ``root`` on which the unmodified model's top-1 margin (top-1 minus
    top-2 probability) is smallest, ``count // classes`` per class folder: train images near
    its decision boundary, the kind whose prediction a merge can flip (on val the model is
    wrong on 15% of the images, on the train images it has fitted on 2.4%)."""
    dataset = image_folder(root)
    margins = []
    with torch.inference_mode():
        for x, _ in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
            top2 = model(x).softmax(-1).topk(2, dim=-1).values
            margins.append(top2[:, 0] - top2[:, 1])
    margins = torch.cat(margins)
    labels = torch.tensor(dataset.targets)
    classes = int(labels.max()) + 1
    picked = []
    for c in range(classes):
        members = (labels == c).nonzero().flatten()
        picked.append(members[margins[members].argsort()[:count // classes]])
    return torch.stack([dataset[i][0] for i in torch.cat(picked).tolist()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--model-kwargs", type=json.loads, default={})
    parser.add_argument("--train", type=Path, default=SHARED / "train")
    parser.add_argument("--val", type=Path, default=SHARED / "val")
    parser.add_argument("--calibration-images", type=int, default=1000)
    parser.add_argument("--budgets", type=int, nargs="+", default=[16, 13], help="ToMe constant r defining each budget")
    parser.add_argument("--skip-tome-calibration", action="store_true",
                        help="skip the 'ToMe calibrated' row (its result does not depend on the other methods)")
    parser.add_argument("--skip-baselines", action="store_true",
                        help="evaluate only tune's result on val (not the unmodified model or the constant-r rows)")
    parser.add_argument("--rounds", type=int, default=3, help="search rounds (tokenmerge.tune's rounds)")
    parser.add_argument("--calibration-mix", action="store_true",
                        help="calibrate on Mixup/CutMix blends of the calibration images (random pairs, "
                             "alphas 0.8/1.0, seed 0) instead of the images themselves; label-free")
    parser.add_argument("--calibration-crops", action="store_true",
                        help="calibrate on one random training-style view of each calibration image "
                             "(RandomResizedCrop 0.35-1 + flip, tokenmerge.training.train_transform, seed 0) "
                             "instead of the image itself; label-free")
    parser.add_argument("--calibration-hard", action="store_true",
                        help="calibrate on the train images the unmodified model is least sure of (smallest "
                             "top-1 margin, --calibration-images of them, equal per class) instead of images "
                             "spread evenly over the split; label-free")
    parser.add_argument("--no-speed", action="store_true",
                        help="do not time every candidate (tune's measure_speed=False)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    if args.checkpoint is None:
        model = load_model()
    else:
        model = load_model(args.model, checkpoint=args.checkpoint, num_classes=10, **args.model_kwargs)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.calibration_mix + args.calibration_crops + args.calibration_hard > 1:
        parser.error("give at most one of --calibration-mix, --calibration-crops and --calibration-hard")
    torch.manual_seed(0)  # the crops' draws
    if args.calibration_hard:
        cal_x, cal_y = least_confident(model, args.train, args.calibration_images), None
    else:
        cal_x, cal_y, _ = load_images(args.train, limit=args.calibration_images, spread=True,
                                      transform=train_transform(224) if args.calibration_crops else None)
    if args.calibration_crops:
        cal_y = None
    if args.calibration_mix:
        cal_x, cal_y = mixed_pairs(cal_x), None
    val_x, val_y, _ = load_images(args.val)
    base_gflops = count_gflops(model)
    rows = []
    if not args.skip_baselines:
        rows.append({"budget": "-", "config": "unmodified", "gflops": base_gflops,
                     "val_top1": evaluate_accuracy(model, val_x, val_y, batch_size=125)})
        print(json.dumps(rows[-1]), flush=True)

    def report(budget, name, config, tuned=None):
        variant = tokenmerge.patch(shared_copy(model), **config)
        row = {"budget": budget, "config": name, "method": config["method"], "r": list(variant.tokenmerge_schedule()),
               "options": config.get("options", {}), "gflops": count_gflops(variant),
               "val_top1": evaluate_accuracy(variant, val_x, val_y, batch_size=125)}
        if tuned is not None:
            row.update(calib_kl=tuned.best.kl, calib_agreement=tuned.best.agreement, tune_seconds=tuned.seconds)
        rows.append(row)
        print(json.dumps(row), flush=True)

    for r in args.budgets:
        target = count_gflops(tokenmerge.patch(shared_copy(model), r=r))
        budget = f"ToMe r={r}: {target:.3f} GFLOPs ({100 * (1 - target / base_gflops):.0f}% fewer)"
        if not args.skip_baselines:
            report(budget, f"ToMe r={r}", {"method": "tome", "r": r})
        if not args.skip_tome_calibration:
            calibrated = tune(model, (cal_x, cal_y), target_gflops=target, methods=["tome"], measure_speed=False,
                              rounds=args.rounds)
            calibrated.save(args.out / f"tome_r{r}")
            report(budget, "ToMe calibrated (tune --methods tome)", calibrated.config(), calibrated)
        best = tune(model, (cal_x, cal_y), target_gflops=target, rounds=args.rounds, measure_speed=not args.no_speed)
        best.save(args.out / f"best_r{r}")
        for name in () if args.skip_baselines else ("pitome", "mctf"):
            constant = next(c for c in best.candidates
                            if c.method == name and not c.options and c.stage == "constant")
            report(budget, f"{name} constant r (smallest within budget)", constant.config())
        report(budget, "tune (default candidates; search on the best)", best.config(), best)
    meta = {"machine": f"{platform.machine()} CPU, {args.threads} threads", "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "calibration_images": args.calibration_images,
            "calibration_mix": args.calibration_mix,
            "calibration_crops": args.calibration_crops, "calibration_hard": args.calibration_hard, "rows": rows}
    (args.out / "results.json").write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    main()
