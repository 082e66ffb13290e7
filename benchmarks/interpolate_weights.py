"""Weight-space interpolation of a fine-tuned ViT with the weights it started from (issue 10).

WiSE-FT (Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022): the
weights ``alpha * fine_tuned + (1 - alpha) * start`` often beat both ends, since the
fine-tune moves the model along a direction whose first part helps and whose rest fits
the fine-tuning data. Several fine-tuned files are averaged first (a uniform soup).

    python benchmarks/interpolate_weights.py --alpha 0.5 --out wise.safetensors runs/.../model.safetensors
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safetensors.torch import load_file, save_file

SHIPPED = Path(__file__).resolve().parents[1] / "tokenmerge" / "assets" / "vit_tiny_patch16_224.imagenette.safetensors"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fine_tuned", nargs="+", type=Path)
    parser.add_argument("--start", type=Path, default=SHIPPED, help="the weights the fine-tunes started from")
    parser.add_argument("--alpha", type=float, required=True, help="weight of the fine-tuned end (0: start, 1: fine-tuned)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    start = load_file(args.start)
    tuned = [load_file(path) for path in args.fine_tuned]
    for path, weights in zip(args.fine_tuned, tuned):
        if set(weights) != set(start):
            raise SystemExit(f"{path} has other keys than {args.start}: not a fine-tune of it")
    mixed = {key: (args.alpha * sum(w[key].float() for w in tuned) / len(tuned)
                   + (1 - args.alpha) * value.float()).contiguous() for key, value in start.items()}
    save_file(mixed, args.out)


if __name__ == "__main__":
    main()
