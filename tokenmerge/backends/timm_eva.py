"""timm backend for the ``Eva`` class: EVA, EVA-02, ViT-RoPE, DINOv3, PE and the other RoPE ViTs.

Patching works as for timm's ``VisionTransformer`` (:mod:`tokenmerge.backends.timm`): the
classes of the model and its blocks are swapped for subclasses, the state_dict keys do not
change and :func:`unpatch_eva` swaps them back.

Rotary position embeddings (RoPE) and merged tokens
---------------------------------------------------

EVA rotates each patch token's query and key by angles that are linear in the token's grid
coordinates, ``angle = coords @ W``, with fixed (EVA-02's ``cat``, DINOv3) or learnt per-block
(ViT-RoPE ``mixed``) frequencies ``W``; prefix tokens are not rotated. A merged token has
no single grid position, so it needs a rule. tokenmerge carries each token's *coordinates*
through the merges like any other token feature: :attr:`TokenState.pos <tokenmerge.methods.base.TokenState>`
(``[B, N, 2]``, float32) is averaged weighted by size, exactly as ToMe averages the features,
and every block rebuilds the rotation from the coordinates it receives, with the model's own
frequencies. A merged token thus sits at its patches' size-weighted centroid.

Why coordinates and not the ``(sin, cos)`` table rows: because the angles are linear in the
coordinates, rotating by the averaged coordinates is rotating by the averaged angles, a proper
rotation (it keeps the norm of q and k, so the merged token's attention logits keep their
scale), and two tokens at the same place merge into a token at that place with exactly their
rotation. Averaging ``(sin, cos)`` instead averages unit vectors: the result is shorter than
one whenever the angles differ (a 90 degree spread, common for the high frequencies, shrinks
it to 0.71), which scales that token's q and k down and flattens its attention, the more so
the further apart its patches were. Averaging the angles directly is the same rule as
averaging the coordinates, but needs ``head_dim / 2`` (``depth`` times that for learnt
per-block frequencies) numbers per token instead of two.

Consequences, tested in ``tests/test_backend_eva.py``: r=0 runs timm's own forward (bit-exact);
a merge in which every group is one token (including a permutation) changes nothing, since each
token keeps its own coordinates; two tokens with identical features and coordinates merge into
a token whose attention, with proportional attention, equals the two unmerged tokens'.

Covered: ``EvaBlock`` (pre-norm) and ``EvaBlockPostNorm`` (``use_post_norm``, EVA-02-E) with ``EvaAttention`` or ``AttentionRope`` (qkv fused with or
without EVA's q/v-bias, separate q/k/v, grouped-query k/v heads, qk-norm, the inner
``scale_attn_inner`` norm), SwiGLU/GLU/plain MLPs with or without
``scale_mlp``, layer scale (``gamma_1``/``gamma_2``), class and register tokens,
``no_embed_class``, absolute position embeddings with or without RoPE, RoPE types ``cat``
(EVA-02, ViT-RoPE axial), ``dinov3`` and ``mixed`` (learnt per-block frequencies),
``dynamic_img_size``, pools ``avg``/``avgmax`` (size-weighted), ``max``, ``token``, ``''`` and
the ``map`` attention pool (size-weighted through its mask), ``set_grad_checkpointing()`` (each
block recomputed in backward). Refused with the reason: MRoPE, other attention or block
classes, and, in training mode with
merging, patch dropout and RoPE coordinate augmentation (both draw random numbers inside timm
that the merged tokens' coordinates cannot follow).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..core.attention import proportional_attention, size_bias
from ..core.merge import initial_sources
from ..methods.base import AttentionTensors, TokenReducer, TokenState
from .common import (
    MergeConfig,
    MergingBlockMixin,
    MergingModelMixin,
    SizeAwareHeadMixin,
    attach_policy,
    patched_class,
    restore_classes,
    run_blocks,
    without_empty_slots,
)
from .timm import TimmAdapter, _check_attention_pool, _reject_masks

__all__ = [
    "TimmEvaAdapter",
    "is_timm_eva",
    "patch_eva",
    "unpatch_eva",
    "eva_attention",
    "rope_kind",
    "rope_grid",
    "rope_embedding",
]

_SUPPORTED_POOLS = ("", "token", "avg", "avgmax", "max", "map")
_SIZE_WEIGHTED_POOLS = ("avg", "avgmax")

# timm RoPE module class -> the rule its angles follow (see rope_embedding).
_ROPE_KINDS = {
    "RotaryEmbeddingCat": "cat",
    "RotaryEmbeddingDinoV3": "dinov3",
    "RotaryEmbeddingMixed": "mixed",
}


def _eva_classes():
    from timm.layers import AttentionRope
    from timm.models.eva import Eva, EvaAttention, EvaBlock, EvaBlockPostNorm

    # block class -> the mixin with its hooks
    return Eva, {EvaBlock: EvaBlockMixin, EvaBlockPostNorm: EvaPostNormBlockMixin}, (EvaAttention, AttentionRope)


def is_timm_eva(model: nn.Module) -> bool:
    try:
        Eva, _, _ = _eva_classes()
    except ImportError:
        return False
    return isinstance(model, Eva)


# --- RoPE: coordinates and the rotation built from them ----------------------------------


def rope_kind(rope: nn.Module) -> str:
    """``"cat"``, ``"dinov3"`` or ``"mixed"``: how ``rope`` turns coordinates into angles.

    Raises:
        TypeError: a RoPE module whose rule tokenmerge does not reproduce.
    """
    kind = _ROPE_KINDS.get(type(rope).__name__)
    if kind is None or not type(rope).__module__.startswith("timm."):
        raise TypeError(
            f"cannot patch rope ({type(rope).__module__}.{type(rope).__qualname__}): tokenmerge "
            f"rebuilds merged tokens' rotations for timm's {', '.join(_ROPE_KINDS)} only"
        )
    return kind


def rope_grid(rope: nn.Module, kind: str, grid_shape: tuple) -> torch.Tensor:
    """The coordinates timm's ``rope`` gives a ``grid_shape = (H, W)`` patch grid: ``[H * W, 2]`` float32.

    They are the grid timm builds (offset, reference-shape rescaling, centring included), row
    by row, so the rotation :func:`rope_embedding` rebuilds from them is timm's own table.
    """
    from timm.layers.pos_embed_sincos import _build_grid, get_mixed_grid

    shape = [int(s) for s in grid_shape]
    if kind == "mixed":
        t_x, t_y = get_mixed_grid(shape, grid_indexing=rope.grid_indexing, device=rope.freqs.device)
        return torch.stack([t_x, t_y], dim=-1).float()
    if kind == "cat":
        grid = _build_grid(
            shape, grid_type=rope.grid_type, ref_feat_shape=rope.ref_feat_shape, grid_offset=rope.grid_offset,
            grid_indexing=rope.grid_indexing, normalize_coords=rope.normalize_coords, device=rope.bands.device,
        )
    else:  # dinov3
        grid = _build_grid(
            shape, grid_type="centered", grid_offset=rope.grid_offset, grid_indexing=rope.grid_indexing,
            normalize_coords=rope.normalize_coords, ndim=2,
        )
    return grid.flatten(0, -2).float()


def _pair_layout(values: torch.Tensor, rotate_half: bool) -> torch.Tensor:
    """``[..., D/2]`` per-frequency values -> ``[..., D]`` in the layout the rotation reads:
    ``[f0, f1, .., f0, f1, ..]`` (rotate-half) or ``[f0, f0, f1, f1, ..]`` (interleaved)."""
    if rotate_half:
        return torch.cat([values, values], dim=-1)
    # ``values.repeat_interleave(2, dim=-1)``, the same copy, written so that the TorchScript
    # ONNX exporter keeps its rank (its repeat_interleave loses it with a dynamic batch, and the
    # ``cat`` of sin and cos then fails with "All tensors must have the same rank").
    return torch.stack([values, values], dim=-1).flatten(-2)


def _table_dtype(rope: nn.Module, kind: str) -> torch.dtype:
    """The dtype of ``rope.get_embed()``'s table (a cached table keeps the model's dtype)."""
    if kind == "mixed":
        return rope.freqs.dtype
    if kind == "cat":
        cached = getattr(rope, "pos_embed", None)
        return torch.float32 if cached is None else cached.dtype
    cached = getattr(rope, "pos_embed_cached", None)
    return rope.periods.dtype if cached is None else cached.dtype


def rope_embedding(rope: nn.Module, kind: str, coords: torch.Tensor, block_index: int) -> torch.Tensor:
    """The rotary embedding at arbitrary (merged, fractional) coordinates.

    The same operations, in the same order, as timm's table for the grid, so at grid
    coordinates the result is timm's table (bit for bit on the device that built it).

    Args:
        rope: the model's timm RoPE module; ``kind`` its :func:`rope_kind`.
        coords: ``[B, P, 2]`` coordinates of the rotated (patch) tokens.
        block_index: the block (learnt per-block frequencies of ``"mixed"``).

    Returns:
        ``[B, 1, P, 2 * D]`` (``[B, H, P, 2 * D]`` for ``"mixed"``): ``sin`` then ``cos``, as
        timm's ``apply_rot_embed_cat`` reads them for ``[B, H, P, D]`` queries.
    """
    if kind == "mixed":
        # timm's get_mixed_freqs, op for op, with the exportable layout (see _pair_layout).
        freqs = rope.freqs[:, block_index]
        dtype, freqs = freqs.dtype, freqs.float()
        t_x, t_y = coords[..., 0].unsqueeze(1).float(), coords[..., 1].unsqueeze(1).float()
        angles = t_x.unsqueeze(-1) * freqs[0].unsqueeze(-2) + t_y.unsqueeze(-1) * freqs[1].unsqueeze(-2)
        sin, cos = _pair_layout(angles.sin(), False), _pair_layout(angles.cos(), False)
        return torch.cat([sin, cos], dim=-1).to(dtype)
    dtype = _table_dtype(rope, kind)
    if kind == "cat":
        angles = coords.unsqueeze(-1) * rope.bands  # [B, P, 2, D/4]
    else:  # dinov3: periods instead of frequencies
        periods = rope.periods
        angles = 2 * math.pi * coords.unsqueeze(-1).to(periods.dtype) / periods
    sin, cos = angles.sin(), angles.cos()
    if kind == "cat":
        sin, cos = sin.to(dtype), cos.to(dtype)
    sin = _pair_layout(sin.flatten(-2), rope.rotate_half)
    cos = _pair_layout(cos.flatten(-2), rope.rotate_half)
    return torch.cat([sin, cos], dim=-1).to(dtype).unsqueeze(1)


def _rotate(t: torch.Tensor, emb: torch.Tensor, half: bool) -> torch.Tensor:
    """timm's ``apply_rot_embed_cat``: ``t [B, H, P, D]`` rotated by ``emb [B, 1|H, P, 2D]``."""
    from timm.layers import apply_rot_embed_cat

    return apply_rot_embed_cat(t, emb, half=half)


