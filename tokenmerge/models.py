"""Model loading: timm names (random, pretrained or local checkpoint), Hugging Face folders
(``hf:DIR``, written by ``save_pretrained``), open_clip models (``open_clip:ARCH``) and the
embedded default.

The embedded default is a ViT-Tiny/16 trained on Imagenette (10 classes), shipped in the
package so that the demo and the tests run offline.

``open_clip:ARCH`` is a whole open_clip model (``CLIP``, ``CustomTextCLIP`` or ``CoCa``: image
and text towers), ``ARCH`` an open_clip model config name (``ViT-B-32``; see
``open_clip.list_models()``) or a ``.json`` model config file in the format of open_clip's
``model_configs`` (registered under its file stem, as ``open_clip.add_model_config`` does).
Weights: random, a local state_dict (``checkpoint``, read with ``weights_only=True``: never
unpickled code) or an open_clip pretrained tag (``pretrained="laion2b_s34b_b79k"``,
downloaded by open_clip on first use). The model keeps open_clip's image preprocessing
settings (``model.visual.preprocess_cfg``: mean, std, size, resize mode), which the commands
read (:meth:`tokenmerge.backends.open_clip.OpenClipAdapter.image_preprocessing`).
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from .io import load_safetensors, load_tensor_file, read_json

__all__ = ["DEFAULT_MODEL", "DEFAULT_CHECKPOINT", "HF_PREFIX", "OPEN_CLIP_PREFIX", "is_open_clip_model", "load_model",
           "load_hf_model", "load_open_clip_model", "open_clip_config_name", "load_checkpoint"]

DEFAULT_MODEL = "vit_tiny_patch16_224"
DEFAULT_NUM_CLASSES = 10
DEFAULT_CHECKPOINT = Path(__file__).parent / "assets" / "vit_tiny_patch16_224.imagenette.safetensors"
HF_PREFIX = "hf:"  # model names starting with it are Hugging Face folders
OPEN_CLIP_PREFIX = "open_clip:"  # model names starting with it are open_clip model configs
_FIX = ("pass a .safetensors file or a .pth holding only a state_dict of tensors "
        "(torch.save(model.state_dict(), path))")


def load_checkpoint(path) -> dict:
    """A state_dict from ``.safetensors`` or ``.pth``/``.pt`` (unwrapping ``{"model": ...}``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist (pass a .safetensors or .pth file)")
    if path.suffix == ".safetensors":
        state = load_safetensors(path, "checkpoint", fix=_FIX)
    elif path.suffix in (".pth", ".pt", ".bin"):
        # weights_only: a .pth is a pickle, and a pickle of anything but tensors can run code.
        state = load_tensor_file(path, "checkpoint", fix=_FIX)
        for key in ("model", "state_dict", "model_state"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
                break
    else:
        raise ValueError(f"unknown checkpoint format {path.suffix!r} for {str(path)!r}: use .safetensors or .pth")
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise ValueError(f"{str(path)!r} does not hold a state_dict (a mapping of names to tensors)")
    return state


def _classes_in(state: dict) -> Optional[int]:
    head = state.get("head.weight")
    return None if head is None else int(head.shape[0])


def _blocks_in(state: dict) -> Optional[int]:
    """How many ``blocks.N`` a timm-named state holds (``None``: no such keys)."""
    indices = {int(match.group(1)) for match in map(re.compile(r"blocks\.(\d+)\.").match, state) if match}
    return max(indices) + 1 if indices else None


def _hf_class(path: Path, config):
    """The supported class ``config.architectures`` names (``AutoModelForImageClassification``
    when it names none)."""
    import transformers

    from .backends.transformers import supported_classes

    names = list(getattr(config, "architectures", None) or [])
    if not names:
        return transformers.AutoModelForImageClassification
    classes = {cls.__name__: cls for cls in supported_classes()}
    if names[0] not in classes:
        raise ValueError(
            f"{HF_PREFIX}{path} holds a {names[0]}, which tokenmerge does not support; supported "
            f"Hugging Face classes: {', '.join(sorted(classes))}"
        )
    return classes[names[0]]


def load_hf_model(path, num_classes: Optional[int] = None) -> nn.Module:
    """A Hugging Face model from a local folder written by ``model.save_pretrained(path)``,
    as the class its config names, in eval mode and float32. Nothing is downloaded.

    Args:
        path: the folder (holding ``config.json`` and the weights).
        num_classes: when given, must equal the saved head's ``config.num_labels``.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"Hugging Face model folder {str(path)!r} does not exist: pass {HF_PREFIX}DIR, a folder "
            "written by model.save_pretrained(DIR)"
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{str(path)!r} has no config.json, so it is not a Hugging Face model folder: pass a folder "
            "written by model.save_pretrained(DIR)"
        )
    import transformers

    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    if num_classes is not None and num_classes != config.num_labels:
        raise ValueError(
            f"--num-classes {num_classes} does not match {HF_PREFIX}{path}, whose head has "
            f"{config.num_labels} classes; pass --num-classes {config.num_labels} or leave it out"
        )
    model = _hf_class(path, config).from_pretrained(path, local_files_only=True)
    return model.float().eval()


IMAGE_STATS_ATTRIBUTE = "tokenmerge_image_stats"


def record_image_stats(model: nn.Module, mean, std) -> None:
    """Remember on ``model`` the per-channel mean and std its weights expect, so the commands
    normalise images with them (:meth:`~tokenmerge.backends.adapter.ModelAdapter.image_preprocessing`)
    instead of ImageNet's, which the embedded and locally trained checkpoints use. (A Hugging
    Face folder's ``preprocessor_config.json`` is read there directly.)"""
    mean, std = [float(v) for v in mean], [float(v) for v in std]
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"image statistics must be 3 means and 3 positive stds, got mean={mean}, std={std}")
    setattr(model, IMAGE_STATS_ATTRIBUTE, (tuple(mean), tuple(std)))


def open_clip_config_name(arch: str) -> str:
    """The open_clip model config name of ``arch``: a registered config name as it is, or a
    ``.json`` model config file, registered under its file stem (``open_clip.add_model_config``).

    Raises:
        ValueError: an unknown name (naming the nearest ones), or a file that is not an open_clip
            model config.
    """
    import difflib

    import open_clip

    if arch.endswith(".json"):
        path = Path(arch)
        config = read_json(path, "open_clip model config", " (the format of open_clip's model_configs/*.json)")
        keys = ("embed_dim", "vision_cfg", "text_cfg")
        missing = [key for key in keys if not isinstance(config, dict) or key not in config]
        if missing:
            raise ValueError(
                f"{arch} is not an open_clip model config: it lacks {', '.join(missing)} (the format of "
                "open_clip's model_configs/*.json)"
            )
        open_clip.add_model_config(path)
        return path.stem
    if ":" in arch:
        # open_clip's hf-hub:/local-dir: schemas would download or read weights with open_clip's own loader.
        raise ValueError(
            f"{OPEN_CLIP_PREFIX}{arch}: give an open_clip model config name (e.g. {OPEN_CLIP_PREFIX}ViT-B-32) or a "
            ".json model config file, and the weights with --pretrained TAG or --checkpoint FILE (for a "
            "Hugging Face hub snapshot: its config name and --checkpoint open_clip_model.safetensors)"
        )
    name = arch.replace("/", "-")  # ViT-B/32 is ViT-B-32, as open_clip.create_model reads it
    if open_clip.get_model_config(name) is None:
        close = difflib.get_close_matches(name, open_clip.list_models(), n=5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown open_clip model {arch!r} (see open_clip.list_models()){hint}")
    return name


def _fit_open_clip_state(model: nn.Module, state: dict) -> dict:
    """A state_dict as open_clip's ``load_checkpoint`` massages one before loading it (without
    reading the file itself): DDP's ``module.`` prefix dropped, the old text-tower layout of a
    ``CustomTextCLIP`` converted, a missing ``logit_bias`` zero, position embeddings resized."""
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed

    if state and all(key.startswith("module.") for key in state):  # saved from DistributedDataParallel
        state = {key[len("module."):]: value for key, value in state.items()}
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    for key in ("logit_scale", "logit_bias"):
        own = getattr(model, key, None)
        if key in state and own is not None and own.ndim != state[key].ndim:
            state[key] = state[key].reshape(own.shape)
    if "logit_bias" not in state and getattr(model, "logit_bias", None) is not None and "logit_scale" in state:
        state["logit_bias"] = torch.zeros_like(state["logit_scale"])
    state.pop("text.transformer.embeddings.position_ids", None)  # dropped by transformers >= 4.31
    resize_pos_embed(state, model)
    resize_text_pos_embed(state, model)
    return state


def _open_clip_tag(name: str, pretrained: str) -> None:
    """Refuse a pretrained tag open_clip does not know for ``name``, listing the ones it does
    (open_clip's metadata: no network)."""
    import open_clip

    if not open_clip.get_pretrained_cfg(name, pretrained):
        tags = open_clip.list_pretrained_tags_by_model(name)
        known = f"its tags: {', '.join(tags)}" if tags else "it has no pretrained tags: pass --checkpoint FILE"
        raise ValueError(f"open_clip has no pretrained tag {pretrained!r} for {name} ({known})")


def load_open_clip_model(arch: str, checkpoint=None, pretrained: Optional[str] = None) -> nn.Module:
    """A whole open_clip model (image and text towers) in eval mode and float32.

    Args:
        arch: an open_clip model config name, or a ``.json`` model config file (see
            :func:`open_clip_config_name`).
        checkpoint: a local ``.safetensors``/``.pth``/``.pt``/``.bin`` open_clip state_dict (a
            training checkpoint's ``{"state_dict": ...}`` is unwrapped), read with
            ``weights_only=True``.
        pretrained: an open_clip pretrained tag (``laion2b_s34b_b79k``); open_clip downloads
            the weights on first use (network access or a warm cache needed).

    The preprocessing settings open_clip attaches (``model.visual.preprocess_cfg``) come with
    the model: a tag's own mean and std, else open_clip's defaults (OpenAI CLIP statistics).
    """
    import open_clip

    name = open_clip_config_name(arch)
    if checkpoint is not None and pretrained:
        raise ValueError("give either --pretrained TAG or --checkpoint FILE, not both")
    if pretrained:
        _open_clip_tag(name, pretrained)
    options = {"pretrained_hf": False}  # the CLIP weights (tag or checkpoint) hold the text tower too
    if "weights_only" in inspect.signature(open_clip.create_model).parameters:  # open_clip >= 3.0
        options["weights_only"] = True  # a tag's file is read as tensors, never as code
    try:
        model = open_clip.create_model(name, pretrained=pretrained or None, **options)
    except RuntimeError as err:
        if pretrained:
            raise ValueError(
                f"open_clip could not load {name} {pretrained!r} ({err}): the weights are downloaded on first "
                "use, which needs network access or a warm Hugging Face cache; or pass --checkpoint FILE"
            ) from None
        raise
    if checkpoint is not None:
        _load_float_state(model, _fit_open_clip_state(model, load_checkpoint(checkpoint)),
                          f"checkpoint {checkpoint} does not fit open_clip {name}")
    return model.float().eval()


def _load_float_state(model: nn.Module, state: dict, mismatch: str) -> None:
    """Load ``state`` (floating tensors cast to float32, as the model runs) strictly; a state
    that does not fit raises ``ValueError(mismatch: why)``."""
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{mismatch}: {err}") from None


def is_open_clip_model(name) -> bool:
    """Whether a model name names an open_clip model (``open_clip:ARCH``)."""
    return name is not None and str(name).startswith(OPEN_CLIP_PREFIX)


def load_model(
    name: Optional[str] = None,
    *,
    checkpoint=None,
    num_classes: Optional[int] = None,
    pretrained: Union[bool, str] = False,
    **timm_kwargs,
) -> nn.Module:
    """Create a timm model, or load a Hugging Face or open_clip one, in eval mode and float32.

    Args:
        name: timm architecture name; ``"hf:DIR"`` a Hugging Face model folder (see
            :func:`load_hf_model`); ``"open_clip:ARCH"`` an open_clip model (see
            :func:`load_open_clip_model`); ``None`` is the embedded ViT-Tiny Imagenette model.
        checkpoint: a local ``.safetensors`` or ``.pth`` state_dict with timm key names (open_clip
            key names for ``open_clip:ARCH``).
        num_classes: classifier size; with a checkpoint it must match the checkpoint's head
            (defaults to it).
        pretrained: ``True``: timm's pretrained weights; a tag string: open_clip's pretrained
            weights (``open_clip:ARCH`` only). Both need network access or a warm cache.
    """
    if name is not None and name.startswith(HF_PREFIX):
        given = [flag for flag, value in (("--checkpoint", checkpoint), ("--pretrained", pretrained),
                                          ("--model-kwargs", timm_kwargs)) if value]
        if given:
            raise ValueError(
                f"{' and '.join(given)} describe timm models; a {HF_PREFIX}DIR model takes its "
                "architecture and weights from the folder: leave them out"
            )
        return load_hf_model(name[len(HF_PREFIX):], num_classes=num_classes)
    if is_open_clip_model(name):
        return _load_open_clip(name[len(OPEN_CLIP_PREFIX):], checkpoint, num_classes, pretrained, timm_kwargs)
    if isinstance(pretrained, str):
        raise ValueError(
            f"--pretrained {pretrained}: a pretrained tag names open_clip weights ({OPEN_CLIP_PREFIX}ARCH models); "
            "for timm give --pretrained alone, after the model name (timm's tag is part of the name, e.g. "
            "vit_base_patch16_224.augreg_in21k)"
        )
    import timm

    if name is None:
        if checkpoint is None and not pretrained:
            checkpoint = DEFAULT_CHECKPOINT
            if not DEFAULT_CHECKPOINT.is_file():
                raise FileNotFoundError(
                    f"the embedded checkpoint {DEFAULT_CHECKPOINT} is missing: reinstall tokenmerge"
                )
        name = DEFAULT_MODEL
    state = None
    if checkpoint is not None:
        if pretrained:
            raise ValueError("give either pretrained=True or checkpoint=..., not both")
        state = load_checkpoint(checkpoint)
        found = _classes_in(state)
        if num_classes is None:
            num_classes = found
        elif found is not None and found != num_classes:
            raise ValueError(
                f"--num-classes {num_classes} does not match the checkpoint {checkpoint}, whose "
                f"head has {found} classes; pass --num-classes {found}"
            )
    kwargs = dict(timm_kwargs)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ValueError(f"unknown timm model {name!r} (see timm.list_models())") from None
        raise
    if pretrained:
        # timm's weights come with their own statistics (AugReg ViTs: 0.5, CLIP-trained ones:
        # OpenAI's), and ImageNet's would understate their accuracy.
        cfg = getattr(model, "pretrained_cfg", None) or {}
        if "mean" in cfg and "std" in cfg:
            record_image_stats(model, cfg["mean"], cfg["std"])
    if state is not None:
        depth, built = _blocks_in(state), len(getattr(model, "blocks", ()))
        if depth is not None and built and depth != built:
            raise ValueError(
                f"checkpoint {checkpoint} has {depth} blocks but {name} builds {built}: pass depth={depth} "
                f"(CLI: --model-kwargs '{{\"depth\": {depth}}}')"
            )
        _load_float_state(model, state, f"checkpoint {checkpoint} does not fit {name}")
    return model.float().eval()


def _load_open_clip(arch: str, checkpoint, num_classes, pretrained, timm_kwargs) -> nn.Module:
    """``load_model("open_clip:ARCH", ...)``: the flags that do not apply refused, naming the fix."""
    if num_classes is not None:
        raise ValueError(
            "--num-classes: an open_clip model has no classification head to size; it classifies "
            "zero-shot over class names (--class-names FILE): leave --num-classes out"
        )
    if timm_kwargs:
        raise ValueError(
            f"--model-kwargs are timm.create_model arguments; {OPEN_CLIP_PREFIX}{arch} is built from its "
            "open_clip config: leave them out (for another architecture pass a .json model config file "
            f"as {OPEN_CLIP_PREFIX}PATH.json)"
        )
    if pretrained is True:
        import open_clip

        tags = open_clip.list_pretrained_tags_by_model(arch) if not arch.endswith(".json") else []
        example = f" (e.g. --pretrained {tags[0]}; its tags: {', '.join(tags)})" if tags else ""
        raise ValueError(
            f"{OPEN_CLIP_PREFIX}{arch}: --pretrained needs open_clip's pretrained tag, --pretrained TAG{example}"
        )
    return load_open_clip_model(arch, checkpoint=checkpoint, pretrained=pretrained or None)
