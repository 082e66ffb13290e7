"""Reduction schedules: how many tokens each block removes.

A schedule is given in one of four forms and resolved, for a concrete token count, into
one integer per block:

- ``r: int`` -- the same ``r`` in every block (ToMe's default).
- ``(r, inflection): tuple[int, float]`` -- a linear ramp from ``r * (1 - inflection)`` in
  the first block to ``r * (1 + inflection)`` in the last, each value truncated to an int as
  ToMe's ``parse_r`` does (so the mean can fall a little under ``r``). ``inflection=-1`` is
  ToMe's decreasing schedule (``2r`` down to ``0``), ``+1`` an increasing one.
- ``[r_0, r_1, ...]: list[int]`` -- one value per block; a shorter list is padded with 0.
- ``KeepRatio(rho)`` -- every block keeps ``ceil(rho * n)`` of the ``n`` mergeable
  (non-protected) tokens it receives, the EViT "keep rate" convention.

A block cannot remove more than its method allows (for bipartite matching, half of the
mergeable tokens). A schedule that asks for more is clamped; :func:`resolve_schedule`
says so in a warning that spells out the effective schedule.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence, Union

__all__ = [
    "KeepRatio",
    "Schedule",
    "ScheduleClampedWarning",
    "validate_schedule",
    "parse_schedule",
    "resolve_schedule",
    "format_schedule",
    "tokens_per_block",
    "resolve_local_schedule",
]


@dataclass(frozen=True)
class KeepRatio:
    """Keep ``ratio`` of the mergeable tokens in every block (``0 < ratio <= 1``)."""

    ratio: float

    def __post_init__(self):
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, numbers.Real):
            raise TypeError(f"keep ratio must be a number in (0, 1], got {self.ratio!r}")
        if not (0.0 < float(self.ratio) <= 1.0):
            raise ValueError(
                f"keep ratio must lie in (0, 1], got {self.ratio}; "
                "use e.g. KeepRatio(0.9) to keep 90% of the tokens in every block"
            )


Schedule = Union[int, tuple, list, KeepRatio]


class ScheduleClampedWarning(UserWarning):
    """A schedule asked some block to remove more tokens than it can."""


def _check_r(value, where: str) -> int:
    if isinstance(value, bool):
        # True is an int to Python; as a token count it is a mistake, not r=1.
        raise TypeError(f"{where} must be an integer number of tokens, got the bool {value!r}")
    if not isinstance(value, numbers.Integral):
        if isinstance(value, numbers.Real) and float(value).is_integer():
            value = int(value)
        else:
            raise TypeError(
                f"{where} must be a non-negative integer number of tokens, got {value!r}; "
                "for a fraction of tokens use keep_ratio=... (KeepRatio)"
            )
    if value < 0:
        raise ValueError(f"{where} must be >= 0 (tokens removed per block), got {value}")
    return int(value)


def validate_schedule(schedule: Schedule) -> Schedule:
    """Check a schedule's form and values; return it in canonical form (raises on bad input)."""
    if isinstance(schedule, KeepRatio):
        return schedule
    if isinstance(schedule, tuple):
        if len(schedule) != 2:
            raise ValueError(
                f"a tuple schedule is (r, inflection), got {schedule!r}; "
                "for an explicit per-block schedule pass a list"
            )
        r, inflection = schedule
        r = _check_r(r, "r")
        if isinstance(inflection, bool) or not isinstance(inflection, numbers.Real):
            raise TypeError(f"inflection must be a number in [-1, 1], got {inflection!r}")
        if not -1.0 <= float(inflection) <= 1.0:
            raise ValueError(f"inflection must lie in [-1, 1], got {inflection}")
        return (r, float(inflection))
    if isinstance(schedule, list):
        return [_check_r(v, f"r[{i}]") for i, v in enumerate(schedule)]
    return _check_r(schedule, "r")


def parse_schedule(text: str) -> Schedule:
    """Parse a command-line schedule.

    ``"13"`` -> 13; ``"13:-1"`` -> (13, -1.0); ``"16,16,8,8"`` -> [16, 16, 8, 8];
    ``"keep=0.9"`` -> KeepRatio(0.9).
    """
    text = text.strip()
    try:
        if text.startswith("keep="):
            return KeepRatio(float(text[len("keep="):]))
        if ":" in text:
            r, inflection = text.split(":", 1)
            return validate_schedule((int(r), float(inflection)))
        if "," in text:
            return validate_schedule([int(v) for v in text.split(",") if v.strip()])
        return validate_schedule(int(text))
    except ValueError as err:
        raise ValueError(
            f"cannot parse schedule {text!r} ({err}); use '13' (constant r), "
            "'13:-1' (r with inflection), '16,16,8' (per block) or 'keep=0.9' (keep ratio)"
        ) from None


