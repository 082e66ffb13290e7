"""Shared fixtures. Data and checkpoints come from ../shared beside the checkout: tests that
need them fail loudly when it is missing (they never skip)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def fresh_process_lines(script: str, *args) -> list:
    """The stdout lines of ``script`` run in a new Python process from the repository, which has
    imported and patched nothing: what a user loading a saved file in another session gets."""
    import subprocess
    import sys
    import textwrap

    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split("\n")
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
    """One intra-op thread for a module of tiny models: threads gain them nothing, and on a
    shared 2-core machine thread contention makes each forward ~100x slower. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# A tiny Hugging Face ViT classifier saved with save_pretrained, and a tiny ImageFolder, for
# running every command on a Hugging Face model (`tokenmerge COMMAND hf:DIR`).
HF_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
              image_size=32, patch_size=8, num_labels=3)
HF_VIT_TOKENS = (32 // 8) ** 2 + 1  # patches + class token


def tiny_hf_vit():
    """A random ``ViTForImageClassification`` whose head is scaled up so that merging visibly
    changes the logits (the default init makes them all nearly zero)."""
    import transformers

    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(transformers.ViTConfig(**HF_VIT)).eval()
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, 2.0)
    return model


# Every Hugging Face classifier family at the tiny ViT's geometry.
HF_TINY = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_labels=3)


def tiny_hf_classifier(kind: str):
    """A random tiny Hugging Face classifier at 32x32 with 3 classes (``kind``: vit, deit_teacher,
    dinov2, clip_classifier): 16 patches + prefix tokens, 2 layers."""
    import transformers

    torch.manual_seed(0)
    if kind == "vit":
        return tiny_hf_vit()
    if kind == "deit_teacher":
        model = transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(**HF_TINY, intermediate_size=64))
    elif kind == "dinov2":
        model = transformers.Dinov2ForImageClassification(transformers.Dinov2Config(**HF_TINY, mlp_ratio=2))
    else:
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100,
                    bos_token_id=0, eos_token_id=1, pad_token_id=1)
        vision = {k: v for k, v in HF_TINY.items() if k != "num_labels"}
        model = transformers.CLIPForImageClassification(transformers.CLIPConfig(
            vision_config=dict(**vision, intermediate_size=64), text_config=text, num_labels=3))
    return model.eval()


@pytest.fixture(scope="session")
def hf_vit_dir(tmp_path_factory) -> Path:
    """A folder written by ``tiny_hf_vit().save_pretrained``."""
    folder = tmp_path_factory.mktemp("hf_vit")
    tiny_hf_vit().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_image_folder(tmp_path_factory) -> Path:
    """An ImageFolder of 3 classes x 4 random 40x40 PNG images."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("tiny_images")
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / f"class{c}").mkdir()
        for i in range(4):
            pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return root


def staged_logits(adapter, inputs) -> torch.Tensor:
    """Embedding, every block on a TokenState, head: the pieces tune's cached runner uses."""
    state = adapter.initial_state(inputs)
    schedule = adapter.schedule(state.x.shape[1])
    for i, block in enumerate(adapter.blocks):
        state = block.forward_tokens(state, schedule[i], adapter.reducer, adapter.config, i)
    return adapter.logits(state)
