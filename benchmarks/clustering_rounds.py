"""Per-image complete linkage: one join at a time against rounds, on a real ViT-Tiny block.

Takes the shipped Imagenette ViT-Tiny, records the input of block ``--block`` on val images,
builds ATC's clustering similarity (size criterion ``tau_size=40``, all sizes 1) and times
``agglomerative_clustering`` with the threshold and cap of that block in a per-image
``best.json``, at several batch sizes, each way (the size bound
``tokenmerge.core.clustering.ROUNDS_MAX_ELEMENTS`` forced to 0 or to infinity), interleaved.
It also checks that both ways give the same labels.

    python benchmarks/clustering_rounds.py --config benchmarks/results/per_image/vit_tiny_r16/best.json --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

import tokenmerge.core.clustering as clustering
from tokenmerge.evaluation.data import image_folder
from tokenmerge.models import load_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenette"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="a per-image ATC best.json")
    parser.add_argument("--block", type=int, default=5)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 32])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    config = json.loads(args.config.read_text())
    threshold, cap = config["options"]["threshold"][args.block], config["r"][args.block]

    val = image_folder(DATA / "val")
    step = len(val) // args.images
    images = torch.stack([val[i * step][0] for i in range(args.images)])
    model = load_model()
    recorded = {}
    model.blocks[args.block].attn.register_forward_hook(lambda module, inputs, output: recorded.update(x=inputs[0]))
    with torch.inference_mode():
        model(images)
        similarity, _ = clustering.clustering_similarity(recorded["x"], 1, torch.ones(len(images), recorded["x"].shape[1], 1), 40)
        print(f"`{' '.join(['python'] + sys.argv)}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
              f"{args.threads} thread(s), block {args.block}, threshold {threshold:.4f}, cap {cap}, M = {similarity.shape[1]}\n")
        print("| batch | one at a time: ms | rounds: ms | speedup of rounds |")
        print("|---|---|---|---|")
        for batch in args.batch_sizes:
            chunks = [similarity[i:i + batch] for i in range(0, len(images) - batch + 1, batch)]
            seconds = {"joins": 0.0, "rounds": 0.0}
            labels = {}
            for bound, name in ((0, "joins"), (float("inf"), "rounds")):  # a warm-up pass each
                clustering.ROUNDS_MAX_ELEMENTS = bound
                labels[name] = [clustering.agglomerative_clustering(c, cap, "complete", threshold) for c in chunks]
            if any(not torch.equal(a, b) for a, b in zip(labels["joins"], labels["rounds"])):
                raise SystemExit(f"batch {batch}: the two ways gave different labels")
            for _ in range(3):
                for bound, name in ((0, "joins"), (float("inf"), "rounds")):
                    clustering.ROUNDS_MAX_ELEMENTS = bound
                    started = time.perf_counter()
                    for c in chunks:
                        clustering.agglomerative_clustering(c, cap, "complete", threshold)
                    seconds[name] += time.perf_counter() - started
            calls = 3 * len(chunks)
            joins_ms, rounds_ms = 1e3 * seconds["joins"] / calls, 1e3 * seconds["rounds"] / calls
            print(f"| {batch} | {joins_ms:.2f} | {rounds_ms:.2f} | x{joins_ms / rounds_ms:.2f} |")


if __name__ == "__main__":
    main()
