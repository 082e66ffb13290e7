"""open_clip backend: open_clip's own VisionTransformer (OpenAI/LAION CLIP, CLIPA, CoCa towers),
alone or inside an open_clip CLIP model. Tiny towers with random weights; nothing downloaded."""

from __future__ import annotations

import copy
import pickle

import open_clip
import pytest
import torch
from open_clip.transformer import AttentionalPooler, ResidualAttentionBlock, VisionTransformer

import tokenmerge
from tokenmerge.backends.adapter import adapter_for
from tokenmerge.backends.open_clip import _pool_attention

pytestmark = pytest.mark.usefixtures("one_thread")

TOWER = dict(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=2, output_dim=16)
TOKENS = (32 // 8) ** 2 + 1  # patches + class token

# The pooling and block variants open_clip's configs use (and its CustomResidualAttentionBlock).
VARIANTS = {
    "class-token": {},
    "average": dict(pool_type="avg"),
    "clipa": dict(pool_type="avg", final_ln_after_pool=True, no_ln_pre=True),  # ViT-H-14-CLIPA
    "final-ln-class-token": dict(final_ln_after_pool=True),
    "layer-scale": dict(ls_init_value=0.1),  # ViT-M-16-alt
    "sin-cos": dict(pos_embed_type="sin_cos_2d"),
    "output-tokens": dict(output_tokens=True),  # coca_base
    "coca": dict(attentional_pool=True, attn_pooler_heads=2, attn_pooler_queries=5, output_tokens=True),
    "coca-parallel": dict(attentional_pool="parallel", attn_pooler_heads=2, attn_pooler_queries=5,
                          output_dim=32, output_tokens=True),
    "coca-cascade": dict(attentional_pool="cascade", attn_pooler_heads=2, attn_pooler_queries=5,
                         output_dim=32, output_tokens=True),
    "custom-block": dict(qk_norm=True, scale_heads=True, scale_attn_inner=True, scale_attn=True, scale_fc=True,
                         ls_init_value=0.1),
}


def tower(**kwargs) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(**{**TOWER, **kwargs}).eval()


def images(batch=2, size=32):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def _outputs(model, x):
    out = model(x)
    return out if isinstance(out, tuple) else (out,)


def _clip(**vision) -> open_clip.CLIP:
    torch.manual_seed(0)
    vision_cfg = dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16, mlp_ratio=2, **vision)
    text_cfg = dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1)
    return open_clip.CLIP(embed_dim=16, vision_cfg=vision_cfg, text_cfg=text_cfg).eval()


@torch.no_grad()
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_r0_is_bit_identical_merging_runs_and_unpatch_restores(variant):
    model = tower(**VARIANTS[variant])
    block_classes = [type(b) for b in model.transformer.resblocks]
    x = images()
    reference = _outputs(model, x)
    tokenmerge.patch(model, r=0)
    assert type(model).__name__ == "TokenMergeVisionTransformer" and isinstance(model, VisionTransformer)
    for out, ref in zip(_outputs(model, x), reference, strict=True):
        assert torch.equal(out, ref)
    tokenmerge.patch(model, r=3)
    assert model.tokens_per_block() == [TOKENS, TOKENS - 3, TOKENS - 6]
    merged = _outputs(model, x)
    assert merged[0].shape == reference[0].shape and torch.isfinite(merged[0]).all()
    assert not torch.allclose(merged[0], reference[0], atol=1e-4)  # merging changed the embedding
    assert model.forward_tokens(x).x.shape[1] == TOKENS - 6
    tokenmerge.unpatch(model)
    assert type(model) is VisionTransformer and [type(b) for b in model.transformer.resblocks] == block_classes
    assert not tokenmerge.is_patched(model)
    for out, ref in zip(_outputs(model, x), reference, strict=True):
        assert torch.equal(out, ref)


@torch.no_grad()
def test_average_pooling_is_size_weighted():
    model = tokenmerge.patch(tower(pool_type="avg"), r=4)
    x = images()
    state = model.forward_tokens(x)  # ln_post already applied to every token
    tokens, sizes = state.x[:, 1:], state.size[:, 1:]
    assert int(sizes.max()) > 1 and torch.equal(sizes.sum(1), torch.full((2, 1), 16.0))
    weighted = (tokens * sizes).sum(1) / sizes.sum(1)
    torch.testing.assert_close(model(x), weighted @ model.proj)
    assert not torch.allclose(model(x), tokens.mean(1) @ model.proj, atol=1e-4)