# --- attention --------------------------------------------------------------------------


def _eva_qkv(attn: nn.Module, x: torch.Tensor) -> tuple:
    """``x [B, N, C]`` -> ``q [B, H, N, D]``, ``k, v [B, Hkv, N, D]`` as ``EvaAttention`` or
    ``AttentionRope`` project them (before q/k-norm)."""
    B, N, _ = x.shape
    heads = attn.num_heads
    if attn.qkv is not None:
        q_bias = getattr(attn, "q_bias", None)  # EvaAttention keeps q/v biases apart (k has none)
        if q_bias is None:
            qkv = attn.qkv(x)
        else:
            bias = torch.cat((q_bias, attn.k_bias, attn.v_bias))
            qkv = attn.qkv(x) + bias if attn.qkv_bias_separate else F.linear(x, attn.qkv.weight, bias)
        return qkv.reshape(B, N, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    kv_heads = getattr(attn, "num_kv_heads", heads)
    q = attn.q_proj(x).reshape(B, N, heads, -1).transpose(1, 2)
    k = attn.k_proj(x).reshape(B, N, kv_heads, -1).transpose(1, 2)
    v = attn.v_proj(x).reshape(B, N, kv_heads, -1).transpose(1, 2)
    return q, k, v


def _repeat_heads(t: torch.Tensor, groups: int) -> torch.Tensor:
    """``t.repeat_interleave(groups, dim=1)`` for ``[B, Hkv, N, D]``, as an expand and a reshape
    (the same copy), which the TorchScript ONNX exporter writes with a dynamic batch."""
    B, heads, N, D = t.shape
    return t.unsqueeze(2).expand(B, heads, groups, N, D).reshape(B, heads * groups, N, D)


def _query_key_value(attn: nn.Module, x: torch.Tensor, rope: Optional[torch.Tensor]) -> tuple:
    """q, k (normalised, rotated, k/v expanded to every query head) and v, each ``[B, H, N, D]``."""
    q, k, v = _eva_qkv(attn, x)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        npt, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
        q = torch.cat([q[:, :, :npt], _rotate(q[:, :, npt:], rope, half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :npt], _rotate(k[:, :, npt:], rope, half)], dim=2).type_as(v)
    groups = getattr(attn, "num_kv_groups", 1)
    if groups > 1:
        k, v = _repeat_heads(k, groups), _repeat_heads(v, groups)
    return q, k, v


def eva_attention(attn: nn.Module, x: torch.Tensor, rope: Optional[torch.Tensor],
                  log_size: Optional[torch.Tensor], impl: str):
    """timm ``EvaAttention``/``AttentionRope`` forward with proportional attention.

    Args:
        attn: the block's attention.
        x: ``[B, N, C]`` normalised tokens.
        rope: the patch tokens' rotary embedding (:func:`rope_embedding`), or ``None``.
        log_size: ``[B, N]`` log token sizes, or ``None``.
        impl: see :func:`~tokenmerge.core.attention.proportional_attention`.

    Returns:
        ``(out [B, N, C], AttentionTensors)`` with the rotated q and k the attention used, so
        methods that score tokens by attention see the attention the block ran.
    """
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if attn.gate is not None else None
    q, k, v = _query_key_value(attn, x, rope)
    out = proportional_attention(
        q, k, v, log_size,
        impl=impl,
        dropout_p=attn.attn_drop.p if attn.training else 0.0,
        scale=attn.scale,
    )
    out = attn.norm(out.transpose(1, 2).reshape(B, N, -1))
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    return out, AttentionTensors(q, k, log_size, attn.scale)


# --- patched classes --------------------------------------------------------------------


class EvaBlockMixin(MergingBlockMixin):
    """Hooks for timm's ``EvaBlock``: ``norm1 -> attn(rope) -> gamma_1 -> drop_path1``, then
    the MLP likewise. ``_tm_rope`` (set by :func:`patch_eva`) is ``(rope module, kind)`` or
    ``None``: a plain attribute, not a submodule, so the state_dict is unchanged."""

    @property
    def _tm_norm1_module(self):
        return self.norm1

    def _tm_rotary(self, pos: Optional[torch.Tensor], block_index: int) -> Optional[torch.Tensor]:
        """The patch tokens' rotary embedding from the state's coordinates (``None`` without RoPE)."""
        if self._tm_rope is None:
            return None
        if pos is None:
            raise ValueError(
                "this EVA block applies rotary position embeddings and needs the tokens' coordinates "
                "(TokenState.pos): start the blocks from model.forward_tokens(images) or "
                "tokenmerge's adapter.initial_state(images), not TokenState(x)"
            )
        rope, kind = self._tm_rope
        return rope_embedding(rope, kind, pos[:, self.attn.num_prefix_tokens:], block_index)

    def _tm_attend_pos(self, h, pos, log_size, impl, block_index):
        return eva_attention(self.attn, h, self._tm_rotary(pos, block_index), log_size, impl)

    def _tm_attend(self, h, log_size, impl):
        return self._tm_attend_pos(h, None, log_size, impl, 0)

    def _tm_query_key_pos(self, h, pos, block_index):
        q, k, _ = _query_key_value(self.attn, h, self._tm_rotary(pos, block_index))
        return AttentionTensors(q, k, None, self.attn.scale)

    def _tm_query_key(self, h):
        return self._tm_query_key_pos(h, None, 0)

    def _tm_key_projection(self):
        attn = self.attn
        kv_heads = getattr(attn, "num_kv_heads", attn.num_heads)
        if attn.qkv is None:
            return attn.k_proj.weight, attn.k_proj.bias, kv_heads, attn.head_dim
        inner = attn.num_heads * attn.head_dim
        if getattr(attn, "q_bias", None) is not None:
            bias = attn.k_bias
        else:
            bias = None if attn.qkv.bias is None else attn.qkv.bias[inner:2 * inner]
        return attn.qkv.weight[inner:2 * inner], bias, attn.num_heads, attn.head_dim

    def _tm_after_attn(self, h):
        return self.drop_path1(h if self.gamma_1 is None else self.gamma_1 * h)

    def _tm_norm2(self, x):
        return self.norm2(x)

    def _tm_mlp(self, h):
        return self.mlp(h)

    def _tm_after_mlp(self, h):
        return self.drop_path2(h if self.gamma_2 is None else self.gamma_2 * h)

    def _tm_forward_unchanged_pos(self, x, pos, block_index):
        return self.forward(x, rope=self._tm_rotary(pos, block_index))

    def _tm_forward_unchanged(self, x):
        return self._tm_forward_unchanged_pos(x, None, 0)


class EvaPostNormBlockMixin(EvaBlockMixin):
    """Hooks for timm's ``EvaBlockPostNorm`` (``use_post_norm``): ``attn(rope) -> norm1 ->
    drop_path1``, then ``mlp -> norm2 -> drop_path2``. The branches read the raw residual, so
    the pre-branch norm is the identity and each norm joins its branch's output."""

    @property
    def _tm_norm1_module(self):
        return _IDENTITY

    def _tm_after_attn(self, h):
        return self.drop_path1(self.norm1(h))

    def _tm_norm2(self, x):
        return x

    def _tm_after_mlp(self, h):
        return self.drop_path2(self.norm2(h))


_IDENTITY = nn.Identity()


class MergingEvaMixin(SizeAwareHeadMixin, MergingModelMixin):
    """Mixin for timm ``Eva``: token reduction in every block, RoPE following the tokens.

    ``forward_tokens(images)`` returns the final :class:`TokenState` (tokens after the final
    norm, sizes, sources, coordinates); ``forward_head`` accepts ``token_sizes`` for
    size-weighted pooling.
    """

    @property
    def _tm_blocks(self):
        return self.blocks

    def _tm_default_tokens(self) -> int:
        return self.patch_embed.num_patches + self.num_prefix_tokens

    def _tm_num_tokens(self, images: torch.Tensor) -> int:
        """Tokens entering the first block for ``images [B, 3, H, W]``."""
        if not self.dynamic_img_size:
            return self._tm_default_tokens()
        rows, cols = self.patch_embed.dynamic_feat_size(tuple(images.shape[-2:]))
        return rows * cols + self.num_prefix_tokens

    def _tm_embed(self, images: torch.Tensor) -> tuple:
        """Images ``[B, 3, H, W]`` -> ``(tokens [B, N, C], coordinates [B, N, 2] or None)``."""
        if self.training and self.rope is not None:
            _check_training_rope(self)
        x = self.patch_embed(images)
        grid = tuple(x.shape[1:3]) if self.dynamic_img_size else tuple(self.patch_embed.grid_size)
        x, _ = self._pos_embed(x)
        x = self.norm_pre(x)
        if self.rope is None:
            return x, None
        rope, kind = self.blocks[0]._tm_rope
        return x, token_coordinates(rope_grid(rope, kind, grid), x.shape[0], self.num_prefix_tokens).to(x.device)

    def _tm_logits(self, state: TokenState) -> torch.Tensor:
        return self._tm_head(self.norm(state.x), state.size)

    def _tm_checkpointed(self) -> bool:
        """timm's ``set_grad_checkpointing(True)``, honoured as timm does (whenever gradients flow)."""
        return bool(self.grad_checkpointing) and torch.is_grad_enabled() and not torch.jit.is_scripting()

    def forward_tokens(self, images: torch.Tensor) -> TokenState:
        """Images ``[B, 3, H, W]`` -> final :class:`TokenState` (after the final norm)."""
        config = self.tokenmerge_config
        schedule = self.tokenmerge_schedule(self._tm_num_tokens(images))
        unchanged = all(config.runs_unchanged(r, None) for r in schedule)
        if unchanged and not (self.rope is not None and torch.onnx.is_in_onnx_export()):
            # Nothing merges and no MLP is shared: timm's own forward with its cached rotary
            # table, bit for bit (a table rebuilt from coordinates on another device can differ
            # in the last ulp). An ONNX export of a RoPE model takes the rebuilt rotation
            # instead, the one the TorchScript exporter writes (timm's "mixed" table exports to
            # an invalid Expand).
            x = self._tokenmerge_base.forward_features(self, images)
            B, N, _ = x.shape
            source = initial_sources(B, N, config.num_protected, x.device) if config.trace_source else None
            return TokenState(x, None, source)
        x, pos = self._tm_embed(images)
        state, _ = run_blocks(
            self.blocks, x, self.token_reducer, config, schedule, checkpointed=self._tm_checkpointed(), pos=pos,
        )
        return state._replace(x=self.norm(state.x))

    def forward_features(self, x, attn_mask=None, is_causal=False):
        _reject_masks(attn_mask, is_causal)
        return self.forward_tokens(x).x

    def _tm_head(self, x, token_sizes: Optional[torch.Tensor], pre_logits: bool = False):
        """The head on tokens and their sizes (``None``: every token is one patch)."""
        if token_sizes is None:
            return self._tokenmerge_base.forward_head(self, x, pre_logits=pre_logits)
        attention_pool = self.attn_pool is not None
        if not attention_pool and self.global_pool not in _SIZE_WEIGHTED_POOLS:
            if self.global_pool == "max":
                x = without_empty_slots(x, token_sizes)
            return self._tokenmerge_base.forward_head(self, x, pre_logits=pre_logits)
        sizes = token_sizes.to(x.dtype)
        if attention_pool:
            # Eva's attention pool reads every token, prefix included; the log-size bias makes a
            # token of size s draw the attention s identical tokens would.
            pooled = self.attn_pool(x, attn_mask=size_bias(sizes)[:, None, None, :])
        else:
            start = self.num_prefix_tokens  # Eva's avg pools exclude the prefix tokens
            tokens, sizes = x[:, start:], sizes[:, start:]
            pooled = (tokens * sizes).sum(dim=1) / sizes.sum(dim=1)
            if self.global_pool == "avgmax":
                pooled = 0.5 * (without_empty_slots(tokens, sizes).amax(dim=1) + pooled)
        pooled = self.head_drop(self.fc_norm(pooled))
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x, attn_mask=None, is_causal=False):
        _reject_masks(attn_mask, is_causal)
        state = self.forward_tokens(x)
        return self._tm_head(state.x, state.size)


