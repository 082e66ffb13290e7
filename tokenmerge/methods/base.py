"""What every reduction method shares: the token state, the attention tensors a block
exposes, and the :class:`TokenReducer` policy interface.

A method is a policy: given the tokens after a block's attention, it decides which
tokens leave and where they go, as a :class:`~tokenmerge.core.merge.MergePlan`. The
backend (timm, transformers) owns the model and calls the policy; the policy knows no
model. All state is passed explicitly (:class:`TokenState` in, :class:`TokenState` out),
so a patched model is re-entrant and traces under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

from typing import ClassVar, Dict, NamedTuple, Optional

import torch
from torch import nn

from ..core.matching import bipartite_max_reduction
from ..core.merge import MergePlan, merge_positions, merge_tokens, track_sources

__all__ = ["TokenState", "AttentionTensors", "TokenReducer", "SizeAwareReducer"]


class TokenState(NamedTuple):
    """Tokens travelling through the blocks.

    Attributes:
        x: ``[B, N, C]`` tokens, protected ones first.
        size: ``[B, N, 1]`` patches per token, or ``None`` while every token is one patch.
        source: ``[B, P]`` token index of each of the ``P`` input patches, or ``None`` when
            sources are not tracked.
        pos: ``[B, N, K]`` float32 coordinates of each token in the model's rotary position
            embedding frame (RoPE models, e.g. timm EVA-02), or ``None`` for models without
            RoPE. Merges average it weighted by size, like ``x``; rows of prefix tokens are
            unused (RoPE skips them).
    """

    x: torch.Tensor
    size: Optional[torch.Tensor] = None
    source: Optional[torch.Tensor] = None
    pos: Optional[torch.Tensor] = None


class AttentionTensors(NamedTuple):
    """What a block's attention computed, for methods that score tokens with it.

    Attributes:
        q, k: ``[B, H, N, D]`` queries and keys, after any q/k normalisation.
        log_size: ``[B, N]`` the proportional-attention bias that was used, or ``None``.
        scale: the softmax scale that was used.
    """

    q: torch.Tensor
    k: torch.Tensor
    log_size: Optional[torch.Tensor]
    scale: float


class TokenReducer(nn.Module):
    """A token-reduction method's policy (subclasses: ToMe, ATC, MCTF, PiToMe, DTEM, TC-ViT,
    baselines).

    Class attributes:
        name: the registry name (``tokenmerge.patch(model, method=name)``).
        tracks_size: merged tokens carry sizes, which feed proportional attention and
            size-weighted pooling. Pure pruning leaves sizes alone.
        default_prop_attn: whether proportional attention is on when
            ``tokenmerge.patch(..., prop_attn=None)`` leaves it to the method.
        export_refusal: why an ONNX export of the method could not reproduce it (e.g. it
            draws random numbers at inference), or ``None`` when it exports exactly
            (:func:`tokenmerge.export_onnx` refuses with this text).
        option_grid: ``{option: values}`` that :func:`tokenmerge.tune` may choose between on
            calibration images (one option at a time, the first value being the default);
            empty for a method whose defaults are not model-dependent. ``tune`` adds
            ``keep_norm`` for every method that fuses tokens.

    Instance attribute ``keep_norm`` (default ``False``, set by ``tokenmerge.patch(...,
    keep_norm=True)``): merged tokens keep their members' mean norm instead of the shorter
    norm of their average (:func:`~tokenmerge.core.merge.merge_tokens`). An option of every
    method, like proportional attention, because it changes how tokens are fused, not which.
    """

    name: ClassVar[str] = ""
    tracks_size: ClassVar[bool] = True
    default_prop_attn: ClassVar[bool] = True
    export_refusal: ClassVar[Optional[str]] = None
    option_grid: ClassVar[Dict[str, tuple]] = {}
    keep_norm: bool = False

    @property
    def per_image(self) -> bool:
        """Whether images of one batch may keep different numbers of tokens (ATC with a
        threshold): the block's ``r`` is then a cap, and images with fewer tokens carry
        empty slots of size 0 that proportional attention and size-weighted pooling ignore."""
        return False

    def max_reduction(self, num_tokens: int, num_protected: int) -> int:
        """The most tokens one block may remove (default: bipartite, half the mergeable)."""
        return bipartite_max_reduction(num_tokens, num_protected)

    def check_protected(self, num_protected: int, has_class_token: bool = True) -> None:
        """Raise if the method cannot work with ``num_protected`` leading tokens, the first
        being a class token or not (called by :func:`tokenmerge.patch`, so a bad combination
        fails before the first forward)."""

    def plan(
        self,
        x: torch.Tensor,
        attn: AttentionTensors,
        r: int,
        num_protected: int,
        block_index: int,
    ) -> MergePlan:
        """Decide the merge: ``x`` is ``[B, N, C]`` after the block's attention."""
        raise NotImplementedError

    def reduce(
        self,
        state: TokenState,
        attn: AttentionTensors,
        r: int,
        num_protected: int,
        block_index: int,
    ) -> TokenState:
        """Remove ``r`` tokens from ``state`` (called between attention and MLP)."""
        return self.apply_plan(state, self.plan(state.x, attn, r, num_protected, block_index))

    def apply_plan(self, state: TokenState, plan: MergePlan) -> TokenState:
        """Merge ``state`` by ``plan`` (size-weighted), follow its sources and positions."""
        x, size = merge_tokens(state.x, state.size, plan, self.keep_norm)
        source = None if state.source is None else track_sources(state.source, plan)
        pos = None if state.pos is None else merge_positions(state.pos, state.size, plan)
        return TokenState(x, size if self.tracks_size else None, source, pos)

    def extra_repr(self) -> str:
        return f"method={self.name!r}"


class SizeAwareReducer(TokenReducer):
    """A policy whose plan also weighs the tokens' sizes (MCTF's and ATC's size criterion,
    and DTEM's when it clusters).

    Subclasses implement :meth:`plan_sized`; the sizes travel in the :class:`TokenState`,
    which :meth:`reduce` passes on, while :meth:`plan` (tokens alone) plans as if every
    token were one patch.
    """

    def plan_sized(
        self,
        x: torch.Tensor,
        attn: AttentionTensors,
        size: Optional[torch.Tensor],
        r: int,
        num_protected: int,
        block_index: int,
    ) -> MergePlan:
        """:meth:`plan`, with the tokens' ``[B, N, 1]`` sizes (or ``None``)."""
        raise NotImplementedError

    def plan(self, x, attn: AttentionTensors, r, num_protected, block_index) -> MergePlan:
        return self.plan_sized(x, attn, None, r, num_protected, block_index)

    def reduce(self, state: TokenState, attn: AttentionTensors, r, num_protected, block_index) -> TokenState:
        return self.apply_plan(state, self.plan_sized(state.x, attn, state.size, r, num_protected, block_index))
