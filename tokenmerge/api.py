"""The public entry points: :func:`patch` and :func:`unpatch`."""

from __future__ import annotations

import copy
from typing import Optional

from torch import nn

from .backends.adapter import adapter_for
from .backends.common import MergeConfig, resolve_block_schedule
from .core.schedule import KeepRatio, validate_schedule
from .methods import TokenReducer, create_reducer, list_methods

__all__ = ["patch", "unpatch", "is_patched", "check_patchable", "COMMON_OPTIONS", "split_common_options"]

# Options of every method: keywords of patch(), not of a method's constructor.
COMMON_OPTIONS = ("prop_attn", "keep_norm", "mlp_share")

# What patching adds to a module besides swapping its class (see the backends).
_PATCH_ATTRIBUTES = ("token_reducer", "tokenmerge_config", "_tokenmerge_schedules", "_tm_rope")


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree that shares parameters and buffers with ``model``.

    Patching swaps classes in place, so a patched variant beside the original needs its own
    module objects; sharing the tensors keeps many variants of a large model within memory.
    """
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def _refuse_compiled(model: nn.Module, action: str) -> None:
    """``torch.compile`` returns a wrapper; patching it would miss the model it traced."""
    original = getattr(model, "_orig_mod", None)
    if isinstance(original, nn.Module) and type(model).__name__ == "OptimizedModule":
        raise TypeError(
            f"cannot {action} a torch.compile wrapper: call tokenmerge.{action}(compiled._orig_mod, ...) "
            "on the model it wraps, then compile again (patch before compiling)"
        )


def _adapter(model: nn.Module, action: str = "patch"):
    """The family adapter of ``model`` (see :mod:`tokenmerge.backends.adapter`)."""
    _refuse_compiled(model, action)
    return adapter_for(model)


def check_patchable(model: nn.Module) -> None:
    """Raise the ``TypeError`` :func:`patch` would raise if no backend supports ``model``."""
    _adapter(model)


def _reducer_for(method, options: dict):
    """A new policy from a method name and its options, or the given policy instance."""
    if isinstance(method, TokenReducer):
        if options:
            raise TypeError(
                f"method options {sorted(options)} cannot be applied to an existing "
                f"{type(method).__name__} instance (they would be ignored): pass them when creating "
                f"it, e.g. tokenmerge.create_reducer({method.name!r}, {', '.join(f'{k}=...' for k in sorted(options))}), "
                f"or pass method={method.name!r} with the options"
            )
        return method
    if not isinstance(method, str):
        raise TypeError(
            f"method must be a method name ({', '.join(list_methods())}) or a TokenReducer "
            f"instance, got {type(method).__name__}"
        )
    return create_reducer(method, **options)


def _own_attributes(module: nn.Module) -> dict:
    """The patch attributes set on ``module`` itself (plain attributes or submodules)."""
    present = {}
    for name in _PATCH_ATTRIBUTES:
        if name in module.__dict__ or name in module._modules:
            present[name] = getattr(module, name)
    return present


def _snapshot(model: nn.Module) -> list:
    """Every module's class and patch attributes, to restore after a failed patch."""
    return [(module, type(module), _own_attributes(module)) for module in model.modules()]


def _restore(snapshot: list) -> None:
    for module, cls, attributes in snapshot:
        module.__class__ = cls
        for name in _PATCH_ATTRIBUTES:
            if name in module.__dict__ or name in module._modules:
                delattr(module, name)
        for name, value in attributes.items():
            setattr(module, name, value)


def split_common_options(options: dict) -> tuple:
    """``options`` (e.g. a ``best.json``'s) -> ``(patch keywords, the method's own options)``."""
    common = {name: value for name, value in options.items() if name in COMMON_OPTIONS}
    return common, {name: value for name, value in options.items() if name not in COMMON_OPTIONS}


def _take_option(method_options: dict, name: str, value):
    """``value``, or the same option taken out of ``method_options`` (never both)."""
    if name in method_options:
        if value is not None:
            raise ValueError(f"{name} given twice (as a keyword and inside options); give it once")
        value = method_options.pop(name)
    return value


def _common_option(method_options: dict, name: str, value: Optional[bool]) -> Optional[bool]:
    """:func:`_take_option` for an on/off option: checked to be a bool."""
    value = _take_option(method_options, name, value)
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{name} must be True, False or None, got {value!r}")
    return value


