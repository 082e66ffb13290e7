"""Knowledge distillation for the trainer: the loss, the frozen teacher, label-free images.

A ViT that merges tokens is trained to behave like the ViT that does not (TC-ViT reports
its -50% FLOPs "without accuracy degradation" with distillation; DeiT popularised it for
ViTs). The loss mixes the label loss with the teacher's softened distribution::

    loss = (1 - w) * CE(student, labels) + w * T^2 * KL(softmax(teacher / T) || softmax(student / T))

``T^2`` keeps the soft term's gradient on the scale of the label term's as ``T`` grows
(Hinton et al., 2015). With ``w = 1`` the labels are not used at all, so a folder of
unlabeled images is enough (:func:`training_images`).

The teacher is the unmodified model (a frozen copy made before patching, so it never
merges), another timm checkpoint or a Hugging Face classifier folder (``hf:DIR``); it runs
in eval mode without gradients, and it is never saved with the student (it is frozen): the
trainer records its weights' fingerprint instead, so a resume with another teacher is
refused.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .mixing import Mix, mixed_cross_entropy

__all__ = [
    "distillation_loss",
    "training_loss",
    "frozen_copy",
    "load_teacher",
    "check_teacher",
    "teacher_logits",
    "UnlabeledImages",
    "training_images",
]


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch.

    Args:
        student_logits, teacher_logits: ``[B, K]``.
        temperature: ``T > 0``.
    """
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(student, teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def training_loss(
    student_logits: torch.Tensor,
    labels: Optional[torch.Tensor],
    teacher_logits: Optional[torch.Tensor] = None,
    weight: float = 0.0,
    temperature: float = 1.0,
    mix: Optional[Mix] = None,
) -> torch.Tensor:
    """Cross-entropy on the labels, mixed with distillation when a teacher is given.

    Args:
        student_logits: ``[B, K]``.
        labels: ``[B]`` class indices; ignored (may be ``None``) when ``weight == 1``.
        teacher_logits: ``[B, K]`` or ``None`` (plain cross-entropy).
        weight: ``w`` in ``[0, 1]``, the share of the distillation term.
        temperature: ``T > 0``.
        mix: how the batch was mixed (:func:`tokenmerge.mixing.mix_batch`): the label term
            is then the mixed labels' cross-entropy; the teacher saw the mixed inputs too.
    """
    if teacher_logits is None:
        return mixed_cross_entropy(student_logits, labels, mix)
    soft = distillation_loss(student_logits, teacher_logits, temperature)
    if weight == 1.0:
        # Not multiplied by zero but skipped: the labels may be placeholders.
        return soft
    return (1.0 - weight) * mixed_cross_entropy(student_logits, labels, mix) + weight * soft


def frozen_copy(model: nn.Module) -> nn.Module:
    """An independent, frozen, eval-mode copy (the default teacher: the model before patching)."""
    return _freeze(copy.deepcopy(model))


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def load_teacher(checkpoint, architecture: str, model_kwargs: Optional[dict] = None) -> nn.Module:
    """A frozen teacher from a local checkpoint of a timm ``architecture``, or from a Hugging
    Face classifier folder when ``checkpoint`` is ``"hf:DIR"`` (``architecture`` unused).

    Raises a clear error when the checkpoint does not fit the architecture (the fix is
    ``--teacher-model``, the timm name the checkpoint was trained as).
    """
    from .models import HF_PREFIX, load_model

    if str(checkpoint).startswith(HF_PREFIX):
        return _freeze(load_model(str(checkpoint)))
    if architecture.startswith(HF_PREFIX):
        # The student is a Hugging Face folder: a state_dict alone names no architecture.
        raise ValueError(
            f"--teacher {checkpoint} is a checkpoint file, which a Hugging Face student ({architecture}) "
            f"cannot describe: pass the teacher as a folder, --teacher {HF_PREFIX}DIR (written by "
            "save_pretrained), or name its timm architecture with --teacher-model NAME"
        )
    try:
        teacher = load_model(architecture, checkpoint=checkpoint, **(model_kwargs or {}))
    except ValueError as err:
        raise ValueError(
            f"--teacher {checkpoint} cannot be loaded as a {architecture!r} teacher: pass --teacher-model "
            f"NAME, the timm architecture this checkpoint was trained as ({err})"
        ) from None
    return _freeze(teacher)


def check_teacher(teacher: nn.Module, num_classes: int, image_size: Optional[tuple] = None,
                  input_shape: Optional[tuple] = None, what: str = "inputs") -> None:
    """Run the teacher once on a blank batch of the student's input size and compare its
    class count with the student's: a mismatch fails here, before training starts.

    ``image_size`` ``(H, W)`` for an image student; for other modalities ``input_shape``, one
    example's shape (e.g. ``(frames, mel bins)`` of a spectrogram), and ``what`` it is.
    """
    from .backends.adapter import logits_of

    if (image_size is None) == (input_shape is None):
        raise TypeError("pass the student's image_size or its input_shape (one of them)")
    if image_size is not None:
        input_shape, what = (3, *image_size), "images"
        described = f"{image_size[0]}x{image_size[1]} images"
    else:
        described = f"{'x'.join(str(n) for n in input_shape)} {what}"
    probe = torch.zeros(1, *input_shape, device=next(teacher.parameters()).device)
    try:
        with torch.no_grad():
            out = logits_of(teacher(probe))
    except Exception as err:  # any failure here is a teacher/student mismatch
        raise ValueError(
            f"the teacher cannot classify the student's {described} ({err}); "
            "pass a teacher (--teacher, --teacher-model) trained at the student's input size"
        ) from None
    if out.ndim != 2 or out.shape[1] != num_classes:
        found = out.shape[1] if out.ndim == 2 else f"output shape {tuple(out.shape)}"
        raise ValueError(
            f"the teacher predicts {found} classes but the student has {num_classes}: "
            "distillation needs a teacher trained on the same classes (pass --teacher with a "
            f"{num_classes}-class checkpoint, or drop --teacher to use the unmodified student)"
        )


def teacher_logits(teacher: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The teacher's logits, without gradients (it stays in eval mode: no dropout)."""
    from .backends.adapter import logits_of

    with torch.no_grad():
        return logits_of(teacher(images)).float()


class UnlabeledImages(torch.utils.data.Dataset):
    """The images directly inside a folder (sorted), each with the placeholder label ``-1``.

    For distillation-only training (``w = 1``), where the teacher provides the targets.
    """

    def __init__(self, root, transform=None):
        from torchvision.datasets.folder import IMG_EXTENSIONS

        self.root = Path(root)
        self.paths = sorted(p for p in self.root.iterdir() if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
        self.transform = transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        from .evaluation.data import _checked_loader

        image = _checked_loader(str(self.paths[index]))
        return (self.transform(image) if self.transform else image), -1


def _has_class_folders(root: Path) -> bool:
    return any(p.is_dir() for p in root.iterdir())


def training_images(root, transform, limit: Optional[int] = None, labels_needed: bool = True):
    """The training set: an ImageFolder (class sub-folders), or, when labels are not needed
    (distillation weight 1), also a flat folder of images.

    ``limit`` keeps evenly spaced images, so that a subset of a class-sorted folder covers
    every class.
    """
    from .evaluation.data import image_folder

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"training data {str(root)!r} does not exist: pass --data DIR (an ImageFolder: one "
            "sub-folder of images per class)"
        )
    if labels_needed or _has_class_folders(root):
        if not _has_class_folders(root):
            raise FileNotFoundError(
                f"{str(root)!r} has no class sub-folders, so it has no labels: use an ImageFolder "
                "(one sub-folder of images per class), or train on the teacher's soft labels alone "
                "with --distill --distill-weight 1.0"
            )
        return image_folder(root, limit=limit, transform=transform, spread=True)
    dataset = UnlabeledImages(root, transform)
    if len(dataset) == 0:
        raise FileNotFoundError(f"{str(root)!r} holds no images (and no class sub-folders)")
    if limit is not None and limit < len(dataset):
        dataset = torch.utils.data.Subset(dataset, [i * len(dataset) // limit for i in range(limit)])
    return dataset
