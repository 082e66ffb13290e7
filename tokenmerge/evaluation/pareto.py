"""Pareto plots of sweep rows: accuracy vs GFLOPs and accuracy vs throughput.

One line per method (its points sorted along the x axis, so the line traces the method's
trade-off curve), the unmodified model as a star. Figures are built without pyplot and
rendered by Agg, so plots need no display and leave matplotlib's global state alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

__all__ = ["group_by_method", "pareto_figure", "save_pareto_plot"]

_UNMODIFIED = "none"


def group_by_method(rows: Sequence[dict]) -> Dict[str, List[dict]]:
    """``{method: rows}`` in first-seen order, without the unmodified row."""
    groups: Dict[str, List[dict]] = {}
    for row in rows:
        if row["method"] != _UNMODIFIED:
            groups.setdefault(row["method"], []).append(row)
    return groups


def _point_label(schedule: str) -> str:
    return schedule if schedule.startswith(("keep=", "#")) else f"r={schedule}"


def _panels(rows: Sequence[dict]) -> list:
    """``(x key, x label)`` for each panel the rows support (throughput only if measured)."""
    panels = [("gflops", "GFLOPs per image (lower is cheaper)")]
    if all(row.get("images_per_s") is not None for row in rows):
        panels.append(("images_per_s", "throughput, images/s (higher is faster)"))
    return panels


def pareto_figure(rows: Sequence[dict], title: Optional[str] = None, y_key: str = "accuracy",
                  y_label: str = "top-1 accuracy (%)"):
    """A matplotlib ``Figure``: one panel per x metric, one line per method, a star for the
    unmodified model. Each method line is labelled with the method name; the star with
    ``"unmodified"``; points are annotated with their schedule. ``y_key`` picks the row
    field on the y axis (``tokenmerge tune`` plots agreement with the unmodified model)."""
    # A bare Figure renders through Agg without touching pyplot's global backend state.
    from matplotlib.figure import Figure

    if not rows:
        raise ValueError("no results to plot")
    panels = _panels(rows)
    figure = Figure(figsize=(6.0 * len(panels), 4.6), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    baseline = [row for row in rows if row["method"] == _UNMODIFIED]
    groups = group_by_method(rows)
    for ax, (key, xlabel) in zip(axes, panels):
        for method, points in groups.items():
            points = sorted(points, key=lambda row: row[key])
            xs = [row[key] for row in points]
            ys = [row[y_key] for row in points]
            (line,) = ax.plot(xs, ys, marker="o", label=method)
            for row in points:
                ax.annotate(_point_label(row["schedule"]), (row[key], row[y_key]), textcoords="offset points",
                            xytext=(4, 3), fontsize=7, color=line.get_color())
        for row in baseline:
            ax.plot([row[key]], [row[y_key]], marker="*", markersize=14, linestyle="none",
                    color="black", label="unmodified")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(y_label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        # Wrapped at the figure's edges: one panel is narrower than a model name and data path.
        figure.suptitle(title, wrap=True)
    return figure


def save_pareto_plot(rows: Sequence[dict], path, title: Optional[str] = None, dpi: int = 120,
                     **axis) -> Path:
    """Render :func:`pareto_figure` to a PNG at ``path`` (parent folders created); ``axis``:
    ``y_key``/``y_label`` of :func:`pareto_figure`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure = pareto_figure(rows, title=title, **axis)
    figure.savefig(path, dpi=dpi, format="png")
    return path
