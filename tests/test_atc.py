"""ATC's agglomerative clustering against a from-scratch loop reference, and ATC as a method."""

import itertools

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import tokenmerge
from tokenmerge.core.clustering import agglomerative_clustering, agglomerative_plan
from tokenmerge.core.merge import merge_tokens


def cosine(u, v):
    return float(torch.dot(u, v) / (u.norm() * v.norm()))


def reference_clusters(metric, joins, linkage, size=None, tau_size=None):
    """One image: clusters as member lists, each join recomputing the linkage from the members'
    pairwise similarities (no Lance-Williams update); with ``tau_size``, the similarity of
    tokens i and j is ``(cos + 1) / 2 * (s_i * s_j) ** (1 / tau_size)``, ``s = (1 / size) / max(1 / size)``."""
    n = len(metric)
    sim = [[cosine(metric[i], metric[j]) for j in range(n)] for i in range(n)]
    if tau_size is not None:
        inverse = [1 / float(v) for v in size]
        shrink = [(v / max(inverse)) ** (1 / tau_size) for v in inverse]
        sim = [[(sim[i][j] + 1) / 2 * shrink[i] * shrink[j] for j in range(n)] for i in range(n)]
    combine = {"average": lambda v: sum(v) / len(v), "complete": min, "single": max}[linkage]
    clusters = [[i] for i in range(len(metric))]
    for _ in range(joins):
        best = max(itertools.combinations(range(len(clusters)), 2),
                   key=lambda p: combine([sim[a][b] for a in clusters[p[0]] for b in clusters[p[1]]]))
        first, second = best
        clusters[first] = sorted(clusters[first] + clusters[second])
        del clusters[second]
    return sorted(clusters)


@pytest.mark.parametrize("linkage", ["average", "complete", "single"])
@pytest.mark.parametrize("protected,r", [(1, 3), (0, 7), (2, 12), (1, 13)])
def test_agglomerative_plan_matches_reference(linkage, protected, r):
    torch.manual_seed(r * 3 + protected)
    n = 16
    x = torch.randn(2, n, 5, dtype=torch.float64)
    metric = torch.randn(2, n, 4, dtype=torch.float64)
    plan = agglomerative_plan(metric, r, protected, linkage)
    merged, size = merge_tokens(x, None, plan)
    assert plan.num_out == n - r and size.sum(1).flatten().tolist() == [float(n)] * 2
    for k in range(2):
        groups = [[i] for i in range(protected)]
        groups += [[protected + i for i in c] for c in reference_clusters(metric[k, protected:], r, linkage)]
        expected = torch.stack([x[k, g].mean(0) for g in groups])  # clusters in order of first member
        torch.testing.assert_close(merged[k], expected)
        assert size[k, :, 0].tolist() == [float(len(g)) for g in groups]


@pytest.mark.parametrize("linkage", ["complete", "average"])
def test_size_criterion_matches_reference_and_is_neutral_at_equal_sizes(linkage):
    torch.manual_seed(5)
    n, protected, r = 15, 1, 6
    x = torch.randn(2, n, 5, dtype=torch.float64)
    metric = torch.randn(2, n, 4, dtype=torch.float64)
    size = torch.randint(1, 6, (2, n, 1)).double()
    plan = agglomerative_plan(metric, r, protected, linkage, size=size, tau_size=2.0)
    merged, merged_size = merge_tokens(x, size, plan)
    for k in range(2):
        groups = [[0]] + [[protected + i for i in c] for c in
                          reference_clusters(metric[k, protected:], r, linkage, size[k, protected:, 0], 2.0)]
        expected = torch.stack([(x[k, g] * size[k, g]).sum(0) / size[k, g].sum() for g in groups])
        torch.testing.assert_close(merged[k], expected)
        assert merged_size[k, :, 0].tolist() == [float(size[k, g].sum()) for g in groups]
    # Equal sizes (the first block): the criterion is a constant factor, the joins are ToMe-metric joins.
    equal = agglomerative_plan(metric, r, protected, linkage, size=torch.ones(2, n, 1, dtype=torch.float64), tau_size=2.0)
    assert torch.equal(equal.assign, agglomerative_plan(metric, r, protected, linkage).assign)


