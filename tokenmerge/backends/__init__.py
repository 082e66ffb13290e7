"""One module per model family, each with its adapter (see :mod:`tokenmerge.backends.adapter`).
Each patches in place and unpatches symmetrically."""
