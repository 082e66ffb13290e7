"""Per-image merging for a GFLOPs budget: ATC's thresholds, calibrated on train images.

A constant schedule removes the same number of tokens from every image, yet a photo of a
bird against the sky holds far fewer distinct regions than a crowded street. With a
per-block ``threshold`` (:class:`~tokenmerge.methods.atc.ATC`), each image keeps joining
clusters while its most similar pair is at least that similar, so the budget is spent where
the image needs it. :func:`calibrate_thresholds` turns a reference configuration (a fixed
per-block ``r``, e.g. what :func:`~tokenmerge.evaluation.tune.tune` returned) into
thresholds for a budget, using only calibration images:

1. Run the reference schedule and record, in every block, the similarity of each image's
   ``r``-th join (the threshold at which that image would make exactly ``r`` joins).
2. A block's threshold is the ``q``-quantile of those similarities; the schedule becomes a
   cap of ``cap_factor x r`` joins per block. One ``q`` for all blocks keeps the reference's
   allocation across depth, as a share of images that merge more than it, not a count.
3. Bisect ``q`` for the largest value whose **mean counted GFLOPs per image** on the
   calibration images meets the budget (a higher threshold keeps more tokens). Each image's
   GFLOPs are counted exactly, with ``torch.utils.flop_counter``, for the blocks as that
   image runs them alone (batch size 1); the clustering's similarity is paid for in every
   block that may merge.

The cost is per image. A batch of images keeps the largest count any of its images keeps
(the others carry empty slots), so batched throughput sits between the reference schedule
and the unmodified model; at batch size 1 (latency), each image runs at its own cost.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..backends.adapter import logits_of
from ..core.attention import key_metric
from ..core.clustering import clustering_similarity
from ..core.merge import keep_first
from .flops import count_gflops
from .throughput import autocast_for
from ..methods.atc import check_threshold
from .sweep import evaluation_mode
from .tune import _metrics, _Scorer, calibration_images, resolve_budget

__all__ = ["DEFAULT_CAP_FACTOR", "ThresholdCalibration", "PerImageCost", "calibrate_thresholds"]

# A cap keeps one image's merges bounded in a block. Three times the reference r lets a
# simple image remove far more than the reference while leaving most of the tokens to the
# next blocks; the budget itself is held by the bisection, not by the cap.
DEFAULT_CAP_FACTOR = 3.0


@dataclass
class ThresholdCalibration:
    """What :func:`calibrate_thresholds` found.

    Attributes:
        method, options, caps: the configuration (``options`` holds ``threshold``).
        gflops: mean counted GFLOPs per image on the calibration images.
        kl, agreement: KL to the unmodified model and top-1 agreement (%) there.
        reference_gflops, reference_kl, reference_agreement: the same for the reference
            (fixed-``r``) configuration.
        quantile: the ``q`` the bisection chose.
        target_gflops, images, seconds: the budget, the number of images, wall time.
        logits: ``[images, classes]`` the chosen configuration's logits on the calibration
            images (so a caller scoring it on them need not run it again).
    """

    method: str
    options: dict
    caps: tuple
    gflops: float
    kl: float
    agreement: float
    reference_schedule: tuple
    reference_gflops: float
    reference_kl: float
    reference_agreement: float
    quantile: float
    target_gflops: float
    images: int
    seconds: float
    logits: torch.Tensor = field(repr=False, default=None)

    def config(self) -> dict:
        """``{"method", "r", "options"}`` for ``tokenmerge.patch(model, **config)``."""
        return {"method": self.method, "r": list(self.caps), "options": dict(self.options)}


class _HeightRecorder:
    """A calibration-only reducer: plans as ``reducer`` does and appends each block's
    ``r``-th join similarity (one per image) to the list it was given."""

    def __init__(self, reducer, heights: dict):
        self.reducer, self.heights = reducer, heights

    def reduce(self, state, attn, r, num_protected, block_index):
        height = self.reducer.join_heights(attn, state.size, r, num_protected)[:, r - 1]
        self.heights.setdefault(block_index, []).append(height.float().cpu())
        return self.reducer.reduce(state, attn, r, num_protected, block_index)


class _CountingStandIn:
    """What one image's block costs, for the FLOP counter: the clustering's similarity (its
    only counted work: the joins are comparisons and copies, which have no FLOP formula),
    then the ``r`` removals (``joins=True``) or none (``joins=False``), as the image made
    them. Counting the joins themselves would give the same number, hundreds of times slower
    (the counter intercepts every small op of the join loop); a test checks the sum against
    counting the patched model on single images."""

    def __init__(self, reducer, joins: bool):
        self.reducer, self.joins = reducer, joins

    def reduce(self, state, attn, r, num_protected, block_index):
        n = state.x.shape[1]
        r = min(r, self.reducer.max_reduction(n, num_protected))
        if r == 0:
            return state
        clustering_similarity(key_metric(attn.k), num_protected, state.size, self.reducer.tau_size)
        if not self.joins:
            return state
        plan = keep_first(n, n - r, state.x.shape[0], state.x.device)
        return self.reducer.apply_plan(state, plan)


class PerImageCost:
    """A per-image configuration on a set of images: logits, and what each image costs.

    ``cost(threshold)`` runs ``config`` (``{"method", "r", "options"}``, the ``r`` being
    caps) on ``images`` batch by batch and returns ``(gflops [N], logits [N, classes])``:
    each image's counted GFLOPs as it would run alone (the batch's empty slots excluded),
    and its logits (the same as alone). ``threshold`` replaces the config's, so a search
    over thresholds patches the model once.

    The model runs where its parameters are, under autocast to ``dtype`` (``None``: as it
    is); ``images`` may stay on the host and move one batch at a time. The counts do not
    depend on either, only on how many tokens each image keeps.
    """

    def __init__(self, model: nn.Module, config: dict, images: torch.Tensor, batch_size: int = 125,
                 base_gflops: Optional[float] = None, dtype: Optional[torch.dtype] = None):
        if base_gflops is None:
            with evaluation_mode(model):
                base_gflops = count_gflops(model, images=images[:1].to(next(model.parameters()).device))
        self.dtype = dtype
        self.scorer = _Scorer(model, config["method"], config.get("options", {}), images, batch_size, 1, base_gflops)
        if not self.scorer.reducer.per_image:
            raise ValueError("PerImageCost needs a configuration with a threshold")
        caps = config["r"]
        self.caps = (caps,) * self.scorer.num_blocks if isinstance(caps, int) else tuple(caps)
        if len(self.caps) != self.scorer.num_blocks:
            raise ValueError(f"config r has {len(self.caps)} values for {self.scorer.num_blocks} blocks")
        self.threshold = self.scorer.reducer.threshold
        self.counting = {joins: _CountingStandIn(self.scorer.reducer, joins) for joins in (True, False)}

    def _block(self, index: int, n: int, removed: int) -> int:
        scorer, cap = self.scorer, self.caps[index]
        if cap == 0:
            return scorer._block_flops(index, n, 0)
        if removed > 0:
            return scorer._block_flops(index, n, removed, reducer=self.counting[True], tag="join")
        return scorer._block_flops(index, n, cap, reducer=self.counting[False], tag="none")

    @torch.inference_mode()
    def __call__(self, threshold=None, progress: bool = False) -> tuple:
        """``threshold``: per-block thresholds for this call (``None``: the config's)."""
        from tqdm.auto import tqdm

        scorer = self.scorer
        scorer.reducer.threshold = self.threshold if threshold is None else check_threshold(threshold)
        if scorer._outside_blocks is None:
            scorer._count_outside_blocks()
        flops, logits = [], []
        for batch in tqdm(scorer.batches, desc="evaluating", disable=not progress, leave=False):
            count = torch.full((len(batch),), scorer.num_tokens)
            image_flops = torch.full((len(batch),), float(scorer._outside_blocks), dtype=torch.float64)
            with autocast_for(scorer.device, self.dtype):
                state = scorer._embed(batch)
                for i in range(scorer.num_blocks):
                    state = scorer.blocks[i].forward_tokens(state, self.caps[i], scorer.reducer, scorer.config, i)
                    after = count if state.size is None else (state.size[..., 0] > 0).sum(dim=1).cpu()
                    image_flops += torch.tensor([float(self._block(i, n, k)) for n, k in
                                                 zip(count.tolist(), (count - after).tolist())], dtype=torch.float64)
                    count = after
                logits.append(scorer.adapter.logits(state).float())
            flops.append(image_flops / 1e9)
        return torch.cat(flops), torch.cat(logits)


def _closeness(logits: torch.Tensor, reference: torch.Tensor) -> tuple:
    """``(KL to the unmodified model, top-1 agreement in %)``, as ``tune`` scores them."""
    metrics = _metrics(logits, reference, None, "kl")
    return metrics["kl"], metrics["agreement"]


@torch.inference_mode()
def calibrate_thresholds(
    model: nn.Module,
    data,
    *,
    r: Union[int, Sequence[int]],
    target_gflops: Optional[float] = None,
    target_speedup: Optional[float] = None,
    gflops_fraction: Optional[float] = None,
    options: Optional[dict] = None,
    method: str = "atc",
    cap_factor: float = DEFAULT_CAP_FACTOR,
    steps: int = 8,
    batch_size: int = 125,
) -> ThresholdCalibration:
    """Per-block thresholds that spend a GFLOPs budget per image (module docstring).

    Args:
        model: the unmodified classifier (left unchanged).
        data: calibration images, as for :func:`~tokenmerge.tune` (train images, never the
            split you report on).
        r: the reference schedule (an int or one per block), e.g. ``tune``'s ``best.json``.
        target_gflops / target_speedup / gflops_fraction: the budget, exactly one.
        options: the method's options (e.g. ``{"keep_norm": True}``); not ``threshold``.
        method: a method with a per-image ``threshold`` option (``"atc"``).
        cap_factor: each block may join up to ``cap_factor x r`` times (at least 1).
        steps: bisection steps over the quantile (``2 ** -steps`` resolution).
        batch_size: images per forward pass (results do not depend on it).

    Returns:
        :class:`ThresholdCalibration`; ``.config()`` goes into :func:`tokenmerge.patch`.

    Raises:
        ValueError: a patched model, a method without thresholds, a malformed reference
            schedule, budget or option, or a budget that even the lowest thresholds cannot meet.
    """
    from .. import is_patched
    from ..methods import get_method_class

    if is_patched(model):
        raise ValueError("calibrate_thresholds needs the unmodified model: call tokenmerge.unpatch(model) first")
    options = dict(options or {})
    if "threshold" in options:
        raise ValueError("options must not hold threshold: calibrate_thresholds chooses it")
    if not hasattr(get_method_class(method), "join_heights"):
        raise ValueError(f"method {method!r} has no per-image threshold; use 'atc'")
    integer = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    if not (integer(r) or (isinstance(r, (list, tuple)) and r and all(integer(v) for v in r))) or (
            min(r) if isinstance(r, (list, tuple)) else r) < 0:
        raise ValueError(
            f"r must be the reference schedule, an int or a list of ints, all >= 0 (one per block, e.g. tune's "
            f"best.json 'r'; ToMe's (r, -1) decreasing form is not taken here), got {r!r}"
        )
    if isinstance(cap_factor, bool) or not isinstance(cap_factor, numbers.Real) or not (
            math.isfinite(cap_factor) and cap_factor >= 1):
        raise ValueError(f"cap_factor must be a finite number >= 1, got {cap_factor!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    images, _ = calibration_images(data)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"calibration images must be a non-empty [N, 3, H, W] batch, got shape {tuple(images.shape)}")
    with evaluation_mode(model):
        return _calibrate(model, images, r, target_gflops, target_speedup, gflops_fraction, options, method,
                          cap_factor, steps, batch_size)


def _calibrate(model, images, r, target_gflops, target_speedup, gflops_fraction, options, method, cap_factor,
               steps, batch_size) -> ThresholdCalibration:
    started = time.perf_counter()
    images = images.to(next(model.parameters()).device)
    base_gflops = count_gflops(model, images=images[:1])
    target = resolve_budget(base_gflops, target_gflops, target_speedup, gflops_fraction)
    reference_logits = torch.cat([logits_of(model(images[i:i + batch_size]))
                                  for i in range(0, len(images), batch_size)]).float()

    fixed = _Scorer(model, method, options, images, batch_size, 1, base_gflops)
    schedule = fixed.effective([r] * fixed.num_blocks if isinstance(r, int) else list(r))
    if not any(schedule):
        raise ValueError(f"the reference schedule {list(schedule)} merges nothing; give an r > 0")
    heights: dict = {}
    recorder = _HeightRecorder(fixed.reducer, heights)
    states = [fixed._embed(batch) for batch in fixed.batches]
    for i in range(fixed.num_blocks):
        reducer = recorder if schedule[i] > 0 else fixed.reducer
        states = [fixed.blocks[i].forward_tokens(s, schedule[i], reducer, fixed.config, i) for s in states]
    reference_kl, reference_agreement = _closeness(fixed._logits(states), reference_logits)
    heights = {i: torch.cat(h) for i, h in heights.items()}

    limit = fixed.reducer.max_reduction(fixed.num_tokens, fixed.config.num_protected)
    caps = tuple(min(limit, max(1, math.ceil(cap_factor * r_i))) if r_i > 0 else 0 for r_i in schedule)
    cost = PerImageCost(model, {"method": method, "r": list(caps),
                                "options": {**options, "threshold": [None] * fixed.num_blocks}},
                        images, batch_size, base_gflops)

    def thresholds(q: float) -> list:
        return [heights[i].quantile(q).item() if caps[i] > 0 else None for i in range(fixed.num_blocks)]

    def run(q: float) -> tuple:
        flops, logits = cost(thresholds(q))
        return flops.mean().item(), logits

    low, high = 0.0, 1.0
    gflops, logits = run(low)
    if gflops > target:
        raise ValueError(
            f"even at the lowest thresholds (each block's least similar r-th join; caps {list(caps)}) the "
            f"calibration images cost {gflops:.3f} GFLOPs on average, over the budget of {target:.3f}: give "
            "a larger reference r or cap_factor, or relax the target"
        )
    best = (low, gflops, logits)
    top = run(high)
    if top[0] <= target:
        best = (high, *top)
    else:
        for _ in range(steps):
            mid = (low + high) / 2
            result = run(mid)
            if result[0] <= target:
                low, best = mid, (mid, *result)
            else:
                high = mid
    q, gflops, logits = best
    kl, agreement = _closeness(logits, reference_logits)
    chosen = {**options, "threshold": thresholds(q)}
    return ThresholdCalibration(
        method, chosen, caps, gflops, kl, agreement, tuple(schedule), fixed.gflops(tuple(schedule)),
        reference_kl, reference_agreement, q, target, len(images), time.perf_counter() - started, logits,
    )
