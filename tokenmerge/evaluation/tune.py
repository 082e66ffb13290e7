"""Calibrated configurations: the best training-free method and per-block schedule for a budget.

Given a trained model, calibration images (from the *train* split: nothing here may look at
the data you report on) and a GFLOPs budget, :func:`tune` returns the configuration that
keeps the merged model closest to the unmodified one. Three stages:

1. **Method.** For every candidate method (default ToMe, MCTF, PiToMe and ATC), the smallest
   constant ``r`` that meets the budget, and the same with the GFLOPs it leaves unused spent
   on keeping tokens in the last blocks (:func:`_fill_budget`), scored on the calibration
   images; the better of the two is the method's start. GFLOPs are
   *counted* (:func:`~tokenmerge.evaluation.flops.count_gflops`, scoring work included, so a
   method whose score costs FLOPs pays for them out of the same budget), never estimated.
2. **Schedule.** For the best ``search_methods`` methods, a per-block ``r`` search under the
   same budget, in rounds. Each round probes every block alone at ``r_i +- delta`` (the rest
   of the schedule fixed; ``delta`` starts at an eighth of the largest ``r``), which gives
   each block's loss and exact GFLOPs change. Treating those changes as additive, a
   Lagrangian allocation plus a greedy fill of the remaining budget (:func:`_allocate`)
   proposes a new schedule; it is evaluated for real and kept only if it beats the
   incumbent, else ``delta`` halves. A round costs ``2 L`` partial forward passes for ``L``
   blocks (on average half a full pass each), so the search scales linearly with depth.
3. **Options.** For the same methods, ``keep_norm`` (for methods that fuse tokens) and the
   options their class lists in ``option_grid`` (e.g. MCTF's temperatures), one at a time at
   the searched schedule: each value is scored on all calibration images and kept only if it
   lowers the loss (options the caller set stay as given; options that change GFLOPs are held
   to the budget). Coming last, this stage can only improve on the schedule search's result;
   chosen first, at the constant start, it led the search to a worse end than the default
   options did (BENCHMARKS.md section 6).

Caching. A probe that changes block ``i`` leaves blocks ``0..i-1`` as they were, so the
incumbent's token states at every block input are cached and a probe only runs blocks
``i..L-1`` (every model family: the adapter gives the embedding and the head separately).

Objective (lower is better), all label-free except ``accuracy``:
``"kl"`` (default): mean ``KL(p_unmodified || p_merged)``, smooth, so small schedule changes
register; ``"agreement"``: the share of images whose top-1 differs from the unmodified
model's; ``"accuracy"``: top-1 error against labels.
"""

from __future__ import annotations

import json
import math
import numbers
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..backends.adapter import adapter_for, logits_of
from ..core.schedule import resolve_schedule
from ..io import read_json
from .budget import smallest_meeting
from .flops import count_gflops
from .sweep import Variant, build_variant, evaluation_mode
from .throughput import autocast_for

__all__ = [
    "OBJECTIVES",
    "DEFAULT_METHODS",
    "Candidate",
    "TuneResult",
    "read_config",
    "resolve_budget",
    "tune",
    "calibration_images",
]

OBJECTIVES = ("kl", "agreement", "accuracy")
# Shared MLPs (``mlp_share``) are not among the defaults: as candidates (ToMe and MCTF at 0.5
# and 1) they lowered the calibration KL on both Imagenette ViTs but not the val accuracy of
# what tune returned, and they add 4 candidates (BENCHMARKS.md section 6). Name them to try them:
# methods=["tome", "mctf", ("tome", {"mlp_share": 1.0})].
# ATC is a default: with its defaults (complete linkage, size criterion) its KL to the
# unmodified model at constant r was 29-40% below ToMe's on held-out train images of both
# Imagenette ViTs (BENCHMARKS.md section 6).
DEFAULT_METHODS = ("tome", "mctf", "pitome", "atc")


@dataclass(frozen=True)
class Candidate:
    """One configuration the tuner evaluated.

    Attributes:
        method, options: as for :func:`tokenmerge.patch` (``options`` may hold ``prop_attn``).
        r: the effective per-block schedule.
        gflops: counted GFLOPs per image.
        loss: the objective on the calibration images (lower is better).
        kl, agreement: mean KL to the unmodified model and top-1 agreement with it (%).
        accuracy: calibration top-1 (%) when labels were given, else ``None``.
        stage: how it was made: ``"constant"``, ``"constant, budget filled"``, ``"search
            round K"``, ``"options: KEY=VALUE"`` or ``"per-image thresholds"``.
        images_per_s, speedup: measured throughput and its ratio to the unmodified model
            (filled in at the end, timed interleaved in one run), or ``None``.
    """

    method: str
    options: dict
    r: tuple
    gflops: float
    loss: float
    kl: float
    agreement: float
    accuracy: Optional[float]
    stage: str
    images_per_s: Optional[float] = None
    speedup: Optional[float] = None

    def config(self) -> dict:
        """``{"method", "r", "options"}``: ``tokenmerge.patch(model, **config)`` applies it."""
        return {"method": self.method, "r": list(self.r), "options": dict(self.options)}


