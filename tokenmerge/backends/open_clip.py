"""open_clip backend: token reduction inside open_clip's own ``VisionTransformer``.

The image tower of OpenAI/LAION CLIP (ViT-B/32, ViT-L/14, ...), CLIPA, CoCa and the other
open_clip configs without a timm trunk. Patch the tower (``model.visual``) or the whole model
(``open_clip.CLIP``, ``CustomTextCLIP``, ``CoCa``): a whole model has its ``visual`` patched and
is marked patched itself, so ``model.encode_image`` merges image tokens (the text tower is
left alone). A :class:`~tokenmerge.zero_shot.ZeroShotClassifier` around such a model patches
the same way and is a classifier to the adapter (``num_classes``, ``logits``), which is how
``eval`` and ``tune`` run open_clip models. The adapter also gives the model's own image
preprocessing (``image_preprocessing``, ``image_transform``: open_clip's ``preprocess_cfg``,
CLIP's mean and std, not ImageNet's). Towers that are a timm trunk (``model.visual.trunk``, SigLIP, ViTamin...) are timm
models: patch the trunk, which the timm backend covers.

As in the timm backend, patching swaps the classes of the tower and of its residual blocks
for cached, importable subclasses (``isinstance`` holds, ``state_dict`` keys do not change,
:func:`unpatch_open_clip` swaps them back); tokens, sizes and sources travel as a
:class:`~tokenmerge.methods.base.TokenState` through the blocks (nothing stored per forward).

Covered (open_clip >= 2.26.1, the first release whose tower runs batch-first with
``pool_type``/``final_ln_after_pool``; tested with 3.3.0):

- blocks: ``ResidualAttentionBlock`` (``ln_1``, ``nn.MultiheadAttention`` ``attn``, ``ls_1``,
  ``ln_2``, ``mlp``, ``ls_2``; LayerScale or Identity). Attention runs through PyTorch's fused
  SDPA with proportional attention (merged tokens' log-sizes bias the keys), from the
  module's ``in_proj_weight``/``in_proj_bias``/``out_proj``. ``CustomResidualAttentionBlock``
  (open_clip 3.x: qk-norm, per-head scale, inner/attention/MLP norms) likewise; its
  scaled-cosine attention is refused.
- pooling: class token (``pool_type='tok'``), average (``'avg'``, made size-weighted: a merged
  token of size s counts as its s patches), ``final_ln_after_pool``, no ``ln_pre``
  (``no_ln_pre``), sin-cos position embeddings, ``patch_dropout``.
- CoCa's attentional pooler (``attn_pool``, and the ``parallel``/``cascade``
  ``attn_pool_contrastive``): its cross-attention sees token sizes as the blocks' attention
  does (a log-size bias through its ``attn_mask``: a merged token of size s draws the
  queries' attention as s identical tokens would).
- ``output_tokens=True``: the tower returns ``(pooled, tokens)``; under the global layout
  ``tokens`` are the *merged* tokens (``tokens_per_block()[-1] - 1`` of them after the class
  token, in merge order, not on the patch grid; :func:`tokenmerge.dense_features` gives a
  full map). With ``attn_pool`` the tokens are the pooler's queries, whose count merging
  does not change.
- ``transformer.grad_checkpointing`` (``model.set_grad_checkpointing()``): each block is
  recomputed in backward (non-reentrant torch checkpointing) whenever gradients flow.

Refused, with the module named: other block or attention classes, multi-head attention with
``add_bias_kv``/``add_zero_attn``/separate key-value widths, ``batch_first=False`` stacks,
subclasses that override the tower's forward or pooling, other pooler classes;
``pool_type='none'`` without ``attn_pool`` (the tower returns one feature per patch) under
the global layout (``layout='local'`` keeps every token and works); ``num_protected=0`` with
a class-token or average pool (the class token must stay first); ``forward_intermediates`` on
a model that merges (merged tokens fill no patch grid).
"""

from __future__ import annotations

