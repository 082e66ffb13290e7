"""Command-line argument types: bad values stop in the parser with a message naming the fix."""

from __future__ import annotations

import argparse

import pytest

from tokenmerge.cli import build_parser
from tokenmerge.commands import arguments


def parser_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["bench", "--r", "abc"], "argument --r: cannot parse schedule 'abc'"),
    (["bench", "--threads", "0"], "argument --threads: must be at least 1"),
    (["bench", "--threads", "-2"], "argument --threads: must be at least 1"),
    (["bench", "--device", "banana"], "argument --device: unknown device 'banana': use cpu, cuda"),
    (["bench", "--device", "meta"], "device type 'meta' is not supported"),
    (["bench", "--batch-size", "0"], "argument --batch-size: must be a positive integer"),
    (["bench", "--repeats", "0"], "argument --repeats: must be a positive integer"),
    (["bench", "--warmup", "-1"], "argument --warmup: must be an integer >= 0"),
    (["bench", "--image-size", "0"], "argument --image-size: must be a positive integer"),
    (["eval", "--target-speedup", "nan"], "argument --target-speedup: must be a finite number"),
    (["eval", "--target-speedup", "inf"], "argument --target-speedup: must be a finite number"),
    (["eval", "--target-gflops", "-1"], "argument --target-gflops: must be a finite number > 0"),
    (["eval", "--limit", "0"], "argument --limit: must be a positive integer"),
    (["eval", "--repeats", "x"], "argument --repeats: expected an integer, got 'x'"),
    (["eval", "--num-classes", "0"], "argument --num-classes: must be a positive integer"),
    (["eval", "--r", "thirteen"], "cannot parse schedule"),
    (["visualize", "image.png", "--block", "0"], "argument --block: must be a positive integer"),
    (["demo", "--limit", "-3"], "argument --limit: must be a positive integer"),
    (["demo", "--threads", "0"], "argument --threads: must be at least 1"),
    (["train", "--epochs", "inf"], "argument --epochs: must be a finite number"),
    (["train", "--epochs", "0"], "argument --epochs: must be a finite number > 0"),
    (["train", "--lr=-1e-3"], "argument --lr: must be a finite number > 0"),
    (["train", "--backbone-lr", "nan"], "argument --backbone-lr: must be a finite number"),
    (["train", "--warmup-steps", "-5"], "argument --warmup-steps: must be an integer >= 0"),
    (["train", "--tau", "inf"], "tau must be a finite number > 0"),
    (["train", "--model-kwargs", "[1]"], "argument --model-kwargs: must be a JSON object"),
    (["train", "--model-kwargs", "{img_size: 32}"], "argument --model-kwargs: not valid JSON"),
    (["train", "--eval-r", "abc"], "argument --eval-r: cannot parse schedule"),
    (["train", "--resume", "--overwrite"], "not allowed with argument"),
    (["tune", "--rounds", "-1"], "argument --rounds: must be an integer >= 0"),
    (["tune", "--threads", "0"], "argument --threads: must be at least 1"),
])
def test_bad_values_are_refused_by_the_parser(argv, message, capsys):
    assert message in parser_error(argv, capsys)


def test_an_output_folder_that_is_a_file_and_vice_versa(tmp_path, capsys):
    a_file = tmp_path / "results.json"
    a_file.write_text("{}")
    for command in ("eval", "demo", "train", "tune"):
        assert "is a file, not a folder" in parser_error([command, "--out", str(a_file)], capsys)
    assert "is a file, not a folder" in parser_error(["eval", "--out", str(a_file / "sub")], capsys)
    err = parser_error(["visualize", "image.png", "--out", str(tmp_path)], capsys)
    assert "is a folder: pass a file path" in err
    assert "is a folder" in parser_error(["eval", "--plot", str(tmp_path)], capsys)
    args = build_parser().parse_args(["eval", "--out", str(tmp_path / "new"), "--plot", str(tmp_path / "p.png")])
    assert args.out == tmp_path / "new" and args.plot == tmp_path / "p.png"
    assert build_parser().parse_args(["eval", "--plot"]).plot == ""  # "the default path", not the cwd


def test_good_values_pass_through():
    assert arguments.positive_int("3") == 3
    assert arguments.non_negative_int("0") == 0
    assert arguments.finite_positive_float("1e-3") == 1e-3
    assert arguments.finite_non_negative_float("0") == 0.0
    assert arguments.threads("2") == 2
    assert arguments.device("cpu") == "cpu"
    assert arguments.json_object('{"img_size": 32}') == {"img_size": 32}
    assert arguments.schedule("13:-1") == (13, -1.0)
    with pytest.raises(argparse.ArgumentTypeError, match="finite"):
        arguments.finite_float("-inf")
    with pytest.raises(ValueError, match="cuda:0..cuda|no CUDA device"):
        arguments.parse_device("cuda:99")
