import pytest

from tokenmerge.core.matching import bipartite_max_reduction
from tokenmerge.core.schedule import (
    KeepRatio,
    ScheduleClampedWarning,
    format_schedule,
    parse_schedule,
    resolve_schedule,
    tokens_per_block,
    validate_schedule,
)


def resolve(schedule, blocks=12, tokens=197, protected=1, warn=True):
    return resolve_schedule(schedule, blocks, tokens, protected, bipartite_max_reduction, warn=warn)


def test_constant_r():
    assert resolve(13) == (13,) * 12


def test_inflection_decreasing_has_mean_r():
    schedule = resolve((8, -1.0))
    assert schedule[0] == 16 and schedule[-1] == 0
    assert list(schedule) == sorted(schedule, reverse=True)
    assert abs(sum(schedule) - 8 * 12) <= 12


def test_inflection_zero_is_constant():
    assert resolve((10, 0.0)) == (10,) * 12


def test_explicit_list_padded_with_zeros():
    assert resolve([5, 4, 3]) == (5, 4, 3) + (0,) * 9


def test_list_longer_than_model_is_error():
    with pytest.raises(ValueError, match="13 blocks but the model has 12"):
        resolve([1] * 13)


def test_keep_ratio_keeps_fraction_of_mergeable_tokens():
    schedule = resolve(KeepRatio(0.9))
    counts = tokens_per_block(197, schedule)
    for before, after in zip(counts[:-1], counts[1:]):
        mergeable = before - 1
        assert after - 1 == -(-9 * mergeable // 10)  # ceil(0.9 * mergeable)


def test_keep_ratio_one_removes_nothing():
    assert resolve(KeepRatio(1.0)) == (0,) * 12


def test_clamp_warns_with_effective_schedule():
    with pytest.warns(ScheduleClampedWarning, match=r"effective schedule: \[98, 49, 24"):
        schedule = resolve(100)
    assert schedule[:3] == (98, 49, 24)


def test_feasible_schedule_does_not_warn(recwarn):
    resolve(13)
    assert not [w for w in recwarn if issubclass(w.category, ScheduleClampedWarning)]


@pytest.mark.parametrize("bad", [-1, [3, -2], (-4, 0.5)])
def test_negative_r_is_error(bad):
    with pytest.raises(ValueError, match=">= 0"):
        validate_schedule(bad)


@pytest.mark.parametrize("bad", [2.5, "13", [1, 2.5], None])
def test_non_integer_r_is_error(bad):
    with pytest.raises(TypeError, match="non-negative integer"):
        validate_schedule(bad)


@pytest.mark.parametrize("bad", [True, False, [2, True], (True, 0.5)])
def test_bool_r_is_error(bad):
    """True is an int to Python; as a token count it is a mistake, never r=1."""
    with pytest.raises(TypeError, match="bool"):
        validate_schedule(bad)


def test_integral_float_is_accepted():
    assert validate_schedule(13.0) == 13


@pytest.mark.parametrize("bad", [0.0, 1.5, -0.2])
def test_keep_ratio_out_of_range(bad):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        KeepRatio(bad)


def test_inflection_out_of_range():
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        validate_schedule((8, 2.0))


@pytest.mark.parametrize("text,expected", [
    ("13", 13), ("13:-1", (13, -1.0)), ("16,16,8", [16, 16, 8]), ("keep=0.9", KeepRatio(0.9)),
])
def test_parse_and_format_round_trip(text, expected):
    assert parse_schedule(text) == expected
    assert parse_schedule(format_schedule(expected)) == expected


def test_parse_error_names_the_forms():
    with pytest.raises(ValueError, match="'13:-1'"):
        parse_schedule("thirteen")
