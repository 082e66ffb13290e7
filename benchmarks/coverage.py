"""Coverage, measured: which ViT-like timm and Hugging Face models tokenmerge patches.

Not a test: run by hand, results go to benchmarks/results/coverage/ and BENCHMARKS.md.

    OMP_NUM_THREADS=1 python benchmarks/coverage.py --out benchmarks/results/coverage
    # one timm model module only (here the Eva class: EVA, EVA-02, ViT-RoPE, DINOv3, PE, ...)
    OMP_NUM_THREADS=1 python benchmarks/coverage.py --timm-module eva --skip-hf --skip-open-clip --out /tmp/cov_eva
    # open_clip only (its own VisionTransformer towers and the timm trunks of the others)
    OMP_NUM_THREADS=1 python benchmarks/coverage.py --skip-timm --skip-hf --out runs/cov_open_clip

Every model is built with random weights (``pretrained=False``, nothing is downloaded) and
shrunk through kwargs: ``depth=2`` and, where the name gives the patch size, an 8x8 patch
grid (``img_size=8*patch``). A model that rejects those kwargs is built with fewer (the
kwargs used are recorded). Then:

1. ``tokenmerge.patch(model, r=0)``: a ``TypeError``/``ValueError`` raised by tokenmerge itself
   is a *refusal* (its message is recorded);
2. the output at ``r=0`` must be ``torch.equal`` to the unpatched model's;
3. at ``r=2`` the output must be finite, of the unpatched shape, and the tokens leaving the
   last block (``forward_tokens``, ``tokens_per_block()[-1]``) must be the tokens entering
   the first block minus ``2 * depth``;
4. ``unpatch`` must restore the original classes and the unpatched output exactly;
5. (timm, open_clip) with ``set_grad_checkpointing(True)``, a merged training step must
   recompute the blocks in backward (checkpointing honoured) and give the gradients of the
   same step without it.

A model whose forward returns a tuple (an open_clip tower with ``output_tokens=True``:
``(embedding, tokens)``) is checked on its first output in steps 3 and 5 (its tokens are the
merged ones by design) and on every output in steps 2 and 4.

Each model is then ``patched`` (all checks pass), ``refused`` (step 1), ``build_failed`` (timm
or transformers could not build or run it small: not tokenmerge's doing) or ``crash`` (any
other exception, a wrong or non-finite result, ``r=0`` not exact).

The ViT-like timm names are ``timm.list_models()`` (architecture names, one per
architecture: pretrained ``.tag`` variants share it) matching ``TIMM_PATTERNS`` minus
``TIMM_EXCLUDE``. Hierarchical and windowed families (Swin, MaxViT, LeViT, ...) are not
ViT-like and not counted; tests/test_backend_timm.py checks that they are refused.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import re
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch

import tokenmerge

R = 2
DEPTH = 2
GRID = 8

# (family, pattern), first match wins: the families plus timm's other plain-ViT encoders.
TIMM_FAMILIES = (
    ("siglip", "*siglip*"),
    ("clip", "*clip*"),
    ("dinov2", "*dinov2*"),
    ("registers", "*_reg[0-9]*"),
    ("deit", "deit*"),
    ("eva", "eva*"),
    ("beit", "beit*"),
    ("flexivit", "flexivit*"),
    ("samvit", "samvit*"),
    ("vitamin", "vitamin*"),
    ("naflexvit", "naflexvit*"),
    ("vlm_encoders", "deepseek_vit*"),
    ("vlm_encoders", "gemma4_vit*"),
    ("vlm_encoders", "qwen3_vit*"),
    ("test_vit", "test_vit*"),
    ("vit", "vit_*"),
)
TIMM_PATTERNS = tuple(pattern for _, pattern in TIMM_FAMILIES)
# Convolutional towers the loose patterns catch (ResNet CLIP image towers).
TIMM_EXCLUDE = ("resnet*",)


def timm_names(select: str = "*", module: str = "", exclude: tuple = ()) -> list:
    """The ViT-like timm names matching ``select`` and none of ``exclude``; with ``module``
    (e.g. ``"eva"``), only those timm defines in ``timm.models.<module>`` (one model class's
    names, whatever they are called)."""
    import timm

    names = {name for pattern in TIMM_PATTERNS for name in timm.list_models(pattern)}
    names = [n for n in names if not any(fnmatch.fnmatch(n, p) for p in (*TIMM_EXCLUDE, *exclude))]
    if module:
        names = set(names) & set(timm.list_models(module=module))
    return sorted(n for n in names if fnmatch.fnmatch(n, select))


def family(name: str) -> str:
    return next(fam for fam, pattern in TIMM_FAMILIES if fnmatch.fnmatch(name, pattern))


class Finding(Exception):
    """A wrong result (not an exception of the model's own)."""


def _tokenmerge_raised(error: BaseException) -> bool:
    """A refusal is a TypeError/ValueError raised by tokenmerge's own code, not by the model."""
    if not isinstance(error, (TypeError, ValueError)):
        return False
    frames = traceback.extract_tb(error.__traceback__)
    package = str(Path(tokenmerge.__file__).parent)
    return bool(frames) and frames[-1].filename.startswith(package)


def _short(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    where = f" [{Path(frames[-1].filename).name}:{frames[-1].lineno}]" if frames else ""
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:400] + where


# ------------------------------------------------------------------------------------------
# Building
# ------------------------------------------------------------------------------------------


def _timm_kwargs(name: str) -> list:
    """Kwarg sets to try, smallest model first."""
    attempts = []
    patch = re.search(r"patch(\d+)", name)
    if patch:
        attempts.append(dict(depth=DEPTH, img_size=GRID * int(patch.group(1))))
    attempts += [dict(depth=DEPTH), {}]
    return attempts


def build_timm(name: str):
    """``(model, kwargs used, notes)``; raises the last build error if every attempt fails."""
    import timm

    notes = []
    for kwargs in _timm_kwargs(name):
        try:
            torch.manual_seed(0)
            with torch.device("meta" if not kwargs and _too_large(name) else "cpu"):
                return timm.create_model(name, pretrained=False, **kwargs).eval(), kwargs, notes
        except Exception as error:  # noqa: BLE001 - any build error means: try fewer kwargs
            notes.append(f"{kwargs}: {_short(error)}")
            last = error
    raise last


MAX_FULL_SIZE_PARAMS = 400e6


def _too_large(name: str) -> bool:
    """A model that rejects the shrinking kwargs is built at full size: count its parameters
    on the meta device first; one too large to run here is only checked for a refusal there
    (patching reads classes and shapes, not weights)."""
    import timm

    with torch.device("meta"):
        count = sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters())
    return count > MAX_FULL_SIZE_PARAMS


