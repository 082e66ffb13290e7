"""timm backend: token reduction inside timm's ``VisionTransformer`` family.

Patching swaps the classes of the model and of its blocks for subclasses (the ToMe and
tomesd approach), so a patched model is still a timm ``VisionTransformer`` (``isinstance``
holds, ``forward_features``/``forward_head`` keep their signatures, the state_dict keys do
not change) and :func:`unpatch_timm` swaps them back. Nothing is stored per forward: the
tokens, their sizes and their sources travel as a :class:`~tokenmerge.methods.base.TokenState`
through :meth:`MergingVisionTransformerMixin.forward_tokens`.

Covered: plain ViT/AugReg, DeiT (distilled: two protected tokens), DeiT-3 (LayerScale),
register/prefix tokens, qk-norm, average pooling and SigLIP's attention-pool (MAP) head (both
made size-weighted), ``dynamic_img_size``, ``set_grad_checkpointing()`` (each block is
recomputed in backward). Refused with the module named: other block or attention classes
(parallel, post-norm, relative-position), pools with per-token position embeddings.
timm's ``Eva`` class (EVA, EVA-02 and the other RoPE ViTs) has its own backend,
:mod:`tokenmerge.backends.timm_eva`. Other families with their own model class (BEiT,
NaFlexViT, SAM) are not timm ``VisionTransformer`` s and are refused by :func:`tokenmerge.patch`.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch import nn

from ..core.attention import proportional_attention, size_bias
from ..methods.base import AttentionTensors, TokenReducer, TokenState
from .adapter import ModelAdapter
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

__all__ = [
    "MergeConfig",
    "TimmAdapter",
    "is_timm_vit",
    "patch_timm",
    "unpatch_timm",
    "timm_attention",
    "refusal_reason",
]

_SIZE_WEIGHTED_POOLS = ("avg", "avgmax")
_SUPPORTED_POOLS = ("", "token", "avg", "avgmax", "max")


def _timm_vit_classes():
    from timm.layers import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    return VisionTransformer, Block, Attention


def is_timm_vit(model: nn.Module) -> bool:
    try:
        VisionTransformer, _, _ = _timm_vit_classes()
    except ImportError:
        return False
    return isinstance(model, VisionTransformer)


# timm's other ViT-like model classes (not VisionTransformer subclasses) and why each is refused.
_REFUSED_TIMM_CLASSES = {
    "Beit": "its attention adds a relative-position bias per token pair, which merged tokens have no "
            "position for",
    "VisionTransformerRelPos": "its attention adds a relative-position bias per token pair, which "
                               "merged tokens have no position for",
    "VisionTransformerSAM": "its attention is windowed over a 2-D token grid",
    "NaFlexVit": "it runs variable-resolution patch sequences with padding masks",
}


def refusal_reason(model: nn.Module) -> str:
    """Why a timm model that is no ``VisionTransformer`` is refused, or ``""`` if not known."""
    kind = type(model)
    if not kind.__module__.startswith("timm."):
        return ""
    return _REFUSED_TIMM_CLASSES.get(kind.__name__, "")


def timm_attention(attn: nn.Module, x: torch.Tensor, log_size: Optional[torch.Tensor], impl: str):
    """timm ``Attention.forward`` with proportional attention; also returns q and k.

    Args:
        attn: a ``timm.layers.Attention``.
        x: ``[B, N, C]`` normalised tokens.
        log_size: ``[B, N]`` log token sizes, or ``None``.
        impl: see :func:`~tokenmerge.core.attention.proportional_attention`.

    Returns:
        ``(out [B, N, C], AttentionTensors)``.
    """
    B, N, C = x.shape
    gate = getattr(attn, "gate", None)
    gate = gate(x).sigmoid() if gate is not None else None
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = proportional_attention(
        q, k, v, log_size,
        impl=impl,
        dropout_p=attn.attn_drop.p if attn.training else 0.0,
        scale=attn.scale,
    )
    out = out.transpose(1, 2).reshape(B, N, attn.num_heads * attn.head_dim)
    norm = getattr(attn, "norm", None)
    if norm is not None:
        out = norm(out)
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    return out, AttentionTensors(q, k, log_size, attn.scale)


class TimmBlockMixin(MergingBlockMixin):
    """Hooks for timm's ``Block``: ``norm1 -> attn -> ls1 -> drop_path1``, then the MLP likewise."""

    @property
    def _tm_norm1_module(self):
        return self.norm1

    def _tm_attend(self, h, log_size, impl):
        return timm_attention(self.attn, h, log_size, impl)

    def _tm_key_projection(self):
        attn = self.attn
        inner = attn.num_heads * attn.head_dim
        bias = attn.qkv.bias
        return (attn.qkv.weight[inner:2 * inner], None if bias is None else bias[inner:2 * inner],
                attn.num_heads, attn.head_dim)

    def _tm_query_key(self, h):
        attn = self.attn
        B, N, _ = h.shape
        qk = attn.qkv(h).reshape(B, N, 3, attn.num_heads, attn.head_dim)[:, :, :2].permute(2, 0, 3, 1, 4)
        return AttentionTensors(attn.q_norm(qk[0]), attn.k_norm(qk[1]), None, attn.scale)

    def _tm_after_attn(self, h):
        return self.drop_path1(self.ls1(h))

    def _tm_norm2(self, x):
        return self.norm2(x)

    def _tm_mlp(self, h):
        return self.mlp(h)

    def _tm_after_mlp(self, h):
        return self.drop_path2(self.ls2(h))

    def _tm_forward_unchanged(self, x):
        return self.forward(x)


