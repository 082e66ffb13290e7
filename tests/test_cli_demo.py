"""The CLI entry point and `tokenmerge demo` (a short run on the shipped data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tokenmerge
from tokenmerge.cli import build_parser, main
from tokenmerge.commands.demo import DTEM_MODULES_GLOB, demo_methods

SUBSET = Path(tokenmerge.__file__).parent / "assets" / "imagenette_val_subset"


def test_shipped_subset_is_a_complete_image_folder():
    classes = sorted(p for p in SUBSET.iterdir() if p.is_dir())
    assert len(classes) == 10
    assert all(len(list(c.glob("*.jpg"))) == 50 for c in classes)
    assert sum(p.stat().st_size for p in SUBSET.rglob("*.jpg")) < 6e6


def test_subcommands_registered(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = capsys.readouterr().out
    for command in ("bench", "eval", "visualize", "demo"):
        assert command in text


def test_python_dash_m_tokenmerge_is_the_command_line():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "tokenmerge", "eval", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--target-speedup" in done.stdout
    done = subprocess.run([sys.executable, "-m", "tokenmerge", "nope"], capture_output=True, text=True)
    assert done.returncode == 2 and "invalid choice" in done.stderr


def test_demo_methods_skips_dtem_without_modules(tmp_path):
    methods, options, skipped = demo_methods(assets=tmp_path)
    assert "drop" not in methods and "tome" in methods
    if "dtem" in tokenmerge.list_methods():
        assert "dtem" not in methods
        assert any(note.startswith("dtem skipped") and DTEM_MODULES_GLOB in note for note in skipped)
    with pytest.raises(ValueError, match="unknown method"):
        demo_methods(["nosuch"], assets=tmp_path)


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--limit", "10", "--r", "16", "--methods", "tome", "--no-timing",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for name in ("results.csv", "results.json", "pareto.png", "visualize.png"):
        assert (out / name).is_file() and str(out / name) in text
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["method"], r["schedule"]) for r in rows] == [("none", "-"), ("tome", "16")]
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dtem_module_file_is_used_when_shipped(tmp_path):
    """A shipped DTEM module file is loaded into the demo's DTEM variants (weights, not just the name)."""
    if "dtem" not in tokenmerge.list_methods():
        pytest.fail("the dtem method is not registered")
    import torch

    from tokenmerge.evaluation.sweep import Variant, build_variant
    from tokenmerge.methods.dtem import save_merge_modules
    from tokenmerge.models import load_model

    trained = tokenmerge.patch(load_model(), method="dtem", r=8)
    with torch.no_grad():
        for parameter in trained.token_reducer.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))  # not the initialisation
    save_merge_modules(trained, tmp_path / "dtem_vit_tiny.safetensors")
    methods, options, skipped = demo_methods(["tome", "dtem"], assets=tmp_path)
    assert methods == ["tome", "dtem"] and not skipped
    model = build_variant(load_model(), Variant.create("dtem", "8", options["dtem"]))
    for mine, saved in zip(model.token_reducer.state_dict().values(), trained.token_reducer.state_dict().values()):
        assert torch.equal(mine, saved)
    assert Variant.create("dtem", "8", options["dtem"]).label == "dtem r=8 modules=dtem_vit_tiny.safetensors"


def test_demo_on_a_single_image_completes(tmp_path, capsys):
    """--limit 1 used to crash after every row was computed: one image has no paired standard
    error, so the difference is left missing."""
    out = tmp_path / "demo"
    assert main(["demo", "--limit", "1", "--r", "16", "--methods", "tome", "--no-timing", "--threads", "1",
                 "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [row["num_images"] for row in rows] == [1, 1]
    assert [(row["delta"], row["delta_se"]) for row in rows] == [(None, None), (None, None)]
    assert (out / "pareto.png").is_file() and "pareto.png" in capsys.readouterr().out