def timm_input(model) -> torch.Tensor:
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is None and tokenmerge.adapter_for(model).family == "open_clip":
        size = tokenmerge.adapter_for(model).input_size
    if size is None:
        size = model.pretrained_cfg["input_size"][1:]
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    torch.manual_seed(1)
    return torch.randn(2, 3, *size)


# ------------------------------------------------------------------------------------------
# Checks
# ------------------------------------------------------------------------------------------


def _expect(ok: bool, message: str) -> None:
    if not ok:
        raise Finding(message)


def _same(a, b, what: str) -> None:
    """Equal outputs: tensors, or tuples of them."""
    a, b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
    _expect(len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b)),
            f"{what}: output differs from the unpatched model's")


def _check_merged(out, reference, tokens, entering, depth, tokens_per_block) -> int:
    expected = entering - R * depth
    _expect(out.shape == reference.shape, f"r={R}: output shape {tuple(out.shape)} != {tuple(reference.shape)}")
    _expect(bool(torch.isfinite(out).all()), f"r={R}: non-finite output")
    _expect(tokens == expected, f"r={R}: {tokens} tokens after the blocks, expected {expected}")
    _expect(tokens_per_block[-1] == expected, f"r={R}: tokens_per_block()[-1]={tokens_per_block[-1]} != {expected}")
    return tokens


