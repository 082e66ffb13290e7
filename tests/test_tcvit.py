"""TC-ViT: relevance against a dense reference, select-and-fuse plans, the patched model."""

import math
import warnings

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import tokenmerge
from tokenmerge.core.merge import merge_tokens
from tokenmerge.core.schedule import ScheduleClampedWarning
from tokenmerge.core.relevance import (
    attention_transpose_matvec,
    connectivity,
    dominance,
    most_connected_representative,
    select_and_fuse,
    select_representatives,
    token_relevance,
)
from tokenmerge.methods.base import AttentionTensors
from tokenmerge.methods.tcvit import TCViT

# ---------------------------------------------------------------- dense references


def dense_attention(q, k, log_size, scale):
    """The full head-averaged attention matrix ``[B, N, N]`` (the thing the code avoids)."""
    logits = q @ k.transpose(-1, -2) * scale
    if log_size is not None:
        logits = logits + log_size[:, None, None, :]
    return logits.softmax(dim=-1).mean(dim=1)


def dense_connectivity(attention, order):
    """Column sums of ``A^order`` divided by N, i.e. ``(A^T)^order 1 / N``."""
    num_tokens = attention.shape[-1]
    return torch.linalg.matrix_power(attention, order).sum(dim=1) / num_tokens


def dense_relevance(attention, order, weight, num_protected):
    dom = attention[:, 0, num_protected:]
    conn = dense_connectivity(attention, order)[:, num_protected:]
    return weight * dom / dom.sum(-1, keepdim=True) + (1 - weight) * conn / conn.sum(-1, keepdim=True)


def random_qk(batch=2, heads=3, tokens=11, dim=8, seed=0, sized=False, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, tokens, dim, generator=gen, dtype=dtype)
    k = torch.randn(batch, heads, tokens, dim, generator=gen, dtype=dtype)
    log_size = None
    if sized:
        log_size = torch.randint(1, 5, (batch, tokens), generator=gen).to(dtype).log()
    return q, k, log_size, dim ** -0.5


# ---------------------------------------------------------------- relevance scores


@pytest.mark.parametrize("sized", [False, True])
def test_dominance_is_the_dense_class_row(sized):
    q, k, log_size, scale = random_qk(sized=sized)
    expected = dense_attention(q, k, log_size, scale)[:, 0]
    torch.testing.assert_close(dominance(q, k, log_size, scale), expected)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("sized", [False, True])
def test_connectivity_matches_dense_matrix_power(order, sized):
    q, k, log_size, scale = random_qk(sized=sized, seed=order)
    expected = dense_connectivity(dense_attention(q, k, log_size, scale), order)
    got = connectivity(q, k, log_size, scale, order=order, chunk_size=4)
    torch.testing.assert_close(got, expected)
    # A^T preserves mass, so every order is a distribution over the tokens.
    torch.testing.assert_close(got.sum(-1), torch.ones(2, dtype=got.dtype))


def test_higher_orders_differ_from_first_order():
    q, k, log_size, scale = random_qk(seed=3)
    first = connectivity(q, k, log_size, scale, order=1)
    assert not torch.allclose(first, connectivity(q, k, log_size, scale, order=2))


def test_transpose_matvec_matches_dense_with_weights():
    q, k, log_size, scale = random_qk(sized=True, seed=5)
    u = torch.rand(2, 11, dtype=torch.float64)
    expected = (dense_attention(q, k, log_size, scale).transpose(1, 2) @ u.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(attention_transpose_matvec(q, k, log_size, scale, u, chunk_size=3), expected)


@pytest.mark.parametrize("order", [1, 3])
@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("num_protected", [1, 2])
def test_relevance_matches_dense(order, weight, num_protected):
    q, k, log_size, scale = random_qk(sized=True, seed=7)
    expected = dense_relevance(dense_attention(q, k, log_size, scale), order, weight, num_protected)
    got = token_relevance(q, k, log_size, scale, num_protected, order, weight, chunk_size=4)
    assert got.shape == (2, 11 - num_protected)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got.sum(-1), torch.ones(2, dtype=got.dtype))


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 64])
def test_chunked_scores_equal_unchunked(chunk_size):
    q, k, log_size, scale = random_qk(sized=True, seed=11, dtype=torch.float32)
    whole = q.shape[2]
    torch.testing.assert_close(
        connectivity(q, k, log_size, scale, 2, chunk_size),
        connectivity(q, k, log_size, scale, 2, whole),
    )
    queries = torch.tensor([[1, 4, 6, 9], [2, 3, 8, 10]])
    reps = torch.tensor([[0, 5, 7], [1, 4, 9]])
    assert torch.equal(
        most_connected_representative(q, k, log_size, scale, queries, reps, chunk_size),
        most_connected_representative(q, k, log_size, scale, queries, reps, whole),
    )


