"""Model loading: timm names (random, pretrained or local checkpoint) and the embedded default.

The embedded default is a ViT-Tiny/16 trained on Imagenette (10 classes), shipped in the
package so that the demo and the tests run offline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .io import load_safetensors, load_tensor_file

__all__ = ["DEFAULT_MODEL", "DEFAULT_CHECKPOINT", "load_model", "load_checkpoint"]

DEFAULT_MODEL = "vit_tiny_patch16_224"
DEFAULT_NUM_CLASSES = 10
DEFAULT_CHECKPOINT = Path(__file__).parent / "assets" / "vit_tiny_patch16_224.imagenette.safetensors"
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


def load_model(
    name: Optional[str] = None,
    *,
    checkpoint=None,
    num_classes: Optional[int] = None,
    pretrained: bool = False,
    **timm_kwargs,
) -> nn.Module:
    """Create a timm model, in eval mode and float32.

    Args:
        name: timm architecture name; ``None`` is the embedded ViT-Tiny Imagenette model.
        checkpoint: a local ``.safetensors`` or ``.pth`` state_dict with timm key names.
        num_classes: classifier size; with a checkpoint it must match the checkpoint's head
            (defaults to it).
        pretrained: load timm's pretrained weights (needs network access or a warm cache).
    """
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
