"""Hugging Face transformers backend: token reduction inside HF vision encoders.

Supported (transformers 5.x module layout):

- ``ViTModel``, ``ViTForImageClassification``;
- ``DeiTModel``, ``DeiTForImageClassification``, ``DeiTForImageClassificationWithTeacher``
  (class and distillation tokens: 2 protected);
- ``CLIPVisionModel``, ``CLIPVisionModelWithProjection``, ``CLIPForImageClassification`` and
  ``CLIPModel`` (its ``vision_model`` is patched; the text tower is left alone, so
  ``get_image_features`` and ``forward`` merge image tokens only);
- ``Dinov2Model``, ``Dinov2ForImageClassification``, ``Dinov2WithRegistersModel`` and
  ``Dinov2WithRegistersForImageClassification`` (class + register tokens protected);
- ``ASTModel``, ``ASTForAudioClassification`` (Audio Spectrogram Transformer: spectrogram
  ``input_values [B, frames, mel bins]``; class and distillation tokens protected, so its
  pool, their mean, is exact);
- ``VideoMAEModel``, ``VideoMAEForVideoClassification`` (video ``pixel_values [B, T, 3, H,
  W]``, tubelets of ``tubelet_size`` frames x one patch ordered (t, h, w); no class token, so
  nothing is protected and tokens merge across space and time, as ToMe does for video). The
  mean-pooling head is size-weighted. A classifier with ``use_mean_pooling=False`` reads
  token 0, an ordinary tubelet, so merging it is refused unless ``num_protected=1`` keeps it
  in place; ``bool_masked_pos`` (pre-training masking) is refused when the model merges.
  ``HFAdapter.video_grid()`` gives the ``(t, h, w)`` grid that source maps index, and
  :func:`tokenmerge.dense_features` unmerges onto it (``[B, C, t, h, w]`` maps);
- ``VivitModel``, ``VivitForVideoClassification`` (ViViT: video ``pixel_values [B, T, 3, H,
  W]``, Conv3d tubelets of ``tubelet_size = [t, h, w]`` ordered (t, h, w) after a class
  token, learned position embeddings, ViT-style layers). The class token is protected and
  every tubelet merges across space and time; the classifier reads the class token, so it
  is an exact consumer. ``video_grid()`` and dense features work as for VideoMAE.

How it works. As in the timm backend, patching swaps classes for cached, importable
subclasses: the *trunk* (the module holding embeddings and layers, e.g. ``ViTModel``), its
layers and, where the head averages patch tokens, the wrapper. The trunk's ``forward`` runs a
:class:`~tokenmerge.methods.base.TokenState` through the layers explicitly (nothing is stored
per forward) and returns the model's usual output types (``BaseModelOutputWithPooling``,
``ImageClassifierOutput``). Parameters are untouched, so ``state_dict`` keys do not change
(as long as the method's policy has no parameters of its own; a learned policy is a
submodule ``token_reducer`` of the trunk), and ``save_pretrained``/``from_pretrained`` work:
the patched classes keep their base's ``__name__`` (HF records ``config.architectures`` from
it) while their ``__qualname__`` (``TokenMergeViTModel``...) makes them importable here, so a
patched model still pickles.

Outputs of a merged model:

- ``last_hidden_state`` holds the *merged* tokens, ``[B, N_out, C]`` with ``N_out`` =
  ``trunk.tokens_per_block()[-1]``; protected tokens (class, distillation, registers) come
  first, so class-token heads and poolers are exact consumers. Use
  :func:`tokenmerge.dense_features` for a full ``[B, H*W, C]`` map.
- ``hidden_states`` (``output_hidden_states=True``): the input of the first layer, then each
  layer's output, with shrinking token counts.
- VideoMAE's trunk returns ``BaseModelOutput`` (no pooler), as the unmodified one does;
  ViViT's returns ``BaseModelOutputWithPooling`` (its pooler reads the class token).
- Mean-pooling heads (DINOv2, CLIP image and VideoMAE video classification) are size-weighted.
- ``output_attentions`` (the keyword, or ``config.output_attentions=True``) and attention
  masks are rejected (the fused path never forms the attention matrix, and merging changes
  the token set a mask refers to).
- HF gradient checkpointing (``model.gradient_checkpointing_enable()``) is honoured in
  training mode: a layer that merges is recomputed in backward with non-reentrant torch
  checkpointing (HF's own checkpoint function and its options, such as ``use_reentrant`` or
  offloading, apply to layers with nothing to merge, which call the layer itself).

Attention follows ``config._attn_implementation``: ``"eager"`` computes
``softmax(q k^T * scale + log s) v`` explicitly (softmax in float32), anything else
(``"sdpa"``, flash, flex) uses the fused SDPA path of
:func:`~tokenmerge.core.attention.proportional_attention` with the log-size bias. A block
with nothing merged yet and nothing to merge runs the layer's own ``forward``, so ``r=0`` is
bit-identical to the unmodified model under either implementation.

Layouts. ``layout="global"`` (default, ToMe): tokens leave the sequence for good.
``layout="local"`` (tomesd): in every block the normalised tokens are merged before
attention and again before the MLP, each branch runs on the merged tokens, and its output is
copied back (unmerged) onto every token before the residual add; the residual stream keeps
all tokens, so every layer's output has the full token count. The merge is decided once per
block from the normalised tokens' queries/keys (the keys the unmerged attention would see)
by the method's own policy, read back as an assignment through source tracking; merging
itself is a size-weighted average.
"""

from __future__ import annotations

import functools
import inspect
import operator
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.utils.checkpoint
from torch import nn

from ..core.attention import proportional_attention
from ..methods.base import AttentionTensors, TokenReducer, TokenState
from .adapter import ModelAdapter
from .common import (
    MergeConfig,
    MergingBlockMixin,
    MergingModelMixin,
    patched_class,
    resolve_block_schedule,
    run_blocks,
)

__all__ = [
    "HFAdapter",
    "is_supported_hf_model",
    "supported_classes",
    "patch_hf",
    "unpatch_hf",
    "prefix_tokens",
    "vision_trunk",
    "patch_size",
    "hf_attention",
]

# --------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------


class _AttentionParts(NamedTuple):
    """What proportional attention needs from one HF self-attention module."""

    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    out: nn.Linear
    head_dim: int
    scale: float
    dropout_p: float  # 0 in eval mode
    backend: str  # config._attn_implementation