@dataclass
class TuneResult:
    """The chosen configuration and everything tried on the way.

    Attributes:
        best: the winning :class:`Candidate` (lowest loss within the budget).
        candidates: every configuration scored, in order: the constant starts, the search
            proposals, the option trials and the per-image candidate.
        base_gflops, target_gflops: the unmodified model's GFLOPs and the budget.
        objective: the loss the search minimised.
        num_images: calibration images used.
        seconds: wall time of the whole tuning.
    """

    best: Candidate
    candidates: List[Candidate]
    base_gflops: float
    target_gflops: float
    objective: str
    num_images: int
    seconds: float

    def config(self) -> dict:
        return self.best.config()

    @property
    def best_fixed(self) -> Optional[Candidate]:
        """The best candidate that removes the same tokens from every image (no per-image
        ``threshold``; ``best`` itself when it is one), or ``None`` if every candidate is
        per-image. Per-image merging reads its token counts from the data, so ONNX export
        refuses it and ``torch.compile`` does not speed it up: this is the configuration for
        those, and for batch-1 latency on CPU (BENCHMARKS.md section 6)."""
        fixed = [c for c in self.candidates if c.options.get("threshold") is None]
        return min(fixed, key=lambda c: (c.loss, c.gflops)) if fixed else None

    def rows(self) -> List[dict]:
        """One dict per candidate (for CSV/JSON tables and Pareto plots)."""
        rows = []
        for c in self.candidates:
            row = asdict(c)
            row["r"] = ",".join(str(v) for v in c.r)
            row["schedule"] = row["r"]
            row["best"] = c is self.best
            rows.append(row)
        return rows

    def save(self, out_dir) -> Path:
        """Write ``best.json``, ``candidates.json`` and ``candidates.csv`` into ``out_dir``
        (each atomically: a kill leaves the previous file, never a torn one), and
        ``best_fixed.json`` (:attr:`best_fixed`) when the best merges per image."""
        import csv
        import io

        from ..io import atomic_write_json, atomic_write_text

        out = Path(out_dir)
        if out.exists() and not out.is_dir():
            raise ValueError(f"{out} is a file; give a folder for the tune results")
        atomic_write_json(out / "best.json", self.config(), indent=2)
        fixed = self.best_fixed
        if fixed is not None and fixed is not self.best:
            atomic_write_json(out / "best_fixed.json", fixed.config(), indent=2)
        else:  # not one left from an earlier run in the same folder
            (out / "best_fixed.json").unlink(missing_ok=True)
        atomic_write_json(out / "candidates.json", {
            "objective": self.objective,
            "base_gflops": self.base_gflops,
            "target_gflops": self.target_gflops,
            "num_images": self.num_images,
            "seconds": self.seconds,
            "candidates": self.rows(),
        }, indent=2)
        columns = ["method", "options", "stage", "r", "gflops", "loss", "kl", "agreement", "accuracy",
                   "images_per_s", "speedup", "best"]
        table = io.StringIO()
        writer = csv.DictWriter(table, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in self.rows():
            writer.writerow({**row, "options": json.dumps(row["options"], sort_keys=True)})
        atomic_write_text(out / "candidates.csv", table.getvalue())
        return out


CONFIG_KEYS = ("method", "r", "options")


def read_config(path) -> dict:
    """A ``best.json`` (as :meth:`TuneResult.save` writes it) read and checked:
    ``{"method": str, "r": schedule, "options": dict}``, ready for
    ``tokenmerge.patch(model, **config)``, ``tokenmerge eval --config`` and
    ``tokenmerge train --config``.

    Raises:
        FileNotFoundError, ValueError: a missing file, invalid JSON, unknown or missing keys,
            an unknown method or a malformed schedule, each named with the file.
    """
    from ..core.schedule import validate_schedule
    from ..methods import list_methods

    config = read_json(path, "configuration file", ' (tokenmerge tune writes OUT/best.json: '
                       '{"method": "tome", "r": [16, 16, ...], "options": {}})')
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object with keys {CONFIG_KEYS}, got {type(config).__name__}")
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    missing = [key for key in ("method", "r") if key not in config]
    if unknown or missing:
        raise ValueError(f"{path}: a configuration has the keys {CONFIG_KEYS} (options optional); "
                         f"unknown {unknown}, missing {missing}")
    method, options = config["method"], config.get("options", {})
    if method not in list_methods():
        raise ValueError(f"{path}: unknown method {method!r}; available: {', '.join(list_methods())}")
    if not isinstance(options, dict):
        raise ValueError(f"{path}: 'options' must be a JSON object of method options, got {options!r}")
    schedule = config["r"]
    try:
        schedule = validate_schedule(schedule)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: bad 'r' ({err}); give an int or a per-block list") from None
    return {"method": method, "r": schedule, "options": dict(options)}


def resolve_budget(base_gflops: float, target_gflops=None, target_speedup=None, gflops_fraction=None) -> float:
    """The GFLOPs ceiling from exactly one budget form; clear errors for malformed ones.

    ``target_speedup`` is read as a FLOP ratio (unmodified / merged); ``gflops_fraction`` is
    a share of the unmodified GFLOPs (0.5 = -50%).
    """
    given = {k: v for k, v in (("target_gflops", target_gflops), ("target_speedup", target_speedup),
                              ("gflops_fraction", gflops_fraction)) if v is not None}
    if len(given) != 1:
        raise ValueError(
            "give exactly one budget: target_gflops (GFLOPs per image), target_speedup (> 1, by "
            f"FLOPs) or gflops_fraction (in (0, 1), e.g. 0.5 for -50%); got {sorted(given) or 'none'}"
        )
    (name, value), = given.items()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if name == "target_gflops":
        if value <= 0:
            raise ValueError(f"target_gflops must be positive, got {value:g}")
        return float(value)
    if name == "target_speedup":
        if value <= 1:
            raise ValueError(f"target_speedup must be > 1 (e.g. 1.5), got {value:g}")
        return base_gflops / value
    if not 0 < value < 1:
        raise ValueError(f"gflops_fraction must lie in (0, 1) (0.5 keeps half the GFLOPs), got {value:g}")
    return base_gflops * value


def calibration_images(data) -> tuple:
    """``(images [N,3,H,W], labels [N] or None)`` from a tensor, an ``(images, labels)`` pair
    (``labels`` a tensor, a list of ints or ``None``), or an iterable of batches or of single
    items (``images`` or ``(images, labels, ...)``: a DataLoader, a list of batches, a
    ``TensorDataset``).

    A two-element list or tuple is a pair when its second element is ``None`` or holds one
    label per image; otherwise (e.g. two image batches) it is read as batches.
    """
    if isinstance(data, torch.Tensor):
        return data, None
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor) and data[0].ndim == 4:
        images, labels = data
        if labels is None:
            return images, None
        if not (isinstance(labels, torch.Tensor) and labels.ndim == 4):  # else: two batches of images
            return images, _checked_labels(labels, len(images))
    images, labels = [], []
    for batch in data:
        if isinstance(batch, torch.Tensor):
            image, label = batch, None
        else:
            image, label = batch[0], batch[1] if len(batch) > 1 else None
        single = image.ndim == 3  # a dataset's item, not a batch
        images.append(image.unsqueeze(0) if single else image)
        labels.append(None if label is None else torch.as_tensor(label).reshape(-1))
    if not images:
        raise ValueError("the calibration data is empty: give at least one image")
    shapes = {tuple(x.shape[1:]) for x in images}
    if len(shapes) > 1:
        raise ValueError(f"the calibration images differ in shape ({sorted(shapes)}): resize them to one size")
    images = torch.cat(images)
    if any(y is None for y in labels):  # labels are optional, but all or none
        return images, None
    return images, _checked_labels(torch.cat(labels), len(images))