def token_coordinates(grid: torch.Tensor, batch: int, num_prefix: int) -> torch.Tensor:
    """``[P, K]`` patch coordinates -> ``[B, num_prefix + P, K]`` per token (prefix rows zero:
    RoPE skips those tokens, and they are protected, so the rows are never read or merged)."""
    prefix = grid.new_zeros(num_prefix, grid.shape[-1])
    return torch.cat([prefix, grid], dim=0).unsqueeze(0).expand(batch, -1, -1)


def _check_training_rope(model: nn.Module) -> None:
    """Training-time randomness inside timm that merged tokens' coordinates cannot follow."""
    if model.patch_drop is not None:
        raise ValueError(
            "this Eva model drops patches at random in training (patch_drop_rate > 0), and timm does not "
            "say which, so tokenmerge cannot give the kept tokens their rotary positions: create the "
            "model with patch_drop_rate=0 to train it merged, or call model.eval()"
        )
    if getattr(model.rope, "aug_active", False):
        raise ValueError(
            "this Eva model's RoPE augments its coordinates at random in training (rope_shift_coords / "
            "rope_jitter_coords / rope_rescale_coords), which tokenmerge cannot reproduce for merged "
            "tokens: create the model without them to train it merged, or call model.eval()"
        )


# --- patching ---------------------------------------------------------------------------


