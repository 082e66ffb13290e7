"""Accuracy / GFLOPs / throughput for a grid of methods x schedules, with a resumable cache.

A sweep evaluates every :class:`Variant` (a method, a schedule, the method's options) of one
base model on one preloaded image set. Accuracy and GFLOPs are deterministic, so each
finished variant is appended to a JSONL cache keyed by everything that determines them
(weights, data, image size, dtype, method, schedule, options, tokenmerge version); a rerun
after an interruption skips them. Throughput is *not* cached: it is measured at the end
for all variants together, interleaved with the unmodified model, so every speedup is a
ratio of figures taken in the same run on the same machine load.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

from ..api import shared_copy
from ..backends.adapter import adapter_for
from ..core.schedule import ScheduleClampedWarning, format_schedule, parse_schedule
from ..io import read_json
from .accuracy import check_num_classes, evaluate_correct
from .flops import count_gflops
from .statistics import Z95, accuracy_standard_error, pack_correct, paired_difference, unpack_correct
from .throughput import measure_throughput

__all__ = [
    "UNMODIFIED",
    "Variant",
    "ResultCache",
    "parse_option",
    "build_variant",
    "weights_fingerprint",
    "dataset_fingerprint",
    "run_sweep",
    "write_results",
    "read_results",
    "format_rows",
    "add_paired_statistics",
    "paired_row_difference",
    "CSV_COLUMNS",
    "PER_IMAGE",
]

UNMODIFIED = "none"  # the method name of the unmodified model's row
# tokens_out of a per-image configuration (ATC with a threshold): each image keeps its own
# number of tokens, and the cap schedule's count would read as what they keep.
PER_IMAGE = "per image"


@dataclass(frozen=True)
class Variant:
    """One row of a sweep.

    Attributes:
        method: a registered method name, or ``"none"`` for the unmodified model.
        schedule: a schedule label as :func:`~tokenmerge.core.schedule.format_schedule`
            writes it (``"13"``, ``"13:-1"``, ``"keep=0.9"``); ``"-"`` when unmodified.
        options: the method's options as sorted ``(key, value)`` pairs (hashable). The
            option ``modules=FILE`` of DTEM loads trained merge modules.
    """

    method: str
    schedule: str = "-"
    options: tuple = field(default=())

    @classmethod
    def create(cls, method: str, schedule=None, options: Optional[dict] = None) -> "Variant":
        if method == UNMODIFIED:
            return cls(UNMODIFIED)
        label = format_schedule(parse_schedule(schedule) if isinstance(schedule, str) else schedule)
        # Lists (ATC's per-block threshold) become tuples: variants are dict keys.
        items = ((key, tuple(value) if isinstance(value, list) else value) for key, value in (options or {}).items())
        return cls(method, label, tuple(sorted(items)))

    @property
    def label(self) -> str:
        return self.describe()

    def describe(self, files: Optional[Dict[str, str]] = None) -> str:
        """:attr:`label`, module files named as ``files`` maps them (:func:`distinct_file_names`)."""
        if self.method == UNMODIFIED:
            return "unmodified"
        extra = options_label(dict(self.options), files)
        return f"{self.method} r={self.schedule}" + (f" {extra}" if extra else "")


def options_label(options: dict, files: Optional[Dict[str, str]] = None) -> str:
    """``k=v`` pairs; file options (DTEM modules) by file name, as full paths would swamp
    tables and legends, or as ``files`` maps the path (:func:`distinct_file_names`)."""
    def shown(key, value):
        if key != "modules":
            return value
        return (files or {}).get(str(value)) or Path(value).name
    return " ".join(f"{k}={shown(k, v)}" for k, v in sorted(options.items()))


def distinct_file_names(paths: Iterable) -> Dict[str, str]:
    """``{path: short name}``: the file name, with as many parent folders as it takes to tell
    it from the other paths (two training runs each write ``dtem_modules.safetensors``)."""
    paths = {str(path) for path in paths}
    names = {}
    for path in paths:
        parts = Path(path).parts
        for depth in range(1, len(parts) + 1):
            if not any(Path(other).parts[-depth:] == parts[-depth:] for other in paths if other != path):
                break
        names[path] = str(Path(*parts[-depth:])) if parts else path
    return names


def _module_files(options_list: Iterable) -> Dict[str, str]:
    """:func:`distinct_file_names` of the ``modules`` files among options (dicts or pairs)."""
    return distinct_file_names(str(dict(options)["modules"]) for options in options_list
                               if "modules" in dict(options))


def parse_option(text: str):
    """``"[METHOD.]KEY=VALUE"`` -> ``(method or None, key, value)``; the value typed as int,
    float, bool, None or str (``order=2`` -> 2, ``tau=0.1`` -> 0.1, ``flag=true`` -> True,
    ``atc.tau_size=none`` -> None, the Python default an option may need to be set back to)."""
    if "=" not in text:
        raise ValueError(f"method option {text!r} must look like KEY=VALUE or METHOD.KEY=VALUE (e.g. tcvit.order=2)")
    key, value = text.split("=", 1)
    method, _, key = key.rpartition(".")
    if not key:
        raise ValueError(f"method option {text!r} has an empty key")
    lowered = value.lower()
    if lowered in ("true", "false"):
        typed = lowered == "true"
    elif lowered in ("none", "null"):
        typed = None
    else:
        typed = value
        for kind in (int, float):
            try:
                typed = kind(value)
                break
            except ValueError:
                continue
    return (method or None), key, typed


class evaluation_mode:
    """``with evaluation_mode(model):`` the module tree in eval mode, and on exit every module
    back in its own mode (a model may hold frozen parts in eval mode while it trains)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.modes = [(module, module.training) for module in self.model.modules()]
        self.model.eval()
        return self.model

    def __exit__(self, *exc):
        for module, training in self.modes:
            module.training = training
        return False