def _attention_parts(attn: nn.Module) -> _AttentionParts:
    """The projections, head width, scale and dropout of an HF attention module.

    Two layouts: ViT/DeiT/DINOv2/AST/CLIP/ViViT (transformers 5.x) keep everything in one module
    (``q_proj``/``k_proj``/``v_proj`` and ``o_proj`` or ``out_proj``); VideoMAE keeps the BERT
    layout, where ``VideoMAEAttention`` holds the self-attention (``query``/``key``/``value``)
    and, beside it, the output projection (``output.dense``).
    """
    if hasattr(attn, "q_proj"):
        out = attn.o_proj if hasattr(attn, "o_proj") else attn.out_proj
        scale = attn.scaling if hasattr(attn, "scaling") else attn.scale
        dropout = attn.attention_dropout if hasattr(attn, "attention_dropout") else attn.dropout
        q, k, v, head_dim, config = attn.q_proj, attn.k_proj, attn.v_proj, attn.head_dim, attn.config
    else:
        self_attn = attn.attention
        out, scale, dropout = attn.output.dense, self_attn.scaling, self_attn.dropout_prob
        q, k, v, config = self_attn.query, self_attn.key, self_attn.value, self_attn.config
        head_dim = self_attn.attention_head_size
    return _AttentionParts(
        q, k, v, out, head_dim, scale, dropout if attn.training else 0.0, config._attn_implementation
    )