def _first(out) -> torch.Tensor:
    """A model's output, or the first of a tuple (open_clip ``output_tokens=True``)."""
    return out[0] if isinstance(out, tuple) else out


def _gradients(model, x):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(2)  # the same dropout draws in both steps
    _first(model(x)).square().mean().backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def check_grad_checkpointing(model, x) -> str:
    """Merged training step with and without timm's grad checkpointing: same gradients, and
    with it the first MLP runs again in backward (it was recomputed, not stored)."""
    calls = []
    hook = tokenmerge.adapter_for(model).blocks[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    model.train()
    try:
        plain = _gradients(model, x)
        runs_plain = len(calls)
        model.set_grad_checkpointing(True)
        checkpointed = _gradients(model, x)
        runs_checkpointed = len(calls) - runs_plain
    finally:
        model.set_grad_checkpointing(False)
        model.eval()
        hook.remove()
    _expect(all(torch.isfinite(g).all() for g in checkpointed), "grad checkpointing: non-finite gradients")
    _expect(len(plain) == len(checkpointed) and all(torch.allclose(a, b, atol=1e-6, rtol=1e-5)
            for a, b in zip(plain, checkpointed)), "grad checkpointing: gradients differ from the plain step")
    _expect(runs_checkpointed > runs_plain, "grad checkpointing: set but not honoured (blocks not recomputed)")
    return "honoured"


@torch.no_grad()
def _timm_outputs(model, x) -> tuple:
    """Every output tensor of ``model(x)``, as a tuple."""
    out = model(x)
    return out if isinstance(out, tuple) else (out,)


def _blocks(model) -> list:
    """The merging blocks (``model.blocks`` in timm, ``transformer.resblocks`` in open_clip)."""
    return tokenmerge.adapter_for(model).blocks


def check_timm(model, x) -> dict:
    """Steps 2-5 on a model that patched; raises :class:`Finding` on a wrong result."""
    cls, block_classes = type(model), [type(b) for b in _blocks(model)]
    reference = _timm_outputs(model, x)
    tokenmerge.patch(model, r=0)
    _same(_timm_outputs(model, x), reference, "r=0")
    tokenmerge.patch(model, r=R)
    with torch.no_grad():
        state = model.forward_tokens(x)
    entering = _tokens_entering(model, x)
    tokens = _check_merged(_timm_outputs(model, x)[0], reference[0], state.x.shape[1], entering,
                           len(_blocks(model)), model.tokens_per_block(entering))
    tokenmerge.unpatch(model)
    _expect(type(model) is cls and [type(b) for b in _blocks(model)] == block_classes, "unpatch: classes not restored")
    _same(_timm_outputs(model, x), reference, "after unpatch")
    # Last: training steps update BatchNorm statistics (hybrid stems), which would change the
    # outputs compared above.
    grad = "n/a"
    if hasattr(model, "set_grad_checkpointing"):
        grad = check_grad_checkpointing(tokenmerge.patch(model, r=R), x)
    return dict(tokens_in=entering, tokens_out=tokens, grad_checkpointing=grad)


@torch.no_grad()
def _tokens_entering(model, x) -> int:
    """Tokens entering the first block (the adapter's embedding: VisionTransformer and Eva)."""
    return tokenmerge.adapter_for(model).embed(x).shape[1]


def _classify(run) -> dict:
    """Run ``run()`` (which builds, patches and checks) and classify the outcome."""
    start = time.perf_counter()
    try:
        result = dict(status="patched", **run())
    except Refused as refusal:
        result = dict(status="refused", reason=str(refusal))
    except BuildFailed as failure:
        result = dict(status="build_failed", reason=str(failure))
    except Finding as finding:
        result = dict(status="crash", reason=f"wrong result: {finding}")
    except Exception as error:  # noqa: BLE001 - any other exception is a crash to report
        result = dict(status="crash", reason=_short(error), traceback=traceback.format_exc(limit=-4))
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


class Refused(Exception):
    pass


class BuildFailed(Exception):
    pass


def _patch_or_refuse(model) -> None:
    try:
        tokenmerge.patch(model, r=0)
    except Exception as error:  # noqa: BLE001
        if _tokenmerge_raised(error):
            raise Refused(_short(error)) from None
        raise
    tokenmerge.unpatch(model)


def run_timm(name: str, group: str = "", build=build_timm) -> dict:
    """Build ``name`` with ``build(name) -> (model, kwargs, notes)`` and run every check."""
    info = {}

    def run():
        try:
            model, kwargs, notes = build(name)
        except Exception as error:  # noqa: BLE001
            raise BuildFailed(f"create_model: {_short(error)}") from None
        info.update(kwargs=kwargs, cls=type(model).__name__, build_notes=notes)
        _patch_or_refuse(model)
        if next(model.parameters()).is_meta:
            raise BuildFailed("rejects depth=2 and is too large to run at full size here (it patches)")
        x = timm_input(model)
        try:
            _timm_outputs(model, x)
        except Exception as error:  # noqa: BLE001
            raise BuildFailed(f"unpatched forward at {tuple(x.shape)}: {_short(error)}") from None
        return check_timm(model, x)

    result = _classify(run)
    return dict(name=name, family=group or family(name), **info, **result)


# ------------------------------------------------------------------------------------------
# open_clip (when installed): its own VisionTransformer, or a timm trunk
# ------------------------------------------------------------------------------------------


def build_open_clip_tower(name: str):
    """The image tower of an open_clip config with 2 layers: its own ``VisionTransformer``,
    or the timm trunk of a ``TimmModel`` (the module a user patches there), built as
    open_clip builds it (its pooling and head) with ``depth=2`` added."""
    import open_clip
    import timm
    from unittest import mock

    config = open_clip.get_model_config(name)
    vision = dict(config["vision_cfg"])
    if not vision.get("timm_model_name"):
        vision["layers"] = DEPTH
        torch.manual_seed(0)
        return open_clip.model._build_vision_tower(config["embed_dim"], vision).eval(), dict(layers=DEPTH), []

    create = timm.create_model

    def shrunk(model_name, **kwargs):
        return create(model_name, **{**kwargs, "depth": DEPTH})

    torch.manual_seed(0)
    with mock.patch.object(open_clip.timm_model.timm, "create_model", shrunk):
        tower = open_clip.model._build_vision_tower(config["embed_dim"], vision)
    return tower.trunk.eval(), dict(depth=DEPTH, trunk=vision["timm_model_name"], pool=vision.get("timm_pool")), []


def _open_clip_version() -> str:
    try:
        import open_clip
    except ImportError:
        return "not installed (not covered)"
    return open_clip.__version__


def open_clip_vit_names() -> list:
    """open_clip configs whose image tower is ViT-like: its own VisionTransformer (``layers``
    is one int; ResNet towers give a tuple) or a timm trunk among :func:`timm_names`."""
    import open_clip

    vit_like = set(timm_names())
    names = []
    for name in open_clip.list_models():
        vision = open_clip.get_model_config(name)["vision_cfg"]
        trunk = vision.get("timm_model_name")
        if (trunk in vit_like) if trunk else isinstance(vision.get("layers"), int):
            names.append(name)
    return names


def open_clip_rows() -> list:
    try:
        import open_clip  # noqa: F401
    except ImportError:
        return []
    rows = []
    for name in open_clip_vit_names():
        rows.append(run_timm(name, "open_clip", build_open_clip_tower))
        _print(rows[-1])
    return rows


# ------------------------------------------------------------------------------------------
# Hugging Face
# ------------------------------------------------------------------------------------------

HF_VISION = dict(image_size=64, patch_size=8, hidden_size=32, num_hidden_layers=DEPTH, num_attention_heads=2,
                 intermediate_size=64)


def _hf_builders() -> dict:
    """name -> (expected: "patched" | "refused", builder). Tiny configs, random weights."""
    import transformers as tf

    def vision(config_cls, **extra):
        return config_cls(**HF_VISION, **extra)

    def clip_config(**extra):
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                    vocab_size=100, bos_token_id=0, eos_token_id=1, pad_token_id=1)
        return tf.CLIPConfig(vision_config=HF_VISION, text_config=text, projection_dim=16, **extra)

    def siglip_config():
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100,
                    bos_token_id=0, eos_token_id=1, pad_token_id=1)
        return tf.SiglipConfig(vision_config=HF_VISION, text_config=text)

    dinov2 = dict(image_size=64, patch_size=8, hidden_size=32, num_hidden_layers=DEPTH, num_attention_heads=2,
                  mlp_ratio=2)
    builders = {
        "ViTModel": ("patched", lambda: tf.ViTModel(vision(tf.ViTConfig))),
        "ViTForImageClassification": ("patched", lambda: tf.ViTForImageClassification(vision(tf.ViTConfig, num_labels=5))),
        "DeiTModel": ("patched", lambda: tf.DeiTModel(vision(tf.DeiTConfig))),
        "DeiTForImageClassification": ("patched", lambda: tf.DeiTForImageClassification(vision(tf.DeiTConfig, num_labels=5))),
        "DeiTForImageClassificationWithTeacher": (
            "patched", lambda: tf.DeiTForImageClassificationWithTeacher(vision(tf.DeiTConfig, num_labels=5))),
        "CLIPVisionModel": ("patched", lambda: tf.CLIPVisionModel(vision(tf.CLIPVisionConfig))),
        "CLIPVisionModelWithProjection": (
            "patched", lambda: tf.CLIPVisionModelWithProjection(vision(tf.CLIPVisionConfig, projection_dim=16))),
        "CLIPModel": ("patched", lambda: tf.CLIPModel(clip_config())),
        "CLIPForImageClassification": ("patched", lambda: tf.CLIPForImageClassification(clip_config(num_labels=5))),
        "Dinov2Model": ("patched", lambda: tf.Dinov2Model(tf.Dinov2Config(**dinov2))),
        "Dinov2ForImageClassification": (
            "patched", lambda: tf.Dinov2ForImageClassification(tf.Dinov2Config(**dinov2, num_labels=5))),
        "Dinov2WithRegistersModel": (
            "patched", lambda: tf.Dinov2WithRegistersModel(tf.Dinov2WithRegistersConfig(**dinov2, num_register_tokens=2))),
        "Dinov2WithRegistersForImageClassification": ("patched", lambda: tf.Dinov2WithRegistersForImageClassification(
            tf.Dinov2WithRegistersConfig(**dinov2, num_register_tokens=2, num_labels=5))),
        # Not supported: each must be a clear refusal.
        "BeitModel": ("refused", lambda: tf.BeitModel(vision(tf.BeitConfig))),
        "Data2VecVisionModel": ("refused", lambda: tf.Data2VecVisionModel(vision(tf.Data2VecVisionConfig))),
        "ViTMAEModel": ("refused", lambda: tf.ViTMAEModel(vision(tf.ViTMAEConfig))),
        "ViTMSNModel": ("refused", lambda: tf.ViTMSNModel(vision(tf.ViTMSNConfig))),
        "IJepaModel": ("refused", lambda: tf.IJepaModel(vision(tf.IJepaConfig))),
        "ViTForMaskedImageModeling": ("refused", lambda: tf.ViTForMaskedImageModeling(vision(tf.ViTConfig))),
        "SiglipVisionModel": ("refused", lambda: tf.SiglipVisionModel(vision(tf.SiglipVisionConfig))),
        "SiglipModel": ("refused", lambda: tf.SiglipModel(siglip_config())),
        "SwinModel": ("refused", lambda: tf.SwinModel(tf.SwinConfig(
            image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=2))),
        "YolosModel": ("refused", lambda: tf.YolosModel(tf.YolosConfig(**{**HF_VISION, "image_size": [64, 64]}))),
    }
    return builders


