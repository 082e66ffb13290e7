"""CLI error messages whose advice must work where the error arises."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import tokenmerge
from tokenmerge.cli import main
from tokenmerge.evaluation.accuracy import check_num_classes

SUBSET = Path(tokenmerge.__file__).parent / "assets" / "imagenette_val_subset"

pytestmark = pytest.mark.usefixtures("one_thread")


def test_class_count_error_gives_both_remedies():
    with pytest.raises(ValueError) as caught:
        check_num_classes(torch.zeros(1, 10), 2)
    message = str(caught.value)
    assert message.startswith("the model predicts 10 classes but the dataset has 2: ")
    # A head loaded from a checkpoint keeps its class count: the data must match it...
    assert "use a data folder with the model's 10 classes" in message
    # ...and only a new head can be built for the data's count.
    assert ("for a new or re-initialised head (not one loaded from a checkpoint), build the model with "
            "num_classes=2 (CLI: --num-classes 2)") in message
    check_num_classes(torch.zeros(1, 10), 10)


def test_eval_of_a_checkpoint_on_data_with_other_classes_says_to_match_the_data(tmp_path, capsys):
    # The embedded model's head comes from its checkpoint (10 classes); --num-classes 2 would be refused.
    data = tmp_path / "two"
    for name in sorted(p.name for p in SUBSET.iterdir())[:2]:
        (data / name).mkdir(parents=True)
        shutil.copy(next(iter(sorted((SUBSET / name).iterdir()))), data / name)
    assert main(["eval", "--data", str(data), "--limit", "2", "--no-timing", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "the model predicts 10 classes but the dataset has 2" in err
    assert "a data folder with the model's 10 classes" in err and "not one loaded from a checkpoint" in err
