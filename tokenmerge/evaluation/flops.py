"""GFLOPs per image with ``torch.utils.flop_counter``.

Counts matrix multiplications and attention (2 FLOPs per multiply-add). Merge bookkeeping
(sort, gather, scatter) has no FLOP formula and is not counted; its cost shows up in the
measured throughput instead. ``nn.MultiheadAttention`` (open_clip's blocks) is counted with
its fused inference path turned off, which no formula covers (:func:`_mha_fast_path_off`).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_gflops"]


def _sdpa_flops(query_shape, key_shape, value_shape=None, *args, **kwargs) -> int:
    """q @ k^T and attn @ v: 2 * 2 * B * H * Nq * Nk * D."""
    batch, heads, n_q, dim = query_shape
    n_k = key_shape[2]
    dim_v = value_shape[-1] if value_shape is not None else dim
    return 2 * batch * heads * n_q * n_k * (dim + dim_v)


def _cpu_attention_formula():
    # PyTorch registers FLOP formulas for the CUDA attention kernels only.
    ops = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        def formula(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
            return _sdpa_flops(query_shape, key_shape, value_shape)

        ops[op] = formula
    return ops


@contextlib.contextmanager
def _mha_fast_path_off():
    """``nn.MultiheadAttention``'s inference fast path (one fused ``_native_multi_head_attention``
    op, taken without grad) has no FLOP formula, so the counter would miss the whole attention
    of an unpatched open_clip block; without it the same attention runs as linear layers and
    SDPA, which are counted (the FLOPs are the same, only the kernel differs)."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


@torch.inference_mode()
def count_gflops(model: nn.Module, image_size: int = 224, batch_size: int = 1, device="cpu",
                 images: torch.Tensor = None) -> float:
    """Forward GFLOPs per image (random input unless ``images`` is given)."""
    model = model.eval()
    if images is None:
        images = torch.randn(batch_size, 3, image_size, image_size, device=device)
    counter = FlopCounterMode(display=False, custom_mapping=_cpu_attention_formula())
    with _mha_fast_path_off(), counter:
        model(images)
    return counter.get_total_flops() / images.shape[0] / 1e9