def format_schedule(schedule: Schedule) -> str:
    """The inverse of :func:`parse_schedule` (a stable, human-readable label)."""
    schedule = validate_schedule(schedule)
    if isinstance(schedule, KeepRatio):
        return f"keep={schedule.ratio:g}"
    if isinstance(schedule, tuple):
        return f"{schedule[0]}:{schedule[1]:g}"
    if isinstance(schedule, list):
        return ",".join(str(v) for v in schedule)
    return str(schedule)


def _keep_ratio_reduction(ratio: float, mergeable: int) -> int:
    """Tokens to remove so that ``ceil(ratio * mergeable)`` remain (the epsilon absorbs
    float error in products such as ``0.9 * 10``)."""
    return mergeable - math.ceil(ratio * mergeable - 1e-9)


def _requested(schedule: Schedule, num_blocks: int) -> list:
    if isinstance(schedule, list):
        if len(schedule) > num_blocks:
            raise ValueError(
                f"the schedule lists {len(schedule)} blocks but the model has {num_blocks}"
            )
        return schedule + [0] * (num_blocks - len(schedule))
    if isinstance(schedule, tuple):
        r, inflection = schedule
        first = r * (1.0 - inflection)
        last = r * (1.0 + inflection)
        step = (last - first) / max(num_blocks - 1, 1)
        # Truncated as ToMe's parse_r truncates (so "5:0.8" starts at 0, not 1): the schedules
        # of the published code, float rounding included.
        return [int(first + step * i) for i in range(num_blocks)]
    if isinstance(schedule, KeepRatio):
        return [None] * num_blocks  # depends on the token count, filled in below
    return [schedule] * num_blocks


def resolve_schedule(
    schedule: Schedule,
    num_blocks: int,
    num_tokens: int,
    num_protected: int,
    max_reduction: Callable[[int, int], int],
    warn: bool = True,
) -> tuple:
    """Per-block token reductions for a concrete input.

    Args:
        schedule: any form accepted by :func:`validate_schedule`.
        num_blocks: blocks in the model.
        num_tokens: tokens entering the first block, protected ones included.
        num_protected: leading tokens that are never removed.
        max_reduction: ``(num_tokens, num_protected) -> int``, the most one block may remove.
        warn: emit :class:`ScheduleClampedWarning` when a block had to be clamped.

    Returns:
        ``tuple[int, ...]`` of length ``num_blocks``.
    """
    schedule = validate_schedule(schedule)
    requested = _requested(schedule, num_blocks)
    effective = []
    n = num_tokens
    clamped = False
    for want in requested:
        if want is None:
            want = _keep_ratio_reduction(schedule.ratio, n - num_protected)
        allowed = max(0, max_reduction(n, num_protected))
        r = min(want, allowed)
        clamped |= r < want
        effective.append(r)
        n -= r
    if clamped and warn:
        warnings.warn(
            f"schedule {format_schedule(schedule)} asks some blocks to remove more tokens than "
            f"they can ({num_tokens} tokens in, {num_protected} protected); "
            f"effective schedule: {effective} ({n} tokens left after the last block)",
            ScheduleClampedWarning,
            stacklevel=3,
        )
    return tuple(effective)


def tokens_per_block(num_tokens: int, reductions: Sequence[int]) -> list:
    """Token count entering each block, then the count leaving the last one."""
    counts = [num_tokens]
    for r in reductions:
        counts.append(counts[-1] - r)
    return counts


def resolve_local_schedule(
    schedule: Schedule,
    num_blocks: int,
    num_tokens: int,
    num_protected: int,
    max_reduction: Callable[[int, int], int],
    warn: bool = True,
) -> tuple:
    """Per-block reductions for the local (tomesd) layout, where every block sees all tokens.

    Unlike :func:`resolve_schedule` the count does not shrink from block to block: each
    block's ``r`` is clamped to what one block may remove from ``num_tokens``, and a keep
    ratio keeps that fraction of the full token set in every block.
    """
    schedule = validate_schedule(schedule)
    if isinstance(schedule, KeepRatio):
        requested = [_keep_ratio_reduction(schedule.ratio, num_tokens - num_protected)] * num_blocks
    else:
        requested = _requested(schedule, num_blocks)
    allowed = max(0, max_reduction(num_tokens, num_protected))
    effective = [min(r, allowed) for r in requested]
    if effective != requested and warn:
        warnings.warn(
            f"schedule {format_schedule(schedule)} asks some blocks to remove more tokens than "
            f"they can ({num_tokens} tokens in every block, {num_protected} protected); "
            f"effective local schedule: {effective}",
            ScheduleClampedWarning,
            stacklevel=3,
        )
    return tuple(effective)