def _hf_tensor(model, x) -> torch.Tensor:
    """The tensor to compare: logits, image embeddings, or the pooled output."""
    if hasattr(model, "text_model"):  # a two-tower model: compare its image embeddings
        out = model.get_image_features(pixel_values=x)
        return out if isinstance(out, torch.Tensor) else out.pooler_output
    out = model(pixel_values=x)
    for field in ("logits", "image_embeds", "pooler_output", "last_hidden_state"):
        value = getattr(out, field, None)
        if isinstance(value, torch.Tensor):
            return value
    raise Finding(f"no tensor output in {type(out).__name__}")


@torch.no_grad()
def check_hf(model, x) -> dict:
    from tokenmerge.backends.transformers import vision_trunk

    reference = _hf_tensor(model, x)
    tokenmerge.patch(model, r=0)
    _same(_hf_tensor(model, x), reference, "r=0")
    tokenmerge.patch(model, r=R)
    trunk = vision_trunk(model)
    entering = trunk._tm_embed(x).shape[1]
    state = trunk.forward_tokens(x)
    tokens = _check_merged(_hf_tensor(model, x), reference, state.x.shape[1], entering,
                           len(trunk._tm_layers), trunk.tokens_per_block(entering))
    tokenmerge.unpatch(model)
    _same(_hf_tensor(model, x), reference, "after unpatch")
    return dict(tokens_in=entering, tokens_out=tokens)


