"""``tokenmerge visualize``: which patches were merged into which token, drawn over the input:
an image, an AST model's spectrogram, or a VideoMAE/ViViT model's frames (one panel per tubelet
step, or an animated GIF with every frame when ``--out`` ends in ``.gif``)."""

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
        help="draw the merged token groups over an image, spectrogram or video (the ToMe-paper figure)",
        description=(
            "Patch the model, run one input file, and draw each group of patches that ended up in "
            "the same token (after the last block, or --block K) filled with its mean colour "
            "and outlined. Dark grey: patches discarded by a pruning method. The file is what "
            "the model takes: an image, a WAV/FLAC clip for an AST model (drawn on its log-mel "
            "spectrogram; overlapping patches: each cell goes to the nearest patch centre), or "
            "a video for a VideoMAE or ViViT model (the first frame of each tubelet step, one "
            "colour per token across the frames; with --out NAME.gif an animated GIF instead, "
            "every input frame beside the groups of its tubelet step)."
        ),
    )
    parser.add_argument("file", type=Path, metavar="FILE",
                        help="an image (resized and centre-cropped), or the audio/video clip an "
                             "AST/VideoMAE/ViViT model takes")
    add_model_arguments(parser)
    parser.add_argument("--method", default="tome", help="token reduction method (default: tome)")
    parser.add_argument("--r", type=_schedule, default=_schedule("13"), metavar="SCHEDULE",
                        help="schedule: 13, 13:-1, 16,16,8 or keep=0.9 (default: 13)")
    parser.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a method option, e.g. order=2; repeatable")
    parser.add_argument("--block", type=arguments.positive_int, default=None,
                        help="show the groups after this block (1-based; default: the last)")
    parser.add_argument("--out", type=_output_image, default=Path("tokenmerge-visualize.png"),
                        help="output image, in the format its suffix names (.png, .jpg, .svg, .pdf...); for a "
                             "video model a name ending in .gif writes an animated GIF, one frame per input frame")
    parser.set_defaults(func=run)


def image_format(out) -> str:
    """The format the suffix of ``out`` names (lower case, no dot), refusing one that
    matplotlib cannot write: the file's bytes must be what its name says."""
    from matplotlib.backend_bases import FigureCanvasBase

    suffix = Path(out).suffix.lower()
    formats = FigureCanvasBase.get_supported_filetypes()
    if suffix[1:] not in formats:
        problem = (f"{suffix} is not an image format tokenmerge visualize writes" if suffix
                   else "the name has no suffix to say which image format to write")
        raise ValueError(
            f"cannot write {str(out)!r}: {problem}; end the name in .png (or .gif: an animation of a "
            f"video), or one of "
            f"{', '.join('.' + name for name in sorted(formats) if name not in ('png', 'gif'))}"
        )
    return suffix[1:]


def _output_image(text: str) -> Path:
    """``--out``: a writable file path whose suffix names a format we write."""
    path = arguments.output_file(text)
    try:
        image_format(path)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return path


def render(model, path, method: str, schedule, out, block=None, options=None) -> str:
    """Patch a copy of ``model`` with ``method``/``schedule``, draw the merge groups of the
    input file ``path`` (an image, or what an audio/video model takes) to ``out`` (a picture in
    the format its suffix names, or an animated GIF when it ends in ``.gif``); returns a
    one-line summary."""
    from ..backends.adapter import adapter_for
    from ..evaluation.sweep import Variant, build_variant
    from ..evaluation.visualize import merge_animation, save_gif, visualize_merging

    out = Path(out)
    kind = image_format(out)  # before the model runs: a bad name fails at once
    gif = kind == "gif"
    patched = build_variant(model, Variant.create(method, schedule, options))
    label = f"{method} {format_schedule(schedule)}" if isinstance(schedule, KeepRatio) else (
        f"{method} r={format_schedule(schedule)}")
    title = f"{label}: {Path(path).name}"
    drawing, groups = (merge_animation if gif else visualize_merging)(patched, path, block=block, title=title)
    out.parent.mkdir(parents=True, exist_ok=True)
    if gif:
        save_gif(drawing, out)
    else:
        drawing.savefig(out, dpi=110, format=kind)
    return (f"{label}: after block {groups.block}/{adapter_for(patched).num_blocks}, {groups.tokens_in} tokens -> "
            f"{groups.num_tokens}; wrote {out}")


def run(args: argparse.Namespace) -> int:
    if args.file.is_dir():
        raise ValueError(f"{str(args.file)!r} is a folder: pass one input file (an image, or an audio or video clip)")
    if not args.file.is_file():
        raise FileNotFoundError(f"file {str(args.file)!r} does not exist")
    options = method_options(args.method_option, [args.method])[args.method]
    model = model_from_args(args)
    print(render(model, args.file, args.method, args.r, args.out, block=args.block, options=options))
    return 0
