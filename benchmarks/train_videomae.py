"""Train a small VideoMAE video classifier on the synthetic moving-shapes set, one CPU thread.

Why: token merging on video needs a *trained* video transformer whose accuracy depends on
time (issue 12); ``benchmarks/moving_shapes.py`` builds clips whose class is the motion, this
script trains a tiny ``transformers.VideoMAEForVideoClassification`` from scratch on its train
split and measures accuracy once, at the end, on the val split.

Model: VideoMAEConfig with hidden 128, 4 layers, 4 heads, MLP 512, 8 frames of 64x64,
tubelets of 2 frames x 8x8 pixels -> 4 x 8 x 8 = 256 tokens (no class token), mean pooling
(``fc_norm``), fixed sinusoidal position embedding (VideoMAE's). From scratch: no video
checkpoint can be downloaded here.

Recipe (nothing is chosen on val; val is measured once, at the end): AdamW lr 1e-3, weight
decay 0.05 (none on biases and norms), 10% linear warmup then cosine to 0, batch 32, label
smoothing 0.1, float32, seed 0. Augmentation by the symmetries of the data: a horizontal flip
swaps left/right and the two rotations, a vertical flip swaps up/down and the two rotations,
playing the clip backwards swaps left/right, up/down, the rotations and grow/shrink; each is
applied with probability 1/2 and the label is mapped accordingly. Inputs are normalised with
ImageNet mean/std, as VideoMAE checkpoints are.

How the data and recipe were reached, on TRAIN loss only (val accuracy was never measured
before the final run): with shapes of any colour (darker or brighter than the background,
first on a busier background) every run stayed at chance (train loss 2.08-2.10 = ln 8 with
label smoothing): lr 1e-3 for 140 of 450 steps, then on a calmer background 280 of 450
steps; 100-step pilots on 480 train clips at lr 3e-4 and 3e-3; a 120-step pilot with 16x16
patches (64 tokens). A plumbing check (no augmentation, lr 5e-4) showed the model memorising
48 clips (loss 2.1 -> ~1.6 in 80 steps; val clips of that data version, since regenerated).
So the data generator was changed to draw shapes brighter than the background, which makes
the motion a first-order (linear) signal of frame differences, and this recipe, unchanged,
then learned (loss 1.47 by step 100).

Writes ``benchmarks/models/videomae_moving_shapes/`` (``save_pretrained``: float16
``model.safetensors`` + ``config.json``; ``preprocessor_config.json`` with the normalisation,
which ``tokenmerge eval`` reads) and ``training.json`` there (the run's record).

    OMP_NUM_THREADS=1 python benchmarks/moving_shapes.py
    OMP_NUM_THREADS=1 python benchmarks/train_videomae.py
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from moving_shapes import CLASSES, FRAMES, SIZE  # noqa: E402
from train_ast import _shown, log, param_groups, warmup_cosine_schedule, warmup_steps  # noqa: E402

from tokenmerge.evaluation.data import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from tokenmerge.evaluation.video import load_video_folder  # noqa: E402

# Label maps of the augmentations (class name -> the class the transformed clip shows).
H_FLIP = {"left": "right", "right": "left", "rotate_cw": "rotate_ccw", "rotate_ccw": "rotate_cw"}
V_FLIP = {"up": "down", "down": "up", "rotate_cw": "rotate_ccw", "rotate_ccw": "rotate_cw"}
REVERSE = {"left": "right", "right": "left", "up": "down", "down": "up", "rotate_cw": "rotate_ccw",
           "rotate_ccw": "rotate_cw", "grow": "shrink", "shrink": "grow"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO / ".data" / "moving_shapes", help="output of moving_shapes.py")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "models" / "videomae_moving_shapes")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--patch", type=int, default=8, help="patch side in pixels")
    p.add_argument("--tubelet", type=int, default=2, help="frames per tubelet")
    p.add_argument("--limit", type=int, default=None, help="train on the first N clips of every class (pilots)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after N steps (pilots); no model is saved")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def videomae_config(args, classes):
    from transformers import VideoMAEConfig

    return VideoMAEConfig(
        hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        intermediate_size=4 * args.hidden, image_size=SIZE, patch_size=args.patch, num_frames=FRAMES, tubelet_size=args.tubelet,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, use_mean_pooling=True,
        num_labels=len(classes), id2label=dict(enumerate(classes)), label2id={c: i for i, c in enumerate(classes)},
    )


def label_map(mapping: dict, classes: list) -> torch.Tensor:
    return torch.tensor([classes.index(mapping.get(name, name)) for name in classes])


def augment(x: torch.Tensor, y: torch.Tensor, maps: list, generator: torch.Generator):
    """Flip / reverse a batch [B, T, 3, H, W] per clip, each with probability 1/2, mapping labels."""
    x, y = x.clone(), y.clone()
    for dim, mapping in zip((-1, -2, 1), maps):  # width, height, time
        chosen = torch.rand(len(y), generator=generator) < 0.5
        x[chosen] = x[chosen].flip(dim)
        y[chosen] = mapping[y[chosen]]
    return x, y


@torch.no_grad()
def accuracy(model: nn.Module, videos: torch.Tensor, labels: torch.Tensor, batch_size: int = 64) -> float:
    """Top-1 accuracy in % of ``model`` on videos [N, T, 3, H, W] with labels [N]."""
    model.eval()
    correct = sum(
        int((model(videos[i: i + batch_size]).logits.argmax(-1) == labels[i: i + batch_size]).sum())
        for i in range(0, len(labels), batch_size)
    )
    return 100.0 * correct / len(labels)


def per_class_subset(y: torch.Tensor, limit: int) -> torch.Tensor:
    """Indices of the first ``limit`` clips of every class."""
    return torch.cat([torch.nonzero(y == c).flatten()[:limit] for c in y.unique()])


def main(argv=None) -> None:
    from transformers import VideoMAEForVideoClassification, VideoMAEImageProcessor

    args = parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    for split in ("train", "val"):
        if not (args.data / split).is_dir():
            raise SystemExit(f"{args.data / split} is missing: run benchmarks/moving_shapes.py first")
    start = time.perf_counter()
    train_x, train_y, classes = load_video_folder(args.data / "train", FRAMES, SIZE)
    if classes != sorted(CLASSES):
        raise SystemExit(f"{args.data / 'train'} has classes {classes}, expected {sorted(CLASSES)}")
    if args.limit is not None:
        keep = per_class_subset(train_y, args.limit)
        train_x, train_y = train_x[keep], train_y[keep]
    log(f"train clips {tuple(train_x.shape)} ({time.perf_counter() - start:.0f} s)")

    config = videomae_config(args, classes)
    model = VideoMAEForVideoClassification._from_config(config, attn_implementation="sdpa")
    n_params = sum(p.numel() for p in model.parameters())
    log(f"VideoMAE: {n_params / 1e6:.2f} M parameters, {model.videomae.embeddings.num_patches} tokens")
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr)
    steps_per_epoch = math.ceil(len(train_y) / args.batch_size)
    total = steps_per_epoch * args.epochs
    scheduler = warmup_cosine_schedule(optimizer, total)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    maps = [label_map(m, classes) for m in (H_FLIP, V_FLIP, REVERSE)]
    generator = torch.Generator().manual_seed(args.seed)
    train_start = time.perf_counter()
    history, step_count = [], 0
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_y), generator=generator)
        loss_sum, correct, seen = 0.0, 0, 0
        for step in range(steps_per_epoch):
            idx = order[step * args.batch_size: (step + 1) * args.batch_size]
            x, y = augment(train_x[idx], train_y[idx], maps, generator)
            logits = model(x).logits
            loss = criterion(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(-1) == y).sum())
            seen += len(idx)
            step_count += 1
            if step_count % 20 == 0:
                log(f"step {step_count}/{total}: loss {loss_sum / seen:.3f} (epoch mean so far), "
                    f"{time.perf_counter() - train_start:.0f} s")
            if args.max_steps is not None and step_count >= args.max_steps:
                log(f"pilot stopped after {step_count} steps: train loss {loss_sum / seen:.3f}, "
                    f"{(time.perf_counter() - train_start) / step_count:.2f} s/step; nothing saved")
                return
        row = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc_augmented": 100.0 * correct / seen,
               "wall_s": round(time.perf_counter() - train_start, 1)}
        history.append(row)
        log(f"epoch {epoch + 1}/{args.epochs}: loss {row['train_loss']:.3f}, train acc (augmented) "
            f"{row['train_acc_augmented']:.2f}%, {row['wall_s']:.0f} s")
    train_wall = time.perf_counter() - train_start
    train_acc = accuracy(model, train_x, train_y)
    del train_x
    val_x, val_y, val_classes = load_video_folder(args.data / "val", FRAMES, SIZE)
    if val_classes != classes:
        raise SystemExit(f"train classes {classes} differ from val classes {val_classes}")
    val_acc = accuracy(model, val_x, val_y)
    log(f"train acc {train_acc:.2f}%, val acc {val_acc:.2f}%, training {train_wall / 60:.1f} min")

    args.out.mkdir(parents=True, exist_ok=True)
    model.half().save_pretrained(args.out)  # float16 halves the file; accuracy is re-checked below
    # The normalisation the clips were trained with, where HF (and tokenmerge eval) look for it.
    VideoMAEImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                           image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD)).save_pretrained(args.out)
    reloaded = VideoMAEForVideoClassification.from_pretrained(args.out, dtype=torch.float32)
    val_acc_fp16 = accuracy(reloaded, val_x, val_y)
    record = {
        "command": "OMP_NUM_THREADS=1 python benchmarks/train_videomae.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()} CPU, 1 thread ({platform.processor() or 'unknown'})",
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "args": {k: _shown(v) for k, v in vars(args).items()},
        "parameters": n_params, "tokens": model.videomae.embeddings.num_patches,
        "train_clips": len(train_y), "val_clips": len(val_y),
        "steps": total, "warmup_steps": warmup_steps(total), "train_wall_s": round(train_wall, 1),
        "train_acc": train_acc, "val_acc": val_acc, "val_acc_float16_reloaded": val_acc_fp16, "history": history,
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"saved {args.out} (val acc after float16 round trip {val_acc_fp16:.2f}%)")


if __name__ == "__main__":
    main()
