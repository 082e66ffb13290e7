"""Select-and-fuse baselines: EViT-style fusion, pruning by class attention, random merging."""

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import tokenmerge
from tokenmerge.core.merge import merge_tokens
from tokenmerge.methods.base import AttentionTensors
from tokenmerge.methods.baselines import ClassAttentionPrune, EViT, RandomMerge, fuse_rest_into_one_plan
from tokenmerge.methods.tcvit import TCViT

NUM_TOKENS = 13


def random_attention(seed=0, num_tokens=NUM_TOKENS, sized=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, num_tokens, 8, generator=gen)
    k = torch.randn(2, 3, num_tokens, 8, generator=gen)
    log_size = torch.randint(1, 4, (2, num_tokens), generator=gen).float().log() if sized else None
    return AttentionTensors(q, k, log_size, 8 ** -0.5)


def class_attention(attn):
    """Dense reference: the class token's head-averaged attention row ``[B, N]``."""
    logits = attn.q[:, :, :1] @ attn.k.transpose(-1, -2) * attn.scale
    if attn.log_size is not None:
        logits = logits + attn.log_size[:, None, None, :]
    return logits.softmax(-1).mean(1).squeeze(1)


def top_candidates(scores, num_protected, count):
    """Absolute indices of the ``count`` best-scoring candidates, increasing."""
    return (scores[num_protected:].topk(count).indices + num_protected).sort().values.tolist()


def small_vit(class_token=True, global_pool="token", reg_tokens=0):
    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=64, patch_size=8, embed_dim=48, depth=4, num_heads=3, num_classes=10,
        class_token=class_token, global_pool=global_pool, reg_tokens=reg_tokens,
    )
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.normal_(0, 0.3)  # sharper attention than the random init
    return model.eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------- EViT


@pytest.mark.parametrize("num_protected", [1, 2])
@pytest.mark.parametrize("sized", [False, True])
def test_evit_keeps_top_class_attention_and_fuses_rest_last(num_protected, sized):
    attn = random_attention(seed=2, sized=sized)
    r = 4
    x = torch.randn(2, NUM_TOKENS, 5)
    plan = EViT().plan(x, attn, r, num_protected, 0)
    num_keep = NUM_TOKENS - num_protected - r - 1
    assert plan.num_out == NUM_TOKENS - r
    fused_slot = plan.num_out - 1
    scores = class_attention(attn)
    size = attn.log_size.exp().unsqueeze(-1) if sized else torch.ones(2, NUM_TOKENS, 1)
    merged, merged_size = merge_tokens(x, size, plan)
    for b in range(2):
        assign = plan.assign[b].tolist()
        assert assign[:num_protected] == list(range(num_protected))
        kept = top_candidates(scores[b], num_protected, num_keep)
        assert [assign[i] for i in kept] == list(range(num_protected, num_protected + num_keep))
        rest = [i for i in range(num_protected, NUM_TOKENS) if i not in kept]
        assert len(rest) == r + 1 and all(assign[i] == fused_slot for i in rest)
        # The fused token is the size-weighted mean of everything not kept.
        expected = (x[b, rest] * size[b, rest]).sum(0) / size[b, rest].sum()
        torch.testing.assert_close(merged[b, fused_slot], expected)
        torch.testing.assert_close(merged_size[b, fused_slot, 0], size[b, rest].sum())


def test_fuse_rest_into_one_plan_layout():
    plan = fuse_rest_into_one_plan(torch.tensor([[1, 3]]), torch.tensor([[0, 2, 4]]), num_protected=1)
    assert plan.num_out == 4
    assert plan.assign.tolist() == [[0, 3, 1, 3, 2, 3]]


def test_evit_on_model_sizes_and_counts(images):
    model = small_vit()
    num_patches = model.patch_embed.num_patches
    tokenmerge.patch(model, method="evit", r=10, trace_source=True)
    assert model.tokens_per_block() == [65, 55, 45, 35, 25]
    with torch.no_grad():
        state = model.forward_tokens(images)
    assert state.x.shape[1] == 25
    assert (state.source != 0).all()  # the class token absorbed no patch
    assert state.size[:, 0].eq(1).all()
    assert state.size.sum(dim=(1, 2)).tolist() == [1 + num_patches] * 2


