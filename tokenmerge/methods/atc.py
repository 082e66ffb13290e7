"""ATC: agglomerative clustering of the mergeable tokens on the attention keys."""

from __future__ import annotations

from ..core.attention import key_metric
from ..core.clustering import LINKAGES, agglomerative_max_reduction, agglomerative_plan
from ..core.merge import MergePlan
from .base import AttentionTensors, TokenReducer
from .registry import register_method

__all__ = ["ATC"]


@register_method
class ATC(TokenReducer):
    """Agglomerative Token Clustering (Haurum et al., ECCV 2024), training-free.

    Metric: the block's keys averaged over heads, as in ToMe. Plan: ``r`` greedy joins of
    the most similar clusters of mergeable tokens (:mod:`tokenmerge.core.clustering`), so a
    merged token can gather any number of similar tokens from anywhere in the image, and
    a block may remove more than half of them. Merge: size-weighted average, proportional
    attention as in ToMe. Cost: one ``M x M`` similarity per block, then ``r`` sequential
    passes over it (no FLOPs, but ``r`` small kernels per block; BENCHMARKS.md section 6
    has the measured share).

    Args:
        linkage: ``"complete"`` (default), ``"average"`` or ``"single"``. Complete linkage
            bounds how unlike two members of a cluster may be (a cluster joins only if its
            least similar pair is the most similar on offer), so no merged token averages
            dissimilar tokens, the premise of every merge method; average and single linkage
            let clusters grow by chaining. Measured on train images of both Imagenette
            ViTs (12 and 6 blocks, constant r=16): KL to the unmodified model 14-16% below
            ToMe's with complete linkage; above ToMe's on the 12-block model with average
            linkage, and above it on both with single linkage (BENCHMARKS.md section 6).
    """

    name = "atc"
    option_grid = {"linkage": ("complete", "average")}

    def __init__(self, linkage: str = "complete"):
        super().__init__()
        if linkage not in LINKAGES:
            raise ValueError(f"linkage must be one of {LINKAGES}, got {linkage!r}")
        self.linkage = linkage

    def max_reduction(self, num_tokens: int, num_protected: int) -> int:
        return agglomerative_max_reduction(num_tokens, num_protected)

    def plan(self, x, attn: AttentionTensors, r, num_protected, block_index) -> MergePlan:
        return agglomerative_plan(key_metric(attn.k), r, num_protected, self.linkage)

    def extra_repr(self) -> str:
        return f"method={self.name!r}, linkage={self.linkage!r}"
