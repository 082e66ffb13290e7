"""Token relevance from attention (TC-ViT) and the select-and-fuse plan, as pure functions.

TC-ViT scores every token after a block's attention and keeps the most relevant ones
as *representatives*; every other token is fused into the representative it is most
connected to. All scores come from the attention the block just computed, but fused
attention kernels never return its probabilities, so they are recomputed here from the
queries and keys, a few query rows at a time: no ``[B, H, N, N]`` tensor is ever held
(at most ``[B, H, chunk_size, N]``), and the block's own output stays on the fused kernel.

Notation. ``A`` is the attention matrix averaged over heads, ``[B, N, N]``, row ``i`` being
what query ``i`` attends to; each row sums to 1. Scores include the proportional-attention
bias ``log_size`` when one was used, so they describe the attention the block really ran.

Normalisation (the exact convention):

- **dominance** ``d = A[:, 0, :]``: the class token's attention row, a distribution over
  all ``N`` tokens (it sums to 1).
- **connectivity of order k** ``c_k = (A^T)^k 1 / N``: ``c_1[j]`` is the attention flowing
  into token ``j`` (the column sum of ``A``), divided by ``N``; each further order moves
  that mass one more step back along the attention edges, so ``c_k[j]`` sums the
  attention along every path of length ``k`` that ends in ``j``. Because every row of
  ``A`` sums to 1, ``A^T`` preserves total mass and every ``c_k`` also sums to 1 over all
  ``N`` tokens: dominance and connectivity live on the same scale at any order.
- **relevance** ``w * d' + (1 - w) * c_k'``, where ``'`` restricts a score to the
  candidate (non-protected) tokens and renormalises it to sum 1 there. Protected tokens
  (class, distillation, register tokens) are in the attention graph but are never
  candidates, and the class token's attention to itself would otherwise shrink the
  dominance share. ``w = 1`` is pure class-attention pruning order, ``w = 0`` pure
  connectivity.

Fusion target. A non-representative token ``i`` is fused into the representative ``j``
that maximises ``A[i, j]``: the one its own query attends to most (first-order, as in
TC-ViT's matching; heads averaged after each head's softmax over all ``N`` keys).
"""

from __future__ import annotations

import numbers
from typing import Optional

import torch

from .merge import MergePlan
from .ops import stable_argsort_descending

__all__ = [
    "mean_attention_rows",
    "dominance",
    "attention_transpose_matvec",
    "connectivity",
    "token_relevance",
    "select_representatives",
    "most_connected_representative",
    "select_and_fuse_plan",
    "select_and_fuse",
    "check_chunk_size",
    "DEFAULT_CHUNK_SIZE",
]

DEFAULT_CHUNK_SIZE = 64


