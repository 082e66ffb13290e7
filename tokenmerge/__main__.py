"""``python -m tokenmerge ...``: the same command line as ``tokenmerge ...``."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
