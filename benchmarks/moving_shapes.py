"""Generate the synthetic "moving shapes" video set: the class is the motion, not the look (issue 12).

Why: token merging on video needs a trained video model and video it can be scored on,
offline. Real video data sets cannot be downloaded here, so this script draws them: each clip
is one shape on a textured, noisy background, and its class is *how the shape moves*:

    left, right, up, down          translation at 2.5-4 px/frame
    rotate_cw, rotate_ccw          rotation at 12-20 degrees/frame about a fixed centre
    grow, shrink                   scaling by 1.08-1.11x (or its inverse) per frame

Shape (triangle, bar, L, arrow, kite), colour (bright, always brighter than the background),
size, start position, start angle, speed and background are random and drawn the same way
for every class, so that the class is in how frames differ. One frame can still hint at it,
since the random ranges are fitted to the motion: a shape moving right starts in the left
part of the frame (its path must fit), and a growing shape starts smaller (radius 6-9 px)
than a shrinking one (13-19 px; translated and rotated shapes are 9-14 px).

What it is: 8 classes, 8 frames of 64x64 RGB per clip (H.264 ``.mp4``, crf 18, 8 fps, via
PyAV), ``<out>/{train,val}/<class>/<index>.mp4``; 2,400 train and 480 val clips (balanced), the
val clips from another seed. Deterministic: the same seed gives the same pixels (before
H.264 encoding; the encoder is deterministic too, single-threaded).
What it is not: natural video. No camera motion, occlusion, lighting change, clutter or
several objects; the motions are rigid and constant-speed. Accuracy on it says whether merged
tokens keep *temporal* information on an easy task, not how a model fares on Kinetics.

    OMP_NUM_THREADS=1 python benchmarks/moving_shapes.py            # about a minute
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tokenmerge.evaluation.video import write_video  # noqa: E402

CLASSES = ("left", "right", "up", "down", "rotate_cw", "rotate_ccw", "grow", "shrink")
FRAMES = 8
SIZE = 64
# Unit outlines (radius about 1) without rotational symmetry, so rotation is visible.
SHAPES = {
    "triangle": [(0.0, -1.0), (0.8, 0.75), (-0.8, 0.75)],
    "bar": [(-1.0, -0.35), (1.0, -0.35), (1.0, 0.35), (-1.0, 0.35)],
    "L": [(-0.8, -1.0), (-0.2, -1.0), (-0.2, 0.4), (0.8, 0.4), (0.8, 1.0), (-0.8, 1.0)],
    "arrow": [(-1.0, -0.3), (0.2, -0.3), (0.2, -0.8), (1.0, 0.0), (0.2, 0.8), (0.2, 0.3), (-1.0, 0.3)],
    "kite": [(0.0, -1.0), (0.5, -0.2), (0.0, 1.0), (-0.5, -0.2)],
}


def background(rng: np.random.Generator) -> np.ndarray:
    """A smooth random colour field plus fixed fine texture -> float [SIZE, SIZE, 3] in 0..255."""
    coarse = rng.uniform(20, 130, size=(4, 4, 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((SIZE, SIZE), Image.BICUBIC), dtype=np.float32)
    return np.clip(smooth + rng.normal(0, 10, size=(SIZE, SIZE, 3)), 0, 255)


def motion(label: str, rng: np.random.Generator):
    """Per-frame (centre x, centre y, angle in radians, radius) of one clip of class ``label``."""
    t = np.arange(FRAMES, dtype=np.float64)
    angle0 = rng.uniform(0, 2 * math.pi)
    radius0 = rng.uniform(9, 14)
    angle, radius = np.full(FRAMES, angle0), np.full(FRAMES, radius0)
    if label in ("left", "right", "up", "down"):
        speed = rng.uniform(2.5, 4.0)
        travel = speed * (FRAMES - 1)
        margin = radius0 + 1
        sign = 1.0 if label in ("right", "down") else -1.0
        # The start is drawn so that the whole path stays inside the frame.
        along0 = rng.uniform(margin, SIZE - margin - travel) if sign > 0 else rng.uniform(margin + travel, SIZE - margin)
        along = along0 + sign * speed * t
        across = np.full(FRAMES, rng.uniform(margin, SIZE - margin))
        x, y = (along, across) if label in ("left", "right") else (across, along)
    else:
        if label.startswith("rotate"):
            step = math.radians(rng.uniform(12, 20)) * (1 if label == "rotate_cw" else -1)
            angle = angle0 + step * t
        else:
            factor = rng.uniform(1.08, 1.11) ** (1 if label == "grow" else -1)
            # Start so that sizes of growing and shrinking clips cover the same range.
            radius0 = rng.uniform(6, 9) if label == "grow" else rng.uniform(13, 19)
            radius = radius0 * factor ** t
        margin = radius.max() + 1
        x = np.full(FRAMES, rng.uniform(margin, SIZE - margin))
        y = np.full(FRAMES, rng.uniform(margin, SIZE - margin))
    return x, y, angle, radius


def clip(label: str, rng: np.random.Generator) -> np.ndarray:
    """One clip: uint8 [FRAMES, SIZE, SIZE, 3]."""
    outline = np.array(SHAPES[rng.choice(list(SHAPES))])
    base = background(rng)
    # Brighter than the background (which stays within 20-130 before noise) in every channel:
    # a moving edge then brightens where the shape arrives and darkens where it leaves, so
    # the motion is a linear function of frame differences. With shapes of either contrast
    # it is a product of two unknown signs, which the tiny models trained here (all from
    # scratch) did not pick up within 450 steps.
    colour = rng.integers(170, 256, size=3)
    colour[rng.integers(0, 3)] = 255
    colour = tuple(int(c) for c in colour)
    frames = []
    for x, y, angle, radius in zip(*motion(label, rng)):
        rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        points = outline @ rotation.T * radius + (x, y)
        # Drawn 4x larger and reduced, for anti-aliased edges (sub-pixel motion stays visible).
        mask = Image.new("L", (4 * SIZE, 4 * SIZE), 0)
        ImageDraw.Draw(mask).polygon([(4 * px, 4 * py) for px, py in points], fill=255)
        alpha = np.asarray(mask.resize((SIZE, SIZE), Image.BOX), dtype=np.float32)[..., None] / 255.0
        frame = base * (1 - alpha) + np.array(colour, dtype=np.float32) * alpha
        frame = frame + rng.normal(0, 4, size=frame.shape)  # sensor noise, new in every frame
        frames.append(np.clip(frame, 0, 255).round().astype(np.uint8))
    return np.stack(frames)


def generate(out: Path, per_class: int, seed: int) -> int:
    """Write ``per_class`` clips of every class under ``out/<class>/``; returns the number written."""
    written = 0
    for label_index, label in enumerate(CLASSES):
        folder = out / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = folder / f"{i:05d}.mp4"
            if path.is_file():  # cached: the same seed gives the same clip
                continue
            rng = np.random.default_rng([seed, label_index, i])
            write_video(path, clip(label, rng))
            written += 1
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / ".data" / "moving_shapes")
    parser.add_argument("--train-per-class", type=int, default=300)
    parser.add_argument("--val-per-class", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0, help="train seed; val uses seed + 1")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    for split, per_class, seed in (("train", args.train_per_class, args.seed), ("val", args.val_per_class, args.seed + 1)):
        written = generate(args.out / split, per_class, seed)
        print(f"{split}: {per_class * len(CLASSES)} clips in {args.out / split} ({written} new), "
              f"{time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
