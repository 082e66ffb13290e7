"""Paired differences between the rows of one `tokenmerge eval` run (same images), for every
pair of rows at about the same GFLOPs: difference in top-1, its paired standard error and a
95% interval (tokenmerge.evaluation.statistics).

    python benchmarks/paired_comparison.py runs/s6/paired_eval/results.json --tolerance 0.02
"""

from __future__ import annotations

import argparse
import itertools

from tokenmerge.evaluation.statistics import Z95
from tokenmerge.evaluation.sweep import paired_row_difference, read_results


def _name(row: dict) -> str:
    options = " ".join(f"{k}={v}" for k, v in sorted(row.get("options", {}).items()) if k != "modules")
    return f"{row['method']} {row['schedule']}" + (f" {options}" if options else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="results.json of tokenmerge eval")
    parser.add_argument("--tolerance", type=float, default=0.02,
                        help="pair rows whose GFLOPs differ by at most this share (default 2%%)")
    args = parser.parse_args()
    rows = [r for r in read_results(args.results)["rows"] if r.get("correct")]
    print("| budget (GFLOPs) | A | B | A - B (points) | paired SE | 95% interval |")
    print("|---|---|---|---|---|---|")
    for a, b in itertools.combinations(rows, 2):
        if abs(a["gflops"] - b["gflops"]) > args.tolerance * max(a["gflops"], b["gflops"]):
            continue
        delta, se = paired_row_difference(a, b)
        print(f"| {a['gflops']:.3f} / {b['gflops']:.3f} | {_name(a)} ({a['accuracy']:.2f}) | "
              f"{_name(b)} ({b['accuracy']:.2f}) | {delta:+.2f} | {se:.2f} | "
              f"[{delta - Z95 * se:+.2f}, {delta + Z95 * se:+.2f}] |")


if __name__ == "__main__":
    main()
