"""Arguments shared by subcommands."""

from __future__ import annotations

import argparse

import torch

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
        help="timm architecture name (default: the embedded ViT-Tiny Imagenette model)",
    )
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", action="store_true", help="timm pretrained weights (needs network)")
    weights.add_argument("--checkpoint", help="local .safetensors or .pth state_dict with timm key names")
    parser.add_argument("--num-classes", type=int, help="classifier size (default: the checkpoint's or timm's)")


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", type=parse_dtype, default=None,
                        help="autocast dtype: bf16/fp16 (default: fp32 on CPU, bf16 on CUDA)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")


def resolve_device_arguments(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dtype is None:
        args.dtype = torch.bfloat16 if torch.device(args.device).type == "cuda" else torch.float32
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but no CUDA device is available; use --device cpu")


def model_from_args(args):
    from ..models import load_model

    return load_model(args.model, checkpoint=args.checkpoint, num_classes=args.num_classes,
                      pretrained=args.pretrained)
