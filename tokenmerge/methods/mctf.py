"""MCTF: bipartite matching on multi-criteria edge weights (similarity, informativeness, size)."""

from __future__ import annotations

import torch

from ..core.attention import key_metric
from ..core.multi_criteria import FUSIONS, multi_criteria_matching
from ..core.relevance import DEFAULT_CHUNK_SIZE, check_chunk_size, connectivity
from .base import AttentionTensors, SizeAwareReducer
from .pitome import check_real
from .registry import register_method

__all__ = ["MCTF"]


@register_method
class MCTF(SizeAwareReducer):
    """MCTF (Lee et al., "Multi-criteria Token Fusion with One-step-ahead Attention for
    Efficient Vision Transformers", CVPR 2024), training-free.

    ToMe's A/B split and matching, with edges weighted by similarity x informativeness x
    size (:mod:`tokenmerge.core.multi_criteria`). Informativeness is the attention each
    token receives in this block, the column mean of the attention the block ran
    (:func:`~tokenmerge.core.relevance.connectivity` at order 1, recomputed from q and k in
    query chunks, so the block's own attention stays on the fused kernel). That
    recomputation costs about one more ``Q K^T`` per block.

    Args:
        tau_sim, tau_info, tau_size: temperatures of the three criteria (the paper's
            1, 20 and 40: similarity dominates, the other two break near-ties).
        bidirectional: merge half of ``r`` from A into B and the rest from B into A
            (the official evaluation setting).
        fusion: ``"size"`` (ToMe's size-weighted average) or ``"attention"`` (weighted by
            size x attention received: the official ``pooling_type=1``).
        chunk_size: query rows scored at once.

    :func:`tokenmerge.tune` may move each temperature by a factor of 2 either way on
    calibration images (``option_grid``): the paper set them for DeiT trained with MCTF, and
    how much informativeness and size should bend similarity without training depends on the
    model (BENCHMARKS.md section 6 has the measurements on two models).
    """

    name = "mctf"
    option_grid = {"tau_sim": (1.0, 0.5, 2.0), "tau_info": (20.0, 10.0, 40.0), "tau_size": (40.0, 20.0, 80.0)}

    def __init__(self, tau_sim: float = 1.0, tau_info: float = 20.0, tau_size: float = 40.0,
                 bidirectional: bool = False, fusion: str = "size", chunk_size: int = DEFAULT_CHUNK_SIZE):
        super().__init__()
        self.tau_sim = check_real(tau_sim, "tau_sim", positive=True)
        self.tau_info = check_real(tau_info, "tau_info", positive=True)
        self.tau_size = check_real(tau_size, "tau_size", positive=True)
        if not isinstance(bidirectional, bool):
            raise TypeError(f"bidirectional must be True or False, got {bidirectional!r}")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        self.bidirectional = bidirectional
        self.fusion = fusion
        self.chunk_size = check_chunk_size(chunk_size)

    def plan_sized(self, x, attn: AttentionTensors, size, r, num_protected, block_index):
        with torch.no_grad():
            received = connectivity(attn.q, attn.k, attn.log_size, attn.scale, 1, self.chunk_size)
            return multi_criteria_matching(
                key_metric(attn.k), received, size, r, num_protected,
                self.tau_sim, self.tau_info, self.tau_size, self.bidirectional, self.fusion,
            )

    def extra_repr(self) -> str:
        return (f"method={self.name!r}, tau_sim={self.tau_sim}, tau_info={self.tau_info}, "
                f"tau_size={self.tau_size}, bidirectional={self.bidirectional}, fusion={self.fusion!r}")