def check_chunk_size(chunk_size) -> int:
    """Validate a query-chunk size (a positive int) and return it."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(
            f"chunk_size must be a positive int (query rows scored at once), got {chunk_size!r}"
        )
    return int(chunk_size)


def mean_attention_rows(
    q_rows: torch.Tensor,
    k: torch.Tensor,
    log_size: Optional[torch.Tensor],
    scale: float,
) -> torch.Tensor:
    """Head-averaged attention probabilities for some query rows.

    Args:
        q_rows: ``[B, H, M, D]`` queries (any subset of rows).
        k: ``[B, H, N, D]`` all keys.
        log_size: ``[B, N]`` additive per-key bias, or ``None``.
        scale: softmax scale.

    Returns:
        ``[B, M, N]`` in float32 (float64 for float64 inputs); each row sums to 1.
    """
    # At least float32: scores from half-precision models would lose the small entries
    # that connectivity sums up.
    logits = q_rows @ k.transpose(-1, -2)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) * scale
    if log_size is not None:
        logits = logits + log_size.to(logits.dtype)[:, None, None, :]
    return logits.softmax(dim=-1).mean(dim=1)


def dominance(
    q: torch.Tensor,
    k: torch.Tensor,
    log_size: Optional[torch.Tensor],
    scale: float,
    class_index: int = 0,
) -> torch.Tensor:
    """The class token's head-averaged attention row (one ``[1, N]`` product per head).

    Args:
        q, k: ``[B, H, N, D]``.
        log_size: ``[B, N]`` or ``None``.
        scale: softmax scale.
        class_index: position of the class token.

    Returns:
        ``[B, N]`` float32 or wider, summing to 1 over the ``N`` tokens.
    """
    q_class = q[:, :, class_index : class_index + 1]
    return mean_attention_rows(q_class, k, log_size, scale).squeeze(1)


def attention_transpose_matvec(
    q: torch.Tensor,
    k: torch.Tensor,
    log_size: Optional[torch.Tensor],
    scale: float,
    u: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """``A^T u`` with ``A`` the head-averaged attention, built ``chunk_size`` query rows at a time.

    ``(A^T u)[j] = sum_i u[i] A[i, j]``: each chunk of rows contributes its own weighted
    column sums, so only ``[B, H, chunk_size, N]`` scores exist at once.

    Args:
        q, k: ``[B, H, N, D]``.
        log_size: ``[B, N]`` or ``None``.
        scale: softmax scale.
        u: ``[B, N]`` weight per query row.
        chunk_size: query rows per chunk.

    Returns:
        ``[B, N]`` float32 or wider.
    """
    num_tokens = q.shape[2]
    u = u.to(torch.promote_types(q.dtype, torch.float32))
    out = u.new_zeros(u.shape)
    for start in range(0, num_tokens, chunk_size):
        stop = min(start + chunk_size, num_tokens)
        rows = mean_attention_rows(q[:, :, start:stop], k, log_size, scale)  # [B, c, N]
        out = out + torch.bmm(u[:, None, start:stop], rows).squeeze(1)
    return out


def connectivity(
    q: torch.Tensor,
    k: torch.Tensor,
    log_size: Optional[torch.Tensor],
    scale: float,
    order: int = 1,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Connectivity of order ``order``: ``(A^T)^order 1 / N``.

    Each order is one chunked pass over the queries (the scores are recomputed rather
    than stored, so memory stays at one chunk; the cost is ``order`` times one
    ``Q K^T``).

    Args:
        q, k: ``[B, H, N, D]``.
        log_size: ``[B, N]`` or ``None``.
        scale: softmax scale.
        order: path length ``K >= 1``.
        chunk_size: query rows per chunk.

    Returns:
        ``[B, N]`` float32 or wider, summing to 1 over the ``N`` tokens.
    """
    B, _, N, _ = q.shape
    u = q.new_full((B, N), 1.0 / N, dtype=torch.promote_types(q.dtype, torch.float32))
    for _ in range(order):
        u = attention_transpose_matvec(q, k, log_size, scale, u, chunk_size)
    return u


def _candidate_distribution(score: torch.Tensor, num_protected: int) -> torch.Tensor:
    """``[B, N]`` score -> ``[B, N - num_protected]`` restricted to candidates, summing to 1."""
    candidate = score[:, num_protected:]
    return candidate / candidate.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(candidate.dtype).tiny)


