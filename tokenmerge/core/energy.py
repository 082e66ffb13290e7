"""PiToMe's energy score and its protect-then-match plan, as pure functions.

PiToMe (Tran et al., "Accelerating Transformers with Spectrum-Preserving Token Merging",
NeurIPS 2024). Before matching, every mergeable token gets an *energy*

    E_i = mean_j ELU(cos(m_i, m_j) - margin, alpha)

over the mergeable tokens ``j`` (itself included), ``m`` being the merge metric (the keys
averaged over heads, as in ToMe). A token with high energy sits in a large cluster of
similar tokens, so merging it loses little; a token with low energy is isolated, i.e.
informative, and is protected. The ``2r`` highest-energy tokens are the merge candidates,
sorted by energy (descending, ties to the earlier token); they alternate into A (even
positions of that order) and B (odd positions), and every A-token merges into its most
similar B-token. All ``r`` A-tokens merge, so exactly ``r`` tokens leave. Kept tokens keep
their original relative order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .matching import check_bipartite_reduction, identity_plan
from .merge import MergePlan
from .ops import stable_argsort_descending

__all__ = ["energy_score", "energy_matching", "plan_from_pairs"]


def energy_score(similarity: torch.Tensor, margin: float = 0.5, alpha: float = 1.0) -> torch.Tensor:
    """PiToMe's energy of each token.

    Args:
        similarity: ``[B, M, M]`` cosine similarities between the mergeable tokens.
        margin: similarities above it count as "same cluster" (positive contribution).
        alpha: ELU's negative saturation (how much dissimilar tokens lower the energy).

    Returns:
        ``[B, M]``: ``mean_j ELU(similarity[:, i, j] - margin, alpha)``.
    """
    return F.elu(similarity - margin, alpha=alpha).mean(dim=-1)


def plan_from_pairs(src: torch.Tensor, dst: torch.Tensor, num_tokens: int) -> MergePlan:
    """The plan that merges token ``src[b, i]`` into token ``dst[b, i]`` (absolute indices)
    and keeps every other token, in its original order.

    Args:
        src: ``[B, r]`` tokens that leave (distinct, never a ``dst``).
        dst: ``[B, r]`` the tokens they merge into.
        num_tokens: ``N``.

    Returns:
        :class:`~tokenmerge.core.merge.MergePlan` with ``num_out = N - r``.
    """
    B, r = src.shape
    # A tensor of zeros, not the scalar False: the ONNX exporter cannot scatter a Python scalar.
    kept = src.new_ones(B, num_tokens).scatter(1, src, src.new_zeros(B, r))
    slot = kept.cumsum(dim=1) - 1  # output slot of each kept token
    assign = slot.scatter(1, src, slot.gather(1, dst))
    return MergePlan(assign, num_tokens - r)


def energy_matching(
    metric: torch.Tensor,
    r: int,
    num_protected: int = 1,
    margin: float = 0.5,
    alpha: float = 1.0,
) -> MergePlan:
    """Plan PiToMe's merge of ``r`` tokens (see the module docstring).

    Args:
        metric: ``[B, N, D]`` per-token features (keys averaged over heads).
        r: tokens to remove, ``0 <= r <= bipartite_max_reduction(N, num_protected)``.
        num_protected: leading tokens that are never merged.
        margin, alpha: of :func:`energy_score`.

    Returns:
        A :class:`~tokenmerge.core.merge.MergePlan` with ``num_out = N - r``.
    """
    B, N, _ = metric.shape
    check_bipartite_reduction("PiToMe", N, num_protected, r)
    if r == 0:
        return identity_plan(B, N, metric.device)
    with torch.no_grad():
        metric = metric[:, num_protected:]
        metric = metric / metric.norm(dim=-1, keepdim=True)
        similarity = metric @ metric.transpose(-1, -2)  # [B, M, M]
        energy = energy_score(similarity, margin, alpha)
        order = stable_argsort_descending(energy)[:, : 2 * r]
        a, b = order[:, 0::2], order[:, 1::2]  # [B, r] each
        a_to_b = similarity.gather(1, a.unsqueeze(-1).expand(B, r, similarity.shape[2]))
        a_to_b = a_to_b.gather(2, b.unsqueeze(1).expand(B, r, r))  # [B, r, r]
        dst = b.gather(1, a_to_b.argmax(dim=-1))
        return plan_from_pairs(a + num_protected, dst + num_protected, N)
