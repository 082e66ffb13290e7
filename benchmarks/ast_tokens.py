"""Unmodified spoken-digit AST: val accuracy, and throughput at a few token counts (one CPU thread).

Why: before token merging lands for AST, record the baseline it has to beat and how much
time the encoder spends per token. Accuracy is measured only for the full model (107
tokens). The rows with fewer tokens time the *same* trained encoder fed the first N tokens
(CLS, distillation and the first N - 2 patch tokens, with their position embeddings): that
is the speed a method reaching N tokens at the input would get, a ceiling for merging, which
removes tokens progressively. Their accuracy is not meaningful and is not reported.

    OMP_NUM_THREADS=1 python benchmarks/ast_tokens.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tokenmerge.evaluation.audio import load_audio_folder  # noqa: E402


def encoder_seconds(model, embeddings: torch.Tensor, repeats: int) -> float:
    """Median seconds of encoder + final norm + head on embeddings [B, N, D]."""
    ast = model.audio_spectrogram_transformer
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first call warms up
            start = time.perf_counter()
            hidden = embeddings
            for layer in ast.layers:  # transformers 5 keeps the blocks on ASTModel itself
                hidden = layer(hidden, None)
                hidden = hidden[0] if isinstance(hidden, tuple) else hidden
            hidden = ast.layernorm(hidden)
            model.classifier((hidden[:, 0] + hidden[:, 1]) / 2)
            times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]


MODEL_DIR = REPO / "benchmarks" / "models" / "ast_spoken_digits"
VAL_DIR = REPO / ".data" / "spoken_words" / "val"


def load_val(model_dir: Path, data_dir: Path) -> tuple:
    """``(features [N, frames, mel], labels [N])`` of ``data_dir``, with the feature settings
    the model in ``model_dir`` was trained with (its ``features.json``)."""
    feats = json.loads((model_dir / "features.json").read_text())
    x, y, classes = load_audio_folder(data_dir, feats["sample_rate"], feats["num_mel_bins"], feats["num_frames"],
                                      mean=feats["mean"], std=feats["std"])
    if classes != feats["classes"]:
        raise SystemExit(f"{data_dir} classes {classes} differ from the model's {feats['classes']}")
    return x, y


def main(argv=None) -> None:
    from transformers import ASTForAudioClassification

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=MODEL_DIR)
    p.add_argument("--data", type=Path, default=VAL_DIR)
    p.add_argument("--tokens", type=int, nargs="+", default=[107, 80, 54, 28])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)

    model = ASTForAudioClassification.from_pretrained(args.model, dtype=torch.float32).eval()
    x, y = load_val(args.model, args.data)
    with torch.no_grad():
        pred = torch.cat([model(x[i: i + 100]).logits.argmax(-1) for i in range(0, len(y), 100)])
    acc = 100.0 * float((pred == y).float().mean())
    print(f"val accuracy (unmodified, {len(y)} clips): {acc:.2f}%")

    with torch.no_grad():
        full = model.audio_spectrogram_transformer.embeddings(x[: args.batch_size])
    rows = []
    for n in args.tokens:
        seconds = encoder_seconds(model, full[:, :n].contiguous(), args.repeats)
        rows.append({"tokens": n, "clips_per_s": args.batch_size / seconds})
    base = rows[0]["clips_per_s"]
    print(f"| tokens | clips/s (batch {args.batch_size}, 1 thread) | speed-up |")
    print("|---:|---:|---:|")
    for row in rows:
        print(f"| {row['tokens']} | {row['clips_per_s']:.0f} | {row['clips_per_s'] / base:.2f}x |")


if __name__ == "__main__":
    main()
