"""The timm backend on every supported VisionTransformer variant, with random weights."""

import copy
import pickle

import pytest
import timm
import torch
from timm.models.deit import VisionTransformerDistilled
from timm.layers import AttentionPoolLatent
from timm.models.vision_transformer import Block, ResPostBlock, VisionTransformer

import tokenmerge
from tokenmerge.core.schedule import ScheduleClampedWarning

SMALL = dict(img_size=64, patch_size=8, embed_dim=48, depth=4, num_heads=3, num_classes=7)


def vit(**overrides):
    return VisionTransformer(**{**SMALL, **overrides}).eval()


VARIANTS = {
    "vit": lambda: vit(),
    "deit_distilled": lambda: VisionTransformerDistilled(**SMALL).eval(),
    "deit3_layerscale": lambda: vit(init_values=1e-1, no_embed_class=True),
    "registers": lambda: vit(reg_tokens=4),
    "qk_norm": lambda: vit(qk_norm=True),
    "mae_avg_pool": lambda: vit(global_pool="avg", fc_norm=True),
    "avg_pool_no_class_token": lambda: vit(global_pool="avg", class_token=False),
    "dynamic_img_size": lambda: vit(dynamic_img_size=True),
    "avgmax_pool": lambda: vit(global_pool="avgmax"),
    "max_pool": lambda: vit(global_pool="max"),
    "siglip_map_head": lambda: vit(global_pool="map", class_token=False, no_embed_class=True),
    "map_head_with_class_token": lambda: vit(global_pool="map"),
}
PROTECTED = {"deit_distilled": 2, "registers": 5, "avg_pool_no_class_token": 0, "siglip_map_head": 0}


def images(batch=2, size=64):
    return torch.randn(batch, 3, size, size)


@pytest.fixture(params=sorted(VARIANTS))
def variant(request):
    return request.param, VARIANTS[request.param]()


@torch.no_grad()
def test_r0_is_bit_identical_and_unpatch_restores(variant):
    name, model = variant
    x = images()
    reference = model(x)
    tokenmerge.patch(model, r=0)
    assert torch.equal(model(x), reference)
    tokenmerge.patch(model, r=4)
    assert not torch.allclose(model(x), reference)
    tokenmerge.unpatch(model)
    assert type(model) in (VisionTransformer, VisionTransformerDistilled)
    assert all(type(block) is Block for block in model.blocks)
    assert not hasattr(model, "token_reducer") and not hasattr(model, "tokenmerge_config")
    assert torch.equal(model(x), reference)


@torch.no_grad()
def test_merges_expected_token_counts_and_protects_prefix(variant):
    name, model = variant
    protected = PROTECTED.get(name, 1)
    assert model.num_prefix_tokens == protected
    tokenmerge.patch(model, r=[6, 5, 4, 3], trace_source=True)
    assert model.tokenmerge_config.num_protected == protected
    state = model.forward_tokens(images())
    expected = 64 + protected - 18
    assert model.tokens_per_block() == [64 + protected, 58 + protected, 53 + protected, 49 + protected, expected]
    assert state.x.shape == (2, expected, 48)
    assert torch.all(state.size[:, :protected] == 1)
    assert torch.all(state.size[:, protected:].sum(dim=1) == 64)
    assert state.source.shape == (2, 64) and int(state.source.min()) >= protected


def test_patched_model_is_still_a_timm_model():
    model = vit()
    keys = list(model.state_dict())
    tokenmerge.patch(model, r=3)
    assert isinstance(model, VisionTransformer)
    assert list(model.state_dict()) == keys
    x = images()
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, 65 - 12, 48)
        torch.testing.assert_close(model.forward_head(features), model(x))
        assert model.forward_head(features, pre_logits=True).shape == (2, 48)
    fresh = vit()
    fresh.load_state_dict(model.state_dict())  # keys and shapes unchanged


@torch.no_grad()
def test_average_pooling_is_size_weighted():
    model = vit(global_pool="avg", fc_norm=True)
    tokenmerge.patch(model, r=8)
    x = images()
    state = model.forward_tokens(x)
    tokens, sizes = state.x[:, 1:], state.size[:, 1:]
    weighted = (tokens * sizes).sum(1) / sizes.sum(1)
    torch.testing.assert_close(model(x), model.head(model.fc_norm(weighted)))
    assert not torch.allclose(model(x), model.head(model.fc_norm(tokens.mean(1))))
    with pytest.raises(ValueError, match="token_sizes"):
        model.forward_head(state.x)  # an unweighted mean of merged tokens would be wrong