def test_evit_max_reduction_keeps_one_token_and_the_fused_one():
    assert EViT().max_reduction(197, 1) == 194
    assert EViT().max_reduction(3, 1) == 0
    model = small_vit()
    with pytest.warns(UserWarning, match="effective schedule"):
        tokenmerge.patch(model, method="evit", r=100)
    assert model.tokens_per_block() == [65, 3, 3, 3, 3]


# ---------------------------------------------------------------- pruning


@pytest.mark.parametrize("num_protected", [1, 2])
def test_prune_keeps_top_class_attention_and_discards_rest(num_protected):
    attn = random_attention(seed=4, sized=True)
    r = 5
    plan = ClassAttentionPrune().plan(torch.zeros(2, NUM_TOKENS, 4), attn, r, num_protected, 0)
    assert plan.num_out == NUM_TOKENS - r
    scores = class_attention(attn)
    for b in range(2):
        assign = plan.assign[b].tolist()
        kept = top_candidates(scores[b], num_protected, NUM_TOKENS - num_protected - r)
        assert [assign[i] for i in kept] == list(range(num_protected, plan.num_out))
        dropped = [i for i in range(num_protected, NUM_TOKENS) if i not in kept]
        assert [assign[i] for i in dropped] == [plan.num_out] * r


def test_prune_equals_tcvit_dominance_only_without_fusion(images):
    reference = small_vit()
    tokenmerge.patch(reference, method="tcvit", r=9, dominance_weight=1.0, fuse=False)
    model = small_vit()
    tokenmerge.patch(model, method="prune", r=9, trace_source=True)
    with torch.no_grad():
        state = model.forward_tokens(images)
        assert torch.equal(model(images), reference(images))
    assert state.size is None  # pruning merges nothing: sizes stay untracked
    assert (state.source < state.x.shape[1]).sum(1).tolist() == [state.x.shape[1] - 1] * 2


# ---------------------------------------------------------------- random merging


def test_random_is_deterministic_per_seed(images):
    outputs = {}
    for seed in (0, 0, 1):
        model = small_vit()
        tokenmerge.patch(model, method="random", r=8, seed=seed)
        with torch.no_grad():
            first, second = model(images), model(images)
        assert torch.equal(first, second)  # a fixed function of its input
        outputs.setdefault(seed, []).append(first)
    assert torch.equal(outputs[0][0], outputs[0][1])
    assert not torch.equal(outputs[0][0], outputs[1][0])


