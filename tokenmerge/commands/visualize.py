"""``tokenmerge visualize``: which patches were merged into which token, drawn over the image."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..core.schedule import KeepRatio, format_schedule
from . import arguments
from .common import add_model_arguments, model_from_args
from .eval import _schedule, method_options

__all__ = ["add_parser", "run", "render"]


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "visualize",
        help="draw the merged token groups over an image (the ToMe-paper figure)",
        description=(
            "Patch the model, run one image, and draw each group of patches that ended up in "
            "the same token (after the last block, or --block K) filled with its mean colour "
            "and outlined. Dark grey: patches discarded by a pruning method."
        ),
    )
    parser.add_argument("image", type=Path, help="an image file (resized and centre-cropped)")
    add_model_arguments(parser)
    parser.add_argument("--method", default="tome", help="token reduction method (default: tome)")
    parser.add_argument("--r", type=_schedule, default=_schedule("13"), metavar="SCHEDULE",
                        help="schedule: 13, 13:-1, 16,16,8 or keep=0.9 (default: 13)")
    parser.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a method option, e.g. order=2; repeatable")
    parser.add_argument("--block", type=arguments.positive_int, default=None,
                        help="show the groups after this block (1-based; default: the last)")
    parser.add_argument("--out", type=arguments.output_file, default=Path("tokenmerge-visualize.png"), help="output PNG")
    parser.set_defaults(func=run)


def render(model, image, method: str, schedule, out, block=None, options=None) -> str:
    """Patch a copy of ``model`` with ``method``/``schedule``, draw ``image``'s merge groups to
    ``out``; returns a one-line summary."""
    from ..backends.adapter import adapter_for
    from ..evaluation.sweep import Variant, build_variant
    from ..evaluation.visualize import visualize_merging

    patched = build_variant(model, Variant.create(method, schedule, options))
    label = f"{method} {format_schedule(schedule)}" if isinstance(schedule, KeepRatio) else (
        f"{method} r={format_schedule(schedule)}")
    figure, groups = visualize_merging(patched, image, block=block, title=f"{label}: {Path(image).name}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110, format="png")
    return (f"{label}: after block {groups.block}/{adapter_for(patched).num_blocks}, {groups.tokens_in} tokens -> "
            f"{groups.num_tokens}; wrote {out}")


def run(args: argparse.Namespace) -> int:
    if args.image.is_dir():
        raise ValueError(f"{str(args.image)!r} is a folder: pass one image file")
    if not args.image.is_file():
        raise FileNotFoundError(f"image {str(args.image)!r} does not exist")
    options = method_options(args.method_option, [args.method])[args.method]
    model = model_from_args(args)
    print(render(model, args.image, args.method, args.r, args.out, block=args.block, options=options))
    return 0
