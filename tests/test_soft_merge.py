"""Soft grouping / soft merging (DTEM's relaxation): invariants, gradients, hard limit."""

from __future__ import annotations

import pytest
import torch

from tokenmerge.core.matching import bipartite_soft_matching
from tokenmerge.core.merge import merge_tokens
from tokenmerge.core.soft_merge import DEFAULT_MIN_SIZE, soft_bipartite_step, soft_grouping, soft_merge


def _full_edge_reference(scores, r, tau):
    """The paper's form, literally: r softmaxes over every A x B edge, masking what was taken
    (plus the re-draw of what an exhausted source could not give)."""
    B, Na, Nb = scores.shape
    remaining = torch.ones(B, Na, dtype=scores.dtype)
    P = torch.zeros_like(scores)
    for _ in range(r):
        budget = torch.ones(B, 1, dtype=scores.dtype)
        for _ in range(3):
            logits = scores / tau + torch.where(
                remaining > 0, remaining.clamp_min(1e-30).log(),
                torch.tensor(-torch.inf, dtype=scores.dtype))[..., None]
            q = budget[..., None] * logits.reshape(B, -1).softmax(-1).reshape(B, Na, Nb)
            scale = torch.minimum(torch.ones_like(remaining), remaining / q.sum(-1).clamp_min(1e-300))
            moved = q * scale[..., None]
            P += moved
            remaining = remaining - moved.sum(-1)
            budget = budget - moved.sum((1, 2))[:, None]
    return P


def test_soft_grouping_equals_the_full_edge_softmax():
    scores = torch.randn(3, 7, 6, dtype=torch.float64).tanh()
    for tau in (1.0, 0.3, 0.05):
        ours = soft_grouping(scores, 4, tau)
        assert torch.allclose(ours, _full_edge_reference(scores, 4, tau), atol=1e-10)


def test_soft_grouping_rows_at_most_one_and_total_r():
    scores = torch.randn(4, 10, 9).tanh()
    for tau in (2.0, 0.1, 0.01):
        P = soft_grouping(scores, 6, tau)
        assert (P >= 0).all()
        assert (P.sum(-1) <= 1 + 1e-5).all()
        assert torch.allclose(P.sum((1, 2)), torch.full((4,), 6.0), atol=1e-4)
    # No source runs dry when all edges are alike: exactly r.
    P = soft_grouping(torch.zeros(2, 10, 9), 6, 0.1)
    assert torch.allclose(P.sum((1, 2)), torch.full((2,), 6.0), atol=1e-5)


def test_soft_grouping_can_take_every_source():
    scores = torch.randn(2, 5, 5).tanh().requires_grad_()
    P = soft_grouping(scores, 5, 0.1)
    P.sum().backward()
    assert torch.isfinite(P).all() and torch.isfinite(scores.grad).all()
    assert torch.allclose(P.sum(-1), torch.ones(2, 5), atol=1e-5)


def test_soft_grouping_a_source_never_gives_more_than_it_has():
    # One source far more similar than the rest: at a high temperature it keeps being
    # drawn; its row must still stop at 1.
    scores = torch.full((1, 4, 3), -1.0)
    scores[0, 0] = 1.0
    P = soft_grouping(scores, 3, 0.05)
    assert P[0, 0].sum() <= 1 + 1e-6
    assert torch.allclose(P.sum(), torch.tensor(3.0), atol=1e-5)


def test_soft_merge_conserves_patches_and_mass_weighted_features():
    xa, xb = torch.randn(2, 5, 3), torch.randn(2, 4, 3)
    ma, mb = torch.rand(2, 5, 1) + 0.5, torch.rand(2, 4, 1) + 0.5
    P = soft_grouping(torch.randn(2, 5, 4), 3, 0.3)
    xb2, mb2, ma2 = soft_merge(xa, ma, xb, mb, P)
    assert torch.allclose(ma.sum((1, 2)) + mb.sum((1, 2)), ma2.sum((1, 2)) + mb2.sum((1, 2)), atol=1e-5)
    before = (ma * xa).sum(1) + (mb * xb).sum(1)
    after = (ma2 * xa).sum(1) + (mb2 * xb2).sum(1)
    assert torch.allclose(before, after, atol=1e-5)


