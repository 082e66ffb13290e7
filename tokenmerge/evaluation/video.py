"""Video inputs for VideoMAE and ViViT models: decoding clips and turning them into ``pixel_values``.

Decoding uses PyAV (the optional ``video`` extra: ``pip install tokenmerge[video]``), the
FFmpeg binding torchvision's own video reader is built on; it reads the usual containers
(MP4, MKV, AVI, MOV, WebM). A clip becomes ``[T, 3, S, S]`` float32 the way the models' image
processors prepare one: ``T`` frames spaced evenly over the clip, shorter side resized (to
``S``, or more for ViViT) and centre-cropped to ``S``, then rescaled and normalised per
channel. Both processor steps are affine per channel, so they are folded into one mean and
standard deviation on [0, 1] pixels (:func:`pixel_statistics`); the model's settings are
read by :class:`~tokenmerge.evaluation.inputs.VideoInputs`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..preprocessor_config import per_channel
from .audio import class_files
from .data import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["VIDEO_EXTENSIONS", "read_video", "write_video", "sample_frames", "pixel_statistics", "prepare_clip",
           "load_video_folder"]

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v")


def _av():
    try:
        import av
    except ImportError:  # an optional extra: say how to get it
        raise ImportError("decoding video needs PyAV: pip install 'tokenmerge[video]' (or pip install av)") from None
    return av


def read_video(path) -> np.ndarray:
    """Decode every frame of a video file -> uint8 ``[T, H, W, 3]`` RGB.

    Corrupt or unreadable files, and files without a video stream or frames, raise
    ``ValueError`` naming the file.
    """
    av = _av()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video file {str(path)!r} does not exist")
    fix = "re-encode it (e.g. ffmpeg -i IN -c:v libx264 OUT.mp4) or remove it from the dataset folder"
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path} has no video stream; {fix}")
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a readable video file ({err}); {fix}") from None
    if not frames:
        raise ValueError(f"{path} holds no video frames; {fix}")
    return np.stack(frames)


def write_video(path, frames: np.ndarray, fps: int = 8, crf: int = 18) -> None:
    """Encode uint8 ``[T, H, W, 3]`` RGB frames as H.264 (yuv420p, so any player reads it).

    ``H`` and ``W`` must be even (4:2:0 chroma halves both). ``crf=0`` is not lossless in
    yuv420p: the chroma subsampling already loses colour detail.
    """
    av = _av()
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"H.264 4:2:0 needs an even frame size, got {frames.shape[1]}x{frames.shape[2]}")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        # One thread: encoding runs beside training and benchmarks on small machines.
        stream.options = {"crf": str(crf), "threads": "1"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def sample_frames(num_available: int, num_frames: int, where: str = "the clip") -> torch.Tensor:
    """Indices of ``num_frames`` frames spread evenly over ``num_available`` (first and last included)."""
    if num_available < num_frames:
        raise ValueError(
            f"{where} has {num_available} frames, the model takes {num_frames} (num_frames in its config.json); "
            f"use clips of at least {num_frames} frames"
        )
    return torch.linspace(0, num_available - 1, num_frames).round().long()


def pixel_statistics(settings: dict) -> tuple:
    """``(mean, std)`` on [0, 1] pixels that do what a Hugging Face video image processor does
    to 0..255 pixels ``x``: rescale ``x * rescale_factor`` (``- 1`` with ``offset``, ViViT's
    [-1, 1]), then normalise ``(v - image_mean) / image_std`` when ``do_normalize``.

    With ``p = x / 255`` and ``k = 255 * rescale_factor`` that is
    ``(p - (offset + image_mean) / k) / (image_std / k)``.
    """
    offset = 1.0 if settings.get("offset") else 0.0
    if offset and not settings.get("do_rescale", True):
        raise ValueError("preprocessor_config.json sets offset without do_rescale (Hugging Face refuses it too); "
                         "set do_rescale to true or offset to false")
    k = 255.0 * float(settings["rescale_factor"]) if settings.get("do_rescale", True) else 255.0
    if settings.get("do_normalize", True):
        mean = per_channel(settings["image_mean"], "image_mean")
        std = per_channel(settings["image_std"], "image_std")
    else:
        mean, std = (0.0,) * 3, (1.0,) * 3
    return tuple((offset + m) / k for m in mean), tuple(s / k for s in std)


def prepare_clip(frames: np.ndarray, num_frames: int, image_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, resize: Optional[int] = None,
                 where: str = "the clip") -> torch.Tensor:
    """uint8 ``[T, H, W, 3]`` -> normalised float32 ``[num_frames, 3, image_size, image_size]``:
    the shorter side resized to ``resize`` (default ``image_size``), then the centre crop."""
    resize = image_size if resize is None else int(resize)
    if resize < image_size:
        raise ValueError(f"resizing the shorter side to {resize} leaves too little for a {image_size}-pixel crop; "
                         f"set size.shortest_edge >= {image_size} in preprocessor_config.json")
    clip = torch.from_numpy(np.ascontiguousarray(frames))[sample_frames(len(frames), num_frames, where)]
    clip = clip.permute(0, 3, 1, 2).float() / 255.0
    height, width = clip.shape[-2:]
    if min(height, width) != resize:
        scale = resize / min(height, width)
        size = (max(resize, round(height * scale)), max(resize, round(width * scale)))
        clip = torch.nn.functional.interpolate(clip, size=size, mode="bilinear", antialias=True, align_corners=False)
        height, width = size
    top, left = (height - image_size) // 2, (width - image_size) // 2
    clip = clip[..., top: top + image_size, left: left + image_size]
    mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return ((clip - mean) / std).contiguous()


def load_video_folder(
    root,
    num_frames: int,
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    resize: Optional[int] = None,
    limit: Optional[int] = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Every clip of an ImageFolder-like ``<root>/<class>/<file>.mp4``, prepared by :func:`prepare_clip`.

    Returns (videos [N, num_frames, 3, image_size, image_size] float32, labels [N] int64,
    classes): classes are the sorted sub-folder names and files come in sorted (class, file
    name) order; ``limit`` keeps the first ``limit`` of them.
    """
    from tqdm.auto import tqdm

    classes, files = class_files(Path(root), VIDEO_EXTENSIONS)
    files = files[:limit] if limit is not None else files
    videos = torch.stack([
        prepare_clip(read_video(path), num_frames, image_size, mean, std, resize=resize, where=str(path))
        for path, _ in tqdm(files, desc="decoding videos", disable=not progress, leave=False)
    ])
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    return videos, labels, classes
