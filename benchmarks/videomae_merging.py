"""Accuracy and speed of token merging on the trained moving-shapes VideoMAE (issue 12).

For each r: val top-1 (480 clips of the synthetic moving-shapes set, another seed than
training) and clips/s of the whole classifier for ToMe, random merging (``random``: per block r
tokens merged into random representatives, the floor a merge *choice* must beat) and the token-drop bound
(``drop``: the same token counts at no cost; it cuts the *last* tokens, i.e. the latest
tubelets in time, so its accuracy is a reference only, its speed the ceiling). All variants
are timed interleaved in one run (ratios only: the box is shared). Tokens merge across space
and time (VideoMAE has no class token); the mean-pooling head is size-weighted.

The clips are read the way ``tokenmerge eval`` reads them
(:func:`tokenmerge.evaluation.inputs.inputs_for`: PyAV, the model folder's normalisation).

    OMP_NUM_THREADS=1 python benchmarks/moving_shapes.py
    OMP_NUM_THREADS=1 python benchmarks/videomae_merging.py --r 8 16 24 32 40 48 \\
        --json benchmarks/results/video/videomae_merging.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import tokenmerge  # noqa: E402
from ast_merging import accuracy  # noqa: E402
from tokenmerge.evaluation.flops import count_gflops  # noqa: E402
from tokenmerge.evaluation.inputs import inputs_for  # noqa: E402
from tokenmerge.evaluation.throughput import measure_throughput  # noqa: E402

MODEL_DIR = REPO / "benchmarks" / "models" / "videomae_moving_shapes"
VAL_DIR = REPO / ".data" / "moving_shapes" / "val"


def main() -> None:
    from transformers import VideoMAEForVideoClassification

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=MODEL_DIR)
    parser.add_argument("--data", type=Path, default=VAL_DIR)
    parser.add_argument("--r", type=int, nargs="+", default=[8, 16, 24, 32, 40, 48])
    parser.add_argument("--methods", nargs="+", default=["tome", "random", "drop"])
    parser.add_argument("--batch-size", type=int, default=16, help="timing batch")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    def build(method=None, r=0):
        model = VideoMAEForVideoClassification.from_pretrained(args.model, dtype=torch.float32).eval()
        return model if method is None else tokenmerge.patch(model, method=method, r=r)

    start = time.time()
    models = {"unmodified": build()}
    x, y, classes = inputs_for(models["unmodified"]).load(args.data)
    if classes != [models["unmodified"].config.id2label[i] for i in range(len(classes))]:
        raise SystemExit(f"{args.data} classes {classes} differ from the model's {models['unmodified'].config.id2label}")
    for r in args.r:
        for method in args.methods:
            models[f"{method} r={r}"] = build(method, r)
    speed = measure_throughput(models, inputs=x[: args.batch_size], warmup=args.warmup, repeats=args.repeats)
    tokens_in = tokenmerge.adapter_for(models["unmodified"]).num_tokens
    rows = []
    for name, model in models.items():
        tokens = model.videomae.tokens_per_block() if tokenmerge.is_patched(model) else [tokens_in]
        rows.append({"variant": name, "tokens_out": tokens[-1], "val_top1": accuracy(model, x, y),
                     "gflops": count_gflops(model, images=x[:1]),
                     "clips_per_s": speed[name]["images_per_s"],
                     "speedup": speed[name]["images_per_s"] / speed["unmodified"]["images_per_s"]})
        print(json.dumps(rows[-1]), flush=True)
    if args.json is not None:
        meta = {"machine": f"{platform.machine()} CPU, {args.threads} thread(s), fp32", "torch": torch.__version__,
                "transformers": __import__("transformers").__version__,
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "clips": len(y),
                "timing_batch": args.batch_size, "warmup": args.warmup, "repeats": args.repeats,
                "wall_s": round(time.time() - start, 1), "tokens_in": tokens_in, "rows": rows}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    main()
