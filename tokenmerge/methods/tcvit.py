"""TC-ViT: connectivity-based token condensation (select and fuse), off the shelf."""

from __future__ import annotations

import math
import numbers

import torch

from ..core.merge import MergePlan
from ..core.relevance import DEFAULT_CHUNK_SIZE, check_chunk_size, select_and_fuse, token_relevance
from .base import AttentionTensors, TokenReducer
from .registry import register_method

__all__ = ["TCViT", "require_class_token", "select_and_fuse_max_reduction"]


def require_class_token(num_protected: int, method: str, fix: str, has_class_token: bool = True) -> None:
    """Raise a clear error when a class-attention score is asked of a model without one."""
    if num_protected < 1:
        raise ValueError(
            f"{method} scores tokens by the class token's attention, but this model has no "
            f"protected class token (num_protected=0, e.g. a ViT with class_token=False and "
            f"average pooling). {fix}"
        )
    if not has_class_token:
        raise ValueError(
            f"{method} scores tokens by the class token's attention, but this model has no class "
            f"token: its {num_protected} protected prefix token(s) are registers (e.g. a ViT with "
            f"class_token=False, reg_tokens and average pooling). {fix}"
        )


def select_and_fuse_max_reduction(num_tokens: int, num_protected: int) -> int:
    """Select-and-fuse can remove every candidate but one representative in one block."""
    return max(0, num_tokens - num_protected - 1)


def _check_order(order) -> int:
    if isinstance(order, bool) or not isinstance(order, numbers.Integral) or order < 1:
        raise ValueError(
            f"order (connectivity path length K) must be an int >= 1, got {order!r}; "
            "order=1 uses the attention matrix itself"
        )
    return int(order)


def _check_weight(weight) -> float:
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
        raise ValueError(f"dominance_weight must be a number in [0, 1], got {weight!r}")
    if not 0.0 <= float(weight) <= 1.0:
        raise ValueError(
            f"dominance_weight must lie in [0, 1] (1 = class attention only, "
            f"0 = connectivity only), got {weight}"
        )
    return float(weight)


def _check_flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


@register_method
class TCViT(TokenReducer):
    """TC-ViT (connectivity-based token condensation), applied to a trained ViT.

    After each block's attention, every candidate (non-protected) token gets a relevance
    ``w * dominance + (1 - w) * connectivity_K`` (see :mod:`tokenmerge.core.relevance` for
    the exact normalisation). The ``N - P - r`` most relevant candidates are kept as
    representatives; each other token is merged, size-weighted, into the representative
    its query attends to most, then dropped (``fuse=False`` drops it unmerged). Sizes feed
    proportional attention in later blocks, as in ToMe.

    Scores are recomputed from the block's queries and keys in chunks of ``chunk_size``
    query rows, so the block's attention stays on the fused kernel and no
    ``[B, H, N, N]`` tensor is built. Cost per block: one ``[1, N]`` row for dominance,
    ``K`` chunked ``Q K^T`` passes for connectivity (skipped when ``w == 1``), and one
    pass over the ``r`` fused tokens' queries to find their representatives.

    One block may remove all candidates but one (:meth:`max_reduction`), more than the
    half bipartite matching allows.

    Training (``tokenmerge train --method tcvit``): the plan is computed without gradient
    (it is discrete), and the fused values carry the gradient, as in ToMe's training; see
    :mod:`tokenmerge.training` for why no straight-through estimator is used.

    Args:
        order: connectivity order ``K >= 1`` (path length in the attention graph).
        dominance_weight: ``w`` in ``[0, 1]``; ``w > 0`` needs a class token at index 0.
        fuse: merge the non-representatives into representatives (``True``) or discard them.
        chunk_size: query rows scored at once (memory ``B * H * chunk_size * N``).
    """

    name = "tcvit"
    # Select-and-fuse piles many patches into a few representatives; proportional attention
    # then over-weights exactly those tokens (TC-ViT at -50% GFLOPs: 68.3% with it, 79.1%
    # without; BENCHMARKS.md sections 4 and 6).
    default_prop_attn = False

    def __init__(
        self,
        order: int = 1,
        dominance_weight: float = 0.5,
        fuse: bool = True,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ):
        super().__init__()
        self.order = _check_order(order)
        self.dominance_weight = _check_weight(dominance_weight)
        self.fuse = _check_flag(fuse, "fuse")
        self.chunk_size = check_chunk_size(chunk_size)
        if not self.fuse:
            # Nothing is merged, every token stays one patch: no sizes, so attention keeps
            # the unbiased kernel.
            self.tracks_size = False

    def max_reduction(self, num_tokens: int, num_protected: int) -> int:
        return select_and_fuse_max_reduction(num_tokens, num_protected)

    def check_protected(self, num_protected: int, has_class_token: bool = True) -> None:
        if self.dominance_weight > 0:
            require_class_token(
                num_protected,
                "tcvit with dominance_weight > 0",
                "Use dominance_weight=0 (connectivity only) for such models.",
                has_class_token,
            )

    def plan(self, x, attn: AttentionTensors, r, num_protected, block_index) -> MergePlan:
        self.check_protected(num_protected)
        with torch.no_grad():
            relevance = token_relevance(
                attn.q, attn.k, attn.log_size, attn.scale, num_protected,
                order=self.order,
                dominance_weight=self.dominance_weight,
                chunk_size=self.chunk_size,
            )
            return select_and_fuse(
                relevance, attn.q, attn.k, attn.log_size, attn.scale, r, num_protected,
                fuse=self.fuse, chunk_size=self.chunk_size,
            )

    def extra_repr(self) -> str:
        return (
            f"method={self.name!r}, order={self.order}, dominance_weight={self.dominance_weight}, "
            f"fuse={self.fuse}, chunk_size={self.chunk_size}"
        )