def run_hf(name: str, expected: str, build) -> dict:
    def run():
        try:
            torch.manual_seed(0)
            model = build().eval()
        except Exception as error:  # noqa: BLE001
            raise BuildFailed(f"build: {_short(error)}") from None
        _patch_or_refuse(model)
        torch.manual_seed(1)
        return check_hf(model, torch.randn(2, 3, 64, 64))

    result = _classify(run)
    return dict(name=name, family="transformers", expected=expected, **result)


# ------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------

STATUSES = ("patched", "refused", "build_failed", "crash")


def summary_table(rows: list, key: str) -> str:
    groups = sorted({row[key] for row in rows})
    lines = [f"| {key} | names | " + " | ".join(STATUSES) + " |", "|---" * (len(STATUSES) + 2) + "|"]
    for group in groups + ["**all**"]:
        chosen = rows if group == "**all**" else [row for row in rows if row[key] == group]
        counts = Counter(row["status"] for row in chosen)
        lines.append(f"| {group} | {len(chosen)} | " + " | ".join(str(counts[s]) for s in STATUSES) + " |")
    return "\n".join(lines)


def reasons_table(rows: list, status: str) -> str:
    """Distinct reasons for one status, with how many names share each, and an example."""
    by_reason = {}
    for row in rows:
        if row["status"] == status:
            by_reason.setdefault(_reason_key(row["reason"]), []).append(row["name"])
    lines = ["| names | example | reason |", "|---|---|---|"]
    for reason, names in sorted(by_reason.items(), key=lambda item: -len(item[1])):
        lines.append(f"| {len(names)} | `{names[0]}` | {reason.replace('|', '/')} |")
    return "\n".join(lines)


