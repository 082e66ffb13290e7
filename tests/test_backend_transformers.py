"""The Hugging Face transformers backend, on small random-weight models built from configs."""

from __future__ import annotations

import copy
import io
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import tokenmerge  # noqa: E402
from tokenmerge.backends import transformers as hf  # noqa: E402

from .conftest import fresh_process_lines, staged_logits  # noqa: E402

VISION = dict(image_size=64, patch_size=16, hidden_size=48, num_hidden_layers=3, num_attention_heads=3)
PATCHES = 16  # (64 / 16) ** 2


pytestmark = pytest.mark.usefixtures("one_thread")


def _vit(attn="sdpa"):
    config = transformers.ViTConfig(**VISION, intermediate_size=96, num_labels=5)
    return transformers.ViTForImageClassification._from_config(config, attn_implementation=attn)


def _vit_model(attn="sdpa"):
    config = transformers.ViTConfig(**VISION, intermediate_size=96)
    return transformers.ViTModel._from_config(config, attn_implementation=attn)


def _deit(attn="sdpa"):
    config = transformers.DeiTConfig(**VISION, intermediate_size=96, num_labels=5)
    return transformers.DeiTForImageClassificationWithTeacher._from_config(config, attn_implementation=attn)


def _clip_vision(attn="sdpa"):
    config = transformers.CLIPVisionConfig(**VISION, intermediate_size=96)
    return transformers.CLIPVisionModel._from_config(config, attn_implementation=attn)


def _clip_config(**extra):
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=100, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return transformers.CLIPConfig(
        vision_config=dict(**VISION, intermediate_size=96), text_config=text, projection_dim=16, **extra
    )


def _clip(attn="sdpa"):
    return transformers.CLIPModel._from_config(_clip_config(), attn_implementation=attn)


def _clip_classifier(attn="sdpa"):
    return transformers.CLIPForImageClassification._from_config(
        _clip_config(num_labels=5), attn_implementation=attn
    )


def _dinov2(attn="sdpa"):
    config = transformers.Dinov2Config(**VISION, mlp_ratio=2, num_labels=5, layerscale_value=0.5)
    return transformers.Dinov2ForImageClassification._from_config(config, attn_implementation=attn)


def _dinov2_registers(attn="sdpa"):
    config = transformers.Dinov2WithRegistersConfig(**VISION, mlp_ratio=2, num_register_tokens=2)
    return transformers.Dinov2WithRegistersModel._from_config(config, attn_implementation=attn)


# name -> (builder, prefix tokens)
MODELS = {
    "vit": (_vit, 1),
    "vit_model": (_vit_model, 1),
    "deit_teacher": (_deit, 2),
    "clip_vision": (_clip_vision, 1),
    "clip": (_clip, 1),
    "clip_classifier": (_clip_classifier, 1),
    "dinov2": (_dinov2, 1),
    "dinov2_registers": (_dinov2_registers, 3),
}


def _build(name, attn="sdpa"):
    torch.manual_seed(0)
    return MODELS[name][0](attn).eval()


def _images(batch=2, seed=1):
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def _run(model, x):
    """Every tensor a model's forward returns, by name (CLIPModel: its image features)."""
    with torch.no_grad():
        if isinstance(model, transformers.CLIPModel):
            out = model.get_image_features(pixel_values=x)
        else:
            out = model(x)
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def _assert_outputs_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("name", list(MODELS))
def test_r0_is_identical_and_unpatch_restores(name):
    model = _build(name)
    x = _images()
    reference = _run(model, x)
    keys = set(model.state_dict())
    base_class = type(model)

    tokenmerge.patch(model, method="tome", r=0)
    assert tokenmerge.is_patched(model)
    _assert_outputs_equal(_run(model, x), reference)

    tokenmerge.patch(model, method="tome", r=2)
    merged = _run(model, x)
    first = next(iter(reference))
    assert not torch.equal(merged[first], reference[first])  # merging is really on

    tokenmerge.unpatch(model)
    assert type(model) is base_class and not tokenmerge.is_patched(model)
    assert not hasattr(hf.vision_trunk(model), "tokenmerge_config")
    assert set(model.state_dict()) == keys
    _assert_outputs_equal(_run(model, x), reference)


@pytest.mark.parametrize("name", ["vit", "dinov2", "clip_vision"])
def test_r0_is_identical_under_eager_attention(name):
    model = _build(name, attn="eager")
    assert hf.vision_trunk(model).config._attn_implementation == "eager"
    x = _images()
    reference = _run(model, x)
    tokenmerge.patch(model, method="tome", r=0)
    _assert_outputs_equal(_run(model, x), reference)


