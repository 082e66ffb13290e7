"""A confidence cascade at a GFLOPs budget (issue 9): every image through a merged model,
the unmodified model again for the share of each batch the merged pass is least sure of
(`tokenmerge.cascade.ConfidenceCascade`), against ToMe at the same mean counted GFLOPs.

The protocol, fixed before any val image was run through a cascade:

- Budget: the counted GFLOPs of ToMe at constant r (16 and 13), as in section 6.
- Candidates for the merged member: ToMe and ATC (their defaults) at every constant r from
  the budget's r + 1 to r + 8. Each runs again `fraction = (budget - fast) / full` of every
  batch (its smallest top-1 margins), so the mean counted GFLOPs per image are at most the
  budget on any data.
- Choice: the candidate whose cascade agrees most often with the unmodified model's top-1
  on tune's 1,000 calibration images (train split, spread over the classes), then the lowest
  KL(unmodified || cascade); batches of 64 in a shuffled order (seed 0), as on val. Nothing
  is chosen on val. (Agreement first: a cascade exists to keep the top-1 answer; its KL is
  mostly the merged pass's on the images it does not run again. The first version of this
  script chose by KL alone; it was stopped during calibration, before any val image ran.)
- Val: every image, batches of 64 in a shuffled order (seed 1), so that a batch mixes
  classes as served traffic does (the folder order would give one-class batches); the
  cascade runs as the module does (its fallback on the chosen images only). Reported beside
  the same cascade by a margin threshold (the quantile of the calibration margins at which
  the same share runs again; its val cost follows the val images, and is reported), ToMe at
  the budget's r, and the unmodified model, with paired 95% intervals.

    python benchmarks/cascade.py --threads 2 --out benchmarks/results/cascade/vit_tiny

A second design, `--member CONFIG`, written after the first design's val results (its
constant-r members fell short of per-image ATC at -40%): the merged member is one given
per-image configuration, calibrated on train images at a deeper budget (ToMe r=16's, the
`best.json` of `benchmarks/per_image_thresholds.py`), and the fallback spends the rest of each
budget at least as deep as the member's: `fraction = (budget - member) / full`, the member's
cost being its mean counted GFLOPs per image on the calibration images. Val runs the member
image by image as it runs alone (`tokenmerge.evaluation.thresholds.PerImageCost`: logits and
each image's counted GFLOPs) and the fallback from the unmodified model's logits of the same
images, batch by batch in the same shuffled order; its mean GFLOPs are measured on val.

    python benchmarks/cascade.py --member benchmarks/results/per_image/vit_tiny_r16/best.json --budgets 13 \
        --threads 2 --out benchmarks/results/cascade/vit_tiny_member
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import tokenmerge
from tokenmerge.api import shared_copy
from tokenmerge.backends.adapter import adapter_for
from tokenmerge.cascade import ConfidenceCascade, select_fallback, top1_margin
from tokenmerge.evaluation.data import load_images
from tokenmerge.evaluation.flops import count_gflops
from tokenmerge.evaluation.statistics import Z95, paired_difference
from tokenmerge.evaluation.thresholds import PerImageCost
from tokenmerge.evaluation.tune import read_config
from tokenmerge.models import load_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenette"


def batched_logits(model, images: torch.Tensor, order: torch.Tensor, batch: int) -> torch.Tensor:
    """Logits of every image, run in batches of ``batch`` in ``order``; returned in image order."""
    out = torch.empty(len(images), 0)
    with torch.inference_mode():
        for start in range(0, len(order), batch):
            index = order[start:start + batch]
            logits = model(images[index])
            logits = getattr(logits, "logits", logits).float()
            if out.shape[1] == 0:
                out = torch.empty(len(images), logits.shape[1])
            out[index] = logits
    return out


def simulated_cascade(fast: torch.Tensor, full: torch.Tensor, order: torch.Tensor, batch: int,
                      fraction: float) -> tuple:
    """The fraction cascade's logits from the two members' logits: ``(logits, ran again [N])``."""
    out, again = fast.clone(), torch.zeros(len(fast), dtype=torch.bool)
    for start in range(0, len(order), batch):
        index = order[start:start + batch]
        chosen = index[select_fallback(top1_margin(fast[index]), fraction=fraction)]
        out[chosen], again[chosen] = full[chosen], True
    return out, again


def kl(out: torch.Tensor, reference: torch.Tensor) -> float:
    return F.kl_div(out.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="batchmean").item()


def cascade_on(model, config: dict, images, order, batch: int, **mode) -> tuple:
    """``(logits, share that ran again)`` of a real :class:`ConfidenceCascade` over ``images``."""
    cascade = ConfidenceCascade(model, **config, **mode).eval()
    out, again = torch.empty(len(images), 0), torch.zeros(len(images), dtype=torch.bool)
    with torch.inference_mode():
        for start in range(0, len(order), batch):
            index = order[start:start + batch]
            logits = cascade(images[index])
            if out.shape[1] == 0:
                out = torch.empty(len(images), logits.shape[1])
            out[index], again[index] = logits.float(), cascade.last_fallback
    return out, again.float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: the shipped 12-block ViT-Tiny")
    parser.add_argument("--model-kwargs", type=json.loads, default={})
    parser.add_argument("--budgets", type=int, nargs="+", default=[16, 13], help="ToMe constant r defining each budget")
    parser.add_argument("--methods", nargs="+", default=["tome", "atc"])
    parser.add_argument("--extra-r", type=int, default=8, help="candidates: r + 1 .. r + this")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--calibration-images", type=int, default=1000)
    parser.add_argument("--member", type=Path, default=None,
                        help="a per-image best.json as the only merged member (the second design, above)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    started = time.time()
    if args.checkpoint is None:
        model = load_model().eval()
    else:
        model = load_model(args.model, checkpoint=args.checkpoint, num_classes=10, **args.model_kwargs).eval()
    transform = adapter_for(model).image_transform()
    cal_x, _, _ = load_images(DATA / "train", limit=args.calibration_images, spread=True, transform=transform)
    val_x, val_y, _ = load_images(DATA / "val", transform=transform)
    cal_order = torch.randperm(len(cal_x), generator=torch.Generator().manual_seed(0))
    val_order = torch.randperm(len(val_x), generator=torch.Generator().manual_seed(1))
    B = args.batch_size
    full_gflops = count_gflops(model)
    cal_full = batched_logits(model, cal_x, cal_order, B)
    budgets = {r: count_gflops(tokenmerge.patch(shared_copy(model), r=r)) for r in args.budgets}
    if args.member is not None:
        return member_cascade(args, model, cal_x, cal_order, cal_full, val_x, val_y, val_order, budgets,
                              full_gflops, started)

    # Calibration: every candidate's merged pass once, then the cascade at each budget it fits.
    candidates = []
    for method in args.methods:
        for r in sorted({r + k for r in args.budgets for k in range(1, args.extra_r + 1)}):
            config = {"method": method, "r": r}
            fast_model = tokenmerge.patch(shared_copy(model), **config)
            fast_gflops = count_gflops(fast_model)
            fast = batched_logits(fast_model, cal_x, cal_order, B)
            for budget_r, budget in budgets.items():
                if not (budget_r < r <= budget_r + args.extra_r and fast_gflops <= budget):
                    continue
                fraction = (budget - fast_gflops) / full_gflops
                out, again = simulated_cascade(fast, cal_full, cal_order, B, fraction)
                margin_threshold = float(top1_margin(fast).quantile(fraction))
                candidates.append({"budget_r": budget_r, "config": config, "fast_gflops": fast_gflops,
                                   "fraction": fraction, "margin": margin_threshold,
                                   "calib_kl": kl(out, cal_full), "calib_kl_fast": kl(fast, cal_full),
                                   "calib_agreement": (out.argmax(-1) == cal_full.argmax(-1)).float().mean().item() * 100,
                                   "calib_share": again.float().mean().item()})
                print(json.dumps(candidates[-1]), flush=True)

    # Val: the unmodified model, ToMe at each budget, and each budget's chosen cascade.
    val_full = batched_logits(model, val_x, val_order, B)
    correct = {"unmodified": val_full.argmax(-1) == val_y}
    rows = [{"budget_r": "-", "row": "unmodified", "gflops": full_gflops}]
    for budget_r, budget in budgets.items():
        tome = batched_logits(tokenmerge.patch(shared_copy(model), r=budget_r), val_x, val_order, B)
        name = f"ToMe r={budget_r}"
        correct[name] = tome.argmax(-1) == val_y
        rows.append({"budget_r": budget_r, "row": name, "gflops": budget})
        best = min((c for c in candidates if c["budget_r"] == budget_r),
                   key=lambda c: (-round(c["calib_agreement"], 6), c["calib_kl"], c["fast_gflops"]))
        for mode, value in (("fraction", best["fraction"]), ("margin", best["margin"])):
            out, share = cascade_on(model, best["config"], val_x, val_order, B, **{mode: value})
            name = f"cascade by {mode} ({best['config']['method']} r={best['config']['r']}) at r={budget_r}"
            correct[name] = out.argmax(-1) == val_y
            rows.append({"budget_r": budget_r, "row": name, "config": best["config"], mode: value,
                         "val_share": share, "gflops": best["fast_gflops"] + share * full_gflops,
                         "calib_kl": best["calib_kl"]})
    for row in rows:
        hits = correct[row["row"]]
        row["val_top1"] = hits.float().mean().item() * 100
        for other in ("unmodified", f"ToMe r={row['budget_r']}"):
            if other in correct and other != row["row"]:
                delta, se = paired_difference(hits, correct[other])
                row[f"vs {other}"] = [delta, delta - Z95 * se, delta + Z95 * se]
        print(json.dumps(row), flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"candidates": candidates, "rows": rows,
                                                       "budgets": budgets, "full_gflops": full_gflops,
                                                       "seconds": time.time() - started}, indent=1))
    lines = [f"# Confidence cascade, {args.checkpoint or 'shipped ViT-Tiny'}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             "", f"`python benchmarks/cascade.py {' '.join(_argv())}`, {time.time() - started:.0f} s", "",
             "| budget | row | mean GFLOPs on val | share run again (val) | val top-1 | vs ToMe, paired 95% | vs unmodified |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        share = f"{row['val_share']:.3f}" if "val_share" in row else "-"
        tome_key = f"vs ToMe r={row['budget_r']}"
        lines.append(f"| {row['budget_r']} | {row['row']} | {row['gflops']:.3f} | {share} | {row['val_top1']:.2f} | "
                     f"{_interval(row, tome_key)} | {_interval(row, 'vs unmodified')} |")
    lines += ["", "Calibration (train images; chosen at each budget: the highest agreement, then the lowest calib. KL):", "",
              "| budget | merged member | its GFLOPs | fraction | calib. KL (merged alone -> cascade) | agreement |",
              "|---|---|---|---|---|---|"]
    for c in candidates:
        lines.append(f"| {c['budget_r']} | {c['config']['method']} r={c['config']['r']} | {c['fast_gflops']:.3f} | "
                     f"{c['fraction']:.3f} | {c['calib_kl_fast']:.4f} -> {c['calib_kl']:.4f} | {c['calib_agreement']:.1f} |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def member_cascade(args, model, cal_x, cal_order, cal_full, val_x, val_y, val_order, budgets, full_gflops,
                   started) -> None:
    """The second design: one given per-image member, the fallback spending the rest of each budget."""
    config = read_config(args.member)
    B = args.batch_size
    cal_cost, cal_fast = PerImageCost(model, config, cal_x, base_gflops=full_gflops)()
    member = cal_cost.mean().item()
    val_cost, val_fast = PerImageCost(model, config, val_x, base_gflops=full_gflops)()
    val_full = batched_logits(model, val_x, val_order, B)
    correct = {"unmodified": val_full.argmax(-1) == val_y, "member alone": val_fast.argmax(-1) == val_y}
    rows = [{"row": "unmodified", "gflops": full_gflops},
            {"row": "member alone", "gflops": val_cost.mean().item(), "calib_gflops": member}]
    for budget_r, budget in budgets.items():
        if member > budget:
            print(f"the member costs {member:.3f} GFLOPs on the calibration images, over the r={budget_r} budget")
            continue
        fraction = (budget - member) / full_gflops
        cal_out, _ = simulated_cascade(cal_fast.float(), cal_full, cal_order, B, fraction)
        out, again = simulated_cascade(val_fast.float(), val_full, val_order, B, fraction)
        name = f"cascade at r={budget_r}"
        correct[name] = out.argmax(-1) == val_y
        rows.append({"row": name, "budget": budget, "fraction": fraction, "val_share": again.float().mean().item(),
                     "gflops": val_cost.mean().item() + again.float().mean().item() * full_gflops,
                     "calib_kl": kl(cal_out, cal_full),
                     "calib_agreement": (cal_out.argmax(-1) == cal_full.argmax(-1)).float().mean().item() * 100})
    for row in rows:
        row["val_top1"] = correct[row["row"]].float().mean().item() * 100
        for other in ("unmodified", "member alone"):
            if other != row["row"]:
                delta, se = paired_difference(correct[row["row"]], correct[other])
                row[f"vs {other}"] = [delta, delta - Z95 * se, delta + Z95 * se]
        print(json.dumps(row), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save({name: hits for name, hits in correct.items()}, args.out / "correct.pt")  # val folder order
    (args.out / "results.json").write_text(json.dumps({"member": str(args.member), "rows": rows, "budgets": budgets,
                                                       "seconds": time.time() - started}, indent=1))
    lines = [f"# Confidence cascade with a per-image member, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             f"`python benchmarks/cascade.py {' '.join(_argv())}`, {time.time() - started:.0f} s", "",
             "| row | mean GFLOPs on val | fraction (share run again on val) | val top-1 | vs member alone | vs unmodified |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        share = f"{row['fraction']:.3f} ({row['val_share']:.3f})" if "fraction" in row else "-"
        lines.append(f"| {row['row']} | {row['gflops']:.3f} | {share} | {row['val_top1']:.2f} | "
                     f"{_interval(row, 'vs member alone')} | {_interval(row, 'vs unmodified')} |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _interval(row: dict, key: str) -> str:
    return "{:+.2f} [{:+.2f}, {:+.2f}]".format(*row[key]) if key in row else "-"


def _argv() -> list:
    import sys

    return sys.argv[1:]


if __name__ == "__main__":
    main()