def token_relevance(
    q: torch.Tensor,
    k: torch.Tensor,
    log_size: Optional[torch.Tensor],
    scale: float,
    num_protected: int,
    order: int = 1,
    dominance_weight: float = 0.5,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """TC-ViT relevance of each candidate token (see the module docstring for the scale).

    A score whose weight is 0 is not computed at all.

    Args:
        q, k: ``[B, H, N, D]``.
        log_size: ``[B, N]`` or ``None``.
        scale: softmax scale.
        num_protected: leading tokens that are never candidates; the class token must be
            token 0 when ``dominance_weight > 0``.
        order: connectivity order ``K >= 1``.
        dominance_weight: ``w`` in ``[0, 1]``.
        chunk_size: query rows per chunk for connectivity.

    Returns:
        ``[B, N - num_protected]`` float32 or wider, summing to 1 per image.
    """
    relevance = 0.0
    if dominance_weight > 0:
        dom = dominance(q, k, log_size, scale, class_index=0)
        relevance = dominance_weight * _candidate_distribution(dom, num_protected)
    if dominance_weight < 1:
        conn = connectivity(q, k, log_size, scale, order, chunk_size)
        relevance = relevance + (1.0 - dominance_weight) * _candidate_distribution(conn, num_protected)
    return relevance


def select_representatives(relevance: torch.Tensor, num_keep: int) -> tuple:
    """Split candidates into the ``num_keep`` most relevant and the rest.

    Args:
        relevance: ``[B, M]`` score per candidate.
        num_keep: representatives to keep, ``1 <= num_keep <= M``.

    Returns:
        ``(keep [B, num_keep], rest [B, M - num_keep])`` candidate positions, each in
        increasing (original) order, so the kept tokens keep their relative order.
    """
    # Stable, so ties (e.g. equal scores) resolve to the earlier token on every device.
    order = stable_argsort_descending(relevance)
    keep = order[:, :num_keep].sort(dim=-1).values
    rest = order[:, num_keep:].sort(dim=-1).values
    return keep, rest


def most_connected_representative(
    q: torch.Tensor,
    k: torch.Tensor,
    log_size: Optional[torch.Tensor],
    scale: float,
    query_index: torch.Tensor,
    rep_index: torch.Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """For each query token, the representative it attends to most (``argmax_j A[i, j]``).

    The softmax of each head runs over all ``N`` keys (the attention the block used);
    only then are the representatives' columns compared.

    Args:
        q, k: ``[B, H, N, D]``.
        log_size: ``[B, N]`` or ``None``.
        scale: softmax scale.
        query_index: ``[B, M]`` absolute indices of the tokens to place.
        rep_index: ``[B, R]`` absolute indices of the representatives.
        chunk_size: query rows per chunk.

    Returns:
        ``[B, M]`` int64 positions in ``rep_index``.
    """
    B, H, _, D = q.shape
    num_queries = query_index.shape[1]
    rep_cols = rep_index.unsqueeze(1)  # [B, 1, R], broadcast over the chunk's rows
    best = []
    for start in range(0, num_queries, chunk_size):
        idx = query_index[:, start : start + chunk_size]
        q_rows = q.gather(2, idx[:, None, :, None].expand(B, H, idx.shape[1], D))
        rows = mean_attention_rows(q_rows, k, log_size, scale)  # [B, c, N]
        to_reps = rows.gather(2, rep_cols.expand(B, idx.shape[1], -1))
        best.append(to_reps.argmax(dim=-1))
    if not best:
        return query_index.new_empty(B, 0)
    return torch.cat(best, dim=1)


def select_and_fuse_plan(
    keep: torch.Tensor,
    rest: torch.Tensor,
    destination: Optional[torch.Tensor],
    num_protected: int,
) -> MergePlan:
    """The plan that keeps the representatives and fuses (or discards) the rest.

    Output order: ``[protected..., representatives (original order)...]``.

    Args:
        keep: ``[B, R]`` candidate positions of the representatives, increasing.
        rest: ``[B, M]`` candidate positions of the other candidates.
        destination: ``[B, M]`` position in ``keep`` each of ``rest`` is fused into, or
            ``None`` to discard them.
        num_protected: leading tokens, kept first and never fused.

    Returns:
        :class:`~tokenmerge.core.merge.MergePlan` with ``num_out = num_protected + R``.
    """
    B, num_keep = keep.shape
    num_candidates = num_keep + rest.shape[1]
    num_out = num_protected + num_keep
    device = keep.device
    assign_candidates = torch.empty(B, num_candidates, dtype=torch.long, device=device)
    rep_slots = torch.arange(num_protected, num_out, device=device).expand(B, -1)
    assign_candidates.scatter_(1, keep, rep_slots)
    if destination is None:
        rest_slots = torch.full_like(rest, num_out)  # the discard slot
    else:
        rest_slots = destination + num_protected
    assign_candidates.scatter_(1, rest, rest_slots)
    protected = torch.arange(num_protected, device=device).expand(B, -1)
    return MergePlan(torch.cat([protected, assign_candidates], dim=1), num_out)


def select_and_fuse(
    relevance: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    log_size: Optional[torch.Tensor],
    scale: float,
    r: int,
    num_protected: int,
    fuse: bool = True,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> MergePlan:
    """Remove ``r`` tokens: keep the ``N - num_protected - r`` most relevant candidates and
    fuse every other candidate into its most connected representative (or discard it).

    Args:
        relevance: ``[B, N - num_protected]`` score per candidate.
        q, k: ``[B, H, N, D]`` (used to find each token's representative).
        log_size: ``[B, N]`` or ``None``.
        scale: softmax scale.
        r: tokens to remove, ``0 <= r < N - num_protected``.
        num_protected: leading tokens, never fused.
        fuse: fuse the non-representatives (``True``) or discard them (``False``).
        chunk_size: query rows per chunk.

    Returns:
        :class:`~tokenmerge.core.merge.MergePlan` with ``num_out = N - r``.
    """
    num_candidates = relevance.shape[1]
    if not 0 <= r < num_candidates:
        raise ValueError(
            f"select-and-fuse keeps at least one of the {num_candidates} candidate tokens; "
            f"asked to remove r={r}"
        )
    keep, rest = select_representatives(relevance, num_candidates - r)
    destination = None
    if fuse:
        destination = most_connected_representative(
            q, k, log_size, scale, rest + num_protected, keep + num_protected, chunk_size
        )
    return select_and_fuse_plan(keep, rest, destination, num_protected)
