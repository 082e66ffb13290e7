"""The timm Eva backend (EVA, EVA-02, RoPE ViTs) with random weights, and its RoPE merge rule."""

import copy
import pickle

import pytest
import timm
import torch
from timm.models.eva import Eva, EvaBlock, EvaBlockPostNorm

import tokenmerge
from tokenmerge.backends.timm_eva import rope_embedding, rope_grid, rope_kind
from tokenmerge.core.merge import MergePlan
from tokenmerge.methods.base import TokenReducer, TokenState

from .conftest import staged_logits

SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5)
EVA02 = dict(mlp_ratio=4 * 2 / 3, swiglu_mlp=True, scale_mlp=True, use_rot_pos_emb=True, ref_feat_shape=(2, 2))


def eva(**overrides):
    return Eva(**{**SMALL, **overrides}).eval()


VARIANTS = {
    # EVA-02: SwiGLU with its inner norm, fused qkv with q/v bias, RoPE 'cat' rescaled to a reference grid
    "eva02": lambda: eva(**EVA02),
    # EVA-01: absolute position embeddings only, plain MLP
    "eva01_no_rope": lambda: eva(),
    "separate_qkv_layerscale_token_pool": lambda: eva(
        **EVA02, qkv_fused=False, init_values=0.1, global_pool="token", scale_attn_inner=True),
    "registers_no_embed_class_rotate_half": lambda: eva(
        **EVA02, num_reg_tokens=2, no_embed_class=True, rope_rotate_half=True, global_pool="avgmax"),
    # ViT-RoPE mixed: learnt per-block frequencies, AttentionRope
    "rope_mixed": lambda: eva(
        use_rot_pos_emb=True, rope_type="mixed", attn_type="rope", use_abs_pos_emb=False,
        rope_grid_indexing="xy", init_values=1e-2, global_pool="token"),
    # DINOv3-like: centred coordinates, registers, grouped-query k/v, qk-norm
    "dinov3_gqa": lambda: eva(
        embed_dim=32, num_heads=4, num_kv_heads=2, qkv_fused=False, attn_type="rope", qk_norm=True,
        use_rot_pos_emb=True, rope_type="dinov3", use_abs_pos_emb=False,
        num_reg_tokens=4, init_values=1e-2),
    "map_pool": lambda: eva(**EVA02, global_pool="map", class_token=False),
    "max_pool": lambda: eva(**EVA02, global_pool="max"),
    "dynamic_img_size": lambda: eva(**EVA02, dynamic_img_size=True),
    # EVA-02-E: post-norm blocks
    "post_norm": lambda: eva(**EVA02, use_post_norm=True),
}
ROPE_VARIANTS = sorted(name for name in VARIANTS if name != "eva01_no_rope")


def images(batch=2, size=32):
    return torch.randn(batch, 3, size, size)


@pytest.fixture(params=sorted(VARIANTS))
def variant(request):
    torch.manual_seed(0)
    return request.param, VARIANTS[request.param]()


@torch.no_grad()
def test_r0_is_bit_identical_and_unpatch_restores(variant):
    name, model = variant
    x = images()
    reference = model(x)
    keys = list(model.state_dict())
    tokenmerge.patch(model, r=0)
    assert torch.equal(model(x), reference)
    assert torch.equal(model.forward_features(x), model.forward_tokens(x).x)
    tokenmerge.patch(model, r=3)
    assert list(model.state_dict()) == keys
    assert not torch.allclose(model(x), reference)
    tokenmerge.unpatch(model)
    assert type(model) is Eva and all(type(block) in (EvaBlock, EvaBlockPostNorm) for block in model.blocks)
    assert not any(hasattr(block, "_tm_rope") for block in model.blocks)
    assert not hasattr(model, "token_reducer")
    assert torch.equal(model(x), reference)


def test_registered_eva02_config_r0_exact_and_merges():
    torch.manual_seed(0)
    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=56, depth=2, num_classes=3).eval()
    x = images(size=56)
    with torch.no_grad():
        reference = model(x)
        tokenmerge.patch(model, r=0)
        assert torch.equal(model(x), reference)
        tokenmerge.patch(model, r=4)
        assert model.tokens_per_block() == [17, 13, 9]
        assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize("method", ["tome", "evit", "mctf"])
