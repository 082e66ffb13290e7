"""Throughput measured the way shared, noisy machines allow: interleaved and by median.

Each repetition times every model once, in turn, so drifts in machine load hit all of
them alike; the reported figure is the median over repetitions. Speedups should be taken
as ratios of figures from the same call.
"""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from typing import Callable, Dict, Hashable, List, Optional

import torch
from torch import nn

__all__ = ["measure_throughput", "time_interleaved", "autocast_for"]


def autocast_for(device, dtype):
    """An autocast context for ``dtype`` on ``device`` (``None`` or float32: no autocast)."""
    if dtype is None or dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(calls: Dict[Hashable, Callable[[], object]], warmup: int = 3, repeats: int = 10,
                     device="cpu", bar=None) -> Dict[Hashable, List[float]]:
    """Seconds of every call in each of ``repeats`` rounds, after ``warmup`` untimed rounds.

    Each round calls every entry once, in order, so drifts in machine load hit all of them
    alike (take medians, and ratios within one call). ``device``: CUDA work is synchronised
    around each call. ``bar``: a progress bar advanced once per call, warm-up included.
    """
    times = {key: [] for key in calls}
    for step in range(warmup + repeats):
        for key, call in calls.items():
            _sync(device)
            start = time.perf_counter()
            call()
            _sync(device)
            elapsed = time.perf_counter() - start
            if step >= warmup:
                times[key].append(elapsed)
            if bar is not None:
                bar.update(1)
    return times


@torch.inference_mode()
def measure_throughput(
    models: Dict[str, nn.Module],
    batch_size: int = 32,
    image_size: int = 224,
    device="cpu",
    dtype=None,
    warmup: int = 3,
    repeats: int = 10,
    progress: bool = False,
    inputs: Optional[torch.Tensor] = None,
) -> Dict[str, dict]:
    """Images per second of each model on one random batch, interleaved.

    ``inputs`` times a batch of your own instead (e.g. videos ``[B, T, 3, H, W]``; then
    ``batch_size`` and ``image_size`` are ignored and "images" below means its items).

    Returns:
        ``{name: {"images_per_s": median, "ms_per_batch": median, "times_s": [...]}}``.
    """
    from tqdm.auto import tqdm

    if inputs is None:
        images = torch.randn(batch_size, 3, image_size, image_size, device=device)
    else:
        images, batch_size = inputs, inputs.shape[0]
    calls = {name: (lambda model=model: model(images)) for name, model in models.items()}
    total = (warmup + repeats) * len(models)
    with tqdm(total=total, desc="timing", disable=not progress, leave=False) as bar, autocast_for(device, dtype):
        times = time_interleaved(calls, warmup, repeats, device, bar)
    results = {}
    for name, samples in times.items():
        median = statistics.median(samples)
        results[name] = {
            "images_per_s": batch_size / median,
            "ms_per_batch": 1e3 * median,
            "times_s": samples,
        }
    return results
