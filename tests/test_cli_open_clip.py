"""open_clip models through the command line: ``open_clip:ARCH`` (a tiny random model config
written as a .json file; nothing downloaded), its own image preprocessing, bench, visualize,
export and dense features, zero-shot eval and tune over --class-names, and the clear refusals."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F

import tokenmerge
from tokenmerge.cli import main
from tokenmerge.evaluation.flops import count_gflops
from tokenmerge.evaluation.inputs import inputs_for
from tokenmerge.io import load_safetensors, save_safetensors
from tokenmerge.models import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

NAME = "tokenmerge-test-tiny-clip"  # the registered config name: the file's stem
# SimpleTokenizer's vocabulary (49408) so that open_clip.get_tokenizer(NAME) works as for ViT-B-32.
CONFIG = {"embed_dim": 16,
          "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16, "mlp_ratio": 2},
          "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
TOKENS = (32 // 8) ** 2 + 1
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
FAST = ["--threads", "1"]


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> str:
    """``open_clip:PATH.json`` of the tiny config."""
    path = tmp_path_factory.mktemp("open_clip") / f"{NAME}.json"
    path.write_text(json.dumps(CONFIG))
    return f"open_clip:{path}"


@pytest.fixture(scope="module")
def checkpoint(spec, tmp_path_factory):
    """A saved state_dict of one random tiny model (so that every load has the same weights)."""
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("open_clip_weights") / "tiny.safetensors"
    save_safetensors(load_model(spec).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def class_names(tmp_path_factory):
    path = tmp_path_factory.mktemp("names") / "names.txt"
    path.write_text("red square\ngreen circle\nblue triangle\n")  # the tiny folder's class0..class2
    return path


def _clip(spec, checkpoint):
    return load_model(spec, checkpoint=checkpoint)


def _png(tiny_image_folder):
    return tiny_image_folder / "class1" / "2.png"


def _clip_transform(mean=OPENAI_MEAN, std=OPENAI_STD, size=32):
    """open_clip's inference preprocessing written out by hand: bicubic shorter side, centre crop,
    OpenAI CLIP statistics."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(size),
        transforms.ToTensor(), transforms.Normalize(mean, std),
    ])


# --- loading -------------------------------------------------------------------------------


def test_open_clip_spec_loads_the_whole_model_with_its_preprocessing(spec, checkpoint, tmp_path):
    model = _clip(spec, checkpoint)
    assert type(model) is open_clip.CLIP and not model.training
    assert model.visual.preprocess_cfg["mean"] == OPENAI_MEAN and model.visual.preprocess_cfg["size"] == (32, 32)
    saved = load_safetensors(checkpoint)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    # An open_clip training checkpoint: {"state_dict": ...} saved from DistributedDataParallel, as .pt.
    wrapped = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in saved.items()}}, wrapped)
    again = load_model(spec, checkpoint=wrapped)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in saved.items())
    # The same architecture by its registered config name.
    assert type(load_model(f"open_clip:{NAME}")) is open_clip.CLIP