@torch.no_grad()
def test_methods_merge_expected_token_counts(variant, method):
    name, model = variant
    protected = model.num_prefix_tokens
    if method == "evit" and protected == 0:
        with pytest.raises(ValueError, match="class token"):  # EViT scores by class attention
            tokenmerge.patch(model, method=method, r=[4, 3, 2])
        return
    tokenmerge.patch(model, method=method, r=[4, 3, 2], trace_source=True)
    assert model.tokenmerge_config.num_protected == protected
    state = model.forward_tokens(images())
    expected = 16 + protected - 9
    assert model.tokens_per_block() == [16 + protected, 12 + protected, 9 + protected, expected]
    assert state.x.shape == (2, expected, 32)
    assert torch.isfinite(state.x).all() and torch.isfinite(model(images())).all()
    assert torch.all(state.size[:, :protected] == 1)
    assert torch.all(state.size[:, protected:].sum(dim=1) == 16)
    assert state.source.shape == (2, 16) and int(state.source.min()) >= protected
    if model.rope is not None:
        assert state.pos.shape == (2, expected, 2)


@pytest.mark.parametrize("name", ROPE_VARIANTS)
@torch.no_grad()
def test_positions_are_size_weighted_centroids_of_the_patches(name):
    torch.manual_seed(0)
    model = VARIANTS[name]()
    tokenmerge.patch(model, r=[4, 3, 2], trace_source=True)
    state = model.forward_tokens(images())
    rope, kind = model.blocks[0]._tm_rope
    grid = rope_grid(rope, kind, model.patch_embed.grid_size)  # [16, 2]
    protected = model.num_prefix_tokens
    for b in range(2):
        for token in range(protected, state.x.shape[1]):
            patches = state.source[b] == token
            assert int(patches.sum()) == int(state.size[b, token])
            assert torch.allclose(state.pos[b, token], grid[patches].mean(dim=0), atol=1e-5)


@pytest.mark.parametrize("name", ROPE_VARIANTS)
def test_rotation_rebuilt_at_grid_coordinates_is_timms_table(name):
    model = VARIANTS[name]()
    rope = model.rope
    kind = rope_kind(rope)
    table = rope.get_embed(shape=list(model.patch_embed.grid_size)) if getattr(rope, "feat_shape", None) is None \
        else rope.get_embed()
    coords = rope_grid(rope, kind, model.patch_embed.grid_size).unsqueeze(0)
    for block in range(model.depth if hasattr(model, "depth") else len(model.blocks)):
        rebuilt = rope_embedding(rope, kind, coords, block)[0]
        expected = table[block] if kind == "mixed" else table.unsqueeze(0)
        assert torch.equal(rebuilt, expected)
        if kind != "mixed":
            break


@pytest.mark.parametrize("name", ROPE_VARIANTS)
def test_merged_rotation_is_a_rotation_at_the_mean_position(name):
    """Averaging coordinates keeps sin^2 + cos^2 = 1 (q and k keep their norms); averaging the
    (sin, cos) rows, the rejected rule, would shrink them."""
    model = VARIANTS[name]()
    rope = model.rope
    kind = rope_kind(rope)
    grid = rope_grid(rope, kind, model.patch_embed.grid_size)
    a, b = grid[0], grid[-1]  # opposite corners
    mean = ((1 * a + 3 * b) / 4).view(1, 1, 2)
    emb = rope_embedding(rope, kind, mean, 0)
    sin, cos = emb.chunk(2, dim=-1)
    assert torch.allclose(sin ** 2 + cos ** 2, torch.ones_like(sin), atol=1e-6)
    q = torch.randn(1, emb.shape[1], 1, sin.shape[-1])
    from timm.layers import apply_rot_embed_cat

    rotated = apply_rot_embed_cat(q, emb, half=getattr(model.blocks[0].attn, "rotate_half", False))
    assert torch.allclose(rotated.norm(dim=-1), q.norm(dim=-1), atol=1e-5)
    rows = rope_embedding(rope, kind, torch.stack([a, b, b, b]).unsqueeze(0), 0)
    averaged_sin, averaged_cos = rows.mean(dim=2, keepdim=True).chunk(2, dim=-1)
    assert (averaged_sin ** 2 + averaged_cos ** 2).min() < 0.99


