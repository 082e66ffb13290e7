"""Model loading: timm names (random, pretrained or local checkpoint), Hugging Face folders
(``hf:DIR``, written by ``save_pretrained``) and the embedded default.

The embedded default is a ViT-Tiny/16 trained on Imagenette (10 classes), shipped in the
package so that the demo and the tests run offline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .io import load_safetensors, load_tensor_file

__all__ = ["DEFAULT_MODEL", "DEFAULT_CHECKPOINT", "HF_PREFIX", "load_model", "load_hf_model", "load_checkpoint"]

DEFAULT_MODEL = "vit_tiny_patch16_224"
DEFAULT_NUM_CLASSES = 10
DEFAULT_CHECKPOINT = Path(__file__).parent / "assets" / "vit_tiny_patch16_224.imagenette.safetensors"
HF_PREFIX = "hf:"  # model names starting with it are Hugging Face folders
_FIX = ("pass a .safetensors file or a .pth holding only a state_dict of tensors "
        "(torch.save(model.state_dict(), path))")


def load_checkpoint(path) -> dict:
    """A state_dict from ``.safetensors`` or ``.pth``/``.pt`` (unwrapping ``{"model": ...}``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist (pass a .safetensors or .pth file)")
    if path.suffix == ".safetensors":
        state = load_safetensors(path, "checkpoint", fix=_FIX)
    elif path.suffix in (".pth", ".pt", ".bin"):
        # weights_only: a .pth is a pickle, and a pickle of anything but tensors can run code.
        state = load_tensor_file(path, "checkpoint", fix=_FIX)
        for key in ("model", "state_dict", "model_state"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
                break
    else:
        raise ValueError(f"unknown checkpoint format {path.suffix!r} for {str(path)!r}: use .safetensors or .pth")
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise ValueError(f"{str(path)!r} does not hold a state_dict (a mapping of names to tensors)")
    return state


def _classes_in(state: dict) -> Optional[int]:
    head = state.get("head.weight")
    return None if head is None else int(head.shape[0])


def _hf_class(path: Path, config):
    """The supported class ``config.architectures`` names (``AutoModelForImageClassification``
    when it names none)."""
    import transformers

    from .backends.transformers import supported_classes

    names = list(getattr(config, "architectures", None) or [])
    if not names:
        return transformers.AutoModelForImageClassification
    classes = {cls.__name__: cls for cls in supported_classes()}
    if names[0] not in classes:
        raise ValueError(
            f"{HF_PREFIX}{path} holds a {names[0]}, which tokenmerge does not support; supported "
            f"Hugging Face classes: {', '.join(sorted(classes))}"
        )
    return classes[names[0]]


def load_hf_model(path, num_classes: Optional[int] = None) -> nn.Module:
    """A Hugging Face model from a local folder written by ``model.save_pretrained(path)``,
    as the class its config names, in eval mode and float32. Nothing is downloaded.

    Args:
        path: the folder (holding ``config.json`` and the weights).
        num_classes: when given, must equal the saved head's ``config.num_labels``.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"Hugging Face model folder {str(path)!r} does not exist: pass {HF_PREFIX}DIR, a folder "
            "written by model.save_pretrained(DIR)"
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{str(path)!r} has no config.json, so it is not a Hugging Face model folder: pass a folder "
            "written by model.save_pretrained(DIR)"
        )
    import transformers

    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    if num_classes is not None and num_classes != config.num_labels:
        raise ValueError(
            f"--num-classes {num_classes} does not match {HF_PREFIX}{path}, whose head has "
            f"{config.num_labels} classes; pass --num-classes {config.num_labels} or leave it out"
        )
    model = _hf_class(path, config).from_pretrained(path, local_files_only=True)
    return model.float().eval()


def load_model(
    name: Optional[str] = None,
    *,
    checkpoint=None,
    num_classes: Optional[int] = None,
    pretrained: bool = False,
    **timm_kwargs,
) -> nn.Module:
    """Create a timm model, or load a Hugging Face one, in eval mode and float32.

    Args:
        name: timm architecture name; ``"hf:DIR"`` a Hugging Face model folder (see
            :func:`load_hf_model`); ``None`` is the embedded ViT-Tiny Imagenette model.
        checkpoint: a local ``.safetensors`` or ``.pth`` state_dict with timm key names.
        num_classes: classifier size; with a checkpoint it must match the checkpoint's head
            (defaults to it).
        pretrained: load timm's pretrained weights (needs network access or a warm cache).
    """
    if name is not None and name.startswith(HF_PREFIX):
        given = [flag for flag, value in (("--checkpoint", checkpoint), ("--pretrained", pretrained),
                                          ("--model-kwargs", timm_kwargs)) if value]
        if given:
            raise ValueError(
                f"{' and '.join(given)} describe timm models; a {HF_PREFIX}DIR model takes its "
                "architecture and weights from the folder: leave them out"
            )
        return load_hf_model(name[len(HF_PREFIX):], num_classes=num_classes)
    import timm

    if name is None:
        if checkpoint is None and not pretrained:
            checkpoint = DEFAULT_CHECKPOINT
            if not DEFAULT_CHECKPOINT.is_file():
                raise FileNotFoundError(
                    f"the embedded checkpoint {DEFAULT_CHECKPOINT} is missing: reinstall tokenmerge"
                )
        name = DEFAULT_MODEL
    state = None
    if checkpoint is not None:
        if pretrained:
            raise ValueError("give either pretrained=True or checkpoint=..., not both")
        state = load_checkpoint(checkpoint)
        found = _classes_in(state)
        if num_classes is None:
            num_classes = found
        elif found is not None and found != num_classes:
            raise ValueError(
                f"--num-classes {num_classes} does not match the checkpoint {checkpoint}, whose "
                f"head has {found} classes; pass --num-classes {found}"
            )
    kwargs = dict(timm_kwargs)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ValueError(f"unknown timm model {name!r} (see timm.list_models())") from None
        raise
    if state is not None:
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(f"checkpoint {checkpoint} does not fit {name}: {err}") from None
    return model.float().eval()
