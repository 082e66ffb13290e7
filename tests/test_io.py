"""tokenmerge.io: atomic writes, JSON lines that survive a kill, tensor files loaded as data."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tokenmerge
from tokenmerge import io
from tokenmerge.evaluation.sweep import ResultCache

PACKAGE = Path(tokenmerge.__file__).parent


class OpensAFile:
    """Unpickling this creates ``path``: the side effect a malicious pickle would have."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_atomic_write_keeps_the_previous_file_when_the_writer_dies(tmp_path):
    target = tmp_path / "results.json"
    io.atomic_write_json(target, {"version": 1})

    def dies_midway(temporary: Path):
        temporary.write_text('{"version": 2, "rows": [')  # a torn write
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        io.atomic_write(target, dies_midway)
    assert json.loads(target.read_text()) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary left behind
    io.atomic_write_json(target, {"version": 2})
    assert json.loads(target.read_text()) == {"version": 2}


def test_a_torn_last_line_is_dropped_and_cannot_swallow_the_next_row(tmp_path):
    log = tmp_path / "log.jsonl"
    io.append_jsonl(log, {"step": 1})
    with open(log, "a") as handle:
        handle.write('{"step": 2, "lo')  # killed mid-write
    assert io.read_jsonl(log) == [{"step": 1}]
    io.append_jsonl(log, {"step": 2})
    assert io.read_jsonl(log) == [{"step": 1}, {"step": 2}]
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_a_damaged_line_inside_the_file_is_named(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"log\.jsonl line 2 is not valid JSON"):
        io.read_jsonl(log)
    assert io.read_jsonl(tmp_path / "missing.jsonl") == []


def test_result_cache_survives_a_kill_mid_row(tmp_path):
    path = tmp_path / "cache.jsonl"
    cache = ResultCache(path)
    cache.put("a", {"accuracy": 1.0})
    with open(path, "a") as handle:
        handle.write('{"key": "b", "row": {"accu')
    reopened = ResultCache(path)
    assert len(reopened) == 1 and reopened.get("a") == {"accuracy": 1.0}
    reopened.put("c", {"accuracy": 3.0})
    assert ResultCache(path).get("c") == {"accuracy": 3.0} and len(ResultCache(path)) == 2


def test_a_malicious_pickle_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.ones(2), "payload": OpensAFile(marker)}, path)
    with pytest.raises(ValueError, match=r"evil\.pth.*pickled Python object.*never loads"):
        io.load_tensor_file(path, "checkpoint")
    assert not marker.exists()


def test_corrupt_and_truncated_tensor_files_are_named(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"weight": torch.ones(64)}, good)
    assert torch.equal(io.load_tensor_file(good)["weight"], torch.ones(64))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(ValueError, match=r"truncated\.pt.*corrupt, truncated"):
        io.load_tensor_file(truncated)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        io.load_tensor_file(tmp_path / "missing.pt")
    tensors = tmp_path / "good.safetensors"
    save_file({"weight": torch.ones(64)}, str(tensors))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(tensors.read_bytes()[:-40])
    with pytest.raises(ValueError, match=r"broken\.safetensors.*corrupt, truncated"):
        io.load_safetensors(broken)


def test_non_finite_tensors_are_never_written(tmp_path):
    path = tmp_path / "w.safetensors"
    io.save_safetensors({"w": torch.ones(3)}, path)
    with pytest.raises(io.NonFiniteError, match="non-finite.*'?b'?"):
        io.save_safetensors({"a": torch.ones(3), "b": torch.tensor([1.0, float("nan")])}, path)
    assert torch.equal(io.load_safetensors(path)["w"], torch.ones(3))  # the earlier file is intact


def test_nothing_in_the_package_unpickles_arbitrary_objects():
    """Every torch.load passes weights_only=True; no pickle/dill/joblib loading at all."""
    offenders = []
    for source in PACKAGE.rglob("*.py"):
        text = source.read_text()
        for match in re.finditer(r"torch\.load\((?P<args>[^)]*)\)", text):
            if "weights_only=True" not in match.group("args"):
                offenders.append(f"{source.name}: {match.group(0)}")
        for pattern in (r"weights_only\s*=\s*False", r"\bpickle\.loads?\(", r"\bdill\b", r"joblib\.load",
                        r"\bUnpickler\(", r"numpy\.load\(.*allow_pickle=True", r"np\.load\(.*allow_pickle=True"):
            offenders += [f"{source.name}: {m.group(0)}" for m in re.finditer(pattern, text)]
    assert offenders == []


def test_read_json_names_the_file_what_it_should_be_and_where_it_comes_from(tmp_path):
    good = tmp_path / "best.json"
    good.write_text('{"method": "tome"}')
    assert io.read_json(good, "configuration file") == {"method": "tome"}
    hint = " (tokenmerge tune writes OUT/best.json)"
    cases = [
        (tmp_path / "missing.json", FileNotFoundError, "configuration file '{}' does not exist"),
        (tmp_path, ValueError, "'{}' is a folder, not a configuration file: pass the file"),
    ]
    broken = tmp_path / "broken.json"
    broken.write_text('{"method": ')
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00")
    cases += [(broken, ValueError, "configuration file '{}' is not valid JSON"),
              (binary, ValueError, "configuration file '{}' is not valid JSON")]
    for path, error, message in cases:
        with pytest.raises(error) as err:
            io.read_json(path, "configuration file", hint)
        assert message.format(path) in str(err.value) and str(err.value).endswith(hint)
