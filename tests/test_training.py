"""The trainer: modular/end2end/ToMe/TC-ViT/EViT/prune, distillation, resume after a kill,
DDP (gloo, 2 processes), errors."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from tokenmerge.training import TrainConfig, epoch_indices, learning_rates, train, warmup_cosine

REPO = Path(__file__).resolve().parents[1]
TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


pytestmark = pytest.mark.usefixtures("one_thread")


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


def _logged_steps(out: Path) -> list:
    return [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def _kill_at(step_to_die: int):
    def on_step(step):
        if step == step_to_die:
            raise Killed

    return on_step


def assert_killed_run_resumes_identically(config_for, tmp_path: Path) -> None:
    """A 5-step run straight through (``a/``) and one killed after step 3 then resumed (``b/``)
    end with the same steps, log and parameters. ``config_for(out)`` builds the TrainConfig."""
    straight = train(config_for(tmp_path / "a"))
    # Killed after step 3: the last checkpoint is step 2, step 3 is lost and replayed.
    with pytest.raises(Killed):
        train(config_for(tmp_path / "b"), on_step=_kill_at(3))
    # Checkpoints are data: they load with weights_only=True.
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["step"] == 2
    assert _logged_steps(tmp_path / "b") == [1, 2, 3]
    resumed = train(config_for(tmp_path / "b"), resume=True)
    assert straight["steps"] == resumed["steps"] == 5
    # The log was cut back to the checkpoint's step: step 3, replayed, appears once.
    assert _logged_steps(tmp_path / "b") == _logged_steps(tmp_path / "a") == [1, 2, 3, 4, 5]
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    # A kill that silently restarted from scratch would also end at equal weights; the step
    # count says it resumed.
    assert b["step"] == 5


@pytest.mark.parametrize("method,mode,distill", [
    ("dtem", "modular", False), ("tome", "end2end", False), ("tcvit", "end2end", True), ("dtem", "modular", True),
    ("dtem", "backbone", True),
])
def test_killed_run_resumes_to_identical_parameters(tiny_setup, tmp_path, method, mode, distill):
    settings = dict(method=method, mode=mode, distill=distill)
    if mode == "backbone":
        train(_config(tiny_setup, tmp_path / "modules", max_steps=1))
        settings["init_modules"] = str(tmp_path / "modules" / "dtem_modules.safetensors")
    assert_killed_run_resumes_identically(lambda out: _config(tiny_setup, out, **settings), tmp_path)
    # Without --resume the same folder would start over; resuming with other settings is refused
    # (settings the run reads: backbone mode's only learning rate is the ViT's).
    other = dict(backbone_lr=0.5) if mode == "backbone" else dict(lr=0.5)
    with pytest.raises(ValueError, match="different settings"):
        train(_config(tiny_setup, tmp_path / "b", **dict(settings, **other)), resume=True)


def test_mixed_batches_resume_identically_and_are_really_mixed(tiny_setup, tmp_path):
    from tokenmerge.training import _same_run_fields

    mixing = dict(method="tome", mode="end2end", distill=True, mixup=0.8, cutmix=1.0)
    assert_killed_run_resumes_identically(lambda out: _config(tiny_setup, out, **mixing), tmp_path)
    with pytest.raises(ValueError, match="mixup: 0.8 .checkpoint. vs 0.2 .now."):
        train(_config(tiny_setup, tmp_path / "b", **dict(mixing, mixup=0.2)), resume=True)
    plain = train(_config(tiny_setup, tmp_path / "plain", **dict(mixing, mixup=0.0, cutmix=0.0)))
    assert plain["steps"] == 5
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "plain" / "checkpoint.pt", weights_only=True)["model"]
    assert any(not torch.equal(a[key], b[key]) for key in a)
    # Runs without mixing record no mixing settings, so checkpoints written before the
    # settings existed still resume.
    assert "mixup" not in _same_run_fields(_config(tiny_setup, tmp_path))
    assert _same_run_fields(_config(tiny_setup, tmp_path, cutmix=1.0))["cutmix"] == 1.0


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
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert all(k.startswith("token_reducer.") for k in ckpt["model"])  # the frozen ViT is not copied
    assert set(summary["accuracy"]) == {"1", "3"}
    assert all(0.0 <= v <= 100.0 for v in summary["accuracy"].values())
    assert json.loads((tmp_path / "results.json").read_text())["accuracy"] == summary["accuracy"]
    for key, value in fresh.state_dict().items():
        if not key.startswith("token_reducer."):
            assert torch.equal(value, backbone[key]), key


def test_training_starts_from_given_merge_modules(tiny_setup, tmp_path):
    train(_config(tiny_setup, tmp_path / "modular", max_steps=2))
    trained = tmp_path / "modular" / "dtem_modules.safetensors"
    # A step this small leaves the modules where they started: at the file's values.
    train(_config(tiny_setup, tmp_path / "e2e", mode="end2end", max_steps=1, lr=1e-12, backbone_lr=1e-12,
                  init_modules=str(trained)))
    start, after = load_file(str(trained)), load_file(str(tmp_path / "e2e" / "dtem_modules.safetensors"))
    assert start.keys() == after.keys()
    for key in start:
        torch.testing.assert_close(after[key], start[key], atol=1e-9, rtol=0)
    fresh = tmp_path / "fresh"
    train(_config(tiny_setup, fresh, mode="end2end", max_steps=1, lr=1e-12, backbone_lr=1e-12))
    assert any(not torch.allclose(load_file(str(fresh / "dtem_modules.safetensors"))[k], start[k]) for k in start)
    with pytest.raises(ValueError, match="--method tome has none"):
        train(_config(tiny_setup, tmp_path / "tome", method="tome", mode="end2end", init_modules=str(trained)),
              on_step=_never_called)
    with pytest.raises(ValueError, match="embed_dim=16"):
        train(_config(tiny_setup, tmp_path / "shape", embed_dim=8, init_modules=str(trained)), on_step=_never_called)


def test_end2end_training_moves_the_vit_and_saves_it_without_the_merge_modules(tiny_setup, tmp_path):
    import tokenmerge
    from tokenmerge.models import load_model

    model = load_model("vit_tiny_patch16_224", checkpoint=str(tiny_setup / "tiny.safetensors"), **TINY)
    train(_config(tiny_setup, tmp_path, mode="end2end", backbone_lr=1e-2, max_steps=2), model=model)
    trained = load_file(str(tmp_path / "model.safetensors"))
    original = load_file(str(tiny_setup / "tiny.safetensors"))
    assert not torch.equal(trained["blocks.0.attn.qkv.weight"], original["blocks.0.attn.qkv.weight"])
    # The ViT alone, as documented: the file loads into the unpatched architecture...
    assert trained.keys() == original.keys()
    reloaded = load_model("vit_tiny_patch16_224", checkpoint=str(tmp_path / "model.safetensors"), **TINY)
    # ... and with the modules, saved apart, it is the model that was trained.
    modules = load_file(str(tmp_path / "dtem_modules.safetensors"))
    assert modules and all(k.startswith("embeds.") for k in modules)
    tokenmerge.patch(reloaded, method="dtem", r=3, modules=str(tmp_path / "dtem_modules.safetensors"))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(images), model.eval()(images), atol=1e-6, rtol=0)


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


def test_backbone_mode_trains_the_vit_around_fixed_modules_merging_as_at_inference(tiny_setup, tmp_path):
    train(_config(tiny_setup, tmp_path / "modular", max_steps=2))
    modules = tmp_path / "modular" / "dtem_modules.safetensors"
    # 17 tokens, 1 protected: the soft bipartite merge of training removes at most 8 in block 0,
    # clustering (the hard plan) up to 15; so r=12 trains only through the hard plan.
    clustered = dict(method_options={"matching": "agglomerative"}, r=[12, 2])
    with pytest.raises(ValueError, match="asks block 0 to remove 12 tokens.*at most 8"):
        train(_config(tiny_setup, tmp_path / "soft", init_modules=str(modules), **clustered), on_step=_never_called)
    summary = train(_config(tiny_setup, tmp_path / "backbone", mode="backbone", init_modules=str(modules),
                            backbone_lr=1e-2, max_steps=2, distill=True, eval_r=[[12, 2]], **clustered))
    assert set(summary["accuracy"]) == {"12,2"}
    trained = load_file(str(tmp_path / "backbone" / "model.safetensors"))
    original = load_file(str(tiny_setup / "tiny.safetensors"))
    assert not torch.equal(trained["blocks.0.attn.qkv.weight"], original["blocks.0.attn.qkv.weight"])
    start = load_file(str(modules))
    after = load_file(str(tmp_path / "backbone" / "dtem_modules.safetensors"))
    assert start.keys() == after.keys()
    for key in start:
        assert torch.equal(after[key], start[key]), key
    assert trained.keys() == original.keys()  # the ViT without its merge modules
    # The saved ViT, patched with the same modules and schedule, is the model that was evaluated.
    import tokenmerge
    from tokenmerge.models import load_model

    model = load_model("vit_tiny_patch16_224", checkpoint=str(tmp_path / "backbone" / "model.safetensors"), **TINY)
    tokenmerge.patch(model, method="dtem", r=[12, 2], modules=str(modules), matching="agglomerative")
    assert model.token_reducer.matching == "agglomerative"
    assert all(torch.equal(model.token_reducer.state_dict()[key], start[key]) for key in start)
    with pytest.raises(ValueError, match="untrained modules.*--init-modules"):
        train(_config(tiny_setup, tmp_path / "none", mode="backbone"), on_step=_never_called)
    with pytest.raises(ValueError, match="--method tome has none.*--mode end2end"):
        train(_config(tiny_setup, tmp_path / "tome", method="tome", mode="backbone"), on_step=_never_called)


def test_bad_training_input(tiny_setup, tmp_path):
    with pytest.raises(FileNotFoundError, match="--data"):
        train(_config(tiny_setup, tmp_path, data=str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match="--mode end2end"):
        train(_config(tiny_setup, tmp_path, method="tome", mode="modular"))
    with pytest.raises(ValueError, match="asks block 0 to remove 9 tokens.*at most 8"):
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


@pytest.mark.parametrize("method", ["mctf", "pitome", "atc"])
def test_a_per_block_schedule_trains_with_the_scored_mergers(tiny_setup, tmp_path, method):
    from tokenmerge.models import load_model

    model = load_model("vit_tiny_patch16_224", checkpoint=str(tiny_setup / "tiny.safetensors"), **TINY)
    seen = []
    model.norm.register_forward_hook(lambda module, inputs, output: seen.append((module.training, inputs[0].shape[1])))
    # Options of every method (as a best.json holds them) beside the method's own: the patch takes them.
    common = {"prop_attn": False, "keep_norm": True, "mlp_share": 0.5}
    own = {"atc": {"tau_size": 20.0}, "mctf": {"tau_sim": 0.5}, "pitome": {}}[method]
    train(_config(tiny_setup, tmp_path, method=method, mode="end2end", max_steps=3, r=[4, 2], lr=1e-2,
                  method_options={**common, **own}, distill=True), model=model)
    # 17 tokens, 4 merged in block 0 and 2 in block 1, in every training step (the frozen
    # teacher, a copy made before patching, runs in eval mode with all 17).
    assert [s for s in seen if s[0]] == [(True, 11)] * 3
    assert model.tokens_per_block() == [17, 13, 11]
    # the options of every method reach the patch, the method's own reach the method
    assert model.tokenmerge_config.prop_attn is False and model.tokenmerge_config.mlp_share == 0.5
    assert model.token_reducer.keep_norm is True
    assert all(getattr(model.token_reducer, name) == value for name, value in own.items())
    trained = load_file(str(tmp_path / "model.safetensors"))
    original = load_file(str(tiny_setup / "tiny.safetensors"))
    assert trained.keys() == original.keys()
    assert not torch.equal(trained["blocks.0.attn.qkv.weight"], original["blocks.0.attn.qkv.weight"])
    assert json.loads((tmp_path / "results.json").read_text())["config"]["r"] == [4, 2]


@pytest.mark.parametrize("r,message", [
    ([8, 8], "asks block 1 to remove 8 tokens, more than it can with tome"),  # 9 tokens left: at most 4
    ([1, 1, 1], "lists 3 blocks but the model has 2"),
    ([0, 0], "merges nothing"),
    ((3, -1.0), "training takes an int r or a per-block list"),
    ([2, -1], "r[1] must be >= 0"),
])
def test_schedules_training_cannot_run_as_asked_are_refused(tiny_setup, tmp_path, r, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        train(_config(tiny_setup, tmp_path, method="tome", mode="end2end", r=r), on_step=_never_called)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_a_constant_r_may_clamp_in_late_blocks_as_in_tome(tiny_setup, tmp_path):
    # r=8 empties half of block 0's 16 patches; block 1 can then remove only 4 (ToMe r=16 on
    # ViT-Tiny likewise removes 10 in its last block). Only a written-out list is held to the letter.
    from tokenmerge.core.schedule import ScheduleClampedWarning

    with pytest.warns(ScheduleClampedWarning, match=re.escape("effective schedule: [8, 4]")):
        summary = train(_config(tiny_setup, tmp_path, method="tome", mode="end2end", r=8, max_steps=1))
    assert summary["steps"] == 1
    with pytest.raises(ValueError, match=re.escape("would run 8,4")):
        train(_config(tiny_setup, tmp_path / "list", method="tome", mode="end2end", r=[8, 8]), on_step=_never_called)


def test_cli_trains_the_configuration_tune_wrote(tmp_path):
    import argparse

    from tokenmerge.commands.train import _configure, config_from_args

    best = tmp_path / "best.json"
    best.write_text(json.dumps({"method": "mctf", "r": [4, 2], "options": {"prop_attn": False}}))
    parser = argparse.ArgumentParser()
    _configure(parser)
    config = config_from_args(parser.parse_args(["--config", str(best), "--distill"]))
    assert (config.method, config.mode, config.r, learning_rates(config)[0]) == ("mctf", "end2end", [4, 2], 1e-5)
    assert config.method_options == {"prop_attn": False} and config.eval_r == [[4, 2]]
    for clash in (["--r", "3"], ["--method", "tome"], ["--method-option", "tau_sim=2"]):
        with pytest.raises(ValueError, match=f"drop {clash[0]}"):
            config_from_args(parser.parse_args(["--config", str(best)] + clash))
    assert config_from_args(parser.parse_args(["--method", "tome", "--r", "4,2"])).r == [4, 2]
    assert config_from_args(parser.parse_args([])).r == 16  # the default, unchanged
    best.write_text(json.dumps({"method": "mctf", "r": [4, 2], "extra": 1}))
    with pytest.raises(SystemExit):
        parser.parse_args(["--config", str(best)])


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
    assert (config.method, config.mode, learning_rates(config)[0]) == ("tcvit", "end2end", 1e-5)
    assert config.method_options == {"order": 2, "fuse": False}
    assert (config.distill, config.distill_weight, config.distill_temperature, config.teacher) == (
        True, 1.0, 2.0, "t.safetensors")
    assert config_from_args(parser.parse_args(["--distill"])).distill_weight == 0.5
    assert (config.mixup, config.cutmix) == (0.0, 0.0)
    mixing = config_from_args(parser.parse_args(["--mixup", "0.8", "--cutmix", "1"]))
    assert (mixing.mixup, mixing.cutmix) == (0.8, 1.0)
    with pytest.raises(ValueError, match="add --distill"):
        config_from_args(parser.parse_args(["--distill-weight", "0.3"]))
    with pytest.raises(ValueError, match="names method 'dtem'"):
        config_from_args(parser.parse_args(["--method", "tcvit", "--method-option", "dtem.tau=0.2"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["--distill", "--distill-weight", "1.5"])
    backbone = config_from_args(parser.parse_args(["--mode", "backbone", "--init-modules", "m.safetensors",
                                                   "--backbone-lr", "2e-5"]))
    assert (backbone.method, backbone.mode, backbone.backbone_lr) == ("dtem", "backbone", 2e-5)
    with pytest.raises(ValueError, match="at --backbone-lr.*drop --lr"):
        config_from_args(parser.parse_args(["--mode", "backbone", "--lr", "1e-5"]))
    with pytest.raises(ValueError, match="tome has none: drop --mode"):
        config_from_args(parser.parse_args(["--method", "tome", "--mode", "backbone"]))



def _train_parser():
    import argparse

    from tokenmerge.commands.train import _configure

    parser = argparse.ArgumentParser()
    _configure(parser)
    return parser


@pytest.mark.parametrize("argv,message", [
    (["--method", "tome", "--backbone-lr", "1e-3", "--tau", "0.3", "--embed-dim", "8"],
     "--backbone-lr, --tau, --embed-dim set up --method dtem; --method tome has no merge embeddings and trains "
     "only the ViT, at --lr: drop --backbone-lr, --tau, --embed-dim (the ViT's learning rate is --lr)"),
    (["--method", "tcvit", "--hidden-dim", "32"], "--hidden-dim sets up --method dtem; --method tcvit has no"),
    (["--mode", "modular", "--backbone-lr", "1e-4"],
     "--backbone-lr is the ViT's learning rate, and --mode modular keeps the ViT frozen"),
    (["--mode", "backbone", "--init-modules", "m.safetensors", "--tau", "0.2"],
     "--tau is the temperature of DTEM's soft merge in modular and end2end training; --mode backbone merges hard"),
])
def test_cli_refuses_dtem_settings_the_method_or_mode_does_not_read(argv, message):
    from tokenmerge.commands.train import config_from_args

    with pytest.raises(ValueError, match=re.escape(message)):
        config_from_args(_train_parser().parse_args(argv))


def test_cli_passes_the_dtem_settings_where_they_are_read_and_none_elsewhere():
    from tokenmerge.commands.train import config_from_args

    parser = _train_parser()
    end2end = config_from_args(parser.parse_args(["--mode", "end2end", "--backbone-lr", "2e-5", "--tau", "0.3",
                                                  "--embed-dim", "8", "--hidden-dim", "32"]))
    assert (end2end.backbone_lr, end2end.tau, end2end.embed_dim, end2end.hidden_dim) == (2e-5, 0.3, 8, 32)
    backbone = config_from_args(parser.parse_args(["--mode", "backbone", "--init-modules", "m.safetensors",
                                                   "--embed-dim", "8"]))
    assert (backbone.embed_dim, backbone.tau) == (8, None)
    tome = config_from_args(parser.parse_args(["--method", "tome"]))
    assert (tome.backbone_lr, tome.tau, tome.embed_dim, tome.hidden_dim) == (None, None, None, None)
    assert learning_rates(tome) == (1e-5, None)


def _recorded(out: Path) -> dict:
    config = json.loads((out / "results.json").read_text())["config"]
    return {key: config[key] for key in ("lr", "backbone_lr", "tau", "embed_dim", "hidden_dim")}


def _initial_lrs(out: Path) -> list:
    groups = torch.load(out / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"]
    return [group["initial_lr"] for group in groups]


def test_a_run_records_only_the_settings_it_reads(tiny_setup, tmp_path):
    from tokenmerge.cli import main

    # The CLI repro: tome at the --lr default; before, --backbone-lr 1e-3 was accepted, ignored and recorded.
    args = ["train", "vit_tiny_patch16_224", "--data", str(tiny_setup / "train"), "--checkpoint",
            str(tiny_setup / "tiny.safetensors"), "--model-kwargs", json.dumps(TINY), "--r", "3",
            "--max-steps", "1", "--batch-size", "4", "--eval-r", "--no-progress"]
    assert main(args + ["--method", "tome", "--out", str(tmp_path / "tome")]) == 0
    assert _initial_lrs(tmp_path / "tome") == [1e-5]
    assert _recorded(tmp_path / "tome") == dict(lr=1e-5, backbone_lr=None, tau=None, embed_dim=None, hidden_dim=None)
    # dtem records the defaults it ran with: the soft merge's tau, the modules' shape, the ViT's lr.
    assert main(args + ["--mode", "end2end", "--out", str(tmp_path / "end2end")]) == 0
    assert _initial_lrs(tmp_path / "end2end") == [1e-3, 1e-5]
    assert _recorded(tmp_path / "end2end") == dict(lr=1e-3, backbone_lr=1e-5, tau=0.1, embed_dim=64, hidden_dim=None)
    # Through the Python API the settings a run does not read are accepted, and recorded as None.
    train(_config(tiny_setup, tmp_path / "modular", max_steps=1, backbone_lr=1e-2, eval_r=[]))
    assert _recorded(tmp_path / "modular") == dict(lr=1e-2, backbone_lr=None, tau=0.2, embed_dim=16, hidden_dim=None)
    modules = str(tmp_path / "modular" / "dtem_modules.safetensors")
    train(_config(tiny_setup, tmp_path / "backbone", mode="backbone", init_modules=modules, max_steps=1, eval_r=[]))
    assert _initial_lrs(tmp_path / "backbone") == [1e-5]
    assert _recorded(tmp_path / "backbone") == dict(lr=None, backbone_lr=1e-5, tau=None, embed_dim=16, hidden_dim=None)


@pytest.mark.parametrize("method,mode", [("tome", "end2end"), ("dtem", "modular")])
def test_checkpoints_that_recorded_unread_settings_still_resume(tiny_setup, tmp_path, method, mode):
    """Checkpoints written before unread settings were recorded as None hold their old defaults."""
    config = _config(tiny_setup, tmp_path, method=method, mode=mode)
    with pytest.raises(Killed):
        train(config, on_step=_kill_at(3))
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    saved = json.loads(state["config"])
    # What such a checkpoint held for the settings this run does not read: the old defaults.
    old = dict(backbone_lr=1e-5, tau=0.1, embed_dim=64, hidden_dim=None) if method == "tome" else dict(backbone_lr=1e-5)
    assert not set(old) & set(saved)
    saved.update(old)
    state["config"] = json.dumps(saved, sort_keys=True)
    torch.save(state, tmp_path / "checkpoint.pt")
    assert train(config, resume=True)["steps"] == 5


# --- hardening: checkpoints are data, divergence stops the run, runs never mix ------------

class OpensAFile:
    """Unpickling this creates ``path``: the side effect a malicious checkpoint would have."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _never_called(step):
    raise AssertionError(f"training reached step {step}; the input should have been refused before step 1")


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    import random

    from tokenmerge.training import _rng_state, _set_rng_state

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in the Python state
    torch.save(_rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1))
    _set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])


