"""Accuracy and speed of token merging on the trained spoken-digit AST (issue 12).

For each r: val accuracy (600 clips of 4 voices unseen in training) of ToMe and of the
token-drop bound (``drop``: tokens removed at no cost, the speed ceiling), and clips/s of the
whole classifier, all variants timed interleaved in one run (ratios only: the box is shared).

    python benchmarks/spoken_words.py && python benchmarks/ast_merging.py --r 4 8 12 16
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import tokenmerge
from ast_tokens import MODEL_DIR, VAL_DIR, load_val


def accuracy(model, x, y) -> float:
    with torch.inference_mode():
        pred = torch.cat([model(x[i: i + 100]).logits.argmax(-1) for i in range(0, len(y), 100)])
    return 100.0 * float((pred == y).float().mean())


def clips_per_second(models: dict, batch: torch.Tensor, repeats: int) -> dict:
    """Median clips/s of each model, timed round-robin so load changes hit all alike."""
    times = {name: [] for name in models}
    with torch.inference_mode():
        for _ in range(repeats + 1):
            for name, model in models.items():
                start = time.perf_counter()
                model(batch)
                times[name].append(time.perf_counter() - start)
    return {name: len(batch) / sorted(t[1:])[len(t[1:]) // 2] for name, t in times.items()}


def main() -> None:
    from transformers import ASTForAudioClassification

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=MODEL_DIR)
    parser.add_argument("--data", type=Path, default=VAL_DIR)
    parser.add_argument("--r", type=int, nargs="+", default=[4, 8, 12, 16])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    x, y = load_val(args.model, args.data)

    def build(method=None, r=0):
        model = ASTForAudioClassification.from_pretrained(args.model, dtype=torch.float32).eval()
        return model if method is None else tokenmerge.patch(model, method=method, r=r)

    models = {"unmodified": build()}
    for r in args.r:
        models[f"tome r={r}"] = build("tome", r)
        models[f"drop r={r}"] = build("drop", r)
    speed = clips_per_second(models, x[: args.batch_size], args.repeats)
    rows = []
    for name, model in models.items():
        trunk = model.audio_spectrogram_transformer
        tokens = trunk.tokens_per_block() if tokenmerge.is_patched(model) else [107]
        rows.append({"variant": name, "tokens_out": tokens[-1], "val_top1": accuracy(model, x, y),
                     "clips_per_s": speed[name], "speedup": speed[name] / speed["unmodified"]})
        print(json.dumps(rows[-1]), flush=True)
    if args.json is not None:
        meta = {"machine": f"{platform.machine()} CPU, {args.threads} thread(s)", "torch": torch.__version__,
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "clips": len(y), "rows": rows}
        args.json.write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    main()
