"""Speed of configurations against ToMe at the same GFLOPs (issue 9): shared MLPs
(``mlp_share``), ATC, or any other ``best.json``, and confidence cascades
(``tokenmerge.ConfidenceCascade`` by ``fraction``: each batch runs a fixed share again, so
its speed does not depend on the weights either; GFLOPs are the mean per image).

Times, interleaved in one process, the unmodified model, ToMe at constant r=16 (-50%
GFLOPs on a 12-block ViT at 224px) and each ``best.json`` given, on the same random batch;
prints images/s, the speedup over the unmodified model and the counted GFLOPs. Random
weights of the named timm architecture: speed does not depend on them.

    python benchmarks/config_speed.py --configs benchmarks/results/tune_share_r16/best_r16/best.json \
        --model vit_small_patch16_224 --batch-size 32 --threads 2
    python benchmarks/config_speed.py --r 13 --cascades atc:16:0.082 --batch-size 64 --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from pathlib import Path

import timm
import torch

import tokenmerge
from tokenmerge.cascade import ConfidenceCascade, cascade_gflops, select_fallback
from tokenmerge.evaluation.flops import count_gflops
from tokenmerge.evaluation.throughput import measure_throughput
from tokenmerge.evaluation.tune import read_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=Path, nargs="*", default=[], help="best.json files")
    parser.add_argument("--cascades", nargs="*", default=[],
                        help="METHOD:R:FRACTION, a ConfidenceCascade of that merged member by fraction")
    parser.add_argument("--r", type=int, default=16, help="the ToMe constant r timed beside them")
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")

    def build(**config):
        torch.manual_seed(0)
        model = timm.create_model(args.model, num_classes=10).eval()
        return tokenmerge.patch(model, **config) if config else model

    variants = {"unmodified": build(), f"ToMe r={args.r}": build(method="tome", r=args.r)}
    for path in args.configs:
        variants[str(path)] = build(**read_config(path))
    gflops = {name: count_gflops(model) for name, model in variants.items()}
    for spec in args.cascades:
        method, r, fraction = spec.split(":")
        name = f"cascade {method} r={r}, fraction {fraction}"
        variants[name] = ConfidenceCascade(build(), method=method, r=int(r), fraction=float(fraction)).eval()
        # The share of each batch the cascade itself picks (select_fallback's rounding).
        share = select_fallback(torch.zeros(args.batch_size), fraction=float(fraction)).float().mean().item()
        gflops[name] = cascade_gflops(count_gflops(variants[name].fast), gflops["unmodified"], share)
    speed = measure_throughput(variants, batch_size=args.batch_size, warmup=3, repeats=args.repeats)
    base = speed["unmodified"]["images_per_s"]
    rows = []
    for name in variants:
        rows.append({"variant": name, "gflops": gflops[name], "images_per_s": speed[name]["images_per_s"],
                     "speedup": speed[name]["images_per_s"] / base})
        print(f"{name:60s} {rows[-1]['gflops']:.3f} GFLOPs  {rows[-1]['images_per_s']:7.1f} im/s  x{rows[-1]['speedup']:.2f}")
    if args.out is not None:
        meta = {"machine": f"{platform.machine()} CPU, {args.threads} threads", "torch": torch.__version__,
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": args.model,
                "batch_size": args.batch_size, "rows": rows}
        args.out.write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    main()
