"""The merge core against a direct, loop-based reading of the ToMe paper, plus properties."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmerge.core.matching import bipartite_max_reduction, bipartite_soft_matching
from tokenmerge.core.merge import (
    MergePlan,
    initial_sources,
    keep_first,
    merge_tokens,
    track_sources,
    unmerge_tokens,
)


def reference_tome(x, size, metric, r, protected):
    """ToMe's bipartite soft matching and weighted merge, one image and one token at a time.

    Protected tokens stay first; of the rest, even absolute indices form set A and odd ones
    set B. Every A token finds its most cosine-similar B token; the r A tokens with the
    highest such similarity are averaged (by size) into their B partner. Output order:
    protected, kept A tokens in their original order, then B. r=0 changes nothing.
    """
    if r == 0:
        return x, size
    out_x, out_s = [], []
    for xb, sb, mb in zip(x, size, metric):
        a_idx = [i for i in range(protected, len(xb)) if i % 2 == 0]
        b_idx = [i for i in range(protected, len(xb)) if i % 2 == 1]
        best = {}
        for i in a_idx:
            sims = [
                float(torch.dot(mb[i], mb[j]) / (mb[i].norm() * mb[j].norm())) for j in b_idx
            ]
            j = max(range(len(b_idx)), key=lambda t: sims[t])
            best[i] = (sims[j], b_idx[j])
        merged = sorted(a_idx, key=lambda i: -best[i][0])[:r]
        dst_sum = {j: (xb[j] * sb[j], sb[j].clone()) for j in b_idx}
        for i in merged:
            j = best[i][1]
            total, weight = dst_sum[j]
            dst_sum[j] = (total + xb[i] * sb[i], weight + sb[i])
        rows, sizes = [], []
        for i in range(protected):
            rows.append(xb[i]), sizes.append(sb[i])
        for i in a_idx:
            if i not in merged:
                rows.append(xb[i]), sizes.append(sb[i])
        for j in b_idx:
            total, weight = dst_sum[j]
            rows.append(total / weight), sizes.append(weight)
        out_x.append(torch.stack(rows)), out_s.append(torch.stack(sizes))
    return torch.stack(out_x), torch.stack(out_s)


@pytest.mark.parametrize("protected", [0, 1, 2, 5])
@pytest.mark.parametrize("r", [0, 1, 4, 7])
def test_matches_reference(protected, r):
    x = torch.randn(3, 17, 6, dtype=torch.float64)
    metric = torch.randn(3, 17, 5, dtype=torch.float64)
    size = torch.randint(1, 4, (3, 17, 1)).double()
    r = min(r, bipartite_max_reduction(17, protected))
    plan = bipartite_soft_matching(metric, r, protected)
    got_x, got_s = merge_tokens(x, size, plan)
    want_x, want_s = reference_tome(x, size, metric, r, protected)
    assert plan.num_out == 17 - r
    torch.testing.assert_close(got_x, want_x)
    torch.testing.assert_close(got_s, want_s)


def test_class_token_split_is_tomes():
    # With one protected token, set A is {2, 4, ...} and set B is {1, 3, ...}, as in ToMe.
    metric = torch.randn(1, 9, 4)
    metric[0, 3] = metric[0, 2] * 2  # token 2 (A) is a perfect match for token 3 (B)
    plan = bipartite_soft_matching(metric, 1, 1)
    assert plan.assign[0, 2] == plan.assign[0, 3]


def test_too_large_r_is_error():
    with pytest.raises(ValueError, match="0..8 of 17 tokens"):
        bipartite_soft_matching(torch.randn(1, 17, 4), 9, 1)


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 3),
    tokens=st.integers(2, 40),
    channels=st.integers(1, 8),
    protected=st.integers(0, 4),
    data=st.data(),
)
def test_merge_properties(batch, tokens, channels, protected, data):
    protected = min(protected, tokens - 1)
    r = data.draw(st.integers(0, bipartite_max_reduction(tokens, protected)))
    x = torch.randn(batch, tokens, channels, dtype=torch.float64)
    plan = bipartite_soft_matching(torch.randn(batch, tokens, 3, dtype=torch.float64), r, protected)
    out, size = merge_tokens(x, None, plan)
    assert out.shape == (batch, tokens - r, channels)
    # sizes: every patch is accounted for exactly once
    assert torch.all(size[:, protected:].sum(dim=1) == tokens - protected)
    assert torch.all(size >= 1)
    # size-weighted sum of tokens is conserved
    torch.testing.assert_close((out * size).sum(dim=1), x.sum(dim=1))
    # protected tokens are untouched and stay first
    assert torch.equal(out[:, :protected], x[:, :protected])
    assert torch.all(size[:, :protected] == 1)
    if r == 0:
        assert torch.equal(out, x)


def test_r0_keeps_every_token_exactly():
    x = torch.randn(2, 11, 4)
    plan = bipartite_soft_matching(torch.randn(2, 11, 4), 0, 1)
    out, size = merge_tokens(x, None, plan)
    assert torch.equal(out, x)
    assert torch.all(size == 1)


def test_sources_compose_and_unmerge():
    torch.manual_seed(1)
    B, N, P = 2, 21, 1
    x = torch.randn(B, N, 3)
    source = initial_sources(B, N, P)
    size = None
    for r in (4, 3, 2):
        plan = bipartite_soft_matching(torch.randn(B, x.shape[1], 5), r, P)
        x, size = merge_tokens(x, size, plan)
        source = track_sources(source, plan)
    # each token's size equals the number of patches whose source points at it
    counts = torch.zeros(B, x.shape[1])
    counts.scatter_add_(1, source, torch.ones_like(source, dtype=counts.dtype))
    torch.testing.assert_close(counts[:, P:], size[:, P:, 0])
    dense = unmerge_tokens(x, source)
    assert dense.shape == (B, N - P, 3)
    assert torch.equal(dense, x.gather(1, source[..., None].expand(-1, -1, 3)))


def test_discard_slot_prunes_and_unmerge_fills():
    x = torch.randn(1, 6, 2)
    plan = keep_first(6, 4, 1)
    out, size = merge_tokens(x, None, plan)
    assert torch.equal(out, x[:, :4])
    source = track_sources(initial_sources(1, 6, 1), plan)
    assert source.tolist() == [[1, 2, 3, 4, 4]]  # patches of tokens 4 and 5: discarded (=4)
    fill = torch.tensor([7.0, 7.0])
    dense = unmerge_tokens(out, source, fill=fill)
    assert torch.equal(dense[0, 3:], fill.expand(2, 2))
    assert torch.equal(dense[0, :3], out[0, 1:4])


def test_merge_plan_is_index_based_not_dense():
    plan = bipartite_soft_matching(torch.randn(4, 197, 64), 13, 1)
    assert isinstance(plan, MergePlan)
    assert plan.assign.shape == (4, 197) and plan.assign.dtype == torch.long
    assert int(plan.assign.max()) == 197 - 13 - 1
    assert math.isclose(len(torch.unique(plan.assign[0])), 197 - 13)


def test_positions_are_size_weighted_centroids_whatever_the_fusion_weight():
    from tokenmerge.core.merge import MergePlan, merge_positions

    pos = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]]])
    size = torch.tensor([[[1.0], [3.0], [2.0]]])
    plan = MergePlan(torch.tensor([[0, 0, 1]]), 2)
    weighted = plan._replace(weight=torch.tensor([[[10.0], [1.0], [1.0]]]))
    expected = torch.tensor([[[1.5, 0.0], [0.0, 4.0]]])  # (0*1 + 2*3) / 4
    torch.testing.assert_close(merge_positions(pos, size, plan), expected)
    torch.testing.assert_close(merge_positions(pos, size, weighted), expected)


def reference_norm_keeping_merge(x, weight, assign, num_out):
    """Each slot: the weighted average's direction at the weighted mean of its members' norms."""
    out = torch.zeros(x.shape[0], num_out, x.shape[-1], dtype=x.dtype)
    for b in range(x.shape[0]):
        for slot in range(num_out):
            members = [i for i in range(x.shape[1]) if assign[b, i] == slot]
            w = torch.stack([weight[b, i, 0] for i in members])
            average = sum(weight[b, i, 0] * x[b, i] for i in members) / w.sum()
            mean_norm = sum(weight[b, i, 0] * x[b, i].norm() for i in members) / w.sum()
            out[b, slot] = average / average.norm() * mean_norm
    return out


@pytest.mark.parametrize("fusion_weight", [False, True])
def test_keep_norm_matches_a_loop_reference(fusion_weight):
    torch.manual_seed(3)
    x = torch.randn(2, 9, 5, dtype=torch.float64)
    size = torch.rand(2, 9, 1, dtype=torch.float64) + 0.5
    assign = torch.tensor([[0, 1, 1, 2, 3, 3, 3, 4, 5], [0, 1, 2, 2, 2, 3, 4, 5, 4]])
    weight = torch.rand(2, 9, 1, dtype=torch.float64) + 0.1 if fusion_weight else None
    plan = MergePlan(assign, 5, weight)  # slot 5 discards
    out, size_out = merge_tokens(x, size, plan, keep_norm=True)
    expected = reference_norm_keeping_merge(x, size if weight is None else weight, assign, 5)
    torch.testing.assert_close(out, expected)
    # the size still counts patches, whatever averages the features
    torch.testing.assert_close(size_out, merge_tokens(x, size, plan)[1])
    # a token merged with nothing is unchanged, and a merged one is longer than the plain average
    torch.testing.assert_close(out[:, 0], x[:, 0])
    assert torch.all(out[0, 3].norm() > merge_tokens(x, size, plan)[0][0, 3].norm())


def test_keep_norm_changes_only_the_length():
    torch.manual_seed(4)
    x = torch.randn(3, 30, 8, dtype=torch.float64)
    plan = bipartite_soft_matching(torch.randn(3, 30, 4, dtype=torch.float64), 12, 1)
    plain, size = merge_tokens(x, None, plan)
    kept, kept_size = merge_tokens(x, None, plan, keep_norm=True)
    assert torch.equal(size, kept_size)
    cosine = torch.nn.functional.cosine_similarity(plain, kept, dim=-1)
    torch.testing.assert_close(cosine, torch.ones_like(cosine))
    # every output's norm is its members' mean norm, so the norms' sum over patches is conserved
    torch.testing.assert_close((kept.norm(dim=-1, keepdim=True) * size).sum(1),
                               x.norm(dim=-1, keepdim=True).sum(1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_merges_accumulate_in_float32(dtype):
    # Two tokens of 1000 with 40 patches each: their weighted sum (80,000) overflows float16,
    # their average does not.
    x = torch.tensor([[[1.0] * 4, [1000.0] * 4, [1000.0] * 4]], dtype=dtype)
    size = torch.tensor([[[1.0], [40.0], [40.0]]], dtype=dtype)
    plan = MergePlan(torch.tensor([[0, 1, 1]]), 2)
    for keep_norm in (False, True):
        out, out_size = merge_tokens(x, size, plan, keep_norm)
        assert out.dtype == dtype and out_size.dtype == dtype
        assert torch.equal(out[0, 1], x[0, 1]) and out_size[0, 1, 0] == 80


def test_attention_fusion_keeps_tokens_that_receive_little_attention_in_float16():
    from tokenmerge.core.multi_criteria import multi_criteria_matching

    torch.manual_seed(0)
    x, metric = torch.randn(1, 9, 4), torch.randn(1, 9, 5)
    received = torch.full((1, 9), 3e-5)  # a few times below float16's smallest normal number
    for dtype in (torch.float32, torch.float16):
        plan = multi_criteria_matching(metric.to(dtype), received.to(dtype), None, 2, num_protected=1,
                                       fusion="attention")
        out, _ = merge_tokens(x.to(dtype), None, plan)
        alone = [slot for slot in range(plan.num_out) if (plan.assign[0] == slot).sum() == 1]
        assert len(alone) >= 4
        for slot in alone:  # a token merged with nothing comes out as it went in
            member = int((plan.assign[0] == slot).nonzero()[0, 0])
            torch.testing.assert_close(out[0, slot].float(), x[0, member], rtol=1e-3, atol=1e-3)
