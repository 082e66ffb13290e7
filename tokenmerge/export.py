"""Deployment: a patched (or unmodified) image classifier, a timm ViT or a Hugging Face
``...ForImageClassification``, or an open_clip image encoder, as an ONNX file or a
``torch.export`` program.

A patched model's schedule is a function of its token count, hence of the input size; an
export fixes the input size (the model's ``img_size``, or ``config.image_size``), so the
schedule, every merge and every token count are fixed in the graph. Only the batch dimension
may stay dynamic. The graph maps images to logits: a Hugging Face model's
``ImageClassifierOutput`` is reduced to its ``logits``. An open_clip model (its
``VisionTransformer`` tower, or a whole ``CLIP``/``CoCa``) has no classification head: its graph
maps images to the image embedding (output ``embeddings``: the tower's pooled output,
``encode_image(normalize=False)``); a :class:`~tokenmerge.zero_shot.ZeroShotClassifier` around
one maps images to its zero-shot logits (the class embeddings are constants of the graph).

The ONNX file comes from the TorchScript-based exporter (``torch.onnx.export(...,
dynamo=False)``): the merge's sort, gather and scatter-add export to ``TopK``, ``GatherElements``
and ``ScatterND(reduction="add")``, which ONNX Runtime runs
(:mod:`tokenmerge.core.ops` holds the export forms of the ops that need one). With
``check=True`` the file is run once by ONNX Runtime and compared with PyTorch.

The model family is found by :func:`tokenmerge.backends.adapter.adapter_for`, which also
names what is supported when it refuses. Refused, with the reason and the fix: models no
adapter supports, models without a classification head (a Hugging Face trunk such as
``ViTModel``, ``CLIPModel``; open_clip models excepted, see above) or taking other inputs
than images (audio, video), timm ``dynamic_img_size`` models once patched (their schedule
follows the input size), methods whose plan a static graph cannot hold (``random`` draws it at
inference, ATC with a threshold keeps a token count per image;
:attr:`TokenReducer.export_refusal`), ``torch.compile`` wrappers, and an ``image_size`` other
than the model's.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .backends.adapter import input_placement
from .evaluation.sweep import evaluation_mode

__all__ = ["DEFAULT_OPSET", "OnnxExport", "check_exportable", "export_onnx", "export_program", "onnx_session"]

# ScatterND with reduction="add" needs opset 16; 20 is the newest the TorchScript
# exporter writes.
MIN_OPSET, MAX_OPSET = 16, 20
DEFAULT_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "images", "logits"
EMBEDDINGS_NAME = "embeddings"  # the output of an open_clip image encoder without zero-shot classes


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote and, with ``check=True``, how ONNX Runtime agreed.

    Attributes:
        path: the ``.onnx`` file.
        input_shape: ``(batch, 3, H, W)`` of the example input; the batch is ``"batch"``
            when it is dynamic.
        max_abs_diff: largest ``|output_onnxruntime - output_torch|`` over the check batches.
        argmax_agreement: fraction of check images with the same top-1 class (``None`` for
            image embeddings, which have no classes).
        output: the graph's output, ``"logits"``, or ``"embeddings"`` for an open_clip image
            encoder.
    """

    path: Path
    input_shape: tuple
    max_abs_diff: Optional[float] = None
    argmax_agreement: Optional[float] = None
    output: str = OUTPUT_NAME


class _Logits(nn.Module):
    """A Hugging Face classifier whose output is its logits tensor (the exported graph's one
    output) rather than an ``ImageClassifierOutput``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from .backends.adapter import logits_of

        return logits_of(self.model(images))


class _ImageEmbeddings(nn.Module):
    """An open_clip model without zero-shot classes as images -> image embedding ``[B, D]``:
    its tower's pooled output (``encode_image(normalize=False)``; the pooled half of an
    ``output_tokens=True`` tower's pair)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from .backends.open_clip import vision_tower

        out = vision_tower(self.model)(images)
        return out[0] if isinstance(out, tuple) else out


def _embeds_images(adapter) -> bool:
    """Whether the export is an open_clip image encoder (no classes): its output is the image
    embedding, not logits."""
    return adapter.family == "open_clip" and adapter.num_classes is None


def _output_name(model: nn.Module) -> str:
    from .backends.adapter import adapter_for

    return EMBEDDINGS_NAME if _embeds_images(adapter_for(model)) else OUTPUT_NAME


def _graph_module(model: nn.Module) -> nn.Module:
    """What is traced: a timm model as it is (it returns logits), a Hugging Face one and an
    open_clip image encoder wrapped (a ZeroShotClassifier returns logits itself)."""
    from .backends.adapter import adapter_for

    adapter = adapter_for(model)
    if _embeds_images(adapter):
        return _ImageEmbeddings(model).train(model.training)
    if adapter.family != "transformers":
        return model
    # In the model's mode: the exporter sets the traced module back to its own mode afterwards,
    # and a wrapper left in train mode would put the model in train mode with it.
    return _Logits(model).train(model.training)


