"""What a Hugging Face model folder's ``preprocessor_config.json`` says about its inputs.

Read by the model adapter (an image model's normalisation) and by the evaluation inputs
(video frames, spectrograms), so it lives below both.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .io import read_json

__all__ = ["read_preprocessor_config", "per_channel"]


def read_preprocessor_config(model: nn.Module) -> dict:
    """The ``preprocessor_config.json`` beside a Hugging Face model loaded from a folder, or ``{}``."""
    folder = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    path = Path(folder) / "preprocessor_config.json"
    if not folder or not path.is_file():
        return {}
    config = read_json(path, "preprocessor config", "; fix or remove it (it sets the input normalisation)")
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object (the feature extractor's settings); fix or remove it")
    return config


def per_channel(value, key: str) -> tuple:
    """A processor statistic as one float per RGB channel (Hugging Face allows one for all)."""
    if isinstance(value, (int, float)):
        values = (value,) * 3
    elif isinstance(value, (list, tuple)):
        values = tuple(value)
    else:
        values = ()
    if len(values) != 3 or not all(isinstance(v, (int, float)) for v in values):
        raise ValueError(f"preprocessor_config.json: {key}={value} must be a number or 3 numbers (RGB)")
    if key == "image_std" and min(values) <= 0:
        raise ValueError(f"preprocessor_config.json: {key}={value} must be positive")
    return tuple(float(v) for v in values)
