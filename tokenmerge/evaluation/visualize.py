"""Which patches ended up in which token: the ToMe-paper figure.

A model patched with ``trace_source=True`` returns, per image, the compact source map
``source[p]`` = the index of the token that covers patch ``p`` (an index ``>=`` the number
of tokens means the patch was discarded). Every group of patches sharing a token is filled
with its mean colour and outlined, over the image.

The same figure for the other inputs a model's adapter can take (:mod:`.inputs`):

- spectrograms (AST): the log-mel features (time across, low frequencies at the bottom),
  then the same with the groups. AST's patches overlap (stride smaller than the patch), so
  a spectrogram cell belongs to several patches; it is drawn in the group of the patch
  whose centre is nearest (:func:`spectrogram_cells`), which tiles the spectrogram;
- videos (VideoMAE, ViViT): one panel per tubelet time step showing its first frame, the
  groups below. A group's colour is its mean over all its pixels in every panel, so a token
  that merged tubelets of different time steps has the same colour in each of them. Or an
  animation (:func:`merge_animation`, written as a GIF): every frame of the model's input
  beside the groups of its tubelet step.

To stop at an earlier block ``K`` we re-patch a copy with the model's own resolved schedule
cut after block ``K`` (zeros afterwards): blocks with ``r = 0`` merge nothing, so the source
map leaving the last block is the one after block ``K``, computed with public API only.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
from torch import nn

from ..backends.adapter import adapter_for, input_placement
from ..core.schedule import ScheduleClampedWarning

__all__ = ["MergeGroups", "merge_groups", "fill_groups", "group_image", "spectrogram_cells", "load_display_image",
           "visualize_merging", "merge_animation", "save_gif"]

# The animation: panels enlarged (whole pixels) to about this width, so that a small model's
# frames stay visible; the gap between frame and groups, the caption strip above, and the
# time each frame shows (the sampled frames span the whole clip: real timing is lost anyway).
GIF_PANEL, GIF_GAP, GIF_CAPTION, GIF_FRAME_MS = 224, 8, 20, 250


class MergeGroups(NamedTuple):
    """The source map of one input after a block.

    Attributes:
        source: int64, the token index covering each patch, on the model's patch grid in
            token order: ``[gh, gw]`` for images, ``[frequency, time]`` for spectrograms,
            ``[t, h, w]`` tubelets for videos.
        num_tokens: tokens after the block (protected ones included); ``source >= num_tokens``
            marks discarded patches.
        block: blocks run (1-based; the model's block count = the last).
        tokens_in: tokens entering the first block.
    """

    source: torch.Tensor
    num_tokens: int
    block: int
    tokens_in: int


def _truncated_copy(model: nn.Module, block: int) -> nn.Module:
    """A copy of a patched ``model`` that merges as ``model`` does up to ``block`` and not after,
    tracing sources."""
    import tokenmerge

    adapter = adapter_for(model)
    schedule = list(adapter.schedule())
    cut = schedule[:block] + [0] * (len(schedule) - block)
    # Every field of the config is a keyword of patch(): passing all of them keeps the options
    # that change which tokens merge (prop_attn, mlp_share, ...), so the copy forms the model's
    # own groups; a field patch() did not take would fail loudly instead of being dropped.
    config = adapter.config
    settings = {field.name: getattr(config, field.name) for field in dataclasses.fields(config)
                if field.name != "schedule"}
    settings["trace_source"] = True
    clone = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ScheduleClampedWarning)
        return tokenmerge.patch(clone, method=adapter_for(clone).reducer, r=cut, **settings)


@torch.inference_mode()
def merge_groups(model: nn.Module, inputs: torch.Tensor, block: Optional[int] = None) -> MergeGroups:
    """Source map of one model input (no batch dimension: a normalised image ``[3, H, W]``,
    spectrogram ``[frames, mel bins]`` or clip ``[T, 3, H, W]``) after ``block`` (default: the last).

    ``model`` must be patched (:func:`tokenmerge.patch`) in the global layout (under
    ``layout="local"`` no group outlasts its block: refused); it is not modified.
    """
    adapter = adapter_for(model)
    adapter.require_patched()
    if adapter.config.layout != "global":
        raise ValueError(
            f"cannot draw merge groups of a model patched with layout={adapter.config.layout!r}: every block "
            "merges its tokens and then puts each one back in its slot, so no group outlasts a block and "
            "the model keeps all its tokens; patch with layout='global' (the default) to see the groups"
        )
    depth = adapter.num_blocks
    block = depth if block is None else int(block)
    if not 1 <= block <= depth:
        raise ValueError(f"--block must lie in 1..{depth} (the model has {depth} blocks), got {block}")
    traced = adapter_for(_truncated_copy(model, block).eval())
    device, dtype = input_placement(traced.model)
    batch = inputs.unsqueeze(0).to(device=device, dtype=dtype)
    state, num_protected = traced.final_state(batch)
    grid = traced.input_grid(batch)
    prefix = traced.num_prefix_tokens
    # Sources cover the tokens from num_protected on. Protected patch tokens (VideoMAE's first
    # tubelet under num_protected=1) are never merged and keep their own index; prefix tokens
    # left unprotected (an attention-pool head's class token) have sources but are no patch.
    kept = torch.arange(prefix, max(prefix, num_protected), dtype=state.source.dtype)
    merged = state.source[0, max(0, prefix - num_protected):].cpu()
    source = torch.cat([kept, merged]).reshape(grid)
    counts = traced.tokens_per_block(prefix + math.prod(grid))
    return MergeGroups(source, int(state.x.shape[1]), block, counts[0])


def fill_groups(image: np.ndarray, pixels: np.ndarray, num_tokens: int,
                border=(1.0, 1.0, 1.0), discarded=(0.12, 0.12, 0.12)) -> np.ndarray:
    """Fill every group of pixels with its mean colour and outline the groups.

    Args:
        image: ``[..., H, W, 3]`` float RGB in ``[0, 1]``: one picture, or panels ``[P, H, W, 3]``.
        pixels: ``[..., H, W]`` the token index of every pixel. Means are taken over all the
            panels together, so a token covering pixels in several panels gets one colour in
            all of them; borders are drawn within each panel.
        num_tokens: indices ``>= num_tokens`` are discarded patches (drawn in ``discarded``).

    Returns:
        ``[..., H, W, 3]`` float RGB.
    """
    if pixels.shape != image.shape[:-1]:
        raise ValueError(f"the token map {pixels.shape} does not match the image {image.shape[:-1]}")
    ids = pixels.reshape(-1)
    flat = image.reshape(-1, 3)
    count = np.bincount(ids, minlength=max(int(ids.max()) + 1, num_tokens)).astype(np.float64)
    means = np.stack([np.bincount(ids, weights=flat[:, c], minlength=len(count)) for c in range(3)], axis=1)
    means /= np.maximum(count, 1)[:, None]
    means[num_tokens:] = discarded
    out = means[pixels]
    # A pixel lies on a border when its right or lower neighbour belongs to another token.
    edge = np.zeros(pixels.shape, dtype=bool)
    edge[..., :, :-1] |= pixels[..., :, :-1] != pixels[..., :, 1:]
    edge[..., :-1, :] |= pixels[..., :-1, :] != pixels[..., 1:, :]
    out[edge] = border
    return out.astype(np.float32)


def group_image(image: np.ndarray, source: np.ndarray, num_tokens: int,
                border=(1.0, 1.0, 1.0), discarded=(0.12, 0.12, 0.12), patch_size=None) -> np.ndarray:
    """Fill every group of patches with its mean colour and outline the groups.

    Args:
        image: ``[H, W, 3]`` float RGB in ``[0, 1]``.
        source: ``[gh, gw]`` token index per patch.
        num_tokens: indices ``>= num_tokens`` are discarded patches (drawn in ``discarded``).
        patch_size: ``(ph, pw)`` pixels of one patch. The image must hold the ``gh x gw``
            patches; pixels past the last whole patch (which a patch embedding drops) are drawn
            with the last patch. Default: ``H`` and ``W`` are multiples of ``gh``, ``gw``.

    Returns:
        ``[H, W, 3]`` float RGB.
    """
    height, width, _ = image.shape
    gh, gw = source.shape
    if patch_size is None:
        if height % gh or width % gw:
            raise ValueError(f"image {height}x{width} is not a whole number of {gh}x{gw} patches: "
                             "pass the model's patch_size")
        patch_size = (height // gh, width // gw)
    ph, pw = (int(s) for s in patch_size)
    if height < gh * ph or width < gw * pw:
        raise ValueError(f"image {height}x{width} is smaller than its {gh}x{gw} patches of {ph}x{pw} pixels")
    rows = np.minimum(np.arange(height) // ph, gh - 1)
    columns = np.minimum(np.arange(width) // pw, gw - 1)
    return fill_groups(image, source[rows[:, None], columns[None, :]], num_tokens, border, discarded)


def spectrogram_cells(source: np.ndarray, mel_bins: int, frames: int, kernel: tuple, stride: tuple) -> np.ndarray:
    """The token of every spectrogram cell -> ``[mel_bins, frames]``, from an AST source map
    ``[frequency, time]`` of patches ``kernel = (kf, kt)`` cells apart by ``stride = (fs, ts)``.

    The patches overlap when the stride is smaller than the patch, so a cell lies in several;
    it takes the token of the patch whose centre is nearest (ties to the lower patch), which
    cuts the spectrogram into one tile per patch. Cells past the last patch take the last one.
    """
    def nearest(cells: int, size: int, step: int, count: int) -> np.ndarray:
        centre = np.arange(cells) - (size - 1) / 2
        return np.clip(np.ceil(centre / step - 0.5), 0, count - 1).astype(np.int64)

    frequency, time = source.shape
    rows = nearest(mel_bins, kernel[0], stride[0], frequency)
    columns = nearest(frames, kernel[1], stride[1], time)
    return source[rows[:, None], columns[None, :]]


def load_display_image(path, image_size: int = 224, transform=None, mean=None, std=None):
    """``(display [H, W, 3] float in [0, 1], normalised model input [3, H, W])`` of one image
    file, resized and centre-cropped as for evaluation.

    ``transform`` (PIL image -> normalised input, e.g. an open_clip model's) replaces the
    default ImageNet one; the display is then its output denormalised with ``mean``/``std``.
    """
    from torchvision import transforms

    from .data import FILE_FIX, IMAGENET_MEAN, IMAGENET_STD, _checked_loader, centre_crop_transform

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} does not exist")
    picture = _checked_loader(str(path), fix=FILE_FIX)  # one file the caller named: no folder to clean
    if transform is not None:
        normalised = transform(picture)
        return _denormalise(normalised, mean or IMAGENET_MEAN, std or IMAGENET_STD), normalised
    tensor = centre_crop_transform(image_size)(picture)
    normalised = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)(tensor)
    return tensor.permute(1, 2, 0).numpy(), normalised


def _spectrogram_rgb(features: torch.Tensor) -> np.ndarray:
    """AST features ``[frames, mel bins]`` -> ``[mel bins, frames, 3]`` RGB (row 0: the lowest
    band), scaled to the clip's own range."""
    from matplotlib import colormaps

    values = features.T.double().numpy()
    span = values.max() - values.min()
    scaled = (values - values.min()) / span if span > 0 else np.zeros_like(values)
    return colormaps["magma"](scaled)[..., :3]


def _denormalise(x: torch.Tensor, mean, std) -> np.ndarray:
    """Normalised ``[..., 3, H, W]`` -> displayable ``[..., H, W, 3]`` in ``[0, 1]``."""
    mean = torch.tensor(mean, dtype=x.dtype)[:, None, None]
    std = torch.tensor(std, dtype=x.dtype)[:, None, None]
    return (x * std + mean).clamp(0, 1).movedim(-3, -1).numpy()


def visualize_merging(model: nn.Module, path, block: Optional[int] = None, title: Optional[str] = None):
    """A matplotlib ``Figure``: one input file (what the model takes: an image, a WAV/FLAC clip
    for AST, a video for VideoMAE) beside its merge groups after ``block``.

    Returns ``(figure, MergeGroups)``.
    """
    from matplotlib.figure import Figure

    from .inputs import inputs_for

    adapter = adapter_for(model)
    inputs = inputs_for(model)
    x = inputs.load_file(path)
    groups = merge_groups(model, x, block)
    source = groups.source.numpy()
    after = f"after block {groups.block}/{adapter.num_blocks}: {groups.num_tokens} tokens"
    if inputs.kind == "spectrograms":
        display = _spectrogram_rgb(x)
        pixels = spectrogram_cells(source, display.shape[0], display.shape[1], adapter.patch_size,
                                   adapter.spectrogram_strides)
        # A few pixels per cell, so that the one-pixel borders stay thin beside the cells.
        drawn = fill_groups(*(np.repeat(np.repeat(a, 4, axis=0), 4, axis=1) for a in (display, pixels)),
                            groups.num_tokens)
        extent = (-0.5, display.shape[1] - 0.5, -0.5, display.shape[0] - 0.5)  # axes in cells
        figure = Figure(figsize=(8.4, 5.6), layout="constrained")
        panels = figure.subplots(2, 1)
        for ax, picture, name in ((panels[0], display, f"input: {source.size} patches (overlapping)"),
                                  (panels[1], drawn, after)):
            ax.imshow(picture, origin="lower", aspect="auto", interpolation="nearest", extent=extent)
            ax.set_title(name)
            ax.set_xlabel("frame (10 ms)")
            ax.set_ylabel("mel bin")
    elif inputs.kind == "videos":
        steps = source.shape[0]
        tubelet = x.shape[0] // steps
        frames = _denormalise(x[::tubelet][:steps], *inputs._normalisation())  # the first frame of each tubelet
        drawn = fill_groups(frames, _tubelet_pixels(source, *frames.shape[:3]), groups.num_tokens)
        figure = Figure(figsize=(0.6 + 2.2 * steps, 4.8), layout="constrained")
        panels = figure.subplots(2, steps, squeeze=False)
        for step in range(steps):
            panels[0, step].imshow(frames[step])
            panels[0, step].set_title(f"frame {step * tubelet}")
            panels[1, step].imshow(drawn[step])
            panels[1, step].set_title(f"tubelets t={step}")
        for ax in panels.flat:
            ax.set_axis_off()
        figure.supxlabel(f"input: {source.size} tubelets; {after} (one colour per token, across frames too)")
    else:
        display = _denormalise(x, *inputs._normalisation())
        figure = Figure(figsize=(8.4, 4.6), layout="constrained")
        left, right = figure.subplots(1, 2)
        left.imshow(display)
        left.set_title(f"input: {source.size} patches")
        right.imshow(group_image(display, source, groups.num_tokens, patch_size=adapter.patch_size))
        right.set_title(after)
        for ax in (left, right):
            ax.set_axis_off()
    if title:
        figure.suptitle(title)
    return figure, groups


def _tubelet_pixels(source: np.ndarray, frames: int, height: int, width: int) -> np.ndarray:
    """The token of every pixel of ``frames`` frames -> ``[frames, height, width]``, from a
    tubelet source map ``[t, gh, gw]``: each time step covers ``frames // t`` frames in a row
    (frames past the last whole tubelet, which the model's Conv3d drops, show the last step)."""
    steps, gh, gw = source.shape
    step = np.minimum(np.arange(frames) // (frames // steps), steps - 1)
    return np.repeat(np.repeat(source[step], height // gh, axis=1), width // gw, axis=2)


def merge_animation(model: nn.Module, path, block: Optional[int] = None, title: Optional[str] = None):
    """The merge groups of one video file as an animation: one RGB ``PIL.Image`` per frame of
    the model's input ``[T, 3, S, S]``, the frame (left) beside the groups of its tubelet step
    (right, coloured as in :func:`visualize_merging` but averaged over every frame), under a
    caption. Each picture is ``(GIF_CAPTION + S * k) x (2 * S * k + GIF_GAP)`` pixels (height x
    width), enlarged ``k = max(1, GIF_PANEL // S)`` times.

    Returns ``(pictures, MergeGroups)``; a model that does not take videos raises.
    """
    from PIL import Image, ImageDraw

    from .inputs import inputs_for

    adapter = adapter_for(model)
    inputs = inputs_for(model)
    if inputs.kind != "videos":
        raise ValueError(f"an animated GIF shows a video's frames, but {adapter.architecture_name()} takes "
                         f"{inputs.kind}: write a PNG instead (--out NAME.png)")
    x = inputs.load_file(path)
    groups = merge_groups(model, x, block)
    source = groups.source.numpy()
    scale = max(1, GIF_PANEL // x.shape[-1])
    frames = _denormalise(x, *inputs._normalisation()).repeat(scale, axis=1).repeat(scale, axis=2)
    count, height, width = frames.shape[:3]
    drawn = fill_groups(frames, _tubelet_pixels(source, count, height, width), groups.num_tokens)
    tubelet = count // source.shape[0]
    after = f"after block {groups.block}/{adapter.num_blocks}: {groups.num_tokens} tokens"
    pictures = []
    for t in range(count):
        canvas = np.ones((GIF_CAPTION + height, 2 * width + GIF_GAP, 3), dtype=np.float32)
        canvas[GIF_CAPTION:, :width] = frames[t]
        canvas[GIF_CAPTION:, width + GIF_GAP:] = drawn[t]
        picture = Image.fromarray((canvas * 255).round().astype(np.uint8))
        # The frame number also keeps every picture distinct: Pillow folds identical
        # consecutive GIF frames into one, which would lose the frame count of a still clip.
        caption = f"frame {t + 1}/{count}, tubelets t={t // tubelet}; {after}"
        ImageDraw.Draw(picture).text((4, 4), f"{title} | {caption}" if title else caption, fill=(0, 0, 0))
        pictures.append(picture)
    return pictures, groups


def save_gif(pictures: list, out) -> None:
    """Write ``pictures`` (``PIL.Image``s of one size) as a looping animated GIF."""
    pictures[0].save(out, format="GIF", save_all=True, append_images=pictures[1:], duration=GIF_FRAME_MS, loop=0)
