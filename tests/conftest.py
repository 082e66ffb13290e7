"""Shared fixtures. Data and checkpoints come from ../shared beside the checkout: tests that
need them fail loudly when it is missing (they never skip)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
IMAGENETTE_VAL = SHARED / "data" / "imagenette" / "val"
IMAGENETTE_TRAIN = SHARED / "data" / "imagenette" / "train"
VIT_TINY_CHECKPOINT = SHARED / "models" / "vit_tiny_patch16_224.imagenette.safetensors"


def require_shared(path: Path) -> Path:
    if not path.exists():
        pytest.fail(
            f"{path} is missing: the tests need ../shared beside the checkout "
            "(data and checkpoints are not downloaded)",
            pytrace=False,
        )
    return path


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a whole test module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    tiny models gain nothing from intra-op threads, and on a shared 2-core machine thread
    contention makes each forward ~100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