def test_most_connected_representative_is_dense_argmax():
    q, k, log_size, scale = random_qk(sized=True, seed=13)
    attention = dense_attention(q, k, log_size, scale)
    queries = torch.tensor([[1, 4, 6, 9], [2, 3, 8, 10]])
    reps = torch.tensor([[0, 5, 7], [1, 4, 9]])
    got = most_connected_representative(q, k, log_size, scale, queries, reps, chunk_size=3)
    for b in range(2):
        expected = attention[b][queries[b]][:, reps[b]].argmax(-1)
        assert torch.equal(got[b], expected)


# ---------------------------------------------------------------- select and fuse


def test_select_representatives_keeps_top_in_original_order():
    relevance = torch.tensor([[0.1, 0.5, 0.2, 0.9, 0.3], [0.9, 0.1, 0.8, 0.2, 0.7]])
    keep, rest = select_representatives(relevance, 3)
    assert keep.tolist() == [[1, 3, 4], [0, 2, 4]]
    assert rest.tolist() == [[0, 2], [1, 3]]


@pytest.mark.parametrize("num_protected", [1, 2])
@pytest.mark.parametrize("fuse", [True, False])
def test_select_and_fuse_plan(num_protected, fuse):
    q, k, log_size, scale = random_qk(tokens=13, seed=17)
    num_tokens, r = 13, 5
    relevance = token_relevance(q, k, log_size, scale, num_protected, 2, 0.5)
    plan = select_and_fuse(relevance, q, k, log_size, scale, r, num_protected, fuse=fuse, chunk_size=2)
    assert plan.num_out == num_tokens - r
    assign = plan.assign
    # Protected tokens stay first, in order, and nothing else lands in their slots.
    assert assign[:, :num_protected].tolist() == [list(range(num_protected))] * 2
    assert (assign[:, num_protected:] >= num_protected).all()
    attention = dense_attention(q, k, log_size, scale)
    for b in range(2):
        top = relevance[b].topk(num_tokens - num_protected - r).indices.sort().values + num_protected
        # Representatives take the next slots in their original order.
        assert assign[b, top].tolist() == list(range(num_protected, plan.num_out))
        others = [i for i in range(num_protected, num_tokens) if i not in top.tolist()]
        if fuse:
            expected = attention[b][others][:, top].argmax(-1) + num_protected
            assert assign[b, others].tolist() == expected.tolist()
        else:
            assert assign[b, others].tolist() == [plan.num_out] * r


def test_select_and_fuse_rejects_removing_every_candidate():
    q, k, log_size, scale = random_qk(tokens=6)
    relevance = token_relevance(q, k, log_size, scale, 1, 1, 0.5)
    with pytest.raises(ValueError, match="at least one"):
        select_and_fuse(relevance, q, k, log_size, scale, 5, 1)


def test_tcvit_plan_accepts_float32_attention_tensors():
    q, k, log_size, scale = random_qk(tokens=9, dtype=torch.float32, sized=True)
    plan = TCViT(order=2).plan(torch.zeros(2, 9, 4), AttentionTensors(q, k, log_size, scale), 3, 1, 0)
    x, size = merge_tokens(torch.randn(2, 9, 4), log_size.exp().unsqueeze(-1), plan)
    assert x.shape == (2, 6, 4)
    torch.testing.assert_close(size.sum(1).squeeze(-1), log_size.exp().sum(1))


# ---------------------------------------------------------------- patched timm model