def test_clustering_joins_same_side_pairs_bipartite_matching_cannot():
    # Tokens 0 and 2 are identical and both even: set A in bipartite matching, one cluster here.
    metric = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.2]]])
    labels = agglomerative_clustering(metric @ metric.transpose(1, 2), 1)
    assert labels.tolist() == [[0, 1, 0, 3]]


def loop_labels(similarity, joins, linkage, threshold=None):
    """One image, the definition spelled out: each join takes the first (row-major) most similar
    pair of live clusters, keeps the lower label, and updates the linkage row by row (with a
    ``threshold``, it stops at the first pair below it)."""
    sim = [[float(v) for v in row] for row in similarity]
    m = len(sim)
    members, labels = {i: [i] for i in range(m)}, list(range(m))
    combine = {"complete": min, "single": max, "average": None}[linkage]
    for _ in range(joins):
        best = max((sim[i][j], -i, -j) for i in members for j in members if i != j)
        if threshold is not None and best[0] < threshold:
            break
        keep, gone = -best[1], -best[2]
        for k in members:
            if k in (keep, gone):
                continue
            if combine is None:
                a, b = len(members[keep]), len(members[gone])
                value = (a * sim[keep][k] + b * sim[gone][k]) / (a + b)
            else:
                value = combine(sim[keep][k], sim[gone][k])
            sim[keep][k] = sim[k][keep] = value
        members[keep] += members.pop(gone)
        labels = [keep if label == gone else label for label in labels]
    return labels


@pytest.mark.parametrize("linkage", ["complete", "average", "single"])
def test_clustering_breaks_ties_by_the_first_pair_and_labels_by_the_smallest_member(linkage):
    # Repeated tokens (flat background patches) give exact ties; rounding gives many more.
    torch.manual_seed(7)
    base = torch.randn(2, 6, 3).round()
    metric = torch.cat([base, base, base[:, :3]], dim=1)
    similarity = metric @ metric.transpose(1, 2)
    labels = agglomerative_clustering(similarity, 11, linkage)
    for k in range(2):
        assert labels[k].tolist() == loop_labels(similarity[k], 11, linkage)


def test_clustering_reads_an_almost_symmetric_matrix_as_symmetric():
    # A matmul need not be symmetric to the last bit; the larger of [i, j] and [j, i] counts.
    torch.manual_seed(8)
    similarity = torch.rand(3, 10, 10, dtype=torch.float64)
    symmetric = torch.maximum(similarity, similarity.transpose(1, 2))
    labels = agglomerative_clustering(similarity, 6)
    assert torch.equal(labels, agglomerative_clustering(symmetric, 6))
    for k in range(3):
        assert labels[k].tolist() == loop_labels(symmetric[k], 6, "complete")
        assert all(labels[k, i] <= i and labels[k, labels[k, i]] == labels[k, i] for i in range(10))


def test_per_image_complete_linkage_in_rounds_makes_the_greedy_joins():
    # One image runs in rounds of mutually most similar pairs, a large batch one join at a
    # time: both must give the definition's clusters, capped or stopped at the threshold.
    from tokenmerge.core.clustering import ROUNDS_MAX_ELEMENTS

    torch.manual_seed(9)
    B, M, joins, threshold = 90, 40, 25, 0.45
    assert M * M <= ROUNDS_MAX_ELEMENTS < B * M * M
    metric = torch.randn(B, M, 6, dtype=torch.float64)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    similarity = metric @ metric.transpose(1, 2)
    symmetric = torch.maximum(similarity, similarity.transpose(1, 2))  # as the clustering reads it
    batch = agglomerative_clustering(similarity, joins, threshold=threshold)
    made = [M - len(set(row.tolist())) for row in batch]
    assert min(made) < joins == max(made)  # some images stopped at the threshold, some at the cap
    for k in range(B):
        alone = agglomerative_clustering(similarity[k:k + 1], joins, threshold=threshold)[0]
        assert alone.tolist() == batch[k].tolist()
        if k < 12:
            assert alone.tolist() == loop_labels(symmetric[k], joins, "complete", threshold)


