"""Tensor operations that have one form for eager runs and another for ONNX export.

The TorchScript ONNX exporter (``torch.onnx.export(..., dynamo=False)``) mistranslates or
refuses a few ops the core uses. Each function here keeps the eager op, which is what every
run outside an export executes, and switches to an equivalent the exporter writes exactly,
with the same result, while :func:`torch.onnx.is_in_onnx_export` is true.
"""

from __future__ import annotations

import torch

__all__ = ["add_rows", "stable_argsort_descending"]


class _AddRowsScatterND(torch.autograd.Function):
    """``index_add`` that the TorchScript exporter writes as one ``ScatterND(reduction="add")``
    over whole rows (opset 16+); used only while exporting."""

    @staticmethod
    def forward(ctx, out, index, rows):
        return out.index_add(0, index, rows)

    @staticmethod
    def symbolic(g, out, index, rows):
        row_index = g.op("Unsqueeze", index, g.op("Constant", value_t=torch.tensor([1])))  # [K] -> [K, 1]
        return g.op("ScatterND", out, row_index, rows, reduction_s="add")


def add_rows(out: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``out[index[i]] += rows[i]`` for every ``i``, indices repeating.

    Args:
        out: ``[M, C]``, updated in place and returned (a new tensor while exporting).
        index: ``[K]`` int64 rows of ``out``.
        rows: ``[K, C]``.

    The exporter writes ``index_add_`` as a ScatterND that keeps one of the rows sent to a
    repeated index instead of their sum. The export form is a ScatterND with
    ``reduction="add"`` over whole rows: ONNX Runtime adds the rows in index order, as
    ``index_add_`` does on CPU, and about 15x faster than the element-wise
    ScatterElements that ``scatter_add_`` becomes (ViT shapes, one thread).
    """
    if torch.onnx.is_in_onnx_export():
        return _AddRowsScatterND.apply(out, index, rows)
    return out.index_add_(0, index, rows)


def stable_argsort_descending(scores: torch.Tensor) -> torch.Tensor:
    """Positions of ``scores [B, M]`` from highest to lowest, ties to the earlier position.

    The exporter refuses ``sort(stable=True)``; ONNX ``TopK`` over all ``M`` breaks ties by
    the lower index by definition, so it is the same stable order.
    """
    if torch.onnx.is_in_onnx_export():
        return scores.topk(scores.shape[-1], dim=-1, largest=True, sorted=True).indices
    return scores.sort(dim=-1, descending=True, stable=True).indices
