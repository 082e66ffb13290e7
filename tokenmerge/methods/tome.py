"""ToMe: bipartite soft matching on the attention keys, with proportional attention."""

from __future__ import annotations

from ..core.attention import key_metric
from ..core.matching import bipartite_soft_matching
from ..core.merge import MergePlan
from .base import AttentionTensors, TokenReducer
from .registry import register_method

__all__ = ["ToMe"]


@register_method
class ToMe(TokenReducer):
    """Token Merging (Bolya et al., ICLR 2023), off the shelf.

    Metric: the block's keys averaged over heads (free: attention computed them).
    Matching: :func:`~tokenmerge.core.matching.bipartite_soft_matching`.
    Merge: size-weighted average; sizes feed proportional attention in later blocks.
    """

    name = "tome"

    def plan(self, x, attn: AttentionTensors, r, num_protected, block_index) -> MergePlan:
        return bipartite_soft_matching(key_metric(attn.k), r, num_protected)