class PermuteTokens(TokenReducer):
    """Every group is one token, in a shuffled order (protected tokens stay first): a merge that
    changes nothing but where each token sits in the sequence."""

    name = "permute-test"

    def reduce(self, state, attn, r, num_protected, block_index):
        B, N, _ = state.x.shape
        generator = torch.Generator().manual_seed(block_index)
        order = torch.cat([torch.arange(num_protected), num_protected + torch.randperm(N - num_protected, generator=generator)])
        return self.apply_plan(state, MergePlan(order.expand(B, N), N))


@pytest.mark.parametrize("name", sorted(VARIANTS))
@torch.no_grad()
def test_merges_of_single_tokens_change_nothing(name):
    torch.manual_seed(0)
    model = VARIANTS[name]()
    x = images()
    reference = model.forward_features(x)
    tokenmerge.patch(model, method=PermuteTokens(), r=[1, 1, 1], prop_attn=False, trace_source=True)
    state = model.forward_tokens(x)
    # Undo the permutations: patch p of image b sits at token state.source[b, p].
    npt = model.num_prefix_tokens
    patches = state.x.gather(1, state.source.unsqueeze(-1).expand(-1, -1, state.x.shape[-1]))
    assert torch.allclose(state.x[:, :npt], reference[:, :npt], atol=1e-5)
    assert torch.allclose(patches, reference[:, npt:], atol=1e-5)
    assert torch.all(state.size == 1)


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("impl", ["bias", "fold"])
@torch.no_grad()
def test_merging_identical_tokens_equals_the_unmerged_computation(name, impl):
    """Two tokens with the same features and coordinates, merged into one of size 2 with
    proportional attention, give every token the output the unmerged pair gives."""
    torch.manual_seed(0)
    model = VARIANTS[name]()
    tokenmerge.patch(model, r=[1, 1, 1], attention_impl=impl)
    adapter = tokenmerge.adapter_for(model)
    state = adapter.initial_state(images())
    npt, j = model.num_prefix_tokens, model.num_prefix_tokens + 5
    N = state.x.shape[1]
    duplicated = TokenState(
        torch.cat([state.x, state.x[:, j:j + 1]], dim=1), None, None,
        None if state.pos is None else torch.cat([state.pos, state.pos[:, j:j + 1]], dim=1),
    )
    plan = MergePlan(torch.cat([torch.arange(N), torch.tensor([j])]).expand(2, N + 1), N)
    merged = model.token_reducer.apply_plan(duplicated, plan)
    assert torch.equal(merged.x, state.x) and int(merged.size[0, j]) == 2
    if state.pos is not None:
        assert torch.equal(merged.pos, state.pos)
    block = model.blocks[1]
    config = model.tokenmerge_config
    unmerged_out = block.forward_tokens(duplicated, 0, model.token_reducer, config, 1).x
    merged_out = block.forward_tokens(merged, 0, model.token_reducer, config, 1).x
    assert torch.allclose(merged_out, unmerged_out[:, :N], atol=1e-5)
    assert torch.allclose(unmerged_out[:, j], unmerged_out[:, N], atol=1e-6)
    assert npt < j


@torch.no_grad()
def test_size_weighted_average_pooling():
    torch.manual_seed(0)
    model = VARIANTS["eva02"]()
    tokenmerge.patch(model, r=[4, 3, 2])
    x = images()
    state = model.forward_tokens(x)
    tokens, sizes = state.x[:, 1:], state.size[:, 1:]  # Eva's avg pool leaves the class token out
    pooled = (tokens * sizes).sum(dim=1) / sizes.sum(dim=1)
    expected = model.head(model.fc_norm(pooled))
    assert torch.allclose(model(x), expected, atol=1e-6)
    with pytest.raises(ValueError, match="token_sizes"):
        model.forward_head(state.x)


@pytest.mark.parametrize("method", ["prune", "drop"])
def test_average_pooling_after_pruning_is_the_plain_mean(method):
    torch.manual_seed(0)
    model = tokenmerge.patch(VARIANTS["eva02"](), method=method, r=[4, 3, 2])
    x = images()
    state = model.forward_tokens(x)
    expected = model.head(model.fc_norm(state.x[:, 1:].mean(dim=1)))  # every kept token is one patch
    assert torch.allclose(model(x), expected, atol=1e-6)
    assert torch.allclose(model.forward_head(state.x), expected, atol=1e-6)


