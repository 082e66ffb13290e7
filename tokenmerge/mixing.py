"""Mixup and CutMix for the trainer: mixed inputs, and the label loss that goes with them.

Why the trainer has them: a checkpoint fine-tuned with token merging is usually fine-tuned
on the images it was trained on. It has fitted those (the shipped ViT-Tiny: 97.6% top-1 on
them, 84.7% on val), so both the labels and a distillation teacher mostly repeat there what
the merged model already matches. On a mixed image (two images blended, or a box of one
pasted into the other) the teacher's distribution is softer, and matching it teaches the
merged model the teacher's behaviour away from the fitted images. This is
DeiT's recipe for distilling a ViT (Touvron et al., 2021) and timm's default ViT
augmentation (mixup 0.8, cutmix 1.0).

- **Mixup** (Zhang et al., 2018): ``x = lam * x + (1 - lam) * x[partner]``,
  ``lam ~ Beta(alpha, alpha)``.
- **CutMix** (Yun et al., 2019): a box covering a share ``1 - lam`` of the last two
  dimensions (height and width of images and video frames; time and frequency of a
  spectrogram) is copied from ``x[partner]``; ``lam`` is corrected to the box's exact area
  after clipping to the input.

With both, each batch uses one of the two, CutMix with probability ``switch_prob``. The
partner of sample ``i`` is sample ``B - 1 - i`` (the batch reversed, as in timm). Every
draw comes from the NumPy ``rng`` passed in (torch samples Beta only from its global
generator), so the trainer makes a batch's mixing a function of its step (resumable).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy
import torch
import torch.nn.functional as F

__all__ = ["Mix", "mix_batch", "mixed_cross_entropy"]


@dataclasses.dataclass(frozen=True)
class Mix:
    """How a batch was mixed: sample ``i`` keeps a share ``lam`` of itself and takes
    ``1 - lam`` of sample ``partner[i]``."""

    lam: float
    partner: torch.Tensor  # [B] int64


def mix_batch(
    inputs: torch.Tensor,
    rng: numpy.random.Generator,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    switch_prob: float = 0.5,
) -> tuple:
    """Mix a batch with Mixup or CutMix.

    Args:
        inputs: ``[B, ..., H, W]`` (images ``[B, C, H, W]``, videos ``[B, T, C, H, W]``,
            spectrograms ``[B, T, F]``); not modified.
        rng: the source of every random draw.
        mixup_alpha, cutmix_alpha: the Beta parameters; 0 turns that kind off.
        switch_prob: with both on, the chance that a batch uses CutMix.

    Returns:
        ``(mixed, mix)``: the mixed inputs (same shape and dtype) and the :class:`Mix`, or
        ``(inputs, None)`` when both alphas are 0.
    """
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ValueError(f"mixup/cutmix alphas must be >= 0 (0 turns one off), got {mixup_alpha}, {cutmix_alpha}")
    if mixup_alpha == 0 and cutmix_alpha == 0:
        return inputs, None
    if inputs.dim() < 3:
        raise ValueError(f"mix_batch needs inputs of shape [B, ..., H, W], got {tuple(inputs.shape)}")
    use_cutmix = cutmix_alpha > 0 and (
        mixup_alpha == 0 or rng.random() < switch_prob
    )
    partner = torch.arange(inputs.shape[0] - 1, -1, -1, device=inputs.device)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam = float(rng.beta(alpha, alpha))
    other = inputs[partner]
    if not use_cutmix:
        return inputs * lam + other * (1.0 - lam), Mix(lam, partner)
    height, width = inputs.shape[-2:]
    top, bottom, left, right = _cut_box(height, width, lam, rng)
    mixed = inputs.clone()
    mixed[..., top:bottom, left:right] = other[..., top:bottom, left:right]
    lam = 1.0 - (bottom - top) * (right - left) / (height * width)
    return mixed, Mix(lam, partner)


def _cut_box(height: int, width: int, lam: float, rng: numpy.random.Generator) -> tuple:
    """A box of area ``(1 - lam) * H * W`` with the input's aspect ratio, centred at a
    uniform point and clipped to the input: ``(top, bottom, left, right)``."""
    side = math.sqrt(1.0 - lam)
    box_h, box_w = int(height * side), int(width * side)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    top, bottom = max(cy - box_h // 2, 0), min(cy + box_h - box_h // 2, height)
    left, right = max(cx - box_w // 2, 0), min(cx + box_w - box_w // 2, width)
    return top, bottom, left, right


def mixed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mix: Optional[Mix]) -> torch.Tensor:
    """Cross-entropy against the mixed labels: ``lam * CE(y) + (1 - lam) * CE(y[partner])``
    (the same as cross-entropy with the mixed one-hot target).

    Args:
        logits: ``[B, K]``.
        labels: ``[B]`` class indices.
        mix: the batch's :class:`Mix`, or ``None`` (plain cross-entropy).
    """
    logits = logits.float()
    if mix is None:
        return F.cross_entropy(logits, labels)
    return mix.lam * F.cross_entropy(logits, labels) + (1.0 - mix.lam) * F.cross_entropy(logits, labels[mix.partner])
