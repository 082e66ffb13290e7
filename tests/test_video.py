"""VideoMAE and ViViT (Hugging Face) token merging, on tiny random-weight models built from
configs.

Videos ``[B, 4 frames, 3, 32, 32]``, tubelets of 2 frames x 8x8 pixels: a (2, 4, 4) grid of
32 tokens; no class token in VideoMAE, one (protected) before them in ViViT.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import tokenmerge  # noqa: E402
from tokenmerge.backends import transformers as hf  # noqa: E402

from .conftest import staged_logits  # noqa: E402

VIDEO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             image_size=32, patch_size=8, num_frames=4, tubelet_size=2, num_labels=3)
GRID = (2, 4, 4)  # (t, h, w) tubelets
TOKENS = 32

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(**overrides):
    return transformers.VideoMAEConfig(**{**VIDEO, **overrides})


def _classifier(attn="sdpa", **overrides):
    torch.manual_seed(0)
    model = transformers.VideoMAEForVideoClassification._from_config(
        _config(**overrides), attn_implementation=attn
    ).eval()
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, 2.0)  # make merging visible in the logits
        if model.fc_norm is not None:
            # A non-trivial head norm, so skipping it or applying it to the wrong tokens shows.
            model.fc_norm.weight.uniform_(0.5, 1.5)
            model.fc_norm.bias.normal_(0.0, 0.5)
    return model


def _trunk(attn="sdpa", **overrides):
    torch.manual_seed(0)
    return transformers.VideoMAEModel._from_config(_config(**overrides), attn_implementation=attn).eval()


BUILDERS = {"model": _trunk, "classifier": _classifier}


def _videos(batch=2, seed=1):
    return torch.randn(batch, 4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _run(model, x, **kwargs):
    """Every tensor (and tuple of tensors) a forward returns, by name."""
    with torch.no_grad():
        out = model(x, **kwargs)
    return {k: v for k, v in out.items() if v is not None}


def _assert_outputs_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], tuple):
            assert len(a[key]) == len(b[key]) and all(torch.equal(u, v) for u, v in zip(a[key], b[key])), key
        else:
            assert torch.equal(a[key], b[key]), key


def _first_layer(model):
    trunk = hf.vision_trunk(model)
    return trunk.layers[0] if isinstance(trunk, transformers.VivitModel) else trunk.encoder.layer[0]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family,name", [(f, n) for f in ("videomae", "vivit") for n in ("model", "classifier")])
def test_r0_is_identical_merging_changes_it_and_unpatch_restores(family, name, attn):
    model = (BUILDERS if family == "videomae" else VIVIT_BUILDERS)[name](attn)
    layer_class = type(_first_layer(model))
    assert hf.vision_trunk(model).config._attn_implementation == attn
    x = _videos()
    reference = _run(model, x, output_hidden_states=True)
    keys = set(model.state_dict())
    base_class = type(model)

    tokenmerge.patch(model, method="tome", r=0)
    assert tokenmerge.is_patched(model)
    _assert_outputs_equal(_run(model, x, output_hidden_states=True), reference)

    tokenmerge.patch(model, method="tome", r=4)
    merged = _run(model, x)
    first = "logits" if name == "classifier" else "last_hidden_state"
    assert torch.isfinite(merged[first]).all() and not torch.equal(merged[first], reference[first])

    tokenmerge.unpatch(model)
    assert type(model) is base_class and not tokenmerge.is_patched(model)
    assert type(_first_layer(model)) is layer_class
    assert set(model.state_dict()) == keys
    _assert_outputs_equal(_run(model, x, output_hidden_states=True), reference)


def test_eager_and_sdpa_agree_when_merging():
    x = _videos()
    logits = [tokenmerge.patch(_classifier(attn), method="tome", r=4)(x).logits for attn in ("eager", "sdpa")]
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-5)


# method -> options: ToMe, MCTF, and select-and-fuse (TC-ViT by connectivity, fused or
# pruned: its class-attention cue needs a class token VideoMAE does not have).
METHODS = {
    "tome": {},
    "mctf": {},
    "tcvit": {"dominance_weight": 0.0},
    "tcvit_prune": {"dominance_weight": 0.0, "fuse": False},
}


@pytest.mark.parametrize("label", list(METHODS))
def test_token_counts_per_block_and_sources_cover_every_tubelet_once(label):
    model = _classifier()
    method = label.split("_")[0]
    tokenmerge.patch(model, method=method, r=5, trace_source=True, **METHODS[label])
    trunk = model.videomae
    assert trunk.tokenmerge_config.num_protected == 0  # no class token: every tubelet merges
    assert trunk.tokens_per_block() == [32, 27, 22]
    x = _videos()
    with torch.no_grad():
        out = trunk(x, output_hidden_states=True)
        state = trunk.forward_tokens(x)
        logits = model(x).logits
    assert [h.shape[1] for h in out.hidden_states] == [32, 27, 22]
    assert out.last_hidden_state.shape == (2, 22, 32) and logits.shape == (2, 3)
    assert torch.equal(state.x, out.last_hidden_state)
    # One source per space-time tubelet, each pointing at one final token (or at the discard
    # slot 22 for a pruning method); the tubelets each kept token covers add up to its size.
    assert state.source.shape == (2, TOKENS)
    counts = torch.stack([torch.bincount(s, minlength=23) for s in state.source])
    if label == "tcvit_prune":
        assert int(counts[:, 22].min()) > 0  # pruned tubelets are discarded, not covered
    else:
        assert int(state.source.max()) < 22
        assert int(counts[:, :22].min()) >= 1 and counts[:, :22].sum(dim=1).tolist() == [TOKENS, TOKENS]
        torch.testing.assert_close(counts[:, :22].float(), state.size[..., 0])
    with torch.no_grad():
        staged = staged_logits(tokenmerge.adapter_for(model), x)
    torch.testing.assert_close(staged, logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["evit", "prune", "tcvit"])
def test_class_attention_methods_are_refused_clearly(method):
    with pytest.raises(ValueError, match="no protected class token"):
        tokenmerge.patch(_classifier(), method=method, r=2)


@pytest.mark.parametrize("method", ["dtem", "pitome", "random", "drop"])
def test_other_methods_run_with_expected_token_counts(method):
    model = tokenmerge.patch(_classifier(), method=method, r=3)
    assert model.videomae.tokens_per_block() == [32, 29, 26]
    with torch.no_grad():
        assert model.videomae(_videos()).last_hidden_state.shape == (2, 26, 32)
        assert torch.isfinite(model(_videos()).logits).all()


def test_mean_pooling_is_size_weighted():
    model = tokenmerge.patch(_classifier(), method="tome", r=6, trace_source=True)
    x = _videos()
    with torch.no_grad():
        logits = model(x).logits
        state = model.videomae.forward_tokens(x)
        dense = tokenmerge.dense_features(model, x)
    assert state.x.shape[1] == TOKENS - 12
    # Independently: each merged token weighted by the tubelets it covers ...
    size = state.size[..., 0]
    pooled = torch.einsum("bnc,bn->bc", state.x, size) / size.sum(dim=1, keepdim=True)
    torch.testing.assert_close(logits, model.classifier(model.fc_norm(pooled)), rtol=1e-5, atol=1e-6)
    # ... which is the plain mean over the unmerged (t, h, w) grid.
    torch.testing.assert_close(logits, model.classifier(model.fc_norm(dense.mean(dim=1))), rtol=1e-5, atol=1e-6)
    unweighted = model.classifier(model.fc_norm(state.x.mean(dim=1)))
    assert not torch.allclose(logits, unweighted, atol=1e-4)


@pytest.mark.parametrize("trunk, prefix", [(lambda: _trunk(), 0), (lambda: _vivit_trunk(), 1)],
                         ids=["videomae", "vivit"])
def test_tubelet_grid_is_time_then_rows_then_columns(trunk, prefix):
    model = trunk()
    adapter = tokenmerge.adapter_for(model)
    assert adapter.num_prefix_tokens == prefix and adapter.num_patches == TOKENS
    assert adapter.video_grid() == GRID
    assert adapter.video_grid(8, 64, 32) == (4, 8, 4)
    x = _videos(batch=1)
    assert adapter.input_grid(x) == GRID
    # Change one tubelet (frames 2-3, pixel rows 8-15, columns 16-23): only token
    # (t, h, w) = (1, 1, 2) after the prefix tokens moves, and the map puts it at [..., 1, 1, 2].
    changed = x.clone()
    changed[:, 2:4, :, 8:16, 16:24] += 1.0
    with torch.no_grad():
        delta = adapter.embed(changed) - adapter.embed(x)
    moved = delta.abs().sum(dim=-1)[0].nonzero().flatten().tolist()
    assert moved == [prefix + 1 * 16 + 1 * 4 + 2]
    grid_delta = tokenmerge.unmerge_to_grid(delta[:, prefix:], None, 0, 0, GRID, output="map")
    assert grid_delta.shape == (1, 32, 2, 4, 4)
    assert grid_delta.abs().sum(dim=1)[0].nonzero().tolist() == [[1, 1, 2]]


def test_dense_features_unmerge_onto_the_tubelet_grid():
    model = _trunk()
    x = _videos()
    with torch.no_grad():
        plain = model(x).last_hidden_state
        assert torch.equal(tokenmerge.dense_features(model, x), plain)
        tokenmerge.patch(model, method="tome", r=0, trace_source=True)
        assert torch.equal(tokenmerge.dense_features(model, x), plain)  # unmerged: bit for bit
        tokenmerge.patch(model, method="tome", r=5, trace_source=True)
        state = model.forward_tokens(x)
        tokens = tokenmerge.dense_features(model, x)
        volume = tokenmerge.dense_features(model, x, output="map")
    assert tokens.shape == (2, TOKENS, 32) and volume.shape == (2, 32, *GRID)
    expected = torch.stack([state.x[b, state.source[b]] for b in range(2)])
    assert torch.equal(tokens, expected)
    assert torch.equal(volume, tokens.transpose(1, 2).reshape(2, 32, *GRID))


def test_image_entry_points_say_the_model_takes_videos():
    adapter = tokenmerge.adapter_for(_classifier())
    with pytest.raises(TypeError, match="takes videos, not images"):
        adapter.image_size
    vit = transformers.ViTModel(transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32,
                                                       num_hidden_layers=1, num_attention_heads=2,
                                                       intermediate_size=64))
    with pytest.raises(TypeError, match="takes images, not videos"):
        tokenmerge.adapter_for(vit).video_grid()


def test_token_zero_head_without_mean_pooling_is_refused_unless_protected():
    x = _videos()
    model = _classifier(use_mean_pooling=False)
    reference = _run(model, x)
    with pytest.raises(ValueError, match=r"VideoMAEForVideoClassification with config.use_mean_pooling=False.*"
                                         r"token 0.*num_protected=1"):
        tokenmerge.patch(model, method="tome", r=2)
    assert not tokenmerge.is_patched(model)
    tokenmerge.patch(model, method="tome", r=0)  # nothing merged: exact
    _assert_outputs_equal(_run(model, x), reference)
    tokenmerge.patch(model, method="tome", r=2, num_protected=1, trace_source=True)
    with torch.no_grad():
        state = model.videomae.forward_tokens(x)
        logits = model(x).logits
    assert int(state.source.min()) >= 1  # tubelet 0 stays token 0, as a class token would
    torch.testing.assert_close(logits, model.classifier(state.x[:, 0]), rtol=1e-5, atol=1e-6)
    # The trunk alone (no head), with its final norm, merges freely.
    trunk = _trunk(use_mean_pooling=False)
    plain = _run(trunk, x)
    tokenmerge.patch(trunk, method="tome", r=0)
    _assert_outputs_equal(_run(trunk, x), plain)
    tokenmerge.patch(trunk, method="tome", r=2)
    assert _run(trunk, x)["last_hidden_state"].shape == (2, 28, 32)


def test_pretraining_masks_are_refused_when_merging():
    x = _videos()
    mask = torch.zeros(2, TOKENS, dtype=torch.bool)
    mask[:, ::2] = True  # every other tubelet hidden
    for name in BUILDERS:
        model = BUILDERS[name]()
        reference = _run(model, x, bool_masked_pos=mask)
        tokenmerge.patch(model, method="tome", r=0)
        _assert_outputs_equal(_run(model, x, bool_masked_pos=mask), reference)  # nothing merged: exact
        tokenmerge.patch(model, method="tome", r=2)
        with pytest.raises(ValueError, match="bool_masked_pos is not supported on a token-merged VideoMAEModel"):
            model(x, bool_masked_pos=mask)


def test_attention_outputs_and_masks_are_refused():
    model = tokenmerge.patch(_classifier("eager"), method="tome", r=2)
    x = _videos()
    with pytest.raises(ValueError, match="output_attentions"):
        model(x, output_attentions=True)
    with pytest.raises(ValueError, match="output_attentions"):
        model.videomae(x, output_attentions=True)
    with pytest.raises(ValueError, match="attention masks"):
        model.videomae(x, attention_mask=torch.ones(2, TOKENS))
    model.config.output_attentions = True
    with pytest.raises(ValueError, match=r"config.output_attentions is True"):
        model(x)


def test_local_layout_keeps_every_tubelet():
    model = tokenmerge.patch(_classifier(), method="tome", r=6, layout="local")
    assert model.videomae.tokens_per_block() == [TOKENS] * 3
    with torch.no_grad():
        out = model.videomae(_videos())
    assert out.last_hidden_state.shape == (2, TOKENS, 32)


def test_pretraining_model_is_named_as_unsupported():
    model = transformers.VideoMAEForPreTraining(_config())
    with pytest.raises(TypeError, match="VideoMAEForPreTraining"):
        tokenmerge.patch(model, method="tome", r=2)


def test_unmerge_to_grid_checks_the_tubelet_grid():
    tokens = torch.randn(1, TOKENS, 8)
    assert tokenmerge.unmerge_to_grid(tokens, None, 0, 0, GRID, output="map").shape == (1, 8, *GRID)
    source = torch.zeros(1, TOKENS, dtype=torch.long)
    with pytest.raises(ValueError, match="2x4x2 grid"):
        tokenmerge.unmerge_to_grid(tokens[:, :1], source, 0, 0, (2, 4, 2))
    with pytest.raises(ValueError, match=r"\(T, H, W\) tubelets"):
        tokenmerge.unmerge_to_grid(tokens, None, 0, 0, (2, 2, 2, 4))


def test_throughput_times_a_video_batch():
    from tokenmerge.evaluation.throughput import measure_throughput

    models = {"plain": _classifier(), "tome": tokenmerge.patch(_classifier(), method="tome", r=4)}
    speed = measure_throughput(models, inputs=_videos(batch=3), warmup=0, repeats=2)
    for name in models:
        assert len(speed[name]["times_s"]) == 2
        assert speed[name]["images_per_s"] == pytest.approx(3 / (speed[name]["ms_per_batch"] / 1e3))


# --------------------------------------------------------------------------------------
# ViViT: the same videos, tubelets [2, 8, 8] (a (2, 4, 4) grid of 32 tubelets) after a
# class token (protected), learned position embeddings, ViT-style layers.
# --------------------------------------------------------------------------------------

VIVIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             image_size=32, num_frames=4, tubelet_size=[2, 8, 8], num_labels=3)


def _vivit_classifier(attn="sdpa"):
    torch.manual_seed(0)
    model = transformers.VivitForVideoClassification._from_config(
        transformers.VivitConfig(**VIVIT), attn_implementation=attn
    ).eval()
    with torch.no_grad():
        # HF initialises the class token and position embeddings to zero: make them matter.
        model.vivit.embeddings.cls_token.normal_(0.0, 1.0)
        model.vivit.embeddings.position_embeddings.normal_(0.0, 0.5)
        model.classifier.weight.normal_(0.0, 2.0)  # make merging visible in the logits
    return model


def _vivit_trunk(attn="sdpa"):
    torch.manual_seed(0)
    model = transformers.VivitModel._from_config(transformers.VivitConfig(**VIVIT), attn_implementation=attn).eval()
    with torch.no_grad():
        model.embeddings.cls_token.normal_(0.0, 1.0)
        model.embeddings.position_embeddings.normal_(0.0, 0.5)
    return model


VIVIT_BUILDERS = {"model": _vivit_trunk, "classifier": _vivit_classifier}


def test_vivit_eager_and_sdpa_agree_when_merging():
    x = _videos()
    logits = [tokenmerge.patch(_vivit_classifier(attn), method="tome", r=4)(x).logits for attn in ("eager", "sdpa")]
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["tome", "mctf"])
def test_vivit_token_counts_class_token_first_and_sources_cover_every_tubelet_once(method):
    model = _vivit_classifier()
    tokenmerge.patch(model, method=method, r=5, trace_source=True)
    trunk = model.vivit
    assert trunk.tokenmerge_config.num_protected == 1  # the class token
    assert trunk.tokens_per_block() == [TOKENS + 1, 28, 23]
    x = _videos()
    with torch.no_grad():
        out = trunk(x, output_hidden_states=True)
        state = trunk.forward_tokens(x)
        logits = model(x).logits
        cls_in = trunk.embeddings(x)[:, 0]
    assert [h.shape[1] for h in out.hidden_states] == [TOKENS + 1, 28, 23]
    assert out.last_hidden_state.shape == (2, 23, 32) and logits.shape == (2, 3)
    assert torch.isfinite(logits).all()
    assert torch.equal(state.x, out.last_hidden_state)
    # The class token stays first, on its own (size 1), and the head reads it.
    assert torch.equal(out.hidden_states[0][:, 0], cls_in)
    assert state.size[:, 0, 0].tolist() == [1.0, 1.0]
    torch.testing.assert_close(logits, model.classifier(state.x[:, 0]), rtol=1e-5, atol=1e-6)
    # One source per space-time tubelet, each pointing at one merged tubelet token (1...22),
    # never at the class token; the tubelets each token covers add up to its size.
    assert state.source.shape == (2, TOKENS)
    assert int(state.source.min()) >= 1 and int(state.source.max()) < 23
    counts = torch.stack([torch.bincount(s, minlength=23) for s in state.source])
    assert int(counts[:, 1:].min()) >= 1 and counts[:, 1:].sum(dim=1).tolist() == [TOKENS, TOKENS]
    torch.testing.assert_close(counts[:, 1:].float(), state.size[:, 1:, 0])
    with torch.no_grad():
        staged = staged_logits(tokenmerge.adapter_for(model), x)
    torch.testing.assert_close(staged, logits, rtol=1e-5, atol=1e-6)


def test_vivit_dense_features_unmerge_onto_the_tubelet_grid():
    model = _vivit_trunk()
    x = _videos()
    with torch.no_grad():
        plain = model(x).last_hidden_state[:, 1:]
        tokenmerge.patch(model, method="tome", r=0, trace_source=True)
        assert torch.equal(tokenmerge.dense_features(model, x), plain)  # unmerged: bit for bit
        tokenmerge.patch(model, method="tome", r=5, trace_source=True)
        state = model.forward_tokens(x)
        tokens = tokenmerge.dense_features(model, x)
        volume = tokenmerge.dense_features(model, x, output="map")
    assert tokens.shape == (2, TOKENS, 32) and volume.shape == (2, 32, *GRID)
    expected = torch.stack([state.x[b, state.source[b]] for b in range(2)])
    assert torch.equal(tokens, expected)
    assert torch.equal(volume, tokens.transpose(1, 2).reshape(2, 32, *GRID))
