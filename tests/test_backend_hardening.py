"""The timm backends (ViT and Eva) where a batch, a token count or a process could hide a wrong
result: per-image merging under max pools, pooling without sizes, prefix tokens left
unprotected, shared MLPs at r=0, and patched models loaded by a fresh process."""

import copy

import pytest
import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer

import tokenmerge
from tokenmerge.core.matching import shared_mlp_pairs

from .conftest import fresh_process_lines, staged_logits

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5)


def vit(img_size=32, **overrides):
    return VisionTransformer(img_size=img_size, **TINY, **overrides).eval()


def eva(img_size=32, **overrides):
    return Eva(img_size=img_size, **TINY, use_rot_pos_emb=True, **overrides).eval()


FAMILIES = {"vit": vit, "eva": eva}


def per_image_atc(family, pool):
    """A 64x64 model (65 tokens) merging per image, and a batch whose blank first image keeps
    far fewer tokens than the others, which keep every token."""
    model = FAMILIES[family](img_size=64, global_pool=pool)
    torch.nn.init.normal_(model.head.weight)  # logits large enough that a wrong pool shows
    tokenmerge.patch(model, method="atc", r=20, threshold=0.97)
    x = torch.randn(3, 3, 64, 64)
    x[0] = 0
    return model, x


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("pool", ["max", "avgmax"])
@torch.no_grad()
def test_per_image_merging_under_max_pools_matches_each_image_alone(family, pool):
    model, x = per_image_atc(family, pool)
    kept = (model.forward_tokens(x).size[..., 0] > 0).sum(dim=1)
    assert kept[0] < kept[1:].min()  # the batch holds empty slots for image 0
    alone = torch.cat([model(image[None]) for image in x])
    torch.testing.assert_close(model(x), alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("pool", ["avg", "max"])
@torch.no_grad()
def test_pooling_without_sizes_is_refused_when_an_image_kept_every_token(family, pool):
    model, x = per_image_atc(family, pool)
    state = model.forward_tokens(x)
    assert state.x.shape[1] == 65 and (state.size[1:] > 0).all()  # the default count, by coincidence
    assert (state.size[0] == 0).any()
    with pytest.raises(ValueError, match="token_sizes"):
        model.forward_head(model.forward_features(x))
    torch.testing.assert_close(model.forward_head(state.x, token_sizes=state.size), model(x))


@pytest.mark.parametrize("family", sorted(FAMILIES))
@torch.no_grad()
def test_pooling_without_sizes_is_refused_when_an_input_merges_to_the_default_count(family):
    model = tokenmerge.patch(FAMILIES[family](global_pool="avg", dynamic_img_size=True), r=3)
    x = torch.randn(2, 3, 40, 40)  # 25 patches + class token, less 3 x 3 merged: 17, as at 32x32
    features = model.forward_features(x)
    assert features.shape[1] == model.patch_embed.num_patches + 1
    with pytest.raises(ValueError, match="token_sizes"):
        model.forward_head(features)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.filterwarnings("ignore::tokenmerge.core.schedule.ScheduleClampedWarning")
@torch.no_grad()
def test_pooling_without_sizes_is_accepted_where_every_token_weighs_one(family):
    x = torch.randn(2, 3, 32, 32)
    for options in (dict(r=0), dict(r=3, layout="local"), dict(method="prune", r=3)):
        model = tokenmerge.patch(FAMILIES[family](global_pool="avg"), **options)
        torch.testing.assert_close(model.forward_head(model.forward_features(x)), model(x), msg=str(options))
    # An input too small to merge (one patch) keeps its tokens unmerged: model(x) pools them.
    model = tokenmerge.patch(FAMILIES[family](global_pool="avg", dynamic_img_size=True), r=3)
    tiny = torch.randn(2, 3, 8, 8)
    assert model.tokenmerge_schedule(2) == (0, 0, 0)
    torch.testing.assert_close(model(tiny), tokenmerge.unpatch(model)(tiny))


@pytest.mark.parametrize("family", sorted(FAMILIES))
@torch.no_grad()
def test_r0_shares_mlps_when_asked(family):
    model, x = FAMILIES[family](), torch.randn(2, 3, 32, 32)
    reference = model(x)
    assert torch.equal(tokenmerge.patch(model, r=0, mlp_share=0.0)(x), reference)
    tokenmerge.patch(model, r=0, mlp_share=0.5)
    tokens_seen = []
    for block in model.blocks:
        block.mlp.register_forward_hook(lambda module, args, out: tokens_seen.append(args[0].shape[1]))
    shared = model(x)
    assert tokens_seen == [17 - shared_mlp_pairs(17, 1, 0.5)] * 3  # each MLP runs once per pair
    assert not torch.allclose(shared, reference)
    torch.testing.assert_close(shared, staged_logits(tokenmerge.adapter_for(model), x))


@pytest.mark.parametrize("make,prefix", [
    (lambda: vit(), 1),
    (lambda: VisionTransformerDistilled(img_size=32, **TINY).eval(), 2),
    (lambda: vit(reg_tokens=4, global_pool="avg"), 5),
    (lambda: Eva(img_size=32, **TINY, num_reg_tokens=2), 3),  # no RoPE
], ids=["class_token", "distilled", "registers", "eva_registers"])
def test_merging_prefix_tokens_is_refused(make, prefix):
    model = make()
    protected = prefix - 1
    with pytest.raises(ValueError, match=rf"num_protected={protected}: .* {prefix} prefix .* default \({prefix}\)"):
        tokenmerge.patch(model, r=2, num_protected=protected)
    assert not tokenmerge.is_patched(model)
    tokenmerge.patch(model, r=0, num_protected=0)  # nothing merges, nothing to protect
    tokenmerge.patch(model, r=2, num_protected=prefix + 1)  # protecting more is allowed
    tokenmerge.patch(model, r=2, num_protected=protected, layout="local")  # every token keeps its slot


def test_an_attention_pool_lets_the_class_token_merge():
    model = vit(global_pool="map")  # the pool reads every token, weighted by size, none by position
    x = torch.randn(2, 3, 32, 32)
    tokenmerge.patch(model, r=2, num_protected=0, trace_source=True)
    with torch.no_grad():
        state = model.forward_tokens(x)
    assert state.x.shape[1] == 17 - 2 * len(model.blocks)
    assert model(x).shape == (2, TINY["num_classes"])


def test_patched_models_load_in_a_fresh_process(tmp_path):
    x = torch.randn(2, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    for name, make in FAMILIES.items():
        model = tokenmerge.patch(make(), r=2)
        with torch.no_grad():
            logits = model(x)
            assert torch.equal(copy.deepcopy(model)(x), logits)
        torch.save(model, tmp_path / f"{name}.pt")
        torch.save(logits, tmp_path / f"{name}_logits.pt")
    # Nothing is patched in the fresh process before it loads.
    script = """
        import sys
        import torch
        torch.set_num_threads(1)
        folder = sys.argv[1]
        x = torch.load(f"{folder}/x.pt")
        for name in ("vit", "eva"):
            model = torch.load(f"{folder}/{name}.pt", weights_only=False)
            with torch.no_grad():
                same = torch.equal(model(x), torch.load(f"{folder}/{name}_logits.pt"))
            print(name, type(model).__name__, model.tokenmerge_schedule(), same)
    """
    assert fresh_process_lines(script, tmp_path)[:2] == ["vit TokenMergeVisionTransformer (2, 2, 2) True",
                                                         "eva TokenMergeEva (2, 2, 2) True"]
