"""PiToMe's energy matching and MCTF's multi-criteria weights against direct loop references."""

import pytest
import torch
import torch.nn.functional as F

from tokenmerge.core.energy import energy_matching, energy_score, plan_from_pairs
from tokenmerge.core.merge import merge_tokens
from tokenmerge.core.matching import bidirectional_plan_from_scores
from tokenmerge.core.multi_criteria import multi_criteria_matching, multi_criteria_scores


def cosine(u, v):
    return float(torch.dot(u, v) / (u.norm() * v.norm()))


def reference_pitome(x, metric, r, protected, margin, alpha):
    """One image, token by token: energies, the 2r most energetic tokens alternating into A/B,
    each A token averaged into its most similar B token; kept tokens in original order."""
    n = len(x)
    cand = list(range(protected, n))
    energy = {}
    for i in cand:
        values = [cosine(metric[i], metric[j]) - margin for j in cand]
        energy[i] = sum(v if v > 0 else alpha * (torch.tensor(v).exp().item() - 1) for v in values) / len(cand)
    order = sorted(cand, key=lambda i: (-energy[i], i))[: 2 * r]
    a, b = order[0::2], order[1::2]
    groups = {i: [i] for i in range(n) if i not in a}
    for i in a:
        j = max(b, key=lambda t: (cosine(metric[i], metric[t]), -b.index(t)))
        groups[j].append(i)
    return torch.stack([x[groups[k]].mean(0) for k in sorted(groups)])


@pytest.mark.parametrize("protected,r", [(1, 3), (0, 4), (2, 1), (1, 9)])
def test_energy_matching_matches_reference(protected, r):
    torch.manual_seed(protected * 10 + r)
    x = torch.randn(2, 21, 5, dtype=torch.float64)
    metric = torch.randn(2, 21, 4, dtype=torch.float64)
    plan = energy_matching(metric, r, protected, margin=0.2, alpha=0.7)
    merged, size = merge_tokens(x, None, plan)
    assert plan.num_out == 21 - r and size.sum(1).flatten().tolist() == [21.0, 21.0]
    for k in range(2):
        torch.testing.assert_close(merged[k], reference_pitome(x[k], metric[k], r, protected, 0.2, 0.7))


def test_energy_score_is_mean_elu_of_shifted_similarity():
    sim = torch.tensor([[[1.0, 0.9, -0.5], [0.9, 1.0, 0.0], [-0.5, 0.0, 1.0]]])
    expected = torch.stack([F.elu(sim[0, i] - 0.5, alpha=2.0).mean() for i in range(3)])
    torch.testing.assert_close(energy_score(sim, 0.5, 2.0)[0], expected)
    # A token in a tight cluster has more energy than an isolated one.
    assert energy_score(sim)[0, 0] > energy_score(sim)[0, 2]


def test_energy_matching_protects_isolated_tokens():
    # Tokens 1..8 form a tight cluster, token 9 points elsewhere: it must never merge.
    metric = torch.tensor([1.0, 0.0]).repeat(1, 10, 1) + 0.01 * torch.randn(1, 10, 2)
    metric[0, 9] = torch.tensor([-1.0, 0.3])
    plan = energy_matching(metric, 4, num_protected=1)
    assert plan.assign[0, 9] not in plan.assign[0, :9]


def test_plan_from_pairs_keeps_order_and_merges_pairs():
    plan = plan_from_pairs(torch.tensor([[4, 1]]), torch.tensor([[2, 3]]), 6)
    assert plan.num_out == 4
    assert plan.assign.tolist() == [[0, 2, 1, 2, 1, 3]]


def reference_mctf_scores(metric, received, size, protected, ts, ti, tz):
    n = len(metric)
    cand = range(protected, n)
    inv_recv = {i: 1 / received[i] for i in cand}
    inv_size = {i: 1 / size[i] for i in cand}
    max_recv, max_size = max(inv_recv.values()), max(inv_size.values())
    a0 = protected + protected % 2
    a = list(range(a0, n, 2))
    b = list(range(protected + 1 - protected % 2, n, 2))
    out = torch.empty(len(a), len(b), dtype=torch.float64)
    for p, i in enumerate(a):
        for q, j in enumerate(b):
            sim = ((cosine(metric[i], metric[j]) + 1) / 2) ** (1 / ts)
            info = (inv_recv[i] / max_recv * inv_recv[j] / max_recv) ** (1 / ti)
            small = (inv_size[i] / max_size * inv_size[j] / max_size) ** (1 / tz)
            out[p, q] = sim * info * small
    return out


@pytest.mark.parametrize("protected", [0, 1, 2])
def test_multi_criteria_scores_match_reference(protected):
    torch.manual_seed(protected)
    metric = torch.randn(2, 13, 6, dtype=torch.float64)
    received = torch.rand(2, 13, dtype=torch.float64) + 0.05
    size = torch.randint(1, 5, (2, 13, 1)).double()
    scores = multi_criteria_scores(metric, received, size, protected, 0.5, 3.0, 7.0)
    for k in range(2):
        expected = reference_mctf_scores(metric[k], received[k].tolist(), size[k, :, 0].tolist(), protected, 0.5, 3.0, 7.0)
        torch.testing.assert_close(scores[k], expected)