@pytest.mark.parametrize("num_protected", [1, 2])
def test_small_tau_reproduces_hard_tome_merge(num_protected):
    B, N, C = 3, 23, 8
    x, metric = torch.randn(B, N, C), torch.randn(B, N, 6)
    size = torch.randint(1, 4, (B, N, 1)).float()
    r = 5
    hard_x, hard_size = merge_tokens(x, size, bipartite_soft_matching(metric, r, num_protected))
    soft_x, soft_size, live = soft_bipartite_step(x, size, metric, r, 1e-5, num_protected)
    assert live == N - r
    assert torch.allclose(soft_x[:, :live], hard_x, atol=1e-5)
    assert torch.allclose(soft_size[:, :live], hard_size, atol=1e-5)
    assert torch.allclose(soft_size[:, live:], torch.full((B, r, 1), DEFAULT_MIN_SIZE))


def test_soft_merge_approaches_hard_merge_as_tau_shrinks():
    B, N = 4, 31
    x, metric = torch.randn(B, N, 8, dtype=torch.float64), torch.randn(B, N, 6, dtype=torch.float64)
    hard_x, _ = merge_tokens(x, None, bipartite_soft_matching(metric, 6, 1))
    errors = []
    for tau in (0.1, 0.01, 1e-3, 1e-5):
        soft_x, _, live = soft_bipartite_step(x, None, metric, 6, tau, 1)
        errors.append((soft_x[:, :live] - hard_x).abs().max().item())
    assert errors[0] > errors[1] > errors[2] > errors[3]
    assert errors[-1] < 1e-8


def test_second_block_groups_only_live_tokens():
    x, metric = torch.randn(2, 21, 4), torch.randn(2, 21, 5)
    x1, s1, live = soft_bipartite_step(x, None, metric, 4, 1e-5, 1)
    x2, s2, live2 = soft_bipartite_step(x1, s1, metric, 4, 1e-5, 1, live)
    assert live2 == 21 - 8
    # The tokens merged away in block 1 are untouched by block 2 (still at the tail).
    assert torch.equal(x2[:, -4:], x1[:, -4:]) and torch.equal(s2[:, -4:], s1[:, -4:])
    # The hard model's second block on the hard tokens gives the same live prefix.
    hx, hs = merge_tokens(x, None, bipartite_soft_matching(metric, 4, 1))
    hx, hs = merge_tokens(hx, hs, bipartite_soft_matching(metric[:, :live], 4, 1))
    assert torch.allclose(x2[:, :live2], hx, atol=1e-5) and torch.allclose(s2[:, :live2], hs, atol=1e-5)


def test_gradcheck_soft_grouping_and_merge_float64():
    scores = torch.randn(1, 4, 3, dtype=torch.float64).tanh().requires_grad_()
    assert torch.autograd.gradcheck(lambda s: soft_grouping(s, 2, 0.5), (scores,))
    xa = torch.randn(1, 4, 2, dtype=torch.float64, requires_grad=True)
    xb = torch.randn(1, 3, 2, dtype=torch.float64, requires_grad=True)
    ma = (torch.rand(1, 4, 1, dtype=torch.float64) + 0.5).requires_grad_()
    mb = (torch.rand(1, 3, 1, dtype=torch.float64) + 0.5).requires_grad_()
    P = soft_grouping(torch.randn(1, 4, 3, dtype=torch.float64), 2, 0.5).requires_grad_()
    assert torch.autograd.gradcheck(soft_merge, (xa, ma, xb, mb, P))


def test_gradcheck_whole_step_wrt_metric_and_tokens():
    x = torch.randn(1, 9, 3, dtype=torch.float64, requires_grad=True)
    metric = torch.randn(1, 9, 4, dtype=torch.float64, requires_grad=True)

    def step(x, metric):
        out, size, _ = soft_bipartite_step(x, None, metric, 2, 0.5, 1)
        return out, size

    assert torch.autograd.gradcheck(step, (x, metric))


def test_bad_input_is_rejected():
    scores = torch.randn(1, 4, 4)
    for tau in (0, -0.1):
        with pytest.raises(ValueError, match="tau"):
            soft_grouping(scores, 2, tau)
    with pytest.raises(ValueError, match="r=5"):
        soft_grouping(scores, 5, 0.1)
    with pytest.raises(ValueError, match="live tokens"):
        soft_bipartite_step(torch.randn(1, 9, 3), None, torch.randn(1, 9, 3), 5, 0.1, 1)