import sys
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..core.attention import proportional_attention, size_bias
from ..methods.base import AttentionTensors, TokenReducer, TokenState
from .adapter import ModelAdapter
from .common import (
    MergeConfig,
    MergingBlockMixin,
    MergingModelMixin,
    attach_policy,
    patched_class,
    resolve_block_schedule,
    restore_classes,
    run_blocks,
)

__all__ = [
    "OpenClipAdapter",
    "is_open_clip_vit",
    "vision_tower",
    "patch_open_clip",
    "unpatch_open_clip",
    "mha_attention",
]

MIN_VERSION = "2.26.1"


def _original_type(module: nn.Module) -> type:
    return getattr(type(module), "_tokenmerge_base", None) or type(module)


def _loaded() -> bool:
    """Whether open_clip is imported. A model of it cannot exist otherwise, and importing it
    (several seconds) just to answer ``no`` would slow every other family."""
    return "open_clip.transformer" in sys.modules


def _classes():
    import open_clip.transformer as oct

    return oct


def _wrapper_classes() -> tuple:
    """The models that hold an open_clip image tower in ``visual``: open_clip's, and
    tokenmerge's :class:`~tokenmerge.zero_shot.ZeroShotClassifier` around one of them."""
    wrappers = []
    for module, name in (("open_clip.model", "CLIP"), ("open_clip.model", "CustomTextCLIP"),
                         ("open_clip.coca_model", "CoCa"), ("tokenmerge.zero_shot", "ZeroShotClassifier")):
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None:
            wrappers.append(cls)
    return tuple(wrappers)


def _is_tower(module) -> bool:
    return isinstance(module, nn.Module) and issubclass(_original_type(module), _classes().VisionTransformer)


def vision_tower(model: nn.Module) -> Optional[nn.Module]:
    """The open_clip ``VisionTransformer`` of ``model`` (the tower itself, or the ``visual`` of
    an open_clip CLIP/CustomTextCLIP/CoCa or of a ZeroShotClassifier), or ``None``."""
    if not _loaded():
        return None
    if _is_tower(model):
        return model
    if isinstance(model, _wrapper_classes()) and _is_tower(getattr(model, "visual", None)):
        return model.visual
    return None


def is_open_clip_vit(model: nn.Module) -> bool:
    """Whether ``model`` is (or holds as ``visual``) open_clip's own ``VisionTransformer``."""
    return vision_tower(model) is not None


def _zero_shot(model: nn.Module) -> Optional[nn.Module]:
    """``model`` when it is a :class:`~tokenmerge.zero_shot.ZeroShotClassifier`, else ``None``."""
    cls = getattr(sys.modules.get("tokenmerge.zero_shot"), "ZeroShotClassifier", None)
    return model if cls is not None and isinstance(model, cls) else None


def refusal_reason(model: nn.Module) -> str:
    """Why an open_clip model without its own ``VisionTransformer`` tower is refused."""
    if _zero_shot(model) is not None:
        model = model.clip
    if not _loaded() or not type(model).__module__.startswith("open_clip"):
        return ""
    visual = getattr(model, "visual", None)
    kind = type(visual).__name__
    if kind == "TimmModel":
        return (
            "its image tower is a timm model (open_clip TimmModel): patch the timm trunk, "
            "tokenmerge.patch(model.visual.trunk, ...), which the timm backend patches when it is a "
            "timm VisionTransformer"
        )
    if kind == "ModifiedResNet":
        return "its image tower is a ResNet, which keeps no token sequence to merge"
    if visual is not None:
        return f"its image tower {type(visual).__module__}.{type(visual).__qualname__} is not open_clip's VisionTransformer"
    return ""


# --------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------


