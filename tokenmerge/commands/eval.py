"""``tokenmerge eval``: top-1, GFLOPs and measured speedup for a grid of methods x schedules."""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from pathlib import Path

import torch

from ..core.schedule import parse_schedule
from ..evaluation.data import EMBEDDED_SUBSET
from . import arguments
from .common import (add_device_arguments, add_model_arguments, add_zero_shot_arguments, model_from_args,
                     resolve_device_arguments, zero_shot_from_args)

__all__ = ["add_parser", "run", "DEFAULT_DATA", "variants_from", "method_options", "model_description"]

DEFAULT_DATA = EMBEDDED_SUBSET
DEFAULT_SCHEDULES = ("4", "8", "13", "16")
DEFAULT_OUT = Path("tokenmerge-eval")
DEFAULT_BUDGET_METRIC = "flops"
# What --from-results reads; every other argument configures an evaluation it does not run.
_REPORT_ARGUMENTS = ("from_results", "out", "plot", "command", "func")


_schedule = arguments.schedule  # the name other subcommands import


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="accuracy / GFLOPs / speedup for methods x schedules on an image, audio or video folder",
        description=(
            "Evaluate the unmodified model and every method x schedule on an ImageFolder-like "
            "dataset (class sub-folders of images, or of WAV/FLAC files for an hf: AST model, or "
            "of video files for an hf: VideoMAE or ViViT model): top-1, GFLOPs per example, and "
            "throughput timed interleaved in this run. An open_clip:ARCH model is evaluated "
            "zero-shot (--class-names; its own image preprocessing). "
            "Writes OUT/results.csv and OUT/results.json; finished rows are cached in "
            "OUT/cache.jsonl, so an interrupted run resumes. Default model and data: the "
            "embedded ViT-Tiny Imagenette checkpoint and its 500-image validation subset."
        ),
    )
    add_model_arguments(parser)
    add_zero_shot_arguments(parser)
    parser.add_argument("--data", type=Path, default=None,
                        help="data root with one sub-folder per class, holding images (JPEG, PNG...), "
                             "WAV/FLAC files (AST; needs soundfile) or video files (VideoMAE/ViViT; needs PyAV), "
                             "as the model takes; default: the embedded Imagenette subset (image models)")
    parser.add_argument("--limit", type=arguments.positive_int, help="evaluate only the first N files (sorted order)")
    parser.add_argument("--methods", nargs="+", default=["tome"], metavar="METHOD",
                        help="methods to evaluate (default: tome; see tokenmerge.list_methods())")
    parser.add_argument("--r", nargs="+", type=_schedule, default=None, metavar="SCHEDULE",
                        help="schedules: 13 (constant r), 13:-1 (decreasing), 16,16,8 (per block), "
                             "keep=0.9 (keep ratio); default: 4 8 13 16")
    parser.add_argument("--method-option", action="append", default=[], metavar="[METHOD.]KEY=VALUE",
                        help="a method option, e.g. tcvit.order=2 (METHOD. omitted: every method); repeatable")
    parser.add_argument("--config", type=arguments.patch_config, action="append", default=[], metavar="JSON",
                        help="also evaluate this configuration (OUT/best.json of tokenmerge tune); repeatable")
    # default None, so that --from-results can tell an explicit --out from the default
    parser.add_argument("--out", type=arguments.output_folder, default=None,
                        help=f"output folder (default: {DEFAULT_OUT}/)")
    parser.add_argument("--no-cache", action="store_true", help="recompute every row (and do not write the cache)")
    parser.add_argument("--plot", nargs="?", type=arguments.output_file, const="", default=None, metavar="PNG",
                        help="write the Pareto plot (default path: OUT/pareto.png; with --from-results and "
                             "no --out, beside the results file)")
    parser.add_argument("--from-results", type=Path, metavar="JSON",
                        help="do not evaluate: print and plot a saved results.json (takes only --out and --plot)")
    parser.add_argument("--batch-size", type=arguments.positive_int, default=128, help="evaluation batch size")
    parser.add_argument("--no-timing", action="store_true", help="skip the throughput measurement")
    parser.add_argument("--timing-batch-size", type=arguments.positive_int, default=32)
    parser.add_argument("--warmup", type=arguments.non_negative_int, default=2)
    parser.add_argument("--repeats", type=arguments.positive_int, default=5)
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--target-speedup", type=arguments.finite_positive_float,
                        help="also evaluate, per method, the smallest constant r reaching this speedup")
    budget.add_argument("--target-gflops", type=arguments.finite_positive_float,
                        help="also evaluate, per method, the smallest constant r within this many GFLOPs/img")
    # default None, so that a --budget-metric without a budget can be refused
    parser.add_argument("--budget-metric", choices=("flops", "throughput"), default=None,
                        help="what the --target-speedup/--target-gflops search measures: the FLOP count "
                             "(deterministic, default) or measured throughput (noisy)")
    add_device_arguments(parser)
    parser.set_defaults(func=run)


