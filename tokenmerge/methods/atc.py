"""ATC: agglomerative clustering of the mergeable tokens on the attention keys."""

from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence, Union

import torch

from ..core.attention import key_metric
from ..core.clustering import (
    agglomerative_max_reduction,
    agglomerative_plan,
    check_linkage,
    clustering_similarity,
    join_similarities,
)
from ..core.merge import MergePlan
from .base import AttentionTensors, SizeAwareReducer
from .pitome import check_real
from .registry import register_method

__all__ = ["ATC", "DEFAULT_TAU_SIZE", "check_clustering_options", "check_threshold"]

DEFAULT_TAU_SIZE = 40.0

COMPILED_PER_IMAGE_WARNING = (
    "torch.compile of per-image merging (ATC with a threshold): its token counts are read from the "
    "data, so the graph breaks in every block and each new count recompiles; on CPU at batch 1 it ran "
    "no faster than eager, and slower with static shapes (BENCHMARKS.md section 6). To compile, patch "
    "with a fixed schedule instead (tokenmerge tune writes one as best_fixed.json)."
)


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

        threshold: ``None`` (default) to remove exactly the schedule's ``r`` tokens per block.
            Otherwise one similarity per block (a list as long as the model has blocks, or
            one float for all): each *image* joins while its most similar pair is at least
            the block's threshold, at most ``r`` times, so the schedule becomes a cap and
            simple images lose more tokens than cluttered ones at the same mean cost.
            :func:`tokenmerge.calibrate_thresholds` sets them for a GFLOPs budget on
            calibration images. The scale differs by block: with ``tau_size`` a threshold
            is compared with ``(cos + 1) / 2`` times the size factor, except in the first
            merging block, where no token has a size yet and it is compared with the cosine
            itself; one float for all blocks therefore means a stricter test in that block
            (calibrated thresholds are per block and unaffected). Needs proportional
            attention (it hides the empty slots of a batch whose images kept different counts). The token count is read from the
            data, so ONNX export refuses it, and ``torch.compile`` breaks the graph there and
            recompiles for new counts (it warns): compiled, it ran no faster than eager at
            batch 1 (BENCHMARKS.md section 6), where a fixed schedule compiled well.

    Both defaults were chosen on train images of two Imagenette ViTs (BENCHMARKS.md
    section 6); ``tokenmerge.tune`` may change the linkage per model (``option_grid``).
    """

    name = "atc"
    option_grid = {"linkage": ("complete", "average")}

    def __init__(
        self,
        linkage: str = "complete",
        tau_size: Optional[float] = DEFAULT_TAU_SIZE,
        threshold: Union[None, float, Sequence[float]] = None,
    ):
        super().__init__()
        self.linkage, self.tau_size = check_clustering_options(linkage, tau_size)
        self.threshold = check_threshold(threshold)
        if self.threshold is not None:
            self.export_refusal = (
                "ATC with a threshold keeps a data-dependent number of tokens per image, which "
                "a static graph cannot hold"
            )

    @property
    def per_image(self) -> bool:
        return self.threshold is not None

    def bind_blocks(self, blocks, architecture: str) -> None:
        if isinstance(self.threshold, tuple) and len(self.threshold) != len(blocks):
            raise ValueError(
                f"threshold has {len(self.threshold)} values but {architecture} has {len(blocks)} "
                "merging blocks: give one value per block, or one float for all"
            )

    def block_threshold(self, block_index: int) -> Optional[float]:
        """The threshold of block ``block_index`` (``None``: exactly ``r`` joins)."""
        if isinstance(self.threshold, tuple):
            value = self.threshold[block_index]
            return math.inf if value is None else value
        return self.threshold

    def max_reduction(self, num_tokens: int, num_protected: int) -> int:
        return agglomerative_max_reduction(num_tokens, num_protected)

    def plan_sized(self, x, attn: AttentionTensors, size, r, num_protected, block_index) -> MergePlan:
        if self.per_image:
            if torch.compiler.is_compiling():
                warnings.warn(COMPILED_PER_IMAGE_WARNING, UserWarning, stacklevel=2)
            r = min(r, agglomerative_max_reduction(x.shape[1], num_protected))
        return agglomerative_plan(key_metric(attn.k), r, num_protected, self.linkage, size, self.tau_size,
                                  self.block_threshold(block_index))

    def join_heights(self, attn: AttentionTensors, size, r: int, num_protected: int):
        """``[B, r]``: the similarity of each of the ``r`` joins this block would make (with
        no threshold), what :func:`tokenmerge.calibrate_thresholds` reads."""
        similarity, _ = clustering_similarity(key_metric(attn.k), num_protected, size, self.tau_size)
        return join_similarities(similarity, r, self.linkage)

    def extra_repr(self) -> str:
        extra = "" if self.threshold is None else f", threshold={self.threshold}"
        return f"method={self.name!r}, linkage={self.linkage!r}, tau_size={self.tau_size}{extra}"


def check_threshold(threshold) -> Union[None, float, tuple]:
    """ATC's ``threshold``: ``None``, one float, or a sequence of them (one per block; ``inf``
    or ``None`` in a block means it joins nothing, ``-inf`` that every image makes the
    block's ``r`` joins)."""
    if threshold is None:
        return None
    single = isinstance(threshold, (int, float)) and not isinstance(threshold, bool)
    try:
        values = (float(threshold),) if single else tuple(None if v is None else float(v) for v in threshold)
    except (TypeError, ValueError):
        raise ValueError(
            f"threshold must be a float or a list of floats (one per block), got {threshold!r}"
        ) from None
    if not values or any(v is not None and math.isnan(v) for v in values):
        raise ValueError(f"threshold values must be numbers (inf: no joins, -inf: always r), got {threshold!r}")
    return values[0] if single else values