def _checked_labels(labels, count: int) -> torch.Tensor:
    """``labels`` as a ``[count]`` int64 tensor of class indices, or a clear error."""
    try:
        labels = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"labels must be a tensor or list of class indices, got {type(labels).__name__}") from None
    if labels.shape != (count,) or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(
            f"labels must be {count} integer class indices (shape [{count}]), one per image; got dtype "
            f"{labels.dtype} and shape {list(labels.shape)}"
        )
    return labels.long()


class _Scorer:
    """Logits of one method at any per-block schedule, with the incumbent's block inputs cached."""

    def __init__(self, base: nn.Module, method: str, options: dict, images, batch_size: int, probe_every: int,
                 base_gflops: float):
        self.method, self.options = method, dict(options)
        self.model = build_variant(base, Variant.create(method, 0, options))
        self.adapter = adapter_for(self.model)
        self.blocks = self.adapter.blocks
        self.reducer = self.adapter.reducer
        self.config = self.adapter.config
        self.batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
        probe_images = images[::probe_every]
        self.probe_batches = [probe_images[i:i + batch_size] for i in range(0, len(probe_images), batch_size)]
        self.probe_every = probe_every
        self.num_tokens = self.adapter.num_tokens
        self._flops: Dict[tuple, float] = {}
        self._block_counts: Dict[tuple, int] = {}
        self._outside_blocks: Optional[int] = None
        self._base_gflops = base_gflops
        self.device = next(base.parameters()).device
        # The tokens entering the first block, for the width and dtype of the FLOP counts' dummies.
        with torch.inference_mode():
            self._block_input = self._embed(self.batches[0][:1])
        # (schedule, [per block input: [per probe batch: TokenState]]): the incumbent's states
        self._cache: Optional[tuple] = None

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def effective(self, schedule: Sequence[int]) -> tuple:
        """The schedule as the model runs it (clamped where a block cannot remove that many)."""
        return resolve_schedule(list(schedule), self.num_blocks, self.num_tokens, self.config.num_protected,
                                self.reducer.max_reduction, warn=False)

    def gflops(self, schedule: tuple) -> float:
        """Counted GFLOPs per image at ``schedule`` (memoised).

        The count is exact and cheap: ``torch.utils.flop_counter`` counts each block once per
        (block, tokens in, r) on one dummy token sequence, and the embedding and head once;
        the sum equals counting the whole patched model (tested), scoring work included.
        """
        schedule = tuple(schedule)
        if schedule not in self._flops:
            if self._outside_blocks is None:
                self._count_outside_blocks()
            total, n = self._outside_blocks, self.num_tokens
            for i, r in enumerate(schedule):
                total += self._block_flops(i, n, r)
                n -= r
            self._flops[schedule] = total / 1e9
        return self._flops[schedule]

    @torch.inference_mode()
    def _block_flops(self, index: int, num_tokens: int, r: int, config=None, reducer=None, tag=None) -> int:
        """Counted FLOPs of block ``index`` on ``num_tokens`` tokens removing ``r``, under the
        scorer's patch configuration or ``config``, with the scorer's reducer or ``reducer``
        (then ``tag`` names it in the memo)."""
        from torch.utils.flop_counter import FlopCounterMode

        from ..methods.base import TokenState
        from .flops import _cpu_attention_formula

        config = self.config if config is None else config
        reducer = self.reducer if reducer is None else reducer
        # Blocks of one architecture cost the same: key by the block's parameter shapes, so a
        # 12-block ViT counts each (tokens, r) once rather than twelve times.
        block = self.blocks[index]
        key = (type(block), tuple(p.shape for p in block.parameters()), num_tokens, r, config.mlp_share, tag)
        if key not in self._block_counts:
            block_input = self._block_input
            x = block_input.x.new_zeros(1, num_tokens, block_input.x.shape[-1]).normal_()
            # A RoPE model's blocks need coordinates; any will do for counting FLOPs.
            pos = None if block_input.pos is None else block_input.pos.new_zeros(1, num_tokens, block_input.pos.shape[-1])
            state = TokenState(x, x.new_ones(1, num_tokens, 1), None, pos)
            counter = FlopCounterMode(display=False, custom_mapping=_cpu_attention_formula())
            with counter:
                block.forward_tokens(state, r, reducer, config, index)
            self._block_counts[key] = counter.get_total_flops()
        return self._block_counts[key]

    def _count_outside_blocks(self) -> None:
        """FLOPs of everything but the blocks (patch embedding, head): the unmerged model's
        count (``tune`` makes it once) less its blocks' at ``r=0`` without shared MLPs (a
        block that shares its MLP is cheaper than the unmodified one even at ``r=0``)."""
        whole = round(self._base_gflops * 1e9)
        unshared = replace(self.config, mlp_share=0.0)
        blocks = sum(self._block_flops(i, self.num_tokens, 0, unshared) for i in range(self.num_blocks))
        self._outside_blocks = whole - blocks

    @torch.inference_mode()
    def logits(self, schedule: tuple) -> torch.Tensor:
        """``[N, classes]`` logits of every calibration image at ``schedule``."""
        states = [self._embed(batch) for batch in self.batches]
        for i in range(self.num_blocks):
            states = [self.blocks[i].forward_tokens(s, schedule[i], self.reducer, self.config, i) for s in states]
        return self._logits(states)

    @torch.inference_mode()
    def probe_logits(self, schedule: tuple) -> torch.Tensor:
        """Logits of the probe subset at ``schedule``; blocks before the first one that
        differs from the last :meth:`set_incumbent` schedule start from its cached states."""
        incumbent, cached = self._cache
        start = next((i for i in range(self.num_blocks) if schedule[i] != incumbent[i]), self.num_blocks)
        states = cached[start]
        for i in range(start, self.num_blocks):
            states = [self.blocks[i].forward_tokens(s, schedule[i], self.reducer, self.config, i) for s in states]
        return self._logits(states)

    @torch.inference_mode()
    def set_incumbent(self, schedule: tuple) -> torch.Tensor:
        """Cache the probe subset's state at every block input under ``schedule``; returns
        the probe logits there."""
        states = [self._embed(batch) for batch in self.probe_batches]
        kept = [states]
        for i in range(self.num_blocks):
            states = [self.blocks[i].forward_tokens(s, schedule[i], self.reducer, self.config, i) for s in states]
            kept.append(states)
        self._cache = (tuple(schedule), kept)
        return self._logits(states)

    def _embed(self, batch):
        # Images may stay on the host (an evaluation's whole split) and move one batch at a time.
        return self.adapter.initial_state(batch.to(self.device))

    def _logits(self, states) -> torch.Tensor:
        return torch.cat([self.adapter.logits(s) for s in states]).float()


