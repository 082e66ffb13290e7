"""Select-and-fuse baselines beside TC-ViT: EViT-style fusion, random merging, pruning.

All three keep the same token counts as every other method for a given schedule (a
block with reduction ``r`` outputs ``N - r`` tokens), so they compare at equal cost.
"""

from __future__ import annotations

import numbers
from typing import Optional

import torch

from ..core.merge import MergePlan
from ..core.relevance import (
    DEFAULT_CHUNK_SIZE,
    check_chunk_size,
    dominance,
    most_connected_representative,
    select_and_fuse_plan,
    select_representatives,
)
from .base import AttentionTensors, TokenReducer
from .registry import register_method
from .tcvit import TCViT, require_class_token, select_and_fuse_max_reduction

__all__ = ["EViT", "RandomMerge", "ClassAttentionPrune", "fuse_rest_into_one_plan"]


def _class_attention_scores(attn: AttentionTensors, num_protected: int) -> torch.Tensor:
    """``[B, N - num_protected]``: the class token's attention to each candidate."""
    return dominance(attn.q, attn.k, attn.log_size, attn.scale, class_index=0)[:, num_protected:]


def fuse_rest_into_one_plan(keep: torch.Tensor, rest: torch.Tensor, num_protected: int) -> MergePlan:
    """Keep ``keep`` and fuse all of ``rest`` into one token placed last.

    Output order: ``[protected..., kept (original order)..., fused]``.

    Args:
        keep: ``[B, R]`` candidate positions kept, increasing.
        rest: ``[B, M]`` candidate positions fused together (``M >= 1``).
        num_protected: leading tokens, kept first and never fused.

    Returns:
        :class:`~tokenmerge.core.merge.MergePlan` with ``num_out = num_protected + R + 1``.
    """
    B, num_keep = keep.shape
    num_out = num_protected + num_keep + 1
    # Pointing every rest token at "representative" number R lands them all in slot
    # num_protected + R, which this plan has (one more slot than a select-and-fuse plan).
    fused_slot = torch.full_like(rest, num_keep)
    plan = select_and_fuse_plan(keep, rest, fused_slot, num_protected)
    return MergePlan(plan.assign, num_out)


@register_method
class EViT(TokenReducer):
    """EViT-style reorganisation (Liang et al., ICLR 2022), off the shelf.

    Keep the candidates the class token attends to most; fuse all the others into one
    token, appended after the kept tokens (EViT's placement). The fused token is a
    size-weighted average (EViT weights by class attention instead; size weighting keeps
    the token a true average of the patches it covers, so proportional attention and
    size-weighted pooling stay exact). It counts as an output token: removing ``r`` tokens
    keeps ``N - P - r - 1`` candidates plus the fused one. In later blocks the fused token
    is an ordinary candidate (it may be kept or fused again).

    Needs a class token (``num_protected >= 1``).
    """

    name = "evit"
    # Select-and-fuse piles many patches into a few representatives; proportional attention
    # then over-weights exactly those tokens (TC-ViT at -50% GFLOPs: 68.3% with it, 79.1%
    # without; BENCHMARKS.md sections 4 and 6).
    default_prop_attn = False

    def max_reduction(self, num_tokens: int, num_protected: int) -> int:
        # At least one kept candidate beside the fused token.
        return max(0, num_tokens - num_protected - 2)

    def check_protected(self, num_protected: int, has_class_token: bool = True) -> None:
        require_class_token(num_protected, "evit", "Use method='tcvit' with dominance_weight=0 or 'tome'.",
                            has_class_token)

    def plan(self, x, attn: AttentionTensors, r, num_protected, block_index) -> MergePlan:
        self.check_protected(num_protected)
        num_candidates = x.shape[1] - num_protected
        if not 1 <= r <= num_candidates - 2:
            raise ValueError(
                f"evit removes 1..{num_candidates - 2} of {num_candidates} candidate tokens "
                f"(it keeps one and adds the fused token), asked for r={r}"
            )
        with torch.no_grad():
            scores = _class_attention_scores(attn, num_protected)
            keep, rest = select_representatives(scores, num_candidates - r - 1)
            return fuse_rest_into_one_plan(keep, rest, num_protected)


