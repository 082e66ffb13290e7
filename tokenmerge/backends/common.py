"""What every backend shares: the patch configuration, one block on a token state (global
and local layouts), the loop over blocks, and importable patched classes.

A backend only says where a block's pieces are, through the hooks of
:class:`MergingBlockMixin` (``_tm_norm1_module``, ``_tm_attend``, ``_tm_query_key``,
``_tm_key_projection``, ``_tm_after_attn``, ``_tm_norm2``, ``_tm_mlp``, ``_tm_after_mlp``,
``_tm_forward_unchanged``; models with rotary position embeddings override the ``_pos``
variants, which also get the tokens' coordinates and the block index); the merge logic lives
here once.

Layouts:

- ``"global"`` (ToMe): tokens leave the sequence for good, so every later block is cheaper.
  With ``mlp_share > 0`` each block also runs its MLP on fewer tokens without removing any
  (see :meth:`MergingBlockMixin.forward_tokens`).
- ``"local"`` (tomesd): in every block the normalised tokens are merged before attention and
  again before the MLP, each branch runs on the merged tokens, and its output is copied back
  (unmerged) onto every token before the residual add. The residual stream keeps all tokens,
  so every block outputs the full token count (for models that need every token at every
  block, e.g. dense heads on intermediate features). The merge is decided once per block from
  the normalised tokens' queries/keys, by the method's own policy, and read back as an
  assignment through source tracking.
"""

from __future__ import annotations

import hashlib
import importlib
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.utils.checkpoint

from ..core.attention import ATTENTION_IMPLS, size_bias
from ..core.matching import bipartite_soft_matching, shared_mlp_pairs
from ..core.merge import MergePlan, initial_sources, merge_positions, merge_tokens, unmerge_tokens
from ..core.schedule import resolve_local_schedule, resolve_schedule, tokens_per_block
from ..methods.base import TokenReducer, TokenState

__all__ = [
    "LAYOUTS",
    "MergeConfig",
    "MergingBlockMixin",
    "MergingModelMixin",
    "plan_from_sources",
    "run_blocks",
    "resolve_block_schedule",
    "block_token_counts",
    "patched_class",
    "attach_policy",
    "restore_classes",
]

LAYOUTS = ("global", "local")


@dataclass(frozen=True)
class MergeConfig:
    """Everything a patched model needs besides the method's policy.

    Attributes:
        schedule: validated schedule (see :mod:`tokenmerge.core.schedule`).
        num_protected: leading tokens never merged (class, distillation, register tokens).
        attention_impl: proportional-attention implementation (``auto``/``fold``/``bias``).
        trace_source: track which patches each token covers (visualisation, unmerging).
        layout: ``"global"`` or ``"local"`` (see the module docstring).
        prop_attn: proportional attention (merged tokens' log-sizes bias the attention); when
            off, sizes still weight merges and average pooling.
        mlp_share: fraction (0 to 1) of the most tokens a block could pair whose MLP is
            shared: after the block's merge, that many pairs of the most similar tokens run
            the MLP once per pair and both members get its output (global layout only).
    """

    schedule: object
    num_protected: int
    attention_impl: str = "auto"
    trace_source: bool = False
    layout: str = "global"
    prop_attn: bool = True
    mlp_share: float = 0.0

    def __post_init__(self):
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}"
            )
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if not isinstance(self.trace_source, bool):
            raise TypeError(f"trace_source must be True or False, got {self.trace_source!r}")
        if isinstance(self.num_protected, bool) or not isinstance(self.num_protected, int) or self.num_protected < 0:
            raise ValueError(f"num_protected must be a non-negative int, got {self.num_protected!r}")
        if not isinstance(self.prop_attn, bool):
            raise ValueError(f"prop_attn must be True or False, got {self.prop_attn!r}")
        share = self.mlp_share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= share <= 1.0:
            raise ValueError(f"mlp_share must be a number from 0 to 1 (a fraction of the pairable tokens), got {share!r}")
        if share and self.layout == "local":
            raise ValueError(
                "mlp_share needs layout='global': the local layout already runs both branches on merged tokens"
            )

    def runs_unchanged(self, r: int, size) -> bool:
        """Whether a global-layout block with reduction ``r`` on tokens of ``size`` (``None``:
        nothing merged yet) is the unmodified block, bit for bit."""
        return r == 0 and size is None and not self.mlp_share


