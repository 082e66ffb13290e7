"""Per-image ATC: thresholded clustering against a loop reference, batches that equal their
images run alone, and the calibration of thresholds to a counted per-image budget."""

import json
import math

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import tokenmerge
from tokenmerge.core.clustering import agglomerative_clustering, agglomerative_plan, join_similarities
from tokenmerge.core.merge import merge_tokens
from tokenmerge.evaluation.accuracy import evaluate_correct
from tokenmerge.evaluation.flops import count_gflops
from tokenmerge.evaluation.statistics import unpack_correct
from tokenmerge.evaluation.thresholds import PerImageCost, calibrate_thresholds

from .test_atc import cosine, reference_clusters


def reference_heights(metric, joins, linkage):
    """One image: the linkage similarity of each join, recomputed from the members."""
    n = len(metric)
    sim = [[cosine(metric[i], metric[j]) for j in range(n)] for i in range(n)]
    combine = {"average": lambda v: sum(v) / len(v), "complete": min, "single": max}[linkage]
    clusters, heights = [[i] for i in range(n)], []
    for _ in range(joins):
        pairs = [(a, b) for a in range(len(clusters)) for b in range(a + 1, len(clusters))]
        values = [combine([sim[i][j] for i in clusters[a] for j in clusters[b]]) for a, b in pairs]
        best = max(range(len(pairs)), key=values.__getitem__)
        heights.append(values[best])
        a, b = pairs[best]
        clusters[a] = sorted(clusters[a] + clusters[b])
        del clusters[b]
    return heights


def unit_similarity(metric):
    unit = metric / metric.norm(dim=-1, keepdim=True)
    return unit @ unit.transpose(-1, -2)


@pytest.mark.parametrize("linkage", ["complete", "average", "single"])
def test_join_similarities_are_the_reference_merge_heights_and_never_rise(linkage):
    torch.manual_seed(1)
    metric = torch.randn(3, 12, 4, dtype=torch.float64)
    heights = join_similarities(unit_similarity(metric), 9, linkage)
    for k in range(3):
        torch.testing.assert_close(heights[k], torch.tensor(reference_heights(metric[k], 9, linkage), dtype=torch.float64))
        assert (heights[k][1:] <= heights[k][:-1] + 1e-12).all()


@pytest.mark.parametrize("linkage", ["complete", "average"])
def test_a_threshold_stops_each_image_at_its_own_join(linkage):
    torch.manual_seed(2)
    metric = torch.randn(4, 14, 3, dtype=torch.float64)
    similarity = unit_similarity(metric)
    cap, threshold = 10, 0.6
    labels = agglomerative_clustering(similarity, cap, linkage, threshold=threshold)
    heights = join_similarities(similarity, cap, linkage)
    joins = (heights >= threshold).sum(dim=1)
    assert len(set(joins.tolist())) > 1  # the images differ, or the test shows nothing
    for k in range(4):
        alone = agglomerative_clustering(similarity[k:k + 1], int(joins[k]), linkage)
        assert torch.equal(labels[k], alone[0])


def test_per_image_plan_pads_with_empty_slots_and_discards_them_in_the_next_block():
    torch.manual_seed(3)
    n, protected, cap = 11, 1, 8
    metric = torch.randn(3, n, 4, dtype=torch.float64)
    x = torch.randn(3, n, 5, dtype=torch.float64)
    heights = join_similarities(unit_similarity(metric[:, protected:]), cap, "complete")
    threshold = float(heights[:, 4].median())
    plan = agglomerative_plan(metric, cap, protected, threshold=threshold)
    merged, size = merge_tokens(x, None, plan)
    joins = (heights >= threshold).sum(dim=1)
    assert plan.num_out == n - int(joins.min())
    for k in range(3):
        kept = protected + len(reference_clusters(metric[k, protected:], int(joins[k]), "complete"))
        groups = [[i] for i in range(protected)]
        groups += [[protected + i for i in c] for c in reference_clusters(metric[k, protected:], int(joins[k]), "complete")]
        torch.testing.assert_close(merged[k, :kept], torch.stack([x[k, g].mean(0) for g in groups]))
        assert (size[k, kept:] == 0).all() and (merged[k, kept:] == 0).all()
    # The next block: empty slots leave (discard slot), real tokens cluster as if alone.
    metric2 = torch.randn(3, plan.num_out, 4, dtype=torch.float64)
    plan2 = agglomerative_plan(metric2, 3, protected, size=size, tau_size=40.0, threshold=-math.inf)
    for k in range(3):
        kept = int((size[k, :, 0] > 0).sum())
        empty = torch.arange(plan.num_out) >= kept
        assert (plan2.assign[k, empty] == plan2.num_out).all()
        alone = agglomerative_plan(metric2[k:k + 1, :kept], 3, protected, size=size[k:k + 1, :kept], tau_size=40.0)
        assert torch.equal(plan2.assign[k, :kept], alone.assign[0])


