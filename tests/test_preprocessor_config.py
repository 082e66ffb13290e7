"""tokenmerge.preprocessor_config: a Hugging Face folder's input settings, read and checked."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from torch import nn

from tokenmerge.preprocessor_config import per_channel, read_preprocessor_config


def _model_from(folder) -> nn.Module:
    model = nn.Identity()
    model.config = SimpleNamespace(_name_or_path=str(folder))
    return model


def test_a_folder_without_the_file_or_a_model_without_a_folder_reads_as_empty(tmp_path):
    assert read_preprocessor_config(_model_from(tmp_path)) == {}
    assert read_preprocessor_config(nn.Identity()) == {}


def test_the_saved_settings_are_read_and_a_non_object_is_refused(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.5, 0.5]}))
    assert read_preprocessor_config(_model_from(tmp_path)) == {"image_mean": [0.5, 0.5, 0.5]}
    (tmp_path / "preprocessor_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object.*fix or remove it"):
        read_preprocessor_config(_model_from(tmp_path))


def test_per_channel_statistics():
    assert per_channel(0.5, "image_mean") == (0.5, 0.5, 0.5)  # one value for all channels
    assert per_channel([0.1, 0.2, 0.3], "image_std") == (0.1, 0.2, 0.3)
    for bad in ([0.1, 0.2], "0.5", [0.1, None, 0.3]):
        with pytest.raises(ValueError, match="must be a number or 3 numbers"):
            per_channel(bad, "image_mean")
    with pytest.raises(ValueError, match="image_std=.* must be positive"):
        per_channel([0.2, 0.0, 0.2], "image_std")
    assert per_channel([-0.5, 0.0, 0.5], "image_mean") == (-0.5, 0.0, 0.5)  # means may be anything