def _metrics(logits: torch.Tensor, reference: torch.Tensor, labels, objective: str) -> dict:
    kl = F.kl_div(logits.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="batchmean").item()
    agreement = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    accuracy = None if labels is None else (logits.argmax(-1) == labels).float().mean().item()
    loss = {"kl": kl, "agreement": 1.0 - agreement, "accuracy": None if accuracy is None else 1.0 - accuracy}[objective]
    return {"loss": loss, "kl": kl, "agreement": 100.0 * agreement,
            "accuracy": None if accuracy is None else 100.0 * accuracy}


def _smallest_constant(scorer: _Scorer, target: float) -> Optional[tuple]:
    """The effective schedule of the smallest constant ``r`` within ``target`` GFLOPs, or ``None``."""
    high = scorer.num_tokens  # clamping makes any larger r the same schedule
    fits = lambda r: scorer.gflops(scorer.effective([r] * scorer.num_blocks)) <= target  # noqa: E731
    low = smallest_meeting(fits, 0, high)
    if low is None:
        return None
    return scorer.effective([low] * scorer.num_blocks)


def _fill_budget(scorer: _Scorer, start: tuple, target: float) -> tuple:
    """``start`` with the GFLOPs it leaves under ``target`` spent on keeping tokens.

    A constant start can leave a large part of the budget unused (MCTF's r=17 costs a hair
    over ToMe r=16, so its constant start is r=18, 5% under), which would rank a method by
    how its per-block cost happens to round rather than by its merges. Blocks are visited
    from the last to the first and each gives back one token while the schedule still fits:
    a token kept in block ``i`` is carried by every later block, so a late block keeps one
    for the fewest GFLOPs and the fill keeps the most tokens for the slack. The rule uses
    only counted GFLOPs, nothing measured on images, so it holds for any model.
    """
    schedule = list(start)
    for i in reversed(range(scorer.num_blocks)):
        if schedule[i] == 0:
            continue
        trial = scorer.effective(schedule[:i] + [schedule[i] - 1] + schedule[i + 1:])
        if scorer.gflops(trial) <= target:
            schedule = list(trial)
    return tuple(schedule)