def test_random_generator_continues_its_stream():
    attn = random_attention(seed=6)
    x = torch.zeros(2, NUM_TOKENS, 4)
    plans = [RandomMerge(generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    first = [p.plan(x, attn, 4, 1, 0).assign for p in plans]
    second = [p.plan(x, attn, 4, 1, 0).assign for p in plans]
    assert torch.equal(first[0], first[1]) and torch.equal(second[0], second[1])
    assert not torch.equal(first[0], second[0])


@pytest.mark.parametrize("fuse_into", ["random", "connected"])
def test_random_merge_plan_is_valid(fuse_into):
    attn = random_attention(seed=8, sized=True)
    r, num_protected = 6, 1
    num_candidates = NUM_TOKENS - num_protected
    generator, replay = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    plan = RandomMerge(generator=generator, fuse_into=fuse_into).plan(
        torch.zeros(2, NUM_TOKENS, 4), attn, r, num_protected, 2
    )
    assert plan.num_out == NUM_TOKENS - r
    assign = plan.assign
    assert assign[:, 0].eq(0).all() and (assign[:, 1:] >= 1).all()
    assert (assign < plan.num_out).all()  # everything is fused, nothing discarded
    # The representatives are the top of the first uniform draw (replayed here).
    scores = torch.rand(2, num_candidates, generator=replay)
    logits = attn.q @ attn.k.transpose(-1, -2) * attn.scale + attn.log_size[:, None, None, :]
    dense = logits.softmax(-1).mean(1)
    for b in range(2):
        reps = top_candidates(torch.cat([torch.zeros(1), scores[b]]), num_protected, num_candidates - r)
        assert assign[b, reps].tolist() == list(range(num_protected, plan.num_out))
        others = [i for i in range(num_protected, NUM_TOKENS) if i not in reps]
        if fuse_into == "connected":
            expected = dense[b][others][:, reps].argmax(-1) + num_protected
            assert assign[b, others].tolist() == expected.tolist()


def test_random_on_model_sizes_and_counts(images):
    model = small_vit()
    num_patches = model.patch_embed.num_patches
    tokenmerge.patch(model, method="random", r=12, trace_source=True, seed=3)
    with torch.no_grad():
        state = model.forward_tokens(images)
    assert state.x.shape[1] == 65 - 48
    assert (state.source != 0).all()
    assert state.size.sum(dim=(1, 2)).tolist() == [1 + num_patches] * 2


# ---------------------------------------------------------------- shared behaviour


@pytest.mark.parametrize("method", ["evit", "prune", "random"])
def test_r0_reproduces_unmodified_model_exactly(method, images):
    model = small_vit()
    with torch.no_grad():
        expected = model(images)
        tokenmerge.patch(model, method=method, r=0)
        assert torch.equal(model(images), expected)
        tokenmerge.patch(model, method=method, r=6)
        assert not torch.allclose(model(images), expected)


@pytest.mark.parametrize("method", ["evit", "prune"])
def test_class_attention_methods_need_a_class_token(method, images):
    model = small_vit(class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="no protected class token"):
        tokenmerge.patch(model, method=method, r=4)
    assert not tokenmerge.is_patched(model)


@pytest.mark.parametrize("method,options", [("evit", {}), ("prune", {}), ("tcvit", {})])
def test_registers_are_not_taken_for_a_class_token(method, options, images):
    # timm's *_reg4_gap layout: four registers lead, no class token; scoring by "token 0's
    # attention" would score by a register's.
    model = small_vit(class_token=False, reg_tokens=4, global_pool="avg")
    with pytest.raises(ValueError, match="no class token: its 4 protected prefix token"):
        tokenmerge.patch(model, method=method, r=4, **options)
    assert not tokenmerge.is_patched(model)
    tokenmerge.patch(model, method="tcvit", r=4, dominance_weight=0.0)  # connectivity alone needs none
    tokenmerge.patch(model, method="tome", r=4)
    with torch.no_grad():
        assert torch.isfinite(model(images)).all()


def test_random_runs_without_class_token(images):
    model = small_vit(class_token=False, global_pool="avg")
    tokenmerge.patch(model, method="random", r=10)
    with torch.no_grad():
        assert torch.isfinite(model(images)).all()


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(seed=-1), "seed"),
        (dict(seed=1.5), "seed"),
        (dict(generator=3), "generator"),
        (dict(fuse_into="nearest"), "fuse_into"),
        (dict(chunk_size=0), "chunk_size"),
    ],
)
def test_random_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        RandomMerge(**options)


@pytest.mark.parametrize("method", ["evit", "prune"])
def test_baselines_without_options_reject_unknown_ones(method):
    with pytest.raises(TypeError, match=method):
        tokenmerge.patch(small_vit(), method=method, r=4, order=2)


def test_plan_rejects_impossible_reductions():
    attn = random_attention()
    x = torch.zeros(2, NUM_TOKENS, 4)
    with pytest.raises(ValueError, match="evit removes"):
        EViT().plan(x, attn, NUM_TOKENS - 2, 1, 0)
    with pytest.raises(ValueError, match="at least one"):
        ClassAttentionPrune().plan(x, attn, NUM_TOKENS - 1, 1, 0)
    with pytest.raises(ValueError, match="at least one"):
        RandomMerge().plan(x, attn, NUM_TOKENS - 1, 1, 0)
    with pytest.raises(ValueError, match="at least one"):
        TCViT().plan(x, attn, NUM_TOKENS - 1, 1, 0)