def test_unbounded_thresholds_reproduce_the_fixed_plan_and_no_joins():
    torch.manual_seed(4)
    metric = torch.randn(2, 13, 4)
    fixed = agglomerative_plan(metric, 6, 1)
    always = agglomerative_plan(metric, 6, 1, threshold=-math.inf)
    assert always.num_out == fixed.num_out and torch.equal(always.assign, fixed.assign)
    never = agglomerative_plan(metric, 6, 1, threshold=math.inf)
    assert never.num_out == 13 and never.assign.tolist() == [list(range(13))] * 2


SMALL = dict(img_size=64, patch_size=8, embed_dim=48, depth=4, num_heads=3, num_classes=7)


def images_of_varied_content(count=5):
    torch.manual_seed(0)
    x = torch.randn(count, 3, 64, 64)
    x[1] = 0.05 * x[1] + 0.3  # nearly uniform: many alike patches
    x[2, :, :32] = 0.7  # half uniform
    return x


@torch.no_grad()
def test_a_batch_gives_each_image_its_own_result_and_unpatch_restores():
    torch.manual_seed(0)
    model = VisionTransformer(**SMALL).eval()
    x = images_of_varied_content()
    reference = model(x)
    tokenmerge.patch(model, method="atc", r=0, threshold=0.5)
    assert torch.equal(model(x), reference)
    tokenmerge.patch(model, method="atc", r=[30, 20, 10, 5], threshold=[0.9, 0.8, None, 0.5])
    batched = model(x)
    alone = torch.cat([model(x[i:i + 1]) for i in range(len(x))])
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5)
    kept = (model.forward_tokens(x).size[:, :, 0] > 0).sum(dim=1)
    assert len(set(kept.tolist())) > 1
    # Caps as if every image used them: the fewest tokens an image can keep.
    assert model.tokens_per_block() == [65, 35, 15, 5, 2]
    tokenmerge.unpatch(model)
    assert torch.equal(model(x), reference)


