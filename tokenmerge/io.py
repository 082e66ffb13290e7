"""Files that survive a kill, and tensor files read as data.

- :func:`atomic_write` and friends write to a temporary file beside the target and rename it
  over the target, so a kill mid-write leaves the previous version, never a torn one.
- :func:`append_jsonl` appends one JSON object per line (one ``write`` per row); it first
  cuts off a torn last line left by an earlier kill, so that line cannot swallow the new row.
  :func:`read_jsonl` drops such a torn line and names any other broken line.
- :func:`load_tensor_file` reads ``.pt``/``.pth`` files with ``weights_only=True`` (tensors
  and plain containers only: a pickle cannot run code) and :func:`load_safetensors` reads
  safetensors files; both turn a corrupt or truncated file into an error naming it.
- :func:`check_finite` refuses NaN/inf tensors before they reach a file.
- :func:`read_json` reads a JSON file a user named, with one error wording for a missing
  file, a folder and broken JSON.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Iterable, List, Mapping

import torch

__all__ = [
    "atomic_write",
    "atomic_write_text",
    "atomic_write_json",
    "append_jsonl",
    "read_jsonl",
    "rewrite_jsonl",
    "repair_torn_tail",
    "load_tensor_file",
    "load_safetensors",
    "save_safetensors",
    "check_finite",
    "NonFiniteError",
    "read_json",
]


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it; set back at once (at import, before any thread)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


class NonFiniteError(ValueError):
    """A tensor about to be saved (or just loaded) holds NaN or inf."""


# -- atomic writes ------------------------------------------------------------------------
def atomic_write(path, write: Callable[[Path], None]) -> Path:
    """Call ``write(temporary_path)``, then rename the temporary file over ``path``.

    The temporary file lives in the target's folder (a rename within one file system is
    atomic), is flushed to disk before the rename, and is removed if ``write`` fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        # mkstemp makes the file private (0600); give it the permissions a plain open() would.
        os.chmod(temporary, 0o666 & ~_UMASK)
        write(temporary)
        with open(temporary, "rb") as done:
            os.fsync(done.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path, text: str) -> Path:
    """Write ``text`` as UTF-8, byte for byte (no newline translation)."""
    return atomic_write(path, lambda temporary: temporary.write_bytes(text.encode("utf-8")))


def atomic_write_json(path, data, **dump_options) -> Path:
    return atomic_write_text(path, json.dumps(data, **dump_options) + "\n")


# -- JSON lines ---------------------------------------------------------------------------
def repair_torn_tail(path) -> None:
    """Cut a last line that has no newline (a write killed midway) off ``path``."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as handle:
        handle.seek(-1, os.SEEK_END)
        if handle.read(1) == b"\n":
            return
        handle.seek(0)
        complete = handle.read().rfind(b"\n") + 1
        handle.truncate(complete)


def append_jsonl(path, row: dict) -> None:
    """Append ``row`` as one line (a single write, flushed), after repairing a torn tail."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    repair_torn_tail(path)
    with open(path, "a") as handle:
        handle.write(json.dumps(row) + "\n")
        handle.flush()


def read_jsonl(path) -> List[dict]:
    """The rows of a JSON-lines file (``[]`` if it does not exist).

    A torn last line (no newline: the writer was killed) is dropped; any other line that is
    not a JSON object raises an error naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text()
    lines = text.split("\n")
    if not text.endswith("\n"):
        lines = lines[:-1]  # torn or empty tail
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path} line {number} is not valid JSON ({err}); the file is damaged: "
                "delete it (or that line) and run again"
            ) from None
        if not isinstance(row, dict):
            raise ValueError(f"{path} line {number} is not a JSON object; delete the file and run again")
        rows.append(row)
    return rows


def rewrite_jsonl(path, rows: Iterable[dict]) -> Path:
    """Replace a JSON-lines file atomically with ``rows``."""
    return atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


# -- tensors ------------------------------------------------------------------------------
def _damaged(path: Path, what: str, err: Exception, fix: str) -> ValueError:
    return ValueError(f"{what} {str(path)!r} cannot be read: it is corrupt, truncated or not a "
                      f"{path.suffix or 'tensor'} file ({_reason(err)}); {fix}")


def _reason(err: Exception) -> str:
    """The line of a loader's error that says what is wrong (torch's first line is advice)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    specific = [line for line in lines if "Unsupported operand" in line or "failed reading" in line]
    return f"{type(err).__name__}: {(specific or lines or [''])[0][:200]}"


def load_tensor_file(path, what: str = "file", fix: str = "replace it with an intact copy"):
    """``torch.load(path, weights_only=True)`` on CPU: tensors and plain containers only.

    A file that holds other pickled objects is refused (unpickling them could run
    arbitrary code), as is a corrupt or truncated one; both errors name the file.
    """
    import pickle

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if refused:
            raise ValueError(
                f"{what} {str(path)!r} holds a pickled Python object ({refused.group(1)}), which "
                f"tokenmerge never loads (unpickling it could run arbitrary code); {fix}"
            ) from None
        raise _damaged(path, what, err, fix) from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, ImportError, IndexError,
            KeyError, TypeError) as err:
        raise _damaged(path, what, err, fix) from None


def load_safetensors(path, what: str = "file", fix: str = "replace it with an intact copy") -> dict:
    """A safetensors file's tensors on CPU; a corrupt or truncated file gets an error naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise _damaged(path, what, err, fix) from None


def save_safetensors(state: Mapping[str, torch.Tensor], path, metadata=None, what: str = "file") -> Path:
    """Write finite ``state`` to a safetensors file atomically (refuses NaN/inf)."""
    from safetensors.torch import save_file

    check_finite(state, f"refusing to write {what} {str(path)!r}")
    return atomic_write(path, lambda temporary: save_file(dict(state), str(temporary), metadata=metadata))


def check_finite(state: Mapping[str, torch.Tensor], context: str) -> None:
    """Raise :class:`NonFiniteError` (``context: ...``) if a floating tensor holds NaN or inf."""
    bad = [name for name, tensor in state.items()
           if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NonFiniteError(f"{context}: non-finite values (NaN or inf) in {shown}")


def read_json(path, what: str, hint: str = ""):
    """The JSON value stored in ``path``.

    Args:
        path: the file.
        what: what the file should be, for messages (e.g. ``"results file"``).
        hint: appended to every error: where such a file comes from or what it should hold.

    Raises:
        FileNotFoundError: no such file. ValueError: a folder, or not UTF-8 JSON.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a folder, not a {what}: pass the file{hint}")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist{hint}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{what} {str(path)!r} is not valid JSON ({err}){hint}") from None
