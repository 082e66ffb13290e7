"""Which patches ended up in which token: the ToMe-paper figure.

A model patched with ``trace_source=True`` returns, per image, the compact source map
``source[p]`` = the index of the token that covers patch ``p`` (an index ``>=`` the number
of tokens means the patch was discarded). Every group of patches sharing a token is filled
with its mean colour and outlined, over the image.

To stop at an earlier block ``K`` we re-patch a copy with the model's own resolved schedule
cut after block ``K`` (zeros afterwards): blocks with ``r = 0`` merge nothing, so the source
map leaving the last block is the one after block ``K``, computed with public API only.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
from torch import nn

from ..backends.adapter import adapter_for
from ..core.schedule import ScheduleClampedWarning

__all__ = ["MergeGroups", "merge_groups", "group_image", "load_display_image", "visualize_merging"]


class MergeGroups(NamedTuple):
    """The source map of one image after a block.

    Attributes:
        source: ``[gh, gw]`` int64, the token index covering each patch.
        num_tokens: tokens after the block (protected ones included); ``source >= num_tokens``
            marks discarded patches.
        block: blocks run (1-based; the model's block count = the last).
        tokens_in: tokens entering the first block.
    """

    source: torch.Tensor
    num_tokens: int
    block: int
    tokens_in: int


def _truncated_copy(model: nn.Module, block: int) -> nn.Module:
    """A copy of a patched ``model`` that merges as ``model`` does up to ``block`` and not after,
    tracing sources."""
    import tokenmerge

    adapter = adapter_for(model)
    schedule = list(adapter.schedule())
    cut = schedule[:block] + [0] * (len(schedule) - block)
    config = adapter.config
    clone = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ScheduleClampedWarning)
        return tokenmerge.patch(clone, method=adapter_for(clone).reducer, r=cut, trace_source=True,
                                attention_impl=config.attention_impl, num_protected=config.num_protected)


@torch.inference_mode()
def merge_groups(model: nn.Module, image: torch.Tensor, block: Optional[int] = None) -> MergeGroups:
    """Source map of one normalised ``image [3, H, W]`` after ``block`` (default: the last).

    ``model`` must be patched (:func:`tokenmerge.patch`); it is not modified.
    """
    adapter = adapter_for(model)
    adapter.require_patched()
    depth = adapter.num_blocks
    block = depth if block is None else int(block)
    if not 1 <= block <= depth:
        raise ValueError(f"--block must lie in 1..{depth} (the model has {depth} blocks), got {block}")
    traced = adapter_for(_truncated_copy(model, block).eval())
    state, _ = traced.final_state(image.unsqueeze(0).to(next(traced.model.parameters()).device))
    grid = traced.grid(*image.shape[-2:])
    counts = traced.tokens_per_block(traced.num_prefix_tokens + grid[0] * grid[1])
    return MergeGroups(state.source[0].reshape(grid).cpu(), int(state.x.shape[1]), block, counts[0])


def group_image(image: np.ndarray, source: np.ndarray, num_tokens: int,
                border=(1.0, 1.0, 1.0), discarded=(0.12, 0.12, 0.12)) -> np.ndarray:
    """Fill every group of patches with its mean colour and outline the groups.

    Args:
        image: ``[H, W, 3]`` float RGB in ``[0, 1]``.
        source: ``[gh, gw]`` token index per patch (``H`` and ``W`` multiples of ``gh``, ``gw``).
        num_tokens: indices ``>= num_tokens`` are discarded patches (drawn in ``discarded``).

    Returns:
        ``[H, W, 3]`` float RGB.
    """
    height, width, _ = image.shape
    gh, gw = source.shape
    if height % gh or width % gw:
        raise ValueError(f"image {height}x{width} is not a whole number of {gh}x{gw} patches")
    # Token id of every pixel.
    pixels = np.repeat(np.repeat(source, height // gh, axis=0), width // gw, axis=1)
    ids = pixels.reshape(-1)
    flat = image.reshape(-1, 3)
    count = np.bincount(ids, minlength=ids.max() + 1).astype(np.float64)
    means = np.stack([np.bincount(ids, weights=flat[:, c], minlength=len(count)) for c in range(3)], axis=1)
    means /= np.maximum(count, 1)[:, None]
    means[num_tokens:] = discarded
    out = means[pixels]
    # A pixel lies on a border when its right or lower neighbour belongs to another token.
    edge = np.zeros((height, width), dtype=bool)
    edge[:, :-1] |= pixels[:, :-1] != pixels[:, 1:]
    edge[:-1, :] |= pixels[:-1, :] != pixels[1:, :]
    out[edge] = border
    return out.astype(np.float32)


def load_display_image(path, image_size: int = 224):
    """``(display [H, W, 3] float in [0, 1], normalised model input [3, H, W])`` of one image
    file, resized and centre-cropped as for evaluation."""
    from torchvision import transforms

    from .data import IMAGENET_MEAN, IMAGENET_STD, _checked_loader

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} does not exist")
    picture = _checked_loader(str(path))
    tensor = transforms.Compose([
        transforms.Resize(image_size), transforms.CenterCrop(image_size), transforms.ToTensor(),
    ])(picture)
    normalised = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)(tensor)
    return tensor.permute(1, 2, 0).numpy(), normalised


def visualize_merging(model: nn.Module, image_path, block: Optional[int] = None, title: Optional[str] = None):
    """A matplotlib ``Figure``: the image beside its merge groups after ``block``.

    Returns ``(figure, MergeGroups)``.
    """
    from matplotlib.figure import Figure

    adapter = adapter_for(model)
    display, normalised = load_display_image(image_path, adapter.image_size)
    groups = merge_groups(model, normalised, block)
    drawn = group_image(display, groups.source.numpy(), groups.num_tokens)
    figure = Figure(figsize=(8.4, 4.6), layout="constrained")
    left, right = figure.subplots(1, 2)
    left.imshow(display)
    left.set_title(f"input: {groups.source.numel()} patches")
    right.imshow(drawn)
    right.set_title(f"after block {groups.block}/{adapter.num_blocks}: {groups.num_tokens} tokens")
    for ax in (left, right):
        ax.set_axis_off()
    if title:
        figure.suptitle(title)
    return figure, groups
