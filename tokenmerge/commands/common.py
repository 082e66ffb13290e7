"""Arguments shared by subcommands."""

from __future__ import annotations

import argparse

import torch

from . import arguments

__all__ = ["add_model_arguments", "model_from_args", "parse_dtype", "add_device_arguments"]

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(name: str):
    try:
        return _DTYPES[name]
    except KeyError:
        raise argparse.ArgumentTypeError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}") from None


def add_model_arguments(parser: argparse.ArgumentParser, default_model=None) -> None:
    parser.add_argument(
        "model", nargs="?", default=default_model,
        help="timm architecture name, or hf:DIR for a Hugging Face ViT/DeiT/CLIP/DINOv2 model, AST "
             "audio or VideoMAE/ViViT video classifier saved with save_pretrained(DIR) (default: the "
             "embedded ViT-Tiny Imagenette model)",
    )
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", action="store_true", help="timm pretrained weights (needs network)")
    weights.add_argument("--checkpoint", help="local .safetensors or .pth state_dict with timm key names")
    parser.add_argument("--num-classes", type=arguments.positive_int, help="classifier size (default: the checkpoint's or timm's)")
    parser.add_argument("--model-kwargs", type=arguments.json_object, default={}, metavar="JSON",
                        help='extra timm.create_model arguments, e.g. \'{"depth": 6}\' for a checkpoint of another depth')


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", type=arguments.device, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda, cuda:N or mps (default: cuda if available)")
    parser.add_argument("--dtype", type=parse_dtype, default=None,
                        help="autocast dtype: bf16/fp16 (default: fp32 on CPU, bf16 on CUDA)")
    parser.add_argument("--threads", type=arguments.threads, help="torch CPU threads (default: torch's)")


def resolve_device_arguments(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dtype is None:
        args.dtype = torch.bfloat16 if torch.device(args.device).type == "cuda" else torch.float32
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but no CUDA device is available; use --device cpu")


def model_from_args(args):
    """The model the arguments name; a model tokenmerge cannot patch is refused here, with the
    error :func:`tokenmerge.patch` gives, before any data is read."""
    from ..api import check_patchable
    from ..models import load_model

    model = load_model(args.model, checkpoint=args.checkpoint, num_classes=args.num_classes,
                       pretrained=args.pretrained, **getattr(args, "model_kwargs", {}))
    check_patchable(model)
    return model
