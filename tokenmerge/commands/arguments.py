"""Argument types for the subcommands: bad values stop in the parser with a message that
says what is wrong and what to pass instead (argparse prints ``argument --x: MESSAGE``).

Every type raises :class:`argparse.ArgumentTypeError`, whose text argparse shows as is (a
``ValueError`` would be replaced by a bare "invalid value").
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

__all__ = [
    "positive_int",
    "non_negative_int",
    "finite_float",
    "finite_positive_float",
    "finite_non_negative_float",
    "threads",
    "parse_device",
    "device",
    "json_object",
    "schedule",
    "output_folder",
    "output_file",
]


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    value = _integer(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def finite_positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def finite_non_negative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def threads(text: str) -> int:
    """A torch CPU thread count (``torch.set_num_threads`` rejects anything below 1)."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (CPU threads), got {text}; leave it out for torch's default")
    return value


def parse_device(text: str):
    """``cpu``, ``cuda``, ``cuda:N`` or ``mps`` as a ``torch.device``, checked against what this
    machine has (``ValueError`` otherwise; also used by the trainer's API)."""
    import torch

    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"unknown device {text!r}: use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {text} was requested but no CUDA device is available; use --device cpu")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"device {text} does not exist: this machine has {count} CUDA device(s), "
                             f"cuda:0..cuda:{count - 1}")
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {text} was requested but MPS is not available; use --device cpu")
    elif parsed.type != "cpu":
        raise ValueError(f"device type {parsed.type!r} is not supported: use cpu, cuda, cuda:N or mps")
    return parsed


def device(text: str) -> str:
    """An argparse type for :func:`parse_device` (the value stays the string given)."""
    try:
        parse_device(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def json_object(text: str) -> dict:
    """A JSON object, e.g. ``'{"img_size": 32}'``."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}): give an object such as '{{\"img_size\": 32}}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object such as '{{\"img_size\": 32}}', got {text}")
    return value


def schedule(text: str):
    """Any form :func:`~tokenmerge.core.schedule.parse_schedule` accepts (13, 13:-1, 16,16,8, keep=0.9)."""
    from ..core.schedule import parse_schedule

    try:
        return parse_schedule(text)
    except (ValueError, TypeError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def patch_config(text: str) -> dict:
    """A ``best.json`` written by ``tokenmerge tune``: ``{"method", "r", "options"}``, checked."""
    from ..evaluation.tune import read_config

    try:
        return read_config(text)
    except (OSError, ValueError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def output_folder(text: str) -> Path:
    """A folder to write into: refused if a file of that name (or on its path) is in the way."""
    path = Path(text)
    for part in [path, *path.parents]:
        if part.exists() and not part.is_dir():
            raise argparse.ArgumentTypeError(
                f"{str(part)!r} is a file, not a folder: pass a folder path (it is created if missing)"
            )
    return path


def output_file(text: str):
    """A file to write: refused if a folder of that name is in the way.

    ``""`` passes unchanged: it is the ``const`` of options such as ``--plot [PNG]`` (which
    argparse also runs through the type), meaning "the default path".
    """
    if text == "":
        return text
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder: pass a file path such as {str(path / 'out.png')!r}")
    output_folder(str(path.parent))
    return path
