"""Build the validation subset shipped in ``tokenmerge/assets/imagenette_val_subset/``.

Takes the first ``--per-class`` images (sorted file order) of every class of an Imagenette
``val`` folder, resizes the shorter side to 224 and centre-crops 224x224 (the evaluation
transform, so the shipped files need no further resizing), and re-encodes them as JPEG.

    python benchmarks/make_demo_subset.py /work/shared/data/imagenette/val

Re-running it reproduces the shipped files byte for byte (same Pillow version).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from PIL import Image

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "tokenmerge" / "assets" / "imagenette_val_subset"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def centre_crop(image: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size`` (bilinear, antialiased, as torchvision's Resize), then centre crop."""
    width, height = image.size
    scale = size / min(width, height)
    # torchvision computes the long side with int() truncation; match it so the crop is the same.
    new = (size, int(height * scale)) if width <= height else (int(width * scale), size)
    image = image.resize(new, Image.BILINEAR)
    left = int(round((new[0] - size) / 2.0))
    top = int(round((new[1] - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("val", type=Path, help="Imagenette val folder (one sub-folder per synset)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--quality", type=int, default=85)
    args = parser.parse_args(argv)

    classes = sorted(p for p in args.val.iterdir() if p.is_dir())
    if not classes:
        raise SystemExit(f"{args.val} has no class sub-folders")
    if args.out.exists():
        shutil.rmtree(args.out)
    total = 0
    for folder in classes:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[: args.per_class]
        (args.out / folder.name).mkdir(parents=True)
        for path in files:
            with Image.open(path) as image:
                crop = centre_crop(image.convert("RGB"), args.size)
            crop.save(args.out / folder.name / (path.stem + ".jpg"), quality=args.quality, optimize=True)
            total += 1
    size = sum(p.stat().st_size for p in args.out.rglob("*.jpg"))
    print(f"wrote {total} images in {len(classes)} classes to {args.out} ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
