"""How sure an accuracy difference is: paired standard errors over one evaluation set.

Token-reduction methods are compared on the same images, and most images are classified
the same way by both models, so the noise in a *difference* of accuracies is much smaller
than the noise in either accuracy. On 3,925 Imagenette val images an accuracy near 84% has a
standard error of 0.59 points, while two variants that disagree on 3% of the images differ
with a standard error near 0.28 (``sqrt(0.03 / 3925)``). Comparing the two standard errors' sizes is what
tells a real gain from noise, so every evaluated row keeps which images it got right
(:func:`pack_correct`: one bit per image, as hex) and its difference to the unmodified model
gets a paired standard error (:func:`paired_difference`).

Paired difference: with ``d_i = a_i - b_i`` in ``{-1, 0, 1}`` per image, the difference of
accuracies is ``mean(d)`` and its standard error ``std(d) / sqrt(N)`` (sample standard
deviation), the normal approximation behind McNemar's test. A 95% interval is
``mean(d) +- 1.96 se``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["pack_correct", "unpack_correct", "accuracy_standard_error", "paired_difference", "Z95"]

Z95 = 1.959963984540054  # the normal distribution's 97.5% quantile


def pack_correct(correct: torch.Tensor) -> str:
    """``[N]`` booleans (image ``i`` classified correctly) -> a hex string of ``ceil(N / 8)``
    bytes, image ``i`` in bit ``7 - i % 8`` of byte ``i // 8`` (big-endian bits)."""
    bits = correct.detach().to("cpu", torch.bool).flatten()
    padded = torch.zeros(8 * math.ceil(len(bits) / 8), dtype=torch.uint8)
    padded[: len(bits)] = bits.to(torch.uint8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
    packed = (padded.view(-1, 8) * weights).sum(dim=1, dtype=torch.int64)
    return bytes(packed.tolist()).hex()


def unpack_correct(text: str, num_images: int) -> torch.Tensor:
    """The inverse of :func:`pack_correct`: ``[num_images]`` booleans."""
    try:
        data = bytes.fromhex(text)
    except (TypeError, ValueError):
        raise ValueError(f"per-image results must be a hex string, got {str(text)[:40]!r}") from None
    if len(data) != math.ceil(num_images / 8):
        raise ValueError(f"per-image results hold {len(data)} bytes, but {num_images} images need "
                         f"{math.ceil(num_images / 8)}: they come from another evaluation set")
    values = torch.tensor(list(data), dtype=torch.int64)
    bits = (values[:, None] >> torch.arange(7, -1, -1)) & 1
    return bits.flatten()[:num_images].to(torch.bool)


def accuracy_standard_error(accuracy: float, num_images: int) -> float:
    """The binomial standard error, in percentage points, of an ``accuracy`` (%) measured on
    ``num_images`` images: how far another sample of as many images would move it."""
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    p = accuracy / 100.0
    return 100.0 * math.sqrt(p * (1.0 - p) / num_images)


def paired_difference(correct_a: torch.Tensor, correct_b: torch.Tensor) -> tuple:
    """``(accuracy(a) - accuracy(b), its standard error)`` in percentage points, from
    per-image correctness of two models on the same images (``[N]`` booleans each)."""
    if correct_a.shape != correct_b.shape or correct_a.dim() != 1:
        raise ValueError(f"paired results must be two [N] vectors over the same images, got "
                         f"{tuple(correct_a.shape)} and {tuple(correct_b.shape)}")
    n = len(correct_a)
    if n < 2:
        raise ValueError(f"a paired standard error needs at least 2 images, got {n}")
    d = correct_a.double() - correct_b.double()
    return 100.0 * d.mean().item(), 100.0 * d.std(unbiased=True).item() / math.sqrt(n)