def _requested_size(image_size) -> Optional[tuple]:
    if image_size is None:
        return None
    if isinstance(image_size, int):
        return (image_size, image_size)
    return tuple(int(s) for s in image_size)


def check_exportable(model: nn.Module, image_size=None) -> tuple:
    """Raise a clear error unless :func:`export_onnx` can export ``model`` exactly; returns
    the input ``(H, W)`` the export uses.

    Args:
        model: a timm ``VisionTransformer`` or a Hugging Face image classifier, patched or not.
        image_size: ``None`` (the model's), an int or ``(H, W)``; a fixed-size model takes
            only its own size.
    """
    from .api import _refuse_compiled
    from .backends.adapter import adapter_for

    _refuse_compiled(model, "export_onnx")
    try:
        adapter = adapter_for(model)
    except TypeError as err:
        raise TypeError(f"cannot export: {err}") from None
    try:
        built_for = adapter.input_size
    except TypeError as err:  # audio and video encoders
        raise TypeError(f"cannot export: {err}") from None
    if adapter.num_classes is None and not _embeds_images(adapter):
        raise TypeError(
            f"cannot export {type(model).__name__}: the exported graph maps images to logits, and it has "
            "no classification head; load the model as its ...ForImageClassification class"
        )
    refusal = adapter.export_refusal()
    if refusal:
        raise ValueError(f"cannot export this {'patched ' if adapter.is_patched else ''}model: {refusal}")
    patched = adapter.is_patched
    if patched:
        reducer = adapter.reducer
        if reducer.export_refusal:
            from .methods import get_method_class, list_methods

            exportable = ", ".join(name for name in list_methods() if get_method_class(name).export_refusal is None)
            # A per-image threshold is what is refused, not the method: its fixed-r form exports.
            fix = (f"drop the threshold (use a fixed r) to export; the deterministic methods export ({exportable})"
                   if reducer.per_image else f"export a deterministic method ({exportable})")
            raise ValueError(f"cannot export method {reducer.name!r} ({type(reducer).__name__}): "
                             f"{reducer.export_refusal}; {fix}")
    wanted = _requested_size(image_size)
    if wanted is not None and wanted != built_for and not (adapter.takes_any_image_size and not patched):
        raise ValueError(
            f"image_size {wanted[0]}x{wanted[1]}: the model is built for {built_for[0]}x{built_for[1]} "
            "images and a patched model's schedule is fixed for that size; leave image_size out, "
            "or create the model for the size to deploy (timm: img_size=..., Hugging Face: config.image_size)"
        )
    return wanted or built_for


def _example_images(batch_size: int, size: tuple, seed: int = 0) -> torch.Tensor:
    """``[batch_size, 3, H, W]`` standard-normal images from a private generator (the global
    RNG stays untouched)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, 3, *size, generator=generator)


def _check_opset(opset: int) -> None:
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(
            f"opset must be an int in {MIN_OPSET}..{MAX_OPSET} (the merge's scatter-add needs "
            f"opset {MIN_OPSET}; the TorchScript exporter writes up to {MAX_OPSET}), got {opset!r}"
        )


def _write_onnx(model: nn.Module, images: torch.Tensor, path: Path, dynamic_batch: bool, opset: int,
                output: str = OUTPUT_NAME) -> None:
    dynamic_axes = {INPUT_NAME: {0: "batch"}, output: {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        # The tracer warns that sizes become constants: for a fixed schedule that is the intent.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # torch deprecates this exporter in favour of the dynamo one, which (torch 2.14) fails to
        # decompose attention with a float mask (proportional attention); it is chosen on purpose.
        for message in ("You are using the legacy TorchScript-based ONNX export", "The feature will be removed"):
            warnings.filterwarnings("ignore", message=message, category=DeprecationWarning)
        torch.onnx.export(
            model, (images,), str(path), dynamo=False, input_names=[INPUT_NAME], output_names=[output],
            opset_version=opset, dynamic_axes=dynamic_axes, do_constant_folding=True,
        )


def _require_onnx() -> None:
    """The exporter writes through the ``onnx`` package; without it torch raises its own
    ``OnnxExporterError`` deep in the export, which names neither package nor extra."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ImportError("onnx is not installed: pip install 'tokenmerge[export]' (or pip install onnx)",
                          name="onnx") from None