@pytest.mark.parametrize("name", ["vit", "dinov2", "clip_vision"])
def test_eager_and_sdpa_agree_when_merging(name):
    x = _images()
    outs = []
    for attn in ("eager", "sdpa"):
        model = tokenmerge.patch(_build(name, attn), method="tome", r=3)
        outs.append(_run(model, x))
    for key in outs[0]:
        torch.testing.assert_close(outs[0][key], outs[1][key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_every_method_runs_with_expected_token_counts(name):
    prefix = MODELS[name][1]
    tokens = prefix + PATCHES
    x = _images()
    for method in tokenmerge.list_methods():
        model = _build(name)
        tokenmerge.patch(model, method=method, r=2, trace_source=True)
        trunk = hf.vision_trunk(model)
        assert trunk.tokenmerge_config.num_protected == prefix
        expected = [tokens - 2 * i for i in range(4)]
        assert trunk.tokens_per_block() == expected, method
        with torch.no_grad():
            out = trunk(x, output_hidden_states=True)
            state = trunk.forward_tokens(x)
        assert [h.shape[1] for h in out.hidden_states] == expected, method
        assert out.last_hidden_state.shape == (2, expected[-1], 48), method
        assert torch.isfinite(out.last_hidden_state).all(), method
        assert state.source.shape == (2, tokens - prefix), method
        assert int(state.source.max()) <= expected[-1], method
        _run(model, x)  # the wrapper's own head runs on the merged tokens


def test_hidden_states_match_unpatched_at_r0():
    model = _build("vit_model")
    x = _images()
    with torch.no_grad():
        reference = model(x, output_hidden_states=True).hidden_states
        tokenmerge.patch(model, method="tome", r=0)
        patched = model(x, output_hidden_states=True).hidden_states
    assert len(patched) == len(reference) == 4
    for a, b in zip(patched, reference):
        assert torch.equal(a, b)


def test_return_dict_false_gives_tuples():
    model = tokenmerge.patch(_build("vit_model"), method="tome", r=2)
    with torch.no_grad():
        out = model(_images(), return_dict=False)
    assert isinstance(out, tuple) and out[0].shape == (2, 11, 48) and out[1].shape == (2, 48)


def test_deit_protects_class_and_distillation_tokens():
    model = _build("deit_teacher")
    tokenmerge.patch(model, method="tome", r=2, trace_source=True)
    trunk = hf.vision_trunk(model)
    assert trunk.tokenmerge_config.num_protected == 2
    with torch.no_grad():
        state = trunk.forward_tokens(_images())
    assert int(state.source.min()) >= 2  # no patch ever lands on the class/distillation slots


def test_dinov2_registers_are_protected():
    model = _build("dinov2_registers")
    tokenmerge.patch(model, method="tome", r=3, trace_source=True)
    assert model.tokenmerge_config.num_protected == 3
    with torch.no_grad():
        state = model.forward_tokens(_images())
    assert int(state.source.min()) >= 3


@pytest.mark.parametrize("name, num_protected", [("vit", 0), ("deit_teacher", 1), ("dinov2_registers", 1)])
def test_merging_prefix_tokens_is_refused_with_the_fix(name, num_protected):
    prefix = MODELS[name][1]
    model = _build(name)
    with pytest.raises(ValueError, match=rf"num_protected={num_protected}: .*class token.*"
                                         rf"leave num_protected at its default \({prefix}\)"):
        tokenmerge.patch(model, method="tome", r=2, num_protected=num_protected)
    assert not tokenmerge.is_patched(model)
    # Nothing merges at r=0, and the local layout keeps every token in its slot.
    tokenmerge.patch(model, method="tome", r=0, num_protected=num_protected)
    tokenmerge.patch(model, method="tome", r=2, num_protected=num_protected, layout="local")


def test_mean_pooling_heads_are_size_weighted():
    # A size-weighted mean of merged tokens equals the plain mean over the unmerged patch grid.
    x = _images()
    for name, prefix in (("dinov2", 1), ("clip_classifier", 1)):
        model = tokenmerge.patch(_build(name), method="tome", r=3, trace_source=True)
        with torch.no_grad():
            logits = model(x).logits
            trunk = hf.vision_trunk(model)
            state = trunk.forward_tokens(x)
            dense = tokenmerge.dense_features(model, x)
        pooled = dense.mean(dim=1)
        if name == "dinov2":
            pooled = torch.cat([state.x[:, 0], pooled], dim=1)
        torch.testing.assert_close(logits, model.classifier(pooled), rtol=1e-5, atol=1e-6)
        assert state.x.shape[1] == prefix + PATCHES - 9


@pytest.mark.parametrize("labels", [None, torch.tensor([1, 3])])
def test_clip_classifier_interpolates_position_embeddings_when_patched(labels):
    model = _build("clip_classifier")
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))  # its grid is 64x64
    with torch.no_grad():
        reference = model(x, interpolate_pos_encoding=True, labels=labels)
        tokenmerge.patch(model, method="tome", r=0)
        patched = model(x, interpolate_pos_encoding=True, labels=labels)
        assert torch.equal(patched.logits, reference.logits)
        if labels is not None:
            assert torch.equal(patched.loss, reference.loss)
        tokenmerge.patch(model, method="tome", r=2)  # merging follows the larger grid
        assert model(x, interpolate_pos_encoding=True).logits.shape == (2, 5)


