"""The token-drop bound: the speed no merge method can beat."""

from __future__ import annotations

from .base import AttentionTensors, TokenReducer, TokenState
from .registry import register_method

__all__ = ["TokenDrop"]


@register_method
class TokenDrop(TokenReducer):
    """Cut the last ``r`` tokens after attention: the same token counts as a merge method,
    with no scoring, no merge work and no size bias (attention stays on the unbiased
    fused kernel). Its accuracy is meaningless; its throughput bounds every method run
    with the same schedule.
    """

    name = "drop"
    tracks_size = False

    def reduce(self, state: TokenState, attn: AttentionTensors, r, num_protected, block_index):
        keep = state.x.shape[1] - r
        source = state.source
        if source is not None:
            source = source.clamp_max(keep)  # patches of cut tokens go to the discard slot
        pos = None if state.pos is None else state.pos[:, :keep]
        return TokenState(state.x[:, :keep], None, source, pos)