def _allocate(incumbent: tuple, probes: dict, scorer: _Scorer, target: float) -> Optional[tuple]:
    """A schedule proposed from per-block probes ``{(i, level): (d_loss, d_gflops)}``.

    Treating the probed changes as additive: first a Lagrangian allocation (each block takes
    the level minimising ``d_loss + mu * d_gflops``; ``mu``, the price of a GFLOP, bisected
    until the *counted* GFLOPs of the whole schedule meet ``target``), then a greedy fill
    that spends any GFLOPs left under the budget on the changes with the largest predicted
    loss drop. Returns ``None`` when nothing new fits the budget.
    """
    options: Dict[int, dict] = {}
    for (i, level), change in probes.items():
        options.setdefault(i, {incumbent[i]: (0.0, 0.0)})[level] = change

    def schedule_of(choice: dict) -> tuple:
        return scorer.effective([choice.get(i, r) for i, r in enumerate(incumbent)])

    def choose(mu: float) -> dict:
        return {i: min(levels, key=lambda lv: (levels[lv][0] + mu * levels[lv][1], levels[lv][1]))
                for i, levels in options.items()}

    fits = lambda choice: scorer.gflops(schedule_of(choice)) <= target  # noqa: E731
    low, high = 0.0, 1.0
    while not fits(choose(high)) and high < 1e12:
        high *= 10.0
    if not fits(choose(high)):
        return None
    for _ in range(30):  # bisection on log(mu)
        mu = math.sqrt(low * high) if low > 0 else high / 100.0
        if fits(choose(mu)):
            high = mu
        else:
            low = mu
        if low > 0 and high / low < 1.01:
            break
    choice = choose(high)
    while True:  # spend the slack left under the budget
        moves = sorted(
            ((levels[lv][0] - levels[choice[i]][0], i, lv) for i, levels in options.items() for lv in levels
             if levels[lv][0] < levels[choice[i]][0]),
        )
        for _, i, level in moves:
            trial = {**choice, i: level}
            if fits(trial):
                choice = trial
                break
        else:
            break
    proposal = schedule_of(choice)
    return proposal if proposal != incumbent else None