def _check_supported(model: nn.Module) -> None:
    Eva, block_mixins, attentions = _eva_classes()
    kind = type(model)
    if kind.forward_features is not Eva.forward_features:
        raise TypeError(f"{kind.__name__} overrides Eva.forward_features; tokenmerge supports timm's Eva")
    if model.attn_pool is not None:
        _check_attention_pool(model.attn_pool)
    elif model.global_pool not in _SUPPORTED_POOLS:
        raise TypeError(f"global_pool={model.global_pool!r} is not supported; use one of {_SUPPORTED_POOLS}")
    for i, block in enumerate(model.blocks):
        where = f"blocks.{i} ({type(block).__name__})"
        if not any(type(block).forward is cls.forward for cls in block_mixins):
            raise TypeError(
                f"cannot patch {where}: tokenmerge supports timm's EvaBlock and EvaBlockPostNorm; "
                f"{type(block).__module__}.{type(block).__qualname__} is neither"
            )
        attn = block.attn
        if not any(type(attn).forward is cls.forward for cls in attentions):
            raise TypeError(
                f"cannot patch {where}.attn ({type(attn).__name__}): tokenmerge supports timm's "
                "EvaAttention and AttentionRope"
            )
        if model.rope is not None and attn.num_prefix_tokens != model.num_prefix_tokens:
            raise TypeError(
                f"cannot patch {where}.attn: it leaves {attn.num_prefix_tokens} tokens unrotated but the "
                f"model has {model.num_prefix_tokens} prefix tokens"
            )
    if model.rope is not None:
        rope_kind(model.rope)
        if model.rope_mixed != (rope_kind(model.rope) == "mixed"):
            raise TypeError("cannot patch rope: model.rope_mixed disagrees with its RoPE module's type")


