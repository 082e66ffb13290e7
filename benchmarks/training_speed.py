"""Training-step speed and memory with token reduction (fp32, CPU by default).

A training step is what ``tokenmerge train`` does per batch: forward (in train mode, with
the method's training-time reduction), loss, backward, AdamW step. Variants: the
unmodified model fine-tuned, ToMe at several r, DTEM end-to-end (soft merging: the token
count stays N in training), DTEM's backbone mode around the shipped modules (the ViT
trains, the modules merge as at inference: matched at r=16, or clustered at the tuned -50%
schedule of BENCHMARKS.md section 8e), TC-ViT, EViT-style and pruning end-to-end (hard
plans), and ToMe with distillation from the frozen unmodified model (one extra teacher
forward).

Speed: every variant lives in one process with its own model copy and optimizer; after
``--warmup`` steps each, the variants are timed round-robin (one step of each per round,
``--repeats`` rounds), so a change in the shared machine's load hits all of them alike.
Images/s is the batch size over the median step time; ratios are to the unmodified
model's median from the same rounds.

Memory: each variant again in a fresh subprocess (``--memory-of NAME``), which builds the
variant and runs one step (so that AdamW's state exists and the library code that
backward touches is paged in: code pages count in RSS and would otherwise swamp the
difference), then resets the kernel's peak-RSS mark (``/proc/self/clear_refs``, Linux),
reads the RSS, runs ``--memory-steps`` more steps and reads the peak (``VmHWM``). The
subprocess runs with a fixed glibc mmap threshold (``MALLOC_MMAP_THRESHOLD_=65536``): by
default glibc raises the threshold after large frees and then keeps freed tensors in its
heap, so the RSS before the measured steps would depend on what the first step left
behind (it varied by 450 MiB between variants); with the threshold fixed, tensors
(>= 64 KiB) go back to the system when freed and the baseline is the same for all.
Reported: that peak, and the peak minus the RSS before those steps: what a training step
itself needs on top of the model, its gradients-to-be and the optimizer state, i.e. the
activations kept for backward and the transient buffers. Peak RSS, not torch's
allocator: on CPU torch keeps no peak statistics of its own.

    python benchmarks/training_speed.py --threads 2 --batch-size 32 \\
        --out benchmarks/results/training_speed
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # this checkout's package, whatever is installed

from tokenmerge.distillation import frozen_copy, teacher_logits, training_loss  # noqa: E402
from tokenmerge.evaluation.tune import read_config  # noqa: E402
from tokenmerge.models import load_model  # noqa: E402
from tokenmerge.training import TrainConfig, _set_train_mode, build_model  # noqa: E402

SHIPPED_MODULES = str(REPO / "tokenmerge/assets/dtem_vit_tiny_patch16_224.imagenette.r16.safetensors")
CLUSTERED = read_config(REPO / "benchmarks/results/dtem_matching/tune_dtem_agg_r16/best.json")

# name -> (TrainConfig overrides, or None for the unmodified model; distill from the frozen copy)
VARIANTS = {
    "unmodified": (None, False),
    "tome r=8": (dict(method="tome", r=8), False),
    "tome r=13": (dict(method="tome", r=13), False),
    "tome r=16": (dict(method="tome", r=16), False),
    "dtem end2end r=16": (dict(method="dtem", mode="end2end", r=16), False),
    "dtem backbone r=16": (dict(method="dtem", mode="backbone", r=16, init_modules=SHIPPED_MODULES), False),
    "dtem backbone clustered, tuned -50%": (
        dict(method="dtem", mode="backbone", r=CLUSTERED["r"],
             method_options=dict(CLUSTERED["options"], modules=str(REPO / CLUSTERED["options"]["modules"]))), False),
    "tcvit r=16": (dict(method="tcvit", r=16), False),
    "evit r=16": (dict(method="evit", r=16), False),
    "prune r=16": (dict(method="prune", r=16), False),
    "tome r=16 + distill": (dict(method="tome", r=16), True),
}


class Variant:
    """One model + optimizer + loss, stepping on a fixed batch."""

    def __init__(self, name: str, batch: tuple):
        overrides, distill = VARIANTS[name]
        self.name, self.images, self.labels = name, *batch
        model = load_model()
        self.teacher = frozen_copy(model) if distill else None
        if overrides is None:
            model.train()
            groups = [{"params": list(model.parameters()), "lr": 1e-5}]
        else:
            config = TrainConfig(**dict(dict(mode="end2end", lr=1e-5, backbone_lr=1e-5), **overrides))
            config.check()
            model = build_model(config, model)
            groups = _set_train_mode(model, config)
        self.model = model
        self.optimizer = torch.optim.AdamW(groups, weight_decay=0.05)
        self.tokens_out = None
        model.norm.register_forward_hook(self._count_tokens)

    def _count_tokens(self, module, inputs, output):
        self.tokens_out = inputs[0].shape[1]

    def step(self) -> float:
        started = time.perf_counter()
        logits = self.model(self.images)
        targets = None if self.teacher is None else teacher_logits(self.teacher, self.images)
        loss = training_loss(logits, self.labels, targets, weight=0.5)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return time.perf_counter() - started


def fixed_batch(batch_size: int, num_classes: int = 10) -> tuple:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, 224, 224, generator=generator)
    labels = torch.randint(0, num_classes, (batch_size,), generator=generator)
    return images, labels


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status: the memory measurement needs Linux")


MALLOC_SETTINGS = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def measure_memory(name: str, batch_size: int, steps: int) -> dict:
    """In this (fresh) process: RSS after one step, then the peak RSS over ``steps`` more."""
    import gc

    if any(os.environ.get(k) != v for k, v in MALLOC_SETTINGS.items()):
        raise RuntimeError(f"--memory-of must run with {MALLOC_SETTINGS} in the environment (see the docstring)")
    variant = Variant(name, fixed_batch(batch_size))
    variant.step()
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    before = _status_mib("VmRSS")
    for _ in range(steps):
        variant.step()
    peak = _status_mib("VmHWM")
    return {"rss_before_mib": round(before, 1), "peak_rss_mib": round(peak, 1),
            "step_peak_mib": round(peak - before, 1)}


def memory_in_subprocess(name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--memory-of", name, "--batch-size", str(args.batch_size),
           "--threads", str(args.threads), "--memory-steps", str(args.memory_steps)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=dict(os.environ, **MALLOC_SETTINGS))
    if done.returncode != 0:
        raise RuntimeError(f"memory run of {name!r} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def time_variants(names, args) -> dict:
    batch = fixed_batch(args.batch_size)
    variants = [Variant(name, batch) for name in names]
    for variant in variants:
        for _ in range(args.warmup):
            variant.step()
    times = {v.name: [] for v in variants}
    for round_index in range(args.repeats):
        for variant in variants:
            times[variant.name].append(variant.step())
        print(f"round {round_index + 1}/{args.repeats}: "
              + ", ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items()), file=sys.stderr, flush=True)
    tokens = {v.name: v.tokens_out for v in variants}
    return {name: {"median_s": statistics.median(t), "steps_s": [round(x, 3) for x in t],
                   "tokens_out": tokens[name]} for name, t in times.items()}


def table(rows: list, base: str) -> str:
    ref = next(r for r in rows if r["variant"] == base)
    lines = ["| variant | tokens at the last block (train) | step s (median) | im/s | speed vs unmodified "
             "| peak RSS MiB | step peak MiB | step memory vs unmodified |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['tokens_out']} | {r['median_s']:.2f} | {r['images_per_s']:.1f} | "
            f"{r['images_per_s'] / ref['images_per_s']:.2f}x | {r['peak_rss_mib']:.0f} | {r['step_peak_mib']:.0f} | "
            f"{r['step_peak_mib'] / ref['step_peak_mib']:.2f}x |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # ScheduleClampedWarning at r=16: expected, the table shows the counts
    if args.memory_of:
        print(json.dumps(measure_memory(args.memory_of, args.batch_size, args.memory_steps)))
        return
    if "unmodified" not in args.variants:
        parser.error("the ratios need the 'unmodified' variant")

    started = datetime.now(timezone.utc)
    timed = time_variants(args.variants, args)
    rows = []
    for name in args.variants:
        row = {"variant": name, **timed[name], "images_per_s": args.batch_size / timed[name]["median_s"]}
        row.update(memory_in_subprocess(name, args))
        rows.append(row)
    meta = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "date_utc": started.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, torch {torch.__version__}, "
                   f"{args.threads} thread(s)",
        "model": "vit_tiny_patch16_224 (embedded Imagenette checkpoint), fp32, AdamW",
        "batch_size": args.batch_size, "warmup": args.warmup, "repeats": args.repeats,
    }
    text = table(rows, "unmodified")
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        out.with_suffix(".md").write_text(
            f"Command: `{meta['command']}`\n\nDate (UTC): {meta['date_utc']}; machine: {meta['machine']}; "
            f"{meta['model']}; batch {args.batch_size}, {args.warmup} warm-up steps, {args.repeats} interleaved "
            f"rounds.\n\n{text}\n"
        )


if __name__ == "__main__":
    main()
