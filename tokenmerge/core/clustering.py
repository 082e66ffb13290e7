"""Agglomerative token clustering (ATC), as pure functions.

ATC (Haurum et al., "Agglomerative Token Clustering", ECCV 2024). Bipartite matching
(ToMe) can only merge a token of set A into one of set B, so two similar tokens on the same
side never merge, and no group grows beyond one B-token plus its A-partners in a block.
ATC instead clusters the mergeable tokens bottom-up: starting from one cluster per token,
it repeatedly joins the two most similar clusters until ``r`` joins have been made, and
each cluster becomes one token (the size-weighted average of its members). The similarity
of two clusters is their *linkage* over the member tokens' cosine similarities:

- ``"complete"``: the least similar pair (compact clusters);
- ``"average"``: the mean over all member pairs (UPGMA), weighted by member counts;
- ``"single"``: the most similar pair (chains).

After a join, the new cluster's similarity to every other cluster follows from the two old
rows (the Lance-Williams update), so ``r`` joins cost ``r`` passes over an ``M x M`` matrix
rather than a new similarity each time. The joins run for every image of the batch at once,
each a handful of kernels (a row maximum, two gathers, two scatters); the labels are resolved
once at the end.

Per-image joins. With a ``threshold``, ``r`` is a cap: each image stops joining as soon as
its most similar pair falls below the threshold, so an image of a uniform background
removes many tokens and a cluttered one few (the linkages are monotone, so the first pair
below the threshold is the last that would have been considered). Images of a batch then
keep different numbers of tokens: the batch keeps the largest, and an image with fewer
fills its last slots with *empty* tokens (size 0, value 0), which proportional attention
(``log 0 = -inf``) and size-weighted pooling ignore and the next block discards. Each image's
result is the one it would get alone, unless two of its candidate pairs tie exactly (e.g.
identical tokens): small batches join in rounds and large ones one pair at a time (below),
and the two may settle such a tie differently. With complete linkage and a small batch
(latency), the joins are made in rounds of mutually most similar pairs, the same clusters in
far fewer kernel launches (:func:`_complete_linkage_in_rounds`).

Output order. ``[protected..., clusters in the order of their first member]``: a token
that joined nothing keeps its relative place.
"""

from __future__ import annotations

from typing import Optional

import torch

from .matching import identity_plan
from .merge import MergePlan
from .multi_criteria import inverse_normalised

__all__ = [
    "LINKAGES",
    "check_linkage",
    "agglomerative_max_reduction",
    "agglomerative_clustering",
    "join_similarities",
    "clustering_similarity",
    "agglomerative_plan",
]

LINKAGES = ("complete", "average", "single")

# Per-image complete linkage runs in rounds of joins (:func:`_complete_linkage_in_rounds`)
# while the batch's matrices are this small, and one join at a time above. A round is a few
# passes over the whole [B, M, M] matrix, a join a few kernels on two rows: with a small
# matrix the kernel launches dominate and a handful of rounds beats up to ``3 r`` joins; with
# a large one the passes do. On a real ViT-Tiny block (1 CPU thread, M = 196, cap 48;
# benchmarks/clustering_rounds.py) rounds were x1.83 at batch 1, x1.66 at 2, x1.04 at 4 and
# x0.79 at 8 of the speed of one join at a time: the bound admits batches of up to 3 at M = 196.
ROUNDS_MAX_ELEMENTS = 1 << 17


def check_linkage(linkage: str) -> str:
    """``linkage`` if it is one of :data:`LINKAGES`, else a clear error."""
    if linkage not in LINKAGES:
        raise ValueError(f"linkage must be one of {LINKAGES}, got {linkage!r}")
    return linkage


def agglomerative_max_reduction(num_tokens: int, num_protected: int) -> int:
    """Clustering can join every mergeable token into one: ``M - 1`` joins (0 if none)."""
    return max(0, num_tokens - num_protected - 1)