def _check_rope_reproduced(model: nn.Module, rope: nn.Module, kind: str) -> None:
    """The rotation rebuilt from grid coordinates must be timm's own table: a guard against a
    timm version whose RoPE computes its angles differently."""
    if rope.training and getattr(rope, "aug_active", False):
        return  # get_embed() would draw a random augmentation
    if any(t.is_meta for t in (*rope.parameters(), *rope.buffers())):
        return  # a model built on the meta device has no values to compare
    grid = tuple(model.patch_embed.grid_size)
    with torch.no_grad():
        table = rope.get_embed(shape=list(grid)) if getattr(rope, "feat_shape", None) is None else rope.get_embed()
        if kind == "mixed":
            table = table[0]
        rebuilt = rope_embedding(rope, kind, rope_grid(rope, kind, grid).unsqueeze(0), 0)[0]
        if kind != "mixed":
            rebuilt = rebuilt[0]  # one embedding for every head
    if table.shape != rebuilt.shape or not torch.allclose(table.float(), rebuilt.float(), atol=1e-3, rtol=1e-3):
        raise TypeError(
            f"cannot patch rope ({type(rope).__name__}): the rotation tokenmerge rebuilds from token "
            f"coordinates differs from this timm version's table ({tuple(table.shape)}); tokenmerge "
            "was written against timm 1.0's RoPE, please report the timm version"
        )