def test_threshold_options_are_checked():
    model = VisionTransformer(**SMALL).eval()
    with pytest.raises(ValueError, match="threshold has 3 values but .* has 4 merging blocks"):
        tokenmerge.patch(model, method="atc", r=4, threshold=[0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="threshold must be a float or a list"):
        tokenmerge.patch(model, method="atc", r=4, threshold="high")
    with pytest.raises(ValueError, match="threshold values must be numbers"):
        tokenmerge.patch(model, method="atc", r=4, threshold=[float("nan")] * 4)
    with pytest.raises(ValueError, match="needs prop_attn=True"):
        tokenmerge.patch(model, method="atc", r=4, threshold=0.5, prop_attn=False)
    with pytest.raises(ValueError, match="cannot share MLPs"):
        tokenmerge.patch(model, method="atc", r=4, threshold=0.5, mlp_share=0.5)
    assert not tokenmerge.is_patched(model)


def test_export_refuses_a_per_image_model():
    model = tokenmerge.patch(VisionTransformer(**SMALL).eval(), method="atc", r=4, threshold=0.5)
    with pytest.raises(ValueError, match="data-dependent number of tokens"):
        tokenmerge.export_onnx(model, "unused.onnx", image_size=64)


@pytest.fixture(scope="module")
def calibrated():
    torch.manual_seed(0)
    model = VisionTransformer(**SMALL).eval()
    images = images_of_varied_content(12)
    budget = count_gflops(tokenmerge.patch(VisionTransformer(**SMALL).eval(), method="tome", r=8), image_size=64)
    result = calibrate_thresholds(model, images, r=8, target_gflops=budget, steps=5, batch_size=5)
    return model, images, budget, result


def test_calibration_meets_the_budget_counted_per_image_and_round_trips(calibrated):
    model, images, budget, result = calibrated
    assert result.gflops <= budget and result.reference_schedule == (8, 8, 8, 8)
    assert result.caps == (24, 24, 24, 24) and result.images == 12
    config = json.loads(json.dumps(result.config()))
    patched = tokenmerge.patch(VisionTransformer(**SMALL).eval(), **config)
    patched.load_state_dict(model.state_dict())
    # The reported cost is what each image costs when counted alone, through the patched model.
    alone = [count_gflops(patched, images=images[i:i + 1]) for i in range(len(images))]
    assert result.gflops == pytest.approx(sum(alone) / len(alone), rel=1e-12)
    gflops, logits = PerImageCost(model, config, images, batch_size=4)()
    assert gflops.tolist() == pytest.approx(alone, rel=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(logits, patched(images), rtol=1e-4, atol=1e-5)


def test_calibration_refuses_bad_requests(calibrated):
    model, images, budget, _ = calibrated
    with pytest.raises(ValueError, match="even at the lowest thresholds"):
        calibrate_thresholds(model, images, r=1, cap_factor=1, target_gflops=0.2 * budget, steps=1)
    with pytest.raises(ValueError, match="options must not hold threshold"):
        calibrate_thresholds(model, images, r=8, target_gflops=budget, options={"threshold": 0.5})
    with pytest.raises(ValueError, match="has no per-image threshold"):
        calibrate_thresholds(model, images, r=8, target_gflops=budget, method="tome")
    for cap_factor in (0.5, float("inf"), True):
        with pytest.raises(ValueError, match="cap_factor must be a finite number >= 1"):
            calibrate_thresholds(model, images, r=8, target_gflops=budget, cap_factor=cap_factor)
    for r in ((8, -1), "8", [], 2.5):
        with pytest.raises(ValueError, match="r must be the reference schedule"):
            calibrate_thresholds(model, images, r=r, target_gflops=budget)
    with pytest.raises(ValueError, match="unmodified model"):
        calibrate_thresholds(tokenmerge.patch(VisionTransformer(**SMALL).eval(), r=2), images, r=8,
                             target_gflops=budget)
    with pytest.raises(ValueError, match="merges nothing"):
        calibrate_thresholds(model, images, r=0, target_gflops=budget)


def test_per_image_cost_takes_one_cap_for_all_blocks_and_falls_back_to_the_config_threshold(calibrated):
    model, images, _, result = calibrated
    config = result.config()
    cost = PerImageCost(model, config, images[:4], batch_size=4)
    own, _ = cost()
    none_joined, _ = cost([math.inf] * 4)
    assert none_joined.sum() > own.sum()
    assert torch.equal(cost()[0], own)  # a call without thresholds uses the config's, not the last call's
    same_caps = {**config, "r": config["r"][0]}
    assert len(set(config["r"])) == 1
    assert torch.equal(PerImageCost(model, same_caps, images[:4], batch_size=4)()[0], own)


@torch.no_grad()
def test_a_bfloat16_batch_gives_each_image_its_own_clusters():
    # 256 patches: a batch of 4 joins one pair at a time, one image alone in rounds. In
    # bfloat16 the two used to settle near-ties differently (the batch's kernels round
    # otherwise); the similarity is now float32 whatever the model's dtype.
    torch.manual_seed(0)
    model = VisionTransformer(img_size=128, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5,
                              global_pool="avg").eval().to(torch.bfloat16)
    x = torch.randn(4, 3, 128, 128)
    x[0] = 0  # flat, faint and tiled images: many near-equal similarities
    x[1] = x[1] * 0.05
    x[2] = torch.randn(3, 8, 8).repeat(1, 16, 16)
    x = x.to(torch.bfloat16)
    tokenmerge.patch(model, method="atc", r=60, threshold=0.95, trace_source=True)
    batch = model.forward_tokens(x)
    for i in range(len(x)):
        alone = model.forward_tokens(x[i:i + 1])
        assert torch.equal(first_member_labels(batch.source[i]), first_member_labels(alone.source[0]))


def first_member_labels(source: torch.Tensor) -> torch.Tensor:
    """A partition of the patches as, for each patch, the first patch of its token."""
    first = {}
    return torch.tensor([first.setdefault(int(s), i) for i, s in enumerate(source)])


def test_calibration_leaves_each_module_in_its_own_mode(calibrated):
    model, images, budget, _ = calibrated
    model.train()
    model.blocks[0].eval()
    try:
        calibrate_thresholds(model, images[:4], r=8, target_gflops=budget, steps=1)
        assert model.training and not model.blocks[0].training and model.blocks[1].training
    finally:
        model.eval()


def test_eval_reports_the_accuracy_and_mean_per_image_gflops_of_a_per_image_config(
        hf_vit_dir, tiny_image_folder, tmp_path):
    from tokenmerge.cli import main
    from tokenmerge.models import load_model

    best = tmp_path / "best.json"
    config = {"method": "atc", "r": [6, 6], "options": {"threshold": [0.2, None]}}
    best.write_text(json.dumps(config))
    out = tmp_path / "out"
    assert main(["eval", f"hf:{hf_vit_dir}", "--data", str(tiny_image_folder), "--config", str(best),
                 "--out", str(out), "--no-timing", "--threads", "1"]) == 0
    row = json.loads((out / "results.json").read_text())["rows"][-1]
    assert row["options"] == {"threshold": [0.2, None]}
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.Resize(32), transforms.CenterCrop(32), transforms.ToTensor(),
                                    transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    folder = datasets.ImageFolder(str(tiny_image_folder), transform=transform)
    images = torch.stack([image for image, _ in folder])
    labels = torch.tensor([label for _, label in folder.samples])
    model = tokenmerge.patch(load_model(f"hf:{hf_vit_dir}"), **config)
    counts = [count_gflops(model, images=images[i:i + 1]) for i in range(len(images))]
    assert row["gflops"] == pytest.approx(sum(counts) / len(counts), rel=1e-9)
    # The accuracy comes from the same pass as the counts: it must be the patched model's own.
    correct = evaluate_correct(model, images, labels)
    assert row["accuracy"] == pytest.approx(100.0 * correct.double().mean().item())
    assert unpack_correct(row["correct"], row["num_images"]).tolist() == correct.tolist()
    # Under autocast too: the pass that counts is the pass that predicts, in the same dtype.
    _, logits = PerImageCost(load_model(f"hf:{hf_vit_dir}"), config, images, dtype=torch.bfloat16)()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(images).logits.float()
    torch.testing.assert_close(logits, expected)
    assert not torch.allclose(logits, model(images).logits, rtol=1e-4, atol=1e-5)  # bf16 was used


@torch.no_grad()
def test_a_hugging_face_batch_gives_each_image_its_own_result(hf_vit_dir):
    from tokenmerge.models import load_model

    model = tokenmerge.patch(load_model(f"hf:{hf_vit_dir}"), method="atc", r=[10, 4], threshold=[0.9, 0.5])
    images = torch.nn.functional.interpolate(images_of_varied_content(6), size=32)
    batched = model(images).logits
    alone = torch.cat([model(images[i:i + 1]).logits for i in range(len(images))])
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5)
    counts = {count_gflops(model, images=images[i:i + 1]) for i in range(len(images))}
    assert len(counts) > 1  # the images kept different numbers of tokens