class MergingVisionTransformerMixin(SizeAwareHeadMixin, MergingModelMixin):
    """Mixin for timm ``VisionTransformer``: token reduction in every block.

    ``forward_tokens(images)`` returns the final :class:`TokenState` (tokens after the
    final norm, their sizes and sources); ``forward_features`` returns its tokens;
    ``forward_head`` accepts ``token_sizes`` for size-weighted pooling (and a max pool that
    passes over the empty slots of per-image merging).
    """

    @property
    def _tm_blocks(self):
        return self.blocks

    def _tm_default_tokens(self) -> int:
        return _default_num_tokens(self)

    def _tm_embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` -> the tokens entering the first block."""
        x = self.patch_embed(images)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        return self.norm_pre(x)

    def _tm_logits(self, state: TokenState) -> torch.Tensor:
        """The last block's :class:`TokenState` -> logits (final norm, size-aware pooling, head)."""
        return self._tm_head(self.norm(state.x), state.size)

    def forward_tokens(self, x: torch.Tensor) -> TokenState:
        """Images ``[B, 3, H, W]`` -> final :class:`TokenState` (after the final norm)."""
        x = self._tm_embed(x)
        state, _ = run_blocks(
            self.blocks, x, self.token_reducer, self.tokenmerge_config, self.tokenmerge_schedule(x.shape[1]),
            checkpointed=self._tm_checkpointed(),
        )
        return state._replace(x=self.norm(state.x))

    def _tm_checkpointed(self) -> bool:
        """timm's ``set_grad_checkpointing(True)``, honoured as timm does (whenever gradients flow)."""
        return bool(getattr(self, "grad_checkpointing", False)) and torch.is_grad_enabled() \
            and not torch.jit.is_scripting()

    def forward_features(self, x, attn_mask=None, is_causal=False):
        _reject_masks(attn_mask, is_causal)
        return self.forward_tokens(x).x

    def _tm_head(self, x, token_sizes: Optional[torch.Tensor], pre_logits: bool = False):
        """The head on tokens and their sizes (``None``: every token is one patch)."""
        if token_sizes is None:
            return self._tokenmerge_base.forward_head(self, x, pre_logits=pre_logits)
        attention_pool = getattr(self, "attn_pool", None) is not None
        if not attention_pool and self.global_pool not in _SIZE_WEIGHTED_POOLS:
            if self.global_pool == "max":
                x = without_empty_slots(x, token_sizes)
            return self._tokenmerge_base.forward_head(self, x, pre_logits=pre_logits)
        start = 0 if self.pool_include_prefix else self.num_prefix_tokens
        tokens, sizes = x[:, start:], token_sizes[:, start:].to(x.dtype)
        if attention_pool:
            # The log-size bias the blocks' proportional attention uses: a token of size s
            # draws the pool's attention as s identical tokens would.
            pooled = self.attn_pool(tokens, attn_mask=size_bias(sizes)[:, None, None, :])
        else:
            pooled = (tokens * sizes).sum(dim=1) / sizes.sum(dim=1)
            if self.global_pool == "avgmax":
                pooled = 0.5 * (pooled + without_empty_slots(tokens, sizes).amax(dim=1))
        pooled = self.head_drop(self.fc_norm(pooled))
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x, attn_mask=None, is_causal=False):
        _reject_masks(attn_mask, is_causal)
        state = self.forward_tokens(x)
        return self._tm_head(state.x, state.size)


def _reject_masks(attn_mask, is_causal):
    if attn_mask is not None or is_causal:
        raise ValueError(
            "attention masks are not supported on a token-merged model (merging changes the "
            "token set a mask refers to); call tokenmerge.unpatch(model) to use them"
        )


def _default_num_tokens(model) -> int:
    return model.patch_embed.num_patches + model.num_prefix_tokens


def _check_supported(model: nn.Module) -> None:
    VisionTransformer, Block, Attention = _timm_vit_classes()
    kind = type(model)
    if kind.forward_features is not VisionTransformer.forward_features:
        raise TypeError(
            f"{kind.__name__} overrides VisionTransformer.forward_features; tokenmerge supports "
            "the timm VisionTransformer family whose blocks run in sequence"
        )
    if getattr(model, "attn_pool", None) is not None:
        _check_attention_pool(model.attn_pool)
    elif model.global_pool not in _SUPPORTED_POOLS:
        raise TypeError(f"global_pool={model.global_pool!r} is not supported; use one of {_SUPPORTED_POOLS}")
    for i, block in enumerate(model.blocks):
        where = f"blocks.{i} ({type(block).__name__})"
        if not isinstance(block, Block) or type(block).forward is not Block.forward:
            raise TypeError(
                f"cannot patch {where}: tokenmerge supports timm's pre-norm "
                f"`Block`; {type(block).__module__}.{type(block).__qualname__} is not one"
            )
        if not isinstance(block.attn, Attention) or type(block.attn).forward is not Attention.forward:
            raise TypeError(
                f"cannot patch {where}.attn ({type(block.attn).__name__}): tokenmerge supports "
                "timm's global self-attention `Attention` (windowed, RoPE or relative-position "
                "attention is not supported)"
            )


def _check_attention_pool(pool: nn.Module) -> None:
    """The MAP head (SigLIP, ``global_pool='map'``) is size-weighted through its ``attn_mask``."""
    from timm.layers import AttentionPoolLatent

    where = f"attn_pool ({type(pool).__name__})"
    if type(pool).forward is not AttentionPoolLatent.forward:
        raise TypeError(
            f"cannot patch {where}: tokenmerge supports timm's AttentionPoolLatent (global_pool='map'), "
            f"whose attention it weights by token size; {type(pool).__module__}.{type(pool).__qualname__} is not one"
        )
    if "attn_mask" not in inspect.signature(pool.forward).parameters:
        raise TypeError(
            f"cannot patch {where}: this timm version's AttentionPoolLatent takes no attn_mask, "
            "through which tokenmerge weights merged tokens by size; upgrade timm"
        )
    if pool.pos_embed is not None:
        raise TypeError(
            f"cannot patch {where}: it adds a position embedding per input token, which no longer "
            "lines up once tokens are merged; tokenmerge supports pools without pos_embed (the default)"
        )


def patch_timm(model: nn.Module, reducer: TokenReducer, config: MergeConfig) -> nn.Module:
    """Patch a timm ``VisionTransformer`` in place (see :func:`tokenmerge.patch`)."""
    if getattr(model, "_tokenmerge_base", None) is not None:
        unpatch_timm(model)
    _check_supported(model)
    for block in model.blocks:
        block.__class__ = patched_class(type(block), TimmBlockMixin, __name__)
    model.__class__ = patched_class(type(model), MergingVisionTransformerMixin, __name__)
    return attach_policy(model, reducer, config)


def unpatch_timm(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_timm` in place: original classes, no extra attributes."""
    return restore_classes(model)


class TimmAdapter(ModelAdapter):
    """timm ``VisionTransformer`` family (ViT, DeiT, DeiT-3, register tokens)."""

    family = "timm"
    supported = "timm VisionTransformer/DeiT/DeiT-3"

    @classmethod
    def detects(cls, model: nn.Module) -> bool:
        return is_timm_vit(model)

    @classmethod
    def refusal_reason(cls, model: nn.Module) -> str:
        return refusal_reason(model)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.model.num_prefix_tokens)

    @property
    def reads_prefix_by_position(self) -> bool:
        # global_pool="map": the attention pool reads every token, by size
        return self.num_prefix_tokens > 0 and getattr(self.model, "attn_pool", None) is None

    @property
    def has_class_token(self) -> bool:
        return getattr(self.model, "cls_token", None) is not None  # class_token=False: registers only

    @property
    def image_size(self) -> int:
        return int(self.model.patch_embed.img_size[0])

    @property
    def input_size(self) -> tuple:
        return tuple(int(s) for s in self.model.patch_embed.img_size)

    @property
    def takes_any_image_size(self) -> bool:
        return bool(getattr(self.model, "dynamic_img_size", False)) or \
            not getattr(self.model.patch_embed, "strict_img_size", True)

    @property
    def num_classes(self) -> Optional[int]:
        return int(self.model.num_classes)

    def export_refusal(self) -> str:
        if not (self.is_patched and getattr(self.model, "dynamic_img_size", False)):
            return ""
        height, width = self.input_size
        return (
            "it was built with dynamic_img_size=True, so its token count and merge schedule follow "
            "the input size, and an ONNX graph fixes one schedule. Create the model with "
            "dynamic_img_size=False and img_size=<the size to deploy> (it is "
            f"{height}x{width} now), patch it, then export"
        )

    @property
    def patch_size(self) -> tuple:
        return tuple(self.model.patch_embed.patch_size)

    @property
    def num_patches(self) -> int:
        return int(self.model.patch_embed.num_patches)

    def grid(self, height: int, width: int) -> tuple:
        patch_embed = self.model.patch_embed
        if hasattr(patch_embed, "dynamic_feat_size"):
            return tuple(patch_embed.dynamic_feat_size((height, width)))  # honours padding
        return super().grid(height, width)

    def check_image_size(self, size: int) -> None:
        # A timm ViT with a fixed input size asserts deep in its forward; say it here instead.
        if getattr(self.model.patch_embed, "strict_img_size", False):
            super().check_image_size(size)

    @property
    def blocks(self) -> list:
        return list(self.model.blocks)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return MergingVisionTransformerMixin._tm_embed(self.model, images)

    def logits(self, state: TokenState) -> torch.Tensor:
        return self.require_patched()._tm_logits(state)

    def _unmerged_tokens(self, images: torch.Tensor, **forward_kwargs) -> torch.Tensor:
        return self.model.forward_features(images, **forward_kwargs)

    @property
    def owner(self) -> nn.Module:
        return self.model

    def patch(self, reducer: TokenReducer, config: MergeConfig) -> nn.Module:
        return patch_timm(self.model, reducer, config)

    def unpatch(self) -> nn.Module:
        return unpatch_timm(self.model)

    def architecture_name(self) -> str:
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        return str(cfg.get("architecture", "") or type(self.model).__name__)