@torch.no_grad()
def test_final_ln_after_pool_norms_the_size_weighted_average():
    model = tokenmerge.patch(tower(pool_type="avg", final_ln_after_pool=True, no_ln_pre=True), r=4)
    x = images()
    state = model.forward_tokens(x)  # tokens not normed: the norm follows the pool
    tokens, sizes = state.x[:, 1:], state.size[:, 1:]
    weighted = (tokens * sizes).sum(1) / sizes.sum(1)
    torch.testing.assert_close(model(x), model.ln_post(weighted) @ model.proj)


@torch.no_grad()
def test_class_token_pooling_and_merged_output_tokens():
    model = tokenmerge.patch(tower(output_tokens=True), r=3)
    x = images()
    state = model.forward_tokens(x)
    pooled, tokens = model(x)
    torch.testing.assert_close(pooled, state.x[:, 0] @ model.proj)
    # The returned tokens are the merged ones, after the class token.
    assert tokens.shape == (2, model.tokens_per_block()[-1] - 1, 32)
    torch.testing.assert_close(tokens, state.x[:, 1:])


@torch.no_grad()
def test_attention_pool_weighs_a_merged_token_as_its_copies():
    model = tokenmerge.patch(tower(**VARIANTS["coca"]), r=4)
    state = model.forward_tokens(images(batch=1))
    assert int(state.size.max()) > 1
    pool = model.attn_pool
    assert isinstance(pool, AttentionalPooler)
    # A token of size s stands for s patches: the unmodified pool over s copies of it.
    copies = state.x[0].repeat_interleave(state.size[0, :, 0].long(), dim=0)[None]
    torch.testing.assert_close(_pool_attention(pool, state.x, state.size), pool(copies))
    assert not torch.allclose(_pool_attention(pool, state.x, state.size), pool(state.x), atol=1e-4)
    pooled, tokens = model(images(batch=1))  # CoCa: tokens are the pooler's queries, not merged
    assert pooled.shape == (1, 16) and tokens.shape == (1, 4, 16)
    expected = model.ln_post(pool(copies))
    torch.testing.assert_close(pooled, expected[:, 0] @ model.proj)
    torch.testing.assert_close(tokens, expected[:, 1:])


@torch.no_grad()
def test_whole_clip_model_patches_its_image_tower():
    model = _clip()
    x = images()
    text = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(2))
    reference, text_reference = model.encode_image(x), model.encode_text(text)
    tokenmerge.patch(model, r=0)
    assert torch.equal(model.encode_image(x), reference)
    tokenmerge.patch(model, r=3)
    assert tokenmerge.is_patched(model) and type(model) is open_clip.CLIP
    assert type(model.visual).__name__ == "TokenMergeVisionTransformer"
    adapter = adapter_for(model)
    assert adapter.family == "open_clip" and adapter.owner is model.visual
    assert adapter.tokens_per_block() == [TOKENS, TOKENS - 3, TOKENS - 6]
    merged = model.encode_image(x, normalize=True)
    torch.testing.assert_close(merged, torch.nn.functional.normalize(model.visual(x), dim=-1))
    assert not torch.allclose(merged, torch.nn.functional.normalize(reference, dim=-1), atol=1e-4)
    assert torch.equal(model.encode_text(text), text_reference)  # the text tower is left alone
    image_features, text_features, _ = model(x, text)
    assert image_features.shape == (2, 16) and torch.isfinite(image_features).all()
    tokenmerge.unpatch(model)
    assert not tokenmerge.is_patched(model) and type(model.visual) is VisionTransformer
    assert torch.equal(model.encode_image(x), reference)


@pytest.mark.parametrize("undo", ["tower", "zero-shot"])
def test_unpatching_the_tower_or_a_zero_shot_wrapper_unpatches_the_clip(undo):
    from tokenmerge.zero_shot import ZeroShotClassifier

    model = tokenmerge.patch(_clip(), r=3)
    zero_shot = ZeroShotClassifier(model, torch.randn(3, 16))
    # Either way, the tower the clip runs is open_clip's own again: nothing merges.
    tokenmerge.unpatch(model.visual if undo == "tower" else zero_shot)
    assert type(model.visual) is VisionTransformer
    assert not tokenmerge.is_patched(model) and not tokenmerge.is_patched(zero_shot)
    if undo == "tower":
        tokenmerge.unpatch(model)  # nothing merges any more, but the clip's stale marker goes
    assert "tokenmerge_config" not in model.__dict__  # the clip's marker went with the patch
    # What needs an unmodified model takes it (here it gets as far as checking its options).
    with pytest.raises(ValueError, match="options must not hold threshold"):
        tokenmerge.calibrate_thresholds(model, [], r=2, options={"threshold": 0.5})
    tokenmerge.patch(model.visual, r=3)  # the tower alone, patched again, merges inside the clip
    assert tokenmerge.is_patched(model) and tokenmerge.is_patched(zero_shot)


