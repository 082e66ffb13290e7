"""Shared MLPs (``mlp_share``): a block's MLP run once per pair of its most similar tokens."""

import json

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

import tokenmerge
from tokenmerge.core.matching import shared_mlp_pairs
from tokenmerge.evaluation.flops import count_gflops
from tokenmerge.methods.base import TokenState

SMALL = dict(img_size=64, patch_size=8, embed_dim=48, depth=4, num_heads=3, num_classes=7)


def vit(**overrides):
    torch.manual_seed(0)
    return VisionTransformer(**{**SMALL, **overrides}).eval()


def test_shared_mlp_pairs_is_a_fraction_of_the_bipartite_maximum():
    assert shared_mlp_pairs(197, 1, 1.0) == 98
    assert shared_mlp_pairs(197, 1, 0.5) == 49
    assert shared_mlp_pairs(60, 1, 0.75) == 21  # 29 pairable, 21.75 rounded down
    assert shared_mlp_pairs(197, 1, 0.0) == 0
    assert shared_mlp_pairs(2, 1, 1.0) == 0  # one mergeable token pairs with nothing


def loop_shared_mlp(block, x, size, pairs):
    """Reference: pair tokens one by one (ToMe's bipartite rule written as loops), run the
    MLP on each pair's size-weighted mean and on every unpaired token, copy outputs back."""
    out = torch.empty_like(x)
    for b in range(x.shape[0]):
        h = F.normalize(block.norm2(x[b]), dim=-1)
        a_idx, b_idx = list(range(2, x.shape[1], 2)), list(range(1, x.shape[1], 2))  # class token 0 protected
        best = {a: max(b_idx, key=lambda j: (h[a] @ h[j]).item()) for a in a_idx}
        score = {a: (h[a] @ h[best[a]]).item() for a in a_idx}
        paired = sorted(a_idx, key=lambda a: -score[a])[:pairs]
        groups = {j: [j] for j in b_idx}
        for a in paired:
            groups[best[a]].append(a)
        for a in a_idx:
            if a not in paired:
                groups[a] = [a]
        groups[0] = [0]
        for members in groups.values():
            s = size[b, members]
            mean = (x[b, members] * s).sum(0) / s.sum()
            out[b, members] = block.mlp(block.norm2(mean))
    return out


@torch.no_grad()
def test_shared_mlp_matches_a_loop_reference():
    model = tokenmerge.patch(vit(), r=0, mlp_share=0.5)
    block = model.blocks[1].double()
    torch.manual_seed(1)
    x = torch.randn(2, 31, 48, dtype=torch.float64)
    size = torch.randint(1, 5, (2, 31, 1)).double()
    pairs = shared_mlp_pairs(31, 1, 0.5)
    assert pairs == 7
    shared = block._tm_shared_mlp_branch(TokenState(x, size), pairs, 1)
    torch.testing.assert_close(shared, loop_shared_mlp(block, x, size, pairs))
    # In the block: proportional attention on all tokens, then the shared MLP; no token leaves.
    out = block.forward_tokens(TokenState(x, size), 0, model.token_reducer, model.tokenmerge_config, 1)
    attn = block.attn
    q, k, v = attn.qkv(block.norm1(x)).reshape(2, 31, 3, 3, 16).permute(2, 0, 3, 1, 4)
    logits = (q @ k.transpose(-1, -2)) * attn.scale + size.log()[:, None, None, :, 0]
    mid = x + attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 31, 48))
    torch.testing.assert_close(out.x, mid + loop_shared_mlp(block, mid, size, pairs))


@torch.no_grad()
def test_share_zero_is_exact_and_share_keeps_tokens_and_cuts_flops():
    model, x = vit(), torch.randn(2, 3, 64, 64)
    reference = model(x)
    full = count_gflops(model, image_size=64)
    assert torch.equal(tokenmerge.patch(model, r=0, mlp_share=0.0)(x), reference)
    tokenmerge.patch(model, r=0, mlp_share=1.0)
    shared = model(x)
    assert shared.shape == reference.shape and not torch.allclose(shared, reference)
    assert model.tokens_per_block() == [65] * 5  # nothing removed
    assert count_gflops(model, image_size=64) < full
    # With r > 0 the pairs are counted on the tokens left after each block's merge.
    tokenmerge.patch(model, r=4, mlp_share=1.0, trace_source=True)
    state = model.forward_tokens(x)
    assert state.x.shape[1] == 65 - 4 * 4
    assert state.size[:, 1:].sum(dim=1).flatten().tolist() == [64.0, 64.0]
    assert count_gflops(model, image_size=64) < count_gflops(tokenmerge.patch(vit(), r=4), image_size=64)
    tokenmerge.unpatch(model)
    assert torch.equal(model(x), reference)


@pytest.mark.parametrize("method", ["tome", "mctf", "pitome", "tcvit"])
@torch.no_grad()
def test_mlp_share_is_an_option_of_every_method(method):
    x = torch.randn(2, 3, 64, 64)
    plain = tokenmerge.patch(vit(), method=method, r=4)(x)
    model = tokenmerge.patch(vit(), method=method, r=4, options={"mlp_share": 0.5})
    assert model.tokenmerge_config.mlp_share == 0.5
    out = model(x)
    assert torch.isfinite(out).all() and not torch.allclose(out, plain)


def test_mlp_share_round_trips_through_best_json(tmp_path):
    config = {"method": "mctf", "r": [3, 2, 2, 1], "options": {"mlp_share": 1.0, "tau_sim": 0.5}}
    path = tmp_path / "best.json"
    path.write_text(json.dumps(config))
    model = tokenmerge.patch(vit(), **json.loads(path.read_text()))
    assert model.tokenmerge_config.mlp_share == 1.0 and model.token_reducer.tau_sim == 0.5


@pytest.mark.parametrize("options,message", [
    (dict(mlp_share=1.5), "mlp_share must be a number from 0 to 1"),
    (dict(mlp_share=-0.1), "mlp_share must be a number from 0 to 1"),
    (dict(mlp_share=True), "mlp_share must be a number from 0 to 1"),
    (dict(mlp_share="half"), "mlp_share must be a number from 0 to 1"),
    (dict(mlp_share=0.5, options={"mlp_share": 0.5}), "mlp_share given twice"),
    (dict(mlp_share=0.5, layout="local"), "mlp_share needs layout='global'"),
])
def test_bad_mlp_share(options, message):
    model, x = vit(), torch.randn(1, 3, 64, 64)
    reference = model(x)
    with pytest.raises(ValueError, match=message):
        tokenmerge.patch(model, r=2, **options)
    assert not tokenmerge.is_patched(model) and torch.equal(model(x), reference)


@torch.no_grad()
def test_mlp_share_on_a_hugging_face_vit():
    from .conftest import HF_VIT_TOKENS, tiny_hf_vit

    model, x = tiny_hf_vit(), torch.randn(2, 3, 32, 32)
    reference = model(pixel_values=x).logits
    tokenmerge.patch(model, r=0, mlp_share=1.0)
    shared = model(pixel_values=x).logits
    assert shared.shape == reference.shape and not torch.allclose(shared, reference)
    assert model.vit.tokens_per_block() == [HF_VIT_TOKENS] * 3  # no token removed
    tokenmerge.unpatch(model)
    assert torch.equal(model(pixel_values=x).logits, reference)