def onnx_session(path, threads: Optional[int] = None):
    """An ONNX Runtime CPU session for ``path`` (``threads``: intra-op threads, default ORT's)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ImportError(
            "onnxruntime is not installed: pip install 'tokenmerge[export]' (or pip install onnxruntime)",
            name="onnxruntime",
        ) from None
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def compare_with_onnxruntime(model: nn.Module, path, batches) -> tuple:
    """Run ``path`` in ONNX Runtime and ``model`` in PyTorch on each ``[B, 3, H, W]`` batch.

    Returns:
        ``(max_abs_diff, argmax_agreement)`` over all batches; the agreement is ``None`` for an
        open_clip image encoder (embeddings have no classes).
    """
    session = onnx_session(path)
    graph, output = _graph_module(model), _output_name(model)
    worst, same, total = 0.0, 0, 0
    for images in batches:
        with torch.inference_mode():
            expected = graph(images)
        got = torch.from_numpy(session.run([output], {INPUT_NAME: images.numpy()})[0])
        worst = max(worst, float((got - expected).abs().max()))
        same += int((got.argmax(-1) == expected.argmax(-1)).sum())
        total += images.shape[0]
    return worst, (None if output == EMBEDDINGS_NAME else same / total)


def export_onnx(
    model: nn.Module,
    path,
    image_size=None,
    batch_size: int = 1,
    dynamic_batch: bool = True,
    opset: int = DEFAULT_OPSET,
    check: bool = False,
    atol: float = 1e-4,
) -> OnnxExport:
    """Write ``model`` (in eval mode, on CPU, float32) to an ONNX file, atomically.

    Args:
        model: a timm ViT or a Hugging Face image classifier, patched with a deterministic
            method or unmodified (see :func:`check_exportable` for what is refused).
        path: the ``.onnx`` file to write (replaced only once the export succeeded).
        image_size: ``None`` for the model's input size (the only one a patched model takes).
        batch_size: batch of the example input (the fixed batch when ``dynamic_batch=False``).
        dynamic_batch: leave the batch dimension free in the graph.
        opset: ONNX opset, ``16..20``.
        check: run the file in ONNX Runtime on ``batch_size`` random images (and on
            ``batch_size + 1`` more when the batch is dynamic) and raise ``ValueError`` if a
            logit differs from PyTorch's by more than ``atol``.
        atol: the tolerance of ``check``.

    Returns:
        :class:`OnnxExport` (the check's figures filled in when ``check=True``).
    """
    from .io import atomic_write

    size = check_exportable(model, image_size)
    _check_opset(opset)
    _require_onnx()
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    if device.type != "cpu" or dtype != torch.float32:
        raise ValueError(
            f"export a float32 model on the CPU (this one is {dtype} on {device}): call "
            "model.float().cpu() first; ONNX Runtime picks its own kernels per device"
        )
    path = Path(path)
    images = _example_images(batch_size, size)
    with evaluation_mode(model):
        graph, output = _graph_module(model), _output_name(model)
        atomic_write(path, lambda temporary: _write_onnx(graph, images, temporary, dynamic_batch, opset, output))
        shape = ("batch" if dynamic_batch else batch_size, 3, *size)
        if not check:
            return OnnxExport(path, shape, output=output)
        batches = [images] + ([_example_images(batch_size + 1, size, seed=1)] if dynamic_batch else [])
        worst, agreement = compare_with_onnxruntime(model, path, batches)
    if not worst <= atol:
        same = "" if agreement is None else f"; top-1 agreement {agreement:.1%}"
        raise ValueError(
            f"{path}: ONNX Runtime's {output} differ from PyTorch's by up to {worst:.3g} (> atol {atol:g}"
            f"{same}); the file was written but does not reproduce the model"
        )
    return OnnxExport(path, shape, worst, agreement, output)


def export_program(model: nn.Module, image_size=None, batch_size: int = 2, dynamic_batch: bool = True):
    """``torch.export.export`` of ``model`` at its fixed input size (same refusals as
    :func:`export_onnx`); returns the ``ExportedProgram`` (save it with ``torch.export.save``),
    whose module maps images to logits (a Hugging Face model's ``logits`` tensor), or to the
    image embedding for an open_clip model without zero-shot classes.

    The program runs where the model is, in its dtype (its example images are made on the
    device and in the dtype of the model's first floating-point parameter).

    ``batch_size`` is the example batch, the program's fixed batch with ``dynamic_batch=False``.
    With ``dynamic_batch`` the program takes any batch, and the example is traced at a batch of
    at least 2 (torch.export specialises a batch of 1).
    """
    size = check_exportable(model, image_size)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if dynamic_batch:
        batch_size = max(batch_size, 2)
    device, dtype = input_placement(model)
    images = _example_images(batch_size, size).to(device=device, dtype=dtype)
    dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    # Traced with gradients off, the merge code's own no_grad blocks change nothing, so the
    # graph holds no grad-mode switches: a program with them saves but fails to load.
    with evaluation_mode(model), torch.no_grad():
        return torch.export.export(_graph_module(model), (images,), dynamic_shapes=dynamic_shapes, strict=False)