def agglomerative_clustering(
    similarity: torch.Tensor,
    joins: int,
    linkage: str = "complete",
    threshold: Optional[float] = None,
    valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Cluster ``M`` items bottom-up by ``joins`` greedy joins.

    Each join takes the most similar pair of current clusters (ties: the lowest flat index
    ``i * M + j``) and keeps the lower index as the cluster's label. (With a ``threshold``,
    complete linkage and a small batch, pairs are joined in rounds: the same clusters unless
    two candidate pairs tie exactly, where the rounds may resolve the tie otherwise.)

    Args:
        similarity: ``[B, M, M]`` pairwise similarities (higher = more alike), read as
            symmetric: the larger of ``[i, j]`` and ``[j, i]`` (a matmul can differ by an ulp).
        joins: ``0 <= joins <= M - 1``; with ``threshold``, the most joins an image makes.
            With ``valid``, an image that runs out of valid pairs stops there.
        linkage: one of :data:`LINKAGES`.
        threshold: ``None`` for exactly ``joins`` joins per image; otherwise an image stops
            at its first pair whose linkage similarity is below ``threshold``.
        valid: ``[B, M]`` bool, ``False`` for items that join nothing (each stays its own
            label), or ``None`` for all valid.

    Returns:
        ``[B, M]`` int64: the label of each item, the smallest item index in its cluster.
    """
    return _agglomerate(similarity, joins, linkage, threshold, valid)


def join_similarities(similarity: torch.Tensor, joins: int, linkage: str = "complete") -> torch.Tensor:
    """The linkage similarity of each of ``joins`` greedy joins (the merge heights; non-
    increasing for every linkage here). ``similarity``: ``[B, M, M]``; returns ``[B, joins]``.

    Calibrating a per-image ``threshold`` reads them: the height of an image's ``r``-th join
    is the threshold at which it would make exactly ``r`` joins.
    """
    heights = similarity.new_empty(similarity.shape[0], joins, dtype=torch.promote_types(similarity.dtype, torch.float32))
    _agglomerate(similarity, joins, linkage, None, None, heights)
    return heights


def _agglomerate(similarity, joins, linkage, threshold, valid, heights=None) -> torch.Tensor:
    check_linkage(linkage)
    B, M, _ = similarity.shape
    if not 0 <= joins <= max(0, M - 1):
        raise ValueError(f"agglomerative clustering can make 0..{max(0, M - 1)} joins of {M} items, asked for {joins}")
    device = similarity.device
    labels = torch.arange(M, device=device).expand(B, M)
    if joins == 0:
        return labels.contiguous()
    with torch.no_grad():
        # float32 at least: the average linkage accumulates weighted means over many joins.
        sim = similarity.to(torch.promote_types(similarity.dtype, torch.float32))
        # Exactly symmetric (a matmul need not be, by an ulp), so the first maximum of the
        # flat matrix is always at row < column: the row is the cluster that stays.
        sim = torch.maximum(sim, sim.transpose(1, 2))
        dead = torch.finfo(sim.dtype).min  # a finite "never", so no inf - inf in the average
        index = torch.arange(M, device=device)
        # Not torch.eye: ONNX Runtime has no boolean EyeLike kernel.
        never = index.unsqueeze(1) == index.unsqueeze(0)
        if valid is not None:
            never = never | ~(valid.unsqueeze(2) & valid.unsqueeze(1))
        sim = sim.masked_fill(never, dead)
        dead_row = sim.new_full((B, M), dead)
        # One bound for "at least the threshold, and a pair that exists at all" (with invalid
        # items, an image may run out of pairs before ``joins``: it stops there). A tensor, as a
        # Python number would be copied into one at every join.
        floor = None
        if threshold is not None or valid is not None:
            exists = dead * (1 - 1e-6)  # above the dead value, below every real similarity
            floor = torch.tensor(exists if threshold is None else max(float(threshold), exists), dtype=sim.dtype, device=device)
        if linkage == "complete" and threshold is not None and heights is None and B * M * M <= ROUNDS_MAX_ELEMENTS:
            return _complete_linkage_in_rounds(sim, joins, floor, dead)
        count = sim.new_ones(B, M) if linkage == "average" else None
        keeps, gones, actives = [], [], []
        for step in range(joins):
            # The first maximum of the flat matrix (the lowest row holding the best value, then
            # its lowest column), in two stages: a max-with-index over all M x M entries is many
            # times slower on CPU than a plain row maximum followed by two small searches.
            best, keep = sim.amax(dim=-1).max(dim=-1)
            if heights is not None:
                heights[:, step] = best
            active = None
            if floor is not None:
                # A stopped image's join is written back unchanged below, so its matrix and its
                # best pair stay as they were: it never resumes (no sticky flag needed).
                active = best >= floor
                if not bool(active.any()):  # this path reads the data anyway (eager only)
                    break
            gone = sim.gather(1, keep.view(B, 1, 1).expand(B, 1, M)).squeeze(1).argmax(dim=-1)
            # Both rows move at once, by gather/scatter along one dimension: O(B x M) per join,
            # and exportable to ONNX, which advanced-index assignment is not.
            pair = torch.stack([gone, keep], dim=1)  # [B, 2]
            pair_rows, pair_cols = pair.unsqueeze(2).expand(B, 2, M), pair.unsqueeze(1).expand(B, M, 2)
            rows = sim.gather(1, pair_rows)  # [B, 2, M]: the gone row, the keep row
            if linkage == "complete":
                # The minimum keeps a dead entry dead (a removed cluster, the pair itself).
                joined = rows.amin(dim=1)
            elif linkage == "single":
                joined = torch.where((rows == dead).any(dim=1), dead_row, rows.amax(dim=1))
            else:
                weight = count.gather(1, pair)
                joined = (weight.unsqueeze(2) * rows).sum(dim=1) / weight.sum(dim=1, keepdim=True)
                joined = torch.where((rows == dead).any(dim=1), dead_row, joined)
            update = torch.stack([dead_row, joined], dim=1)
            if active is not None:
                update = torch.where(active.view(B, 1, 1), update, rows)
            # In place (sim is this function's own copy): out of place would copy the whole
            # [B, M, M] matrix per scatter. The rows first, then the columns.
            sim.scatter_(1, pair_rows, update).scatter_(2, pair_cols, update.transpose(1, 2))
            if count is not None:
                moved = count.gather(1, gone.unsqueeze(1))
                count = count.scatter_add(1, keep.unsqueeze(1), moved if active is None else moved * active.unsqueeze(1))
            keeps.append(keep)
            gones.append(gone)
            actives.append(active)
        if not keeps:
            return labels.contiguous()
        made = None if floor is None else torch.stack(actives, dim=1)  # False: a stopped image's no-op
        return _labels_of_joins(torch.stack(keeps, dim=1), torch.stack(gones, dim=1), made, M, len(keeps))


def _labels_of_joins(keep, gone, made, M: int, joins: int) -> torch.Tensor:
    """``[B, M]`` labels (each item's smallest cluster member) after the joins ``keep[:, k]``
    <- ``gone[:, k]`` (``[B, J]``, each a cluster's smallest member at the time, ``keep <
    gone``); where ``made`` (``[B, J]`` bool, or ``None`` for all) is False, that join is
    skipped. ``joins``: a Python bound on ``J`` (a traced shape is not a number).

    Each join points the removed label at the kept one (smaller, so the pointers only go
    down); pointer jumping then takes every item to its cluster's smallest member in
    log2(joins) gathers instead of one relabelling pass per join.
    """
    B = keep.shape[0]
    if made is not None:
        # Skipped joins write into a spare last slot: an item that stays may still be the
        # removed side of a join that was made, and one position must not be written twice.
        spare = torch.full_like(keep, M)
        keep, gone = torch.where(made, keep, spare), torch.where(made, gone, spare)
    parent = torch.arange(M + 1, device=keep.device).expand(B, M + 1).scatter(1, gone, keep)[:, :M]
    for _ in range(max(1, joins.bit_length())):
        parent = parent.gather(1, parent)
    return parent


def _complete_linkage_in_rounds(sim, joins, floor, dead) -> torch.Tensor:
    """Per-image complete linkage (``threshold``, at most ``joins``) in rounds, not one join
    at a time. ``sim``: ``[B, M, M]`` symmetric, ``dead`` on the diagonal and at invalid items
    (this function's own copy); ``floor``: the threshold as a tensor.

    Complete linkage is *reducible*: a join never makes the new cluster more similar to a
    third than either part was. So two clusters that are each other's most similar
    (reciprocal nearest neighbours) are joined by the one-at-a-time greedy too, at the same
    height, whatever it joins first elsewhere; joining every such pair of a round at once
    builds the same tree. The heights along it never rise (monotone), so the greedy's
    first ``joins`` joins above the threshold are the tree's ``joins`` highest: rounds run
    until every image either has no pair at its threshold left or has made ``joins`` joins
    at least as high as anything still in its matrix, then the highest ``joins`` are kept.
    The clusters are the greedy's whenever no two candidate pairs tie; each round is a
    handful of kernels, and a round makes many joins (a few rounds instead of up to
    ``joins`` iterations at batch 1).
    """
    B, M, _ = sim.shape
    index = torch.arange(M, device=sim.device).expand(B, M)
    offsets = torch.arange(0, B * M, M, device=sim.device).unsqueeze(1)
    never = torch.tensor(float("inf"), dtype=sim.dtype, device=sim.device)
    heights, mates = [], []
    while True:
        best, nearest = sim.max(dim=-1)  # [B, M]: each cluster's most similar one
        top = best.amax(dim=-1, keepdim=True)  # [B, 1]: no later join is higher
        made = torch.cat(heights, dim=1) if heights else best.new_empty(B, 0)
        settled = (top < floor) | ((made >= top).sum(dim=1, keepdim=True) >= joins)
        if bool(settled.all()):  # eager only: the number of rounds is read from the data
            break
        paired = (nearest.gather(1, nearest) == index) & (best >= floor) & ~settled
        mate = torch.where(paired, nearest, index)  # [B, M]: each cluster's partner, or itself
        gone = paired & (index > mate)
        # The new cluster's similarity to every other is the minimum over the four member
        # pairs, [i, j], [mate i, j], [i, mate j] and [mate i, mate j]: the mates' rows (a
        # row copy), then the mates' columns of that. Every pair of the round at once.
        rows = (mate + offsets).flatten()
        sim = torch.minimum(sim, sim.reshape(B * M, M).index_select(0, rows).view(B, M, M))
        sim = torch.minimum(sim, sim.gather(2, mate.unsqueeze(1).expand(B, M, M)))
        removed = torch.where(gone, dead, never)
        sim = torch.minimum(torch.minimum(sim, removed.unsqueeze(1)), removed.unsqueeze(2))
        keeper = paired & ~gone
        heights.append(torch.where(keeper, best, dead))  # one entry per join, at its kept row
        mates.append(torch.where(keeper, mate, index))
    if not heights:
        return index.contiguous()
    height, keep, gone = torch.cat(heights, dim=1), index.repeat(1, len(mates)), torch.cat(mates, dim=1)
    # The highest ``joins`` (a stable sort: at equal height an earlier round, which holds the
    # parts of any later join, comes first, so the kept joins are a whole subtree).
    order = height.sort(dim=1, descending=True, stable=True).indices[:, :joins]
    return _labels_of_joins(keep.gather(1, order), gone.gather(1, order), height.gather(1, order) >= floor, M, joins)


def clustering_similarity(
    metric: torch.Tensor,
    num_protected: int,
    size: Optional[torch.Tensor] = None,
    tau_size: Optional[float] = None,
    empty_slots: bool = False,
) -> tuple:
    """The similarity ATC clusters the mergeable tokens on (see :func:`agglomerative_plan`).

    Returns ``(similarity [B, M, M], valid [B, M] or None)``; with ``empty_slots``, tokens of
    size 0 are marked invalid (``valid`` is ``None`` when there are no sizes).
    """
    # In float32 at least: in half precision many pairs tie, and which of them joins first may
    # then depend on the batch (its kernels round differently), not on the image alone.
    mergeable = metric[:, num_protected:].to(torch.promote_types(metric.dtype, torch.float32))
    mergeable = mergeable / mergeable.norm(dim=-1, keepdim=True)
    similarity = mergeable @ mergeable.transpose(-1, -2)
    sizes = None if size is None else size[:, num_protected:, 0].to(similarity.dtype)
    valid = None
    if empty_slots and sizes is not None:
        valid = sizes > 0
        # An empty slot must not set the largest inverse size of the normalisation below.
        sizes = torch.where(valid, sizes, sizes.amax(dim=1, keepdim=True))
    if tau_size is not None and sizes is not None:
        # Shifted to [0, 1] first: a factor must not turn an unlike pair into a like one.
        shrink = inverse_normalised(sizes) ** (1.0 / tau_size)
        similarity = (similarity + 1.0) / 2.0 * shrink.unsqueeze(2) * shrink.unsqueeze(1)
    return similarity, valid


def agglomerative_plan(
    metric: torch.Tensor,
    r: int,
    num_protected: int = 1,
    linkage: str = "complete",
    size: Optional[torch.Tensor] = None,
    tau_size: Optional[float] = None,
    threshold: Optional[float] = None,
) -> MergePlan:
    """Plan ATC's merge of ``r`` tokens: ``r`` joins on the cosine similarity of ``metric``,
    optionally weighted by the tokens' sizes, or per image up to ``r`` with a ``threshold``.

    Args:
        metric: ``[B, N, D]`` per-token features (ToMe's: keys averaged over heads).
        r: tokens to remove, ``0 <= r <= agglomerative_max_reduction(N, num_protected)``.
        num_protected: leading tokens that are never merged.
        linkage: one of :data:`LINKAGES`.
        size: ``[B, N, 1]`` patches per token, or ``None`` for all ones.
        tau_size: ``None`` to cluster on the cosine similarity alone; otherwise the pairwise
            similarity is MCTF's similarity x size criterion,
            ``(cos + 1) / 2 * (s'_i * s'_j) ** (1 / tau_size)`` with ``s' = 1 / size``
            normalised to a maximum of 1 (:func:`~tokenmerge.core.multi_criteria.inverse_normalised`),
            so small tokens join first and no token grows into a giant. With equal sizes
            (the first block) the joins are the same as without it.
        threshold: ``None`` to remove exactly ``r`` tokens. Otherwise each image joins while
            its most similar pair (the similarity above, size criterion included; the plain
            cosine when ``size`` is ``None``) is at least ``threshold``, at most ``r`` times;
            tokens of size 0 (empty slots of an earlier per-image plan) are discarded first
            and join nothing (module docstring).

    Returns:
        A :class:`~tokenmerge.core.merge.MergePlan` with ``num_out = N - r``; with a
        ``threshold``, ``num_out`` is the most tokens any image of the batch keeps (read
        from the data, so this path does not trace to a static graph).
    """
    B, N, _ = metric.shape
    limit = agglomerative_max_reduction(N, num_protected)
    if not 0 <= r <= limit:
        raise ValueError(
            f"agglomerative clustering can remove 0..{limit} of {N} tokens ({num_protected} protected), asked for r={r}"
        )
    check_linkage(linkage)
    if tau_size is not None and not tau_size > 0:
        raise ValueError(f"tau_size must be > 0 or None, got {tau_size!r}")
    if r == 0:
        return identity_plan(B, N, metric.device)
    with torch.no_grad():
        similarity, valid = clustering_similarity(metric, num_protected, size, tau_size, threshold is not None)
        labels = agglomerative_clustering(similarity, r, linkage, threshold, valid)
        M = labels.shape[1]
        is_label = labels == torch.arange(M, device=metric.device)  # one label per cluster
        if valid is not None:
            is_label = is_label & valid
        slot = is_label.long().cumsum(dim=1) - 1 + num_protected  # output slot of each cluster's label
        num_out = N - r if threshold is None else num_protected + int(is_label.sum(dim=1).max())
        assign = slot.gather(1, labels)
        if valid is not None:
            assign = torch.where(valid, assign, num_out)  # empty slots are discarded
        protected = torch.arange(num_protected, device=metric.device).expand(B, num_protected)
        return MergePlan(torch.cat([protected, assign], dim=1), num_out)
