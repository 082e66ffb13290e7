"""tokenmerge.patch / unpatch on careless input: ignored options, bool r, failed re-patches,
torch.compile wrappers."""

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import tokenmerge
from tokenmerge.methods.dtem import DTEM

SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=4)


def vit(**overrides):
    torch.manual_seed(0)
    return VisionTransformer(**{**SMALL, **overrides}).eval()


def test_options_with_a_reducer_instance_are_refused():
    reducer = tokenmerge.create_reducer("tcvit", order=2)
    model = vit()
    with pytest.raises(TypeError, match=r"\['order'\] cannot be applied to an existing .* instance"):
        tokenmerge.patch(model, method=reducer, r=2, order=5)
    assert not tokenmerge.is_patched(model) and reducer.order == 2
    tokenmerge.patch(model, method=reducer, r=2)  # without options the instance is used as is
    assert model.token_reducer is reducer


@pytest.mark.parametrize("method", [5, torch.nn.Linear(2, 2), None])
def test_a_method_that_is_neither_a_name_nor_a_reducer_is_refused(method):
    with pytest.raises(TypeError, match="method must be a method name"):
        tokenmerge.patch(vit(), method=method, r=2)


@pytest.mark.parametrize("r", [True, False, [2, True], (True, 0.5)])
def test_bool_r_is_refused(r):
    model = vit()
    with pytest.raises(TypeError, match="bool"):
        tokenmerge.patch(model, r=r)
    assert not tokenmerge.is_patched(model)


def test_a_failed_repatch_leaves_the_previous_patch_in_place():
    model = tokenmerge.patch(vit(), method="tome", r=2)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    reducer = model.token_reducer
    with pytest.raises(ValueError, match="lists 5 blocks but the model has 3"):
        tokenmerge.patch(model, method="tcvit", r=[1, 1, 1, 1, 1])  # fails inside the backend
    assert model.token_reducer is reducer and model.tokenmerge_schedule() == (2, 2, 2)
    with torch.no_grad():
        assert torch.equal(model(x), before)
    tokenmerge.unpatch(model)
    assert type(model) is VisionTransformer and not tokenmerge.is_patched(model)


def test_a_failed_dtem_bind_leaves_the_previous_patch_in_place():
    model = tokenmerge.patch(vit(), method="dtem", r=2, embed_dim=16)
    trained = model.token_reducer
    built_for_another_model = DTEM(embed_dim=16, dim=48, depth=3)
    with pytest.raises(ValueError, match="width 48"):
        tokenmerge.patch(model, method=built_for_another_model, r=2)
    assert model.token_reducer is trained and tokenmerge.is_patched(model)
    assert model.tokenmerge_schedule() == (2, 2, 2)


def test_a_torch_compile_wrapper_is_refused_with_the_fix():
    model = vit()
    compiled = torch.compile(model)  # lazy: nothing is compiled until it is called
    with pytest.raises(TypeError, match=r"torch.compile wrapper.*tokenmerge.patch\(compiled._orig_mod"):
        tokenmerge.patch(compiled, r=2)
    tokenmerge.patch(compiled._orig_mod, r=2)
    with pytest.raises(TypeError, match=r"tokenmerge.unpatch\(compiled._orig_mod"):
        tokenmerge.unpatch(compiled)
    assert tokenmerge.is_patched(model)


def _hf_classifier():
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64, num_labels=4)
    model = transformers.ViTForImageClassification._from_config(config).eval()
    return model, "vit", lambda x: model(x).logits


def _open_clip_model():
    open_clip = pytest.importorskip("open_clip")
    vision_cfg = dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16, mlp_ratio=2)
    text_cfg = dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1)
    model = open_clip.CLIP(embed_dim=16, vision_cfg=vision_cfg, text_cfg=text_cfg).eval()
    return model, "visual", model.encode_image


@pytest.mark.parametrize("build", [_hf_classifier, _open_clip_model])
def test_a_trunk_patched_inside_its_wrapper_is_seen_and_unpatched_through_the_wrapper(build):
    torch.manual_seed(0)
    model, trunk_name, run = build()
    trunk_class = type(getattr(model, trunk_name))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = run(x)
        tokenmerge.patch(getattr(model, trunk_name), r=2)  # the wrapper now merges
        assert not torch.equal(run(x), reference)
        assert tokenmerge.is_patched(model)
        tokenmerge.unpatch(model)
        trunk = getattr(model, trunk_name)
        assert type(trunk) is trunk_class and not tokenmerge.is_patched(trunk)
        assert not tokenmerge.is_patched(model)
        assert torch.equal(run(x), reference)
        # The other direction: patching the wrapper patches its trunk, which unpatch restores.
        tokenmerge.patch(model, r=2)
        assert tokenmerge.is_patched(trunk)
        tokenmerge.unpatch(model)
        assert type(trunk) is trunk_class and not tokenmerge.is_patched(model)
