"""``tokenmerge bench``: the unmodified model, the merged model and the token-drop bound, timed in one run."""

from __future__ import annotations

import argparse
import json
import platform

import torch

from ..core.schedule import format_schedule, parse_schedule
from . import arguments
from .common import add_device_arguments, add_model_arguments, model_from_args, resolve_device_arguments

__all__ = ["add_parser", "run", "benchmark"]


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="throughput and GFLOPs: unmodified vs merged vs the token-drop bound",
        description=(
            "Time the unmodified model, the merged model and the token-drop bound (the same "
            "schedule with tokens simply cut, no merge work) in one process, interleaved, "
            "median of repeated timings. Random weights unless --pretrained/--checkpoint: "
            "throughput does not depend on weights. Random inputs of the model's shape: images, "
            "or for hf: AST / VideoMAE / ViViT models spectrograms / video clips. An open_clip:ARCH "
            "model times its image tower (encode_image)."
        ),
    )
    add_model_arguments(parser, default_model="vit_small_patch16_224")
    parser.add_argument("--method", default="tome", help="token reduction method (default: tome)")
    parser.add_argument("--r", nargs="+", type=arguments.schedule, default=[parse_schedule("13")],
                        metavar="SCHEDULE",
                        help="one or more schedules: 13, 13:-1, 16,16,8 or keep=0.9 (default: 13)")
    parser.add_argument("--batch-size", type=arguments.positive_int, default=32)
    parser.add_argument("--image-size", type=arguments.positive_int, default=None,
                        help="image models only; default: the model's (another size needs a model built for it)")
    parser.add_argument("--warmup", type=arguments.non_negative_int, default=3)
    parser.add_argument("--repeats", type=arguments.positive_int, default=10)
    parser.add_argument("--compile", action="store_true", help="torch.compile every variant")
    parser.add_argument("--no-bound", action="store_true", help="skip the token-drop bound")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_device_arguments(parser)
    parser.set_defaults(func=run)


def _variants(base, method, schedules, with_bound, compile_models):
    from ..evaluation.sweep import Variant, build_variant

    variants = {"unmodified": (base, None, None)}
    for schedule in schedules:
        label = format_schedule(schedule)
        methods = [method] + (["drop"] if with_bound and method != "drop" else [])
        for name in methods:
            # Variants share the base model's weights: a sweep of a large model fits in memory.
            model = build_variant(base, Variant.create(name, schedule))
            variants[f"{name} {label}"] = (model, name, label)
    timed = {}
    for key, (model, name, label) in variants.items():
        timed[key] = torch.compile(model) if compile_models else model
    return variants, timed


def benchmark(base, method="tome", schedules=(13,), batch_size=32, image_size=224, device="cpu",
              dtype=torch.float32, warmup=3, repeats=10, with_bound=True, compile_models=False,
              progress=True, inputs=None) -> dict:
    """Measure every variant; returns a JSON-ready dict (see ``tokenmerge bench --json``).

    ``inputs``: a batch to time instead of random ``image_size`` images (spectrograms or
    videos; then ``batch_size`` and ``image_size`` are ignored).
    """
    from ..backends.adapter import adapter_for
    from ..evaluation.flops import count_gflops
    from ..evaluation.throughput import measure_throughput

    base = base.to(device).eval()
    variants, timed = _variants(base, method, schedules, with_bound, compile_models)
    speed = measure_throughput(timed, batch_size=batch_size, image_size=image_size, device=device,
                               dtype=dtype, warmup=warmup, repeats=repeats, progress=progress, inputs=inputs)
    reference = speed["unmodified"]["images_per_s"]
    rows = []
    for key, (model, name, label) in variants.items():
        tokens = adapter_for(model).tokens_per_block() if name is not None else None
        row = {
            "variant": key,
            "method": name or "none",
            "schedule": label,
            "tokens_per_block": tokens,
            "gflops": count_gflops(model, image_size=image_size, device=device,
                                   images=None if inputs is None else inputs[:1]),
            "images_per_s": speed[key]["images_per_s"],
            "ms_per_batch": speed[key]["ms_per_batch"],
            "speedup": speed[key]["images_per_s"] / reference,
        }
        bound_key = f"drop {label}"
        if name not in (None, "drop") and bound_key in speed:
            row["fraction_of_bound"] = speed[key]["images_per_s"] / speed[bound_key]["images_per_s"]
        rows.append(row)
    return {
        "batch_size": batch_size if inputs is None else int(inputs.shape[0]),
        "image_size": image_size if inputs is None else None,
        "input_shape": [3, image_size, image_size] if inputs is None else list(inputs.shape[1:]),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "dtype": str(dtype).replace("torch.", ""),
        "compiled": compile_models,
        "warmup": warmup,
        "repeats": repeats,
        "torch": torch.__version__,
        "rows": rows,
    }


def _tokens_label(tokens) -> str:
    if tokens is None:
        return "-"
    return f"{tokens[0]}->{tokens[-1]}"


def format_table(result: dict) -> str:
    per = "img" if result.get("image_size") else "clip"
    header = ["variant", "tokens in->out", f"GFLOPs/{per}", "im/s" if per == "img" else "clips/s", "speedup", "of bound"]
    lines = [header]
    for row in result["rows"]:
        bound = row.get("fraction_of_bound")
        lines.append([
            row["variant"],
            _tokens_label(row["tokens_per_block"]),
            f"{row['gflops']:.2f}",
            f"{row['images_per_s']:.1f}",
            f"{row['speedup']:.2f}x",
            "-" if bound is None else f"{bound:.2f}",
        ])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    text = [
        f"{result['device']} ({result['device_name']}), {result['dtype']}, batch {result['batch_size']}, "
        f"{result['threads']} threads, compiled={result['compiled']}, median of {result['repeats']} "
        f"after {result['warmup']} warm-up"
    ]
    for i, line in enumerate(lines):
        text.append("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)))
        if i == 0:
            text.append("  ".join("-" * width for width in widths))
    return "\n".join(text)


def run(args: argparse.Namespace) -> int:
    from ..evaluation.inputs import inputs_for

    resolve_device_arguments(args)
    model = model_from_args(args)
    inputs = inputs_for(model)
    if inputs.kind == "images":
        image_size = args.image_size or inputs.image_size
        inputs.adapter.check_image_size(image_size)
        example = None  # benchmark draws images of the chosen size
    elif args.image_size is not None:
        raise ValueError(f"--image-size applies to image models; this model takes {inputs.describe()}: leave it out")
    else:
        image_size, example = None, inputs.example(args.batch_size, args.device)
    result = benchmark(
        model, method=args.method, schedules=args.r, batch_size=args.batch_size,
        image_size=image_size, device=args.device, dtype=args.dtype, warmup=args.warmup,
        repeats=args.repeats, with_bound=not args.no_bound, compile_models=args.compile, inputs=example,
    )
    result["model"] = args.model
    print(json.dumps(result, indent=2) if args.json else f"{args.model}\n" + format_table(result))
    return 0
