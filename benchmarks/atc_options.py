"""ATC's options (linkage, size criterion), and ATC against ToMe, on train images of two
models (issue 9).

The defaults of `tokenmerge.patch(model, method="atc")` are chosen from this table
(train images only, no val): KL to the unmodified model and top-1 agreement with it at
constant r on the 600 train images outside tune's calibration set
(`benchmarks/holdout_kl.py`'s holdout), for ToMe and ATC with each linkage, and with complete
linkage plus MCTF's size criterion at MCTF's temperature (40), on the shipped 12-block
ViT-Tiny and the 6-block one.

    OMP_NUM_THREADS=1 python benchmarks/atc_options.py --threads 1 --out benchmarks/results/atc/options.md
"""

from __future__ import annotations

from pathlib import Path

import tokenmerge
from tokenmerge.models import load_model

from holdout_kl import holdout_table

ROOT = Path(__file__).resolve().parents[1]
D6 = ROOT / "benchmarks/models/vit_tiny_d6_patch16_224.imagenette.safetensors"
MODELS = [
    ("vit_tiny (12 blocks)", lambda: load_model(), (16, 13)),
    ("vit_tiny_d6 (6 blocks)", lambda: load_model("vit_tiny_patch16_224", checkpoint=D6, num_classes=10, depth=6), (16,)),
]
VARIANTS = ([("tome", {})] + [("atc", {"linkage": linkage}) for linkage in ("complete", "average", "single")]
            + [("atc", {"linkage": "complete", "tau_size": 40.0})])


def patch_variant(method: str, options: dict):
    """A holdout_table variant: ``tokenmerge.patch(model, method=method, r=r, **options)``."""

    def build(label, load, r):
        name = method + "".join(f" {k}={v}" for k, v in options.items())
        return name, tokenmerge.patch(load(), method=method, r=r, **options)

    return build


def main() -> None:
    holdout_table(__doc__.split("\n\n")[0], "atc_options.py", "ATC options (issue 9)", MODELS,
                  [patch_variant(method, options) for method, options in VARIANTS])


if __name__ == "__main__":
    main()
