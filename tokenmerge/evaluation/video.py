"""Video inputs for VideoMAE-style models: decoding clips and turning them into ``pixel_values``.

Decoding uses PyAV (the optional ``video`` extra: ``pip install tokenmerge[video]``), the
FFmpeg binding torchvision's own video reader is built on; it reads the usual containers
(MP4, MKV, AVI, MOV, WebM). A clip becomes ``[T, 3, S, S]`` float32 the way VideoMAE's image
processor prepares one: ``T`` frames spaced evenly over the clip, shorter side resized to
``S`` and centre-cropped, scaled to [0, 1] and normalised per channel (ImageNet statistics
unless the model folder's ``preprocessor_config.json`` says otherwise).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .audio import class_files
from .data import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["VIDEO_EXTENSIONS", "read_video", "write_video", "sample_frames", "prepare_clip", "load_video_folder"]

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
        raise ValueError(f"{where} has {num_available} frames, the model takes {num_frames}; use longer clips")
    return torch.linspace(0, num_available - 1, num_frames).round().long()


def prepare_clip(frames: np.ndarray, num_frames: int, image_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, where: str = "the clip") -> torch.Tensor:
    """uint8 ``[T, H, W, 3]`` -> normalised float32 ``[num_frames, 3, image_size, image_size]``."""
    clip = torch.from_numpy(np.ascontiguousarray(frames))[sample_frames(len(frames), num_frames, where)]
    clip = clip.permute(0, 3, 1, 2).float() / 255.0
    height, width = clip.shape[-2:]
    if min(height, width) != image_size:
        scale = image_size / min(height, width)
        size = (max(image_size, round(height * scale)), max(image_size, round(width * scale)))
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
        prepare_clip(read_video(path), num_frames, image_size, mean, std, where=str(path))
        for path, _ in tqdm(files, desc="decoding videos", disable=not progress, leave=False)
    ])
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    return videos, labels, classes
