"""Zero-shot classification with an open_clip model: how CLIP is evaluated, and how the
commands that report accuracy (``eval``, ``tune``) treat a model without a classification head.

Each class name is put into prompt templates (by default ``"a photo of a {}."``), encoded once
by the model's text tower (never merged) with the model's tokenizer, and the class embedding
is the normalised mean of its templates' normalised text embeddings (open_clip's
``build_zero_shot_classifier``). An image's logits are then its normalised embedding against
the class embeddings, scaled as the model was trained::

    logits = logit_scale.exp() * normalize(encode_image(images)) @ normalize(text_features).T
             (+ logit_bias, for models trained with a sigmoid loss)

:class:`ZeroShotClassifier` holds the open_clip model and the class embeddings (a buffer, so
the weights fingerprint of ``eval``'s result cache changes with the class names and templates),
and maps images to logits: ``tokenmerge.patch`` on it patches the image tower (the open_clip
backend recognises it), and every command that needs logits runs it as any classifier.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DEFAULT_TEMPLATE", "ZeroShotClassifier", "zero_shot_classifier", "read_class_names", "check_templates"]

DEFAULT_TEMPLATE = "a photo of a {}."  # CLIP's standard prompt (Radford et al., 2021)


class ZeroShotClassifier(nn.Module):
    """An open_clip model as a classifier over fixed class embeddings.

    Args:
        clip: an open_clip ``CLIP``, ``CustomTextCLIP`` or ``CoCa`` (anything with
            ``encode_image`` and ``logit_scale``).
        text_features: ``[classes, D]`` class embeddings (normalised here).
        class_names: the names, in class order (kept for messages and records).
    """

    def __init__(self, clip: nn.Module, text_features: torch.Tensor, class_names: Optional[Sequence[str]] = None):
        super().__init__()
        if text_features.ndim != 2:
            raise ValueError(f"text_features must be [classes, D], got shape {tuple(text_features.shape)}")
        self.clip = clip
        self.register_buffer("text_features", F.normalize(text_features.detach().float(), dim=-1))
        self.class_names = list(class_names) if class_names is not None else None

    @property
    def visual(self) -> nn.Module:
        """The image tower (not registered again: the state_dict keeps ``clip.visual.*`` only)."""
        return self.clip.visual

    @property
    def num_classes(self) -> int:
        return int(self.text_features.shape[0])

    def classify(self, image_features: torch.Tensor) -> torch.Tensor:
        """Image embeddings ``[B, D]`` (not normalised) -> logits ``[B, classes]``."""
        image_features = F.normalize(image_features, dim=-1)
        logits = self.clip.logit_scale.exp() * image_features @ self.text_features.to(image_features.dtype).T
        bias = getattr(self.clip, "logit_bias", None)
        return logits if bias is None else logits + bias

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` -> logits ``[B, classes]``."""
        return self.classify(self.clip.encode_image(images))


def check_templates(templates: Sequence[str]) -> list:
    """The prompt templates as a list; a clear error for one that does not place the class
    name with ``{}`` (they are filled with ``str.format``)."""
    templates = list(templates)
    if not templates:
        raise ValueError("give at least one prompt template, e.g. 'a photo of a {}.'")
    for template in templates:
        try:
            filled = template.format("\0")
        except (IndexError, KeyError, ValueError) as err:
            raise ValueError(f"prompt template {template!r} is not a format string with one {{}} ({err!r}): "
                             "write the class name's place as {}, e.g. 'a photo of a {}.'") from None
        if "\0" not in filled:
            raise ValueError(f"prompt template {template!r} has no {{}} for the class name, e.g. 'a photo of a {{}}.'")
    return templates


@torch.no_grad()
def zero_shot_classifier(clip: nn.Module, class_names: Sequence[str], tokenizer: Callable,
                         templates: Sequence[str] = (DEFAULT_TEMPLATE,)) -> ZeroShotClassifier:
    """Encode the prompts of every class once with ``clip``'s text tower; returns the
    :class:`ZeroShotClassifier` (on ``clip``'s device).

    Args:
        clip: an open_clip model, not patched or patched (its text tower is never merged).
        class_names: one name per class, in label order.
        tokenizer: the model's tokenizer (``open_clip.get_tokenizer(ARCH)``): texts -> token ids.
        templates: prompt templates with ``{}`` for the class name; several are averaged.
    """
    from open_clip import build_zero_shot_classifier

    class_names = [str(name) for name in class_names]
    if not class_names:
        raise ValueError("give at least one class name")
    templates = check_templates(templates)
    device = next(clip.parameters()).device
    weights = build_zero_shot_classifier(clip, tokenizer, class_names, templates, device=device)  # [D, classes]
    return ZeroShotClassifier(clip, weights.T, class_names)


def read_class_names(path, folders: Optional[Sequence[str]] = None) -> list:
    """The class names of a ``--class-names`` file, in label order.

    Args:
        path: a text file with one name per line (blank lines skipped), in the order of the
            data folder's sorted class sub-folders; or a JSON object mapping folder name to
            class name.
        folders: the data folder's classes (sorted sub-folder names), when there is one: the
            names must match their count (a list) or their names (a JSON object).

    Raises:
        ValueError: an empty or malformed file, or names that do not fit ``folders``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--class-names file {str(path)!r} does not exist")
    # utf-8-sig drops the byte-order mark some editors write, which would otherwise break the
    # JSON or stick to the first class name.
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".json" or text.lstrip().startswith("{"):
        return _names_from_mapping(path, text, folders)
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise ValueError(f"--class-names {path} holds no names: write one class name per line")
    if folders is not None and len(names) != len(folders):
        raise ValueError(
            f"--class-names {path} has {len(names)} names but the data folder has {len(folders)} classes "
            f"({_preview(folders)}): write one name per class folder, in sorted folder order"
        )
    return names


def _names_from_mapping(path: Path, text: str, folders) -> list:
    try:
        mapping = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--class-names {path} is not valid JSON ({err}): write a JSON object "
                         '{"folder": "class name", ...} or a text file with one name per line') from None
    if not isinstance(mapping, dict) or not mapping or not all(isinstance(v, str) for v in mapping.values()):
        raise ValueError(f'--class-names {path} must hold a JSON object {{"folder": "class name", ...}} '
                         "with a string per folder")
    if folders is None:
        return [mapping[key] for key in sorted(mapping)]  # the order of sorted class folders
    missing = [folder for folder in folders if folder not in mapping]
    extra = sorted(set(mapping) - set(folders))
    if missing or extra:
        problems = ([f"no name for folders {_preview(missing)}"] if missing else []) + (
            [f"names folders the data does not have: {_preview(extra)}"] if extra else [])
        raise ValueError(f"--class-names {path}: {'; '.join(problems)}; map every class folder of the data to its name")
    return [mapping[folder] for folder in folders]


def _preview(names: Sequence[str], count: int = 5) -> str:
    shown = ", ".join(names[:count])
    return shown + (f", ... ({len(names)} in all)" if len(names) > count else "")