@torch.no_grad()
def test_dynamic_img_size_follows_the_input_grid():
    torch.manual_seed(0)
    model = VARIANTS["dynamic_img_size"]()
    tokenmerge.patch(model, r=2, trace_source=True)
    state = model.forward_tokens(images(size=48))  # 6x6 patches
    assert state.x.shape[1] == 37 - 6 and torch.isfinite(state.x).all()
    assert state.source.shape == (2, 36)


@pytest.mark.parametrize("name", ["eva02", "rope_mixed", "dinov3_gqa"])
@torch.no_grad()
def test_local_layout_keeps_every_token(name):
    torch.manual_seed(0)
    model = VARIANTS[name]()
    tokenmerge.patch(model, r=4, layout="local")
    state = model.forward_tokens(images())
    assert state.x.shape[1] == 16 + model.num_prefix_tokens and torch.isfinite(state.x).all()


def test_grad_checkpointing_matches_plain_backward():
    torch.manual_seed(0)
    model = VARIANTS["rope_mixed"]().train()
    tokenmerge.patch(model, r=[4, 3, 2])
    x = images()
    model(x).sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert "rope.freqs" in plain  # the learnt frequencies see the merged tokens' positions
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for n, p in model.named_parameters():
        if n in plain:
            assert torch.allclose(p.grad, plain[n], atol=1e-6), n


def test_dtem_trains_and_evaluates_with_rope():
    torch.manual_seed(0)
    model = VARIANTS["eva02"]()
    tokenmerge.patch(model, method="dtem", r=[4, 3, 2], embed_dim=16)
    model.train()
    soft = model.forward_tokens(images())
    assert soft.x.shape[1] == 17 and soft.pos.shape == (2, 17, 2) and soft.live == 17 - 9
    model(images()).sum().backward()
    assert model.token_reducer.embeds[0].proj.weight.grad is not None
    model.eval()
    with torch.no_grad():
        assert model.forward_tokens(images()).x.shape[1] == 17 - 9


def test_adapter_staged_blocks_match_forward():
    torch.manual_seed(0)
    model = VARIANTS["rope_mixed"]()
    tokenmerge.patch(model, r=[4, 3, 2])
    adapter = tokenmerge.adapter_for(model)
    assert adapter.family == "timm" and adapter.num_prefix_tokens == 1
    x = images()
    with torch.no_grad():
        assert torch.allclose(staged_logits(adapter, x), model(x), atol=1e-6)
        block = model.blocks[0]
        with pytest.raises(ValueError, match="coordinates"):
            block.forward_tokens(TokenState(adapter.embed(x)), 2, adapter.reducer, adapter.config, 0)


def test_copies_keep_their_own_rope():
    model = VARIANTS["rope_mixed"]()
    tokenmerge.patch(model, r=2)
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert all(block._tm_rope[0] is copied.rope for block in copied.blocks)
        with torch.no_grad():
            x = images()
            assert torch.equal(copied(x), model(x))


def test_refusals_name_the_problem():
    model = eva(**EVA02)
    model.blocks[1].attn = timm.layers.Attention(32, num_heads=2)
    with pytest.raises(TypeError, match=r"blocks\.1 \(EvaBlock\)\.attn \(Attention\)"):
        tokenmerge.patch(model, r=2)
    with pytest.raises(TypeError, match="RotaryEmbeddingMRope"):
        tokenmerge.patch(eva(use_rot_pos_emb=True, rope_type="mrope"), r=2)
    with pytest.raises(ValueError, match="num_protected"):
        tokenmerge.patch(eva(**EVA02), r=2, num_protected=0)
    model = tokenmerge.patch(eva(**EVA02, patch_drop_rate=0.5), r=2).train()
    with pytest.raises(ValueError, match="patch_drop_rate"):
        model(images())
    model = tokenmerge.patch(eva(**EVA02, rope_shift_coords=1.0), r=2).train()
    with pytest.raises(ValueError, match="rope_shift_coords"):
        model(images())
    assert torch.isfinite(model.eval()(images())).all()


@torch.no_grad()
def test_dense_features_unmerge_onto_the_grid():
    torch.manual_seed(0)
    model = VARIANTS["eva02"]()
    x = images()
    plain = tokenmerge.dense_features(model, x, output="map")
    tokenmerge.patch(model, r=[4, 3, 2], trace_source=True)
    merged = tokenmerge.dense_features(model, x, output="map")
    assert merged.shape == plain.shape == (2, 32, 4, 4) and torch.isfinite(merged).all()
