"""Probe (issue 10): distil the class token of every block, not only the logits.

On the train images the teacher already gets right (97.6%), its 10 logits say little the
merged student does not already match. The class token after each block is kept by every
merging method, so the student can be asked to match it too: 12 x 192 numbers per image on
the shipped ViT-Tiny instead of 10. This trains ToMe end to end with section 8's recipe
(3,200 train images, 100 steps of 32, lr 1e-5, AdamW, 10 warm-up steps then cosine,
distillation weight 0.5 at T=1, seed 0, the trainer's augmentation and data order) and adds

    beta * mean over blocks of ||cls_student - cls_teacher||^2 / mean ||cls_teacher||^2

then evaluates on the full val. ``--beta 0`` is the logit-only recipe, run by the same loop
so that the two differ in the added term alone.

    OMP_NUM_THREADS=1 python benchmarks/class_token_distill.py --beta 0 --threads 1
    OMP_NUM_THREADS=1 python benchmarks/class_token_distill.py --beta 1 --threads 1
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

from tokenmerge.distillation import frozen_copy, training_loss
from tokenmerge.evaluation.accuracy import evaluate_accuracy
from tokenmerge.evaluation.data import load_images
from tokenmerge.models import load_model
from tokenmerge.training import SeededAugment, _StepSampler, epoch_indices, training_set, warmup_cosine

import tokenmerge

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenette"


def class_tokens(model) -> list:
    """Forward-pre hooks that record the class token entering every block after the first and
    the final norm, i.e. the class token after each block; returns the list they fill."""
    found = []

    def record(module, args):
        found.append(args[0][:, 0])

    for block in list(model.blocks)[1:]:
        block.norm1.register_forward_pre_hook(record)
    model.norm.register_forward_pre_hook(record)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--beta", type=float, required=True)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="write results JSON here")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    student = load_model()
    teacher = frozen_copy(student)
    tokenmerge.patch(student, method="tome", r=args.r)
    student.train()
    student_cls, teacher_cls = class_tokens(student), class_tokens(teacher)

    dataset = training_set(student, DATA / "train", limit=3200)
    data = SeededAugment(dataset, seed=0)
    batch = 32
    indices = epoch_indices(len(dataset), 0, 0)[: args.steps * batch]
    loader = torch.utils.data.DataLoader(data, batch_size=batch, sampler=_StepSampler(0, indices, 0), drop_last=True)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(10, args.steps))
    started = time.time()
    for step, (images, labels) in enumerate(loader, 1):
        student_cls.clear()
        teacher_cls.clear()
        with torch.no_grad():
            targets = teacher(images)
        logits = student(images)
        loss = training_loss(logits, labels, targets, weight=0.5, temperature=1.0)
        if args.beta:
            feature = torch.stack([(s - t).pow(2).sum(-1).mean() / t.pow(2).sum(-1).mean()
                                   for s, t in zip(student_cls, teacher_cls)]).mean()
            loss = loss + args.beta * feature
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 20 == 0:
            print(f"step {step} loss {loss.item():.4f} ({time.time() - started:.0f} s)", flush=True)
    train_seconds = time.time() - started
    student.eval()
    x, y, _ = load_images(DATA / "val")
    result = {"beta": args.beta, "r": args.r, "steps": args.steps, "train_seconds": train_seconds,
              "val_top1": evaluate_accuracy(student, x, y, batch_size=125)}
    print(json.dumps(result))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
