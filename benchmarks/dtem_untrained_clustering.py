"""Is the gain of clustered DTEM (BENCHMARKS.md section 8e) in the training? The same probe as
`dtem_matching.py`, with DTEM's untrained modules (`init="keys"`: the block's key projection
read after the attention residual, no training), matched and clustered, beside ATC on the
keys, on the 600 held-out train images of both Imagenette ViTs (issue 9: training-free).

    OMP_NUM_THREADS=1 python benchmarks/dtem_untrained_clustering.py --threads 1 \
        --out benchmarks/results/dtem_matching/untrained.md
"""

from __future__ import annotations

from atc_options import MODELS, patch_variant
from holdout_kl import holdout_table

VARIANTS = [("atc", {}), ("dtem", {}), ("dtem", {"matching": "agglomerative"})]


def main() -> None:
    holdout_table(__doc__.split("\n\n")[0], "dtem_untrained_clustering.py", "Untrained DTEM modules clustered (issue 9)",
                  MODELS, [patch_variant(method, options) for method, options in VARIANTS])


if __name__ == "__main__":
    main()
