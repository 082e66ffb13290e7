"""A confidence cascade: one set of weights, a token-merged pass for every image, and the
unmodified model again for the images that pass is least sure of.

Merging changes a classifier's answer mostly where the answer was close: on the 1,000
calibration images of the shipped ViT-Tiny, ATC at r=16 (-50% GFLOPs) changed 27 top-1
answers, and all 27 were among the 10% of images with the smallest top-1 margin of the merged
pass (BENCHMARKS.md section 6). So a budget of *mean* GFLOPs per image buys more accuracy as
a deeper merge for every image plus a full pass for the few it is unsure of than as one
shallower merge for all. This is the cascade of "Wisdom of Committees" (Wang et al., ICLR
2022) with the merged model as the cheap member and no second set of weights.

Two ways to pick the images that run again:

- ``fraction``: in every batch, the ``floor(fraction x B)`` images with the smallest margins.
  The mean cost per image is then at most ``fast + fraction x full`` on any data, but what
  one image gets depends on the rest of its batch (and a batch smaller than ``1 / fraction``
  never runs again).
- ``margin``: every image whose margin is below ``margin``. Each image gets what it gets
  alone, but the share that runs again, hence the cost, follows the data: images a model is
  less sure of (e.g. other than those it was trained on) run again more often.

The selection reads the data, so a cascade runs eagerly; ``torch.compile`` and export see
its two members (``cascade.fast``, ``cascade.full``), not the cascade.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .api import is_patched, patch, shared_copy
from .backends.adapter import adapter_for, input_placement, logits_of

__all__ = ["ConfidenceCascade", "top1_margin", "select_fallback", "cascade_gflops"]


def top1_margin(logits: torch.Tensor) -> torch.Tensor:
    """``[B, classes]`` logits -> ``[B]`` top-1 minus top-2 softmax probability (0: a tie,
    1: certain), in float32 at least."""
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"need logits [batch, classes >= 2], got shape {tuple(logits.shape)}")
    top = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=-1).topk(2, dim=-1).values
    return top[:, 0] - top[:, 1]


def select_fallback(margin: torch.Tensor, fraction: Optional[float] = None,
                    threshold: Optional[float] = None) -> torch.Tensor:
    """Which images run again: ``[B]`` margins -> ``[B]`` bool.

    Exactly one of ``fraction`` (the ``floor(fraction x B)`` smallest margins; ties go to the
    earlier image) and ``threshold`` (margins below it).
    """
    _check_choice(fraction, threshold)
    if threshold is not None:
        return margin < threshold
    count = math.floor(fraction * margin.shape[0])
    chosen = torch.zeros_like(margin, dtype=torch.bool)
    if count:
        chosen[margin.sort(stable=True).indices[:count]] = True
    return chosen


def cascade_gflops(fast_gflops: float, full_gflops: float, fallback_share: float) -> float:
    """Mean GFLOPs per image of a cascade whose fallback ran for ``fallback_share`` of them."""
    return fast_gflops + fallback_share * full_gflops


def _check_choice(fraction, threshold) -> None:
    if (fraction is None) == (threshold is None):
        raise ValueError("give exactly one of fraction= (share of each batch that runs again, e.g. 0.08) "
                         "or margin= (run again below this top-1 margin, e.g. 0.3)")
    if fraction is not None and (isinstance(fraction, bool) or not 0.0 <= fraction <= 1.0):
        raise ValueError(f"fraction must be a number in [0, 1], got {fraction!r}")
    if threshold is not None and (isinstance(threshold, bool) or not 0.0 <= threshold <= 1.0):
        raise ValueError(f"margin must be a number in [0, 1] (a difference of probabilities), got {threshold!r}")


class ConfidenceCascade(nn.Module):
    """``model`` merged for every image, and unmodified for those the merged pass is least
    sure of (module docstring).

    Args:
        model: an unpatched classifier (timm, Hugging Face or any model :func:`tokenmerge.patch`
            supports, returning logits or an output with ``.logits``). It is not changed: the
            merged member is a patched copy that shares its weights.
        fraction: share of each batch that runs again (the smallest margins).
        margin: run again every image whose top-1 margin is below this.
        **patch_kwargs: the merged member's configuration, as :func:`tokenmerge.patch` takes it
            (``method``, ``r``, options; a ``best.json`` as ``**json.load(f)``).

    ``forward(images)`` returns ``[B, classes]`` logits; ``last_fallback`` then holds the
    ``[B]`` bool mask of the images that ran again.
    """

    def __init__(self, model: nn.Module, *, fraction: Optional[float] = None, margin: Optional[float] = None,
                 **patch_kwargs):
        super().__init__()
        _check_choice(fraction, margin)
        if is_patched(model):
            raise ValueError("the cascade's fallback is the unmodified model: pass the model before patching "
                             "(tokenmerge.unpatch(model) restores it)")
        if not patch_kwargs.get("r") and not patch_kwargs.get("keep_ratio"):
            raise ValueError("the merged member merges nothing: give r= (e.g. r=16) or keep_ratio=")
        self.fraction, self.margin = fraction, margin
        self.full = model
        self.fast = patch(shared_copy(model), **patch_kwargs)
        self.fast.train(model.training)
        self.last_fallback: Optional[torch.Tensor] = None

    @classmethod
    def for_budget(cls, model: nn.Module, target_gflops: float, images: Optional[torch.Tensor] = None,
                   **patch_kwargs) -> "ConfidenceCascade":
        """The cascade by ``fraction`` whose mean counted GFLOPs per image is ``target_gflops``:
        the merged member's (``patch_kwargs``) plus ``fraction`` x the unmodified model's.

        A fixed member is counted at the model's input size
        (:func:`tokenmerge.evaluation.flops.count_gflops`). A per-image member (ATC with a
        ``threshold``) costs what its images need, so its mean is measured on ``images``
        (``[N, 3, H, W]``, e.g. the calibration images its thresholds came from), each image as
        it runs alone (:class:`tokenmerge.evaluation.thresholds.PerImageCost`).
        """
        from .evaluation.flops import count_gflops
        from .evaluation.sweep import evaluation_mode
        from .evaluation.thresholds import PerImageCost

        if isinstance(target_gflops, bool) or not isinstance(target_gflops, (int, float)) or not target_gflops > 0:
            raise ValueError(f"target_gflops must be a positive number, got {target_gflops!r}")
        cascade = cls(model, fraction=0.0, **patch_kwargs)
        device, dtype = input_placement(model)
        probe = torch.randn(1, 3, *adapter_for(model).input_size, device=device, dtype=dtype)
        with evaluation_mode(model):  # counting runs it in eval mode; the caller's mode comes back
            full = count_gflops(model, images=probe)
        if adapter_for(cascade.fast).reducer.per_image:
            if images is None:
                raise ValueError("a per-image member (a threshold) costs what its images need: pass images= "
                                 "(calibration images, e.g. those its thresholds were calibrated on)")
            options = {k: v for k, v in patch_kwargs.items() if k not in ("method", "r", "options")}
            config = {"method": patch_kwargs.get("method", "tome"), "r": patch_kwargs["r"],
                      "options": {**(patch_kwargs.get("options") or {}), **options}}
            fast = PerImageCost(model, config, images, base_gflops=full)()[0].mean().item()
        else:
            fast = count_gflops(cascade.fast, images=probe)
        if fast > target_gflops:
            raise ValueError(f"the merged member alone costs {fast:.3f} GFLOPs, over the budget of "
                             f"{target_gflops:.3f}: merge more (a larger r)")
        if target_gflops > fast + full:
            raise ValueError(f"a budget of {target_gflops:.3f} GFLOPs is more than the merged pass and the "
                             f"unmodified one together ({fast + full:.3f}): the unmodified model fits it")
        cascade.fraction = (target_gflops - fast) / full
        return cascade

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = logits_of(self.fast(images))
        again = select_fallback(top1_margin(logits), self.fraction, self.margin)
        self.last_fallback = again
        if bool(again.any()):
            logits = logits.clone()
            logits[again] = logits_of(self.full(images[again])).to(logits.dtype)
        return logits
