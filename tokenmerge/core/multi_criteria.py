"""MCTF's multi-criteria edge weights for bipartite matching, as pure functions.

MCTF (Lee et al., "Multi-criteria Token Fusion with One-step-ahead Attention for
Efficient Vision Transformers", CVPR 2024), in its training-free, single-direction form:
ToMe's A/B split (:func:`~tokenmerge.core.matching.split_parity`), but the weight of the
edge between ``a`` in A and ``b`` in B is the product of three criteria, each sharpened or
flattened by a temperature:

- similarity ``((cos(m_a, m_b) + 1) / 2) ** (1 / tau_sim)``;
- informativeness ``(w_a * w_b) ** (1 / tau_info)`` with ``w_i = 1 / received_i``
  normalised to a maximum of 1 over the mergeable tokens, ``received_i`` being the
  attention token ``i`` receives (mean over heads and queries): tokens that few attend to
  merge first;
- size ``(s_a * s_b) ** (1 / tau_size)`` with ``s_i = 1 / size_i`` normalised likewise:
  small tokens merge first, so no token grows into a giant.

Then, as in ToMe, every A-token proposes its highest-weight B-token and the ``r`` highest
proposals merge; or, with ``bidirectional=True`` (the official code's evaluation setting),
half of ``r`` merges A into B and the rest B into the kept A
(:func:`~tokenmerge.core.matching.bidirectional_plan_from_scores`). With
``fusion="attention"`` (the official code's ``pooling_type=1``), a merged token is the
average of its members weighted by size x attention received, so the tokens the others
attend to dominate the fused feature; ``"size"`` is ToMe's size-weighted average. Left
out (documented, not silently approximated): the "one-step-ahead" attention, which reuses
this block's merged attention map as the next block's informativeness instead of the
next block's own attention.
"""

from __future__ import annotations

from typing import Optional

import torch

from .matching import (
    bidirectional_plan_from_scores,
    bipartite_plan_from_scores,
    bipartite_similarity,
    check_bipartite_reduction,
    identity_plan,
    split_parity,
)
from .merge import MergePlan

__all__ = ["FUSIONS", "inverse_normalised", "multi_criteria_scores", "multi_criteria_matching"]

FUSIONS = ("size", "attention")


def inverse_normalised(value: torch.Tensor) -> torch.Tensor:
    """``[B, M]`` positive values -> ``1 / value`` divided by its per-image maximum (in (0, 1])."""
    inverse = 1.0 / value.clamp_min(torch.finfo(value.dtype).tiny)
    return inverse / inverse.amax(dim=-1, keepdim=True)


def multi_criteria_scores(
    metric: torch.Tensor,
    received: torch.Tensor,
    size: Optional[torch.Tensor],
    num_protected: int,
    tau_sim: float = 1.0,
    tau_info: float = 20.0,
    tau_size: float = 40.0,
) -> torch.Tensor:
    """MCTF edge weights between set A and set B.

    Args:
        metric: ``[B, N, D]`` per-token features (keys averaged over heads).
        received: ``[B, N]`` attention each token receives (any positive scale).
        size: ``[B, N, 1]`` patches per token, or ``None`` for all ones.
        num_protected: leading tokens that are never merged.
        tau_sim, tau_info, tau_size: the criteria's temperatures (> 0).

    Returns:
        ``[B, Na, Nb]`` edge weights, A/B as in :func:`~tokenmerge.core.matching.split_parity`.
    """
    weight = ((bipartite_similarity(metric, num_protected) + 1.0) / 2.0).clamp_min(0.0) ** (1.0 / tau_sim)
    weight = weight * _pair_factor(received, num_protected, tau_info, weight.dtype)
    if size is not None:
        weight = weight * _pair_factor(size[..., 0], num_protected, tau_size, weight.dtype)
    return weight


def _pair_factor(value: torch.Tensor, num_protected: int, tau: float, dtype) -> torch.Tensor:
    """``[B, N]`` per-token values -> ``[B, Na, Nb]`` factor ``(v'_a * v'_b) ** (1 / tau)`` with
    ``v'`` = :func:`inverse_normalised` over the mergeable tokens."""
    a0, b0 = split_parity(num_protected)
    factor = inverse_normalised(value[:, num_protected:].to(dtype)) ** (1.0 / tau)
    factor = torch.cat([factor.new_ones(factor.shape[0], num_protected), factor], dim=1)
    return factor[:, a0::2, None] * factor[:, None, b0::2]


def multi_criteria_matching(
    metric: torch.Tensor,
    received: torch.Tensor,
    size: Optional[torch.Tensor],
    r: int,
    num_protected: int = 1,
    tau_sim: float = 1.0,
    tau_info: float = 20.0,
    tau_size: float = 40.0,
    bidirectional: bool = False,
    fusion: str = "size",
) -> MergePlan:
    """Plan MCTF's merge of ``r`` tokens (see the module docstring; arguments as in
    :func:`multi_criteria_scores`, plus ``bidirectional`` and ``fusion``).

    Returns:
        A :class:`~tokenmerge.core.merge.MergePlan` with ``num_out = N - r``; with
        ``fusion="attention"`` its ``weight`` is ``size * received`` (``[B, N, 1]``,
        ``received`` scaled to a maximum of 1 per image, in float32 at least).
    """
    B, N, _ = metric.shape
    check_bipartite_reduction("MCTF", N, num_protected, r)
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
    if r == 0:
        return identity_plan(B, N, metric.device)
    with torch.no_grad():
        scores = multi_criteria_scores(metric, received, size, num_protected, tau_sim, tau_info, tau_size)
        make_plan = bidirectional_plan_from_scores if bidirectional else bipartite_plan_from_scores
        plan = make_plan(scores, r, num_protected)
        if fusion == "attention":
            # Scaled to a maximum of 1 per image (the average is unchanged) and kept in float32
            # at least, so the attention a token receives, often ~1/N or less, stays far from
            # underflow in half precision.
            weight = received.to(torch.promote_types(metric.dtype, torch.float32))
            weight = (weight / weight.amax(dim=-1, keepdim=True)).unsqueeze(-1)
            if size is not None:
                weight = weight * size.to(weight.dtype)
            plan = plan._replace(weight=weight)
        return plan
