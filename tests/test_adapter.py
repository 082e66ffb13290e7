"""tokenmerge.backends.adapter: one adapter per model family, the same answers from each."""

from __future__ import annotations

import pytest
import torch
import transformers
from timm.models.vision_transformer import VisionTransformer

import tokenmerge
from tokenmerge.backends.adapter import adapter_for, logits_of
from tokenmerge.methods.base import TokenState

from .conftest import staged_logits, tiny_hf_vit

VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)


pytestmark = pytest.mark.usefixtures("one_thread")


def _timm_vit():
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3).eval()


def _deit_teacher():
    torch.manual_seed(0)
    config = transformers.DeiTConfig(**VISION, intermediate_size=64, num_labels=3)
    return transformers.DeiTForImageClassificationWithTeacher(config).eval()


def _dinov2_registers():
    torch.manual_seed(0)
    config = transformers.Dinov2WithRegistersConfig(**VISION, mlp_ratio=2, num_labels=3, num_register_tokens=2)
    return transformers.Dinov2WithRegistersForImageClassification(config).eval()


def _clip_classifier():
    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=100, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    config = transformers.CLIPConfig(vision_config=dict(**VISION, intermediate_size=64), text_config=text,
                                     projection_dim=16, num_labels=3)
    return transformers.CLIPForImageClassification(config).eval()


# name -> (builder, family, prefix tokens)
MODELS = {
    "timm-vit": (_timm_vit, "timm", 1),
    "hf-vit": (tiny_hf_vit, "transformers", 1),
    "hf-deit-teacher": (_deit_teacher, "transformers", 2),
    "hf-dinov2-registers": (_dinov2_registers, "transformers", 3),
    "hf-clip-classifier": (_clip_classifier, "transformers", 1),
}


def _images(batch=2, size=32):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("name", list(MODELS))
def test_every_family_reports_the_same_geometry(name):
    build, family, prefix = MODELS[name]
    adapter = adapter_for(build())
    assert adapter.family == family
    assert adapter.num_prefix_tokens == prefix
    assert adapter.image_size == 32 and adapter.patch_size == (8, 8)
    assert adapter.num_patches == 16 and adapter.num_tokens == 16 + prefix
    assert adapter.num_blocks == 2 and len(adapter.merging_blocks()) == 2
    assert adapter.grid(32, 32) == (4, 4) and adapter.grid(48, 64) == (6, 8)


@pytest.mark.parametrize("name", list(MODELS))
def test_embed_blocks_and_logits_reproduce_the_model(name):
    model = MODELS[name][0]()
    x = _images()
    with torch.inference_mode():
        unmodified = logits_of(model(x))
        tokenmerge.patch(model, "tome", r=0)
        assert torch.equal(staged_logits(adapter_for(model), x), unmodified)  # r=0: bit for bit
        tokenmerge.patch(model, "tome", r=3)
        merged = logits_of(model(x))
        staged = staged_logits(adapter_for(model), x)
    torch.testing.assert_close(staged, merged, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(merged, unmodified, rtol=1e-3, atol=1e-4)  # merging changed the logits


@pytest.mark.parametrize("name", list(MODELS))
def test_every_family_refuses_merging_its_prefix_tokens_the_same_way(name):
    build, _, prefix = MODELS[name]
    model = build()
    x = _images()
    with torch.inference_mode():
        unmodified = logits_of(model(x))
    with pytest.raises(ValueError, match=rf"num_protected={prefix - 1}: this model has {prefix} prefix token.*"
                                         rf"reads by position.*default \({prefix}\).*layout='local'"):
        tokenmerge.patch(model, r=2, num_protected=prefix - 1)
    assert not tokenmerge.is_patched(model)
    with torch.inference_mode():  # nothing merges at r=0: the model is the unmodified one
        assert torch.equal(logits_of(tokenmerge.patch(model, r=0, num_protected=0)(x)), unmodified)
    # The local layout puts every token back in its slot after each block, so the head still
    # finds the prefix tokens where it reads them.
    tokenmerge.patch(model, r=2, num_protected=prefix - 1, layout="local")
    assert adapter_for(model).tokens_per_block() == [16 + prefix] * 3
    with torch.inference_mode():
        assert logits_of(model(x)).shape == unmodified.shape


@pytest.mark.parametrize("name", ["timm-vit", "hf-vit"])
def test_patch_state_through_the_adapter(name):
    model = MODELS[name][0]()
    adapter = adapter_for(model)
    assert not adapter.is_patched
    with pytest.raises(ValueError, match=r"not patched: call tokenmerge\.patch"):
        adapter.tokens_per_block()
    tokenmerge.patch(model, "tome", r=2)
    assert adapter.is_patched
    assert adapter.schedule() == (2, 2) and adapter.tokens_per_block() == [17, 15, 13]
    assert adapter.reducer.name == "tome" and adapter.config.num_protected == 1
    tokenmerge.unpatch(model)
    assert not adapter.is_patched and not tokenmerge.is_patched(model)


def test_unsupported_family_names_the_module_and_what_is_supported():
    with pytest.raises(TypeError) as error:
        adapter_for(torch.nn.Linear(3, 3))
    message = str(error.value)
    assert "torch.nn.modules.linear.Linear" in message
    assert "timm VisionTransformer" in message and "Hugging Face ViT/DeiT/CLIP/DINOv2" in message


def test_image_sizes_each_family_accepts():
    for model in (_timm_vit(), tiny_hf_vit()):
        adapter = adapter_for(model)
        adapter.check_image_size(32)
        with pytest.raises(ValueError, match="built for 32x32 images"):
            adapter.check_image_size(48)
    adapter_for(_dinov2_registers()).check_image_size(48)  # DINOv2 interpolates its positions


def test_a_model_without_head_gives_no_logits():
    trunk = transformers.ViTModel(transformers.ViTConfig(**VISION, intermediate_size=64)).eval()
    tokenmerge.patch(trunk, "tome", r=2)
    adapter = adapter_for(trunk)
    with torch.inference_mode():
        state = TokenState(adapter.embed(_images()))
    with pytest.raises(TypeError, match="ViTModel has no classification head"):
        adapter.logits(state)


def test_logits_of_reads_tensors_and_hf_outputs():
    logits = torch.randn(2, 3)
    assert logits_of(logits) is logits
    assert logits_of(transformers.modeling_outputs.ImageClassifierOutput(logits=logits)) is logits
    with pytest.raises(TypeError, match="returns logits"):
        logits_of(transformers.modeling_outputs.BaseModelOutput(last_hidden_state=logits))