def _project_heads(linear: nn.Linear, x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``[B, N, C]`` -> ``[B, H, N, D]``, the split HF attention modules use."""
    B, N, _ = x.shape
    return linear(x).view(B, N, -1, head_dim).transpose(1, 2)


def _eager_attention(q, k, v, log_size, scale: float, dropout_p: float) -> torch.Tensor:
    """The HF eager path with the log-size bias added to the scores. ``[B, H, N, D]`` in/out."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if log_size is not None:
        scores = scores + log_size.to(scores.dtype)[:, None, None, :]
    weights = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    if dropout_p > 0.0:
        weights = nn.functional.dropout(weights, p=dropout_p)
    return torch.matmul(weights, v)


def hf_attention(
    attn: nn.Module,
    x: torch.Tensor,
    log_size: Optional[torch.Tensor],
    impl: str,
    backend: Optional[str] = None,
):
    """An HF self-attention module's forward with proportional attention; also returns q, k.

    Args:
        attn: ``ViTAttention``/``DeiTAttention``/``Dinov2Attention``/``CLIPAttention``/
            ``VivitAttention``, or
            ``VideoMAEAttention`` (self-attention and output projection).
        x: ``[B, N, C]`` normalised tokens.
        log_size: ``[B, N]`` log token sizes, or ``None``.
        impl: proportional-attention implementation for the fused path (``auto``/``fold``/``bias``).
        backend: ``"eager"`` keeps the explicit softmax, anything else uses fused SDPA; default:
            the module's ``config._attn_implementation``.

    Returns:
        ``(out [B, N, C], AttentionTensors)``.
    """
    B, N, _ = x.shape
    parts = _attention_parts(attn)
    q = _project_heads(parts.q, x, parts.head_dim)
    k = _project_heads(parts.k, x, parts.head_dim)
    v = _project_heads(parts.v, x, parts.head_dim)
    if (backend or parts.backend) == "eager":
        out = _eager_attention(q, k, v, log_size, parts.scale, parts.dropout_p)
    else:
        out = proportional_attention(
            q, k, v, log_size, impl=impl, dropout_p=parts.dropout_p, scale=parts.scale
        )
    out = parts.out(out.transpose(1, 2).reshape(B, N, -1))
    return out, AttentionTensors(q, k, log_size, parts.scale)


def _query_key(attn: nn.Module, x: torch.Tensor) -> AttentionTensors:
    """Queries and keys of all tokens ``[B, N, C]``, for deciding a merge before attention."""
    parts = _attention_parts(attn)
    q = _project_heads(parts.q, x, parts.head_dim)
    k = _project_heads(parts.k, x, parts.head_dim)
    return AttentionTensors(q, k, None, parts.scale)


# --------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerSpec:
    """Where a pre-norm HF layer keeps the pieces of its two residual branches.

    Such a layer computes ``x = x + after_attn(attention(norm1(x)))`` and then
    ``x = x + after_mlp(mlp(norm2(x)))``. Each field names an attribute of the layer, dotted
    for a nested module (``"attention.output.dropout"``), so a plain pre-norm family is one
    ``LayerSpec(...)`` in :func:`_families`; :func:`_check_layers` resolves every name when a
    model is patched, so a wrong one fails there rather than in a forward.

    Attributes:
        attention: the self-attention module. How it lays out q/k/v and the output projection
            (one module with ``q_proj``/``k_proj``/``v_proj``, or BERT's ``attention.query``...
            beside ``output.dense``) is read by :func:`_attention_parts`, not named here.
        norm1: the norm before attention (methods with per-block parameters, DTEM, read it).
        norm2: the norm before the MLP.
        mlp: the MLP, or the modules making it up, applied in order (a tuple).
        after_attn: modules applied in order to the attention branch before the residual add
            (dropout, layer scale, drop path); a single name may be given as a string.
        after_mlp: the same for the MLP branch.
        forward_takes_mask: the layer's ``forward`` takes an attention mask after the hidden
            states (CLIP's requires one); used to run the unmodified layer.
    """

    attention: str
    norm1: str
    norm2: str
    mlp: tuple = ("mlp",)
    after_attn: tuple = ()
    after_mlp: tuple = ()
    forward_takes_mask: bool = True

    def __post_init__(self):
        for name in ("mlp", "after_attn", "after_mlp"):
            if isinstance(getattr(self, name), str):
                object.__setattr__(self, name, (getattr(self, name),))

    def named_paths(self) -> list:
        """``(field, attribute path)`` for every module the spec names."""
        single = [(name, getattr(self, name)) for name in ("attention", "norm1", "norm2")]
        chains = [(name, path) for name in ("mlp", "after_attn", "after_mlp") for path in getattr(self, name)]
        return single + chains


def _module(layer: nn.Module, path: str):
    return operator.attrgetter(path)(layer)


def _apply_in_order(layer: nn.Module, paths: tuple, h: torch.Tensor) -> torch.Tensor:
    for path in paths:
        h = _module(layer, path)(h)
    return h


class _MergingLayerMixin(MergingBlockMixin):
    """The hooks of an HF layer: the pieces its family's :class:`LayerSpec` (``_tm_spec``, set
    by a subclass per spec, see :func:`_layer_mixin`) names, attention through
    :func:`hf_attention`, and the layer's own ``forward`` when nothing is merged."""

    _tm_spec: LayerSpec

    @property
    def _tm_attention(self):
        return _module(self, self._tm_spec.attention)

    @property
    def _tm_norm1_module(self):
        return _module(self, self._tm_spec.norm1)

    def _tm_norm2(self, x):
        return _module(self, self._tm_spec.norm2)(x)

    def _tm_mlp(self, x):
        return _apply_in_order(self, self._tm_spec.mlp, x)

    def _tm_after_attn(self, h):
        return _apply_in_order(self, self._tm_spec.after_attn, h)

    def _tm_after_mlp(self, h):
        return _apply_in_order(self, self._tm_spec.after_mlp, h)

    def _tm_attend(self, h, log_size, impl):
        return hf_attention(self._tm_attention, h, log_size, impl)

    def _tm_query_key(self, h):
        return _query_key(self._tm_attention, h)

    def _tm_key_projection(self):
        parts = _attention_parts(self._tm_attention)
        return parts.k.weight, parts.k.bias, parts.k.out_features // parts.head_dim, parts.head_dim

    def _tm_forward_unchanged(self, x):
        return self(x, None) if self._tm_spec.forward_takes_mask else self(x)

    def _tm_checkpointed(self) -> bool:
        """HF's ``gradient_checkpointing_enable()`` flags each layer (``every_n_layers`` may
        skip some) and applies in training mode, as HF's layers do."""
        return bool(getattr(self, "gradient_checkpointing", False)) and self.training and torch.is_grad_enabled()

    # A merging layer is recomputed in backward with non-reentrant torch checkpointing, not
    # HF's checkpoint function: a reentrant one (use_reentrant=True) would cut the gradient
    # of the TokenState it takes. A layer that runs unchanged calls the layer itself, which
    # checkpoints with HF's function, so no layer is checkpointed twice.
    def forward_tokens(self, state, r, reducer, config, block_index):
        if not self._tm_checkpointed() or config.runs_unchanged(r, state.size):
            return super().forward_tokens(state, r, reducer, config, block_index)
        return torch.utils.checkpoint.checkpoint(
            super().forward_tokens, state, r, reducer, config, block_index, use_reentrant=False
        )

    def forward_local(self, x, r, reducer, config, block_index, pos=None):
        if not self._tm_checkpointed() or r == 0:
            return super().forward_local(x, r, reducer, config, block_index, pos)
        return torch.utils.checkpoint.checkpoint(
            super().forward_local, x, r, reducer, config, block_index, pos, use_reentrant=False
        )


# The layer specs of the supported families.
# ViT/DeiT/AST/ViViT: pre-norm, the same dropout on both branches.
_VIT_LAYER = LayerSpec("attention", "layernorm_before", "layernorm_after", after_attn="dropout", after_mlp="dropout")
# DINOv2 (with or without registers): layer scale, then drop path, on both branches.
_DINOV2_LAYER = LayerSpec(
    "attention", "norm1", "norm2",
    after_attn=("layer_scale1", "drop_path"), after_mlp=("layer_scale2", "drop_path"),
)
# CLIP: plain pre-norm residual branches.
_CLIP_LAYER = LayerSpec("self_attn", "layer_norm1", "layer_norm2")
# VideoMAE: ViT's names with BERT-style modules. ``attention.output`` and ``output`` carry the
# output projections and their dropouts, and ``output`` would also add the residual, so the
# MLP is taken apart: ``intermediate`` then ``output.dense``, with ``output.dropout`` after.
_VIDEOMAE_LAYER = LayerSpec(
    "attention", "layernorm_before", "layernorm_after",
    mlp=("intermediate", "output.dense"),
    after_attn="attention.output.dropout",
    after_mlp="output.dropout",
    forward_takes_mask=False,
)


# One importable mixin per spec: a patched layer pickles as the recipe (its base, its mixin),
# and the mixin goes by name, so a process that has patched nothing can rebuild the class.
class _ViTLayerMixin(_MergingLayerMixin):
    _tm_spec = _VIT_LAYER


class _Dinov2LayerMixin(_MergingLayerMixin):
    _tm_spec = _DINOV2_LAYER


class _CLIPLayerMixin(_MergingLayerMixin):
    _tm_spec = _CLIP_LAYER


class _VideoMAELayerMixin(_MergingLayerMixin):
    _tm_spec = _VIDEOMAE_LAYER


_LAYER_MIXINS = (_ViTLayerMixin, _Dinov2LayerMixin, _CLIPLayerMixin, _VideoMAELayerMixin)


@functools.lru_cache(maxsize=None)  # one mixin per spec, so patched layer classes are reused
def _layer_mixin(spec: LayerSpec) -> type:
    """:class:`_MergingLayerMixin` reading ``spec``: the importable one above for a family's
    spec. Any other spec gets one made here; its patched layers pickle by name only, so they
    load only in a process that patched such a layer."""
    for mixin in _LAYER_MIXINS:
        if mixin._tm_spec == spec:
            return mixin
    return type("_SpecLayerMixin", (_MergingLayerMixin,), {"_tm_spec": spec, "__module__": __name__})


def _reject_unsupported(attention_mask, kwargs, config) -> tuple:
    """Pop HF output flags from ``kwargs``; raise on what a merged model cannot provide.

    ``output_attentions`` falls back to ``config.output_attentions``, as in HF models: a
    config asking for attentions is refused like the keyword, not answered with ``None``.
    """
    if attention_mask is not None or kwargs.pop("attention_mask", None) is not None:
        raise ValueError(
            "attention masks are not supported on a token-merged model (merging changes the "
            "token set a mask refers to); call tokenmerge.unpatch(model) to use them"
        )
    output_attentions = kwargs.pop("output_attentions", None)
    if output_attentions is None and getattr(config, "output_attentions", False):
        raise ValueError(
            "the model's config.output_attentions is True, but a token-merged model cannot return "
            "attentions (the fused attention never forms the attention matrix); set "
            "model.config.output_attentions = False, pass output_attentions=False, or call "
            "tokenmerge.unpatch(model) to get them"
        )
    if output_attentions:
        raise ValueError(
            "output_attentions is not supported on a token-merged model (the fused attention "
            "never forms the attention matrix); call tokenmerge.unpatch(model) to get them"
        )
    return kwargs.pop("return_dict", None), kwargs.pop("output_hidden_states", None)


class _MergingTrunkMixin(MergingModelMixin):
    """Token reduction for an HF vision trunk (the module with embeddings and layers).

    Family mixins provide ``_tm_layers``, ``_tm_embed(pixel_values, **embed_kwargs)`` (tokens
    entering the first layer), ``_tm_final(x)`` (the sequence norm, if any),
    ``_tm_pool(last_hidden_state)``, ``_tm_patch_count()`` and ``tokenmerge_patch_size``, and
    say whether the embeddings take any image size by default (``any_image_size``) and what
    they take (``inputs``: ``"images"``, ``"spectrograms"``, ``"videos"``).
    """

    any_image_size = False
    inputs = "images"

    def _tm_final(self, x):
        return x

    def _tm_default_tokens(self) -> int:
        return self._tm_patch_count() + prefix_tokens(self)

    @property
    def _tm_blocks(self):
        return self._tm_layers

    def _tm_run(self, pixel_values, collect_hidden: bool = False, **embed_kwargs):
        """Images -> ``(final TokenState, hidden states tuple or None)``."""
        x = self._tm_embed(pixel_values, **embed_kwargs)
        state, hidden = run_blocks(
            self._tm_layers, x, self.token_reducer, self.tokenmerge_config,
            self.tokenmerge_schedule(x.shape[1]), collect_hidden,
        )
        return state._replace(x=self._tm_final(state.x)), hidden

    def forward_tokens(self, pixel_values: torch.Tensor, **embed_kwargs) -> TokenState:
        """Images ``[B, 3, H, W]`` -> final :class:`TokenState`; ``x`` is ``last_hidden_state``."""
        return self._tm_run(pixel_values, **embed_kwargs)[0]

    def _tm_forward(self, pixel_values, attention_mask, kwargs, **embed_kwargs):
        return_dict, output_hidden = _reject_unsupported(attention_mask, kwargs, self.config)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        if output_hidden is None:
            output_hidden = getattr(self.config, "output_hidden_states", False)
        if not isinstance(output_hidden, bool):
            raise ValueError(
                "a token-merged model returns all hidden states (output_hidden_states=True) "
                f"or none; got output_hidden_states={output_hidden!r}"
            )
        state, hidden = self._tm_run(pixel_values, output_hidden, **embed_kwargs)
        out = self._tm_output(state.x, hidden)
        return out if return_dict else out.to_tuple()

    def _tm_output(self, last_hidden_state, hidden_states):
        """The unmodified model's output type, holding the merged tokens."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return BaseModelOutputWithPooling(
            last_hidden_state=last_hidden_state,
            pooler_output=self._tm_pool(last_hidden_state),
            hidden_states=hidden_states,
        )


class _ViTTrunkMixin(_MergingTrunkMixin):
    """``ViTModel`` / ``DeiTModel``."""

    @property
    def _tm_layers(self):
        return self.layers

    @property
    def tokenmerge_patch_size(self) -> tuple:
        return tuple(self.embeddings.patch_embeddings.patch_size)

    def _tm_patch_count(self) -> int:
        return self.embeddings.patch_embeddings.num_patches

    def _tm_embed(self, pixel_values, bool_masked_pos=None, interpolate_pos_encoding=None):
        expected = self.embeddings.patch_embeddings.projection.weight.dtype
        if pixel_values.dtype != expected:
            pixel_values = pixel_values.to(expected)
        return self.embeddings(
            pixel_values, bool_masked_pos=bool_masked_pos, interpolate_pos_encoding=interpolate_pos_encoding
        )

    def _tm_final(self, x):
        return self.layernorm(x)

    def _tm_pool(self, x):
        return self.pooler(x) if self.pooler is not None else None

    def forward(
        self, pixel_values=None, bool_masked_pos=None, interpolate_pos_encoding=None, attention_mask=None, **kwargs
    ):
        return self._tm_forward(
            pixel_values,
            attention_mask,
            kwargs,
            bool_masked_pos=bool_masked_pos,
            interpolate_pos_encoding=interpolate_pos_encoding,
        )


class _Dinov2TrunkMixin(_MergingTrunkMixin):
    """``Dinov2Model`` / ``Dinov2WithRegistersModel``."""

    any_image_size = True  # DINOv2 always interpolates its position embeddings

    @property
    def _tm_layers(self):
        return self.encoder.layer

    @property
    def tokenmerge_patch_size(self) -> tuple:
        return _pair(self.embeddings.patch_embeddings.patch_size)

    def _tm_patch_count(self) -> int:
        return self.embeddings.patch_embeddings.num_patches

    def _tm_embed(self, pixel_values, bool_masked_pos=None):
        return self.embeddings(pixel_values, bool_masked_pos=bool_masked_pos)

    def _tm_final(self, x):
        return self.layernorm(x)

    def _tm_pool(self, x):
        return x[:, 0, :]

    def forward(self, pixel_values=None, bool_masked_pos=None, attention_mask=None, **kwargs):
        return self._tm_forward(pixel_values, attention_mask, kwargs, bool_masked_pos=bool_masked_pos)


class _CLIPVisionTrunkMixin(_MergingTrunkMixin):
    """``CLIPVisionModel``: pre-layernorm before the layers; the class token is
    post-layernormed into ``pooler_output`` while ``last_hidden_state`` stays un-normed."""

    @property
    def _tm_layers(self):
        return self.encoder.layers

    @property
    def tokenmerge_patch_size(self) -> tuple:
        return _pair(self.embeddings.patch_size)

    def _tm_patch_count(self) -> int:
        return self.embeddings.num_patches

    def _tm_embed(self, pixel_values, interpolate_pos_encoding=False):
        return self.pre_layrnorm(self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding))

    def _tm_pool(self, x):
        return self.post_layernorm(x[:, 0, :])

    def forward(self, pixel_values=None, interpolate_pos_encoding=False, **kwargs):
        return self._tm_forward(
            pixel_values, None, kwargs, interpolate_pos_encoding=bool(interpolate_pos_encoding)
        )


class _ASTTrunkMixin(_MergingTrunkMixin):
    """``ASTModel`` (Audio Spectrogram Transformer): ViT layers over overlapping spectrogram
    patches of ``input_values [B, frames, mel bins]``, class and distillation tokens first,
    pooled as their mean (both protected, so the pool is exact)."""

    @property
    def _tm_layers(self):
        return self.layers

    @property
    def tokenmerge_patch_size(self) -> tuple:
        return _pair(self.embeddings.patch_embeddings.projection.kernel_size)

    def _tm_patch_count(self) -> int:
        frequency, time = self.embeddings.get_shape(self.config)
        return frequency * time

    def _tm_embed(self, input_values):
        return self.embeddings(input_values)

    def _tm_final(self, x):
        return self.layernorm(x)

    def _tm_pool(self, x):
        return (x[:, 0] + x[:, 1]) / 2

    inputs = "spectrograms"

    def forward(self, input_values=None, attention_mask=None, **kwargs):
        return self._tm_forward(input_values, attention_mask, kwargs)


class _VideoMAETrunkMixin(_MergingTrunkMixin):
    """``VideoMAEModel``: ``pixel_values [B, T, 3, H, W]`` cut into tubelets of
    ``tubelet_size`` frames x one patch, ordered (t, h, w); fixed sinusoidal position
    embeddings are added in the embeddings, and there is no class token, so every token is
    mergeable (across space and time, as ToMe does for video). The final norm exists only
    without mean pooling; the output has no pooler."""

    inputs = "videos"

    @property
    def _tm_layers(self):
        return self.encoder.layer

    @property
    def tokenmerge_patch_size(self) -> tuple:
        return tuple(self.embeddings.patch_embeddings.patch_size)

    @property
    def tokenmerge_tubelet_size(self) -> int:
        return self.embeddings.patch_embeddings.tubelet_size

    def _tm_patch_count(self) -> int:
        return self.embeddings.num_patches

    def _tm_embed(self, pixel_values, bool_masked_pos=None):
        x = self.embeddings(pixel_values, bool_masked_pos)
        if bool_masked_pos is not None and any(self.tokenmerge_schedule(x.shape[1])):
            # The masked embeddings hold only the visible tubelets, and their consumer (the
            # pre-training decoder) needs one output per visible tubelet, in order.
            raise ValueError(
                f"bool_masked_pos is not supported on a token-merged {_original_type(self).__name__}: "
                "masking keeps only the visible tubelets, and a pre-training decoder needs one "
                "output per visible tubelet, which merging removes; call tokenmerge.unpatch(model) "
                "(or patch with r=0) to run masked inputs"
            )
        return x

    def _tm_final(self, x):
        return x if self.layernorm is None else self.layernorm(x)

    def _tm_pool(self, x):
        return None

    def _tm_output(self, last_hidden_state, hidden_states):
        from transformers.modeling_outputs import BaseModelOutput

        return BaseModelOutput(last_hidden_state=last_hidden_state, hidden_states=hidden_states)

    def forward(self, pixel_values=None, bool_masked_pos=None, **kwargs):
        return self._tm_forward(pixel_values, None, kwargs, bool_masked_pos=bool_masked_pos)


class _VivitTrunkMixin(_MergingTrunkMixin):
    """``VivitModel``: ``pixel_values [B, T, 3, H, W]`` cut by a Conv3d into tubelets of
    ``tubelet_size = [t, h, w]`` (frames, pixel rows, pixel columns), ordered (t, h, w) after a
    class token; learned position embeddings are added in the embeddings. The class token is
    protected; every tubelet merges (across space and time). ViT-style layers."""

    inputs = "videos"

    @property
    def _tm_layers(self):
        return self.layers

    @property
    def tokenmerge_patch_size(self) -> tuple:
        return tuple(int(v) for v in self.config.tubelet_size[1:])

    @property
    def tokenmerge_tubelet_size(self) -> int:
        return int(self.config.tubelet_size[0])

    def _tm_patch_count(self) -> int:
        return self.embeddings.patch_embeddings.num_patches

    def _tm_embed(self, pixel_values, interpolate_pos_encoding=False):
        return self.embeddings(pixel_values, interpolate_pos_encoding=bool(interpolate_pos_encoding))

    def _tm_final(self, x):
        return self.layernorm(x)

    def _tm_pool(self, x):
        return self.pooler(x) if self.pooler is not None else None

    def forward(self, pixel_values=None, interpolate_pos_encoding=False, attention_mask=None, **kwargs):
        return self._tm_forward(
            pixel_values, attention_mask, kwargs, interpolate_pos_encoding=interpolate_pos_encoding
        )


def _pair(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


# --------------------------------------------------------------------------------------
# Wrappers whose heads average patch tokens: made size-weighted
# --------------------------------------------------------------------------------------


def _weighted_mean(tokens: torch.Tensor, size: Optional[torch.Tensor]) -> torch.Tensor:
    """``[B, N, C]`` tokens, ``[B, N, 1]`` sizes (or ``None``) -> ``[B, C]`` mean over patches."""
    if size is None:
        return tokens.mean(dim=1)  # exactly the unmodified head's pooling
    size = size.to(tokens.dtype)
    return (tokens * size).sum(dim=1) / size.sum(dim=1)


def _patch_mean(state: TokenState, start: int) -> torch.Tensor:
    """``[B, C]`` size-weighted mean of the tokens from ``start`` on."""
    size = None if state.size is None else state.size[:, start:]
    return _weighted_mean(state.x[:, start:], size)


# Heads: ``(wrapper, final TokenState) -> logits``, the wrapper's own head on merged tokens.


def _class_token_head(model, state: TokenState) -> torch.Tensor:
    return model.classifier(state.x[:, 0])


def _teacher_head(model, state: TokenState) -> torch.Tensor:
    """DeiT with teacher: the mean of the class-token and distillation-token classifiers."""
    return (model.cls_classifier(state.x[:, 0]) + model.distillation_classifier(state.x[:, 1])) / 2


def _dinov2_head(model, state: TokenState) -> torch.Tensor:
    """``[class token, mean of patches]`` (registers excluded)."""
    patches = _patch_mean(state, prefix_tokens(model))
    return model.classifier(torch.cat([state.x[:, 0], patches], dim=1))


def _ast_head(model, state: TokenState) -> torch.Tensor:
    """AST: the classifier on the mean of the class and distillation tokens."""
    return model.classifier((state.x[:, 0] + state.x[:, 1]) / 2)


def _clip_head(model, state: TokenState) -> torch.Tensor:
    return model.classifier(_patch_mean(state, 1))


def _videomae_head(model, state: TokenState) -> torch.Tensor:
    """VideoMAE: ``fc_norm`` of the mean of all tokens (there is no class token); without mean
    pooling, token 0 after the final norm (only reached unmerged or with token 0 protected,
    see :func:`_check_token_zero_head`)."""
    if model.fc_norm is None:
        return model.classifier(state.x[:, 0])
    return model.classifier(model.fc_norm(_patch_mean(state, 0)))


@functools.lru_cache(maxsize=None)
def _embed_keywords(trunk_class: type) -> tuple:
    """The keywords a patched trunk's ``_tm_embed`` takes besides its inputs."""
    return tuple(inspect.signature(trunk_class._tm_embed).parameters)[2:]  # after self, the inputs


class _MeanPoolClassifierMixin:
    """Wrappers whose heads average patch tokens (DINOv2, CLIP, VideoMAE classification): the
    head runs on the merged tokens with size-weighted averaging."""

    def forward(self, pixel_values=None, labels=None, attention_mask=None, **kwargs):
        from transformers.modeling_outputs import ImageClassifierOutput

        return_dict, output_hidden = _reject_unsupported(attention_mask, kwargs, self.config)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        trunk = vision_trunk(self)
        # HF's classifiers hand their keywords to the trunk (CLIP's interpolate_pos_encoding,
        # VideoMAE's bool_masked_pos), so the embedding keywords go there, not to the loss.
        embed_kwargs = {name: kwargs.pop(name) for name in _embed_keywords(type(trunk)) if name in kwargs}
        state, hidden = trunk._tm_run(pixel_values, bool(output_hidden), **embed_kwargs)
        logits = _wrappers()[_original_type(self)][1](self, state)
        loss = None if labels is None else self.loss_function(labels, logits, self.config, **kwargs)
        out = ImageClassifierOutput(loss=loss, logits=logits, hidden_states=hidden)
        return out if return_dict else out.to_tuple()


# --------------------------------------------------------------------------------------
# Registry of supported classes
# --------------------------------------------------------------------------------------


class _Family(NamedTuple):
    """A supported trunk class's patch: its trunk mixin, the class each of its layers must be,
    how those layers are laid out, and the self-attention class each must hold."""

    trunk_mixin: type
    layer: type
    layer_spec: LayerSpec
    attention: type


@functools.lru_cache(maxsize=None)  # fixed once transformers is imported; read on every forward
def _families() -> dict:
    """``trunk class -> _Family``."""
    import transformers.models.audio_spectrogram_transformer.modeling_audio_spectrogram_transformer as ast
    import transformers.models.clip.modeling_clip as clip
    import transformers.models.deit.modeling_deit as deit
    import transformers.models.dinov2.modeling_dinov2 as dinov2
    import transformers.models.videomae.modeling_videomae as videomae
    import transformers.models.vit.modeling_vit as vit
    import transformers.models.vivit.modeling_vivit as vivit

    families = {
        ast.ASTModel: _Family(_ASTTrunkMixin, ast.ASTLayer, _VIT_LAYER, ast.ASTAttention),
        vit.ViTModel: _Family(_ViTTrunkMixin, vit.ViTLayer, _VIT_LAYER, vit.ViTAttention),
        deit.DeiTModel: _Family(_ViTTrunkMixin, deit.DeiTLayer, _VIT_LAYER, deit.DeiTAttention),
        dinov2.Dinov2Model: _Family(_Dinov2TrunkMixin, dinov2.Dinov2Layer, _DINOV2_LAYER, dinov2.Dinov2Attention),
        clip.CLIPVisionModel: _Family(_CLIPVisionTrunkMixin, clip.CLIPEncoderLayer, _CLIP_LAYER, clip.CLIPAttention),
        videomae.VideoMAEModel: _Family(
            _VideoMAETrunkMixin, videomae.VideoMAELayer, _VIDEOMAE_LAYER, videomae.VideoMAEAttention
        ),
        # ViViT's layer is ViT's (layernorm_before/after, attention, mlp, dropout); its attention
        # keeps q_proj/k_proj/v_proj/o_proj in one module, as CLIP's does.
        vivit.VivitModel: _Family(_VivitTrunkMixin, vivit.VivitLayer, _VIT_LAYER, vivit.VivitAttention),
    }
    try:
        import transformers.models.dinov2_with_registers.modeling_dinov2_with_registers as dreg
    except ImportError:  # older transformers
        pass
    else:
        families[dreg.Dinov2WithRegistersModel] = _Family(
            _Dinov2TrunkMixin, dreg.Dinov2WithRegistersLayer, _DINOV2_LAYER, dreg.Dinov2WithRegistersAttention
        )
    return families


@functools.lru_cache(maxsize=None)  # fixed once transformers is imported; read on every forward
def _wrappers() -> dict:
    """``wrapper class -> (trunk attribute, head or None, whether the head averages tokens)``."""
    import transformers.models.audio_spectrogram_transformer.modeling_audio_spectrogram_transformer as ast
    import transformers.models.clip.modeling_clip as clip
    import transformers.models.deit.modeling_deit as deit
    import transformers.models.dinov2.modeling_dinov2 as dinov2
    import transformers.models.videomae.modeling_videomae as videomae
    import transformers.models.vit.modeling_vit as vit
    import transformers.models.vivit.modeling_vivit as vivit

    wrappers = {
        ast.ASTForAudioClassification: ("audio_spectrogram_transformer", _ast_head, False),
        vit.ViTForImageClassification: ("vit", _class_token_head, False),
        deit.DeiTForImageClassification: ("deit", _class_token_head, False),
        deit.DeiTForImageClassificationWithTeacher: ("deit", _teacher_head, False),
        clip.CLIPModel: ("vision_model", None, False),
        clip.CLIPVisionModelWithProjection: ("vision_model", None, False),
        clip.CLIPForImageClassification: ("vision_model", _clip_head, True),
        dinov2.Dinov2ForImageClassification: ("dinov2", _dinov2_head, True),
        videomae.VideoMAEForVideoClassification: ("videomae", _videomae_head, True),
        vivit.VivitForVideoClassification: ("vivit", _class_token_head, False),
    }
    try:
        import transformers.models.dinov2_with_registers.modeling_dinov2_with_registers as dreg
    except ImportError:
        pass
    else:
        wrappers[dreg.Dinov2WithRegistersForImageClassification] = ("dinov2_with_registers", _dinov2_head, True)
    return wrappers


def supported_classes() -> list:
    """Every Hugging Face class tokenmerge patches: trunks, then wrappers."""
    return list(_families()) + list(_wrappers())


def _original_type(module: nn.Module) -> type:
    return getattr(type(module), "_tokenmerge_base", None) or type(module)


def is_supported_hf_model(model: nn.Module) -> bool:
    """Whether ``model`` is (or wraps) a supported HF vision encoder, patched or not."""
    try:
        kind = _original_type(model)
        return kind in _families() or kind in _wrappers()
    except ImportError:
        return False


def vision_trunk(model: nn.Module) -> nn.Module:
    """The module holding the embeddings and layers: the model itself or its vision encoder."""
    kind = _original_type(model)
    if kind in _families():
        return model
    wrappers = _wrappers()
    if kind in wrappers:
        return getattr(model, wrappers[kind][0])
    raise TypeError(
        f"{type(model).__module__}.{type(model).__qualname__} is not a supported Hugging Face "
        "vision encoder (ViT, DeiT, CLIP vision, DINOv2), AST audio encoder or VideoMAE/ViViT "
        "video encoder"
    )


def prefix_tokens(model: nn.Module) -> int:
    """Leading non-patch tokens: 1 class token, DeiT's and AST's distillation token, DINOv2
    registers; none in VideoMAE (ViViT has its class token)."""
    import transformers.models.audio_spectrogram_transformer.modeling_audio_spectrogram_transformer as ast
    import transformers.models.deit.modeling_deit as deit
    import transformers.models.videomae.modeling_videomae as videomae

    trunk = vision_trunk(model)
    if _original_type(trunk) in (deit.DeiTModel, ast.ASTModel):  # class + distillation token
        return 2
    if _original_type(trunk) is videomae.VideoMAEModel:
        return 0
    return 1 + int(getattr(trunk.config, "num_register_tokens", 0) or 0)


def _hook(trunk: nn.Module, name: str):
    """The family mixin's ``name`` bound to ``trunk``, patched or not (a property's value, a
    bound method)."""
    return getattr(_families()[_original_type(trunk)].trunk_mixin, name).__get__(trunk)


def patch_size(model: nn.Module) -> tuple:
    """``(height, width)`` of one patch in pixels."""
    return _hook(vision_trunk(model), "tokenmerge_patch_size")


# --------------------------------------------------------------------------------------
# Patching
# --------------------------------------------------------------------------------------

def _patched_class(base: type, mixin: type) -> type:
    # __name__ stays the base's: transformers writes it into config.architectures.
    return patched_class(base, mixin, __name__, keep_name=True)


def _check_spec(layer: nn.Module, spec: LayerSpec, here: str) -> None:
    """Every module ``spec`` names exists on ``layer``: a wrong name fails at patch time,
    naming the layer and the attribute, not halfway through a forward."""
    for field, path in spec.named_paths():
        found, reached = layer, type(layer).__name__
        for name in path.split("."):
            if not hasattr(found, name):
                raise TypeError(
                    f"cannot patch {here}: its LayerSpec names {field}={path!r}, but {reached} "
                    f"has no attribute {name!r}"
                )
            found, reached = getattr(found, name), f"{reached}.{name}"
        if not callable(found):
            raise TypeError(
                f"cannot patch {here}: its LayerSpec names {field}={path!r}, but {reached} is "
                f"{type(found).__name__}, not a module"
            )


def _check_layers(trunk: nn.Module, family: _Family, where: str) -> None:
    trunk_cls, layer_cls, attention_cls = _original_type(trunk), family.layer, family.attention
    for i, layer in enumerate(_hook(trunk, "_tm_layers")):
        here = f"{where}layer {i} ({type(layer).__qualname__})"
        base = _original_type(layer)
        if base is not layer_cls:
            raise TypeError(
                f"cannot patch {here} of {trunk_cls.__name__}: tokenmerge supports "
                f"{layer_cls.__name__}; {base.__module__}.{base.__qualname__} is not one"
            )
        _check_spec(layer, family.layer_spec, f"{here} of {trunk_cls.__name__}")
        attention = _module(layer, family.layer_spec.attention)
        if type(attention) is not attention_cls:
            raise TypeError(
                f"cannot patch {here}.{family.layer_spec.attention} ({type(attention).__name__}) of "
                f"{trunk_cls.__name__}: tokenmerge supports its global self-attention "
                f"{attention_cls.__name__} (windowed or relative-position attention is not supported)"
            )


def _merges(model: nn.Module, reducer: TokenReducer, config: MergeConfig) -> bool:
    """Whether ``config`` removes any token at the model's default input size."""
    trunk = vision_trunk(model)
    num_tokens = _hook(trunk, "_tm_patch_count")() + prefix_tokens(trunk)
    return any(resolve_block_schedule(config, reducer, len(_hook(trunk, "_tm_layers")), num_tokens))


def _check_token_zero_head(model: nn.Module, reducer: TokenReducer, config: MergeConfig) -> None:
    """Refuse a head that reads token 0 when token 0 is an ordinary, mergeable patch.

    A VideoMAE classifier without mean pooling classifies ``last_hidden_state[:, 0]``, but
    VideoMAE has no class token: token 0 is the first tubelet, and global merging averages it
    into other tubelets or moves it, so the head would read another token. Protecting it
    (``num_protected=1``) keeps it in place, as a class token is kept; the local layout keeps
    every token in place.
    """
    import transformers.models.videomae.modeling_videomae as videomae

    if _original_type(model) is not videomae.VideoMAEForVideoClassification or model.fc_norm is not None:
        return
    if config.num_protected > 0 or config.layout != "global":
        return
    if _merges(model, reducer, config):
        raise ValueError(
            f"cannot merge tokens in {_original_type(model).__name__} with "
            "config.use_mean_pooling=False: its head classifies token 0, which is an ordinary "
            "tubelet (VideoMAE has no class token), so merging would change what the head reads. "
            "Patch with num_protected=1 to keep token 0 out of merging (as a class token is), "
            "use a mean-pooling checkpoint, or layout='local'"
        )


def patch_hf(model: nn.Module, reducer: TokenReducer, config: MergeConfig) -> nn.Module:
    """Patch a supported HF model in place (see :func:`tokenmerge.patch`).

    Args:
        model: a trunk (``ViTModel``...) or a supported wrapper (``CLIPModel``...).
        reducer: the method's policy.
        config: a :class:`~tokenmerge.backends.common.MergeConfig` (its ``layout`` is
            ``"global"``, ToMe, or ``"local"``, tomesd; see :mod:`tokenmerge.backends.common`).
    """
    if not is_supported_hf_model(model):
        vision_trunk(model)  # raises the TypeError naming the class
    unpatch_hf(model)
    trunk = vision_trunk(model)
    family = _families()[type(trunk)]
    where = "" if trunk is model else f"{type(model).__name__}: "
    _check_layers(trunk, family, where)
    _check_token_zero_head(model, reducer, config)
    layer_mixin = _layer_mixin(family.layer_spec)
    for layer in _hook(trunk, "_tm_layers"):
        layer.__class__ = _patched_class(type(layer), layer_mixin)
    trunk.__class__ = _patched_class(type(trunk), family.trunk_mixin)
    if trunk is not model:
        if _wrappers()[type(model)][2]:
            model.__class__ = _patched_class(type(model), _MeanPoolClassifierMixin)
        model.tokenmerge_config = config  # marks the wrapper as patched (a plain attribute)
    trunk.token_reducer = reducer
    trunk.tokenmerge_config = config
    trunk._tokenmerge_schedules = {}
    trunk.tokenmerge_schedule()  # validate and warn now, for the model's default input size
    return model


def unpatch_hf(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_hf` in place: original classes, no extra attributes."""
    trunk = vision_trunk(model)
    if getattr(type(trunk), "_tokenmerge_base", None) is not None:
        for layer in trunk._tm_layers:
            base = getattr(type(layer), "_tokenmerge_base", None)
            if base is not None:
                layer.__class__ = base
        trunk.__class__ = trunk._tokenmerge_base
        for name in ("token_reducer", "tokenmerge_config", "_tokenmerge_schedules"):
            delattr(trunk, name)
    if trunk is not model:
        # Also when the trunk was unpatched on its own: a mean-pool wrapper left patched would
        # call the trunk's merging hooks, which are gone.
        model.__class__ = _original_type(model)
        model.__dict__.pop("tokenmerge_config", None)
    return model


class HFAdapter(ModelAdapter):
    """Hugging Face vision encoders: a trunk (``ViTModel``...) or a supported wrapper."""

    family = "transformers"
    supported = (
        "Hugging Face ViT/DeiT/CLIP/DINOv2 vision encoders, AST audio encoders and VideoMAE/ViViT "
        "video encoders"
    )

    @classmethod
    def detects(cls, model: nn.Module) -> bool:
        return is_supported_hf_model(model)

    @property
    def trunk(self) -> nn.Module:
        return vision_trunk(self.model)

    @property
    def num_prefix_tokens(self) -> int:
        return prefix_tokens(self.model)

    @property
    def inputs(self) -> str:
        return _families()[_original_type(self.trunk)].trunk_mixin.inputs

    _inputs = inputs  # the name the video helpers use

    @property
    def image_size(self) -> int:
        inputs = self._inputs
        if inputs != "images":
            feed = "input_values" if inputs == "spectrograms" else "pixel_values [B, T, 3, H, W]"
            files = "WAV/FLAC" if inputs == "spectrograms" else "video"
            raise TypeError(
                f"{_original_type(self.trunk).__name__} takes {inputs}, not images: tokenmerge "
                f"eval, bench and train take it with --data, a folder of class sub-folders of {files} "
                "files, and visualize takes one such file; the image-only commands (tune, export) "
                "do not apply to it. "
                f"In Python, patch it with tokenmerge.patch and feed it {feed}"
            )
        return int(_pair(self.trunk.config.image_size)[0])

    @property
    def input_size(self) -> tuple:
        height = self.image_size  # refuses audio and video encoders, naming what they take
        return height, int(_pair(self.trunk.config.image_size)[1])

    @property
    def takes_any_image_size(self) -> bool:
        return _families()[_original_type(self.trunk)].trunk_mixin.any_image_size

    @property
    def num_classes(self) -> Optional[int]:
        if _wrappers().get(_original_type(self.model), (None, None))[1] is None:
            return None  # a trunk, or CLIPModel and its projection: features, no logits
        return int(self.model.config.num_labels)

    def video_grid(self, frames: Optional[int] = None, height: Optional[int] = None,
                   width: Optional[int] = None) -> tuple:
        """``(t, h, w)`` tubelets of a video (default: the size the model is built for); tokens
        are ordered t-major, then h, then w, and source maps index this grid flattened."""
        trunk = self.trunk
        if self._inputs != "videos":
            raise TypeError(
                f"{_original_type(trunk).__name__} takes {self._inputs}, not videos: it has no "
                "(t, h, w) tubelet grid; use adapter.grid(height, width)"
            )
        config = trunk.config
        frames = config.num_frames if frames is None else frames
        default_height, default_width = _pair(config.image_size)
        patch_height, patch_width = self.patch_size
        return (
            frames // _hook(trunk, "tokenmerge_tubelet_size"),
            (default_height if height is None else height) // patch_height,
            (default_width if width is None else width) // patch_width,
        )

    def input_grid(self, inputs: torch.Tensor) -> tuple:
        if self._inputs == "videos":
            return self.video_grid(inputs.shape[1], *inputs.shape[-2:])
        if self._inputs == "spectrograms":
            return self.spectrogram_grid(*inputs.shape[-2:])
        return super().input_grid(inputs)

    def spectrogram_grid(self, frames: int, mel_bins: int) -> tuple:
        """``(frequency, time)`` patches of AST ``input_values [B, frames, mel_bins]``, in token
        order (frequency-major). The patches overlap: patch ``(i, j)`` covers mel bins
        ``i * fs ... i * fs + kf - 1`` and frames ``j * ts ... j * ts + kt - 1`` for the
        kernel ``(kf, kt)`` and strides ``(fs, ts)`` of :meth:`spectrogram_strides`."""
        (kf, kt), (fs, ts) = self.patch_size, self.spectrogram_strides
        return (mel_bins - kf) // fs + 1, (frames - kt) // ts + 1

    @property
    def spectrogram_strides(self) -> tuple:
        """``(frequency, time)`` stride of AST's patch embedding, in mel bins and frames."""
        if self._inputs != "spectrograms":
            raise TypeError(f"{_original_type(self.trunk).__name__} takes {self._inputs}, not spectrograms")
        return tuple(self.trunk.embeddings.patch_embeddings.projection.stride)

    @property
    def patch_size(self) -> tuple:
        return patch_size(self.model)

    @property
    def num_patches(self) -> int:
        return int(_hook(self.trunk, "_tm_patch_count")())

    def check_image_size(self, size: int) -> None:
        if not _families()[_original_type(self.trunk)].trunk_mixin.any_image_size:
            super().check_image_size(size)

    @property
    def blocks(self) -> list:
        return list(_hook(self.trunk, "_tm_layers"))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return _hook(self.trunk, "_tm_embed")(images)

    def logits(self, state: TokenState) -> torch.Tensor:
        kind = _original_type(self.model)
        head = _wrappers().get(kind, (None, None))[1]
        if head is None:
            raise TypeError(
                f"{kind.__name__} has no classification head, so it gives no logits: load the "
                "model as its ...ForImageClassification class"
            )
        return head(self.model, state._replace(x=_hook(self.trunk, "_tm_final")(state.x)))

    def _unmerged_tokens(self, images: torch.Tensor, **forward_kwargs) -> torch.Tensor:
        return self.trunk(images, **forward_kwargs).last_hidden_state

    @property
    def owner(self) -> nn.Module:
        return self.trunk

    def patch(self, reducer: TokenReducer, config: MergeConfig) -> nn.Module:
        return patch_hf(self.model, reducer, config)

    def unpatch(self) -> nn.Module:
        return unpatch_hf(self.model)

    def architecture_name(self) -> str:
        trunk = self.trunk
        return str(getattr(trunk.config, "model_type", "") or _original_type(trunk).__name__)