def method_options(texts, methods) -> dict:
    """``["tcvit.order=2", "seed=0"]`` -> ``{method: {key: value}}`` for each of ``methods``."""
    from ..evaluation.sweep import parse_option

    options = {method: {} for method in methods}
    for text in texts:
        method, key, value = parse_option(text)
        if method is not None and method not in options:
            raise ValueError(f"--method-option {text!r} names method {method!r}, which is not in --methods {' '.join(methods)}")
        for target in ([method] if method else methods):
            options[target][key] = value
    return options


def variants_from(methods, schedules, options) -> list:
    """The grid: the unmodified model, then every method x schedule."""
    import tokenmerge
    from ..evaluation.sweep import UNMODIFIED, Variant

    known = tokenmerge.list_methods()
    for method in methods:
        if method not in known:
            raise ValueError(f"unknown method {method!r}; available: {', '.join(known)}")
    variants = [Variant(UNMODIFIED)]
    for method in methods:
        for schedule in schedules:
            variants.append(Variant.create(method, schedule, options.get(method)))
    return variants


def model_description(args) -> str:
    """The model the arguments name, for headers, titles and results: the embedded checkpoint
    only when no weights are named; else the architecture and where its weights come from."""
    from ..models import DEFAULT_MODEL

    if args.model is None and not args.checkpoint and not args.pretrained:
        return f"{DEFAULT_MODEL} (embedded Imagenette checkpoint)"
    name = args.model or DEFAULT_MODEL  # load_model's architecture for weights without a name
    if args.checkpoint:
        return f"{name} (checkpoint {Path(args.checkpoint).name})"
    if isinstance(args.pretrained, str):
        return f"{name} (pretrained {args.pretrained})"
    return f"{name} (pretrained)" if args.pretrained else name


def _model_identity(args) -> dict:
    """What besides the weights makes the model: the same state_dict loads into another
    architecture (other heads, pooling...), so cached rows are keyed by these too."""
    from ..models import DEFAULT_MODEL

    return {"model": args.model or DEFAULT_MODEL, "model_kwargs": args.model_kwargs,
            "num_classes": args.num_classes}