def _reason_key(reason: str) -> str:
    # Block indices and sizes vary between names that fail for one reason.
    return re.sub(r"\d+", "N", reason) if "blocks." in reason or "layer " in reason else reason


def _rows_table(title: str, rows: list) -> list:
    lines = ["", f"## {title}", "", "| name | family | class | kwargs | status | tokens in -> out | grad ckpt |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        tokens = f"{row['tokens_in']} -> {row['tokens_out']}" if "tokens_in" in row else ""
        lines.append(f"| {row['name']} | {row['family']} | {row.get('cls', '')} | {row.get('kwargs', '')} | "
                     f"{row['status']} | {tokens} | {row.get('grad_checkpointing', '')} |")
    return lines


def markdown(timm_rows: list, hf_rows: list, clip_rows: list, meta: dict) -> str:
    every = timm_rows + hf_rows + clip_rows
    parts = [
        "# Coverage: ViT-like timm, Hugging Face and open_clip models",
        "",
        f"Command: `{meta['command']}`; {meta['machine']}; {meta['date']}; torch {meta['torch']}, "
        f"timm {meta['timm']}, transformers {meta['transformers']}, open_clip {meta['open_clip']}; "
        f"{meta['seconds']:.0f} s. Checks: see the docstring of benchmarks/coverage.py.",
        "",
        "## timm, per family",
        "",
        summary_table(timm_rows, "family"),
        "",
        "## Hugging Face classes",
        "",
        "| class | expected | status | tokens in -> out | reason |",
        "|---|---|---|---|---|",
    ]
    for row in hf_rows:
        tokens = f"{row['tokens_in']} -> {row['tokens_out']}" if "tokens_in" in row else ""
        parts.append(f"| {row['name']} | {row['expected']} | {row['status']} | {tokens} | "
                     f"{row.get('reason', '').replace('|', '/')} |")
    if clip_rows:
        parts += ["", "## open_clip image towers", "", summary_table(clip_rows, "family")]
    for status in ("crash", "build_failed", "refused"):
        parts += ["", f"## {status}: distinct reasons", "", reasons_table(every, status)]
    parts += _rows_table("Every timm name", timm_rows)
    if clip_rows:
        parts += _rows_table("Every open_clip config", clip_rows)
    return "\n".join(parts) + "\n"


def _print(row: dict) -> None:
    print(f"{row['status']:12s} {row['seconds']:6.1f}s {row['name']}  {row.get('reason', '')[:160]}", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/coverage"))
    parser.add_argument("--select", default="*", help="fnmatch pattern over the timm names (default: all)")
    parser.add_argument("--exclude", nargs="*", default=[], help="fnmatch patterns of timm names to leave out")
    parser.add_argument("--timm-module", default="", help="only the names timm defines in timm.models.<this> "
                        "(e.g. eva: EVA, EVA-02, ViT-RoPE, DINOv3, PE)")
    parser.add_argument("--skip-timm", action="store_true", help="leave out the timm names (e.g. to run open_clip only)")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--skip-open-clip", action="store_true")
    parser.add_argument("--machine", default="the project's 2-core x86_64 CPU box, 1 thread, fp32")
    parser.add_argument("--date", default=time.strftime("%Y-%m-%d", time.gmtime()))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    import timm
    import transformers

    start = time.perf_counter()
    timm_rows = []
    for name in [] if args.skip_timm else timm_names(args.select, args.timm_module, tuple(args.exclude)):
        timm_rows.append(run_timm(name))
        _print(timm_rows[-1])
    hf_rows = []
    if not args.skip_hf:
        for name, (expected, build) in _hf_builders().items():
            hf_rows.append(run_hf(name, expected, build))
            _print(hf_rows[-1])
    clip_rows = [] if args.skip_open_clip else open_clip_rows()
    meta = dict(
        command=" ".join(["OMP_NUM_THREADS=1 python benchmarks/coverage.py", *(argv if argv is not None else sys.argv[1:])]),
        machine=args.machine, date=args.date, torch=torch.__version__, timm=timm.__version__,
        transformers=transformers.__version__, open_clip=_open_clip_version(), seconds=time.perf_counter() - start,
        patterns=TIMM_PATTERNS, exclude=TIMM_EXCLUDE, r=R, depth=DEPTH,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "coverage.json").write_text(json.dumps(
        dict(meta=meta, timm=timm_rows, transformers=hf_rows, open_clip=clip_rows), indent=1))
    (args.out / "coverage.md").write_text(markdown(timm_rows, hf_rows, clip_rows, meta))
    for group, rows in (("timm", timm_rows), ("transformers", hf_rows), ("open_clip", clip_rows)):
        counts = Counter(row["status"] for row in rows)
        print(f"{group}: {len(rows)} names: " + ", ".join(f"{s} {counts[s]}" for s in STATUSES))
    print(f"wrote {args.out / 'coverage.md'}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
