"""``tokenmerge export``: a patched model at a fixed schedule as an ONNX file (and/or a
``torch.export`` program), checked against PyTorch in ONNX Runtime."""

from __future__ import annotations

import argparse

from . import arguments
from .common import add_model_arguments, add_zero_shot_arguments, model_from_args, zero_shot_from_args

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a patched model to ONNX (and/or torch.export) at its fixed input size",
        description=(
            "Patch the model with --method at schedule --r and export it at the model's input "
            "size, where the schedule is fixed: --onnx writes an ONNX file (batch dimension "
            "dynamic unless --static-batch) and checks ONNX Runtime's logits against PyTorch's "
            "on random images; --program writes a torch.export program (.pt2). Files are "
            "replaced only once complete. An open_clip:ARCH model exports its image encoder (output: "
            "the image embedding), or with --class-names its zero-shot classifier (output: logits). "
            "Default model: the embedded ViT-Tiny Imagenette checkpoint."
        ),
    )
    add_model_arguments(parser)
    add_zero_shot_arguments(parser, required=False)
    parser.add_argument("--method", default="tome",
                        help="token reduction method, or 'none' for the unmodified model (default: tome)")
    parser.add_argument("--r", type=arguments.schedule, default=None, metavar="SCHEDULE",
                        help="schedule: 13 (constant r), 13:-1, 16,16,8 or keep=0.9 (required unless --method none)")
    parser.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a method option, e.g. order=2 or modules=FILE for DTEM; repeatable")
    parser.add_argument("--onnx", type=arguments.output_file, metavar="FILE", help="ONNX file to write")
    parser.add_argument("--program", type=arguments.output_file, metavar="FILE",
                        help="torch.export program to write (.pt2, load with torch.export.load)")
    parser.add_argument("--batch-size", type=arguments.positive_int, default=1,
                        help="batch of the example input (the fixed batch with --static-batch; default 1)")
    parser.add_argument("--image-size", type=arguments.positive_int, default=None,
                        help="default and only choice for a patched model: the model's own input size")
    parser.add_argument("--static-batch", action="store_true", help="fix the batch dimension to --batch-size")
    parser.add_argument("--opset", type=arguments.positive_int, default=None, help="ONNX opset (16..20, default 17)")
    parser.add_argument("--atol", type=arguments.finite_positive_float, default=1e-4,
                        help="largest logit (or embedding) difference the ONNX Runtime check accepts (default 1e-4)")
    parser.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime check")
    parser.set_defaults(func=run)


def _variant(args):
    from ..evaluation.sweep import UNMODIFIED, Variant
    from .eval import method_options

    if args.method == UNMODIFIED:
        if args.r is not None or args.method_option:
            raise ValueError("--method none exports the unmodified model: drop --r and --method-option")
        return Variant.create(UNMODIFIED)
    if args.r is None:
        raise ValueError(f"--r is required with --method {args.method} (e.g. --r 13)")
    options = method_options(args.method_option, [args.method])[args.method]
    return Variant.create(args.method, args.r, options)


def run(args: argparse.Namespace) -> int:
    from ..evaluation.sweep import build_variant
    from ..export import DEFAULT_OPSET, check_exportable, export_onnx, export_program
    from ..io import atomic_write
    from .eval import model_description

    if args.onnx is None and args.program is None:
        raise ValueError("nothing to write: give --onnx FILE and/or --program FILE")
    variant = _variant(args)
    model = build_variant(zero_shot_from_args(model_from_args(args), args, required=False), variant)
    check_exportable(model, args.image_size)  # refuse before any file is touched
    name = f"{model_description(args)}, {variant.label}"
    if args.onnx is not None:
        try:
            result = export_onnx(
                model, args.onnx, image_size=args.image_size, batch_size=args.batch_size,
                dynamic_batch=not args.static_batch, opset=args.opset or DEFAULT_OPSET,
                check=not args.no_check, atol=args.atol,
            )
        except ImportError as err:
            # Only ONNX Runtime serves the check alone; onnx itself writes the file.
            skip = "; or pass --no-check to export without checking" if err.name == "onnxruntime" else ""
            raise ValueError(f"{err}{skip}") from None
        shape = "x".join(str(s) for s in result.input_shape)
        print(f"wrote {result.path} ({name}; input {shape})")
        if result.max_abs_diff is not None and result.argmax_agreement is None:  # open_clip image embeddings
            print(f"ONNX Runtime vs PyTorch: max |embedding difference| {result.max_abs_diff:.2e}")
        elif result.max_abs_diff is not None:
            print(f"ONNX Runtime vs PyTorch: max |logit difference| {result.max_abs_diff:.2e}, "
                  f"top-1 agreement {result.argmax_agreement:.0%}")
    if args.program is not None:
        program = export_program(model, image_size=args.image_size, batch_size=args.batch_size,
                                 dynamic_batch=not args.static_batch)
        atomic_write(args.program, lambda temporary: _save_program(program, temporary))
        print(f"wrote {args.program} ({name}; torch.export program)")
    return 0


def _save_program(program, path) -> None:
    """``torch.export.save`` to ``path`` through a file object: given a path, torch warns about
    any name not ending in .pt2 (the atomic write's temporary file)."""
    import torch

    with open(path, "wb") as handle:
        torch.export.save(program, handle)
