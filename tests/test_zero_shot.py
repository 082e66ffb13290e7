"""tokenmerge.zero_shot: an open_clip model as a zero-shot classifier (the logits CLIP is
evaluated with), patched through its image tower; class-name files and prompt templates.
Tiny random open_clip models, a toy tokenizer; nothing downloaded."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
import torch.nn.functional as F

import tokenmerge
from tokenmerge.backends.adapter import adapter_for
from tokenmerge.zero_shot import ZeroShotClassifier, check_templates, read_class_names, zero_shot_classifier

from .conftest import staged_logits

pytestmark = pytest.mark.usefixtures("one_thread")

CONTEXT, VOCAB = 8, 64
CLASSES = ["cat", "dog", "car"]


def tiny_clip(**kwargs) -> open_clip.CLIP:
    torch.manual_seed(0)
    vision_cfg = dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16, mlp_ratio=2)
    text_cfg = dict(context_length=CONTEXT, vocab_size=VOCAB, width=32, heads=2, layers=1)
    return open_clip.CLIP(embed_dim=16, vision_cfg=vision_cfg, text_cfg=text_cfg, **kwargs).eval()


def toy_tokenizer(texts) -> torch.Tensor:
    """Characters -> ids below the tiny vocabulary, padded to the context; the last id is the
    largest, where CLIP's argmax pooling reads the text embedding."""
    ids = torch.zeros(len(texts), CONTEXT, dtype=torch.long)
    for row, text in enumerate(texts):
        codes = [1 + ord(c) % (VOCAB - 2) for c in text][:CONTEXT - 1] + [VOCAB - 1]
        ids[row, :len(codes)] = torch.tensor(codes)
    return ids