def patch(
    model: nn.Module,
    method: str = "tome",
    r=None,
    *,
    keep_ratio: Optional[float] = None,
    trace_source: bool = False,
    attention_impl: str = "auto",
    num_protected: Optional[int] = None,
    layout: str = "global",
    prop_attn: Optional[bool] = None,
    keep_norm: Optional[bool] = None,
    mlp_share: Optional[float] = None,
    options: Optional[dict] = None,
    **method_options,
) -> nn.Module:
    """Make ``model`` merge tokens inside its blocks (in place; returns the model).

    Args:
        model: a timm ``VisionTransformer`` (ViT, DeiT, DeiT-3, ...), a supported
            Hugging Face vision encoder, or open_clip's own ``VisionTransformer`` (alone, or an
            open_clip ``CLIP``/``CoCa`` model, whose ``visual`` is patched).
        method: ``"tome"``, ``"atc"``, ``"mctf"``, ``"pitome"``, ``"dtem"``, ``"tcvit"`` or a
            baseline (all of them: ``tokenmerge.list_methods()``).
        r: tokens removed per block: an int, ``(r, inflection)``, a per-block list, or a
            :class:`~tokenmerge.KeepRatio` (any form :func:`tokenmerge.core.parse_schedule` returns).
        keep_ratio: instead of ``r``, keep this fraction of mergeable tokens in every block.
        trace_source: track which patches each token covers (visualisation, unmerging).
        attention_impl: how proportional attention reaches the fused kernel
            (``"auto"``, ``"fold"``, ``"bias"``; see :mod:`tokenmerge.core.attention`).
        num_protected: leading tokens never merged; default: the model's prefix tokens.
        layout: ``"global"`` (ToMe: merged tokens stay merged to the end) or ``"local"``
            (tomesd: each block merges before attention/MLP and unmerges after, so every
            block outputs all tokens; see :mod:`tokenmerge.backends.common`).
        prop_attn: proportional attention on (``True``) or off; ``None`` takes the method's
            default (on for the merging methods, off for select-and-fuse ones, whose few
            large representatives it over-weights; BENCHMARKS.md sections 4 and 6 have the measurements).
        keep_norm: merged tokens keep the mean norm of the tokens they fuse instead of the
            shorter norm of their average (ToFu's norm-preserving merge; see
            :func:`tokenmerge.core.merge.merge_tokens`). ``None`` keeps the policy's setting
            (off for a new one, so ToMe stays the published algorithm); ``tokenmerge tune``
            chooses it on calibration images.
        mlp_share: in every block, after its merge, run the MLP once for each of the most
            similar token pairs and give both members its output: this fraction (0 to 1) of
            the most pairs a block can form (half its mergeable tokens). Tokens stay in the
            sequence, so this cuts MLP FLOPs without the loss of removing tokens; combined
            with a smaller ``r`` it reaches the same budget (global layout only; see
            :meth:`tokenmerge.backends.common.MergingBlockMixin.forward_tokens`). Default 0.
        options: the method's options as a dict (the form ``tokenmerge tune`` writes in
            ``best.json``, so ``patch(model, **json.load(f))`` works); merged with
            ``**method_options``.
        **method_options: options of the method (e.g. ``order=2`` for TC-ViT).

    ``r=0`` reproduces the unmodified model exactly. Patching a patched model replaces its
    patch; if that fails, the previous patch stays in place. :func:`unpatch` restores the
    original.
    """
    if (r is None) == (keep_ratio is None):
        raise ValueError(
            "give exactly one of r= (tokens per block, e.g. r=13) or keep_ratio= (e.g. 0.9)"
        )
    schedule = validate_schedule(KeepRatio(keep_ratio) if keep_ratio is not None else r)
    adapter = _adapter(model)
    if options is not None:
        if not isinstance(options, dict):
            raise TypeError(f"options must be a dict of method options, got {type(options).__name__}")
        clash = sorted(set(options) & set(method_options))
        if clash:
            raise ValueError(f"method option(s) {clash} given both in options= and as keywords; give each once")
        method_options = {**options, **method_options}
    # Options of every method, also accepted inside options= (the form best.json holds).
    prop_attn = _common_option(method_options, "prop_attn", prop_attn)
    keep_norm = _common_option(method_options, "keep_norm", keep_norm)
    mlp_share = _take_option(method_options, "mlp_share", mlp_share)  # MergeConfig checks its range
    reducer = _reducer_for(method, method_options)
    if prop_attn is None:
        prop_attn = reducer.default_prop_attn
    if keep_norm is not None:
        reducer.keep_norm = keep_norm
    if num_protected is None:
        num_protected = adapter.num_prefix_tokens
    config = MergeConfig(schedule, num_protected, attention_impl, trace_source, layout, prop_attn,
                         0.0 if mlp_share is None else mlp_share)
    reducer.check_protected(config.num_protected, adapter.has_class_token)
    _check_prefix_protected(adapter, reducer, config)
    _check_per_image(reducer, config)
    snapshot = _snapshot(model)
    try:
        reducer.train(model.training)  # a new policy follows the model's train/eval mode
        adapter.patch(reducer, config)
        if hasattr(reducer, "bind_blocks"):
            # Methods with per-block parameters (DTEM) size them from the patched blocks.
            reducer.bind_blocks(adapter.merging_blocks(), adapter.architecture_name())
    except BaseException:
        _restore(snapshot)
        raise
    return model