def test_open_clip_checkpoints_are_read_safely_and_must_fit(spec, tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    pickled = tmp_path / "code.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "extra": Payload()}, pickled)
    with pytest.raises(ValueError, match="state_dict"):
        load_model(spec, checkpoint=pickled)
    other = tmp_path / "other.safetensors"
    save_safetensors({"visual.conv1.weight": torch.zeros(4, 3, 8, 8)}, other)
    with pytest.raises(ValueError, match=f"does not fit open_clip {NAME}"):
        load_model(spec, checkpoint=other)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_classes=3), "--num-classes: an open_clip model has no classification head"),
    (dict(depth=3), "--model-kwargs are timm.create_model arguments"),
    (dict(pretrained=True), "--pretrained needs open_clip's pretrained tag"),
])
def test_flags_that_do_not_apply_to_open_clip_are_refused(spec, kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_model(spec, **kwargs)


def test_open_clip_names_and_tags_are_checked_offline():
    with pytest.raises(ValueError, match=r"unknown open_clip model 'ViT-B-33'.*ViT-B-32"):
        load_model("open_clip:ViT-B-33")
    with pytest.raises(ValueError, match="its tags: .*laion2b_s34b_b79k"):
        load_model("open_clip:ViT-B-32", pretrained="no_such_tag")
    with pytest.raises(ValueError, match="e.g. --pretrained"):
        load_model("open_clip:ViT-B-32", pretrained=True)
    with pytest.raises(ValueError, match="give an open_clip model config name"):
        load_model("open_clip:hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
    with pytest.raises(ValueError, match="a pretrained tag names open_clip weights"):
        load_model("vit_tiny_patch16_224", pretrained="laion2b_s34b_b79k")


def test_a_pretrained_tag_is_what_open_clip_loads(spec, monkeypatch):
    """The user's path (open_clip downloads the tag's weights), without the network: open_clip's
    create_model is replaced by one that records its arguments."""
    calls = []
    create = open_clip.create_model

    def fake_create_model(name, pretrained=None, pretrained_hf=True, weights_only=True):
        kwargs = dict(pretrained=pretrained, pretrained_hf=pretrained_hf, weights_only=weights_only)
        calls.append((name, kwargs))
        if kwargs["pretrained"] == "laion2b_s34b_b79k":
            return create(NAME, pretrained=None, pretrained_hf=False)
        raise RuntimeError("Failed to download weights for tag 'openai': no network")

    monkeypatch.setattr(open_clip, "create_model", fake_create_model)
    model = load_model("open_clip:ViT-B-32", pretrained="laion2b_s34b_b79k")
    assert type(model) is open_clip.CLIP and not model.training
    assert calls == [("ViT-B-32", {"pretrained": "laion2b_s34b_b79k", "pretrained_hf": False, "weights_only": True})]
    with pytest.raises(ValueError, match="needs network access or a warm Hugging Face cache"):
        load_model("open_clip:ViT-B-32", pretrained="openai")


def test_cli_pretrained_flag_errors(capsys):
    assert main(["bench", "--pretrained", "open_clip:ViT-B-32"]) == 2
    assert "name the model before the flag" in capsys.readouterr().err
    assert main(["eval", "--pretrained", "vit_tiny_patch16_224"]) == 2
    assert "name the model before the flag" in capsys.readouterr().err
    assert main(["bench", "vit_tiny_patch16_224", "--pretrained", "laion2b_s34b_b79k"]) == 2
    assert "for timm give --pretrained alone" in capsys.readouterr().err


def test_timm_trunk_towers_are_refused_by_the_commands(tmp_path, capsys):
    config = {"embed_dim": 16,
              "vision_cfg": {"timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False,
                             "timm_pool": "", "timm_proj": "linear", "image_size": 32},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    path = tmp_path / "tokenmerge-test-timm-tower.json"
    path.write_text(json.dumps(config))
    assert main(["bench", f"open_clip:{path}", "--repeats", "1"]) == 2
    err = capsys.readouterr().err
    assert "its image tower is an open_clip TimmModel" in err and "model.visual.trunk" in err


# --- preprocessing and FLOPs ---------------------------------------------------------------


def test_images_get_open_clips_preprocessing_not_imagenets(spec, checkpoint, tiny_image_folder, tmp_path):
    from PIL import Image

    from tokenmerge.evaluation.data import image_transform

    model = _clip(spec, checkpoint)
    inputs = inputs_for(model)
    picture = Image.open(_png(tiny_image_folder)).convert("RGB")
    x = inputs.load_file(_png(tiny_image_folder))
    assert torch.equal(x, _clip_transform()(picture))
    assert not torch.allclose(x, image_transform(32)(picture), atol=1e-2)  # ImageNet's would differ
    loaded, labels, classes = inputs.load(tiny_image_folder)
    assert torch.equal(loaded[6], x) and classes == ["class0", "class1", "class2"]
    assert inputs.cache_context()["preprocessing"]["mean"] == list(OPENAI_MEAN)
    # A pretrained tag's own statistics (set by open_clip.create_model) are the ones used.
    open_clip.set_model_preprocess_cfg(model, {**model.visual.preprocess_cfg, "mean": (0.5,) * 3, "std": (0.5,) * 3})
    halves = (0.5, 0.5, 0.5)
    assert torch.equal(inputs_for(model).load_file(_png(tiny_image_folder)), _clip_transform(halves, halves)(picture))
    # timm models keep the cache key of earlier versions.
    assert inputs_for(tokenmerge.patch(load_model(), r=0)).cache_context() == {"image_size": 224}


def test_unpatched_tower_flops_count_the_attention(spec, checkpoint):
    """nn.MultiheadAttention's fused inference path has no FLOP formula: the count runs it unfused."""
    model = _clip(spec, checkpoint).visual
    n, c, patches = TOKENS, 32, 16
    block = 2 * n * c * 3 * c + 2 * 2 * n * n * c + 2 * n * c * c + 2 * 2 * n * c * 2 * c
    expected = (2 * patches * 3 * 8 * 8 * c + 2 * block + 2 * c * 16) / 1e9
    x = torch.zeros(1, 3, 32, 32)
    assert count_gflops(model, images=x) == pytest.approx(expected, rel=1e-9)
    assert count_gflops(tokenmerge.patch(model, r=0), images=x) == pytest.approx(expected, rel=1e-9)
    assert torch.backends.mha.get_fastpath_enabled()  # restored


# --- commands without a classifier ---------------------------------------------------------


def test_bench(spec, checkpoint, capsys):
    code = main(["bench", spec, "--checkpoint", str(checkpoint), "--r", "2", "--batch-size", "2", "--warmup", "0",
                 "--repeats", "1", "--json", *FAST])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    rows = {row["variant"]: row for row in result["rows"]}
    assert list(rows) == ["unmodified", "tome 2", "drop 2"] and result["image_size"] == 32
    assert rows["tome 2"]["tokens_per_block"] == rows["drop 2"]["tokens_per_block"] == [17, 15, 13]
    assert rows["drop 2"]["gflops"] < rows["tome 2"]["gflops"] < rows["unmodified"]["gflops"]


def test_visualize(spec, checkpoint, tiny_image_folder, tmp_path, capsys):
    out = tmp_path / "groups.png"
    assert main(["visualize", str(_png(tiny_image_folder)), spec, "--checkpoint", str(checkpoint), "--r", "2",
                 "--out", str(out)]) == 0
    assert "17 tokens -> 13" in capsys.readouterr().out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_export_the_image_encoder_and_the_zero_shot_classifier(spec, checkpoint, class_names, tmp_path, capsys):
    from tokenmerge.export import onnx_session
    from tokenmerge.zero_shot import zero_shot_classifier

    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    encoder = tmp_path / "encoder.onnx"
    assert main(["export", spec, "--checkpoint", str(checkpoint), "--r", "2", "--onnx", str(encoder)]) == 0
    assert "max |embedding difference|" in capsys.readouterr().out
    session = onnx_session(encoder, threads=1)
    assert [o.name for o in session.get_outputs()] == ["embeddings"]
    model = tokenmerge.patch(_clip(spec, checkpoint), r=2)
    with torch.no_grad():
        expected = model.encode_image(x)
    torch.testing.assert_close(torch.from_numpy(session.run(None, {"images": x.numpy()})[0]), expected,
                               rtol=1e-4, atol=1e-5)
    classifier = tmp_path / "zero_shot.onnx"
    assert main(["export", spec, "--checkpoint", str(checkpoint), "--r", "2", "--class-names", str(class_names),
                 "--onnx", str(classifier)]) == 0
    assert "top-1 agreement 100%" in capsys.readouterr().out
    session = onnx_session(classifier, threads=1)
    assert [o.name for o in session.get_outputs()] == ["logits"]
    names = class_names.read_text().split("\n")[:3]
    with torch.no_grad():
        expected = zero_shot_classifier(model, names, open_clip.get_tokenizer(NAME))(x)
    torch.testing.assert_close(torch.from_numpy(session.run(None, {"images": x.numpy()})[0]), expected,
                               rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_dense_features(spec, checkpoint):
    model = _clip(spec, checkpoint)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    unmerged = tokenmerge.dense_features(model, x, output="map")
    assert unmerged.shape == (2, 32, 4, 4)
    tokenmerge.patch(model, r=3, trace_source=True)
    merged = tokenmerge.dense_features(model, x, output="map")
    assert merged.shape == unmerged.shape and torch.isfinite(merged).all() and not torch.equal(merged, unmerged)
    tokenmerge.patch(model, r=0)
    assert torch.equal(tokenmerge.dense_features(model, x, output="map"), unmerged)


# --- zero-shot accuracy: eval, tune; train refused -----------------------------------------


def test_eval_is_zero_shot_over_the_class_names(spec, checkpoint, class_names, tiny_image_folder, tmp_path):
    from torchvision import datasets

    out = tmp_path / "eval"
    code = main(["eval", spec, "--checkpoint", str(checkpoint), "--data", str(tiny_image_folder),
                 "--class-names", str(class_names), "--methods", "tome", "--r", "0", "2",
                 "--out", str(out), "--no-timing", *FAST])
    assert code == 0
    data = json.loads((out / "results.json").read_text())
    unmodified, tome0, tome2 = data["rows"]
    assert data["meta"]["class_names"] == str(class_names) and data["meta"]["num_images"] == 12
    assert (tome2["tokens_in"], tome2["tokens_out"]) == (17, 13) and tome2["gflops"] < unmodified["gflops"]
    assert tome0["accuracy"] == unmodified["accuracy"]
    # By hand: open_clip's preprocessing, encode_image / encode_text, CLIP's prompt.
    model = _clip(spec, checkpoint)
    dataset = datasets.ImageFolder(str(tiny_image_folder), transform=_clip_transform())
    images, labels = next(iter(torch.utils.data.DataLoader(dataset, batch_size=len(dataset))))
    prompts = [f"a photo of a {name}." for name in ["red square", "green circle", "blue triangle"]]
    with torch.no_grad():
        text = F.normalize(model.encode_text(open_clip.get_tokenizer(NAME)(prompts)), dim=-1)
        logits = model.logit_scale.exp() * F.normalize(model.encode_image(images), dim=-1) @ text.T
    accuracy = 100.0 * (logits.argmax(-1) == labels).double().mean().item()
    assert unmodified["accuracy"] == pytest.approx(accuracy)


def test_eval_caches_by_class_names_and_prompts(spec, checkpoint, class_names, tiny_image_folder, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["eval", spec, "--checkpoint", str(checkpoint), "--data", str(tiny_image_folder), "--class-names",
            str(class_names), "--methods", "tome", "--r", "2", "--out", str(out), "--no-timing", *FAST]
    assert main(args) == 0
    assert main(args) == 0
    assert "2 rows cached" in capsys.readouterr().out
    assert main(args + ["--prompt-template", "a blurry photo of a {}."]) == 0
    assert "2 rows cached" in capsys.readouterr().out  # other prompts: other class embeddings, new rows
    assert len((out / "cache.jsonl").read_text().splitlines()) == 4


def test_accuracy_commands_need_fitting_class_names(spec, class_names, tiny_image_folder, tmp_path, capsys):
    base = ["--data", str(tiny_image_folder), "--out", str(tmp_path / "o")]
    assert main(["eval", spec, *base, "--no-timing"]) == 2
    assert "has no classification head: accuracy is zero-shot" in capsys.readouterr().err
    assert main(["tune", spec, *base, "--gflops-fraction", "0.8"]) == 2
    assert "--class-names FILE" in capsys.readouterr().err
    two = tmp_path / "two.txt"
    two.write_text("a\nb\n")
    assert main(["eval", spec, *base, "--class-names", str(two), "--no-timing"]) == 2
    assert "has 2 names but the data folder has 3 classes" in capsys.readouterr().err
    assert main(["eval", spec, *base, "--prompt-template", "a {} photo", "--no-timing"]) == 2
    assert "--prompt-template needs --class-names" in capsys.readouterr().err
    assert main(["eval", spec, *base, "--class-names", str(class_names), "--prompt-template", "a photo",
                 "--no-timing"]) == 2
    assert "has no {} for the class name" in capsys.readouterr().err
    assert main(["eval", "vit_tiny_patch16_224", *base, "--class-names", str(class_names), "--no-timing"]) == 2
    assert "has its own classification head: leave them out" in capsys.readouterr().err
    assert main(["train", spec, "--data", str(tiny_image_folder), "--out", str(tmp_path / "t")]) == 2
    assert "has no classification head (it is evaluated zero-shot" in capsys.readouterr().err


def test_tune_searches_the_zero_shot_classifier(spec, checkpoint, class_names, tiny_image_folder, tmp_path, capsys):
    out = tmp_path / "tune"
    code = main(["tune", spec, "--checkpoint", str(checkpoint), "--data", str(tiny_image_folder),
                 "--class-names", str(class_names), "--gflops-fraction", "0.85", "--methods", "tome",
                 "--rounds", "1", "--batch-size", "6", "--probe-images", "6", "--no-timing", "--no-option-search",
                 "--out", str(out), *FAST])
    assert code == 0 and "best:" in capsys.readouterr().out
    config = json.loads((out / "best.json").read_text())
    # best.json patches the open_clip model itself, within the budget of its counted GFLOPs.
    x = torch.zeros(1, 3, 32, 32)
    base = count_gflops(_clip(spec, checkpoint).visual, images=x)
    merged = tokenmerge.patch(_clip(spec, checkpoint), **config)
    assert sum(config["r"]) > 0 and count_gflops(merged.visual, images=x) <= 0.85 * base * (1 + 1e-9)
