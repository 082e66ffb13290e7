"""PiToMe: protect isolated (informative) tokens by an energy score, then merge the rest."""

from __future__ import annotations

import math
import numbers

from ..core.attention import key_metric
from ..core.energy import energy_matching
from ..core.merge import MergePlan
from .base import AttentionTensors, TokenReducer
from .registry import register_method

__all__ = ["PiToMe", "check_real"]


def check_real(value, name: str, *, positive: bool = False) -> float:
    """A finite real option (``positive``: also > 0), else a clear error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return float(value)


@register_method
class PiToMe(TokenReducer):
    """PiToMe (Tran et al., "Accelerating Transformers with Spectrum-Preserving Token
    Merging", NeurIPS 2024), training-free.

    Each block scores its mergeable tokens by energy (:func:`~tokenmerge.core.energy.energy_score`
    on the cosine similarity of the keys averaged over heads), protects all but the ``2r``
    highest-energy tokens, and merges those ``2r`` pairwise (A/B alternate in energy order;
    see :mod:`tokenmerge.core.energy`). Merge: size-weighted average, proportional attention
    as in ToMe. Cost: one ``M x M`` similarity per block (ToMe's is ``M/2 x M/2``).

    Args:
        margin: cosine similarity above which two tokens count as one cluster (0.5, the
            default of the authors' vision code).
        alpha: ELU's negative saturation (1.0).
    """

    name = "pitome"

    def __init__(self, margin: float = 0.5, alpha: float = 1.0):
        super().__init__()
        self.margin = check_real(margin, "margin")
        self.alpha = check_real(alpha, "alpha", positive=True)

    def plan(self, x, attn: AttentionTensors, r, num_protected, block_index) -> MergePlan:
        return energy_matching(key_metric(attn.k), r, num_protected, self.margin, self.alpha)

    def extra_repr(self) -> str:
        return f"method={self.name!r}, margin={self.margin}, alpha={self.alpha}"
