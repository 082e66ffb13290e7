"""ATC: agglomerative clustering of the mergeable tokens on the attention keys."""

from __future__ import annotations

from typing import Optional

from ..core.attention import key_metric
from ..core.clustering import agglomerative_max_reduction, agglomerative_plan, check_linkage
from ..core.merge import MergePlan
from .base import AttentionTensors, SizeAwareReducer
from .pitome import check_real
from .registry import register_method

__all__ = ["ATC", "DEFAULT_TAU_SIZE", "check_clustering_options"]

DEFAULT_TAU_SIZE = 40.0


def check_clustering_options(linkage: str, tau_size: Optional[float]) -> tuple:
    """ATC's clustering options (also DTEM's with ``matching="agglomerative"``), checked:
    ``(linkage, tau_size)``, ``tau_size`` a positive float or ``None``."""
    return check_linkage(linkage), None if tau_size is None else check_real(tau_size, "tau_size", positive=True)


@register_method
class ATC(SizeAwareReducer):
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
            joins two clusters only when their least similar members are the most similar
            pair on offer, so no merged token averages dissimilar tokens, the premise of
            every merge method; average and single linkage let clusters grow by chaining.
        tau_size: temperature of MCTF's size criterion in the similarity (default 40, the
            MCTF paper's), or ``None`` for the cosine similarity alone (the ATC paper's).
            Small tokens join first (:func:`~tokenmerge.core.clustering.agglomerative_plan`),
            so no token grows into a giant: a giant token averages away what its patches
            held, and proportional attention then hands it ``log(size)`` more attention.

    Both defaults were chosen on train images of two Imagenette ViTs (BENCHMARKS.md
    section 6); ``tokenmerge.tune`` may change the linkage per model (``option_grid``).
    """

    name = "atc"
    option_grid = {"linkage": ("complete", "average")}

    def __init__(self, linkage: str = "complete", tau_size: Optional[float] = DEFAULT_TAU_SIZE):
        super().__init__()
        self.linkage, self.tau_size = check_clustering_options(linkage, tau_size)

    def max_reduction(self, num_tokens: int, num_protected: int) -> int:
        return agglomerative_max_reduction(num_tokens, num_protected)

    def plan_sized(self, x, attn: AttentionTensors, size, r, num_protected, block_index) -> MergePlan:
        return agglomerative_plan(key_metric(attn.k), r, num_protected, self.linkage, size, self.tau_size)

    def extra_repr(self) -> str:
        return f"method={self.name!r}, linkage={self.linkage!r}, tau_size={self.tau_size}"