def test_malicious_checkpoint_is_not_unpickled_on_resume(tiny_setup, tmp_path):
    marker = tmp_path / "pwned"
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"format": "tokenmerge-train-checkpoint", "step": OpensAFile(marker)}, out / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"checkpoint\.pt.*pickled Python object.*--overwrite"):
        train(_config(tiny_setup, out), resume=True, on_step=_never_called)
    assert not marker.exists()


def test_damaged_checkpoints_are_named(tiny_setup, tmp_path):
    train(_config(tiny_setup, tmp_path / "run", max_steps=2))
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    whole = checkpoint.read_bytes()
    checkpoint.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"checkpoint\.pt.*corrupt, truncated"):
        train(_config(tiny_setup, tmp_path / "run", max_steps=4), resume=True, on_step=_never_called)
    torch.save({"model": {}}, checkpoint)  # loadable, but not a training checkpoint
    with pytest.raises(ValueError, match=r"checkpoint\.pt is not a tokenmerge training checkpoint"):
        train(_config(tiny_setup, tmp_path / "run", max_steps=4), resume=True, on_step=_never_called)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_setup, tmp_path):
    from tokenmerge.training import TrainingDivergedError

    def diverge_after_step_2(step):
        if step == 2:  # the checkpoint of step 2 is written; now the weights blow up
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.fill_(float("nan"))

    model = timm.create_model("vit_tiny_patch16_224", num_classes=4, **TINY)
    model.load_state_dict(load_file(str(tiny_setup / "tiny.safetensors")))
    config = _config(tiny_setup, tmp_path, mode="end2end", checkpoint_every=2, eval_r=[3])
    with pytest.raises(TrainingDivergedError, match=r"loss became nan at step 3.*step 2.*--lr.*--overwrite"):
        train(config, model=model, on_step=diverge_after_step_2)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 2
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
    assert _logged_steps(tmp_path) == [1, 2]
    assert not any((tmp_path / name).exists() for name in ("model.safetensors", "results.json"))


