"""ImageFolder data in sorted (class, file) order, with ImageNet normalisation unless a model's
own transform is given (open_clip models: see ``ModelAdapter.image_transform``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

__all__ = ["EMBEDDED_SUBSET", "IMAGENET_MEAN", "IMAGENET_STD", "centre_crop_transform", "image_transform", "image_folder", "image_loader", "load_images"]

# The 500-image Imagenette validation subset shipped with the package: the default data of
# the commands for image models.
EMBEDDED_SUBSET = Path(__file__).resolve().parents[1] / "assets" / "imagenette_val_subset"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def centre_crop_transform(image_size: int = 224):
    """Resize (shorter side) + centre crop to ``image_size``, to a ``[3, S, S]`` tensor in [0, 1].

    Images already at ``image_size`` (like the Imagenette copy we ship) pass unchanged.
    """
    from torchvision import transforms

    return transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size), transforms.ToTensor()])


def image_transform(image_size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """:func:`centre_crop_transform`, then normalise with ``mean``/``std``."""
    from torchvision import transforms

    return transforms.Compose([centre_crop_transform(image_size), transforms.Normalize(mean, std)])


# The remedy for an unreadable file depends on where it came from: a dataset folder's file
# can be removed, a file named on the command line must be replaced.
FOLDER_FIX = "remove it from the dataset folder"
FILE_FIX = "pass an image file that PIL can open (JPEG, PNG, WebP, ...)"


def _checked_loader(path: str, fix: str = FOLDER_FIX):
    """The RGB image at ``path``; an unreadable one raises ``ValueError`` naming it, then ``fix``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as handle:
            return Image.open(handle).convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path} is not a readable image ({err}); {fix}") from None


def image_folder(root, image_size: int = 224, limit: Optional[int] = None, transform=None,
                 spread: bool = False):
    """A torchvision ``ImageFolder`` (classes = sorted sub-folders), optionally ``limit`` images.

    ``limit`` takes the first images in sorted order (reproducible evaluation subsets), or
    with ``spread=True`` evenly spaced ones, so that a training subset covers every class
    (the first images of a sorted folder are all of the first classes).

    Raises a clear error for a missing folder, a folder without class sub-folders, or files
    that are not images.
    """
    from torchvision.datasets import ImageFolder

    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ValueError(f"dataset folder {str(root)!r} is a file: pass the folder that holds one sub-folder per class")
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {str(root)!r} does not exist")
    try:
        dataset = ImageFolder(
            str(root),
            transform=transform or image_transform(image_size),
            loader=_checked_loader,
            is_valid_file=None,
        )
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{str(root)!r} is not an ImageFolder: it needs one sub-folder per class holding "
            f"the images ({err})"
        ) from None
    if limit is not None:
        if limit <= 0:
            raise ValueError(f"limit must be positive, got {limit}")
        count = min(limit, len(dataset))
        indices = range(count)
        if spread:
            indices = [i * len(dataset) // count for i in range(count)]
        dataset = torch.utils.data.Subset(dataset, indices)
    return dataset


def _class_names(dataset) -> list:
    base = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset
    return list(base.classes)


def image_loader(dataset, batch_size: int = 64, num_workers: int = 0):
    """A DataLoader in dataset order (no shuffling), for evaluation."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers
    )


def load_images(root, image_size: int = 224, limit: Optional[int] = None, batch_size: int = 256,
                num_workers: int = 0, progress: bool = False, spread: bool = False, transform=None):
    """Decode a whole folder once into ``(images [N,3,S,S] float32, labels [N] int64, classes)``.

    Sweeps evaluate many configurations on the same images; decoding once and reusing
    the tensors keeps JPEG decoding out of every measurement. ``limit``/``spread`` as in
    :func:`image_folder` (``spread=True`` for a calibration subset over every class).
    ``transform``: PIL image -> ``[3, S, S]`` (default: :func:`image_transform`, ImageNet
    normalisation; a model's own is its adapter's ``image_transform()``).
    """
    from tqdm.auto import tqdm

    dataset = image_folder(root, image_size=image_size, limit=limit, transform=transform, spread=spread)
    images, labels = [], []
    batches = image_loader(dataset, batch_size=batch_size, num_workers=num_workers)
    for x, y in tqdm(batches, desc="loading images", disable=not progress, leave=False):
        images.append(x)
        labels.append(y)
    return torch.cat(images), torch.cat(labels), _class_names(dataset)