def test_multi_criteria_prefers_uninformative_and_small_tokens():
    # Two A tokens equally similar to their B partner; the one that receives less attention
    # merges first, and with equal attention the smaller one does.
    metric = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]])
    received = torch.tensor([[1.0, 1.0, 0.5, 1.0, 1.0]])
    plan = multi_criteria_matching(metric, received, None, 1, num_protected=1)
    assert plan.assign[0, 2] == plan.assign[0, 1] or plan.assign[0, 2] == plan.assign[0, 3]
    received = torch.ones(1, 5)
    size = torch.tensor([[[1.0], [1.0], [1.0], [1.0], [4.0]]])
    plan = multi_criteria_matching(metric, received, size, 1, num_protected=1)
    assert plan.assign[0, 2] in (plan.assign[0, 1], plan.assign[0, 3])  # token 2 (size 1), not 4


def reference_bidirectional(scores, n, r, protected):
    """Slot of every token, by plain loops: r // 2 of A into B, the rest of r from B into kept A."""
    a = list(range(protected + protected % 2, n, 2))
    b = list(range(protected + 1 - protected % 2, n, 2))
    r1, r2 = r // 2, r - r // 2
    best_b = {p: max(range(len(b)), key=lambda q: scores[p, q]) for p in range(len(a))}
    merged_a = sorted(range(len(a)), key=lambda p: -scores[p, best_b[p]])[:r1]
    kept_a = [p for p in range(len(a)) if p not in merged_a]
    best_a = {q: max(kept_a, key=lambda p: scores[p, q]) for q in range(len(b))}
    merged_b = sorted(range(len(b)), key=lambda q: -scores[best_a[q], q])[:r2]
    kept_b = [q for q in range(len(b)) if q not in merged_b]
    slot = {i: i for i in range(protected)}
    slot.update({a[p]: protected + k for k, p in enumerate(kept_a)})
    slot.update({b[q]: protected + len(kept_a) + k for k, q in enumerate(kept_b)})
    slot.update({b[q]: slot[a[best_a[q]]] for q in merged_b})
    slot.update({a[p]: slot[b[best_b[p]]] for p in merged_a})
    return [slot[i] for i in range(n)]


@pytest.mark.parametrize("protected,n,r", [(0, 12, 1), (1, 13, 5), (1, 17, 8), (2, 14, 6)])
def test_bidirectional_plan_matches_reference(protected, n, r):
    torch.manual_seed(n + r)
    a0, b0 = protected + protected % 2, protected + 1 - protected % 2
    num_a, num_b = len(range(a0, n, 2)), len(range(b0, n, 2))
    scores = torch.rand(3, num_a, num_b, dtype=torch.float64)
    plan = bidirectional_plan_from_scores(scores, r, protected)
    assert plan.num_out == n - r and plan.weight is None
    for k in range(3):
        assert plan.assign[k].tolist() == reference_bidirectional(scores[k], n, r, protected)
    # every output slot receives a token, protected tokens stay first
    for k in range(3):
        assert sorted(set(plan.assign[k].tolist())) == list(range(n - r))


def test_attention_fusion_weights_members_by_size_times_attention():
    torch.manual_seed(0)
    x = torch.randn(2, 9, 4, dtype=torch.float64)
    size = torch.randint(1, 4, (2, 9, 1)).double()
    received = torch.rand(2, 9, dtype=torch.float64) + 0.1
    metric = torch.randn(2, 9, 5, dtype=torch.float64)
    plain = multi_criteria_matching(metric, received, size, 3, num_protected=1)
    fused = multi_criteria_matching(metric, received, size, 3, num_protected=1, fusion="attention")
    assert torch.equal(plain.assign, fused.assign)
    out, out_size = merge_tokens(x, size, fused)
    weight = received[..., None] * size
    for k in range(2):
        for slot in range(fused.num_out):
            members = (fused.assign[k] == slot).nonzero()[:, 0]
            w = weight[k, members]
            torch.testing.assert_close(out[k, slot], (w * x[k, members]).sum(0) / w.sum())
            assert out_size[k, slot, 0] == size[k, members].sum()
    # weight == size is the size-weighted merge
    same, same_size = merge_tokens(x, size, plain._replace(weight=size))
    reference, reference_size = merge_tokens(x, size, plain)
    torch.testing.assert_close(same, reference)
    assert torch.equal(same_size, reference_size)
    with pytest.raises(ValueError, match="fusion must be one of"):
        multi_criteria_matching(metric, received, size, 3, num_protected=1, fusion="max")


@pytest.mark.parametrize("fn", ["pitome", "mctf"])
def test_bad_r_is_refused(fn):
    metric = torch.randn(1, 9, 4)
    with pytest.raises(ValueError, match="can remove 0..4"):
        if fn == "pitome":
            energy_matching(metric, 5, 1)
        else:
            multi_criteria_matching(metric, torch.ones(1, 9), None, 5, 1)
