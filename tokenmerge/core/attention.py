"""Proportional attention on PyTorch's fused attention kernels.

Proportional attention (ToMe) is ``softmax(q k^T / sqrt(d) + log s) v``: a merged token of
size ``s`` receives the attention its ``s`` patches would have had together. The bias is
the same for every query, so it is an additive per-key term and never needs the
``[B, H, N, N]`` score matrix. Two exact ways to feed it to
``torch.nn.functional.scaled_dot_product_attention``:

- ``"bias"``: an additive ``[B, 1, 1, N]`` float mask. Simple; on CUDA it rules out the
  flash kernel (the cuDNN/efficient kernels that accept a bias run ~3x slower at ViT
  shapes), on CPU the flash kernel accepts it.
- ``"fold"``: the bias becomes one more key dimension. Eight channels are appended (the
  flash kernel wants head dims in multiples of 8): ones on the query side,
  ``log(s) * sqrt(d) / 8`` on the key side, zeros on the value side. With
  ``scale = d ** -0.5`` the extra channels add exactly ``log s`` to every score, and the
  output is sliced back to ``d`` channels. The flash kernel stays in use (~1.4x the cost
  of an unbiased call instead of ~3x).

``"auto"`` picks ``"fold"`` on CUDA and ``"bias"`` elsewhere.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["proportional_attention", "size_bias", "key_metric", "ATTENTION_IMPLS"]

ATTENTION_IMPLS = ("auto", "fold", "bias")
_FOLD_CHANNELS = 8


def size_bias(size: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``[B, N, 1]`` token sizes -> ``[B, N]`` additive log-size bias (``None`` stays ``None``)."""
    if size is None:
        return None
    return size.squeeze(-1).log()


def _resolve_impl(impl: str, q: torch.Tensor) -> str:
    if impl == "auto":
        return "fold" if q.is_cuda else "bias"
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    return impl


def proportional_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_size: Optional[torch.Tensor] = None,
    *,
    impl: str = "auto",
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Scaled dot-product attention with an optional per-key log-size bias.

    Args:
        q, k, v: ``[B, H, N, D]``.
        log_size: ``[B, N]`` additive bias per key, or ``None`` for plain attention.
        impl: ``"auto"``, ``"fold"`` or ``"bias"`` (see the module docstring).
        dropout_p: attention dropout (training only).
        scale: softmax scale; default ``D ** -0.5``.

    Returns:
        ``[B, H, N, D]``.
    """
    if log_size is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    head_dim = q.shape[-1]
    scale = head_dim ** -0.5 if scale is None else scale
    bias = log_size.to(q.dtype)
    if _resolve_impl(impl, q) == "bias":
        mask = bias[:, None, None, :]
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale
        )
    B, H, N, _ = k.shape
    extra = q.new_ones(B, H, q.shape[2], _FOLD_CHANNELS)
    key_extra = (bias / (scale * _FOLD_CHANNELS))[:, None, :, None].expand(B, H, N, _FOLD_CHANNELS)
    out = F.scaled_dot_product_attention(
        torch.cat([q, extra], dim=-1),
        torch.cat([k, key_extra], dim=-1),
        F.pad(v, (0, _FOLD_CHANNELS)),
        dropout_p=dropout_p,
        scale=scale,
    )
    return out[..., :head_dim]


def key_metric(k: torch.Tensor) -> torch.Tensor:
    """ToMe's merge metric: ``[B, H, N, D]`` keys -> ``[B, N, D]`` averaged over heads."""
    return k.mean(dim=1)
