"""Dense outputs from merged models: the final tokens unmerged onto the full patch grid.

A merged model ends with ``M`` tokens; a segmentation or detection head wants one feature
per patch. With source tracking (``tokenmerge.patch(..., trace_source=True)``) every patch
knows which final token absorbed it, so the dense map is a gather: each patch receives a
copy of its token (ToMe's unmerge). Where nothing was merged the gather is the identity and
the map equals the unmodified model's patch tokens bit for bit.

Works for every model family (:func:`tokenmerge.backends.adapter.adapter_for`: timm and
Hugging Face), patched or not (an unpatched model's patch tokens are simply reshaped). For models that need every token at every block, patch with
``layout="local"`` instead (tomesd layout, timm and Hugging Face): its outputs keep all
tokens and need no unmerging.

    >>> tokenmerge.patch(model, "tome", r=8, trace_source=True)
    >>> feats = tokenmerge.dense_features(model, images, output="map")   # [B, C, H/16, W/16]

Video models (VideoMAE) take ``[B, T, 3, H, W]`` and have a 3-D tubelet grid ``(t, h, w)``
(``t = T / tubelet_size``), in the token order of their embeddings: ``"tokens"`` gives
``[B, t*h*w, C]`` and ``"map"`` gives ``[B, C, t, h, w]``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .core.merge import unmerge_tokens

__all__ = ["unmerge_to_grid", "dense_features", "DENSE_OUTPUTS"]

DENSE_OUTPUTS = ("tokens", "map")


def unmerge_to_grid(
    x: torch.Tensor,
    source: Optional[torch.Tensor],
    num_protected: int,
    num_prefix: int,
    grid: tuple,
    output: str = "tokens",
    fill: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Final tokens -> one feature per patch.

    Args:
        x: ``[B, M, C]`` final tokens, protected ones first.
        source: ``[B, N - num_protected]`` final token of each non-protected input token
            (from source tracking), or ``None`` if the tokens were never merged (then
            ``M`` must be ``N``).
        num_protected: leading tokens that were never merged (they keep their index).
        num_prefix: leading non-patch tokens of the input (class, distillation, registers).
        grid: ``(H, W)`` patches, ``H * W = N - num_prefix``; for video ``(T, H, W)``
            tubelets in token order (time first).
        output: ``"tokens"`` -> ``[B, H*W, C]``; ``"map"`` -> ``[B, C, H, W]`` (video:
            ``[B, C, T, H, W]``).
        fill: ``[C]`` or ``[B, C]`` value for patches whose token was discarded (pruning
            methods); default zeros.

    Returns:
        ``[B, H*W, C]`` or ``[B, C, H, W]`` (``[B, T*H*W, C]`` or ``[B, C, T, H, W]``).
    """
    if output not in DENSE_OUTPUTS:
        raise ValueError(f"output must be one of {DENSE_OUTPUTS}, got {output!r}")
    grid = tuple(int(g) for g in grid)
    if len(grid) not in (2, 3):
        raise ValueError(f"grid must be (H, W) patches or (T, H, W) tubelets, got {grid!r}")
    shape = "x".join(map(str, grid))
    num_tokens = num_prefix + math.prod(grid)
    if source is None:
        if x.shape[1] != num_tokens:
            raise ValueError(
                f"the model returned {x.shape[1]} tokens for {num_tokens} input tokens but no "
                "sources: patch it with trace_source=True to unmerge merged tokens"
            )
        full = x
    else:
        # Protected tokens sit at their own index; every other input token is looked up.
        full = torch.cat([x[:, :num_protected], unmerge_tokens(x, source, fill)], dim=1)
        if full.shape[1] != num_tokens:
            raise ValueError(
                f"the source map covers {full.shape[1]} tokens but a {shape} grid with "
                f"{num_prefix} prefix tokens has {num_tokens}"
            )
    dense = full[:, num_prefix:]
    if output == "tokens":
        return dense
    B, _, C = dense.shape
    return dense.transpose(1, 2).reshape(B, C, *grid)


def _refuse_patch_dropout(model: nn.Module) -> None:
    """Refuse a model whose patch dropout is on (timm's ``patch_drop``, open_clip's
    ``patch_dropout``, in train mode): it drops random patches before the blocks, so the tokens
    no longer cover the patch grid, and the error that would follow blames the merge."""
    for name, module in model.named_modules():
        if type(module).__name__ == "PatchDropout" and module.training and getattr(module, "prob", 0) > 0:
            raise ValueError(
                f"{name or 'the model'} drops patches at random in train mode (prob={module.prob:g}), "
                "and dense features need every patch: call model.eval() first"
            )


def dense_features(
    model: nn.Module,
    images: torch.Tensor,
    *,
    output: str = "tokens",
    fill: Optional[torch.Tensor] = None,
    **forward_kwargs,
) -> torch.Tensor:
    """Per-patch features of a (merged) ViT: ``[B, H*W, C]`` or ``[B, C, H, W]``; per-tubelet
    features of a video model: ``[B, T*H*W, C]`` or ``[B, C, T, H, W]``.

    Runs the model's token forward and unmerges its final tokens (``last_hidden_state`` for
    Hugging Face models, ``forward_features`` for timm: after the final norm where the model
    has one) onto the patch grid; prefix tokens are dropped. Merged patches share their
    token's feature; patches a pruning method discarded get ``fill`` (default zeros).

    Args:
        model: a timm ``VisionTransformer`` or a supported Hugging Face model, patched with
            ``trace_source=True`` (or ``layout="local"``, or not patched at all).
        images: ``[B, 3, H, W]``, or videos ``[B, frames, 3, H, W]`` for a video model.
        output: ``"tokens"`` or ``"map"``.
        fill: value for discarded patches, ``[C]`` or ``[B, C]``.
        **forward_kwargs: passed to the forward (e.g. ``interpolate_pos_encoding=True``).

    A model whose patch dropout is active (train mode) is refused: call ``model.eval()``.
    """
    from .backends.adapter import adapter_for

    adapter = adapter_for(model)  # an unsupported model: a TypeError naming it and what is supported
    _refuse_patch_dropout(model)
    state, num_protected = adapter.final_state(images, **forward_kwargs)
    grid = adapter.input_grid(images)
    return unmerge_to_grid(state.x, state.source, num_protected, adapter.num_prefix_tokens, grid, output, fill)
