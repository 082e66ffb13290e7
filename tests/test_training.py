"""The trainer: modular/end2end/ToMe/TC-ViT/EViT/prune, distillation, resume after a kill,
DDP (gloo, 2 processes), errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from tokenmerge.training import TrainConfig, epoch_indices, train, warmup_cosine

REPO = Path(__file__).resolve().parents[1]
TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A synthetic 4-class ImageFolder (train + val) and a random tiny ViT checkpoint."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(4):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(4):
                pixels = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
                pixels[..., c % 3] //= 4  # a little class signal
                Image.fromarray(pixels).save(folder / f"{i}.png")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=4, **TINY)
    save_file(model.state_dict(), str(root / "tiny.safetensors"))
    return root


def _config(root: Path, out: Path, **overrides) -> TrainConfig:
    base = dict(method="dtem", mode="modular", data=str(root / "train"), model="vit_tiny_patch16_224",
                checkpoint=str(root / "tiny.safetensors"), model_kwargs=dict(TINY), r=3, tau=0.2,
                embed_dim=16, max_steps=5, batch_size=4, lr=1e-2, warmup_steps=1, out=str(out),
                checkpoint_every=2, progress=False)
    base.update(overrides)
    return TrainConfig(**base)


class Killed(Exception):
    pass


def _kill_at(step_to_die: int):
    def on_step(step):
        if step == step_to_die:
            raise Killed

    return on_step


@pytest.mark.parametrize("method,mode,distill", [
    ("dtem", "modular", False), ("tome", "end2end", False), ("tcvit", "end2end", True), ("dtem", "modular", True),
])
def test_killed_run_resumes_to_identical_parameters(tiny_setup, tmp_path, method, mode, distill):
    settings = dict(method=method, mode=mode, distill=distill)
    straight = train(_config(tiny_setup, tmp_path / "a", **settings))
    # Killed after step 3: the last checkpoint is step 2, step 3 is lost and replayed.
    with pytest.raises(Killed):
        train(_config(tiny_setup, tmp_path / "b", **settings), on_step=_kill_at(3))
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["step"] == 2
    resumed = train(_config(tiny_setup, tmp_path / "b", **settings), resume=True)
    assert straight["steps"] == resumed["steps"] == 5
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    # ... and the run did learn something (a kill that silently restarted from scratch
    # would also give equal weights only by accident; the step count says it resumed).
    assert b["step"] == 5
    # Without --resume the same folder would start over; resuming with other settings is refused.
    with pytest.raises(ValueError, match="different settings"):
        train(_config(tiny_setup, tmp_path / "b", **dict(settings, lr=0.5)), resume=True)


def test_modular_training_moves_only_the_embeddings(tiny_setup, tmp_path):
    summary = train(_config(tiny_setup, tmp_path, max_steps=4, eval_r=[1, 3]))
    trained = load_file(str(tmp_path / "dtem_modules.safetensors"))
    import tokenmerge
    from tokenmerge.models import load_model

    fresh = load_model("vit_tiny_patch16_224", checkpoint=str(tiny_setup / "tiny.safetensors"), **TINY)
    backbone = {k: v.clone() for k, v in fresh.state_dict().items()}
    tokenmerge.patch(fresh, method="dtem", r=3, embed_dim=16)
    initial = fresh.token_reducer.state_dict()
    assert any(not torch.equal(trained[k], initial[k]) for k in initial)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert all(k.startswith("token_reducer.") for k in ckpt["model"])  # the frozen ViT is not copied
    assert set(summary["accuracy"]) == {"1", "3"}
    assert all(0.0 <= v <= 100.0 for v in summary["accuracy"].values())
    assert json.loads((tmp_path / "results.json").read_text())["accuracy"] == summary["accuracy"]
    for key, value in fresh.state_dict().items():
        if not key.startswith("token_reducer."):
            assert torch.equal(value, backbone[key]), key


def test_end2end_training_moves_the_vit(tiny_setup, tmp_path):
    train(_config(tiny_setup, tmp_path, mode="end2end", backbone_lr=1e-2, max_steps=2))
    trained = load_file(str(tmp_path / "model.safetensors"))
    original = load_file(str(tiny_setup / "tiny.safetensors"))
    assert not torch.equal(trained["blocks.0.attn.qkv.weight"], original["blocks.0.attn.qkv.weight"])
    assert any(k.startswith("token_reducer.") for k in trained)


def test_ddp_two_gloo_processes_match_one_process_with_the_global_batch(tiny_setup, tmp_path):
    args = ["vit_tiny_patch16_224", "--method", "dtem", "--mode", "end2end", "--data", str(tiny_setup / "train"),
            "--checkpoint", str(tiny_setup / "tiny.safetensors"),
            "--model-kwargs", json.dumps(TINY), "--merge-r", "3", "--tau", "0.2", "--embed-dim", "16",
            "--max-steps", "2", "--lr", "1e-2", "--backbone-lr", "1e-2", "--warmup-steps", "1",
            "--eval-r", "--no-progress", "--threads", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "tokenmerge.commands.train", *args, "--batch-size", "2", "--out", str(tmp_path / "ddp")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert results["world_size"] == 2
    train(_config(tiny_setup, tmp_path / "single", mode="end2end", max_steps=2, batch_size=4, lr=1e-2,
                  backbone_lr=1e-2))
    ddp = load_file(str(tmp_path / "ddp" / "model.safetensors"))
    single = load_file(str(tmp_path / "single" / "model.safetensors"))
    original = load_file(str(tiny_setup / "tiny.safetensors"))
    assert not torch.equal(ddp["blocks.1.mlp.fc1.weight"], original["blocks.1.mlp.fc1.weight"])
    # Same samples per step, gradients averaged: the same run up to float summation order.
    # Adam turns a ~1e-9 gradient's sign noise into a full lr-sized step, so a handful of
    # elements whose gradient is ~0 may differ; a wrong sharding changes nearly all of them.
    differing = total = 0
    for key in single:
        diff = (ddp[key] - single[key]).abs()
        assert diff.max() <= 2 * 2 * 1e-2 + 1e-6, key
        differing += int((diff > 1e-5).sum())
        total += diff.numel()
    assert differing < 0.01 * total, (differing, total)


def test_epoch_shards_cover_the_single_process_order():
    single = epoch_indices(10, seed=3, epoch=1)
    shards = [epoch_indices(10, seed=3, epoch=1, rank=r, world=2) for r in range(2)]
    assert sorted(single) == list(range(10))
    assert [i for pair in zip(*shards) for i in pair] == single
    assert epoch_indices(10, seed=3, epoch=2) != single


def test_warmup_then_cosine():
    f = warmup_cosine(4, 20)
    assert f(0) < f(1) < f(3) <= 1.0
    assert f(4) == pytest.approx(1.0) and f(20) == pytest.approx(0.0)
    assert f(12) == pytest.approx(0.5)


def test_bad_training_input(tiny_setup, tmp_path):
    with pytest.raises(FileNotFoundError, match="--data"):
        train(_config(tiny_setup, tmp_path, data=str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match="--mode end2end"):
        train(_config(tiny_setup, tmp_path, method="tome", mode="modular"))
    with pytest.raises(ValueError, match="r <= 8"):
        train(_config(tiny_setup, tmp_path, r=9))
    with pytest.raises(ValueError, match="tau"):
        train(_config(tiny_setup, tmp_path, tau=0.0))
    with pytest.raises(ValueError, match="fewer than one batch"):
        train(_config(tiny_setup, tmp_path, batch_size=64))


@pytest.mark.parametrize("method", ["tcvit", "evit", "prune"])
def test_select_and_fuse_methods_train_end_to_end_and_keep_their_token_counts(tiny_setup, tmp_path, method):
    from tokenmerge.models import load_model

    model = load_model("vit_tiny_patch16_224", checkpoint=str(tiny_setup / "tiny.safetensors"), **TINY)
    seen = []  # tokens reaching the final norm in each training forward
    model.norm.register_forward_hook(lambda module, inputs, output: seen.append((module.training, inputs[0].shape[1])))
    train(_config(tiny_setup, tmp_path, method=method, mode="end2end", max_steps=3, r=3, lr=1e-2), model=model)
    # 1 class token + 16 patches, 3 removed in each of the 2 blocks, in every training step.
    assert seen == [(True, 11)] * 3
    trained = load_file(str(tmp_path / "model.safetensors"))
    original = load_file(str(tiny_setup / "tiny.safetensors"))
    assert trained.keys() == original.keys()  # no parameters of their own
    for key in ("blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight", "head.weight"):
        assert not torch.equal(trained[key], original[key]), key
    assert model.token_reducer.name == method and model.tokens_per_block() == [17, 14, 11]


def test_distillation_alone_trains_on_unlabeled_images(tiny_setup, tmp_path):
    flat = tmp_path / "unlabeled"
    flat.mkdir()
    for i, image in enumerate(sorted((tiny_setup / "train").rglob("*.png"))):
        (flat / f"{i}.png").write_bytes(image.read_bytes())
    # Labels would be -1 placeholders, which cross-entropy rejects: only the teacher's soft labels are used.
    train(_config(tiny_setup, tmp_path / "run", method="tome", mode="end2end", data=str(flat), max_steps=2,
                  distill=True, distill_weight=1.0, distill_temperature=2.0))
    trained = load_file(str(tmp_path / "run" / "model.safetensors"))
    original = load_file(str(tiny_setup / "tiny.safetensors"))
    assert not torch.equal(trained["blocks.0.attn.qkv.weight"], original["blocks.0.attn.qkv.weight"])
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(row["loss"]) and row["loss"] >= 0 for row in log)
    with pytest.raises(FileNotFoundError, match="no class sub-folders"):
        train(_config(tiny_setup, tmp_path / "labels", method="tome", mode="end2end", data=str(flat),
                      distill=True, distill_weight=0.5))


def _teacher_file(root: Path, name: str, seed: int, num_classes: int = 4, **kwargs) -> str:
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=num_classes, **dict(TINY, **kwargs))
    path = root / name
    save_file(model.state_dict(), str(path))
    return str(path)


def test_teacher_with_another_architecture_or_class_count_is_refused(tiny_setup, tmp_path):
    deeper = _teacher_file(tmp_path, "deeper.safetensors", seed=1, depth=3)
    with pytest.raises(ValueError, match="cannot be loaded as a 'vit_tiny_patch16_224' teacher: pass --teacher-model"):
        train(_config(tiny_setup, tmp_path / "a", distill=True, teacher=deeper))
    five = _teacher_file(tmp_path, "five.safetensors", seed=1, num_classes=5)
    with pytest.raises(ValueError, match="teacher predicts 5 classes but the student has 4"):
        train(_config(tiny_setup, tmp_path / "b", distill=True, teacher=five))
    with pytest.raises(ValueError, match="add --distill"):
        train(_config(tiny_setup, tmp_path / "c", teacher=five))
    with pytest.raises(ValueError, match="distill-weight"):
        train(_config(tiny_setup, tmp_path / "d", distill=True, distill_weight=0.0))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # refused before writing anything


def test_resume_with_another_teacher_is_refused(tiny_setup, tmp_path):
    teacher = _teacher_file(tmp_path, "teacher.safetensors", seed=1)
    settings = dict(method="tome", mode="end2end", distill=True, teacher=teacher)
    with pytest.raises(Killed):
        train(_config(tiny_setup, tmp_path / "run", **settings), on_step=_kill_at(3))
    _teacher_file(tmp_path, "teacher.safetensors", seed=2)  # same path, other weights
    with pytest.raises(ValueError, match="teacher_fingerprint"):
        train(_config(tiny_setup, tmp_path / "run", **settings), resume=True)
    _teacher_file(tmp_path, "teacher.safetensors", seed=1)
    assert train(_config(tiny_setup, tmp_path / "run", **settings), resume=True)["steps"] == 5


def test_cli_arguments_reach_the_config():
    import argparse

    from tokenmerge.commands.train import _configure, config_from_args

    parser = argparse.ArgumentParser()
    _configure(parser)
    config = config_from_args(parser.parse_args([
        "--method", "tcvit", "--method-option", "order=2", "--method-option", "tcvit.fuse=false",
        "--distill", "--distill-weight", "1.0", "--distill-temperature", "2", "--teacher", "t.safetensors"]))
    assert (config.method, config.mode, config.lr) == ("tcvit", "end2end", 1e-5)
    assert config.method_options == {"order": 2, "fuse": False}
    assert (config.distill, config.distill_weight, config.distill_temperature, config.teacher) == (
        True, 1.0, 2.0, "t.safetensors")
    assert config_from_args(parser.parse_args(["--distill"])).distill_weight == 0.5
    with pytest.raises(ValueError, match="add --distill"):
        config_from_args(parser.parse_args(["--distill-weight", "0.3"]))
    with pytest.raises(ValueError, match="names method 'dtem'"):
        config_from_args(parser.parse_args(["--method", "tcvit", "--method-option", "dtem.tau=0.2"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["--distill", "--distill-weight", "1.5"])