def test_clustering_stops_when_the_valid_items_run_out_of_pairs():
    similarity = torch.rand(2, 6, 6)
    valid = torch.tensor([[True, False, True, True, False, True], [True, True, False, False, False, False]])
    labels = agglomerative_clustering(similarity, 5, valid=valid)
    assert labels.tolist() == [[0, 1, 0, 0, 4, 0], [0, 0, 2, 3, 4, 5]]


def test_r0_is_identity_and_bad_arguments_are_refused():
    metric = torch.randn(2, 9, 4)
    plan = agglomerative_plan(metric, 0, 1)
    assert plan.num_out == 9 and plan.assign.tolist() == [list(range(9))] * 2
    with pytest.raises(ValueError, match="can remove 0..7 of 9 tokens"):
        agglomerative_plan(metric, 8, 1)
    with pytest.raises(ValueError, match="linkage must be one of"):
        agglomerative_plan(metric, 2, 1, linkage="ward")
    with pytest.raises(ValueError, match="tau_size must be > 0"):
        agglomerative_plan(metric, 2, 1, tau_size=0.0)


SMALL = dict(img_size=64, patch_size=8, embed_dim=48, depth=4, num_heads=3, num_classes=7)


@torch.no_grad()
def test_atc_method_r0_exact_more_than_half_per_block_and_unpatch():
    torch.manual_seed(0)
    model, x = VisionTransformer(**SMALL).eval(), torch.randn(2, 3, 64, 64)
    reference = model(x)
    tokenmerge.patch(model, method="atc", r=0)
    assert torch.equal(model(x), reference)
    # 40 of 64 patch tokens in the first block: beyond bipartite matching's half.
    tokenmerge.patch(model, method="atc", r=[40, 10, 5, 2], linkage="complete", trace_source=True)
    state = model.forward_tokens(x)
    assert model.tokens_per_block() == [65, 25, 15, 10, 8] and state.x.shape[1] == 8
    assert state.size[:, 1:].sum(dim=1).flatten().tolist() == [64.0, 64.0]
    assert torch.isfinite(model(x)).all()
    tokenmerge.unpatch(model)
    assert torch.equal(model(x), reference)
    with pytest.raises(ValueError, match="linkage must be one of"):
        tokenmerge.patch(model, method="atc", r=2, linkage="median")
    with pytest.raises(ValueError, match="tau_size must be > 0"):
        tokenmerge.patch(model, method="atc", r=2, tau_size=-1.0)


def test_atc_reduce_scores_with_the_state_sizes():
    from tokenmerge.methods.base import AttentionTensors, TokenState

    torch.manual_seed(2)
    x, k = torch.randn(2, 13, 6), torch.randn(2, 3, 13, 4)
    size = torch.randint(1, 9, (2, 13, 1)).float()
    attn = AttentionTensors(q=torch.randn(2, 3, 13, 4), k=k, log_size=size.log()[..., 0], scale=0.5)
    reducer = tokenmerge.create_reducer("atc", tau_size=0.5)
    out = reducer.reduce(TokenState(x, size), attn, 5, 1, 0)
    sized = agglomerative_plan(k.mean(1), 5, 1, size=size, tau_size=0.5)
    assert not torch.equal(sized.assign, agglomerative_plan(k.mean(1), 5, 1).assign)  # sizes change the joins here
    expected = merge_tokens(x, size, sized)
    torch.testing.assert_close(out.x, expected[0])
    assert torch.equal(out.size, expected[1])
