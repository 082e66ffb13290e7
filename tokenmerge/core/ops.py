"""Tensor operations that have one form for eager runs and another for ONNX export.

The TorchScript ONNX exporter (``torch.onnx.export(..., dynamo=False)``) mistranslates or
refuses a few ops the core uses. Each function here keeps the eager op, which is what every
run outside an export executes, and switches to an equivalent the exporter writes exactly,
with the same result, while :func:`torch.onnx.is_in_onnx_export` is true.
"""

from __future__ import annotations

import torch

__all__ = ["add_rows", "stable_argsort_descending"]


def add_rows(out: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``out[index[i]] += rows[i]`` for every ``i``, indices repeating.

    Args:
        out: ``[M, C]``, updated in place and returned.
        index: ``[K]`` int64 rows of ``out``.
        rows: ``[K, C]``.

    The exporter writes ``index_add_`` as a ScatterND that keeps one of the rows sent to a
    repeated index instead of their sum; ``scatter_add_`` becomes ScatterElements with
    ``reduction="add"``. Both add the rows in index order on CPU (bit-identical results).
    """
    if torch.onnx.is_in_onnx_export():
        return out.scatter_add_(0, index.unsqueeze(1).expand_as(rows), rows)
    return out.index_add_(0, index, rows)


def stable_argsort_descending(scores: torch.Tensor) -> torch.Tensor:
    """Positions of ``scores [B, M]`` from highest to lowest, ties to the earlier position.

    The exporter refuses ``sort(stable=True)``; ONNX ``TopK`` over all ``M`` breaks ties by
    the lower index by definition, so it is the same stable order.
    """
    if torch.onnx.is_in_onnx_export():
        return scores.topk(scores.shape[-1], dim=-1, largest=True, sorted=True).indices
    return scores.sort(dim=-1, descending=True, stable=True).indices