@pytest.mark.parametrize("method", ["prune", "drop"])
def test_average_pooling_after_pruning_is_the_plain_mean(method):
    # Pruned tokens are gone and every kept one still stands for one patch: the plain mean is right.
    model = tokenmerge.patch(vit(global_pool="avg", fc_norm=True), method=method, r=8)
    x = images()
    state = model.forward_tokens(x)
    assert state.x.shape[1] < model.patch_embed.num_patches + 1
    expected = model.head(model.fc_norm(state.x[:, 1:].mean(1)))
    torch.testing.assert_close(model(x), expected)
    torch.testing.assert_close(model.forward_head(state.x), expected)


@torch.no_grad()
def test_attention_pool_weighs_a_merged_token_as_its_copies():
    model = tokenmerge.patch(vit(global_pool="map", class_token=False), r=8)
    state = model.forward_tokens(images(batch=1))
    assert int(state.size.max()) > 1
    pooled = model.forward_head(state.x, pre_logits=True, token_sizes=state.size)
    # A token of size s stands for s patches: the unmodified pool over s copies of it.
    copies = state.x[0].repeat_interleave(state.size[0, :, 0].long(), dim=0)[None]
    torch.testing.assert_close(pooled, model.fc_norm(model.attn_pool(copies)))
    assert not torch.allclose(pooled, model.fc_norm(model.attn_pool(state.x)))
    with pytest.raises(ValueError, match="token_sizes"):
        model.forward_head(state.x)  # unweighted pooling of merged tokens would be wrong


def test_unsupported_attention_pools_are_named():
    model = vit(global_pool="map")
    model.attn_pool = AttentionPoolLatent(48, num_heads=3, pos_embed="abs", feat_size=64)
    with pytest.raises(TypeError, match=r"attn_pool \(AttentionPoolLatent\).*position embedding"):
        tokenmerge.patch(model, r=2)

    class CustomPool(AttentionPoolLatent):
        def forward(self, x, attn_mask=None):
            return super().forward(x).relu()

    model.attn_pool = CustomPool(48, num_heads=3)
    with pytest.raises(TypeError, match=r"attn_pool \(CustomPool\): tokenmerge supports timm's AttentionPoolLatent"):
        tokenmerge.patch(model, r=2)
    assert type(model) is VisionTransformer


def test_distilled_head_averages_both_tokens():
    model = VisionTransformerDistilled(**SMALL).eval()
    tokenmerge.patch(model, r=5)
    x = images()
    state = model.forward_tokens(x)
    expected = (model.head(state.x[:, 0]) + model.head_dist(state.x[:, 1])) / 2
    torch.testing.assert_close(model(x), expected)
    torch.testing.assert_close(model.forward_head(state.x), expected)


@torch.no_grad()
def test_dynamic_img_size_resolves_schedule_per_input():
    model = vit(dynamic_img_size=True)
    tokenmerge.patch(model, r=5)
    assert model(images(size=96)).shape == (2, 7)
    assert model.tokens_per_block(145) == [145, 140, 135, 130, 125]
    assert model(images(size=64)).shape == (2, 7)


def test_patching_twice_replaces_the_patch():
    model = vit()
    tokenmerge.patch(model, r=4)
    tokenmerge.patch(model, r=2)
    assert model.tokenmerge_schedule() == (2, 2, 2, 2)
    assert type(model).__mro__.count(VisionTransformer) == 1
    assert type(model).__name__ == "TokenMergeVisionTransformer"
    tokenmerge.unpatch(model)
    assert type(model) is VisionTransformer
    tokenmerge.unpatch(model)  # a no-op on an unpatched model


def test_patched_model_copies_and_pickles():
    model = tokenmerge.patch(vit(), r=3)
    x = images()
    with torch.no_grad():
        reference = model(x)
        assert torch.equal(copy.deepcopy(model)(x), reference)
        assert torch.equal(pickle.loads(pickle.dumps(model))(x), reference)


