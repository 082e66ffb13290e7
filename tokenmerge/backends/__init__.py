"""One module per model family. Each patches in place and unpatches symmetrically."""
