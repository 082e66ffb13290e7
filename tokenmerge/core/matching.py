"""Bipartite soft matching (ToMe, Bolya et al. 2023), as a pure function.

Partition. Tokens before ``num_protected`` are never merged. The others are split by the
parity of their absolute index: set A holds the even indices, set B the odd ones. With
one class token this is exactly ToMe's split (``a = x[::2]``, ``b = x[1::2]`` with the
class token masked out of A), so results match the published algorithm; with more
protected tokens (distillation, registers) it stays well defined and keeps every
protected token at the front.

Output order. ``[protected..., unmerged A (original order)..., B...]``, as in ToMe, so
the split parity of the next block is reproducible.
"""

from __future__ import annotations

import torch

from .merge import MergePlan

__all__ = [
    "bipartite_soft_matching",
    "bipartite_plan_from_scores",
    "bidirectional_plan_from_scores",
    "bipartite_similarity",
    "bipartite_max_reduction",
    "check_bipartite_reduction",
    "identity_plan",
    "shared_mlp_pairs",
    "split_parity",
]


def bipartite_max_reduction(num_tokens: int, num_protected: int) -> int:
    """At most half of the mergeable tokens can leave in one bipartite step."""
    return max(0, (num_tokens - num_protected) // 2)


def shared_mlp_pairs(num_tokens: int, num_protected: int, fraction: float) -> int:
    """Tokens paired for a shared MLP in a block of ``num_tokens`` tokens: ``fraction`` of the
    most one bipartite step can pair (half the mergeable tokens), rounded down."""
    return int(fraction * bipartite_max_reduction(num_tokens, num_protected))


def check_bipartite_reduction(what: str, num_tokens: int, num_protected: int, r: int) -> None:
    """Raise a clear error unless ``0 <= r <= bipartite_max_reduction(num_tokens, num_protected)``."""
    limit = bipartite_max_reduction(num_tokens, num_protected)
    if not 0 <= r <= limit:
        raise ValueError(
            f"{what} can remove 0..{limit} of {num_tokens} tokens ({num_protected} protected), asked for r={r}"
        )


def identity_plan(batch: int, num_tokens: int, device=None) -> MergePlan:
    """The plan that keeps every token where it is."""
    return MergePlan(torch.arange(num_tokens, device=device).expand(batch, num_tokens), num_tokens)


def split_parity(num_protected: int) -> tuple:
    """First absolute index of set A and of set B."""
    a0 = num_protected + (num_protected % 2)
    b0 = num_protected + 1 - (num_protected % 2)
    return a0, b0


def bipartite_soft_matching(metric: torch.Tensor, r: int, num_protected: int = 1) -> MergePlan:
    """Plan ToMe's merge of ``r`` tokens.

    Each A-token proposes its most similar B-token (cosine similarity of ``metric``); the
    ``r`` strongest proposals are merged, the rest of A is kept.

    Args:
        metric: ``[B, N, D]`` per-token features to compare (ToMe: keys averaged over heads).
        r: tokens to remove, ``0 <= r <= bipartite_max_reduction(N, num_protected)``.
        num_protected: leading tokens that are never merged.

    Returns:
        A :class:`~tokenmerge.core.merge.MergePlan` with ``num_out = N - r``.
    """
    B, N, _ = metric.shape
    check_bipartite_reduction("bipartite matching", N, num_protected, r)
    if r == 0:  # as in ToMe, no merge leaves the order alone
        return identity_plan(B, N, metric.device)
    with torch.no_grad():
        return bipartite_plan_from_scores(bipartite_similarity(metric, num_protected), r, num_protected)


def bipartite_similarity(metric: torch.Tensor, num_protected: int) -> torch.Tensor:
    """``[B, N, D]`` -> ``[B, Na, Nb]`` cosine similarity between set A and set B
    (:func:`split_parity`)."""
    a0, b0 = split_parity(num_protected)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    return metric[:, a0::2] @ metric[:, b0::2].transpose(-1, -2)


def bipartite_plan_from_scores(scores: torch.Tensor, r: int, num_protected: int) -> MergePlan:
    """ToMe's merge plan from any edge scores between set A and set B (higher = merge first).

    Each A-token proposes the B-token it scores highest; the ``r`` highest proposals merge.
    Shared by ToMe (cosine similarity of keys) and MCTF (multi-criteria edge weights).

    Args:
        scores: ``[B, Na, Nb]`` edge scores, A = even and B = odd mergeable positions
            (:func:`split_parity`), in token order.
        r: tokens to remove, ``1 <= r <= Na``.
        num_protected: leading tokens that are never merged.

    Returns:
        A :class:`~tokenmerge.core.merge.MergePlan` over ``N = num_protected + Na + Nb``
        tokens with ``num_out = N - r``, in the order ``[protected, kept A, B]``.
    """
    B, num_a, num_b = scores.shape
    N = num_protected + num_a + num_b
    device = scores.device
    a0, b0 = split_parity(num_protected)
    with torch.no_grad():
        node_max, node_idx = scores.max(dim=-1)
        edge_order = node_max.argsort(dim=-1, descending=True)
        src = edge_order[:, :r]  # positions in A that merge
        unm = edge_order[:, r:].sort(dim=-1).values  # positions in A that stay, in order
        dst = node_idx.gather(1, src)  # their partners' positions in B

        num_kept_a = num_a - r
        b_base = num_protected + num_kept_a
        assign_a = torch.empty(B, num_a, dtype=torch.long, device=device)
        kept_slots = torch.arange(num_protected, b_base, device=device).expand(B, -1)
        assign_a.scatter_(1, unm, kept_slots)
        assign_a.scatter_(1, src, dst + b_base)
        assign_b = torch.arange(b_base, b_base + num_b, device=device).expand(B, -1)

        assign = torch.empty(B, N, dtype=torch.long, device=device)
        assign[:, :num_protected] = torch.arange(num_protected, device=device)
        assign[:, a0::2] = assign_a
        assign[:, b0::2] = assign_b
    return MergePlan(assign, N - r)


def bidirectional_plan_from_scores(scores: torch.Tensor, r: int, num_protected: int) -> MergePlan:
    """MCTF's bidirectional bipartite matching from edge scores between set A and set B.

    Two steps, each ToMe's matching in one direction: ``r1 = r // 2`` A-tokens merge into
    their best B-tokens, then ``r2 = r - r1`` B-tokens (merged ones included) merge into
    their best *kept* A-tokens, scored by the same edges. In one direction, a token of B can
    only absorb others; both directions let either side of a similar pair leave, so the
    ``r`` merges come from the strongest edges of both sets. Merging twice by size-weighted
    averages equals one size-weighted average over each final group, so the two steps are
    returned as one composed plan.

    Args:
        scores: ``[B, Na, Nb]`` edge scores as in :func:`bipartite_plan_from_scores`.
        r: tokens to remove, ``1 <= r <= min(Na, Nb)``.
        num_protected: leading tokens that are never merged.

    Returns:
        A :class:`~tokenmerge.core.merge.MergePlan` over ``N = num_protected + Na + Nb``
        tokens with ``num_out = N - r``, in the order ``[protected, kept A, kept B]``.
    """
    B, num_a, num_b = scores.shape
    N = num_protected + num_a + num_b
    device = scores.device
    a0, b0 = split_parity(num_protected)
    r1 = r // 2
    r2 = r - r1
    with torch.no_grad():
        node_max, node_idx = scores.max(dim=-1)
        edge_order = node_max.argsort(dim=-1, descending=True)
        src_a = edge_order[:, :r1]  # positions in A that merge into B
        kept_a = edge_order[:, r1:].sort(dim=-1).values  # positions in A that stay, in order
        dst_b = node_idx.gather(1, src_a)

        # B -> kept A, on the same edges.
        back = scores.gather(1, kept_a.unsqueeze(-1).expand(-1, -1, num_b)).transpose(1, 2)  # [B, Nb, Na - r1]
        node_max_b, node_idx_b = back.max(dim=-1)
        edge_order_b = node_max_b.argsort(dim=-1, descending=True)
        src_b = edge_order_b[:, :r2]  # positions in B that merge into kept A
        kept_b = edge_order_b[:, r2:].sort(dim=-1).values

        num_kept_a = num_a - r1
        b_base = num_protected + num_kept_a
        slot_a = torch.empty(B, num_a, dtype=torch.long, device=device)
        slot_a.scatter_(1, kept_a, torch.arange(num_protected, b_base, device=device).expand(B, -1))
        slot_b = torch.empty(B, num_b, dtype=torch.long, device=device)
        slot_b.scatter_(1, kept_b, torch.arange(b_base, N - r, device=device).expand(B, -1))
        # A merged B-token goes where its kept-A partner goes ...
        slot_b.scatter_(1, src_b, slot_a.gather(1, kept_a.gather(1, node_idx_b.gather(1, src_b))))
        # ... and so does an A-token merged into it in the first step.
        slot_a.scatter_(1, src_a, slot_b.gather(1, dst_b))

        assign = torch.empty(B, N, dtype=torch.long, device=device)
        assign[:, :num_protected] = torch.arange(num_protected, device=device)
        assign[:, a0::2] = slot_a
        assign[:, b0::2] = slot_b
    return MergePlan(assign, N - r)
