"""ONNX Runtime CPU throughput: unmodified vs ToMe vs the token-drop bound, one interleaved run.

Each variant of the embedded ViT-Tiny Imagenette model (unmodified, ToMe at each r, and
"drop" at the same r: tokens cut after attention with no merge work, the speed no merge
method can beat) is exported with :func:`tokenmerge.export_onnx` (checked against PyTorch)
and timed in ONNX Runtime on one random batch. Every repetition runs every session once, in
turn, so load drifts on a shared machine hit all variants alike; figures are medians and
the ratios come from this one run.

    python benchmarks/onnx_speed.py --r 13 16 --batch-size 8 --threads 1 --repeats 10 \
        --json benchmarks/results/onnx_speed.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import tokenmerge
from tokenmerge.export import INPUT_NAME, export_onnx, onnx_session
from tokenmerge.models import load_model


def export_variants(rs, folder: Path) -> dict:
    """``{label: (onnx path, check figures)}`` for the unmodified model and tome/drop at each r."""
    variants = {"unmodified": (None, 0)}
    for r in rs:
        variants[f"tome r={r}"] = ("tome", r)
        variants[f"drop r={r}"] = ("drop", r)
    paths = {}
    for label, (method, r) in variants.items():
        model = load_model()
        if method is not None:
            tokenmerge.patch(model, method=method, r=r)
        result = export_onnx(model, folder / f"{label.replace(' ', '_')}.onnx", check=True)
        paths[label] = (result.path, result.max_abs_diff)
    return paths


def time_sessions(sessions: dict, images: np.ndarray, warmup: int, repeats: int) -> dict:
    """Median seconds per batch of each session, timed interleaved."""
    times = {label: [] for label in sessions}
    for step in range(warmup + repeats):
        for label, session in sessions.items():
            start = time.perf_counter()
            session.run(None, {INPUT_NAME: images})
            if step >= warmup:
                times[label].append(time.perf_counter() - start)
    return {label: statistics.median(samples) for label, samples in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--r", type=int, nargs="+", default=[13, 16])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        exported = export_variants(args.r, Path(folder))
        sessions = {label: onnx_session(path, threads=args.threads) for label, (path, _) in exported.items()}
        images = torch.randn(args.batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(0)).numpy()
        seconds = time_sessions(sessions, images, args.warmup, args.repeats)
    reference = seconds["unmodified"]
    rows = []
    for label, median in seconds.items():
        row = {"variant": label, "images_per_s": args.batch_size / median, "speedup": reference / median,
               "max_abs_diff_vs_torch": exported[label][1]}
        if label.startswith("tome"):
            row["fraction_of_bound"] = seconds[label.replace("tome", "drop")] / median
        rows.append(row)
    result = {
        "model": "vit_tiny_patch16_224 (embedded Imagenette checkpoint)",
        "batch_size": args.batch_size, "intra_op_threads": args.threads, "warmup": args.warmup,
        "repeats": args.repeats, "onnxruntime": ort.__version__, "torch": torch.__version__,
        "machine": platform.machine(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "rows": rows,
    }
    for row in rows:
        bound = row.get("fraction_of_bound")
        print(f"{row['variant']:<12} {row['images_per_s']:8.1f} im/s  {row['speedup']:.2f}x"
              + (f"  {bound:.2f} of bound" if bound is not None else ""))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
