"""Arguments shared by subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..models import is_open_clip_model
from ..zero_shot import DEFAULT_TEMPLATE
from . import arguments

__all__ = ["add_model_arguments", "add_zero_shot_arguments", "model_from_args", "zero_shot_from_args",
           "parse_dtype", "add_device_arguments"]

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
        help="timm architecture name; hf:DIR for a Hugging Face ViT/DeiT/CLIP/DINOv2 model, AST "
             "audio or VideoMAE/ViViT video classifier saved with save_pretrained(DIR); or "
             "open_clip:ARCH for an open_clip model (a config name such as ViT-B-32, or a .json "
             "model config file; weights from --pretrained TAG or --checkpoint FILE) (default: "
             + (f"{default_model})" if default_model else "the embedded ViT-Tiny Imagenette model)"),
    )
    weights = parser.add_mutually_exclusive_group()
    # nargs="?": a bare --pretrained is timm's flag, --pretrained TAG an open_clip tag. Give the
    # model name first (MODEL --pretrained): a name after a bare --pretrained would be read as a tag.
    weights.add_argument("--pretrained", nargs="?", const=True, default=False, metavar="TAG",
                         help="pretrained weights (needs network or a warm cache): timm's with a bare "
                              "--pretrained; open_clip's by tag for open_clip:ARCH, e.g. --pretrained "
                              "laion2b_s34b_b79k")
    weights.add_argument("--checkpoint", help="local .safetensors or .pth state_dict with timm key names "
                                              "(open_clip key names for open_clip:ARCH)")
    parser.add_argument("--num-classes", type=arguments.positive_int, help="classifier size (default: the checkpoint's or timm's)")
    parser.add_argument("--model-kwargs", type=arguments.json_object, default={}, metavar="JSON",
                        help='extra timm.create_model arguments, e.g. \'{"depth": 6}\' for a checkpoint of another depth')


def add_zero_shot_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """``--class-names`` and ``--prompt-template``: zero-shot classification of open_clip models
    (``required``: the command reports accuracy, so an open_clip model needs them)."""
    need = ("needed for open_clip:ARCH models" if required
            else "open_clip:ARCH models: export the zero-shot classifier")
    parser.add_argument(
        "--class-names", type=Path, metavar="FILE",
        help=f"zero-shot classification ({need}): a text file with one class name per line in the "
             "order of the data folder's sorted class sub-folders, or a JSON object mapping folder name "
             "to class name",
    )
    parser.add_argument(
        "--prompt-template", action="append", default=None, metavar="TEXT",
        help=f"zero-shot prompt with {{}} for the class name (default: {DEFAULT_TEMPLATE!r}); repeatable: "
             "several templates are averaged per class",
    )


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

    pretrained = args.pretrained
    if isinstance(pretrained, str) and (args.model is None or ":" in pretrained):  # tags have no ':'
        raise ValueError(
            f"--pretrained {pretrained}: {pretrained!r} was read as a pretrained tag, for no model named before "
            "it; name the model before the flag (tokenmerge COMMAND MODEL --pretrained [TAG])"
        )
    model = load_model(args.model, checkpoint=args.checkpoint, num_classes=args.num_classes,
                       pretrained=pretrained, **getattr(args, "model_kwargs", {}))
    if is_open_clip_model(args.model):
        _check_open_clip_tower(model, args.model)
    check_patchable(model)
    return model


def _check_open_clip_tower(model, name: str) -> None:
    """The commands run open_clip models whose image tower is open_clip's VisionTransformer; a
    timm-trunk tower (SigLIP, ViTamin...) or a ResNet is refused naming what to do instead."""
    from ..backends.open_clip import is_open_clip_vit

    if not is_open_clip_vit(model):
        visual = type(getattr(model, "visual", None)).__name__
        raise TypeError(
            f"{name}: its image tower is an open_clip {visual}, not open_clip's VisionTransformer, so the "
            "commands cannot run it; a timm-trunk tower (TimmModel: SigLIP, ViTamin...) is patched in Python "
            "with tokenmerge.patch(model.visual.trunk, ...), and a ResNet tower keeps no tokens to merge"
        )


def zero_shot_from_args(model, args, data=None, required: bool = True):
    """``model`` as the classifier an accuracy command runs: an open_clip model becomes a
    :class:`~tokenmerge.zero_shot.ZeroShotClassifier` over ``--class-names``; other models are
    returned as they are.

    Args:
        data: the data folder; its sorted class sub-folders must match the class names (a
            count for a list, the folder names for a JSON object).
        required: the command needs logits, so an open_clip model without ``--class-names``
            is refused (else it is returned unwrapped).
    """
    class_names = getattr(args, "class_names", None)
    templates = getattr(args, "prompt_template", None)
    if not is_open_clip_model(args.model):
        if class_names is not None or templates:
            raise ValueError(
                f"--class-names/--prompt-template set up zero-shot classification of open_clip:ARCH models; "
                f"{args.model or 'the embedded model'} has its own classification head: leave them out"
            )
        return model
    if class_names is None:
        if templates:
            raise ValueError("--prompt-template needs --class-names FILE (the names it is filled with)")
        if not required:
            return model
        raise ValueError(
            f"{args.model} has no classification head: accuracy is zero-shot, from class names. Pass "
            "--class-names FILE (one name per line in the order of the data folder's sorted class folders, "
            'or a JSON object {"folder": "class name"}), optionally --prompt-template "a photo of a {}."'
        )
    import open_clip

    from ..evaluation.inputs import inputs_for
    from ..models import OPEN_CLIP_PREFIX, open_clip_config_name
    from ..zero_shot import read_class_names, zero_shot_classifier

    classes = None if data is None else inputs_for(model).class_files(data)[0]
    names = read_class_names(class_names, classes)
    tokenizer = open_clip.get_tokenizer(open_clip_config_name(args.model[len(OPEN_CLIP_PREFIX):]))
    return zero_shot_classifier(model, names, tokenizer, templates or [DEFAULT_TEMPLATE])
