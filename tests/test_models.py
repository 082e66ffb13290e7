"""tokenmerge.models: model files are read as data, and a damaged one is named."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from tokenmerge.models import load_checkpoint, load_model

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


class OpensAFile:
    """Unpickling this creates ``path``: the side effect a malicious model file would have."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def state():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", num_classes=3, **TINY).state_dict()


def test_pth_and_safetensors_load_the_same_weights(state, tmp_path):
    torch.save({"model": state}, tmp_path / "wrapped.pth")
    save_file(state, str(tmp_path / "plain.safetensors"))
    for name in ("wrapped.pth", "plain.safetensors"):
        model = load_model("vit_tiny_patch16_224", checkpoint=tmp_path / name, **TINY)
        assert model.num_classes == 3
        assert torch.equal(model.state_dict()["head.weight"], state["head.weight"])


def test_a_checkpoint_of_another_depth_names_the_depth_to_pass(state, tmp_path):
    save_file(state, str(tmp_path / "shallow.safetensors"))
    deeper = {**TINY, "depth": TINY["depth"] + 2}
    with pytest.raises(ValueError, match=rf"has {TINY['depth']} blocks but .* builds {deeper['depth']}: "
                                         rf"pass depth={TINY['depth']} \(CLI: --model-kwargs"):
        load_model("vit_tiny_patch16_224", checkpoint=tmp_path / "shallow.safetensors", **deeper)
    assert len(load_model("vit_tiny_patch16_224", checkpoint=tmp_path / "shallow.safetensors", **TINY).blocks) == 2


def test_a_pth_with_pickled_objects_is_refused_without_running_them(state, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": state, "extra": OpensAFile(marker)}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match=r"evil\.pth.*pickled Python object.*state_dict"):
        load_model("vit_tiny_patch16_224", checkpoint=tmp_path / "evil.pth", **TINY)
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_model_files_are_named(state, tmp_path, suffix):
    whole = tmp_path / f"whole{suffix}"
    if suffix == ".pth":
        torch.save(state, whole)
    else:
        save_file(state, str(whole))
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"checkpoint '.*cut{suffix}' cannot be read: it is corrupt, truncated"):
        load_checkpoint(cut)


def test_a_pth_without_a_state_dict_is_refused(tmp_path):
    torch.save([torch.ones(2)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match=r"list\.pth.*does not hold a state_dict"):
        load_checkpoint(tmp_path / "list.pth")


# --- Hugging Face folders: hf:DIR ------------------------------------------------------------


def test_hf_folder_loads_the_saved_class_and_weights(hf_vit_dir):
    from .conftest import tiny_hf_vit

    model = load_model(f"hf:{hf_vit_dir}")
    saved = tiny_hf_vit()
    assert type(model) is type(saved) and not model.training
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(model(x).logits, saved(x).logits)


def test_hf_folder_of_a_trunk_loads_the_trunk(tmp_path):
    import transformers

    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=64, image_size=32, patch_size=8)
    transformers.ViTModel(config).save_pretrained(tmp_path)
    assert type(load_model(f"hf:{tmp_path}")) is transformers.ViTModel


def test_hf_folder_errors_name_the_problem(hf_vit_dir, tmp_path):
    import transformers

    with pytest.raises(FileNotFoundError, match=r"'.*nowhere' does not exist.*save_pretrained"):
        load_model(f"hf:{tmp_path / 'nowhere'}")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(f"hf:{tmp_path}")
    masked = tmp_path / "masked"
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=64, image_size=32, patch_size=8)
    transformers.ViTForMaskedImageModeling(config).save_pretrained(masked)
    with pytest.raises(ValueError, match=r"ViTForMaskedImageModeling, which tokenmerge does not support.*ViTModel"):
        load_model(f"hf:{masked}")
    with pytest.raises(ValueError, match="--num-classes 7 does not match.*3 classes"):
        load_model(f"hf:{hf_vit_dir}", num_classes=7)
    with pytest.raises(ValueError, match="--checkpoint describe timm models"):
        load_model(f"hf:{hf_vit_dir}", checkpoint=tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="--model-kwargs describe timm models"):
        load_model(f"hf:{hf_vit_dir}", depth=6)


def test_weights_bring_their_image_statistics_to_the_commands(monkeypatch, tmp_path, hf_vit_dir):
    import shutil

    from tokenmerge.backends.adapter import adapter_for
    from tokenmerge.evaluation.data import IMAGENET_MEAN

    # The embedded and locally trained checkpoints were trained on ImageNet statistics.
    assert adapter_for(load_model()).image_preprocessing()["mean"] == list(IMAGENET_MEAN)
    # timm's pretrained weights carry theirs (AugReg ViTs: 0.5); offline, stand in for the
    # download by building the same model without it.
    create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda name, pretrained=False, **kw: create(name, **kw))
    pretrained = load_model("vit_tiny_patch16_224", pretrained=True, num_classes=3)
    settings = adapter_for(pretrained).image_preprocessing()
    assert settings["mean"] == [0.5] * 3 and settings["std"] == [0.5] * 3
    # A Hugging Face folder's preprocessor config, where it has one.
    folder = tmp_path / "hf"
    shutil.copytree(hf_vit_dir, folder)
    assert adapter_for(load_model(f"hf:{folder}")).image_preprocessing()["mean"] == list(IMAGENET_MEAN)
    (folder / "preprocessor_config.json").write_text('{"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.2, 0.2]}')
    settings = adapter_for(load_model(f"hf:{folder}")).image_preprocessing()
    assert settings["mean"] == pytest.approx([0.5, 0.4, 0.3]) and settings["std"] == pytest.approx([0.2] * 3)