def plan_from_sources(source: torch.Tensor, num_protected: int, num_out: int) -> MergePlan:
    """The assignment a reducer made, recovered from its source map.

    ``source [B, N - num_protected]`` (token index per non-protected input token, ``num_out``
    when discarded) plus the protected tokens, which stay in place, is a full plan.
    """
    B = source.shape[0]
    protected = torch.arange(num_protected, device=source.device).expand(B, num_protected)
    return MergePlan(torch.cat([protected, source], dim=1), num_out)


class MergingBlockMixin:
    """Token reduction for one pre-norm transformer block; ``forward`` is unchanged.

    Backend hooks: ``_tm_norm1_module`` (the pre-attention norm), ``_tm_attend(h, log_size,
    impl) -> (out, AttentionTensors)``, ``_tm_query_key(h) -> AttentionTensors``,
    ``_tm_key_projection() -> (weight [H*D, C], bias [H*D] or None, H, D)``,
    ``_tm_after_attn(h)`` (layer scale, drop path), ``_tm_norm2(x)``, ``_tm_mlp(h)``,
    ``_tm_after_mlp(h)``, ``_tm_forward_unchanged(x)``. Methods with per-block parameters
    (DTEM) read the norm and key projection through the same hooks, so they know no backend.
    """

    def _tm_norm1(self, x):
        return self._tm_norm1_module(x)

    # The hooks a block with rotary position embeddings (RoPE) overrides: they also get the
    # tokens' coordinates ``pos`` ([B, N, K], see TokenState) and the block's index (per-block
    # frequencies). The defaults, for blocks without RoPE, ignore both.
    def _tm_attend_pos(self, h, pos, log_size, impl, block_index):
        return self._tm_attend(h, log_size, impl)

    def _tm_query_key_pos(self, h, pos, block_index):
        return self._tm_query_key(h)

    def _tm_forward_unchanged_pos(self, x, pos, block_index):
        return self._tm_forward_unchanged(x)

    def _tm_after_attn(self, h):
        return h

    def _tm_after_mlp(self, h):
        return h

    def _tm_mlp_branch(self, x):
        return self._tm_after_mlp(self._tm_mlp(self._tm_norm2(x)))

    def forward_tokens(
        self, state: TokenState, r: int, reducer: TokenReducer, config: MergeConfig, block_index: int
    ) -> TokenState:
        """Global layout: one block on a :class:`TokenState`, removing ``r`` tokens between
        attention and MLP.

        With ``config.mlp_share > 0`` the MLP then runs on fewer tokens without removing any
        (ToMeSD's merge, compute, unmerge (Bolya & Hoffman, "Token Merging for Fast Stable
        Diffusion", CVPRW 2023), here for the MLP of a global-layout block): the most similar
        pairs of normalised tokens (bipartite matching, cosine) are averaged, the MLP runs
        once per pair, and both members add its output to their own residual. The MLP is a
        per-token function, so tokens whose inputs nearly agree get nearly the same output,
        while attention still sees every token and no token leaves the sequence.
        """
        if config.runs_unchanged(r, state.size):
            # Nothing merged so far and nothing to merge here: the unmodified block, bit for bit.
            return state._replace(x=self._tm_forward_unchanged_pos(state.x, state.pos, block_index))
        x = state.x
        log_size = size_bias(state.size) if config.prop_attn else None
        attn_out, attn = self._tm_attend_pos(
            self._tm_norm1(x), state.pos, log_size, config.attention_impl, block_index
        )
        state = state._replace(x=x + self._tm_after_attn(attn_out))
        if r > 0:
            state = reducer.reduce(state, attn, r, config.num_protected, block_index)
        pairs = shared_mlp_pairs(state.x.shape[1], config.num_protected, config.mlp_share)
        if pairs:
            return state._replace(x=state.x + self._tm_shared_mlp_branch(state, pairs, config.num_protected))
        return state._replace(x=state.x + self._tm_mlp_branch(state.x))

    def _tm_shared_mlp_branch(self, state: TokenState, pairs: int, num_protected: int) -> torch.Tensor:
        """The MLP branch's output for every token, computed for ``N - pairs`` of them."""
        plan = bipartite_soft_matching(self._tm_norm2(state.x), pairs, num_protected)
        merged, _ = merge_tokens(state.x, state.size, plan)
        return unmerge_tokens(self._tm_mlp_branch(merged), plan.assign)

    def forward_local(
        self, x: torch.Tensor, r: int, reducer: TokenReducer, config: MergeConfig, block_index: int,
        pos: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Local layout: ``[B, N, C]`` -> ``[B, N, C]``, both branches on ``N - r`` merged tokens.

        ``pos``: ``[B, N, K]`` token coordinates for RoPE blocks (merged with the tokens), or ``None``.
        """
        if r == 0:
            return self._tm_forward_unchanged_pos(x, pos, block_index)
        B, N, _ = x.shape
        protected = config.num_protected
        h = self._tm_norm1(x)
        decided = reducer.reduce(
            TokenState(h, None, initial_sources(B, N, protected, x.device)),
            self._tm_query_key_pos(h, pos, block_index),
            r,
            protected,
            block_index,
        )
        plan = plan_from_sources(decided.source, protected, decided.x.shape[1])
        merged, size = merge_tokens(h, None, plan, reducer.keep_norm)
        merged_pos = None if pos is None else merge_positions(pos, None, plan)
        log_size = size_bias(size) if reducer.tracks_size and config.prop_attn else None
        attn_out, _ = self._tm_attend_pos(merged, merged_pos, log_size, config.attention_impl, block_index)
        # Unmerging copies each merged output to all its tokens; discarded tokens get zeros,
        # i.e. they skip the branch and keep their residual.
        x = x + unmerge_tokens(self._tm_after_attn(attn_out), plan.assign)
        merged, _ = merge_tokens(self._tm_norm2(x), None, plan, reducer.keep_norm)
        return x + unmerge_tokens(self._tm_after_mlp(self._tm_mlp(merged)), plan.assign)


class MergingModelMixin:
    """Schedules of a patched model. Backend hooks: ``_tm_blocks`` (the merging blocks, in
    order) and ``_tm_default_tokens()`` (tokens entering the first block at the model's
    default input size)."""

    def tokenmerge_schedule(self, num_tokens: Optional[int] = None) -> tuple:
        """Tokens removed by each block for an input of ``num_tokens`` tokens (default size)."""
        if num_tokens is None:
            num_tokens = self._tm_default_tokens()
        if torch.jit.is_tracing():
            # The tracer hands sizes over as tensors; the schedule is fixed for the traced
            # size (what an ONNX export records), so resolve it from the plain int.
            num_tokens = int(num_tokens)
        cache = self._tokenmerge_schedules
        if num_tokens not in cache:
            cache[num_tokens] = resolve_block_schedule(
                self.tokenmerge_config, self.token_reducer, len(self._tm_blocks), num_tokens
            )
        return cache[num_tokens]

    def tokens_per_block(self, num_tokens: Optional[int] = None) -> list:
        """Tokens entering each block, then the count leaving the last one."""
        if num_tokens is None:
            num_tokens = self._tm_default_tokens()
        config, schedule = self.tokenmerge_config, self.tokenmerge_schedule(num_tokens)
        if self.token_reducer.per_image:
            # The caps as if every image used them, each clamped to what is left: the fewest
            # tokens an image can keep.
            schedule = resolve_schedule(list(schedule), len(schedule), num_tokens, config.num_protected,
                                        self.token_reducer.max_reduction, warn=False)
        return block_token_counts(config, schedule, num_tokens)


def resolve_block_schedule(config: MergeConfig, reducer: TokenReducer, num_blocks: int, num_tokens: int) -> tuple:
    """Per-block reductions for the configured layout."""
    resolve = resolve_local_schedule if config.layout == "local" else resolve_schedule
    def max_reduction(n, num_protected):
        # A per-image reducer's r is a cap that an image may or may not use, so it is bounded
        # by the tokens entering the model, not by the caps of the blocks before it; the
        # reducer clamps it to the tokens an image has left when it plans.
        return reducer.max_reduction(num_tokens if reducer.per_image else n, num_protected)

    return resolve(config.schedule, num_blocks, num_tokens, config.num_protected, max_reduction)


def block_token_counts(config: MergeConfig, schedule: tuple, num_tokens: int) -> list:
    """Tokens entering each block, then the count leaving the last one."""
    if config.layout == "local":
        return [num_tokens] * (len(schedule) + 1)
    return tokens_per_block(num_tokens, schedule)


def _call(function, checkpointed: bool, *args):
    if not checkpointed:
        return function(*args)
    # Non-reentrant: it takes the TokenState (with its optional None fields) and the reducer's
    # parameters as they are, and restores the RNG so dropout draws the same masks again.
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)


def run_blocks(blocks, x: torch.Tensor, reducer: TokenReducer, config: MergeConfig, schedule: tuple,
               collect_hidden: bool = False, checkpointed: bool = False, pos: Optional[torch.Tensor] = None):
    """Tokens ``[B, N, C]`` through every block -> ``(TokenState, hidden states or None)``.

    ``hidden`` holds the input of the first block, then each block's output. ``checkpointed``
    recomputes each block in backward instead of storing its activations (the model's
    gradient checkpointing, e.g. timm's ``set_grad_checkpointing()``). ``pos``: ``[B, N, K]``
    token coordinates of a RoPE model (see :class:`TokenState`), or ``None``.
    """
    B, N, _ = x.shape
    source = initial_sources(B, N, config.num_protected, x.device) if config.trace_source else None
    state = TokenState(x, None, source, pos)
    hidden = [x] if collect_hidden else None
    for i, block in enumerate(blocks):
        if config.layout == "local":
            state = state._replace(
                x=_call(block.forward_local, checkpointed, state.x, schedule[i], reducer, config, i, state.pos)
            )
        else:
            state = _call(block.forward_tokens, checkpointed, state, schedule[i], reducer, config, i)
        if collect_hidden:
            hidden.append(state.x)
    return state, (tuple(hidden) if collect_hidden else None)


_PATCHED_CLASSES: dict = {}


def patched_class(base: type, mixin: type, module_name: str, keep_name: bool = False) -> type:
    """A cached ``TokenMerge<Base>`` subclass of ``base`` with ``mixin`` first.

    The class is registered under its qualified name in ``module_name`` (a suffix derived from
    ``base`` and ``mixin`` tells apart bases of the same name, whatever the order they were
    patched in). Its instances pickle as the recipe ``(base, mixin)``, so a process that has
    patched nothing yet can load them. ``keep_name`` keeps ``__name__`` equal to the base's
    (Hugging Face records ``config.architectures`` from it).
    """
    key = (base, mixin)
    if key not in _PATCHED_CLASSES:
        module = importlib.import_module(module_name)
        qualname = f"TokenMerge{base.__name__}"
        if hasattr(module, qualname):
            pair = f"{base.__module__}.{base.__qualname__}+{mixin.__module__}.{mixin.__qualname__}"
            qualname = f"{qualname}_{hashlib.sha1(pair.encode()).hexdigest()[:8]}"
        namespace = {
            "_tokenmerge_base": base,
            "_tokenmerge_mixin": mixin,
            "_tokenmerge_keep_name": keep_name,
            "__module__": module_name,
            "__reduce_ex__": _reduce_patched,
        }
        cls = type(qualname, (mixin, base), namespace)
        cls.__qualname__ = qualname
        cls.__name__ = base.__name__ if keep_name else qualname
        setattr(module, qualname, cls)
        _PATCHED_CLASSES[key] = cls
    return _PATCHED_CLASSES[key]


def _importable(cls: type) -> bool:
    module = sys.modules.get(cls.__module__)
    return module is not None and getattr(module, cls.__qualname__, None) is cls


def _reduce_patched(self, protocol):
    # The generated class exists only in a process that patched a model, so pickling it by name
    # fails to load anywhere else; pickle how to make it instead. A mixin made at run time (not
    # importable by name) cannot be pickled, nor can a subclass be rebuilt from the recipe: those
    # pickle by name as before, loadable where the class exists.
    cls = type(self)
    base, mixin = cls._tokenmerge_base, cls._tokenmerge_mixin
    if _PATCHED_CLASSES.get((base, mixin)) is not cls or not _importable(mixin):
        return object.__reduce_ex__(self, protocol)
    _, _, *rest = object.__reduce_ex__(self, max(protocol, 2))  # copyreg.__newobj__, (cls,), state, ...
    return (_new_patched, (base, mixin, cls.__module__, cls._tokenmerge_keep_name), *rest)


def _new_patched(base: type, mixin: type, module_name: str, keep_name: bool):
    """Unpickling: an empty instance of the patched class, made in this process if need be."""
    cls = patched_class(base, mixin, module_name, keep_name)
    return cls.__new__(cls)


def attach_policy(owner, reducer: TokenReducer, config: MergeConfig):
    """Give a patched model (the module whose class got :class:`MergingModelMixin`) its policy
    and config, and resolve its schedule once for the default input size (validates, warns)."""
    owner.token_reducer = reducer
    owner.tokenmerge_config = config
    owner._tokenmerge_schedules = {}
    owner.tokenmerge_schedule()
    return owner


def refuse_unweighted_pool(owner) -> None:
    """Raise when the head of ``owner`` (a timm ``VisionTransformer`` or ``Eva``) is asked to
    pool tokens without their sizes, and its pool needs them.

    Decided from the patch, not from the token count, which can equal the default count by
    coincidence (an image that kept every token; a ``dynamic_img_size`` input that merges down
    to it). Only a method that tracks sizes makes tokens of unequal weight, or empty slots;
    after pruning (``prune``, ``drop``) every kept token still stands for one patch, and the
    local layout keeps every token in its place, so their plain pools are right.
    """
    reducer, config = owner.token_reducer, owner.tokenmerge_config
    if config.layout != "global" or not reducer.tracks_size or not any(owner.tokenmerge_schedule()):
        return
    pool = owner.global_pool
    if getattr(owner, "attn_pool", None) is not None or pool in ("avg", "avgmax"):
        problem = "which weighs tokens by their sizes, and its tokens are merged: unweighted pooling would be wrong"
    elif pool == "max" and reducer.per_image:
        problem = ("and its images keep different numbers of tokens (a per-image threshold), so the "
                   "features hold empty slots (size 0) that the max would take in")
    else:
        return
    raise ValueError(
        f"this model pools with global_pool={pool!r}, {problem}. Call model(x), or pass "
        "token_sizes=model.forward_tokens(x).size to forward_head"
    )


class SizeAwareHeadMixin:
    """``forward_head`` of a patched timm model (ViT, Eva): it takes the tokens' sizes and
    runs the model's ``_tm_head(x, token_sizes, pre_logits)``; without sizes, it refuses
    where the pool needs them (:func:`refuse_unweighted_pool`). ``_tm_head`` reaches timm's
    own head as ``self._tokenmerge_base.forward_head``: ``super()`` would come back here."""

    def forward_head(self, x, pre_logits: bool = False, token_sizes: Optional[torch.Tensor] = None):
        if token_sizes is None:
            refuse_unweighted_pool(self)
        return self._tm_head(x, token_sizes, pre_logits)


def without_empty_slots(tokens: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """``tokens [B, N, C]`` with the empty slots (``sizes [B, N, 1]`` of 0) of images that kept
    fewer tokens set to -inf, so that a max over tokens passes them over."""
    return tokens.masked_fill(sizes == 0, float("-inf"))


def restore_classes(owner, block_attributes: tuple = ()):
    """Undo a class-swapping patch in place: the owner's and its blocks' (``_tm_blocks``)
    original classes, without the attributes patching added (``block_attributes``: extra
    per-block ones)."""
    base = getattr(type(owner), "_tokenmerge_base", None)
    if base is None:
        return owner
    for block in list(owner._tm_blocks):
        block_base = getattr(type(block), "_tokenmerge_base", None)
        if block_base is not None:
            block.__class__ = block_base
        for name in block_attributes:
            block.__dict__.pop(name, None)
    owner.__class__ = base
    del owner.token_reducer
    del owner.tokenmerge_config
    del owner._tokenmerge_schedules
    return owner
