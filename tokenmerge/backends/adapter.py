"""One adapter per model family: everything tokenmerge knows about where a model keeps its
pieces.

:func:`adapter_for` returns a :class:`ModelAdapter` bound to one model. The commands, the
evaluation code, :func:`tokenmerge.patch` and :func:`tokenmerge.dense_features` ask it for the
prefix tokens, the patch grid, the blocks, the embedding and the head instead of reading
``model.patch_embed`` or ``model.blocks`` themselves, so every command works on every family.

A new family is one small file: a backend whose adapter subclasses :class:`ModelAdapter`
(``detects``, the geometry properties, ``num_classes``, ``blocks``, ``embed``, ``logits``,
``_unmerged_tokens``, ``owner``, ``patch``, ``unpatch`` and ``architecture_name``), named in
:data:`FAMILIES`.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch
from torch import nn

from ..methods.base import TokenState
from ..preprocessor_config import per_channel, read_preprocessor_config

__all__ = ["FAMILIES", "ModelAdapter", "adapter_for", "logits_of"]

# "module:class" of every family's adapter, tried in order (imported lazily: a family's
# library is only needed when a model of it is used).
FAMILIES = (
    "tokenmerge.backends.timm:TimmAdapter",
    "tokenmerge.backends.timm_eva:TimmEvaAdapter",
    "tokenmerge.backends.transformers:HFAdapter",
    "tokenmerge.backends.open_clip:OpenClipAdapter",
)


def _adapter_classes() -> list:
    classes = []
    for spec in FAMILIES:
        module, _, name = spec.partition(":")
        classes.append(getattr(importlib.import_module(module), name))
    return classes


def adapter_for(model: nn.Module) -> "ModelAdapter":
    """The adapter of ``model``'s family, bound to ``model``.

    Raises:
        TypeError: no family supports ``model``; the message names its class and what is
            supported.
    """
    classes = _adapter_classes()
    for cls in classes:
        if cls.detects(model):
            return cls(model)
    kind = type(model)
    reasons = "; ".join(filter(None, (cls.refusal_reason(model) for cls in classes)))
    raise TypeError(
        f"tokenmerge cannot patch {kind.__module__}.{kind.__qualname__}"
        f"{f' ({reasons})' if reasons else ''}: supported models are "
        f"{' and '.join(cls.supported for cls in classes)} (hierarchical or windowed models such "
        "as Swin or ConvNeXt keep no global token sequence to merge)"
    )


def logits_of(output) -> torch.Tensor:
    """The logits of a classifier's output: the tensor itself (timm) or ``output.logits``
    (Hugging Face ``ImageClassifierOutput``)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None:
        raise TypeError(
            f"this needs a classifier that returns logits; {type(output).__name__} has none "
            "(use a model with a classification head, e.g. ViTForImageClassification)"
        )
    return logits


def input_placement(model: nn.Module) -> tuple:
    """``(device, dtype)`` of the model's first floating-point parameter, which its input must
    match (a bfloat16 model's patch embedding refuses float32 images)."""
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.device, parameter.dtype
    return torch.device("cpu"), torch.get_default_dtype()


