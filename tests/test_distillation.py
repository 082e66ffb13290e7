"""Distillation: the loss against hand-computed values, the frozen teacher, label-free images."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import tokenmerge
from tokenmerge.distillation import (
    check_teacher,
    distillation_loss,
    frozen_copy,
    teacher_logits,
    training_images,
    training_loss,
)

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}

# Row 0: student softmax [1/4, 3/4] (logits [0, ln 3]), teacher [1/2, 1/2], label 1.
# Row 1: student = teacher = logits [1, 2] (KL 0), label 0.
STUDENT = torch.tensor([[0.0, math.log(3.0)], [1.0, 2.0]])
TEACHER = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
LABELS = torch.tensor([1, 0])
# By hand. T=1, row 0: KL = 1/2 ln((1/2)/(1/4)) + 1/2 ln((1/2)/(3/4)) = 1/2 ln(4/3); row 1: 0.
KL_T1 = 0.5 * math.log(4 / 3) / 2  # batch mean
# T=2, row 0: student softmax of [0, ln(3)/2] = [1, sqrt 3] / (1 + sqrt 3), so
# KL = 1/2 ln((1 + sqrt 3) / 2) + 1/2 ln((1 + sqrt 3) / (2 sqrt 3)) = 1/2 ln((1 + sqrt 3)^2 / (4 sqrt 3)).
KL_T2 = 0.5 * math.log((1 + math.sqrt(3)) ** 2 / (4 * math.sqrt(3))) / 2
# Cross-entropy: row 0 -ln(3/4) = ln(4/3); row 1 -ln(e / (e + e^2)) = ln(1 + e).
CE = (math.log(4 / 3) + math.log(1 + math.e)) / 2


def test_distillation_loss_matches_the_hand_computed_kl():
    assert distillation_loss(STUDENT, TEACHER, 1.0).item() == pytest.approx(KL_T1, rel=1e-6)
    # T^2 scaling: at T=2 the KL of the softened distributions, times 4.
    assert distillation_loss(STUDENT, TEACHER, 2.0).item() == pytest.approx(4 * KL_T2, rel=1e-6)
    # KL(teacher || student), not the reverse: the reverse at T=1 differs.
    reverse = 0.5 * (0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5))
    assert abs(KL_T1 - reverse) > 1e-3
    assert distillation_loss(STUDENT, STUDENT, 3.0).item() == pytest.approx(0.0, abs=1e-7)


def test_training_loss_mixes_label_and_distillation_terms():
    assert training_loss(STUDENT, LABELS).item() == pytest.approx(CE, rel=1e-6)
    mixed = training_loss(STUDENT, LABELS, TEACHER, weight=0.25, temperature=2.0)
    assert mixed.item() == pytest.approx(0.75 * CE + 0.25 * 4 * KL_T2, rel=1e-6)
    # Weight 1: soft labels alone; the labels are not read (None, or out-of-range placeholders).
    assert training_loss(STUDENT, None, TEACHER, weight=1.0).item() == pytest.approx(KL_T1, rel=1e-6)
    placeholders = torch.full((2,), -1)
    assert training_loss(STUDENT, placeholders, TEACHER, weight=1.0).item() == pytest.approx(KL_T1, rel=1e-6)


def test_distillation_gradient_matches_the_softmax_difference():
    # d/ds of T^2 KL(p_t || softmax(s/T)) is T (softmax(s/T) - p_t), over the batch size.
    student = STUDENT.clone().requires_grad_(True)
    distillation_loss(student, TEACHER, 2.0).backward()
    expected = 2.0 * (torch.softmax(STUDENT / 2.0, dim=-1) - torch.softmax(TEACHER / 2.0, dim=-1)) / 2
    assert torch.allclose(student.grad, expected, atol=1e-6)
    assert torch.all(student.grad[1] == 0) and torch.all(student.grad[0] != 0)


def test_the_default_teacher_is_a_frozen_unpatched_copy():
    model = timm.create_model("vit_tiny_patch16_224", num_classes=4, **TINY).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(images)
    teacher = frozen_copy(model)
    tokenmerge.patch(model, method="tome", r=3)
    model.train()
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.add_(1.0)  # training the student must not touch the teacher
    assert not tokenmerge.is_patched(teacher) and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    out = teacher_logits(teacher, images)
    assert not out.requires_grad
    assert torch.equal(out, expected)


def test_a_teacher_with_another_class_count_is_refused_naming_both():
    teacher = timm.create_model("vit_tiny_patch16_224", num_classes=5, **TINY).eval()
    with pytest.raises(ValueError, match="teacher predicts 5 classes but the student has 4"):
        check_teacher(teacher, num_classes=4, image_size=(32, 32))
    check_teacher(teacher, num_classes=5, image_size=(32, 32))
    with pytest.raises(ValueError, match="cannot classify the student's 48x48 images"):
        check_teacher(teacher, num_classes=5, image_size=(48, 48))


def _write_images(folder, count):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_a_flat_image_folder_is_training_data_only_without_labels(tmp_path):
    _write_images(tmp_path / "flat", 5)
    (tmp_path / "flat" / "notes.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError, match="--distill-weight 1.0"):
        training_images(tmp_path / "flat", transform=None, labels_needed=True)
    unlabeled = training_images(tmp_path / "flat", transform=None, labels_needed=False)
    assert len(unlabeled) == 5
    image, label = unlabeled[4]
    assert label == -1 and image.size == (8, 8)
    assert len(training_images(tmp_path / "flat", transform=None, limit=2, labels_needed=False)) == 2
    # An ImageFolder keeps its labels even when they are not needed.
    _write_images(tmp_path / "folder" / "a", 2)
    _write_images(tmp_path / "folder" / "b", 2)
    labelled = training_images(tmp_path / "folder", transform=None, labels_needed=False)
    assert [labelled[i][1] for i in range(4)] == [0, 0, 1, 1]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        training_images(tmp_path / "empty", transform=None, labels_needed=False)
