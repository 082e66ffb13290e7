"""PiToMe and MCTF as methods, and proportional attention as an option of every method."""

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import tokenmerge
from tokenmerge.backends.common import MergeConfig
from tokenmerge.methods.base import TokenState

SMALL = dict(img_size=64, patch_size=8, embed_dim=48, depth=4, num_heads=3, num_classes=7)


def vit(**overrides):
    torch.manual_seed(0)
    return VisionTransformer(**{**SMALL, **overrides}).eval()


@pytest.mark.parametrize("method,options", [
    ("pitome", {}), ("mctf", {}), ("mctf", dict(bidirectional=True, fusion="attention")),
])
@torch.no_grad()
def test_r0_exact_token_counts_and_unpatch(method, options):
    model, x = vit(), torch.randn(2, 3, 64, 64)
    reference = model(x)
    tokenmerge.patch(model, method=method, r=0, **options)
    assert torch.equal(model(x), reference)
    tokenmerge.patch(model, method=method, r=6, trace_source=True, **options)
    state = model.forward_tokens(x)
    assert state.x.shape[1] == model.tokens_per_block()[-1] == 65 - 4 * 6
    assert state.size[:, 1:].sum(dim=1).flatten().tolist() == [64.0, 64.0]  # every patch counted once
    assert torch.isfinite(model(x)).all()
    tokenmerge.unpatch(model)
    assert torch.equal(model(x), reference)


@pytest.mark.parametrize("method,options,message", [
    ("pitome", dict(margin="high"), "margin must be a finite number"),
    ("pitome", dict(alpha=0), "alpha must be > 0"),
    ("mctf", dict(tau_info=0.0), "tau_info must be > 0"),
    ("mctf", dict(tau_sim=float("inf")), "tau_sim must be a finite number"),
    ("mctf", dict(chunk_size=0), "chunk_size must be a positive int"),
    ("mctf", dict(fusion="mean"), "fusion must be one of"),
    ("mctf", dict(bidirectional="yes"), "bidirectional must be True or False"),
])
def test_bad_options(method, options, message):
    with pytest.raises((ValueError, TypeError), match=message):
        tokenmerge.patch(vit(), method=method, r=2, **options)


def dense_block(block, x, size, prop_attn):
    """A timm pre-norm block, its attention written out as softmax(q k^T * scale [+ log s]) v."""
    attn = block.attn
    B, N, C = x.shape
    h = block.norm1(x)
    q, k, v = attn.qkv(h).reshape(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
    logits = (q @ k.transpose(-1, -2)) * attn.scale
    if prop_attn:
        logits = logits + size.log()[:, None, None, :, 0]
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C)
    x = x + attn.proj(out)
    return x + block.mlp(block.norm2(x))


@pytest.mark.parametrize("prop_attn", [True, False])
@torch.no_grad()
def test_prop_attn_against_a_dense_reference(prop_attn):
    model = tokenmerge.patch(vit(), r=0, prop_attn=prop_attn)
    assert model.tokenmerge_config.prop_attn is prop_attn
    block = model.blocks[1]
    x = torch.randn(2, 30, 48, dtype=torch.float64)
    size = torch.randint(1, 6, (2, 30, 1)).double()
    block.double()
    out = block.forward_tokens(TokenState(x, size), 0, model.token_reducer, model.tokenmerge_config, 1)
    torch.testing.assert_close(out.x, dense_block(block, x, size, prop_attn))
    other = dense_block(block, x, size, not prop_attn)
    assert not torch.allclose(out.x, other)


def test_prop_attn_defaults_per_method_and_option_forms():
    assert tokenmerge.patch(vit(), r=2).tokenmerge_config.prop_attn is True
    for method in ("tcvit", "evit"):
        assert tokenmerge.patch(vit(), method=method, r=2).tokenmerge_config.prop_attn is False
    # Accepted as a keyword and inside options= (the best.json form), never both.
    assert tokenmerge.patch(vit(), method="tcvit", r=2, prop_attn=True).tokenmerge_config.prop_attn is True
    model = tokenmerge.patch(vit(), method="mctf", r=2, options={"prop_attn": False, "tau_info": 10.0})
    assert model.tokenmerge_config.prop_attn is False and model.token_reducer.tau_info == 10.0
    with pytest.raises(ValueError, match="prop_attn given twice"):
        tokenmerge.patch(vit(), r=2, prop_attn=True, options={"prop_attn": False})
    with pytest.raises(ValueError, match="prop_attn must be True or False"):
        MergeConfig(2, 1, prop_attn="yes")
    with pytest.raises(ValueError, match="given both in options= and as keywords"):
        tokenmerge.patch(vit(), method="mctf", r=2, options={"tau_info": 1.0}, tau_info=2.0)


@pytest.mark.parametrize("method", ["tome", "mctf", "pitome", "tcvit"])
@torch.no_grad()
def test_keep_norm_is_an_option_of_every_method(method):
    model, x = vit(), torch.randn(2, 3, 64, 64)
    reference = model(x)
    assert torch.equal(tokenmerge.patch(model, method=method, r=0, keep_norm=True)(x), reference)
    plain = tokenmerge.patch(vit(), method=method, r=6)
    assert plain.token_reducer.keep_norm is False  # off unless asked: ToMe stays the published algorithm
    tokenmerge.patch(model, method=method, r=6, options={"keep_norm": True})
    assert model.token_reducer.keep_norm is True
    assert not torch.allclose(model(x), plain(x))
    tokenmerge.unpatch(model)
    assert torch.equal(model(x), reference)


@torch.no_grad()
def test_keep_norm_reaches_the_merge_in_both_layouts():
    from tokenmerge.core.merge import merge_tokens
    from tokenmerge.methods import create_reducer
    from tokenmerge.methods.base import AttentionTensors

    torch.manual_seed(5)
    x, q, k = torch.randn(2, 17, 12), torch.randn(2, 3, 17, 4), torch.randn(2, 3, 17, 4)
    attn = AttentionTensors(q, k, None, 0.5)
    reducer = create_reducer("tome")
    reducer.keep_norm = True
    plan = reducer.plan(x, attn, 5, 1, 0)
    torch.testing.assert_close(reducer.reduce(TokenState(x), attn, 5, 1, 0).x,
                               merge_tokens(x, None, plan, keep_norm=True)[0])
    # the local layout merges each branch's input by the same rule
    image = torch.randn(2, 3, 64, 64)
    local = {keep: tokenmerge.patch(vit(), r=6, layout="local", keep_norm=keep)(image) for keep in (False, True)}
    assert not torch.allclose(local[False], local[True])


@pytest.mark.parametrize("options,error,message", [
    (dict(keep_norm="yes"), TypeError, "keep_norm must be True, False or None"),
    (dict(keep_norm=True, options={"keep_norm": False}), ValueError, "keep_norm given twice"),
])
def test_bad_keep_norm(options, error, message):
    with pytest.raises(error, match=message):
        tokenmerge.patch(vit(), r=2, **options)


@torch.no_grad()
def test_prop_attn_off_changes_only_attention_not_pooling():
    # Average pooling stays size-weighted without proportional attention: with r>0 and
    # prop_attn=False the pooled tokens still count every patch once.
    model = tokenmerge.patch(vit(global_pool="avg", fc_norm=True), r=5, prop_attn=False)
    state = model.forward_tokens(torch.randn(2, 3, 64, 64))
    assert state.size is not None and state.size[:, 1:].sum(dim=1).flatten().tolist() == [64.0, 64.0]
