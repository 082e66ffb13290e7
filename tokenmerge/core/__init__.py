"""The algorithmic core: pure tensor functions with no knowledge of any model."""

from .attention import key_metric, proportional_attention, size_bias
from .matching import bipartite_max_reduction, bipartite_soft_matching
from .merge import (
    MergePlan,
    initial_sources,
    keep_first,
    merge_positions,
    merge_tokens,
    track_sources,
    unmerge_tokens,
)
from .schedule import (
    KeepRatio,
    ScheduleClampedWarning,
    format_schedule,
    parse_schedule,
    resolve_schedule,
    tokens_per_block,
    validate_schedule,
)

__all__ = [
    "KeepRatio",
    "MergePlan",
    "ScheduleClampedWarning",
    "bipartite_max_reduction",
    "bipartite_soft_matching",
    "format_schedule",
    "initial_sources",
    "keep_first",
    "key_metric",
    "merge_positions",
    "merge_tokens",
    "parse_schedule",
    "proportional_attention",
    "resolve_schedule",
    "size_bias",
    "tokens_per_block",
    "track_sources",
    "unmerge_tokens",
    "validate_schedule",
]