def test_clip_model_merges_the_image_tower_only():
    model = _build("clip")
    ids = torch.tensor([[0, 5, 6, 1], [0, 7, 1, 1]])
    x = _images()
    with torch.no_grad():
        text_before = model.get_text_features(input_ids=ids).pooler_output
        image_before = model.get_image_features(pixel_values=x).pooler_output
        tokenmerge.patch(model, method="tome", r=3)
        text_after = model.get_text_features(input_ids=ids).pooler_output
        image_after = model.get_image_features(pixel_values=x).pooler_output
        full = model(input_ids=ids, pixel_values=x)
    assert type(model) is transformers.CLIPModel and tokenmerge.is_patched(model)
    assert type(model.text_model.encoder.layers[0]) is transformers.models.clip.modeling_clip.CLIPEncoderLayer
    assert torch.equal(text_before, text_after)
    assert image_after.shape == image_before.shape == (2, 16)
    assert not torch.equal(image_before, image_after)
    assert full.logits_per_image.shape == (2, 2)


def test_unpatching_a_patched_wrappers_trunk_alone_leaves_the_wrapper_restorable():
    model = _build("clip_classifier")
    x = _images()
    reference = _run(model, x)
    tokenmerge.patch(model, method="tome", r=2)
    tokenmerge.unpatch(model.vision_model)  # the wrapper's size-weighted head still expects a patched trunk
    assert tokenmerge.is_patched(model)
    tokenmerge.unpatch(model)
    assert type(model) is transformers.CLIPForImageClassification and not tokenmerge.is_patched(model)
    _assert_outputs_equal(_run(model, x), reference)


def test_proportional_attention_makes_duplicate_merges_exact():
    # All patch tokens identical (constant image, no position embeddings): merging them with
    # size-weighted averages and proportional attention must not change the class token.
    for attn in ("eager", "sdpa"):
        model = _build("vit_model", attn)
        with torch.no_grad():
            model.embeddings.position_embeddings.zero_()
        x = torch.full((1, 3, 64, 64), 0.3)
        reference = _run(model, x)
        tokenmerge.patch(model, method="tome", r=4)
        merged = _run(model, x)
        assert merged["last_hidden_state"].shape[1] == 17 - 12
        torch.testing.assert_close(merged["pooler_output"], reference["pooler_output"], rtol=1e-4, atol=1e-5)
        tokenmerge.patch(model, method="drop", r=4)  # no sizes: the class token does change
        dropped = _run(model, x)
        assert not torch.allclose(dropped["pooler_output"], reference["pooler_output"], atol=1e-3)


def test_save_pretrained_round_trip(tmp_path):
    model = _build("vit")
    x = _images()
    plain = _run(model, x)
    keys = set(model.state_dict())
    tokenmerge.patch(model, method="tome", r=2)
    merged = _run(model, x)
    assert set(model.state_dict()) == keys
    model.save_pretrained(tmp_path)
    assert model.config.architectures == ["ViTForImageClassification"]

    loaded = transformers.ViTForImageClassification.from_pretrained(tmp_path).eval()
    assert type(loaded) is transformers.ViTForImageClassification
    _assert_outputs_equal(_run(loaded, x), plain)
    tokenmerge.patch(loaded, method="tome", r=2)
    _assert_outputs_equal(_run(loaded, x), merged)

    auto = transformers.AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    _assert_outputs_equal(_run(auto, x), plain)