def test_adapter_geometry_and_staged_features():
    model = tower(pool_type="avg")
    adapter = adapter_for(model)
    assert adapter.family == "open_clip" and adapter.num_prefix_tokens == 1
    assert adapter.image_size == 32 and adapter.patch_size == (8, 8) and adapter.input_size == (32, 32)
    assert adapter.num_patches == 16 and adapter.num_tokens == TOKENS and adapter.num_blocks == 2
    assert adapter.num_classes is None
    x = images()
    with torch.no_grad():
        unmerged, protected = adapter.final_state(x)
        assert unmerged.x.shape == (2, TOKENS, 32) and protected == 1
        tokenmerge.patch(model, r=3)
        state = adapter.initial_state(x)
        for i, block in enumerate(adapter.blocks):
            state = block.forward_tokens(state, adapter.schedule()[i], adapter.reducer, adapter.config, i)
        torch.testing.assert_close(adapter.features(state), model(x))
        with pytest.raises(TypeError, match="no classification head"):
            adapter.logits(state)
        tokenmerge.patch(model, r=0)
        assert torch.equal(adapter.final_state(x)[0].x, unmerged.x)


@torch.no_grad()
@pytest.mark.parametrize("method", ["mctf", "dtem", "pitome", "tcvit"])
def test_other_methods_run(method):
    model = tower(pool_type="avg")
    x = images()
    reference = model(x)
    tokenmerge.patch(model, method=method, r=3)
    out = model(x)
    assert out.shape == reference.shape and torch.isfinite(out).all()
    assert model.forward_tokens(x).x.shape[1] == model.tokens_per_block()[-1] == TOKENS - 6


@torch.no_grad()
def test_local_layout_keeps_every_token_so_per_patch_outputs_work():
    model = tower(pool_type="none", output_tokens=True)
    x = images()
    reference = model(x)
    with pytest.raises(ValueError, match=r"pool_type='none'.*layout='local'"):
        tokenmerge.patch(model, r=2)
    assert type(model) is VisionTransformer  # a refused patch leaves the model as it was
    tokenmerge.patch(model, r=2, layout="local")
    pooled, tokens = model(x)
    assert pooled.shape == reference[0].shape and tokens.shape == reference[1].shape
    assert torch.isfinite(pooled).all()


