"""How DTEM's trained modules merge at inference: bipartite matching (the paper's) against
ATC's agglomerative clustering on the same learned embedding, on train images of two models
(issues 9 and 10).

KL to the unmodified model and top-1 agreement with it at constant r, on the 600 train images
outside tune's calibration set (`benchmarks/holdout_kl.py`'s holdout), with each model's
shipped module file (trained at r=16 on a frozen ViT): bipartite, clustering with complete
linkage, and complete linkage plus MCTF's size criterion (ATC's defaults).

    OMP_NUM_THREADS=1 python benchmarks/dtem_matching.py --threads 1 --out benchmarks/results/dtem_matching/holdout.md
"""

from __future__ import annotations

from pathlib import Path

import tokenmerge

from atc_options import MODELS
from holdout_kl import holdout_table

ROOT = Path(__file__).resolve().parents[1]
MODULES = {
    "vit_tiny (12 blocks)": ROOT / "tokenmerge/assets/dtem_vit_tiny_patch16_224.imagenette.r16.safetensors",
    "vit_tiny_d6 (6 blocks)": ROOT / "benchmarks/models/dtem_vit_tiny_d6_patch16_224.imagenette.r16.safetensors",
}
VARIANTS = [{}, {"matching": "agglomerative", "tau_size": None}, {"matching": "agglomerative"}]


def _variant(options: dict):
    def build(label, load, r):
        model = tokenmerge.patch(load(), method="dtem", r=r, modules=str(MODULES[label]), **options)
        reducer = model.token_reducer
        name = reducer.matching
        if reducer.matching == "agglomerative":
            name += f" {reducer.linkage}, tau_size={reducer.tau_size}"
        return name, model

    return build


def main() -> None:
    holdout_table(__doc__.split("\n\n")[0], "dtem_matching.py", "DTEM's matching at inference (issues 9, 10)",
                  MODELS, [_variant(options) for options in VARIANTS])


if __name__ == "__main__":
    main()