@register_method
class ClassAttentionPrune(TCViT):
    """Pruning by class attention: keep the candidates the class token attends to most and
    discard the rest, with no fusion (sizes stay untracked; attention stays unbiased).

    This is exactly TC-ViT's select-and-fuse with ``dominance_weight=1, fuse=False``, so it
    reuses that policy; it takes no options. Needs a class token (``num_protected >= 1``).
    """

    name = "prune"

    def __init__(self):
        super().__init__(order=1, dominance_weight=1.0, fuse=False)

    def check_protected(self, num_protected: int, has_class_token: bool = True) -> None:
        require_class_token(num_protected, "prune", "Use method='tcvit' with dominance_weight=0 and fuse=False.",
                            has_class_token)

    def extra_repr(self) -> str:
        return f"method={self.name!r}"


_FUSE_INTO = ("random", "connected")


@register_method
class RandomMerge(TokenReducer):
    """Random merging: random representatives, each other token merged (size-weighted)
    into a random representative (``fuse_into="random"``) or into the one its query
    attends to most (``fuse_into="connected"``, isolating the value of TC-ViT's selection).

    Deterministic: with ``seed`` (default), block ``i`` draws from a generator seeded with
    ``seed * 1_000_003 + i`` on every call, so the patched model is a fixed function of its
    input batch. The draws cover the whole batch, so an image's merges depend on its place in
    the batch and on the batch size (an accuracy moves by noise with the batch size). With
    ``generator``, draws continue that generator's stream (reproducible as a sequence,
    different on each call).

    Args:
        seed: int seed.
        generator: optional ``torch.Generator`` on the model's device; overrides ``seed``.
        fuse_into: ``"random"`` or ``"connected"``.
        chunk_size: query rows scored at once for ``fuse_into="connected"``.
    """

    name = "random"
    export_refusal = (
        "it draws its plan from a torch.Generator at inference, which an ONNX graph cannot "
        "reproduce (ONNX random ops have their own streams)"
    )

    def __init__(
        self,
        seed: int = 0,
        generator: Optional[torch.Generator] = None,
        fuse_into: str = "random",
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ):
        super().__init__()
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if fuse_into not in _FUSE_INTO:
            raise ValueError(f"fuse_into must be one of {_FUSE_INTO}, got {fuse_into!r}")
        self.seed = int(seed)
        self.generator = generator
        self.fuse_into = fuse_into
        self.chunk_size = check_chunk_size(chunk_size)

    def max_reduction(self, num_tokens: int, num_protected: int) -> int:
        return select_and_fuse_max_reduction(num_tokens, num_protected)

    def _generator_for(self, block_index: int, device: torch.device) -> torch.Generator:
        if self.generator is not None:
            return self.generator
        return torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + block_index)

    def plan(self, x, attn: AttentionTensors, r, num_protected, block_index) -> MergePlan:
        B, N, _ = x.shape
        num_candidates = N - num_protected
        if not 0 <= r < num_candidates:
            raise ValueError(f"random keeps at least one of {num_candidates} candidate tokens, asked r={r}")
        generator = self._generator_for(block_index, x.device)
        with torch.no_grad():
            scores = torch.rand(B, num_candidates, generator=generator, device=x.device)
            keep, rest = select_representatives(scores, num_candidates - r)
            if self.fuse_into == "random":
                destination = torch.randint(
                    0, keep.shape[1], rest.shape, generator=generator, device=x.device
                )
            else:
                destination = most_connected_representative(
                    attn.q, attn.k, attn.log_size, attn.scale,
                    rest + num_protected, keep + num_protected, self.chunk_size,
                )
            return select_and_fuse_plan(keep, rest, destination, num_protected)

    def extra_repr(self) -> str:
        return f"method={self.name!r}, seed={self.seed}, fuse_into={self.fuse_into!r}"
