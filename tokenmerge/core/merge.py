"""Size-weighted token merging, source tracking and unmerging.

Every reduction method in tokenmerge ends in the same representation, a :class:`MergePlan`:
an *assignment* ``assign[b, i]`` that sends input token ``i`` to output slot ``assign[b, i]``.
Several tokens sent to one slot are averaged, weighted by their sizes (how many input
patches each stands for). A slot index equal to ``num_out`` is a discard slot: tokens sent
there are pruned without being fused into anything.

This one form covers bipartite matching (ToMe, DTEM), select-and-fuse (TC-ViT, EViT),
pruning and random merging, and it composes: the patches behind each output token are
found by chaining assignments (:func:`track_sources`), so source tracking is an index map
of ``[B, num_patches]`` rather than an ``N x N`` matrix per image.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .ops import add_rows

__all__ = [
    "MergePlan",
    "merge_tokens",
    "merge_positions",
    "track_sources",
    "initial_sources",
    "unmerge_tokens",
    "keep_first",
]


class MergePlan(NamedTuple):
    """Where each input token goes.

    Attributes:
        assign: ``[B, N]`` int64, values in ``[0, num_out]``; ``num_out`` means "discard".
        num_out: number of output tokens (a Python int, so shapes stay static).
        weight: ``[B, N, 1]`` positive fusion weight of each input token, or ``None``
            (default) to average by size. A merged token is then ``sum(w x) / sum(w)``;
            its size is still the summed size (MCTF's attention-weighted fusion).
    """

    assign: torch.Tensor
    num_out: int
    weight: Optional[torch.Tensor] = None


def merge_tokens(
    x: torch.Tensor, size: Optional[torch.Tensor], plan: MergePlan, keep_norm: bool = False
) -> tuple:
    """Apply a plan with size-weighted averaging, in one scatter pass.

    The size travels as an extra channel beside ``x * size``, so tokens and sizes are
    merged by the same ``index_add``; the average is the sum divided by the summed size.

    Args:
        x: ``[B, N, C]`` tokens.
        size: ``[B, N, 1]`` patches per token, or ``None`` for all ones.
        plan: a :class:`MergePlan` over the ``N`` tokens (with ``plan.weight``, tokens are
            averaged by that weight instead of their size).
        keep_norm: rescale each merged token to the weighted mean of its members' norms
            (the weights of the average). An average of vectors that point different ways is
            shorter than they are, so plain averaging shrinks merged tokens and shifts the
            residual stream's norm distribution; keeping the norm is the idea of ToFu's MLERP
            merge (Kim et al., "Token Fusion: Bridging the Gap between Token Pruning and Token
            Merging", WACV 2024), here with the mean norm where MLERP takes the largest.
            A token merged with nothing is unchanged (up to rounding).

    Returns:
        ``(x_out [B, num_out, C], size_out [B, num_out, 1])``. A slot that receives no token
        gets size 0 and value 0 (plans made by tokenmerge never leave one empty).
    """
    B, N, C = x.shape
    num_out = plan.num_out
    if size is None:
        size = x.new_ones(B, N, 1)
    result_dtype = torch.promote_types(x.dtype, size.dtype)
    # Sums of many weighted tokens overflow half precision (float16 tops out at 65504) and
    # small fusion weights underflow it, where their average would be fine: accumulate in
    # float32 at least, return in the inputs' dtype.
    work = torch.promote_types(result_dtype, torch.float32)
    x, size = x.to(work), size.to(work)
    # The size counts patches; the weight averages (the size itself unless the plan has one,
    # as MCTF's attention fusion does).
    weight = size if plan.weight is None else plan.weight.to(work)
    channels = [x * weight, weight]
    if keep_norm:
        channels.append(weight * x.norm(dim=-1, keepdim=True))
    if plan.weight is not None:
        channels.append(size)
    weighted = torch.cat(channels, dim=-1)  # [B, N, C + 1..3]
    width = weighted.shape[-1]
    # Flatten the batch so one index_add covers every image; row num_out of each image is
    # the discard slot.
    offsets = torch.arange(B, device=x.device).unsqueeze(1) * (num_out + 1)
    index = (plan.assign + offsets).reshape(-1)
    out = add_rows(weighted.new_zeros(B * (num_out + 1), width), index, weighted.reshape(B * N, width))
    out = out.view(B, num_out + 1, width)[:, :num_out]
    size_out = out[..., C:C + 1] if plan.weight is None else out[..., width - 1:]
    tiny = torch.finfo(out.dtype).tiny
    total_weight = out[..., C:C + 1].clamp_min(tiny)
    x_out = out[..., :C] / total_weight
    if keep_norm:
        mean_norm = out[..., C + 1:C + 2] / total_weight
        x_out = x_out * (mean_norm / x_out.norm(dim=-1, keepdim=True).clamp_min(tiny))
    return x_out.to(result_dtype), size_out.to(result_dtype)


def merge_positions(
    pos: torch.Tensor, size: Optional[torch.Tensor], plan: MergePlan
) -> torch.Tensor:
    """Apply a plan to token coordinates: each merged token sits at its members' size-weighted
    mean position (the rule :func:`merge_tokens` applies to the features).

    The average runs in ``pos``'s dtype (float32) whatever the features' dtype: a bfloat16
    coordinate would be off by up to a quarter of a patch at position 64.

    Args:
        pos: ``[B, N, K]`` coordinates.
        size: ``[B, N, 1]`` patches per token, or ``None`` for all ones.
        plan: a :class:`MergePlan` over the ``N`` tokens.

    Returns:
        ``[B, num_out, K]``.
    """
    # A fusion weight (MCTF's attention fusion) shapes the features, not where the patches are.
    return merge_tokens(pos, None if size is None else size.to(pos.dtype), plan._replace(weight=None))[0]


def initial_sources(batch: int, num_tokens: int, num_protected: int, device=None) -> torch.Tensor:
    """``[B, num_tokens - num_protected]``: patch ``p`` starts in token ``num_protected + p``."""
    patches = torch.arange(num_protected, num_tokens, device=device)
    return patches.unsqueeze(0).expand(batch, -1).contiguous()


def track_sources(source: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    """Compose a source map with one more merge step.

    Args:
        source: ``[B, P]`` the token each input patch currently belongs to.
        plan: the plan applied to those tokens.

    Returns:
        ``[B, P]`` the output token each patch belongs to; ``plan.num_out`` for a patch
        whose token was discarded.
    """
    # A patch already discarded (index num_in) stays discarded: the discard slot gets an entry.
    assign = torch.cat(
        [plan.assign, plan.assign.new_full((plan.assign.shape[0], 1), plan.num_out)], dim=1
    )
    return assign.gather(1, source)


def unmerge_tokens(
    x: torch.Tensor, source: torch.Tensor, fill: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Copy each merged token back to every patch it covers.

    Args:
        x: ``[B, M, C]`` merged tokens.
        source: ``[B, P]`` token index per patch (from :func:`track_sources`); an index of
            ``M`` or more marks a discarded patch.
        fill: ``[C]`` or ``[B, C]`` value for discarded patches (default zeros).

    Returns:
        ``[B, P, C]``.
    """
    B, M, C = x.shape
    if fill is None:
        fill = x.new_zeros(B, 1, C)
    else:
        fill = fill.to(x.dtype).reshape(-1, 1, C).expand(B, 1, C)
    padded = torch.cat([x, fill], dim=1)
    index = source.clamp_max(M).unsqueeze(-1).expand(-1, -1, C)
    return padded.gather(1, index)


def keep_first(num_tokens: int, num_out: int, batch: int, device=None) -> MergePlan:
    """The plan that keeps the first ``num_out`` tokens and discards the rest."""
    assign = torch.arange(num_tokens, device=device).clamp_max(num_out)
    return MergePlan(assign.unsqueeze(0).expand(batch, -1), num_out)