class ModelAdapter:
    """What tokenmerge needs from one model of a family. Bound to ``model``; cheap to create.

    Family subclasses implement ``detects``, ``num_prefix_tokens``, ``image_size``,
    ``patch_size``, ``num_patches``, ``num_classes``, ``blocks``, ``embed``, ``logits``,
    ``_unmerged_tokens``, ``owner``, ``patch``, ``unpatch`` and ``architecture_name``; the rest
    is shared.
    """

    family: str = ""  # a short name: "timm", "transformers"
    supported: str = ""  # what the family covers, for the error of adapter_for

    def __init__(self, model: nn.Module):
        self.model = model

    @classmethod
    def detects(cls, model: nn.Module) -> bool:
        """Whether ``model`` (patched or not) belongs to this family."""
        raise NotImplementedError

    @classmethod
    def refusal_reason(cls, model: nn.Module) -> str:
        """Why a model of this family's library that ``detects`` rejects is not supported, for
        the error of :func:`adapter_for`; ``""`` when there is nothing specific to say."""
        return ""

    # --- geometry ---------------------------------------------------------------------

    @property
    def num_prefix_tokens(self) -> int:
        """Leading non-patch tokens (class, distillation, registers): protected by default."""
        raise NotImplementedError

    @property
    def reads_prefix_by_position(self) -> bool:
        """Whether the head or pooler finds the prefix tokens by position (the class token at
        0, a mean over the tokens after the prefix), so they must not merge in the global
        layout; ``False`` for an attention pool over all tokens."""
        return self.num_prefix_tokens > 0

    @property
    def has_class_token(self) -> bool:
        """Whether the first token is a class token, which methods scoring by its attention
        need (a register in its place would only look like one)."""
        return self.num_prefix_tokens > 0

    @property
    def inputs(self) -> str:
        """What the model takes: ``"images"`` ``[B, 3, H, W]``, ``"spectrograms"`` ``[B,
        frames, mel bins]`` or ``"videos"`` ``[B, T, 3, H, W]`` (picks the data loader of the
        commands, :func:`tokenmerge.evaluation.inputs.inputs_for`)."""
        return "images"

    @property
    def image_size(self) -> int:
        """The side of the square images the model was built for."""
        raise NotImplementedError

    @property
    def patch_size(self) -> tuple:
        """``(height, width)`` of one patch in pixels."""
        raise NotImplementedError

    @property
    def num_patches(self) -> int:
        """Patch tokens at the default image size."""
        raise NotImplementedError

    @property
    def input_size(self) -> tuple:
        """``(height, width)`` of the images the model was built for."""
        return (self.image_size, self.image_size)

    @property
    def takes_any_image_size(self) -> bool:
        """Whether the unpatched model runs images of other sizes than :attr:`input_size`
        (its token count, hence a patched model's schedule, then follows the input)."""
        return False

    def image_preprocessing(self) -> dict:
        """How an image file becomes this model's input (image models): ``size``, ``mean``,
        ``std`` (per channel, on [0, 1] pixels), ``interpolation`` and ``resize_mode``. The
        default (timm and Hugging Face image models): the statistics its weights came with
        where :func:`tokenmerge.models.load_model` recorded them (timm's pretrained weights,
        a Hugging Face folder's preprocessor config), else ImageNet's; the shorter side
        resized (bilinear) to the model's size and centre-cropped. open_clip models give
        their own (:mod:`tokenmerge.backends.open_clip`)."""
        from ..evaluation.data import IMAGENET_MEAN, IMAGENET_STD
        from ..models import IMAGE_STATS_ATTRIBUTE

        mean, std = getattr(self.model, IMAGE_STATS_ATTRIBUTE, (IMAGENET_MEAN, IMAGENET_STD))
        saved = read_preprocessor_config(self.model)  # a Hugging Face folder's, if it has one
        if "image_mean" in saved and "image_std" in saved:
            mean, std = per_channel(saved["image_mean"], "image_mean"), per_channel(saved["image_std"], "image_std")
        return {"size": self.image_size, "mean": list(mean), "std": list(std),
                "interpolation": "bilinear", "resize_mode": "shortest"}

    def image_transform(self):
        """PIL image -> normalised model input ``[3, H, W]``, as :meth:`image_preprocessing`
        says (a torchvision transform)."""
        from ..evaluation.data import image_transform

        settings = self.image_preprocessing()
        return image_transform(self.image_size, settings["mean"], settings["std"])

    def export_refusal(self) -> str:
        """Why this model cannot be exported at a fixed input size (``""`` when it can), with
        the fix; family-specific (e.g. a patched timm ``dynamic_img_size`` model)."""
        return ""

    @property
    def num_classes(self) -> Optional[int]:
        """Classes the model's head predicts; ``None`` when it has no classification head."""
        raise NotImplementedError

    @property
    def num_tokens(self) -> int:
        """Tokens entering the first block at the default image size."""
        return self.num_patches + self.num_prefix_tokens

    def grid(self, height: int, width: int) -> tuple:
        """``(rows, columns)`` of patches for an image of ``height x width`` pixels."""
        return height // self.patch_size[0], width // self.patch_size[1]

    def input_grid(self, inputs: torch.Tensor) -> tuple:
        """The patch grid of an input batch, in token order: ``(rows, columns)`` for images
        ``[B, 3, H, W]``; video models give ``(t, h, w)`` for ``[B, T, 3, H, W]``."""
        return self.grid(*inputs.shape[-2:])

    def check_image_size(self, size: int) -> None:
        """Raise a clear error when the model cannot run ``size x size`` images (the default:
        any size that is not its own)."""
        if size != self.image_size:
            raise ValueError(
                f"--image-size {size}: the model is built for {self.image_size}x{self.image_size} "
                "images; leave --image-size out to run it at its own size"
            )

    # --- blocks and forward pieces ------------------------------------------------------

    @property
    def blocks(self) -> list:
        """The transformer blocks that merge, in order."""
        raise NotImplementedError

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` -> tokens entering the first block ``[B, N, C]``."""
        raise NotImplementedError

    def initial_state(self, images: torch.Tensor) -> TokenState:
        """Images -> the :class:`TokenState` entering the first block: the embedding, plus the
        tokens' coordinates for models with rotary position embeddings (see ``TokenState.pos``)."""
        return TokenState(self.embed(images))

    def logits(self, state: TokenState) -> torch.Tensor:
        """The last block's :class:`TokenState` -> logits ``[B, classes]`` (final norm,
        size-aware pooling, head)."""
        raise NotImplementedError

    def _unmerged_tokens(self, images: torch.Tensor, **forward_kwargs) -> torch.Tensor:
        """The unpatched model's final tokens ``[B, N, C]`` (after its final norm, if any)."""
        raise NotImplementedError

    def final_state(self, images: torch.Tensor, **forward_kwargs) -> tuple:
        """``(TokenState after the final norm, protected tokens)`` of one forward, patched or not."""
        if self.is_patched:
            return self.owner.forward_tokens(images, **forward_kwargs), self.config.num_protected
        return TokenState(self._unmerged_tokens(images, **forward_kwargs)), self.num_prefix_tokens

    # --- the patch --------------------------------------------------------------------

    @property
    def owner(self) -> nn.Module:
        """The module that carries the patch (schedule, policy, ``forward_tokens``)."""
        raise NotImplementedError

    @property
    def is_patched(self) -> bool:
        return getattr(type(self.owner), "_tokenmerge_base", None) is not None

    def require_patched(self) -> nn.Module:
        """The :attr:`owner`; a clear error when the model is not patched."""
        if not self.is_patched:
            raise ValueError("the model is not patched: call tokenmerge.patch(model, ...) first")
        return self.owner

    @property
    def config(self):
        """The :class:`~tokenmerge.backends.common.MergeConfig` of a patched model."""
        return self.require_patched().tokenmerge_config

    @property
    def reducer(self):
        """The method's policy of a patched model."""
        return self.require_patched().token_reducer

    def schedule(self, num_tokens: Optional[int] = None) -> tuple:
        """Tokens each block removes (default input size) in a patched model."""
        return self.require_patched().tokenmerge_schedule(num_tokens)

    def tokens_per_block(self, num_tokens: Optional[int] = None) -> list:
        """Tokens entering each block, then the count leaving the last one (patched model)."""
        return self.require_patched().tokens_per_block(num_tokens)

    def patch(self, reducer, config) -> nn.Module:
        raise NotImplementedError

    def unpatch(self) -> nn.Module:
        raise NotImplementedError

    def merging_blocks(self) -> list:
        """The patched blocks (hooks of ``MergingBlockMixin``), for methods with per-block
        parameters."""
        return list(self.blocks)

    def architecture_name(self) -> str:
        raise NotImplementedError