def images(batch=4):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def test_logits_are_clips_scaled_cosine_to_the_averaged_prompt_embeddings():
    model = tiny_clip()
    templates = ["a photo of a {}.", "a drawing of a {}."]
    classifier = zero_shot_classifier(model, CLASSES, toy_tokenizer, templates)
    x = images()
    # By hand: each class's normalised text embeddings averaged over templates, renormalised.
    per_class = []
    for name in CLASSES:
        texts = F.normalize(model.encode_text(toy_tokenizer([t.format(name) for t in templates])), dim=-1)
        per_class.append(F.normalize(texts.mean(0), dim=-1))
    text = torch.stack(per_class)
    expected = model.logit_scale.exp() * F.normalize(model.encode_image(x), dim=-1) @ text.T
    logits = classifier(x)
    assert logits.shape == (4, 3)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert classifier.num_classes == 3 and classifier.class_names == CLASSES
    # One template: its prompts alone.
    single = zero_shot_classifier(model, CLASSES, toy_tokenizer)
    prompts = F.normalize(model.encode_text(toy_tokenizer([f"a photo of a {c}." for c in CLASSES])), dim=-1)
    torch.testing.assert_close(single.text_features, prompts, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_a_logit_bias_is_added_as_open_clip_does():
    model = tiny_clip(init_logit_bias=-3.0)
    classifier = ZeroShotClassifier(model, torch.randn(3, 16))
    x = images(2)
    expected = model.logit_scale.exp() * F.normalize(model.encode_image(x), dim=-1) @ classifier.text_features.T - 3.0
    torch.testing.assert_close(classifier(x), expected)


@torch.no_grad()
def test_patching_merges_the_image_tower_and_r0_is_bit_identical():
    classifier = zero_shot_classifier(tiny_clip(), CLASSES, toy_tokenizer)
    text_features = classifier.text_features.clone()
    x = images()
    reference = classifier(x)
    tokenmerge.patch(classifier, r=0)
    assert torch.equal(classifier(x), reference)
    tokenmerge.patch(classifier, r=3)
    adapter = adapter_for(classifier)
    assert tokenmerge.is_patched(classifier) and adapter.family == "open_clip"
    assert adapter.owner is classifier.clip.visual
    assert type(classifier.clip.visual).__name__ == "TokenMergeVisionTransformer"
    assert adapter.num_classes == 3 and adapter.tokens_per_block() == [17, 14, 11]
    merged = classifier(x)
    assert merged.shape == reference.shape and not torch.allclose(merged, reference, atol=1e-4)
    # The staged pieces tune runs (embedding, blocks on a TokenState, adapter.logits) give the forward.
    torch.testing.assert_close(staged_logits(adapter, x), merged, rtol=1e-5, atol=1e-5)
    assert torch.equal(classifier.text_features, text_features)  # the text side is fixed
    tokenmerge.unpatch(classifier)
    assert not tokenmerge.is_patched(classifier) and torch.equal(classifier(x), reference)


def test_state_dict_holds_the_model_once_and_the_class_embeddings():
    classifier = zero_shot_classifier(tiny_clip(), CLASSES, toy_tokenizer)
    keys = set(classifier.state_dict())
    assert "text_features" in keys and "clip.visual.conv1.weight" in keys
    assert not any(key.startswith("visual.") for key in keys)  # .visual is a view, not a second copy


def test_unpatched_adapter_logits_need_the_wrapper():
    model = tokenmerge.patch(tiny_clip(), r=2)
    with pytest.raises(TypeError, match="zero_shot_classifier"):
        adapter_for(model).logits(adapter_for(model).initial_state(images(1)))


def test_class_names_from_lines_or_a_folder_mapping(tmp_path):
    folders = ["n01", "n02", "n03"]
    lines = tmp_path / "names.txt"
    lines.write_text("tench\n\nEnglish springer\ncassette player\n")
    assert read_class_names(lines, folders) == ["tench", "English springer", "cassette player"]
    assert read_class_names(lines) == ["tench", "English springer", "cassette player"]
    mapping = tmp_path / "names.json"
    mapping.write_text(json.dumps({"n03": "cassette player", "n01": "tench", "n02": "English springer"}))
    assert read_class_names(mapping, folders) == ["tench", "English springer", "cassette player"]
    assert read_class_names(mapping) == ["tench", "English springer", "cassette player"]  # sorted folders


def test_class_names_files_with_a_byte_order_mark(tmp_path):
    # Some editors (Notepad) start UTF-8 files with a byte-order mark.
    lines = tmp_path / "names.txt"
    lines.write_text("\ufefftench\nEnglish springer\n", encoding="utf-8")
    assert read_class_names(lines, ["n01", "n02"]) == ["tench", "English springer"]
    mapping = tmp_path / "names.json"
    mapping.write_text("\ufeff" + json.dumps({"n02": "English springer", "n01": "tench"}), encoding="utf-8")
    assert read_class_names(mapping, ["n01", "n02"]) == ["tench", "English springer"]


@pytest.mark.parametrize("text, folders, message", [
    ("a\nb\n", ["x", "y", "z"], "has 2 names but the data folder has 3 classes (x, y, z)"),
    ("\n \n", None, "holds no names"),
    ('{"x": "a", "y": "b"}', ["x", "y", "z"], "no name for folders z"),
    ('{"x": "a", "y": "b", "w": "c"}', ["x", "y"], "names folders the data does not have: w"),
    ('{"x": 1}', None, "with a string per folder"),
    ('{"x": ', None, "is not valid JSON"),
])
def test_class_name_errors_name_the_problem(tmp_path, text, folders, message):
    path = tmp_path / "names.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_class_names(path, folders)


def test_missing_class_names_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_class_names(tmp_path / "nowhere.txt")


@pytest.mark.parametrize("template, message", [
    ("a photo", "has no {} for the class name"),
    ("a {name}", "is not a format string"),
    ("a {} {}", "is not a format string"),
])
def test_bad_templates_are_refused(template, message):
    with pytest.raises(ValueError, match=message.replace("{}", r"\{\}")):
        check_templates([template])
    with pytest.raises(ValueError, match="at least one prompt template"):
        check_templates([])