def test_a_huge_learning_rate_fails_instead_of_reporting_an_accuracy(tiny_setup, tmp_path):
    """The issue's case: --lr 1e6 used to save NaN modules, report an accuracy and exit 0."""
    from tokenmerge.training import TrainingDivergedError

    with pytest.raises(TrainingDivergedError, match="diverged"):
        train(_config(tiny_setup, tmp_path, method="tome", mode="end2end", lr=1e6, warmup_steps=0,
                      max_steps=8, eval_r=[3]))
    assert not (tmp_path / "results.json").exists()
    if (tmp_path / "checkpoint.pt").exists():
        saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
        assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())


def test_non_finite_weights_are_never_checkpointed(tiny_setup, tmp_path):
    from tokenmerge.training import TrainingDivergedError, build_model, save_checkpoint

    config = _config(tiny_setup, tmp_path)
    model = build_model(config)
    optimizer = torch.optim.AdamW(model.token_reducer.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(1, 5))
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, model, optimizer, scheduler, 1, config)
    with torch.no_grad():
        next(model.token_reducer.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(TrainingDivergedError, match=r"diverged by step 2.*token_reducer.*last good state"):
        save_checkpoint(path, model, optimizer, scheduler, 2, config)
    assert torch.load(path, weights_only=True)["step"] == 1


def test_an_existing_run_is_refused_without_resume_or_overwrite(tiny_setup, tmp_path):
    first = train(_config(tiny_setup, tmp_path, max_steps=2))
    before = {name: (tmp_path / name).read_bytes() for name in ("checkpoint.pt", "train_log.jsonl", "results.json")}
    with pytest.raises(FileExistsError, match=r"already holds a training run.*--resume.*--overwrite"):
        train(_config(tiny_setup, tmp_path, max_steps=3), on_step=_never_called)
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    with pytest.raises(ValueError, match="pass one of them"):
        train(_config(tiny_setup, tmp_path, max_steps=3), resume=True, overwrite=True, on_step=_never_called)
    # --overwrite removes the earlier run only once the new one has passed its checks.
    with pytest.raises(ValueError, match="class folders"):
        train(_config(tiny_setup, tmp_path, max_steps=3, num_classes=5, checkpoint=None), overwrite=True,
              on_step=_never_called)
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    train(_config(tiny_setup, tmp_path, max_steps=3), overwrite=True)
    assert _logged_steps(tmp_path) == [1, 2, 3]  # a fresh log, not appended to the old one
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 3 != first["steps"]
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        train(_config(tiny_setup, tmp_path / "file"), on_step=_never_called)


def test_resume_repairs_a_log_torn_by_the_kill(tiny_setup, tmp_path):
    with pytest.raises(Killed):
        train(_config(tiny_setup, tmp_path), on_step=_kill_at(3))
    with open(tmp_path / "train_log.jsonl", "a") as handle:
        handle.write('{"step": 4, "epo')  # killed while writing the next row
    train(_config(tiny_setup, tmp_path), resume=True)
    assert _logged_steps(tmp_path) == [1, 2, 3, 4, 5]


def test_class_counts_and_eval_data_are_checked_before_step_1(tiny_setup, tmp_path):
    three_classes = tmp_path / "three"
    three_classes.mkdir()
    for c in range(3):
        (three_classes / f"class{c}").symlink_to(tiny_setup / "train" / f"class{c}", target_is_directory=True)
    with pytest.raises(ValueError, match=r"head predicts 4 classes but the training data \(--data\) .*three has 3"):
        train(_config(tiny_setup, tmp_path / "a", data=str(three_classes)), on_step=_never_called)
    with pytest.raises(ValueError, match=r"head predicts 4 classes but the evaluation data \(--eval-data\) .*three has 3"):
        train(_config(tiny_setup, tmp_path / "b", eval_data=str(three_classes), eval_r=[2]), on_step=_never_called)
    with pytest.raises(FileNotFoundError, match=r"evaluation data .*nowhere.*--eval-data"):
        train(_config(tiny_setup, tmp_path / "c", eval_data=str(tmp_path / "nowhere"), eval_r=[2]),
              on_step=_never_called)


@pytest.mark.parametrize("setting,value,message", [
    ("lr", -1e-3, "--lr must be a finite number > 0"),
    ("lr", float("nan"), "--lr must be a finite number > 0"),
    ("backbone_lr", 0.0, "--backbone-lr must be a finite number > 0"),
    ("epochs", float("inf"), "--epochs must be a finite number > 0"),
    ("warmup_steps", -1, "--warmup-steps must be an integer >= 0"),
    ("weight_decay", float("nan"), "--weight-decay must be a finite number >= 0"),
    ("mixup", -0.5, "--mixup must be a finite number >= 0"),
    ("cutmix", float("inf"), "--cutmix must be a finite number >= 0"),
    ("r", True, "--r must be an integer >= 1"),
    ("seed", 10**9, "--seed must be at most"),
    ("model_kwargs", [1], "--model-kwargs must be a JSON object"),
    ("device", "banana", "unknown device 'banana'"),
])
def test_bad_optimiser_and_run_settings_are_refused(tiny_setup, tmp_path, setting, value, message):
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        train(_config(tiny_setup, tmp_path, **{setting: value}), on_step=_never_called)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_cli_train_refuses_an_existing_run_and_bad_arguments(tiny_setup, tmp_path, capsys):
    from tokenmerge.cli import main

    args = ["train", "vit_tiny_patch16_224", "--data", str(tiny_setup / "train"), "--checkpoint",
            str(tiny_setup / "tiny.safetensors"), "--model-kwargs", json.dumps(TINY), "--r", "3",
            "--embed-dim", "16", "--max-steps", "1", "--batch-size", "4", "--eval-r", "--no-progress",
            "--out", str(tmp_path)]
    assert main(args) == 0
    assert main(args) == 2
    assert "pass --resume to continue it or --overwrite to replace it" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    for bad, message in ((["--lr", "-1"], "argument --lr: must be a finite number > 0"),
                         (["--epochs", "inf"], "argument --epochs: must be a finite number"),
                         (["--threads", "0"], "argument --threads: must be at least 1"),
                         (["--resume", "--overwrite"], "not allowed with argument"),
                         (["--out", str(tiny_setup / "tiny.safetensors")], "is a file, not a folder")):
        with pytest.raises(SystemExit):
            main(args + bad)
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("setting,value,message", [
    ("distill_temperature", float("nan"), "--distill-temperature must be a finite number > 0"),
    ("distill_temperature", float("inf"), "--distill-temperature must be a finite number > 0"),
    ("distill_weight", float("nan"), "--distill-weight must lie in (0, 1]"),
    ("distill_weight", True, "--distill-weight must lie in (0, 1]"),
    ("teacher", "", "--teacher must be a non-empty name or path"),
])
def test_bad_distillation_settings_are_refused(tiny_setup, tmp_path, setting, value, message):
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        train(_config(tiny_setup, tmp_path, distill=True, **{setting: value}), on_step=_never_called)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_cli_distillation_arguments_use_the_finite_number_types():
    import argparse

    from tokenmerge.commands.train import _configure

    parser = argparse.ArgumentParser()
    _configure(parser)
    for bad in (["--distill-temperature", "inf"], ["--distill-temperature", "0"], ["--distill-weight", "nan"],
                ["--distill-weight", "x"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["--distill"] + bad)


# --- Hugging Face image classifiers: tokenmerge train hf:DIR -----------------------------------
# The tiny HF ViT (conftest): 16 patches + 1 class token, 2 layers, 3 classes.


def _hf_config(hf_vit_dir: Path, data: Path, out: Path, **overrides) -> TrainConfig:
    base = dict(method="tome", mode="end2end", data=str(data), model=f"hf:{hf_vit_dir}", r=2, tau=0.2,
                embed_dim=16, max_steps=3, batch_size=4, lr=1e-2, backbone_lr=1e-2, warmup_steps=1,
                out=str(out), checkpoint_every=2, progress=False)
    base.update(overrides)
    return TrainConfig(**base)


def _hf_state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _hf_logits(model, images: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.eval()(images).logits


@pytest.mark.parametrize("method,mode", [("tome", "end2end"), ("tcvit", "end2end"), ("dtem", "modular")])
def test_hugging_face_classifiers_train_and_keep_their_token_counts(hf_vit_dir, tiny_image_folder, tmp_path,
                                                                     method, mode):
    from tokenmerge.models import load_model

    model = load_model(f"hf:{hf_vit_dir}")
    original = _hf_state(model)
    seen = []  # (training, tokens) reaching the final norm in each forward
    model.vit.layernorm.register_forward_hook(lambda module, inputs, output: seen.append((module.training, inputs[0].shape[1])))
    summary = train(_hf_config(hf_vit_dir, tiny_image_folder, tmp_path, method=method, mode=mode), model=model)
    assert summary["steps"] == 3
    if mode == "end2end":
        # 17 tokens, 2 removed in each of the 2 layers, in every training step.
        assert seen == [(True, 13)] * 3
        trained = load_model(f"hf:{tmp_path / 'model'}")  # save_pretrained: loads without tokenmerge
        assert type(trained).__name__ == "ViTForImageClassification"
        assert trained.state_dict().keys() == original.keys()  # no parameters of their own
        for key in ("vit.layers.0.attention.q_proj.weight", "vit.layers.1.mlp.fc2.weight", "classifier.weight"):
            assert not torch.equal(trained.state_dict()[key], original[key]), key
        assert not (tmp_path / "model.safetensors").exists()
    else:
        # Frozen ViT in eval mode; soft merging keeps every token while training.
        assert seen == [(False, 17)] * 3
        ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
        assert ckpt["model"] and all(k.startswith("vit.token_reducer.") for k in ckpt["model"])
        for key, value in original.items():
            assert torch.equal(model.state_dict()[key], value), key
        trained = load_file(str(tmp_path / "dtem_modules.safetensors"))
        fresh = tokenmerge_patch(load_model(f"hf:{hf_vit_dir}"), method="dtem", r=2, embed_dim=16)
        initial = fresh.vit.token_reducer.state_dict()
        assert any(not torch.equal(trained[k], initial[k]) for k in initial)
        assert not (tmp_path / "model").exists()
    assert model.vit.token_reducer.name == method and model.vit.tokens_per_block() == [17, 15, 13]


def test_hugging_face_backbone_mode_merges_hard_in_training_and_keeps_the_modules(hf_vit_dir, tiny_image_folder,
                                                                                  tmp_path):
    from tokenmerge.models import load_model

    train(_hf_config(hf_vit_dir, tiny_image_folder, tmp_path / "modular", method="dtem", mode="modular", max_steps=1))
    modules = tmp_path / "modular" / "dtem_modules.safetensors"
    model = load_model(f"hf:{hf_vit_dir}")
    original = _hf_state(model)
    seen = []
    model.vit.layernorm.register_forward_hook(lambda module, inputs, output: seen.append((module.training, inputs[0].shape[1])))
    out = tmp_path / "backbone"
    train(_hf_config(hf_vit_dir, tiny_image_folder, out, method="dtem", mode="backbone", init_modules=str(modules)),
          model=model)
    # The ViT trains (dropout on) with the hard merge of inference: 17 -> 13 tokens, not the soft 17.
    assert seen == [(True, 13)] * 3
    trained = load_model(f"hf:{out / 'model'}")
    assert not torch.equal(trained.state_dict()["classifier.weight"], original["classifier.weight"])
    start, after = load_file(str(modules)), load_file(str(out / "dtem_modules.safetensors"))
    assert all(torch.equal(after[k], start[k]) for k in start)


def tokenmerge_patch(model, **kwargs):
    import tokenmerge

    return tokenmerge.patch(model, **kwargs)


@pytest.mark.parametrize("kind", ["deit_teacher", "dinov2", "clip_classifier"])
def test_every_hugging_face_classifier_family_trains_with_distillation(tiny_image_folder, tmp_path, kind):
    from tokenmerge.backends.adapter import adapter_for

    from .conftest import tiny_hf_classifier

    model = tiny_hf_classifier(kind)
    original = _hf_state(model)
    # model= with config.model None: the folder name only matters to a resume's settings check.
    summary = train(_hf_config("unused", tiny_image_folder, tmp_path, model=None, max_steps=1, distill=True),
                    model=model)
    assert summary["steps"] == 1 and summary["config"]["teacher_fingerprint"]
    adapter = adapter_for(model)
    assert adapter.tokens_per_block()[-1] == adapter.num_tokens - 4
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, original[k])]
    assert any("classifier" in k for k in moved) and any("layer" in k for k in moved)
    assert (tmp_path / "model" / "config.json").is_file()


def test_hugging_face_end2end_round_trip_reproduces_the_trained_logits(hf_vit_dir, tiny_image_folder, tmp_path):
    import tokenmerge
    from tokenmerge.evaluation.sweep import Variant, build_variant
    from tokenmerge.models import load_model

    model = load_model(f"hf:{hf_vit_dir}")
    train(_hf_config(hf_vit_dir, tiny_image_folder, tmp_path, method="dtem", max_steps=2), model=model)
    images = torch.randn(3, 3, 32, 32)
    expected = _hf_logits(model, images)  # the trained model, patched with its trained modules
    assert not torch.equal(expected, _hf_logits(tokenmerge.patch(load_model(f"hf:{hf_vit_dir}"), method="dtem",
                                                                 r=2, embed_dim=16), images))
    modules = tmp_path / "dtem_modules.safetensors"
    reloaded = tokenmerge.patch(load_model(f"hf:{tmp_path / 'model'}"), method="dtem", r=2, embed_dim=16)
    tokenmerge.load_merge_modules(reloaded, modules)
    torch.testing.assert_close(_hf_logits(reloaded, images), expected, atol=1e-6, rtol=0)
    # As tokenmerge eval loads them: the folder, and --method-option modules=FILE.
    variant = build_variant(load_model(f"hf:{tmp_path / 'model'}"), Variant.create("dtem", 2, {"modules": str(modules)}))
    torch.testing.assert_close(_hf_logits(variant, images), expected, atol=1e-6, rtol=0)
    # ... and the modules saved again from a Hugging Face model are the same file contents.
    again = tokenmerge.save_merge_modules(reloaded, tmp_path / "again.safetensors")
    assert load_file(str(again)).keys() == load_file(str(modules)).keys()


@pytest.mark.parametrize("method,mode,distill", [("tcvit", "end2end", False), ("dtem", "modular", True)])
def test_killed_hugging_face_run_resumes_to_identical_parameters(hf_vit_dir, tiny_image_folder, tmp_path,
                                                                  method, mode, distill):
    settings = dict(method=method, mode=mode, distill=distill, max_steps=5)
    assert_killed_run_resumes_identically(
        lambda out: _hf_config(hf_vit_dir, tiny_image_folder, out, **settings), tmp_path)
    if mode == "end2end":
        for key, value in load_file(str(tmp_path / "a" / "model" / "model.safetensors")).items():
            assert torch.equal(value, load_file(str(tmp_path / "b" / "model" / "model.safetensors"))[key]), key


def test_hugging_face_distillation_from_the_student_or_a_folder(hf_vit_dir, tiny_image_folder, tmp_path):
    import transformers

    from .conftest import HF_VIT
    from tokenmerge.models import load_model

    model = load_model(f"hf:{hf_vit_dir}")
    original = _hf_state(model)
    summary = train(_hf_config(hf_vit_dir, tiny_image_folder, tmp_path / "copy", distill=True, distill_weight=1.0,
                               distill_temperature=2.0, max_steps=2), model=model)
    assert summary["config"]["teacher_fingerprint"]
    log = [json.loads(line) for line in (tmp_path / "copy" / "train_log.jsonl").read_text().splitlines()]
    # The first step's student is the teacher merging 2 tokens per layer: a small, non-zero KL.
    assert all(math.isfinite(row["loss"]) and row["loss"] > 0 for row in log)
    assert not torch.equal(model.state_dict()["classifier.weight"], original["classifier.weight"])
    # A teacher folder: another Hugging Face classifier of the same classes and input size.
    torch.manual_seed(1)
    transformers.ViTForImageClassification(transformers.ViTConfig(**dict(HF_VIT, num_hidden_layers=3))).save_pretrained(
        tmp_path / "teacher")
    other = train(_hf_config(hf_vit_dir, tiny_image_folder, tmp_path / "folder", distill=True,
                             teacher=f"hf:{tmp_path / 'teacher'}", max_steps=2))
    assert other["config"]["teacher_fingerprint"] != summary["config"]["teacher_fingerprint"]
    torch.manual_seed(1)
    transformers.ViTForImageClassification(transformers.ViTConfig(**dict(HF_VIT, num_labels=5))).save_pretrained(
        tmp_path / "five")
    with pytest.raises(ValueError, match="teacher predicts 5 classes but the student has 3"):
        train(_hf_config(hf_vit_dir, tiny_image_folder, tmp_path / "c", distill=True, teacher=f"hf:{tmp_path / 'five'}"))
    with pytest.raises(ValueError, match=r"checkpoint file, which a Hugging Face student .* --teacher hf:DIR"):
        train(_hf_config(hf_vit_dir, tiny_image_folder, tmp_path / "d", distill=True,
                         teacher=str(tmp_path / "teacher" / "model.safetensors")))
    with pytest.raises(ValueError, match="names its own architecture: drop --teacher-model"):
        train(_hf_config(hf_vit_dir, tiny_image_folder, tmp_path / "e", distill=True,
                         teacher=f"hf:{tmp_path / 'teacher'}", teacher_model="vit_tiny_patch16_224"))
    assert not any((tmp_path / name).exists() for name in "cde")


def test_hugging_face_gradient_checkpointing_recomputes_merging_layers(hf_vit_dir, tiny_image_folder, tmp_path):
    from tokenmerge.models import load_model

    runs = {}
    for checkpointed in (False, True):
        model = load_model(f"hf:{hf_vit_dir}")
        if checkpointed:
            # gradient_checkpointing_enable before transformers 5 (now a deprecated alias).
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        calls = []  # layer 0 merges nothing (its own forward), layer 1 merges 2 tokens
        for i, layer in enumerate(model.vit.layers):
            # A pre-hook: the recompute may stop early, after the last tensor backward needs.
            layer.attention.q_proj.register_forward_pre_hook(lambda module, inputs, i=i: calls.append(i))
        train(_hf_config(hf_vit_dir, tiny_image_folder, tmp_path / str(checkpointed), r=[0, 2], max_steps=2),
              model=model)
        # Each layer runs again in backward when checkpointed, through HF's checkpoint or tokenmerge's.
        assert sorted(calls) == sorted([0, 0, 1, 1] * (2 if checkpointed else 1))
        runs[checkpointed] = _hf_state(model)
    for key, value in runs[False].items():
        torch.testing.assert_close(runs[True][key], value, atol=1e-6, rtol=0)


def test_hugging_face_models_training_cannot_use_are_refused(hf_vit_dir, tiny_image_folder, tiny_setup, tmp_path):
    import transformers

    from .conftest import HF_VIT

    trunk = transformers.ViTModel(transformers.ViTConfig(**HF_VIT))
    with pytest.raises(TypeError, match=r"training needs a classifier.*ViTModel has no classification head"):
        train(_hf_config(hf_vit_dir, tiny_image_folder, tmp_path / "a"), model=trunk, on_step=_never_called)
    with pytest.raises(ValueError, match=r"head predicts 3 classes .* has 4 class folders.*config.num_labels is 4"):
        train(_hf_config(hf_vit_dir, tiny_setup / "train", tmp_path / "b"), on_step=_never_called)
    with pytest.raises(ValueError, match="--checkpoint describe timm models"):
        train(_hf_config(hf_vit_dir, tiny_image_folder, tmp_path / "c", checkpoint=str(tiny_setup / "tiny.safetensors")),
              on_step=_never_called)
    assert not any((tmp_path / name).exists() for name in "abc")


def test_cli_trains_a_hugging_face_folder_then_evaluates_the_result(hf_vit_dir, tiny_image_folder, tmp_path, capsys):
    from tokenmerge.cli import main

    out = tmp_path / "run"
    args = ["train", f"hf:{hf_vit_dir}", "--method", "tome", "--data", str(tiny_image_folder), "--r", "2",
            "--max-steps", "2", "--batch-size", "4", "--lr", "1e-3", "--eval-data", str(tiny_image_folder),
            "--no-progress", "--threads", "1", "--out", str(out)]
    assert main(args) == 0
    trained = json.loads((out / "results.json").read_text())
    assert trained["files"]["model"] == str(out / "model") and set(trained["accuracy"]) == {"2"}
    assert main(args) == 2  # an existing run
    assert "pass --resume to continue it" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    capsys.readouterr()
    code = main(["eval", f"hf:{out / 'model'}", "--data", str(tiny_image_folder), "--methods", "tome", "--r", "2",
                 "--out", str(tmp_path / "eval"), "--no-timing", "--threads", "1"])
    assert code == 0
    rows = json.loads((tmp_path / "eval" / "results.json").read_text())["rows"]
    assert rows[1]["schedule"] == "2" and rows[1]["accuracy"] == pytest.approx(trained["accuracy"]["2"])


# --- what train does with what it is given -------------------------------------------------


def test_hugging_face_training_normalises_images_as_evaluation_does(hf_vit_dir, tmp_path):
    """A folder whose preprocessor_config.json says mean/std 0.5 (AugReg, Google ViTs) trains on
    the tensors evaluation feeds it, not on ImageNet-normalised ones."""
    import shutil

    from tokenmerge.evaluation.inputs import inputs_for
    from tokenmerge.models import load_model

    folder = tmp_path / "vit05"
    shutil.copytree(hf_vit_dir, folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    # One flat colour per image: any crop or flip of it is the same tensor, so each training
    # input must equal one of evaluation's.
    data = tmp_path / "flat"
    for c in range(3):
        (data / f"class{c}").mkdir(parents=True)
        for i in range(4):
            pixels = np.full((40, 40, 3), 40 * c + 50 * i + 10, dtype=np.uint8)
            Image.fromarray(pixels).save(data / f"class{c}" / f"{i}.png")
    model = load_model(f"hf:{folder}")
    expected = inputs_for(model).load(data)[0]
    assert torch.allclose(expected[0], torch.full_like(expected[0], (10 / 255 - 0.5) / 0.5), atol=1e-6)
    seen = []  # (student?, inputs); the default teacher, a copy of the model, keeps the hook
    model.register_forward_pre_hook(lambda module, args: seen.append((module is model, args[0].detach().clone())))
    train(_hf_config(folder, data, tmp_path / "run", max_steps=2, distill=True), model=model)
    student = [inputs for own, inputs in seen if own]
    assert len(student) == 2
    for image in torch.cat(student):
        assert any(torch.allclose(image, reference, atol=1e-5) for reference in expected)
    # The teacher (after its blank probe) got the very same batches.
    teacher = [inputs for own, inputs in seen if not own][1:]
    assert len(teacher) == 2 and all(torch.equal(a, b) for a, b in zip(teacher, student))
    # A teacher whose weights expect other statistics would get inputs it was not trained on.
    with pytest.raises(ValueError, match=r"teacher .* expects inputs prepared with .*0\.485.* student's .*0\.5"):
        train(_hf_config(folder, data, tmp_path / "other", distill=True, teacher=f"hf:{hf_vit_dir}"),
              on_step=_never_called)
    assert not (tmp_path / "other").exists()


def test_resume_is_exact_with_dropout_and_drop_path(tiny_setup, tmp_path):
    """Each iter(DataLoader) without a generator of its own draws from the global RNG, which
    also draws the dropout masks; a resumed run starts one more iterator than the run it replays."""
    settings = dict(method="tome", mode="end2end", max_steps=4, checkpoint_every=2,
                    model_kwargs=dict(TINY, drop_path_rate=0.2, drop_rate=0.2))
    train(_config(tiny_setup, tmp_path / "a", **settings))
    with pytest.raises(Killed):
        train(_config(tiny_setup, tmp_path / "b", **settings), on_step=_kill_at(2))
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["step"] == 2
    train(_config(tiny_setup, tmp_path / "b", **settings), resume=True)
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    # Dropout was on: without it the weights come out otherwise.
    train(_config(tiny_setup, tmp_path / "c", **dict(settings, model_kwargs=dict(TINY))))
    c = torch.load(tmp_path / "c" / "checkpoint.pt", weights_only=True)
    assert any(not torch.equal(a["model"][key], c["model"][key]) for key in a["model"])


@pytest.mark.parametrize("mode", ["modular", "end2end"])
def test_soft_dtem_training_refuses_prop_attn_off(tiny_setup, tmp_path, mode):
    with pytest.raises(ValueError, match=r"prop_attn=False would train another model.*--method-option prop_attn=false"):
        train(_config(tiny_setup, tmp_path / "run", mode=mode, method_options={"prop_attn": False}),
              on_step=_never_called)
    assert not (tmp_path / "run").exists()
    # The hard merges of backbone mode, and the other methods, take it.
    _config(tiny_setup, tmp_path, mode="backbone", init_modules="m.safetensors",
            method_options={"prop_attn": False}).check()
    _config(tiny_setup, tmp_path, method="tome", mode="end2end", method_options={"prop_attn": False}).check()


def test_a_patched_model_is_refused(tiny_setup, tmp_path):
    import tokenmerge
    from tokenmerge.models import load_model

    model = load_model("vit_tiny_patch16_224", checkpoint=str(tiny_setup / "tiny.safetensors"), **TINY)
    tokenmerge.patch(model, method="tome", r=3)
    # With distill, its copy would be a merging teacher.
    with pytest.raises(ValueError, match=r"already patched.*unpatch it first: tokenmerge\.unpatch\(model\)"):
        train(_config(tiny_setup, tmp_path / "run", method="tome", mode="end2end", distill=True), model=model,
              on_step=_never_called)
    assert not (tmp_path / "run").exists()


def test_a_model_a_modular_run_froze_trains_again_in_the_next_run(tiny_setup, tmp_path):
    import tokenmerge
    from tokenmerge.models import load_model

    model = load_model("vit_tiny_patch16_224", checkpoint=str(tiny_setup / "tiny.safetensors"), **TINY)
    train(_config(tiny_setup, tmp_path / "modular", max_steps=1, eval_r=[]), model=model)
    assert not model.blocks[0].attn.qkv.weight.requires_grad  # the modular run froze the ViT
    for method, mode in (("dtem", "end2end"), ("tome", "end2end")):
        tokenmerge.unpatch(model)
        before = model.blocks[0].attn.qkv.weight.detach().clone()
        train(_config(tiny_setup, tmp_path / method, method=method, mode=mode, max_steps=1, backbone_lr=1e-2,
                      eval_r=[]), model=model)
        assert not torch.equal(model.blocks[0].attn.qkv.weight, before), method
        assert all(p.requires_grad for p in model.parameters())


def test_a_parameter_group_with_nothing_to_train_is_refused(tiny_setup, tmp_path):
    from tokenmerge.training import _set_train_mode, build_model

    config = _config(tiny_setup, tmp_path)
    model = build_model(config)
    model.token_reducer.embeds = torch.nn.ModuleList()  # a policy without parameters
    with pytest.raises(ValueError, match="no parameters to train in the merge modules"):
        _set_train_mode(model, config)


@pytest.mark.parametrize("method,mode,argv,expected", [
    ("dtem", "modular", [], (1e-3, None)),
    ("dtem", "end2end", ["--mode", "end2end"], (1e-3, 1e-5)),
    ("dtem", "backbone", ["--mode", "backbone", "--init-modules", "m.safetensors"], (None, 1e-5)),
    ("tome", "end2end", ["--method", "tome"], (1e-5, None)),
    ("tcvit", "end2end", ["--method", "tcvit"], (1e-5, None)),
])
def test_the_api_and_the_cli_resolve_the_same_learning_rates(method, mode, argv, expected):
    from tokenmerge.commands.train import config_from_args

    api = TrainConfig(method=method, mode=mode, init_modules="m.safetensors" if mode == "backbone" else None)
    assert learning_rates(api) == learning_rates(config_from_args(_train_parser().parse_args(argv))) == expected


def test_the_api_fine_tunes_the_vit_at_the_clis_default_lr(tiny_setup, tmp_path):
    train(_config(tiny_setup, tmp_path, method="tome", mode="end2end", lr=None, max_steps=1, eval_r=[]))
    assert _initial_lrs(tmp_path) == [1e-5]
    assert _recorded(tmp_path)["lr"] == 1e-5


def test_dtem_agglomerative_constant_r_is_checked_in_every_block_before_training(tiny_setup, tmp_path):
    # 17 tokens, 1 protected: r=8 fits block 0 (8 of 16); block 1 has 9 tokens, where the patch
    # clamps to clustering's 7 but the soft bipartite merge of training removes at most 4.
    clustered = dict(r=8, method_options={"matching": "agglomerative"})
    message = (r"--r 8 with matching='agglomerative' removes 7 tokens in block 1.*at most 4 there.*"
               r"r=\[8, 4\] \(CLI: --r 8,4\).*train_r=8 \(CLI: --method-option train_r=8\)")
    for mode in ("modular", "end2end"):
        with pytest.raises(ValueError, match=message):
            train(_config(tiny_setup, tmp_path / mode, mode=mode, **clustered), on_step=_never_called)
        assert not (tmp_path / mode).exists()
    # Either remedy trains.
    assert train(_config(tiny_setup, tmp_path / "list", r=[8, 4], max_steps=1, eval_r=[],
                         method_options={"matching": "agglomerative"}))["steps"] == 1
    from tokenmerge.core.schedule import ScheduleClampedWarning

    with pytest.warns(ScheduleClampedWarning, match=re.escape("effective schedule: [8, 7]")):  # the hard plan's
        assert train(_config(tiny_setup, tmp_path / "train_r", r=8, max_steps=1, eval_r=[],
                             method_options={"matching": "agglomerative", "train_r": 8}))["steps"] == 1


def test_torchrun_processes_get_their_own_gpu_and_the_backend_of_their_device():
    from tokenmerge.training import _process_device, _process_group_backend

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    # A bare cuda under torchrun: this process's GPU, not GPU 0 for every rank.
    assert _process_device(cuda, local_rank=1, world=2, cuda_available=True, cuda_count=2) == torch.device("cuda:1")
    assert _process_device(None, local_rank=1, world=2, cuda_available=True, cuda_count=2) == torch.device("cuda:1")
    # An explicit index, a single process, or no CUDA: as asked.
    assert _process_device(torch.device("cuda:0"), local_rank=1, world=2, cuda_available=True) == torch.device("cuda:0")
    assert _process_device(cuda, local_rank=0, world=1, cuda_available=True) == cuda
    assert _process_device(None, local_rank=0, world=1, cuda_available=True) == torch.device("cuda:0")
    assert _process_device(None, local_rank=1, world=2, cuda_available=False) == cpu
    assert _process_device(cpu, local_rank=1, world=2, cuda_available=True) == cpu
    with pytest.raises(ValueError, match=r"local rank 2.*2 CUDA device\(s\).*--nproc_per_node"):
        _process_device(cuda, local_rank=2, world=3, cuda_available=True, cuda_count=2)
    # The backend follows the device, not whether the machine has a GPU.
    assert _process_group_backend(cpu) == "gloo"
    assert _process_group_backend(torch.device("cuda:1")) == "nccl"


def test_the_process_group_is_initialised_for_the_chosen_device(monkeypatch):
    """--device cpu on a GPU machine under torchrun: gloo, and no GPU is touched."""
    import torch.distributed as dist

    from tokenmerge.training import _distributed

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: calls.append(("init", backend)))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    assert _distributed(torch.device("cpu")) == (1, 2, torch.device("cpu"))
    assert calls == [("init", "gloo")]
    calls.clear()
    assert _distributed(torch.device("cuda")) == (1, 2, torch.device("cuda:1"))
    assert calls == [("set_device", torch.device("cuda:1")), ("init", "nccl")]