def _levels(r: int, delta: int) -> list:
    return [r + k * delta for k in (-1, 1) if r + k * delta >= 0]


def _search(scorer: _Scorer, start: tuple, reference, probe_reference, labels, objective: str, target: float,
            rounds: int, record, progress) -> tuple:
    """The per-block search from ``start``; returns ``(best schedule, its metrics)``."""
    incumbent = start
    current = _metrics(scorer.logits(incumbent), reference, labels, objective)
    probe_labels = None if labels is None else labels[::scorer.probe_every]
    delta = max(1, round(max(incumbent) / 8))
    for round_index in range(1, rounds + 1):
        base_loss = _metrics(scorer.set_incumbent(incumbent), probe_reference, probe_labels, objective)["loss"]
        probes = {}
        for i in range(scorer.num_blocks):
            for level in _levels(incumbent[i], delta):
                trial = scorer.effective(incumbent[:i] + (level,) + incumbent[i + 1:])
                if trial == incumbent or trial[i] != level:
                    continue
                loss = _metrics(scorer.probe_logits(trial), probe_reference, probe_labels, objective)["loss"]
                probes[(i, level)] = (loss - base_loss, scorer.gflops(trial) - scorer.gflops(incumbent))
                progress.update(1)
        proposal = _allocate(incumbent, probes, scorer, target)
        if proposal is not None:
            metrics = _metrics(scorer.logits(proposal), reference, labels, objective)
            progress.update(1)
            record(proposal, metrics, f"search round {round_index}")
            if metrics["loss"] < current["loss"]:
                incumbent, current = proposal, metrics
                continue
        if delta == 1:
            break
        delta = max(1, delta // 2)
    return incumbent, current


def option_grid(reducer) -> dict:
    """The options ``tune`` chooses for a policy: ``keep_norm`` if it fuses tokens (whether
    fused tokens should keep their members' norm depends on the model's residual stream, so it
    is measured, not assumed), then its class's own ``option_grid``."""
    common = {"keep_norm": (False, True)} if reducer.tracks_size else {}
    return {**common, **reducer.option_grid}


def _search_options(scorer: _Scorer, make_scorer, schedule: tuple, metrics: dict, reference, labels,
                    objective: str, target: float, fixed: set, record, progress) -> _Scorer:
    """The scorer with the best options of the method's ``option_grid`` at ``schedule`` (every
    trial is recorded as a candidate).

    One option at a time, in the grid's order (coordinate descent, one pass): every listed
    value is scored on all calibration images, the rest of the options held, and the best
    kept. Options in ``fixed`` (set by the caller) are not moved.
    """
    grid = option_grid(scorer.reducer)
    best, best_loss = scorer, metrics["loss"]
    for option, values in grid.items():
        if option in fixed:
            continue
        current = best.options.get(option, values[0])
        for value in values:
            if value == current:
                continue
            trial = make_scorer({**best.options, option: value})
            if trial.gflops(schedule) > target:
                continue
            trial_metrics = _metrics(trial.logits(schedule), reference, labels, objective)
            record(trial)(schedule, trial_metrics, f"options: {option}={value}")
            progress.update(1)
            if trial_metrics["loss"] < best_loss:
                best, best_loss = trial, trial_metrics["loss"]
    return best


def tune(
    model: nn.Module,
    data,
    *,
    target_gflops: Optional[float] = None,
    target_speedup: Optional[float] = None,
    gflops_fraction: Optional[float] = None,
    methods: Sequence = DEFAULT_METHODS,
    objective: str = "kl",
    search_methods: int = 1,
    search_options: bool = True,
    rounds: int = 3,
    probe_images: int = 250,
    batch_size: int = 125,
    measure_speed: bool = True,
    speed_batch_size: int = 16,
    progress: bool = True,
    per_image: bool = False,
    dtype: Optional[torch.dtype] = None,
) -> TuneResult:
    """The best training-free configuration of ``model`` within a GFLOPs budget.

    Args:
        model: an unpatched classifier (timm ViT, or a supported Hugging Face model with a
            classification head); left unchanged (variants share its weights).
        data: calibration images: a tensor ``[N, 3, H, W]``, an ``(images, labels)`` pair, or
            an iterable of batches (a DataLoader). Use train images, never the split you report.
        target_gflops / target_speedup / gflops_fraction: the budget, exactly one
            (see :func:`resolve_budget`).
        methods: candidate methods: names, or ``(name, options)`` pairs (options may include
            ``prop_attn``, ``keep_norm`` and ``mlp_share``; not ``threshold``: per-image
            thresholds are calibrated by ``per_image=True``).
        objective: ``"kl"``, ``"agreement"`` (both label-free) or ``"accuracy"`` (needs labels).
        search_methods: how many of the best constant-``r`` methods get a per-block search.
        search_options: then choose those methods' options from their ``option_grid``
            (e.g. MCTF's temperatures) at the searched schedule, on the calibration images.
        rounds: search rounds per method (each ``2 L`` probes).
        probe_images: calibration images the probes run on (an evenly spaced subset; the
            proposals and every reported figure use all of them).
        batch_size: images per forward pass.
        measure_speed: time every candidate against the unmodified model at the end.
        progress: show a progress bar.
        per_image: then turn the best ATC candidate into per-image merging (ATC's
            ``threshold``, :func:`~tokenmerge.evaluation.thresholds.calibrate_thresholds`) at
            the same budget, counted as the mean GFLOPs per image; kept if its loss is lower.
            Its cost is per image: a batch runs at the cost of its image that keeps most.
        dtype: autocast dtype for every forward pass, scoring and timing (``None`` or
            float32: the model's own precision), e.g. the one the model will be served in.

    Returns:
        :class:`TuneResult`; ``result.config()`` goes straight into :func:`tokenmerge.patch`.

    Raises:
        ValueError: a malformed or unreachable budget, an unknown objective or method, labels
            missing for ``"accuracy"`` or not one class index per image, a threshold among the
            candidates' options, ``per_image`` without an ATC candidate, or empty calibration
            data.
        TypeError: options a candidate method does not take.
    """
    from .. import is_patched

    if is_patched(model):
        raise ValueError("tune needs the unmodified model: call tokenmerge.unpatch(model) first")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    for name, value, low in (("search_methods", search_methods, 0), ("rounds", rounds, 0),
                             ("batch_size", batch_size, 1), ("probe_images", probe_images, 1),
                             ("speed_batch_size", speed_batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    images, labels = calibration_images(data)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"calibration images must be a non-empty [N, 3, H, W] batch, got shape {tuple(images.shape)}")
    if objective == "accuracy" and labels is None:
        raise ValueError("objective='accuracy' needs labels; use 'kl' or 'agreement' for unlabelled images")
    candidates_spec = _candidate_specs(model, methods, per_image)
    with evaluation_mode(model), autocast_for(next(model.parameters()).device, dtype):
        return _tune(model, images, labels, candidates_spec, target_gflops, target_speedup, gflops_fraction,
                     objective, search_methods, search_options, rounds, probe_images, batch_size, measure_speed,
                     speed_batch_size, progress, per_image)


def _candidate_specs(model: nn.Module, methods, per_image: bool) -> list:
    """``methods`` as ``[(name, options)]``, every entry checked before any work: its name, its
    options (by patching a copy that shares the weights), no ``threshold``, and an ATC
    candidate that can take one when ``per_image``."""
    from ..methods import get_method_class

    if isinstance(methods, str):
        methods = [methods]
    specs = []
    for entry in methods:
        if isinstance(entry, str):
            specs.append((entry, {}))
        elif (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)
              and isinstance(entry[1], dict)):
            specs.append((entry[0], dict(entry[1])))
        else:
            raise ValueError(f"each candidate method must be a name or a (name, options dict) pair, got {entry!r}")
    if not specs:
        raise ValueError("give at least one candidate method")
    for name, options in specs:
        if "threshold" in options:
            raise ValueError(
                f"candidate {name!r} sets threshold: tune calibrates per-image thresholds itself; drop it and "
                "pass per_image=True (tokenmerge tune --per-image)"
            )
        get_method_class(name)  # "none" too: build_variant would return the model itself
        build_variant(model, Variant.create(name, 0, options))
    if per_image and not any(name == "atc" and options.get("prop_attn", True) for name, options in specs):
        raise ValueError(
            "per_image=True turns an ATC candidate into per-image merging, which needs proportional attention: "
            "include 'atc' (without prop_attn=False) in methods"
        )
    return specs


def _tune(model, images, labels, candidates_spec, target_gflops, target_speedup, gflops_fraction, objective,
          search_methods, search_options, rounds, probe_images, batch_size, measure_speed, speed_batch_size,
          progress, per_image) -> TuneResult:
    from tqdm.auto import tqdm

    started = time.perf_counter()
    device = next(model.parameters()).device
    images = images.to(device)
    base_gflops = count_gflops(model, images=images[:1])
    target = resolve_budget(base_gflops, target_gflops, target_speedup, gflops_fraction)
    with torch.inference_mode():
        reference = torch.cat([logits_of(model(images[i:i + batch_size]))
                               for i in range(0, len(images), batch_size)]).float()
    if labels is not None:
        labels = labels.to(device)
        if not 0 <= int(labels.min()) <= int(labels.max()) < reference.shape[-1]:
            raise ValueError(
                f"labels run from {int(labels.min())} to {int(labels.max())} but the model predicts "
                f"{reference.shape[-1]} classes: give class indices in [0, {reference.shape[-1]}) (a head for "
                "the dataset's classes, e.g. num_classes=...)"
            )
    probe_every = math.ceil(len(images) / probe_images)
    probe_reference = reference[::probe_every]

    candidates: List[Candidate] = []
    scorers: Dict[int, _Scorer] = {}
    bar = tqdm(desc="tune", unit="probe", disable=not progress, leave=False)

    def recorder(scorer):
        def record(schedule, metrics, stage):
            candidate = Candidate(scorer.method, dict(scorer.options), tuple(schedule),
                                  scorer.gflops(tuple(schedule)), stage=stage, **metrics)
            candidates.append(candidate)
            bar.set_postfix_str(f"{scorer.method} {stage}: {objective}={metrics['loss']:.4f}")
            return candidate
        return record

    starts = []
    unreachable = []
    for index, (method, options) in enumerate(candidates_spec):
        scorer = _Scorer(model, method, options, images, batch_size, probe_every, base_gflops)
        scorers[index] = scorer
        start = _smallest_constant(scorer, target)
        if start is None:
            unreachable.append(f"{method} ({scorer.gflops(scorer.effective([scorer.num_tokens] * scorer.num_blocks)):.3f})")
            continue
        metrics = _metrics(scorer.logits(start), reference, labels, objective)
        recorder(scorer)(start, metrics, "constant")
        bar.update(1)
        filled = _fill_budget(scorer, start, target)
        if filled != start:
            filled_metrics = _metrics(scorer.logits(filled), reference, labels, objective)
            recorder(scorer)(filled, filled_metrics, "constant, budget filled")
            bar.update(1)
            if filled_metrics["loss"] < metrics["loss"]:
                start, metrics = filled, filled_metrics
        starts.append((metrics["loss"], index, start))
    if not starts:
        raise ValueError(
            f"the budget of {target:.3f} GFLOPs (unmodified: {base_gflops:.3f}) cannot be met: the most "
            f"each method can remove still costs {', '.join(unreachable)} GFLOPs; relax the target"
        )
    for _, index, start in sorted(starts)[:search_methods]:
        method, options = candidates_spec[index]
        scorer = scorers[index]
        schedule, metrics = _search(scorer, start, reference, probe_reference, labels, objective, target, rounds,
                                    recorder(scorer), bar)
        if search_options:
            make = lambda opts: _Scorer(model, method, opts, images, batch_size, probe_every, base_gflops)  # noqa: E731
            _search_options(scorer, make, schedule, metrics, reference, labels, objective, target,
                            fixed=set(options), record=recorder, progress=bar)
    if per_image:
        candidates.append(_per_image_candidate(model, candidates, images, reference, labels, objective, target,
                                               batch_size))
    bar.close()

    best = min(candidates, key=lambda c: (c.loss, c.gflops))
    if measure_speed:
        candidates, best = _with_speed(model, candidates, best, speed_batch_size, images)
    return TuneResult(best, candidates, base_gflops, target, objective, len(images),
                      time.perf_counter() - started)


def _per_image_candidate(model, candidates, images, reference, labels, objective, target, batch_size) -> Candidate:
    """The best ATC candidate, its schedule made a per-image cap with calibrated thresholds."""
    from .thresholds import calibrate_thresholds

    clustered = [c for c in candidates if c.method == "atc" and c.options.get("prop_attn", True)]
    if not clustered:
        raise ValueError(
            "per_image=True turns an ATC candidate into per-image merging, but no ATC candidate met the budget: "
            "relax the target"
        )
    start = min(clustered, key=lambda c: (c.loss, c.gflops))
    found = calibrate_thresholds(model, images, r=list(start.r), options=start.options, target_gflops=target,
                                 batch_size=batch_size)
    return Candidate(found.method, found.options, found.caps, found.gflops,
                     stage="per-image thresholds", **_metrics(found.logits, reference, labels, objective))


def _with_speed(model, candidates, best, batch_size, images):
    """Every candidate's measured images/s and speedup, timed interleaved in one run."""
    from .throughput import measure_throughput

    variants = {"unmodified": model}
    for k, c in enumerate(candidates):
        variants[k] = build_variant(model, Variant.create(c.method, list(c.r), c.options))
    # Random inputs of the calibration images' shape (a model may take non-square images).
    inputs = torch.randn(batch_size, *images.shape[1:], device=images.device)
    speed = measure_throughput(variants, device=images.device, warmup=1, repeats=3, inputs=inputs)
    base = speed["unmodified"]["images_per_s"]
    timed = []
    for k, c in enumerate(candidates):
        ips = speed[k]["images_per_s"]
        timed.append(Candidate(**{**asdict(c), "r": c.r, "images_per_s": ips, "speedup": ips / base}))
    return timed, timed[candidates.index(best)]
