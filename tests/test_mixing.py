"""Mixup and CutMix: the mixed inputs against direct constructions, the mixed label loss
against a hand computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tokenmerge.distillation import training_loss
from tokenmerge.mixing import Mix, mix_batch, mixed_cross_entropy


def _batch(shape=(4, 3, 8, 10)) -> torch.Tensor:
    # Distinct values everywhere, so a copied position is recognisable.
    return torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape) + 1.0


def test_mixup_blends_each_sample_with_the_reversed_batch():
    x = _batch()
    mixed, mix = mix_batch(x, np.random.default_rng(0), mixup_alpha=0.8)
    assert torch.equal(mix.partner, torch.tensor([3, 2, 1, 0]))
    assert 0.0 < mix.lam < 1.0 and mix.lam != 0.5
    torch.testing.assert_close(mixed, mix.lam * x + (1 - mix.lam) * x.flip(0))
    # The input is not modified.
    assert torch.equal(x, _batch())


@pytest.mark.parametrize("shape", [(4, 3, 8, 10), (2, 5, 3, 8, 10), (3, 12, 9)])
def test_cutmix_pastes_one_box_of_the_partner_and_reports_its_exact_area(shape):
    x = _batch(shape)
    for seed in range(20):
        mixed, mix = mix_batch(x, np.random.default_rng(seed), cutmix_alpha=1.0)
        partner = x[mix.partner]
        pasted = (mixed != x).flatten(0, -3).any(0)  # [H, W]: where any sample took its partner's value
        assert torch.equal(mixed[..., pasted], partner[..., pasted])
        assert torch.equal(mixed[..., ~pasted], x[..., ~pasted])
        rows, cols = pasted.any(1).nonzero().flatten(), pasted.any(0).nonzero().flatten()
        if len(rows):  # a box: every position between its first and last row and column
            assert pasted[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()
        height, width = shape[-2:]
        # lam is the share the sample kept, after clipping the box to the input.
        assert mix.lam == pytest.approx(1.0 - pasted.sum().item() / (height * width))


def test_with_both_kinds_each_batch_uses_one_and_both_occur():
    x = _batch()
    kinds = set()
    for seed in range(40):
        mixed, mix = mix_batch(x, np.random.default_rng(seed), mixup_alpha=0.8, cutmix_alpha=1.0)
        blended = torch.allclose(mixed, mix.lam * x + (1 - mix.lam) * x.flip(0))
        kinds.add("mixup" if blended and 0 < mix.lam < 1 else "cutmix")
    assert kinds == {"mixup", "cutmix"}


def test_mixing_is_a_function_of_the_generator_and_off_by_default():
    x = _batch()
    a, mix_a = mix_batch(x, np.random.default_rng([3, 7]), 0.8, 1.0)
    b, mix_b = mix_batch(x, np.random.default_rng([3, 7]), 0.8, 1.0)
    assert torch.equal(a, b) and mix_a.lam == mix_b.lam
    same, mix = mix_batch(x, np.random.default_rng(0))
    assert same is x and mix is None


def test_bad_mixing_input_is_refused():
    with pytest.raises(ValueError, match="alphas must be >= 0"):
        mix_batch(_batch(), np.random.default_rng(0), mixup_alpha=-0.1)
    with pytest.raises(ValueError, match=r"\[B, \.\.\., H, W\]"):
        mix_batch(torch.zeros(4, 10), np.random.default_rng(0), mixup_alpha=0.8)


def test_mixed_cross_entropy_equals_the_hand_computed_mixed_target():
    # Logits [0, ln 3]: softmax [1/4, 3/4]; sample 0 is label 1 mixed 0.7 with its partner's label 0.
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])
    labels = torch.tensor([1, 0])
    mix = Mix(0.7, torch.tensor([1, 0]))
    by_hand = (0.7 * -math.log(0.75) + 0.3 * -math.log(0.25)  # sample 0
               + 0.7 * -math.log(0.25) + 0.3 * -math.log(0.75)) / 2  # sample 1
    assert mixed_cross_entropy(logits, labels, mix).item() == pytest.approx(by_hand, rel=1e-6)
    soft = torch.tensor([[0.3, 0.7], [0.7, 0.3]])
    assert F.cross_entropy(logits, soft).item() == pytest.approx(by_hand, rel=1e-6)
    assert mixed_cross_entropy(logits, labels, None).item() == pytest.approx(F.cross_entropy(logits, labels).item())
    # The trainer's loss uses the mixed labels in its label term, with or without a teacher.
    assert training_loss(logits, labels, mix=mix).item() == pytest.approx(by_hand, rel=1e-6)
    with_teacher = training_loss(logits, labels, logits, weight=0.25, mix=mix)
    assert with_teacher.item() == pytest.approx(0.75 * by_hand, rel=1e-6)  # KL to itself is 0