def test_patched_model_pickles():
    model = tokenmerge.patch(_build("dinov2"), method="tome", r=2)
    x = _images()
    expected = _run(model, x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    assert type(restored) is type(model)
    _assert_outputs_equal(_run(restored, x), expected)


def test_patched_models_load_in_a_fresh_process(tmp_path):
    # Patched layer classes are rebuilt from (base, mixin) on loading, so every family's layer
    # mixin must be importable by name.
    for family in hf._families().values():
        mixin = hf._layer_mixin(family.layer_spec)
        assert getattr(sys.modules[mixin.__module__], mixin.__qualname__) is mixin
    torch.manual_seed(0)
    tiny = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64, num_labels=3)
    models = {
        "vit": (transformers.ViTForImageClassification(tiny).eval(), torch.randn(2, 3, 32, 32)),
        "clip_classifier": (_build("clip_classifier"), _images()),  # also a size-weighted head
    }
    for name, (model, x) in models.items():
        tokenmerge.patch(model, method="tome", r=2)
        with torch.no_grad():
            logits = model(x).logits
            assert torch.equal(copy.deepcopy(model)(x).logits, logits)
        torch.save(model, tmp_path / f"{name}.pt")
        torch.save((x, logits), tmp_path / f"{name}_expected.pt")
    # Nothing is patched in the fresh process before it loads.
    script = """
        import sys
        import torch
        torch.set_num_threads(1)
        folder = sys.argv[1]
        for name in ("vit", "clip_classifier"):
            model = torch.load(f"{folder}/{name}.pt", weights_only=False)
            x, logits = torch.load(f"{folder}/{name}_expected.pt")
            with torch.no_grad():
                same = torch.equal(model(x).logits, logits)
            trunk = model.vit if name == "vit" else model.vision_model
            print(name, type(trunk).__qualname__, trunk.tokenmerge_schedule(), same)
    """
    assert fresh_process_lines(script, tmp_path)[:2] == ["vit TokenMergeViTModel (2, 2) True",
                                                         "clip_classifier TokenMergeCLIPVisionModel (2, 2, 2) True"]


def test_unsupported_architectures_are_named():
    swin = transformers.SwinModel(
        transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=2)
    )
    with pytest.raises(TypeError, match="SwinModel"):
        tokenmerge.patch(swin, method="tome", r=2)
    convnext = transformers.ConvNextModel(
        transformers.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)
    )
    with pytest.raises(TypeError, match="ConvNextModel"):
        tokenmerge.patch(convnext, method="tome", r=2)
    masked = transformers.ViTForMaskedImageModeling(transformers.ViTConfig(**VISION, intermediate_size=96))
    with pytest.raises(TypeError, match="ViTForMaskedImageModeling"):
        tokenmerge.patch(masked, method="tome", r=2)


def test_replaced_layer_is_rejected_with_its_name():
    model = _build("vit_model")
    model.layers[1] = torch.nn.Identity()
    with pytest.raises(TypeError, match=r"layer 1 \(Identity\)"):
        tokenmerge.patch(model, method="tome", r=2)
    assert not tokenmerge.is_patched(model) and type(model.layers[0]).__name__ == "ViTLayer"


@pytest.mark.parametrize(
    "spec, match",
    [
        (hf.LayerSpec("attention", "layernorm_before", "layernorm_missing"),
         r"layer 0 \(ViTLayer\).*norm2='layernorm_missing'.*ViTLayer has no attribute 'layernorm_missing'"),
        (hf.LayerSpec("attention", "layernorm_before", "layernorm_after", after_attn="attention.output.dropout"),
         r"layer 0 \(ViTLayer\).*ViTLayer\.attention has no attribute 'output'"),
    ],
)
def test_layer_spec_naming_a_missing_attribute_fails_at_patch_time(monkeypatch, spec, match):
    model = _build("vit_model")
    family = hf._families()[transformers.ViTModel]
    monkeypatch.setattr(hf, "_families", lambda: {transformers.ViTModel: family._replace(layer_spec=spec)})
    with pytest.raises(TypeError, match=match):
        tokenmerge.patch(model, method="tome", r=2)
    assert not tokenmerge.is_patched(model) and type(model.layers[0]).__name__ == "ViTLayer"