def test_schedule_clamp_warns_at_patch_time():
    with pytest.warns(ScheduleClampedWarning, match="effective schedule"):
        tokenmerge.patch(vit(), r=40)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(), ValueError, "exactly one of r="),
    (dict(r=3, keep_ratio=0.5), ValueError, "exactly one of r="),
    (dict(r=-1), ValueError, ">= 0"),
    (dict(r=2.5), TypeError, "non-negative integer"),
    (dict(r=3, method="nope"), ValueError, "unknown method 'nope'"),
    (dict(r=3, attention_impl="flash"), ValueError, "attention_impl"),
    (dict(r=3, num_protected=-2), ValueError, "num_protected"),
    (dict(r=3, trace_source="yes"), TypeError, "trace_source must be True or False"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        tokenmerge.patch(vit(), **kwargs)


@pytest.mark.parametrize("make,name", [
    (lambda: timm.create_model("swin_tiny_patch4_window7_224", pretrained=False), "SwinTransformer"),
    (lambda: timm.create_model("convnext_atto", pretrained=False), "ConvNeXt"),
])
def test_unsupported_architectures_are_named(make, name):
    with pytest.raises(TypeError, match=name):
        tokenmerge.patch(make(), r=4)


def test_unsupported_block_is_named():
    model = vit(block_fn=ResPostBlock)
    with pytest.raises(TypeError, match=r"blocks\.0 \(ResPostBlock\)"):
        tokenmerge.patch(model, r=4)

    class CustomBlock(Block):
        def forward(self, x, attn_mask=None, is_causal=False):
            return super().forward(x) * 1.0

    model = vit(block_fn=CustomBlock)
    with pytest.raises(TypeError, match="CustomBlock"):
        tokenmerge.patch(model, r=4)
    assert type(model) is VisionTransformer  # a failed patch leaves the model alone


def test_attention_masks_are_refused():
    model = tokenmerge.patch(vit(), r=2)
    with pytest.raises(ValueError, match="attention masks"):
        model(images(), attn_mask=torch.zeros(65, 65))


@torch.no_grad()
def test_reentrant_calls_do_not_share_state():
    model = tokenmerge.patch(vit(), r=6)
    a, b = images(batch=3), images(batch=1)
    alone_a, alone_b = model(a), model(b)
    # interleaving two inputs of different shapes must not leak state between them
    assert torch.equal(model(b), alone_b)
    assert torch.equal(model(a), alone_a)


@pytest.mark.parametrize("impl", ["fold", "bias"])
@torch.no_grad()
def test_attention_impls_agree(impl):
    model = tokenmerge.patch(vit(), r=6, attention_impl="bias")
    x = images()
    reference = model(x)
    tokenmerge.patch(model, r=6, attention_impl=impl)
    torch.testing.assert_close(model(x), reference, atol=1e-5, rtol=1e-4)


def test_training_backpropagates_through_merging():
    model = tokenmerge.patch(vit(drop_path_rate=0.1), r=5).train()
    loss = model(images()).logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def _gradients(model, x):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)  # the same drop-path draws in every step
    model(x).logsumexp(-1).mean().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method,layout", [("tome", "global"), ("tome", "local"), ("dtem", "global")])
def test_grad_checkpointing_is_honoured(method, layout):
    model = tokenmerge.patch(vit(drop_path_rate=0.1), method=method, r=5, layout=layout).train()
    x = images()
    calls = []
    model.blocks[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    plain = _gradients(model, x)
    assert len(calls) == 1
    model.set_grad_checkpointing(True)
    checkpointed = _gradients(model, x)
    assert len(calls) == 3  # forward, then recomputed in backward: activations were not stored
    assert plain.keys() == checkpointed.keys() and len(plain) == len(list(model.parameters()))
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)
    with torch.no_grad():  # nothing to recompute without gradients: one plain forward
        model(x)
    assert len(calls) == 4


@pytest.mark.parametrize("name,match", [
    ("beit_base_patch16_224", r"Beit \(its attention adds a relative-position bias"),
    ("vit_relpos_small_patch16_224", r"VisionTransformerRelPos \(its attention adds a relative-position bias"),
])
def test_refused_timm_families_say_why(name, match):
    model = timm.create_model(name, pretrained=False, depth=1, img_size=56 if "patch14" in name else 64)
    with pytest.raises(TypeError, match=match):
        tokenmerge.patch(model, r=2)