def build_variant(base: nn.Module, variant: Variant) -> nn.Module:
    """The model for ``variant``: ``base`` itself when unmodified, else a patched shared copy."""
    import tokenmerge

    if variant.method == UNMODIFIED:
        return base
    schedule = parse_schedule(variant.schedule)
    model = shared_copy(base)
    # A clamped schedule is reported in the row (tokens per block); the warning would only
    # repeat for every variant of the grid.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ScheduleClampedWarning)
        model = tokenmerge.patch(model, method=variant.method, r=schedule, **dict(variant.options))
    return model.eval()


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the model's state_dict (names, shapes, dtypes, bytes): identifies the weights
    whatever their origin (timm pretrained, local checkpoint, embedded default)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def dataset_fingerprint(root, limit: Optional[int] = None) -> str:
    """SHA-256 of the (relative path, byte size) of every image used, in evaluation order."""
    from .data import image_folder

    dataset = image_folder(root, limit=limit, transform=lambda image: image)
    base = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset
    count = len(dataset)
    root = Path(base.root)
    digest = hashlib.sha256()
    for path, label in base.samples[:count]:
        path = Path(path)
        digest.update(f"{path.relative_to(root)}:{path.stat().st_size}:{label}\n".encode())
    return digest.hexdigest()[:16]


def _file_sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