def _gradients(model, x):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    model(x).square().mean().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method,layout", [("tome", "global"), ("tome", "local")])
def test_grad_checkpointing_is_honoured(method, layout):
    model = tokenmerge.patch(tower(pool_type="avg", ls_init_value=0.5), method=method, r=3, layout=layout).train()
    x = images()
    calls = []
    model.transformer.resblocks[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    plain = _gradients(model, x)
    assert len(calls) == 1
    model.set_grad_checkpointing(True)
    checkpointed = _gradients(model, x)
    assert len(calls) == 3  # forward, then recomputed in backward
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


def test_unsupported_pieces_are_refused_naming_the_module():
    with pytest.raises(TypeError, match=r"transformer\.resblocks\.0\.attn \(Attention\): scaled-cosine"):
        tokenmerge.patch(tower(scaled_cosine_attn=True), r=2)

    class OwnForward(VisionTransformer):
        def forward(self, x):
            return super().forward(x) * 2

    torch.manual_seed(0)
    with pytest.raises(TypeError, match=r"OwnForward\): it overrides VisionTransformer\.forward"):
        tokenmerge.patch(OwnForward(**TOWER), r=2)

    model = tower(attentional_pool=True, attn_pooler_heads=2, attn_pooler_queries=5)

    class OwnPool(AttentionalPooler):
        def forward(self, x):
            return super().forward(x).relu()

    model.attn_pool = OwnPool(16, 32, n_head=2, n_queries=5)
    with pytest.raises(TypeError, match=r"attn_pool \(.*OwnPool\): tokenmerge supports open_clip's AttentionalPooler"):
        tokenmerge.patch(model, r=2)
    assert type(model) is VisionTransformer

    model = tower()
    model.transformer.resblocks[1].attn = torch.nn.MultiheadAttention(32, 2, batch_first=True, add_bias_kv=True)
    with pytest.raises(TypeError, match=r"transformer\.resblocks\.1\.attn: add_bias_kv"):
        tokenmerge.patch(model, r=2)

    class OwnBlock(ResidualAttentionBlock):
        def attention(self, q_x, k_x=None, v_x=None, attn_mask=None):
            return super().attention(q_x, k_x, v_x, attn_mask) * 2

    model = tower()
    model.transformer.resblocks[0] = OwnBlock(32, 2, mlp_ratio=2)
    with pytest.raises(TypeError, match=r"transformer\.resblocks\.0 \(.*OwnBlock\): it overrides "
                                         r"ResidualAttentionBlock\.attention"):
        tokenmerge.patch(model, r=2)

    with pytest.raises(ValueError, match="num_protected=0: this model has 1 prefix token"):
        tokenmerge.patch(tower(), r=2, num_protected=0)
    # An attentional pooler reads every token (weighted by size), not the class token's slot.
    pooled = tower(**VARIANTS["coca"])
    tokenmerge.patch(pooled, r=2, num_protected=0)
    assert adapter_for(pooled).tokens_per_block()[-1] == TOKENS - 4


def test_timm_trunk_towers_point_to_their_trunk():
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg=dict(timm_model_name="test_vit", timm_pool="", timm_proj="linear", image_size=160),
        text_cfg=dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1),
    )
    with pytest.raises(TypeError, match=r"open_clip\.model\.CLIP \(its image tower is a timm model.*model\.visual\.trunk"):
        tokenmerge.patch(model, r=2)
    tokenmerge.patch(model.visual.trunk, r=2)  # the trunk is a timm VisionTransformer
    assert adapter_for(model.visual.trunk).family == "timm"


@torch.no_grad()
def test_forward_intermediates_is_refused_while_merging():
    model = tokenmerge.patch(tower(), r=0)
    x = images()
    assert model.forward_intermediates(x)["image_features"].shape == (2, 16)
    tokenmerge.patch(model, r=2)
    with pytest.raises(ValueError, match="forward_intermediates is not supported on a token-merged"):
        model.forward_intermediates(x)


@torch.no_grad()
def test_patched_tower_copies_and_pickles():
    model = tokenmerge.patch(tower(pool_type="avg"), r=3)
    x = images()
    out = model(x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(clone(x), out)


@torch.no_grad()
def test_dense_features_unmerge_onto_the_patch_grid():
    model = tower()
    x = images()
    unmerged = tokenmerge.dense_features(model, x, output="map")
    assert unmerged.shape == (2, 32, 4, 4)
    tokenmerge.patch(model, r=3, trace_source=True)
    merged = tokenmerge.dense_features(model, x, output="map")
    assert merged.shape == unmerged.shape and torch.isfinite(merged).all()
    tokenmerge.patch(model, r=0)
    assert torch.equal(tokenmerge.dense_features(model, x, output="map"), unmerged)


@torch.no_grad()
def test_whole_coca_model_merges_before_its_attentional_pooler():
    torch.manual_seed(0)
    vision = dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16, mlp_ratio=2,
                  attentional_pool=True, attn_pooler_heads=2, attn_pooler_queries=5, output_tokens=True)
    text = dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1, embed_cls=True, output_tokens=True)
    decoder = dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1)
    model = open_clip.CoCa(embed_dim=32, multimodal_cfg=decoder, text_cfg=text, vision_cfg=vision).eval()
    # open_clip (3.3.0) never initialises the decoder's projection (torch.empty): whatever memory
    # it got could make the logits below non-finite.
    torch.nn.init.normal_(model.text_decoder.text_projection, std=32 ** -0.5)
    x = images()
    text_ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(2))
    reference = model.encode_image(x)
    tokenmerge.patch(model, r=3)
    assert adapter_for(model).tokens_per_block()[-1] == TOKENS - 6
    merged = model.encode_image(x)
    assert merged.shape == reference.shape and not torch.allclose(merged, reference, atol=1e-4)
    out = model(x, text_ids)  # the decoder reads the pooler's 4 query tokens, whatever was merged
    assert out["logits"].shape == (2, 7, 64) and torch.isfinite(out["logits"]).all()
    tokenmerge.unpatch(model)
    assert torch.equal(model.encode_image(x), reference)