def patch_eva(model: nn.Module, reducer: TokenReducer, config: MergeConfig) -> nn.Module:
    """Patch a timm ``Eva`` in place (see :func:`tokenmerge.patch`)."""
    if getattr(model, "_tokenmerge_base", None) is not None:
        unpatch_eva(model)
    _check_supported(model)
    rope = None
    if model.rope is not None:
        rope = (model.rope, rope_kind(model.rope))
        _check_rope_reproduced(model, *rope)
        if config.num_protected < model.num_prefix_tokens:
            raise ValueError(
                f"num_protected={config.num_protected}: this model's RoPE leaves its first "
                f"{model.num_prefix_tokens} (prefix) tokens unrotated by index, so they must stay first and "
                f"unmerged; use num_protected >= {model.num_prefix_tokens} (the default)"
            )
    _, block_mixins, _ = _eva_classes()
    for block in model.blocks:
        mixin = next(mixin for cls, mixin in block_mixins.items() if type(block).forward is cls.forward)
        block.__class__ = patched_class(type(block), mixin, __name__)
        block._tm_rope = rope  # a tuple, so nn.Module does not register the RoPE module twice
    model.__class__ = patched_class(type(model), MergingEvaMixin, __name__)
    return attach_policy(model, reducer, config)


def unpatch_eva(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_eva` in place: original classes, no extra attributes."""
    return restore_classes(model, block_attributes=("_tm_rope",))


class TimmEvaAdapter(TimmAdapter):
    """timm ``Eva`` family (EVA, EVA-02, ViT-RoPE, DINOv3, PE)."""

    supported = "timm Eva (EVA/EVA-02/RoPE ViTs)"

    @classmethod
    def detects(cls, model: nn.Module) -> bool:
        return is_timm_eva(model)

    @classmethod
    def refusal_reason(cls, model: nn.Module) -> str:
        return ""

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.initial_state(images).x

    def initial_state(self, images: torch.Tensor) -> TokenState:
        if self.is_patched:
            x, pos = MergingEvaMixin._tm_embed(self.model, images)
            return TokenState(x, None, None, pos)
        # Unpatched: the embedding only (the blocks need no coordinates from us).
        x = self.model.patch_embed(images)
        x, _ = self.model._pos_embed(x)
        return TokenState(self.model.norm_pre(x))

    def export_refusal(self) -> str:
        # A merging Eva exports like a VisionTransformer: the rotation each block rebuilds from
        # the carried coordinates is traced into the graph (Sin/Cos of the merged coordinates).
        # Only a patched dynamic_img_size model is refused (its schedule follows the input size).
        if not self.is_patched:
            # timm's own Eva attention fails inside the TorchScript exporter (is_causal arrives as
            # a tensor); the patched forward at r=0 is bit-identical and exports.
            return ("timm's unpatched Eva does not go through the ONNX exporter (its attention "
                    "receives is_causal as a tensor); export tokenmerge.patch(model, r=0), which is "
                    "bit-identical to the unmodified model")
        return super().export_refusal()

    def patch(self, reducer: TokenReducer, config: MergeConfig) -> nn.Module:
        return patch_eva(self.model, reducer, config)

    def unpatch(self) -> nn.Module:
        return unpatch_eva(self.model)