class ResultCache:
    """Finished rows, one JSON object per line: ``{"key": ..., "row": {...}}``.

    Appending a line per finished row (and flushing) means an interrupted sweep loses at
    most the row in progress. A torn last line (killed mid-write) is dropped when reading and
    cut off before the next append, so it cannot swallow the next row (:mod:`tokenmerge.io`).
    """

    def __init__(self, path):
        from ..io import read_jsonl

        self.path = Path(path) if path is not None else None
        self._rows: Dict[str, dict] = {}
        if self.path is not None:
            for entry in read_jsonl(self.path):
                if isinstance(entry.get("key"), str) and isinstance(entry.get("row"), dict):
                    self._rows[entry["key"]] = entry["row"]

    @staticmethod
    def key(context: dict, variant: Variant) -> str:
        payload = dict(context, method=variant.method, schedule=variant.schedule,
                       options=[list(item) for item in variant.options])
        # An option naming a file (DTEM modules) is keyed by the file's content, not its name.
        payload["option_files"] = {
            key: _file_sha256(value) for key, value in variant.options
            if isinstance(value, str) and Path(value).is_file()
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()

    def get(self, key: str) -> Optional[dict]:
        return self._rows.get(key)

    def put(self, key: str, row: dict) -> None:
        from ..io import append_jsonl

        self._rows[key] = row
        if self.path is not None:
            append_jsonl(self.path, {"key": key, "row": row})

    def __len__(self) -> int:
        return len(self._rows)


def _measured_row(model, variant, images, labels, num_classes, image_size, eval_batch_size,
                  device, dtype, progress, example=None) -> dict:
    """Accuracy, GFLOPs and token counts of one variant (the cacheable part of a row)."""
    tokens = adapter_for(model).tokens_per_block() if variant.method != UNMODIFIED else None
    tokens_out = None if tokens is None else tokens[-1]
    if variant.method != UNMODIFIED and adapter_for(model).reducer.per_image:
        correct, gflops = _per_image_results(model, variant, images, labels, num_classes, eval_batch_size,
                                             device, dtype, progress)
        # tokens_per_block() is the cap schedule, not what the images keep; the per-image
        # pass does not report final counts, so say so rather than print the caps.
        tokens_out = PER_IMAGE
    else:
        correct = evaluate_correct(model, images, labels, num_classes=num_classes,
                                   batch_size=eval_batch_size, device=device, dtype=dtype,
                                   progress=progress)
        gflops = count_gflops(model, image_size=image_size, device=device,
                              images=None if example is None else example[:1])
    return {
        "method": variant.method,
        "schedule": variant.schedule,
        "options": dict(variant.options),
        "label": variant.label,
        "accuracy": 100.0 * correct.double().mean().item(),
        "gflops": gflops,
        "tokens_in": None if tokens is None else tokens[0],
        "tokens_out": tokens_out,
        "num_images": int(len(labels)),
        "correct": pack_correct(correct),  # per image, for paired comparisons (evaluation.statistics)
    }


def _per_image_results(model, variant, images, labels, num_classes, batch_size, device, dtype,
                       progress) -> tuple:
    """``(correct [N], GFLOPs)`` of a per-image configuration in one pass over ``images``.

    Such a configuration costs what each image costs alone, so its GFLOPs are the mean of
    the images' counts, taken from the same forward passes that give the predictions.
    """
    import tokenmerge

    from .thresholds import PerImageCost

    base = tokenmerge.unpatch(shared_copy(model.eval().to(device)))
    config = {"method": variant.method, "r": list(adapter_for(model).schedule()),
              "options": dict(variant.options)}
    gflops, logits = PerImageCost(base, config, images, batch_size, dtype=dtype)(progress=progress)
    if num_classes is not None:
        check_num_classes(logits, num_classes)
    return logits.argmax(dim=-1).cpu() == labels.cpu(), gflops.mean().item()


def run_sweep(
    base: nn.Module,
    variants: Sequence[Variant],
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    cache: Optional[ResultCache] = None,
    context: Optional[dict] = None,
    image_size: int = 224,
    eval_batch_size: int = 128,
    device="cpu",
    dtype=None,
    timing: bool = True,
    timing_batch_size: int = 32,
    warmup: int = 2,
    repeats: int = 5,
    progress: bool = True,
    log=print,
    example: Optional[torch.Tensor] = None,
) -> List[dict]:
    """Evaluate every variant; returns one row dict per variant, unmodified first.

    Args:
        base: the unmodified model (eval mode).
        variants: the grid; the unmodified variant is added when missing.
        images: ``[N, 3, S, S]`` preloaded, normalised images (or any input batch the
            model takes: spectrograms, videos); ``labels``: ``[N]``.
        num_classes: the dataset's class count (checked against the model's head).
        cache: finished rows are looked up here first and stored here when computed.
        context: what besides the variant determines a row (weights, data, dtype, ...),
            hashed into the cache key.
        timing: measure throughput of all variants at the end (interleaved, median of
            ``repeats`` after ``warmup``) on random ``timing_batch_size`` batches.
        example: a random batch of the model's input shape (``timing_batch_size`` items),
            timed and FLOP-counted instead of ``image_size`` images: for models that take
            spectrograms or videos (:meth:`tokenmerge.evaluation.inputs.Inputs.example`).

    Rows: method, schedule, options, label, accuracy (%), gflops (per image), tokens_in,
    tokens_out (:data:`PER_IMAGE` where each image keeps its own count), num_images, cached,
    and with timing images_per_s, ms_per_batch, speedup. Labels name module files with as
    many parent folders as it takes to tell them apart. Timing runs on ``example`` (random
    inputs), or, when a row merges per image, on a spread of the evaluated inputs
    (:func:`timing_sample`), since its cost follows the content.
    """
    from tqdm.auto import tqdm

    unmodified = Variant(UNMODIFIED)
    variants = [unmodified] + [v for v in dict.fromkeys(variants) if v != unmodified]
    cache = cache if cache is not None else ResultCache(None)
    context = context or {}
    base = base.to(device).eval()
    files = _module_files(variant.options for variant in variants)
    models = {}  # by position in ``variants``: labels may coincide, variants do not
    rows = []
    for index, variant in enumerate(tqdm(variants, desc="variants", disable=not progress)):
        model = build_variant(base, variant)
        models[index] = model
        label = variant.describe(files)
        key = ResultCache.key(context, variant)
        row = cache.get(key)
        cached = row is not None
        if not cached:
            row = _measured_row(model, variant, images, labels, num_classes, image_size,
                                eval_batch_size, device, dtype, progress, example)
            cache.put(key, row)
        row = dict(row, label=label, cached=cached)
        log(f"  {label:<28} top-1 {row['accuracy']:6.2f}%  {row['gflops']:.3f} GFLOPs"
            + (" (cached)" if cached else ""))
        rows.append(row)
    add_paired_statistics(rows)
    if timing:
        inputs = example
        if any(index and adapter_for(model).reducer.per_image for index, model in models.items()):
            inputs = timing_sample(images, timing_batch_size).to(device)
        speed = measure_throughput(models, batch_size=timing_batch_size, image_size=image_size,
                                   device=device, dtype=dtype, warmup=warmup, repeats=repeats,
                                   progress=progress, inputs=inputs)
        reference = speed[0]["images_per_s"]  # variants[0] is the unmodified model
        for index, row in enumerate(rows):
            measured = speed[index]
            row["images_per_s"] = measured["images_per_s"]
            row["ms_per_batch"] = measured["ms_per_batch"]
            row["speedup"] = measured["images_per_s"] / reference
    return rows


def timing_sample(inputs: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` of the evaluated ``inputs``, evenly spaced (every class of a sorted folder),
    repeated if there are fewer: what per-image merging is timed on. Its token counts follow
    the content, and random noise merges otherwise than real images; fixed schedules cost the
    same on either, so the rows timed with it stay comparable."""
    index = torch.linspace(0, len(inputs) - 1, count).round().long() if len(inputs) > 1 else torch.zeros(count).long()
    return inputs[index]


def add_paired_statistics(rows: Sequence[dict]) -> None:
    """Give each row ``accuracy_se`` and, where the row and the unmodified one (``rows[0]``)
    kept per-image results, ``delta`` (its accuracy minus the unmodified one's, points) and
    ``delta_se`` (the paired standard error of that difference); ``None`` otherwise (e.g.
    rows cached by an older tokenmerge, or a single image, which has no standard error)."""
    base = rows[0] if rows and rows[0]["method"] == UNMODIFIED else None
    for row in rows:
        row["accuracy_se"] = accuracy_standard_error(row["accuracy"], row["num_images"])
        row["delta"] = row["delta_se"] = None
        if (base is not None and row is not base and row.get("correct") and base.get("correct")
                and row["num_images"] >= 2):
            row["delta"], row["delta_se"] = paired_row_difference(row, base)


def paired_row_difference(a: dict, b: dict) -> tuple:
    """``(accuracy(a) - accuracy(b), its paired standard error)`` in points, from two rows of
    one evaluation set that kept their per-image results (``correct``)."""
    return paired_difference(unpack_correct(a["correct"], a["num_images"]),
                             unpack_correct(b["correct"], b["num_images"]))


CSV_COLUMNS = ["method", "schedule", "options", "accuracy", "accuracy_se", "delta", "delta_se", "gflops",
               "tokens_in", "tokens_out", "images_per_s", "speedup", "num_images"]


def write_results(rows: Iterable[dict], meta: dict, out_dir) -> dict:
    """Write ``results.json`` (meta + rows) and ``results.csv`` under ``out_dir`` (each
    atomically: a kill leaves the previous file or the new one); returns the paths."""
    from ..io import atomic_write_json, atomic_write_text

    out_dir = Path(out_dir)
    rows = list(rows)
    json_path, csv_path = out_dir / "results.json", out_dir / "results.csv"
    atomic_write_json(json_path, {"meta": meta, "rows": rows}, indent=2)
    atomic_write_text(csv_path, _csv_text(rows))
    return {"json": json_path, "csv": csv_path}


def _csv_text(rows: Sequence[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        flat = dict(row)
        flat["options"] = " ".join(f"{k}={v}" for k, v in sorted(row.get("options", {}).items()))
        writer.writerow(flat)
    return buffer.getvalue()


def read_results(path) -> dict:
    """Load a ``results.json`` written by :func:`write_results` (clear error otherwise)."""
    data = read_json(path, "results file", " (tokenmerge eval writes OUT/results.json)")
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ValueError(f"{str(path)!r} is not a tokenmerge results file (no 'rows' list)")
    return data


def _cell(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _delta_cell(row: dict) -> str:
    if row.get("delta") is None or row.get("delta_se") is None:
        return "-"
    return f"{row['delta']:+.2f} +- {Z95 * row['delta_se']:.2f}"


def format_rows(rows: Sequence[dict]) -> str:
    """A plain-text table of sweep rows; "vs unmodified" is the accuracy difference to the
    unmodified model with its paired 95% interval (:mod:`tokenmerge.evaluation.statistics`)."""
    header = ["method", "schedule", "options", "tokens", "top-1 %", "vs unmodified (95% CI)", "GFLOPs/img",
              "im/s", "speedup"]
    lines = [header]
    files = _module_files(row.get("options", {}) for row in rows)
    for row in rows:
        tokens = "-" if row.get("tokens_in") is None else f"{row['tokens_in']}->{row['tokens_out']}"
        lines.append([
            row["method"],
            row["schedule"],
            options_label(row.get("options", {}), files) or "-",
            tokens,
            _cell(row.get("accuracy"), ".2f"),
            _delta_cell(row),
            _cell(row.get("gflops"), ".3f"),
            _cell(row.get("images_per_s"), ".1f"),
            _cell(row.get("speedup"), ".2f", "x"),
        ])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    text = []
    for i, line in enumerate(lines):
        text.append("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip())
        if i == 0:
            text.append("  ".join("-" * width for width in widths))
    return "\n".join(text)
