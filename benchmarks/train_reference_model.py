"""Train a shallower reference ViT for Imagenette (a 6- or 9-block ViT-Tiny/16) on one CPU thread.

Why: accuracy claims of token-merging methods should hold on more than the one shipped
model (12-block ViT-Tiny). Training from scratch is far too slow on a CPU, so this script
builds ``vit_tiny_patch16_224`` with ``--depth`` blocks (default 6), initialises it from the
shipped 12-block Imagenette checkpoint (patch/pos embeddings, class token, the first
``--depth`` blocks, final norm, head; the later blocks are dropped) and fine-tunes ALL parameters on the Imagenette train split.

Recipe (fixed in advance, nothing is chosen on the val split): AdamW (weight decay 0.05,
none on biases/norms/embeddings), linear warmup then cosine decay, label smoothing 0.1,
RandomResizedCrop(224, scale=(0.35, 1)) + horizontal flip + ImageNet normalisation, batch
64, float32, one thread, fixed seed. A stratified ``--holdout`` fraction of TRAIN is kept
out of training and used for sanity checks (``--pilot`` runs: choose the lr there).

A checkpoint is written after every epoch (``--resume`` continues from it). At the end the
weights are saved as float16 safetensors with timm key names plus a JSON sidecar holding the
recipe, steps, wall time, machine and accuracies (holdout; val once, unless ``--no-val``).

    OMP_NUM_THREADS=1 python benchmarks/train_reference_model.py --epochs 3
    OMP_NUM_THREADS=1 python benchmarks/train_reference_model.py --depth 9 --epochs 2 \
        --work-dir runs/model3 --output benchmarks/models/vit_tiny_d9_patch16_224.imagenette.safetensors
    OMP_NUM_THREADS=1 python benchmarks/train_reference_model.py --pilot 60 --lr 3e-4   # lr check
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="vit_tiny_patch16_224", help="timm architecture name")
    p.add_argument("--depth", type=int, default=6, help="number of transformer blocks kept")
    p.add_argument("--init", type=Path, default=SHARED / "models" / "vit_tiny_patch16_224.imagenette.safetensors",
                   help="deeper checkpoint to take the first --depth blocks from")
    p.add_argument("--data", type=Path, default=SHARED / "data" / "imagenette")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    p.add_argument("--min-lr", type=float, default=1e-6)
    p.add_argument("--warmup-frac", type=float, default=0.05, help="fraction of all steps spent warming up")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--crop-scale", type=float, default=0.35, help="RandomResizedCrop lower scale")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--holdout", type=float, default=0.05, help="stratified fraction of TRAIN held out")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--pilot", type=int, default=None, metavar="STEPS",
                   help="lr check: train STEPS steps (schedule as for --epochs), report holdout, save nothing")
    p.add_argument("--work-dir", type=Path, default=REPO / "runs" / "model2", help="per-epoch checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from WORK_DIR/last.pt")
    p.add_argument("--output", type=Path,
                   default=REPO / "benchmarks" / "models" / "vit_tiny_d6_patch16_224.imagenette.safetensors")
    p.add_argument("--no-val", action="store_true", help="skip the final val-split evaluation")
    return p.parse_args(argv)


def log(*parts) -> None:
    print(time.strftime("%H:%M:%S"), *parts, flush=True)


# ----------------------------------------------------------------------------- model
def build_model(args) -> nn.Module:
    """``arch`` with ``depth`` blocks, initialised from the first blocks of ``--init``."""
    import timm
    from safetensors.torch import load_file

    model = timm.create_model(args.arch, depth=args.depth, num_classes=args.num_classes)
    state = load_file(str(args.init))
    kept = {}
    for key, value in state.items():
        if key.startswith("blocks.") and int(key.split(".")[1]) >= args.depth:
            continue
        kept[key] = value.float()
    model.load_state_dict(kept, strict=True)  # every remaining key must match by name and shape
    log(f"init: {args.arch} depth={args.depth} from {args.init.name} "
        f"({len(kept)} of {len(state)} tensors kept), {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params")
    return model.float()


def param_groups(model: nn.Module, weight_decay: float):
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.ndim <= 1 or name in ("cls_token", "pos_embed"):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup to 1 over ``warmup`` steps, then cosine to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------- data
def datasets(args):
    """Train (augmented) and holdout (centre) subsets of TRAIN, split per class by the seed."""
    from torchvision import datasets as tvd, transforms as T

    train_tf = T.Compose([
        T.RandomResizedCrop(224, scale=(args.crop_scale, 1.0)),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    eval_tf = T.Compose([T.Resize(224), T.CenterCrop(224), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    root = args.data / "train"
    train_full = tvd.ImageFolder(str(root), transform=train_tf)
    eval_full = tvd.ImageFolder(str(root), transform=eval_tf)
    by_class = {}
    for index, (_, label) in enumerate(train_full.samples):
        by_class.setdefault(label, []).append(index)
    rng = random.Random(args.seed)
    train_idx, hold_idx = [], []
    for label in sorted(by_class):
        indices = by_class[label][:]
        rng.shuffle(indices)
        n_hold = round(len(indices) * args.holdout)
        hold_idx += indices[:n_hold]
        train_idx += indices[n_hold:]
    Subset = torch.utils.data.Subset
    return Subset(train_full, sorted(train_idx)), Subset(eval_full, sorted(hold_idx))


@torch.inference_mode()
def accuracy(model: nn.Module, dataset, batch_size: int = 128) -> float:
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    correct = total = 0
    for images, labels in loader:
        correct += (model(images).argmax(-1) == labels).sum().item()
        total += len(labels)
    return 100.0 * correct / total


def val_accuracy(model: nn.Module, args):
    """(top-1, image count) on the val split; called once, after training, for reporting."""
    from torchvision import datasets as tvd, transforms as T

    tf = T.Compose([T.Resize(224), T.CenterCrop(224), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    val_set = tvd.ImageFolder(str(args.data / "val"), transform=tf)
    return accuracy(model, val_set), len(val_set)


# ----------------------------------------------------------------------------- training
def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)

    train_set, holdout_set = datasets(args)
    steps_per_epoch = len(train_set) // args.batch_size  # drop_last
    total_steps = steps_per_epoch * args.epochs
    warmup = max(1, round(args.warmup_frac * total_steps))
    log(f"train {len(train_set)} / holdout {len(holdout_set)} images; {steps_per_epoch} steps/epoch x "
        f"{args.epochs} epochs = {total_steps} steps, warmup {warmup}, peak lr {args.lr:g}, threads {torch.get_num_threads()}")

    model = build_model(args)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.999))
    min_ratio = args.min_lr / args.lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, min_ratio))
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)

    args.work_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = args.work_dir / "last.pt"
    start_epoch, step, wall = 0, 0, 0.0
    if args.resume and ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, step, wall = ckpt["epoch"], ckpt["step"], ckpt["wall_s"]
        log(f"resumed from {ckpt_path}: epoch {start_epoch}, step {step}, {wall:.0f}s trained so far")

    stop_at = args.pilot if args.pilot is not None else total_steps
    for epoch in range(start_epoch, args.epochs):
        if step >= stop_at:
            break
        # Each epoch's order and augmentations depend only on (seed, epoch): resuming repeats them.
        torch.manual_seed(args.seed * 1000 + epoch)
        order = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True,
                                             drop_last=True, num_workers=0, generator=order)
        model.train()
        t_epoch = time.perf_counter()
        t_log, seen, loss_sum = time.perf_counter(), 0, 0.0
        for images, labels in loader:
            loss = criterion(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            seen += len(labels)
            loss_sum += loss.item()
            if step % args.log_every == 0:
                now = time.perf_counter()
                log(f"epoch {epoch + 1} step {step}/{total_steps} loss {loss_sum / args.log_every:.4f} "
                    f"lr {scheduler.get_last_lr()[0]:.2e} {seen / (now - t_log):.1f} img/s")
                t_log, seen, loss_sum = now, 0, 0.0
            if step >= stop_at:
                break
        wall += time.perf_counter() - t_epoch
        if args.pilot is not None:
            break
        hold = accuracy(model, holdout_set)
        log(f"epoch {epoch + 1} done: step {step}, {wall:.0f}s training wall time, holdout top-1 {hold:.2f}%")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "step": step, "wall_s": wall,
                    "holdout": hold}, ckpt_path.with_suffix(".tmp"))
        os.replace(ckpt_path.with_suffix(".tmp"), ckpt_path)

    if args.pilot is not None:
        log(f"pilot: lr {args.lr:g}, {step} steps, {wall:.0f}s, holdout top-1 {accuracy(model, holdout_set):.2f}%")
        return
    finish(model, args, step, total_steps, warmup, wall, len(train_set), len(holdout_set))


def finish(model, args, step, total_steps, warmup, wall, n_train, n_holdout) -> None:
    """Save float16 safetensors + JSON sidecar; report holdout and (once) val top-1."""
    from safetensors.torch import save_file
    import timm

    half = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    save_file(half, str(args.output))
    # Accuracies of the weights as shipped: float16 file, loaded back in float32.
    model.load_state_dict({k: v.float() for k, v in half.items()})
    hold = accuracy(model, _holdout(args))
    val, n_val = (None, None) if args.no_val else val_accuracy(model, args)
    log(f"final: holdout top-1 {hold:.2f}%" + ("" if val is None else f", val top-1 {val:.2f}%"))
    meta = {
        "file": args.output.name,
        "arch": args.arch, "timm_kwargs": {"depth": args.depth, "num_classes": args.num_classes},
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "init": f"{args.init.name}: patch_embed, pos_embed, cls_token, blocks 0..{args.depth - 1}, norm, head",
        "recipe": {
            "optimizer": "AdamW betas (0.9, 0.999), no decay on biases/norms/cls_token/pos_embed",
            "lr": args.lr, "min_lr": args.min_lr, "schedule": "linear warmup then cosine, per step",
            "warmup_steps": warmup, "weight_decay": args.weight_decay,
            "label_smoothing": args.label_smoothing, "batch_size": args.batch_size, "epochs": args.epochs,
            "augmentation": f"RandomResizedCrop(224, scale=({args.crop_scale}, 1)) + horizontal flip + ImageNet normalisation",
            "precision": "float32", "seed": args.seed,
        },
        "data": {"train_images": n_train, "holdout_images": n_holdout,
                 "holdout": f"stratified {args.holdout:.0%} of {_shown(args.data / 'train')} (seed {args.seed}), not trained on"},
        "steps": step, "train_wall_s": round(wall), "threads": args.threads,
        "machine": f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), {args.threads} thread(s)",
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__, "timm": timm.__version__,
        "holdout_top1": round(hold, 2), "val_top1": None if val is None else round(val, 2),
        "val_images": n_val,
        "eval": "Resize(224)+CenterCrop(224), float32, weights loaded from the float16 file",
    }
    sidecar = args.output.with_suffix(".json")
    sidecar.write_text(json.dumps(meta, indent=2) + "\n")
    log(f"wrote {args.output} ({args.output.stat().st_size / 1e6:.2f} MB) and {sidecar}")


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it lies beside it (no machine-specific prefix)."""
    return os.path.relpath(path, REPO) if path.resolve().is_relative_to(REPO.parent) else str(path)


def _holdout(args):
    return datasets(args)[1]


if __name__ == "__main__":
    main()
