"""``tokenmerge tune``: the best training-free configuration for a budget, written as best.json."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from . import arguments
from .common import (add_device_arguments, add_model_arguments, add_zero_shot_arguments, model_from_args,
                     resolve_device_arguments, zero_shot_from_args)

__all__ = ["add_parser", "run", "parse_candidate"]


def _finite(kind: str, low: float, high: float = math.inf):
    """A finite number strictly between ``low`` and ``high``."""
    def parse(text: str) -> float:
        value = arguments.finite_float(text)
        if not low < value < high:
            bound = f"in ({low:g}, {high:g})" if math.isfinite(high) else f"> {low:g}"
            raise argparse.ArgumentTypeError(f"{kind} must be a finite number {bound}, got {text}")
        return value
    return parse


def parse_candidate(text: str) -> tuple:
    """``"mctf"`` or ``"tome:prop_attn=false,..."`` -> ``(method, options)``; an unknown method
    or a malformed option is refused while the command line is read, with its reason."""
    from ..evaluation.sweep import parse_option
    from ..methods import get_method_class

    method, _, rest = text.partition(":")
    options = {}
    try:
        get_method_class(method)
        for item in filter(None, rest.split(",")):
            _, key, value = parse_option(item)
            options[key] = value
    except ValueError as err:  # argparse would replace a ValueError's text by "invalid value"
        raise argparse.ArgumentTypeError(str(err)) from None
    return method, options


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "tune",
        help="search the best training-free method and per-block schedule for a GFLOPs budget",
        description=(
            "Calibrate on images from the TRAIN split (never the split you report on): for each "
            "candidate method, the smallest constant r within the budget, then a per-block "
            "schedule search for the best, minimising the divergence from the unmodified model "
            "(label-free by default). Writes OUT/best.json (tokenmerge.patch(model, "
            "**json.load(f)) applies it), OUT/candidates.csv/.json and OUT/pareto.png. An "
            "open_clip:ARCH model is tuned as a zero-shot classifier (--class-names); best.json "
            "then patches the open_clip model itself."
        ),
    )
    add_model_arguments(parser)
    add_zero_shot_arguments(parser)
    parser.add_argument("--data", type=Path, required=True,
                        help="calibration ImageFolder (use the train split); labels are optional")
    parser.add_argument("--limit", type=arguments.positive_int, default=1000,
                        help="calibration images, spread evenly over the folder (default 1000)")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--target-gflops", type=_finite("--target-gflops", 0.0),
                        help="GFLOPs per image at most")
    budget.add_argument("--target-speedup", type=_finite("--target-speedup", 1.0),
                        help="FLOP ratio unmodified / merged at least (e.g. 2)")
    budget.add_argument("--gflops-fraction", type=_finite("--gflops-fraction", 0.0, 1.0),
                        help="share of the unmodified GFLOPs (0.5 = -50%%)")
    parser.add_argument("--methods", nargs="+", type=parse_candidate, default=None, metavar="METHOD[:K=V,...]",
                        help="candidates (default: tome mctf pitome atc), e.g. tome tome:prop_attn=false tome:mlp_share=1 mctf")
    parser.add_argument("--objective", choices=("kl", "agreement", "accuracy"), default="kl",
                        help="kl (default) / agreement: closeness to the unmodified model, no labels needed; "
                             "accuracy: top-1 on the labels")
    parser.add_argument("--search-methods", type=arguments.non_negative_int, default=1,
                        help="how many of the best constant-r methods get the per-block search (default 1)")
    parser.add_argument("--no-option-search", action="store_true",
                        help="keep the methods' default options (by default tune then chooses, at the searched "
                             "schedule, keep_norm and the options a method lists as tunable, e.g. MCTF's "
                             "temperatures)")
    parser.add_argument("--rounds", type=arguments.non_negative_int, default=3, help="search rounds (default 3)")
    parser.add_argument("--probe-images", type=arguments.positive_int, default=250,
                        help="calibration images each per-block probe runs on (default 250; proposals use all)")
    parser.add_argument("--per-image", action="store_true",
                        help="then make the best ATC candidate merge per image (thresholds calibrated to the same "
                             "budget, counted as mean GFLOPs per image; a batch costs what its image that keeps "
                             "most tokens costs); when it wins, the best fixed schedule is written beside it "
                             "as best_fixed.json")
    parser.add_argument("--batch-size", type=arguments.positive_int, default=125)
    parser.add_argument("--no-timing", action="store_true", help="skip the throughput measurement")
    parser.add_argument("--out", type=arguments.output_folder, default=Path("tokenmerge-tune"), help="output folder (default: tokenmerge-tune/)")
    add_device_arguments(parser)
    parser.set_defaults(func=run)


def _table(result) -> str:
    lines = [f"{'#':>2} {'method':<10} {'options':<22} {'stage':<15} {'GFLOPs':>7} {result.objective:>9} "
             f"{'agree%':>7} {'acc%':>6} {'speedup':>7}  r"]
    for k, c in enumerate(result.candidates):
        acc = "-" if c.accuracy is None else f"{c.accuracy:.1f}"
        speed = "-" if c.speedup is None else f"{c.speedup:.2f}x"
        options = ",".join(f"{k}={v}" for k, v in sorted(c.options.items())) or "-"
        lines.append(f"{k:>2}{'*' if c is result.best else ' '}{c.method:<10} {options:<22} {c.stage:<15} "
                     f"{c.gflops:>7.3f} {c.loss:>9.4f} {c.agreement:>7.1f} {acc:>6} {speed:>7}  {list(c.r)}")
    return "\n".join(lines)


def save_tune_plot(result, path) -> Path:
    """Agreement with the unmodified model vs GFLOPs (and vs images/s when timed), one line
    per method and stage, each point labelled with its candidate number in the table."""
    from ..evaluation.pareto import save_pareto_plot

    rows = [{"method": "none", "schedule": "-", "gflops": result.base_gflops, "agreement": 100.0,
             "images_per_s": None if result.best.speedup is None
             else result.best.images_per_s / result.best.speedup}]
    rows += [{"method": f"{c.method} ({c.stage.split(' ')[0]})", "schedule": f"#{k}", "gflops": c.gflops,
              "agreement": c.agreement, "images_per_s": c.images_per_s}
             for k, c in enumerate(result.candidates)]
    return save_pareto_plot(rows, path, title=f"tokenmerge tune: budget {result.target_gflops:.3f} GFLOPs",
                            y_key="agreement", y_label="top-1 agreement with the unmodified model (%)")


def run(args) -> int:
    import torch

    from ..backends.adapter import adapter_for, logits_of
    from ..evaluation.accuracy import check_num_classes
    from ..evaluation.data import load_images
    from ..evaluation.tune import DEFAULT_METHODS, tune

    resolve_device_arguments(args)
    model = zero_shot_from_args(model_from_args(args), args, args.data).to(args.device)
    adapter = adapter_for(model)
    images, labels, classes = load_images(args.data, image_size=adapter.image_size, limit=args.limit,
                                    batch_size=args.batch_size, spread=True, transform=adapter.image_transform())
    images, labels = images.to(args.device), labels.to(args.device)
    with torch.inference_mode():
        num_logits = logits_of(model.eval()(images[:1])).shape[-1]
    if args.objective == "accuracy":
        check_num_classes(torch.empty(num_logits), len(classes))
    elif num_logits != len(classes):
        # The folder's labels do not index this head (e.g. a 1000-class model on a 10-class
        # folder): the label-free objective needs none, and an accuracy column would mislead.
        print(f"note: the model predicts {num_logits} classes and {args.data} has {len(classes)}: "
              "calibrating without labels (no accuracy column)")
        labels = None
    result = tune(
        model, (images, labels),
        target_gflops=args.target_gflops, target_speedup=args.target_speedup, gflops_fraction=args.gflops_fraction,
        methods=args.methods or list(DEFAULT_METHODS), objective=args.objective,
        search_methods=args.search_methods, search_options=not args.no_option_search, rounds=args.rounds, probe_images=args.probe_images,
        batch_size=args.batch_size,
        measure_speed=not args.no_timing, per_image=args.per_image, dtype=args.dtype,
    )
    out = result.save(args.out)
    save_tune_plot(result, out / "pareto.png")
    print(_table(result))
    print(f"\nbudget {result.target_gflops:.3f} GFLOPs (unmodified {result.base_gflops:.3f}); "
          f"{result.num_images} calibration images; {result.seconds:.0f} s")
    print(f"best: {json.dumps(result.config())}")
    written = [out / "best.json", out / "candidates.csv", out / "candidates.json", out / "pareto.png"]
    if (out / "best_fixed.json").exists():  # save() writes it only when the best merges per image
        print(f"best fixed schedule (for ONNX export, torch.compile and batch-1 CPU latency): "
              f"{json.dumps(result.best_fixed.config())}")
        written.append(out / "best_fixed.json")
    print(f"wrote {', '.join(str(path) for path in written)}")
    return 0