def test_masks_and_attention_outputs_are_rejected():
    model = tokenmerge.patch(_build("vit_model"), method="tome", r=2)
    x = _images()
    with pytest.raises(ValueError, match="attention masks"):
        model(x, attention_mask=torch.ones(2, 17))
    with pytest.raises(ValueError, match="output_attentions"):
        model(x, output_attentions=True)


@pytest.mark.parametrize("name", ["vit_model", "vit", "dinov2", "clip_vision"])
def test_config_output_attentions_is_refused_like_the_keyword(name):
    """HF models read output_attentions from their config: a patched one must not answer None.
    (HF allows the flag only with eager attention.)"""
    model = tokenmerge.patch(_build(name, "eager"), method="tome", r=2)
    model.config.output_attentions = True
    x = _images()
    with pytest.raises(ValueError, match=r"config.output_attentions is True.*set model.config.output_attentions = False"):
        model(x)
    model(x, output_attentions=False)  # the explicit keyword overrides the config, as in HF
    model.config.output_attentions = False
    model(x)


def test_schedule_clamping_warns_and_keep_ratio_works():
    model = _build("vit_model")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokenmerge.patch(model, method="tome", r=8)
    assert any("effective schedule" in str(w.message) for w in caught)
    assert model.tokens_per_block() == [17, 9, 5, 3]
    tokenmerge.patch(model, method="tome", keep_ratio=0.5)
    assert model.tokens_per_block() == [17, 9, 5, 3]


# Audio Spectrogram Transformer: 48 frames x 32 mel bins, 16x16 patches at stride 10 ->
# 2 x 4 = 8 patches after the class and distillation tokens.
AST = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
           num_mel_bins=32, max_length=48, frequency_stride=10, time_stride=10, num_labels=5)
AST_PATCHES = 8


def _ast():
    torch.manual_seed(0)
    model = transformers.ASTForAudioClassification(transformers.ASTConfig(**AST)).eval()
    with torch.no_grad():
        model.classifier.dense.weight.normal_(0.0, 2.0)  # make merging visible in the logits
        # A non-trivial final norm, so applying it twice (or not at all) shows in the logits.
        model.audio_spectrogram_transformer.layernorm.weight.uniform_(0.5, 1.5)
        model.audio_spectrogram_transformer.layernorm.bias.normal_(0.0, 0.5)
    return model


def _spectrograms(batch=3):
    return torch.randn(batch, AST["max_length"], AST["num_mel_bins"], generator=torch.Generator().manual_seed(2))


def test_ast_r0_is_identical_merging_changes_it_and_unpatch_restores():
    model = _ast()
    x = _spectrograms()
    keys = set(model.state_dict())
    with torch.no_grad():
        reference = model(x).logits
        tokenmerge.patch(model, method="tome", r=0)
        assert torch.equal(model(x).logits, reference)
        tokenmerge.patch(model, method="tome", r=2)
        merged = model(x).logits
        assert torch.isfinite(merged).all() and not torch.equal(merged, reference)
        tokenmerge.unpatch(model)
        assert type(model) is transformers.ASTForAudioClassification
        assert set(model.state_dict()) == keys
        with pytest.raises(TypeError, match="takes spectrograms, not images"):
            tokenmerge.adapter_for(model).image_size
        assert torch.equal(model(x).logits, reference)


@pytest.mark.parametrize("method", ["tome", "dtem", "tcvit", "mctf"])
def test_ast_protects_class_and_distillation_tokens_and_pools_them(method):
    model = tokenmerge.patch(_ast(), method=method, r=2, trace_source=True)
    trunk = model.audio_spectrogram_transformer
    assert trunk.tokenmerge_config.num_protected == 2
    assert trunk.tokens_per_block() == [10, 8, 6, 4]
    x = _spectrograms()
    with torch.no_grad():
        out = trunk(x)
        state = trunk.forward_tokens(x)
        logits = model(x).logits
    assert out.last_hidden_state.shape == (3, 4, 32)
    assert int(state.source.min()) >= 2 and state.source.shape == (3, AST_PATCHES)
    # Every patch still lands in one of the merged patch tokens, none in the protected ones.
    assert set(state.source.unique().tolist()) <= {2, 3}
    assert torch.equal(out.pooler_output, (out.last_hidden_state[:, 0] + out.last_hidden_state[:, 1]) / 2)
    with torch.no_grad():
        staged = staged_logits(tokenmerge.adapter_for(model), x)
    torch.testing.assert_close(staged, logits, rtol=1e-5, atol=1e-6)