def _check_prefix_protected(adapter, reducer, config: MergeConfig) -> None:
    """Refuse a merge that could take in the model's prefix tokens (class, distillation,
    registers).

    Heads and poolers find them by position (the class token at 0, a mean over the tokens
    after the prefix), so once merged they would silently be fed an average of patches, or a
    patch. Nothing is refused where nothing merges at the model's own input size, nor in the
    local layout, which puts every token back in its slot after each block, nor where the
    model pools by attention over all tokens (``adapter.reads_prefix_by_position``).
    """
    prefix = adapter.num_prefix_tokens
    if config.num_protected >= prefix or config.layout != "global" or not adapter.reads_prefix_by_position:
        return
    if not any(resolve_block_schedule(config, reducer, adapter.num_blocks, adapter.num_tokens)):
        return
    raise ValueError(
        f"cannot merge tokens with num_protected={config.num_protected}: this model has {prefix} prefix "
        f"token(s) (its class token, then any distillation or register tokens), which its head or pooler "
        f"reads by position, so they must stay out of merging; leave num_protected at its default "
        f"({prefix}) or raise it, or use layout='local' (every block puts each token back in its slot)"
    )


def _check_per_image(reducer, config: MergeConfig) -> None:
    """A per-image plan hides the empty slots of a batch through proportional attention's
    ``log 0``; without it, or where a block re-pairs tokens (shared MLPs) or unmerges
    (the local layout), those slots would change the other tokens."""
    if not reducer.per_image:
        return
    if not config.prop_attn:
        raise ValueError(f"{reducer.name} with a threshold needs prop_attn=True (it hides the empty token "
                         "slots of images that kept fewer tokens); drop prop_attn=False or the threshold")
    if config.mlp_share:
        raise ValueError(f"{reducer.name} with a threshold cannot share MLPs (mlp_share pairs would include "
                         "empty slots); set mlp_share=0 or drop the threshold")
    if config.layout != "global":
        raise ValueError(f"{reducer.name} with a threshold needs the global layout, got layout={config.layout!r}")


def unpatch(model: nn.Module) -> nn.Module:
    """Restore a patched model to its original classes and behaviour (in place)."""
    _refuse_compiled(model, "unpatch")
    if not is_patched(model):
        # A wrapper's marker outlives unpatching its tower or trunk alone, which cannot reach it.
        model.__dict__.pop("tokenmerge_config", None)
        return model
    return _adapter(model, "unpatch").unpatch()


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` is patched, or holds a patched trunk or tower (``hf_classifier.vit``,
    ``clip.visual``: patched on their own, they still merge inside ``model``)."""
    if getattr(type(model), "_tokenmerge_base", None) is not None:
        return True  # its own class is swapped (e.g. a Hugging Face wrapper's size-weighted head)
    try:
        adapter = adapter_for(model)
    except TypeError:  # no family supports it: its own marks are all there is to read
        return hasattr(model, "tokenmerge_config")
    # Not the wrapper's tokenmerge_config attribute: it outlives unpatching the tower or trunk on
    # its own (unpatch(clip.visual) cannot reach the clip), whose class says whether it merges.
    return adapter.is_patched
