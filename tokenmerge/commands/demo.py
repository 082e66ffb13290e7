"""``tokenmerge demo``: the whole story offline, on the embedded model and data, in minutes.

Evaluates the unmodified embedded ViT-Tiny and every implemented method at a few settings on
the shipped 500-image Imagenette subset, prints the table, and writes the results, the
Pareto plot and one merge visualisation.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ..core.schedule import parse_schedule
from . import arguments
from .eval import DEFAULT_DATA, _schedule

__all__ = ["add_parser", "run", "demo_methods", "DTEM_MODULES_GLOB"]

# Two settings per method keep the demo within ~3 minutes on 2 CPU cores.
DEMO_SCHEDULES = ("8", "16")
DTEM_MODULES_GLOB = "dtem_*.safetensors"
ASSETS = Path(__file__).resolve().parents[1] / "assets"
# The token-drop bound only bounds speed: its accuracy means nothing.
NOT_DEMOED = {"drop": "the token-drop speed bound (its accuracy is meaningless)"}


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="offline end-to-end demo on the embedded model and data (a few minutes on a CPU)",
        description=__doc__.splitlines()[0].split(": ", 1)[1],
    )
    parser.add_argument("--out", type=arguments.output_folder, default=Path("tokenmerge-demo"),
                        help="output folder (default: tokenmerge-demo/)")
    parser.add_argument("--r", nargs="+", type=_schedule, default=None, metavar="SCHEDULE",
                        help=f"settings per method (default: {' '.join(DEMO_SCHEDULES)})")
    parser.add_argument("--methods", nargs="+", default=None, help="default: every implemented method")
    parser.add_argument("--limit", type=arguments.positive_int, default=None, help="use only the first N shipped images")
    parser.add_argument("--threads", type=arguments.threads, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-timing", action="store_true", help="skip the throughput measurement")
    parser.set_defaults(func=run)


def demo_methods(requested=None, assets: Path = ASSETS) -> tuple:
    """``(methods, {method: options}, [skip notes])``: what the demo evaluates.

    DTEM needs trained merge modules; it is evaluated only when a module file
    ``assets/dtem_*.safetensors`` ships (an untrained DTEM would only be ToMe with
    another metric), otherwise it is skipped with the reason.
    """
    import tokenmerge

    available = tokenmerge.list_methods()
    # ToMe first: the reference the other methods are read against.
    default = sorted((m for m in available if m not in NOT_DEMOED), key=lambda m: (m != "tome", m))
    names = list(requested) if requested else default
    methods, options, skipped = [], {}, []
    for name in names:
        if name not in available:
            raise ValueError(f"unknown method {name!r}; available: {', '.join(available)}")
        if name == "dtem":
            files = sorted(assets.glob(DTEM_MODULES_GLOB))
            if not files:
                skipped.append(f"dtem skipped: no trained merge-module file {assets / DTEM_MODULES_GLOB} "
                               "ships with this install (train one with `tokenmerge train --method dtem`)")
                continue
            options[name] = {"modules": str(files[0])}
        methods.append(name)
        options.setdefault(name, {})
    for name, why in NOT_DEMOED.items():
        if name in available and not requested:
            skipped.append(f"{name} not shown: {why}")
    return methods, options, skipped


def _threads() -> str:
    count = torch.get_num_threads()
    return f"{count} CPU thread" + ("" if count == 1 else "s")


def _first_image(root: Path) -> Path:
    return next(p for p in sorted(sorted(root.iterdir())[0].iterdir()) if p.is_file())


def run(args: argparse.Namespace) -> int:
    from .. import __version__
    from ..evaluation.data import load_images
    from ..evaluation.pareto import save_pareto_plot
    from ..evaluation.sweep import Variant, format_rows, run_sweep, write_results
    from ..models import load_model
    from .visualize import render

    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    schedules = args.r or [parse_schedule(s) for s in DEMO_SCHEDULES]
    methods, options, skipped = demo_methods(args.methods)
    model = load_model()
    images, labels, classes = load_images(DEFAULT_DATA, limit=args.limit, progress=True)
    print(f"tokenmerge {__version__} demo: embedded ViT-Tiny/16 (Imagenette, 10 classes) on the shipped "
          f"{len(images)}-image validation subset, {_threads()}, fp32")
    for note in skipped:
        print(f"  ({note})")
    variants = [Variant.create(m, s, options[m]) for m in methods for s in schedules]
    rows = run_sweep(model, variants, images, labels, len(classes), timing=not args.no_timing,
                     timing_batch_size=16, warmup=1, repeats=5)
    meta = {"model": "vit_tiny_patch16_224 (embedded Imagenette checkpoint)", "data": str(DEFAULT_DATA),
            "num_images": len(images), "threads": torch.get_num_threads(), "dtype": "float32",
            "device": "cpu", "skipped": skipped}
    paths = write_results(rows, meta, args.out)
    plot = save_pareto_plot(rows, args.out / "pareto.png",
                            title=f"ViT-Tiny/16, Imagenette subset ({len(images)} images)")
    image = _first_image(DEFAULT_DATA)
    summary = render(model, image, "tome", parse_schedule("13"), args.out / "visualize.png")
    print()
    print(format_rows(rows))
    print("\nspeedup: throughput relative to the unmodified model, measured interleaved in this run "
          "(batch 16); GFLOPs count 2 per multiply-add.")
    print(f"\nwrote, in {time.perf_counter() - start:.0f} s:")
    print(f"  results     {paths['csv']} and {paths['json']}")
    print(f"  Pareto plot {plot}")
    print(f"  merge groups {args.out / 'visualize.png'} ({summary.rsplit(';', 1)[0]})")
    return 0
