"""tokenmerge.cascade: a merged pass for every image, the unmodified model for the least sure."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import tokenmerge
from tokenmerge.cascade import ConfidenceCascade, cascade_gflops, select_fallback, top1_margin

from .conftest import tiny_hf_classifier

pytestmark = pytest.mark.usefixtures("one_thread")


def _vit():
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=4).eval()


def _images(batch=8):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_top1_margin_against_the_definition():
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.0, 0.0], [5.0, -5.0, -5.0]])
    p = logits.softmax(-1)
    expected = torch.stack([p[0, 0] - p[0, 2], torch.tensor(0.0), p[2, 0] - p[2, 1]])
    torch.testing.assert_close(top1_margin(logits), expected)
    assert top1_margin(logits.half()).dtype == torch.float32
    with pytest.raises(ValueError, match=r"logits \[batch, classes >= 2\]"):
        top1_margin(torch.zeros(3))


def test_select_fallback_by_fraction_and_by_threshold():
    margin = torch.tensor([0.5, 0.1, 0.9, 0.1, 0.3])
    # floor(0.5 x 5) = 2 smallest; the tie at 0.1 keeps both, in order.
    assert select_fallback(margin, fraction=0.5).tolist() == [False, True, False, True, False]
    assert select_fallback(margin, fraction=0.7).tolist() == [False, True, False, True, True]
    assert not select_fallback(margin, fraction=0.19).any()  # floor(0.95) = 0: the budget holds
    assert select_fallback(margin, fraction=1.0).all()
    assert select_fallback(margin, threshold=0.3).tolist() == [False, True, False, True, False]
    for bad in (dict(), dict(fraction=0.1, threshold=0.2), dict(fraction=1.5), dict(threshold=-0.1),
                dict(fraction=True)):
        with pytest.raises(ValueError, match="fraction|margin"):
            select_fallback(margin, **bad)


def test_cascade_gflops():
    assert cascade_gflops(1.25, 2.5, 0.1) == pytest.approx(1.5)


@pytest.mark.parametrize("by", ["fraction", "margin"])
def test_the_cascade_is_the_merged_model_except_where_it_runs_the_unmodified_one(by):
    model = _vit()
    x = _images()
    with torch.no_grad():
        unmodified = model(x)
        merged = tokenmerge.patch(tokenmerge.api.shared_copy(model), r=4)(x)
        # A random model is unsure of everything: the margin threshold sits among its margins.
        mode = dict(fraction=0.25) if by == "fraction" else dict(margin=float(top1_margin(merged).median()))
        cascade = ConfidenceCascade(model, r=4, **mode)
        out = cascade(x)
    again = cascade.last_fallback
    expected = select_fallback(top1_margin(merged), mode.get("fraction"), mode.get("margin"))
    assert torch.equal(again, expected) and again.any() and not again.all()
    assert torch.equal(out[~again], merged[~again])
    torch.testing.assert_close(out[again], unmodified[again])  # run alone: same up to batch rounding
    assert not tokenmerge.is_patched(model)  # the fallback is the user's model, unchanged
    assert torch.equal(model(x), unmodified)
    assert {id(p) for p in cascade.parameters()} == {id(p) for p in model.parameters()}  # one set of weights


def test_fraction_mode_meets_its_budget_on_any_batch():
    cascade = ConfidenceCascade(_vit(), r=4, fraction=0.25)
    for batch in (1, 3, 4, 9):
        with torch.no_grad():
            cascade(_images(batch))
        assert int(cascade.last_fallback.sum()) == batch // 4


def test_hugging_face_classifiers_give_logits():
    model = tiny_hf_classifier("vit")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        out = ConfidenceCascade(model, r=2, fraction=0.5)(x)
    assert out.shape == (4, model.config.num_labels)


def test_bad_configurations_are_refused():
    model = _vit()
    with pytest.raises(ValueError, match="exactly one of fraction= .* or margin="):
        ConfidenceCascade(model, r=4)
    with pytest.raises(ValueError, match="merges nothing: give r="):
        ConfidenceCascade(model, fraction=0.1, r=0)
    tokenmerge.patch(model, r=2)
    with pytest.raises(ValueError, match="pass the model before patching"):
        ConfidenceCascade(model, r=4, fraction=0.1)


def test_for_budget_spends_the_budget_on_the_fallback():
    from tokenmerge.evaluation.flops import count_gflops

    model = _vit()
    full = count_gflops(model, image_size=32)
    fast = count_gflops(tokenmerge.patch(tokenmerge.api.shared_copy(model), r=4), image_size=32)
    target = fast + 0.25 * full
    model.train()
    cascade = ConfidenceCascade.for_budget(model, target, r=4)
    assert model.training  # counting did not leave the user's model in eval mode
    assert cascade.fraction == pytest.approx(0.25)
    assert cascade_gflops(fast, full, cascade.fraction) == pytest.approx(target)
    with pytest.raises(ValueError, match="merged member alone costs .* over the budget.*larger r"):
        ConfidenceCascade.for_budget(model, fast * 0.9, r=4)
    with pytest.raises(ValueError, match="unmodified model fits it"):
        ConfidenceCascade.for_budget(model, fast + full * 1.1, r=4)
    for bad in (0, -1.0, True, "1"):
        with pytest.raises(ValueError, match="target_gflops must be a positive number"):
            ConfidenceCascade.for_budget(model, bad, r=4)


def test_for_budget_measures_a_per_image_member_on_the_images_given():
    from tokenmerge.evaluation.flops import count_gflops
    from tokenmerge.evaluation.thresholds import PerImageCost

    model = _vit()
    member = {"method": "atc", "r": 6, "options": {"threshold": [0.5, 0.5, 0.5]}}
    images = _images(6)
    full = count_gflops(model, image_size=32)
    cost = PerImageCost(model, member, images, base_gflops=full)()[0].mean().item()
    target = cost + 0.125 * full
    cascade = ConfidenceCascade.for_budget(model, target, images=images, **member)
    assert cascade.fraction == pytest.approx(0.125)
    # The same member given as keywords, as tokenmerge.patch takes them.
    same = ConfidenceCascade.for_budget(model, target, images=images, method="atc", r=6, threshold=[0.5] * 3)
    assert same.fraction == pytest.approx(0.125)
    with pytest.raises(ValueError, match="per-image member .* pass images="):
        ConfidenceCascade.for_budget(model, target, **member)
