"""benchmarks/coverage.py classifies models as BENCHMARKS.md reports them (timm's tiny test ViTs)."""

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "coverage.py"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def coverage():
    spec = importlib.util.spec_from_file_location("coverage_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_patched_model_passes_every_check(coverage):
    row = coverage.run_timm("test_vit")
    assert row["status"] == "patched", row
    assert row["tokens_out"] == row["tokens_in"] - coverage.R * coverage.DEPTH
    assert row["grad_checkpointing"] == "honoured"


def test_refusal_records_tokenmerge_message(coverage):
    row = coverage.run_timm("test_vit_relpos")
    assert row["status"] == "refused"
    assert "VisionTransformerRelPos" in row["reason"]


def test_errors_of_the_model_are_crashes_not_refusals(coverage, monkeypatch):
    def raise_in_model(model, x):
        raise ValueError("raised outside tokenmerge")

    monkeypatch.setattr(coverage, "check_timm", raise_in_model)
    row = coverage.run_timm("test_vit")
    assert row["status"] == "crash" and "raised outside tokenmerge" in row["reason"]

    def wrong_result(model, x):
        coverage._same(torch.zeros(1), torch.ones(1), "r=0")

    monkeypatch.setattr(coverage, "check_timm", wrong_result)
    row = coverage.run_timm("test_vit")
    assert row["status"] == "crash" and row["reason"].startswith("wrong result: r=0")


def test_model_that_cannot_run_unpatched_is_a_build_failure(coverage):
    def build(name):
        model = coverage.build_timm(name)[0]
        model.head = _Broken()
        return model, {}, []

    row = coverage.run_timm("test_vit", build=build)
    assert row["status"] == "build_failed" and "unpatched forward" in row["reason"]


class _Broken(torch.nn.Module):
    def forward(self, x):
        raise ValueError("broken head")