def _meta(args, model_name, data, num_images, weights) -> dict:
    return {
        "model": model_name,
        "checkpoint": str(args.checkpoint) if args.checkpoint else None,
        "pretrained": args.pretrained,  # True (timm), False, or an open_clip tag
        "model_kwargs": args.model_kwargs,
        "num_classes": args.num_classes,
        "class_names": str(args.class_names) if args.class_names else None,
        "prompt_templates": args.prompt_template,
        "weights_sha256_16": weights,
        "data": str(data),
        "limit": args.limit,
        "num_images": num_images,
        "device": str(args.device),
        "device_name": (torch.cuda.get_device_name(args.device) if torch.device(args.device).type == "cuda"
                        else platform.processor() or platform.machine()),
        "dtype": str(args.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "timing_batch_size": None if args.no_timing else args.timing_batch_size,
        "torch": torch.__version__,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "tokenmerge " + " ".join(sys.argv[1:]) if sys.argv and "tokenmerge" in sys.argv[0] else None,
    }


def _plot_path(args) -> Path:
    return Path(args.plot) if args.plot else args.out / "pareto.png"


def _evaluation_arguments_given(args) -> list:
    """The flags (or MODEL) in ``args`` that configure an evaluation, set to other than their
    defaults (read off a fresh parser, so new arguments are covered without a list here)."""
    probe = argparse.ArgumentParser()
    add_parser(probe.add_subparsers(dest="command"))
    defaults = vars(probe.parse_args(["eval"]))
    return [
        "MODEL" if dest == "model" else "--" + dest.replace("_", "-")
        for dest, default in defaults.items()
        if dest not in _REPORT_ARGUMENTS and getattr(args, dest, default) != default
    ]


def _from_results(args) -> int:
    from ..evaluation.pareto import save_pareto_plot
    from ..evaluation.sweep import format_rows, read_results

    given = _evaluation_arguments_given(args)
    if given:
        raise ValueError(
            f"--from-results prints and plots a saved results file without evaluating, so "
            f"{', '.join(given)} would be ignored: drop {'it' if len(given) == 1 else 'them'}, "
            "or drop --from-results to run a new evaluation"
        )
    data = read_results(args.from_results)
    print(format_rows(data["rows"]))
    if args.plot is not None:
        default = args.out / "pareto.png" if args.out is not None else args.from_results.with_name("pareto.png")
        path = Path(args.plot) if args.plot else default
        meta = data.get("meta", {})
        save_pareto_plot(data["rows"], path, title=_title(meta))
        print(f"wrote the Pareto plot to {path}")
    return 0


def _title(meta: dict) -> str:
    model = meta.get("model") or "model"
    return f"{model} on {Path(str(meta.get('data', ''))).name} ({meta.get('num_images', '?')} images)"


def budget_variants(model, methods, options, args, inputs) -> list:
    """One variant per method at the constant r the budget search chose (printing each choice)."""
    from ..evaluation.budget import search_budget
    from ..evaluation.sweep import Variant

    if inputs.kind != "images":
        raise ValueError(
            f"--target-speedup/--target-gflops search image models only; this model takes "
            f"{inputs.kind}: run tokenmerge bench over a few --r values to find the schedule, then "
            "pass them to eval with --r"
        )
    image_size = inputs.image_size
    chosen = []
    for method in methods:
        result = search_budget(
            model, method, target_speedup=args.target_speedup, target_gflops=args.target_gflops,
            metric=args.budget_metric or DEFAULT_BUDGET_METRIC, options=options.get(method), image_size=image_size,
            device=args.device, dtype=args.dtype, batch_size=args.timing_batch_size,
        )
        print("budget: " + result.describe(method))
        chosen.append(Variant.create(method, result.r, options.get(method)))
    return chosen


def run(args: argparse.Namespace) -> int:
    if args.from_results is not None:
        return _from_results(args)
    if args.budget_metric is not None and args.target_speedup is None and args.target_gflops is None:
        raise ValueError(
            f"--budget-metric {args.budget_metric} sets what the budget search measures, but no budget "
            "was given: add --target-speedup X or --target-gflops G, or drop --budget-metric"
        )
    if args.out is None:
        args.out = DEFAULT_OUT
    from ..evaluation.inputs import inputs_for
    from ..evaluation.pareto import save_pareto_plot
    from ..evaluation.sweep import (ResultCache, Variant, build_variant, format_rows, run_sweep, weights_fingerprint,
                                    write_results)
    from .. import __version__

    resolve_device_arguments(args)
    schedules = args.r if args.r is not None else [parse_schedule(s) for s in DEFAULT_SCHEDULES]
    options = method_options(args.method_option, args.methods)
    variants = variants_from(args.methods, schedules, options)
    variants += [Variant.create(c["method"], c["r"], c["options"]) for c in args.config]
    model = model_from_args(args)
    model_name = model_description(args)
    data = args.data or inputs_for(model).default_data()
    model = zero_shot_from_args(model, args, data)  # open_clip: zero-shot over --class-names
    inputs = inputs_for(model)
    if args.target_speedup is not None or args.target_gflops is not None:
        variants += budget_variants(model, args.methods, options, args, inputs)
    for variant in variants:
        # A bad method option or module file fails here, before minutes of image decoding.
        build_variant(model, variant)

    images, labels, classes = inputs.load(data, limit=args.limit, progress=True)
    weights = weights_fingerprint(model)
    context = {
        "weights": weights,
        **_model_identity(args),
        "data": str(Path(data).resolve()),
        "data_fingerprint": inputs.fingerprint(data, args.limit),
        **inputs.cache_context(),
        "dtype": str(args.dtype),
        "device_type": torch.device(args.device).type,
        "tokenmerge": __version__,
    }
    cache = ResultCache(None if args.no_cache else args.out / "cache.jsonl")
    cached = "no cache" if args.no_cache else f"{len(cache)} rows cached in {cache.path}"
    print(f"{model_name}: {len(images)} {inputs.noun}, {len(classes)} classes from {data}; "
          f"{len(variants)} variants ({cached})")
    rows = run_sweep(
        model, variants, images, labels, len(classes), cache=cache, context=context,
        eval_batch_size=args.batch_size, device=args.device, dtype=args.dtype,
        timing=not args.no_timing, timing_batch_size=args.timing_batch_size, warmup=args.warmup,
        repeats=args.repeats, example=inputs.example(args.timing_batch_size, args.device),
    )
    meta = _meta(args, model_name, data, len(images), weights)
    paths = write_results(rows, meta, args.out)
    print()
    print(format_rows(rows))
    print(f"\nwrote {paths['csv']} and {paths['json']}")
    if args.plot is not None:
        path = save_pareto_plot(rows, _plot_path(args), title=_title(meta))
        print(f"wrote the Pareto plot to {path}")
    return 0