def mha_attention(attn: nn.MultiheadAttention, x: torch.Tensor, log_size: Optional[torch.Tensor], impl: str):
    """Self-attention of a packed-projection ``nn.MultiheadAttention`` (batch-first tokens)
    through :func:`~tokenmerge.core.attention.proportional_attention`; also returns q and k.

    Args:
        attn: the module (``in_proj_weight``/``in_proj_bias``/``out_proj``, no ``bias_k``).
        x: ``[B, N, C]`` normalised tokens.
        log_size: ``[B, N]`` log token sizes, or ``None``.
        impl: see :func:`~tokenmerge.core.attention.proportional_attention`.

    Returns:
        ``(out [B, N, C], AttentionTensors)``.
    """
    B, N, C = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).view(B, N, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    scale = head_dim ** -0.5
    out = proportional_attention(
        q, k, v, log_size, impl=impl, dropout_p=attn.dropout if attn.training else 0.0, scale=scale
    )
    out = attn.out_proj(out.transpose(1, 2).reshape(B, N, C))
    return out, AttentionTensors(q, k, log_size, scale)


def _custom_query_key_value(attn: nn.Module, x: torch.Tensor) -> tuple:
    """q, k (after open_clip's qk-norm), v ``[B, H, N, D]`` of an open_clip ``Attention``."""
    B, N, _ = x.shape
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).view(B, N, 3, attn.num_heads, attn.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return attn.ln_q(q), attn.ln_k(k), v


def custom_attention(attn: nn.Module, x: torch.Tensor, log_size: Optional[torch.Tensor], impl: str):
    """open_clip ``Attention.forward`` (3.x, without scaled-cosine attention) with
    proportional attention; also returns q and k. ``[B, N, C]`` in and out."""
    B, N, C = x.shape
    q, k, v = _custom_query_key_value(attn, x)
    out = proportional_attention(
        q, k, v, log_size, impl=impl, dropout_p=attn.attn_drop.p if attn.training else 0.0, scale=attn.scale
    )
    if attn.head_scale is not None:
        out = out * attn.head_scale
    out = attn.ln_inner(out.transpose(1, 2).reshape(B, N, C))
    out = attn.out_drop(attn.out_proj(out))
    return out, AttentionTensors(q, k, log_size, attn.scale)


def _pool_attention(pool: nn.Module, x: torch.Tensor, sizes: Optional[torch.Tensor]) -> torch.Tensor:
    """An ``AttentionalPooler`` over tokens of the given sizes: the log-size bias enters its
    cross-attention as an additive ``attn_mask``, so a token of size s draws each query's
    attention as s identical tokens would. ``sizes=None`` calls the pooler itself."""
    if sizes is None:
        return pool(x)
    B, L, _ = x.shape
    x = pool.ln_k(x)
    q = pool.ln_q(pool.query)
    attn = pool.attn
    mask = size_bias(sizes).to(x.dtype)[:, None, None, :].expand(B, attn.num_heads, q.shape[0], L)
    return attn(q.unsqueeze(0).expand(B, -1, -1), x, x, need_weights=False,
                attn_mask=mask.reshape(B * attn.num_heads, q.shape[0], L))[0]


# --------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------


class OpenClipBlockMixin(MergingBlockMixin):
    """Hooks for ``ResidualAttentionBlock``: ``ln_1 -> attn -> ls_1``, ``ln_2 -> mlp -> ls_2``."""

    @property
    def _tm_norm1_module(self):
        return self.ln_1

    def _tm_attend(self, h, log_size, impl):
        return mha_attention(self.attn, h, log_size, impl)

    def _tm_key_projection(self):
        attn = self.attn
        width = attn.embed_dim
        bias = attn.in_proj_bias
        return (attn.in_proj_weight[width:2 * width], None if bias is None else bias[width:2 * width],
                attn.num_heads, attn.head_dim)

    def _tm_query_key(self, h):
        attn = self.attn
        B, N, C = h.shape
        bias = attn.in_proj_bias
        qk = F.linear(h, attn.in_proj_weight[:2 * C], None if bias is None else bias[:2 * C])
        q, k = qk.view(B, N, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return AttentionTensors(q, k, None, attn.head_dim ** -0.5)

    def _tm_after_attn(self, h):
        return self.ls_1(h)

    def _tm_norm2(self, x):
        return self.ln_2(x)

    def _tm_mlp(self, h):
        return self.mlp(h)

    def _tm_after_mlp(self, h):
        return self.ls_2(h)

    def _tm_forward_unchanged(self, x):
        return self(x)


class OpenClipCustomBlockMixin(OpenClipBlockMixin):
    """Hooks for ``CustomResidualAttentionBlock``: its ``Attention`` and the extra norm
    ``ln_attn`` on the attention branch (the MLP keeps its own inner norm)."""

    def _tm_attend(self, h, log_size, impl):
        return custom_attention(self.attn, h, log_size, impl)

    def _tm_key_projection(self):
        attn = self.attn
        width = attn.num_heads * attn.head_dim
        bias = attn.in_proj_bias
        return (attn.in_proj_weight[width:2 * width], None if bias is None else bias[width:2 * width],
                attn.num_heads, attn.head_dim)

    def _tm_query_key(self, h):
        q, k, _ = _custom_query_key_value(self.attn, h)
        return AttentionTensors(q, k, None, self.attn.scale)

    def _tm_after_attn(self, h):
        return self.ls_1(self.ln_attn(h))


# --------------------------------------------------------------------------------------
# The tower
# --------------------------------------------------------------------------------------


def _expand_token(token: torch.Tensor, batch_size: int) -> torch.Tensor:
    return token.view(1, 1, -1).expand(batch_size, -1, -1)


def _norms_every_token(tower: nn.Module) -> bool:
    """Whether the tower applies ``ln_post`` to every token before pooling (the default, and
    the parallel/cascade attention pools), rather than to the pooled output."""
    if tower.attn_pool is not None:
        return tower.attn_pool_contrastive is not None
    return not tower.final_ln_after_pool


class MergingOpenClipViTMixin(MergingModelMixin):
    """Mixin for open_clip's ``VisionTransformer``: token reduction in every residual block.

    ``forward_tokens(images)`` returns the final :class:`TokenState` (the last block's tokens,
    through ``ln_post`` where the tower norms every token); ``forward`` pools it with the token
    sizes (see the module docstring) and returns what the unpatched tower returns.
    """

    @property
    def _tm_blocks(self):
        return self.transformer.resblocks

    def _tm_default_tokens(self) -> int:
        return _default_num_tokens(self)

    def _tm_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` -> the tokens entering the first block (class token first)."""
        if hasattr(self, "_embeds"):  # newer open_clip releases (3.x); the same steps as below
            return self._embeds(x)
        x = self.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        x = torch.cat([_expand_token(self.class_embedding, x.shape[0]).to(x.dtype), x], dim=1)
        x = x + self.positional_embedding.to(x.dtype)
        return self.ln_pre(self.patch_dropout(x))

    def _tm_final(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_post(x) if _norms_every_token(self) else x

    def _tm_checkpointed(self) -> bool:
        """open_clip's ``set_grad_checkpointing(True)``, honoured whenever gradients flow."""
        return bool(getattr(self.transformer, "grad_checkpointing", False)) and torch.is_grad_enabled() \
            and not torch.jit.is_scripting()

    def forward_tokens(self, x: torch.Tensor) -> TokenState:
        """Images ``[B, 3, H, W]`` -> final :class:`TokenState` (see the class docstring)."""
        x = self._tm_embed(x)
        state, _ = run_blocks(
            self._tm_blocks, x, self.token_reducer, self.tokenmerge_config, self.tokenmerge_schedule(x.shape[1]),
            checkpointed=self._tm_checkpointed(),
        )
        return state._replace(x=self._tm_final(state.x))

    def _tm_global_pool(self, x: torch.Tensor, sizes: Optional[torch.Tensor]) -> tuple:
        """open_clip's ``_global_pool``, its average weighted by token size."""
        if self.pool_type == "avg":
            tokens = x[:, 1:]
            if sizes is None:
                return tokens.mean(dim=1), tokens
            weights = sizes[:, 1:].to(x.dtype)
            return (tokens * weights).sum(dim=1) / weights.sum(dim=1), tokens
        if self.pool_type == "tok":
            return x[:, 0], x[:, 1:]
        return x, x

    def _tm_pool(self, state: TokenState) -> tuple:
        """The final :class:`TokenState` -> ``(pooled, tokens)`` as the unpatched tower's
        ``_pool`` gives them (before ``proj``), pooling merged tokens by size."""
        x, sizes = state.x, state.size
        if self.attn_pool is not None:
            if self.attn_pool_contrastive is not None:  # ln_post already applied (_tm_final)
                tokens = _pool_attention(self.attn_pool, x, sizes)
                if self.attn_pool_type == "parallel":
                    pooled = _pool_attention(self.attn_pool_contrastive, x, sizes)
                else:  # cascade: pools the first pool's queries, which merging does not change
                    pooled = self.attn_pool_contrastive(tokens)
                return pooled, tokens
            x = self.ln_post(_pool_attention(self.attn_pool, x, sizes))
            return self._tm_global_pool(x, None)  # over the pooler's queries: nothing merged
        pooled, tokens = self._tm_global_pool(x, sizes)
        if self.final_ln_after_pool:
            pooled = self.ln_post(pooled)
        return pooled, tokens

    def _tm_features(self, state: TokenState) -> tuple:
        """The final :class:`TokenState` -> ``(pooled @ proj, tokens)``."""
        pooled, tokens = self._tm_pool(state)
        if self.proj is not None:
            pooled = pooled @ self.proj
        return pooled, tokens

    def forward(self, x: torch.Tensor):
        """As the unpatched tower: the image embedding, or ``(embedding, tokens)`` with
        ``output_tokens=True``, where the tokens are the merged ones (see the module docstring)."""
        pooled, tokens = self._tm_features(self.forward_tokens(x))
        if self.output_tokens:
            return pooled, tokens
        return pooled

    def forward_intermediates(self, *args, **kwargs):
        if any(self.tokenmerge_schedule()):
            raise ValueError(
                "forward_intermediates is not supported on a token-merged open_clip VisionTransformer: "
                "it returns per-block features on the patch grid, which merged tokens no longer fill. "
                "Call tokenmerge.unpatch(model) first, or use tokenmerge.dense_features for an unmerged "
                "map of the final tokens"
            )
        return super().forward_intermediates(*args, **kwargs)


def _default_num_tokens(tower: nn.Module) -> int:
    return int(tower.grid_size[0]) * int(tower.grid_size[1]) + 1


# --------------------------------------------------------------------------------------
# Patching
# --------------------------------------------------------------------------------------


def _tower_name(where: str) -> str:
    """How errors name the tower: ``visual`` inside a CLIP/CoCa model, else its class."""
    return where.rstrip(".") or "VisionTransformer"


def _check_overrides(module: nn.Module, base: type, methods: tuple, where: str, supported: str) -> None:
    kind = _original_type(module)
    for name in methods:
        if hasattr(base, name) and getattr(kind, name) is not getattr(base, name):
            raise TypeError(
                f"cannot patch {where} ({kind.__module__}.{kind.__qualname__}): it overrides "
                f"{base.__name__}.{name}, which tokenmerge replaces; tokenmerge supports {supported}"
            )


def _check_mha(attn: nn.Module, where: str) -> None:
    if not isinstance(attn, nn.MultiheadAttention) or type(attn).forward is not nn.MultiheadAttention.forward:
        raise TypeError(
            f"cannot patch {where} ({type(attn).__module__}.{type(attn).__qualname__}): tokenmerge supports "
            "torch.nn.MultiheadAttention there"
        )
    if not attn._qkv_same_embed_dim or attn.in_proj_weight is None:
        raise TypeError(f"cannot patch {where}: tokenmerge supports multi-head attention with one packed "
                        "in_proj_weight (keys and values of the embedding width)")
    if attn.bias_k is not None or attn.add_zero_attn:
        raise TypeError(f"cannot patch {where}: add_bias_kv/add_zero_attn add key tokens that have no size; "
                        "tokenmerge supports multi-head attention without them")
    if not attn.batch_first:
        raise TypeError(f"cannot patch {where}: batch_first=False (sequence-first) attention is not supported; "
                        f"tokenmerge supports open_clip >= {MIN_VERSION}, whose towers run batch-first")


def _check_pooler(pool: nn.Module, where: str) -> None:
    oct = _classes()
    if not isinstance(pool, oct.AttentionalPooler) or type(pool).forward is not oct.AttentionalPooler.forward:
        raise TypeError(
            f"cannot patch {where} ({type(pool).__module__}.{type(pool).__qualname__}): tokenmerge supports "
            "open_clip's AttentionalPooler, whose attention it weights by token size"
        )
    attn = pool.attn
    if not isinstance(attn, nn.MultiheadAttention) or attn.bias_k is not None or attn.add_zero_attn:
        raise TypeError(f"cannot patch {where}.attn: tokenmerge supports a plain nn.MultiheadAttention there")


def _check_block(block: nn.Module, where: str) -> type:
    """The mixin for one residual block; a clear error for anything else."""
    oct = _classes()
    kind = _original_type(block)
    custom = getattr(oct, "CustomResidualAttentionBlock", None)
    supported = "open_clip's pre-norm ResidualAttentionBlock and CustomResidualAttentionBlock"
    if isinstance(block, oct.ResidualAttentionBlock):
        _check_overrides(block, oct.ResidualAttentionBlock, ("forward", "attention"), where, supported)
        if hasattr(block, "ln_1_kv"):
            raise TypeError(f"cannot patch {where}: a cross-attention block (ln_1_kv) is not an image-tower block")
        _check_mha(block.attn, f"{where}.attn")
        return OpenClipBlockMixin
    if custom is not None and isinstance(block, custom):
        _check_overrides(block, custom, ("forward",), where, supported)
        attn = block.attn
        here = f"{where}.attn ({type(attn).__name__})"
        if type(attn) is not oct.Attention or not all(hasattr(attn, n) for n in ("ln_q", "ln_k", "ln_inner")):
            raise TypeError(f"cannot patch {here}: tokenmerge supports open_clip 3.x's Attention in "
                            "CustomResidualAttentionBlock")
        if attn.logit_scale is not None:
            raise TypeError(f"cannot patch {here}: scaled-cosine attention (scaled_cosine_attn=True) is not "
                            "supported; tokenmerge supports scaled dot-product attention (with or without qk_norm)")
        return OpenClipCustomBlockMixin
    raise TypeError(f"cannot patch {where} ({kind.__module__}.{kind.__qualname__}): tokenmerge supports {supported}")


def _check_supported(tower: nn.Module, where: str) -> list:
    """Raise a clear ``TypeError`` for what the patched tower would not reproduce; returns the
    mixin of each block."""
    oct = _classes()
    _check_overrides(tower, oct.VisionTransformer, ("forward", "_embeds", "_pool", "_global_pool"),
                     _tower_name(where), "open_clip's VisionTransformer")
    missing = [name for name in ("pool_type", "final_ln_after_pool", "attn_pool", "output_tokens", "grid_size")
               if not hasattr(tower, name)]
    if missing:
        raise TypeError(
            f"cannot patch this open_clip VisionTransformer: it has no {', '.join(missing)}; tokenmerge "
            f"supports open_clip >= {MIN_VERSION}"
        )
    transformer = tower.transformer
    if not getattr(transformer, "batch_first", True):
        raise TypeError(f"cannot patch {where}transformer: batch_first=False (sequence-first) stacks are not "
                        f"supported; tokenmerge supports open_clip >= {MIN_VERSION}, whose towers run batch-first")
    if tower.pool_type not in ("tok", "avg", "none"):
        raise TypeError(f"cannot patch {_tower_name(where)}: pool_type={tower.pool_type!r} "
                        "is not supported; tokenmerge supports 'tok', 'avg' and 'none'")
    if tower.attn_pool is not None:
        _check_pooler(tower.attn_pool, f"{where}attn_pool")
        contrastive = getattr(tower, "attn_pool_contrastive", None)
        if contrastive is not None:
            _check_pooler(contrastive, f"{where}attn_pool_contrastive")
            if tower.attn_pool_type not in ("parallel", "cascade"):
                raise TypeError(f"cannot patch {where}attn_pool: attn_pool_type={tower.attn_pool_type!r} is not "
                                "supported; tokenmerge supports 'parallel' and 'cascade'")
    return [_check_block(block, f"{where}transformer.resblocks.{i}")
            for i, block in enumerate(transformer.resblocks)]


def _check_pool_reads(tower: nn.Module, reducer: TokenReducer, config: MergeConfig, where: str) -> None:
    """Refuse a pool that returns one feature per patch when a global layout merges patches.
    (The class token's slot is checked for every backend by :func:`tokenmerge.patch`.)"""
    if config.layout != "global" or tower.attn_pool is not None or tower.pool_type != "none":
        return
    schedule = resolve_block_schedule(config, reducer, len(tower.transformer.resblocks), _default_num_tokens(tower))
    if any(schedule):
        raise ValueError(
            f"cannot merge tokens in {_tower_name(where)} with pool_type='none': it returns one feature per "
            "patch, and merged tokens no longer are one per patch. Use layout='local' (every block keeps all "
            "tokens), or a tower with a class-token or average pool"
        )


def patch_open_clip(model: nn.Module, reducer: TokenReducer, config: MergeConfig) -> nn.Module:
    """Patch open_clip's ``VisionTransformer`` (or the one of an open_clip CLIP/CoCa model) in
    place (see :func:`tokenmerge.patch`)."""
    tower = vision_tower(model)
    if tower is None:
        raise TypeError(f"{type(model).__qualname__} is not (and holds no) open_clip VisionTransformer")
    unpatch_open_clip(model)
    where = "" if tower is model else "visual."
    mixins = _check_supported(tower, where)
    _check_pool_reads(tower, reducer, config, where)
    for block, mixin in zip(tower.transformer.resblocks, mixins):
        block.__class__ = patched_class(type(block), mixin, __name__)
    tower.__class__ = patched_class(type(tower), MergingOpenClipViTMixin, __name__)
    attach_policy(tower, reducer, config)
    if tower is not model:
        model.tokenmerge_config = config  # marks the whole model as patched (a plain attribute)
    return model


def unpatch_open_clip(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_open_clip` in place: original classes, no extra attributes."""
    tower = vision_tower(model)
    if tower is None:
        return model
    restore_classes(tower)
    if tower is not model:
        model.__dict__.pop("tokenmerge_config", None)
        # A ZeroShotClassifier shares the tower of its clip, which carries its own marker when
        # the clip was patched before being wrapped.
        zero_shot = _zero_shot(model)
        if zero_shot is not None:
            zero_shot.clip.__dict__.pop("tokenmerge_config", None)
    return model


class OpenClipAdapter(ModelAdapter):
    """open_clip's own ``VisionTransformer``, alone or as the ``visual`` of a CLIP/CoCa model."""

    family = "open_clip"
    supported = "open_clip VisionTransformer image towers (alone or in an open_clip CLIP/CoCa model)"

    @classmethod
    def detects(cls, model: nn.Module) -> bool:
        return is_open_clip_vit(model)

    @classmethod
    def refusal_reason(cls, model: nn.Module) -> str:
        return refusal_reason(model)

    @property
    def tower(self) -> nn.Module:
        return vision_tower(self.model)

    @property
    def num_prefix_tokens(self) -> int:
        return 1  # the class token

    @property
    def reads_prefix_by_position(self) -> bool:
        return self.tower.attn_pool is None  # an attention pool reads every token, by size

    @property
    def image_size(self) -> int:
        return int(self.tower.image_size[0])

    @property
    def input_size(self) -> tuple:
        return tuple(int(s) for s in self.tower.image_size)

    @property
    def patch_size(self) -> tuple:
        return tuple(int(s) for s in self.tower.patch_size)

    @property
    def num_patches(self) -> int:
        return _default_num_tokens(self.tower) - 1

    @property
    def num_classes(self) -> Optional[int]:
        """The zero-shot classes of a ZeroShotClassifier; ``None`` otherwise (image embeddings,
        no classification head)."""
        zero_shot = _zero_shot(self.model)
        return None if zero_shot is None else zero_shot.num_classes

    def image_preprocessing(self) -> dict:
        """open_clip's preprocessing settings of the model: ``model.visual.preprocess_cfg`` as
        ``open_clip.create_model`` sets it (a pretrained tag's mean and std), over open_clip's
        defaults (OpenAI CLIP mean and std, bicubic, shorter side + centre crop); the size is
        the tower's own."""
        from dataclasses import asdict

        from open_clip.model import get_model_preprocess_cfg
        from open_clip.transform import PreprocessCfg

        tower = self.tower
        saved = get_model_preprocess_cfg(tower)
        settings = {key: saved.get(key, default) for key, default in asdict(PreprocessCfg()).items()}
        settings["size"] = self.image_size if tower.image_size[0] == tower.image_size[1] else self.input_size
        # JSON-ready (the result cache's key): tuples as lists.
        return {key: list(value) if isinstance(value, tuple) else value for key, value in settings.items()}

    def image_transform(self):
        """open_clip's own inference transform for :meth:`image_preprocessing` (what
        ``open_clip.create_model_and_transforms`` returns as its validation preprocess)."""
        from open_clip.transform import PreprocessCfg, image_transform_v2

        return image_transform_v2(PreprocessCfg(**self.image_preprocessing()), is_train=False)

    @property
    def blocks(self) -> list:
        return list(self.tower.transformer.resblocks)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return MergingOpenClipViTMixin._tm_embed(self.tower, images)

    def logits(self, state: TokenState) -> torch.Tensor:
        """The zero-shot logits of a ZeroShotClassifier (the image embedding against its class
        embeddings); other open_clip models give image embeddings, not logits."""
        zero_shot = _zero_shot(self.model)
        if zero_shot is None:
            raise TypeError(
                f"{_original_type(self.tower).__name__} has no classification head, so it gives no logits: it "
                "gives image embeddings (model.encode_image, or the tower's forward); for zero-shot logits "
                "wrap the model: tokenmerge.zero_shot.zero_shot_classifier(model, class_names, tokenizer)"
            )
        return zero_shot.classify(self.features(state))

    def features(self, state: TokenState) -> torch.Tensor:
        """The last block's :class:`TokenState` -> the tower's image embedding (final norm,
        size-aware pooling, projection)."""
        tower = self.require_patched()
        return tower._tm_features(state._replace(x=tower._tm_final(state.x)))[0]

    def _unmerged_tokens(self, images: torch.Tensor, **forward_kwargs) -> torch.Tensor:
        tower = self.tower
        x = tower.transformer(MergingOpenClipViTMixin._tm_embed(tower, images), **forward_kwargs)
        return MergingOpenClipViTMixin._tm_final(tower, x)

    @property
    def owner(self) -> nn.Module:
        return self.tower

    def patch(self, reducer: TokenReducer, config: MergeConfig) -> nn.Module:
        return patch_open_clip(self.model, reducer, config)

    def unpatch(self) -> nn.Module:
        return unpatch_open_clip(self.model)

    def architecture_name(self) -> str:
        tower = self.tower
        return (f"open_clip_vit_p{self.patch_size[0]}_w{tower.transformer.width}_"
                f"l{len(tower.transformer.resblocks)}")
