"""Pick a constant ``r`` for a budget: a target speedup or a GFLOPs ceiling.

More tokens removed per block never costs more compute, so the cost is monotone in ``r``
and a bisection finds the *smallest* ``r`` that meets the budget (the smallest reduction,
hence the least accuracy lost). Two cost measures:

- ``"flops"``: the FLOP count (deterministic, machine-independent; the default). A target
  speedup is read as the FLOP ratio unmodified / merged.
- ``"throughput"``: measured images/s of the merged model against the unmodified model,
  timed interleaved at every probe. Reflects merge overheads the FLOP count leaves out, but
  is noisy: a probe near the target may fall either side of it on a rerun.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

from .flops import count_gflops
from .throughput import measure_throughput

__all__ = ["BudgetResult", "smallest_meeting", "max_useful_r", "search_budget"]

METRICS = ("flops", "throughput")


@dataclass(frozen=True)
class BudgetResult:
    """What the search chose and what it achieved.

    Attributes:
        r: the chosen constant ``r``.
        metric: ``"flops"`` or ``"throughput"``.
        gflops: GFLOPs per image at ``r``; ``base_gflops`` unmodified.
        speedup: unmodified / merged, by FLOPs or by measured images/s (per ``metric``).
        target_speedup, target_gflops: the budget asked for (one of them is set).
    """

    r: int
    metric: str
    gflops: float
    base_gflops: float
    speedup: float
    target_speedup: Optional[float] = None
    target_gflops: Optional[float] = None

    def describe(self, method: str) -> str:
        target = (f"target speedup {self.target_speedup:g}x" if self.target_speedup is not None
                  else f"target {self.target_gflops:g} GFLOPs")
        basis = "FLOP count" if self.metric == "flops" else "measured throughput"
        return (f"{method}: chose r={self.r} for {target} (searched on the {basis}): "
                f"{self.gflops:.3f} GFLOPs/img vs {self.base_gflops:.3f} unmodified, "
                f"{self.speedup:.2f}x")


def smallest_meeting(meets: Callable[[int], bool], low: int, high: int) -> Optional[int]:
    """The smallest integer in ``[low, high]`` for which the monotone predicate ``meets`` holds,
    or ``None`` when even ``high`` fails. ``meets`` is called O(log(high - low)) times."""
    if not meets(high):
        return None
    while low < high:
        middle = (low + high) // 2
        if meets(middle):
            high = middle
        else:
            low = middle + 1
    return low


def max_useful_r(model: nn.Module) -> int:
    """Past this constant ``r`` the first block is already clamped: larger values change nothing."""
    from ..backends.adapter import adapter_for

    return adapter_for(model).num_patches // 2


def _patched(base: nn.Module, method: str, r: int, options: dict) -> nn.Module:
    from .sweep import Variant, build_variant

    return build_variant(base, Variant.create(method, r, options))


def search_budget(
    base: nn.Module,
    method: str = "tome",
    *,
    target_speedup: Optional[float] = None,
    target_gflops: Optional[float] = None,
    metric: str = "flops",
    options: Optional[dict] = None,
    image_size: int = 224,
    device="cpu",
    dtype=None,
    batch_size: int = 16,
    warmup: int = 1,
    repeats: int = 5,
) -> BudgetResult:
    """The smallest constant ``r`` of ``method`` that meets the budget.

    Give exactly one of ``target_speedup`` (> 1, e.g. 1.5) or ``target_gflops`` (GFLOPs per
    image, as :func:`~tokenmerge.evaluation.flops.count_gflops` counts them: 2 per
    multiply-add). ``metric="throughput"`` only applies to ``target_speedup``.

    Raises:
        ValueError: the budget is malformed or unreachable (the message gives the best
            achievable figure).
    """
    if (target_speedup is None) == (target_gflops is None):
        raise ValueError("give exactly one budget: --target-speedup (e.g. 1.5) or --target-gflops (e.g. 0.7)")
    if metric not in METRICS:
        raise ValueError(f"budget metric must be one of {METRICS}, got {metric!r}")
    if target_speedup is not None and target_speedup <= 1.0:
        raise ValueError(f"--target-speedup must be > 1 (e.g. 1.5), got {target_speedup:g}")
    if target_gflops is not None and target_gflops <= 0:
        raise ValueError(f"--target-gflops must be positive, got {target_gflops:g}")
    if target_gflops is not None and metric == "throughput":
        raise ValueError("--target-gflops is a FLOP budget: use --budget-metric flops with it")
    options = dict(options or {})
    base = base.to(device).eval()
    base_gflops = count_gflops(base, image_size=image_size, device=device)
    gflops_at: dict = {}
    speedup_at: dict = {}

    def gflops(r: int) -> float:
        if r not in gflops_at:
            gflops_at[r] = count_gflops(_patched(base, method, r, options), image_size=image_size, device=device)
        return gflops_at[r]

    def measured_speedup(r: int) -> float:
        if r not in speedup_at:
            models = {"base": base, "merged": _patched(base, method, r, options)}
            speed = measure_throughput(models, batch_size=batch_size, image_size=image_size,
                                       device=device, dtype=dtype, warmup=warmup, repeats=repeats)
            speedup_at[r] = speed["merged"]["images_per_s"] / speed["base"]["images_per_s"]
        return speedup_at[r]

    if target_gflops is not None:
        meets = lambda r: gflops(r) <= target_gflops  # noqa: E731
    elif metric == "flops":
        meets = lambda r: base_gflops / gflops(r) >= target_speedup  # noqa: E731
    else:
        meets = lambda r: measured_speedup(r) >= target_speedup  # noqa: E731
    high = max_useful_r(base)
    chosen = smallest_meeting(meets, 1, high)
    if chosen is None:
        best = (f"{gflops(high):.3f} GFLOPs ({base_gflops / gflops(high):.2f}x by FLOPs)" if metric == "flops"
                else f"{measured_speedup(high):.2f}x measured")
        raise ValueError(
            f"the budget cannot be met with {method}: even r={high} (the most a constant schedule "
            f"can remove) gives {best}; relax the target"
        )
    speedup = base_gflops / gflops(chosen) if metric == "flops" else measured_speedup(chosen)
    return BudgetResult(chosen, metric, gflops(chosen), base_gflops, speedup,
                        target_speedup=target_speedup, target_gflops=target_gflops)
