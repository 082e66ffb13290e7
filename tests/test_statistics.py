"""Paired statistics of evaluation results, against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from tokenmerge.evaluation.statistics import (
    accuracy_standard_error,
    pack_correct,
    paired_difference,
    unpack_correct,
)


def test_per_image_results_pack_to_one_bit_each_and_round_trip():
    correct = torch.tensor([1, 0, 1, 1, 0, 0, 0, 1, 1, 1], dtype=torch.bool)
    # Bits 10110001 then 11000000 (padded): 0xb1, 0xc0.
    assert pack_correct(correct) == "b1c0"
    assert torch.equal(unpack_correct("b1c0", 10), correct)
    generator = torch.Generator().manual_seed(0)
    for n in (1, 7, 8, 9, 3925):
        bits = torch.rand(n, generator=generator) < 0.8
        assert torch.equal(unpack_correct(pack_correct(bits), n), bits)


def test_results_from_another_evaluation_set_are_refused():
    with pytest.raises(ValueError, match="another evaluation set"):
        unpack_correct("b1c0", 20)
    with pytest.raises(ValueError, match="hex string"):
        unpack_correct("not hex", 8)


def test_paired_difference_matches_a_hand_computation():
    # 10 images: a is right on 8, b on 7; they disagree on images 2 (a only), 5 (a only) and 9 (b only).
    a = torch.tensor([1, 1, 1, 1, 1, 1, 1, 1, 0, 0], dtype=torch.bool)
    b = torch.tensor([1, 1, 0, 1, 1, 0, 1, 1, 0, 1], dtype=torch.bool)
    delta, se = paired_difference(a, b)
    # d = (0,0,1,0,0,1,0,0,0,-1): mean 0.1; sample variance (sum d^2 - n mean^2) / (n - 1) = (3 - 0.1) / 9.
    assert delta == pytest.approx(10.0)
    assert se == pytest.approx(100 * math.sqrt((3 - 0.1) / 9) / math.sqrt(10))
    # Identical models: no difference and no noise in it.
    assert paired_difference(a, a) == (0.0, 0.0)
    # Pairing is what makes it small: far below the unpaired standard error of the difference.
    unpaired = math.hypot(accuracy_standard_error(80.0, 10), accuracy_standard_error(70.0, 10))
    assert se < unpaired


def test_accuracy_standard_error_and_bad_input():
    assert accuracy_standard_error(84.0, 3925) == pytest.approx(100 * math.sqrt(0.84 * 0.16 / 3925))
    assert accuracy_standard_error(100.0, 50) == 0.0
    with pytest.raises(ValueError, match="num_images"):
        accuracy_standard_error(50.0, 0)
    with pytest.raises(ValueError, match="same images"):
        paired_difference(torch.ones(3, dtype=torch.bool), torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least 2"):
        paired_difference(torch.ones(1, dtype=torch.bool), torch.ones(1, dtype=torch.bool))


def sweep_row(method: str, correct: list) -> dict:
    """A sweep row as run_sweep keeps it: accuracy, image count and per-image results."""
    bits = torch.tensor(correct, dtype=torch.bool)
    return {"method": method, "schedule": "-" if method == "none" else "8", "options": {},
            "accuracy": 100.0 * bits.double().mean().item(), "gflops": 1.0, "num_images": len(correct),
            "correct": pack_correct(bits)}


def test_one_image_has_no_paired_difference_and_every_output_shows_it_missing(tmp_path):
    """A one-image evaluation (eval/demo --limit 1) completes: delta and its standard error are
    missing (no standard error from one image), shown as missing in the table, CSV and JSON."""
    import csv
    import json

    from tokenmerge.evaluation.sweep import add_paired_statistics, format_rows, write_results

    rows = [sweep_row("none", [True]), sweep_row("tome", [False])]
    add_paired_statistics(rows)
    assert [(row["delta"], row["delta_se"]) for row in rows] == [(None, None), (None, None)]
    assert rows[1]["accuracy_se"] == 0.0
    header, _, _, tome = format_rows(rows).splitlines()
    assert tome[header.index("vs unmodified"):].split()[0] == "-"
    paths = write_results(rows, {}, tmp_path)
    written = list(csv.DictReader(paths["csv"].open()))
    assert [(row["delta"], row["delta_se"]) for row in written] == [("", ""), ("", "")]
    saved = json.loads(paths["json"].read_text())["rows"]
    assert [(row["delta"], row["delta_se"]) for row in saved] == [(None, None), (None, None)]
    # Two images are enough: the difference and its standard error by hand.
    rows = [sweep_row("none", [True, True]), sweep_row("tome", [False, True])]
    add_paired_statistics(rows)
    assert rows[1]["delta"] == pytest.approx(-50.0)
    assert rows[1]["delta_se"] == pytest.approx(100 * math.sqrt(0.5) / math.sqrt(2))
