"""Top-1 accuracy."""

from __future__ import annotations

import torch
from torch import nn

from ..backends.adapter import logits_of
from .throughput import autocast_for

__all__ = ["evaluate_accuracy", "evaluate_correct", "predict"]


@torch.inference_mode()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 128, device="cpu",
            dtype=None, progress: bool = False) -> torch.Tensor:
    """Class predictions ``[N]`` for preloaded images ``[N, 3, H, W]``."""
    from tqdm.auto import tqdm

    model = model.eval().to(device)
    out = []
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc="evaluating", disable=not progress, leave=False):
        batch = images[start:start + batch_size].to(device)
        with autocast_for(device, dtype):
            logits = logits_of(model(batch))
        out.append(logits.float().argmax(dim=-1).cpu())
    return torch.cat(out)


def evaluate_correct(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                     num_classes: int = None, **kwargs) -> torch.Tensor:
    """Which images ``model`` classifies correctly: ``[N]`` booleans on preloaded
    ``images``/``labels`` (``kwargs`` as for :func:`predict`).

    ``num_classes`` (the dataset's class count) is checked against the model's output so
    a wrong head fails loudly instead of scoring silently.
    """
    if num_classes is not None:
        with torch.inference_mode():
            check_num_classes(logits_of(model.eval()(images[:1].to(next(model.parameters()).device))), num_classes)
    return predict(model, images, **kwargs) == labels.cpu()


def check_num_classes(logits: torch.Tensor, num_classes: int) -> None:
    """Fail loudly when the model's head does not match the dataset's ``num_classes``."""
    width = logits.shape[-1]
    if width != num_classes:
        # The model's head may come from a checkpoint, whose class count is fixed, or be new
        # (or re-initialised), whose count is a choice: only the latter can follow the data.
        raise ValueError(
            f"the model predicts {width} classes but the dataset has {num_classes}: use a data folder "
            f"with the model's {width} classes (one sub-folder per class, their sorted names in the order "
            f"of the labels it was trained on), or, for a new or re-initialised head (not one loaded from "
            f"a checkpoint), build the model with num_classes={num_classes} (CLI: --num-classes {num_classes})"
        )


def evaluate_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                      num_classes: int = None, **kwargs) -> float:
    """Top-1 accuracy in percent on preloaded ``images``/``labels`` (see :func:`evaluate_correct`)."""
    return 100.0 * evaluate_correct(model, images, labels, num_classes, **kwargs).double().mean().item()