def small_vit(class_token=True, global_pool="token", seed=0):
    torch.manual_seed(seed)
    model = VisionTransformer(
        img_size=64, patch_size=8, embed_dim=48, depth=4, num_heads=3, num_classes=10,
        class_token=class_token, global_pool=global_pool,
    )
    # Random init makes attention nearly uniform; sharper attention gives the scores
    # something to rank.
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.normal_(0, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


TCVIT_VARIANTS = [
    dict(),
    dict(order=3, dominance_weight=0.25),
    dict(dominance_weight=0.0, chunk_size=7),
    dict(dominance_weight=1.0, fuse=False),
]


@pytest.mark.parametrize("options", TCVIT_VARIANTS)
def test_r0_reproduces_unmodified_model_exactly(options, images):
    model = small_vit()
    with torch.no_grad():
        expected = model(images)
        tokenmerge.patch(model, method="tcvit", r=0, **options)
        assert torch.equal(model(images), expected)
        tokenmerge.patch(model, method="tcvit", keep_ratio=1.0, **options)
        assert torch.equal(model(images), expected)
        tokenmerge.patch(model, method="tcvit", r=8, **options)
        assert not torch.allclose(model(images), expected)


@pytest.mark.parametrize("options", TCVIT_VARIANTS)
def test_sizes_and_sources_account_for_every_patch(options, images):
    model = small_vit()
    num_patches = model.patch_embed.num_patches
    tokenmerge.patch(model, method="tcvit", r=10, trace_source=True, **options)
    with torch.no_grad():
        state = model.forward_tokens(images)
    num_out = state.x.shape[1]
    assert num_out == 1 + num_patches - 4 * 10
    # Protected: the class token is still token 0 and covers no patch.
    assert (state.source != 0).all()
    if options.get("fuse", True):
        assert state.size[:, 0].eq(1).all()
        assert state.size.sum(dim=(1, 2)).tolist() == [1 + num_patches] * 2
        # Every patch still lands in a token and the token's size counts it.
        counts = torch.stack([torch.bincount(s, minlength=num_out) for s in state.source])
        assert torch.equal(counts[:, 1:], state.size[:, 1:, 0].long())
    else:
        assert state.size is None
        kept = state.source < num_out
        assert kept.sum(1).tolist() == [num_out - 1] * 2


@pytest.mark.parametrize(
    "schedule, expected",
    [
        (9, [65, 56, 47, 38, 29]),
        ((6, -1.0), [65, 53, 45, 41, 41]),  # 12, 8, 4, 0
        ([30, 0, 20], [65, 35, 35, 15, 15]),
        (tokenmerge.KeepRatio(0.5), [65, 33, 17, 9, 5]),
        (100, [65, 2, 2, 2, 2]),  # clamped: one representative always stays
    ],
)
def test_token_counts_follow_schedule(schedule, expected, images):
    model = small_vit()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokenmerge.patch(model, method="tcvit", r=schedule, order=2)
    clamped = [w for w in caught if issubclass(w.category, ScheduleClampedWarning)]
    assert bool(clamped) == (schedule == 100)
    assert model.tokens_per_block() == expected
    seen = []
    hooks = [b.mlp.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1])) for b in model.blocks]
    with torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    assert seen == expected[1:]


def test_max_reduction_keeps_one_representative():
    method = TCViT()
    assert method.max_reduction(197, 1) == 195
    assert method.max_reduction(2, 1) == 0
    assert method.max_reduction(5, 0) == 4


def test_connectivity_only_runs_without_class_token(images):
    model = small_vit(class_token=False, global_pool="avg")
    tokenmerge.patch(model, method="tcvit", r=10, dominance_weight=0.0)
    with torch.no_grad():
        out = model(images)
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_dominance_without_class_token_is_a_clear_error(images):
    model = small_vit(class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="dominance_weight=0"):
        tokenmerge.patch(model, method="tcvit", r=10, dominance_weight=0.5)
    assert not tokenmerge.is_patched(model)
    # the policy used on its own (no patch) checks at plan time too
    reducer = tokenmerge.create_reducer("tcvit", dominance_weight=0.5)
    q = k = torch.randn(1, 2, 8, 4)
    attn = tokenmerge.methods.AttentionTensors(q, k, None, 0.5)
    with pytest.raises(ValueError, match="dominance_weight=0"):
        reducer.plan(torch.randn(1, 8, 4), attn, 2, 0, 0)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(order=0), "order"),
        (dict(order=-2), "order"),
        (dict(order=1.5), "order"),
        (dict(order=True), "order"),
        (dict(dominance_weight=-0.1), r"\[0, 1\]"),
        (dict(dominance_weight=1.01), r"\[0, 1\]"),
        (dict(dominance_weight=math.nan), r"\[0, 1\]"),
        (dict(dominance_weight="0.5"), r"\[0, 1\]"),
        (dict(fuse="yes"), "fuse"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(chunk_size=2.0), "chunk_size"),
    ],
)
def test_bad_options_are_clear_errors(options, match):
    with pytest.raises(ValueError, match=match):
        TCViT(**options)
    with pytest.raises(ValueError, match=match):
        tokenmerge.patch(small_vit(), method="tcvit", r=4, **options)


def test_unknown_option_names_the_method():
    with pytest.raises(TypeError, match="tcvit"):
        tokenmerge.patch(small_vit(), method="tcvit", r=4, weight=0.5)
