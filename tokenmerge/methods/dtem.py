"""DTEM: learned decoupled merge embeddings (Lee & Hong, NeurIPS 2024).

Per block, a small module ``e = f(x)`` whose only job is to be the merge metric.

- Input features: the block's tokens *after the attention residual* (the tokens that are
  about to be merged; the backend hands them to the reducer), detached, so the merge
  embedding never reshapes the ViT's own features (as in the paper, which detaches the
  embedding's input), then a LayerNorm.
- Map: affine ``C -> embed_dim`` (default 64), or an MLP with ``hidden_dim``.
- Initialisation (``init="keys"``, the default when it fits): the LayerNorm copies the
  block's ``norm1`` and the affine map copies the block's key projection averaged over
  heads, i.e. training starts from ToMe's own metric (keys averaged over heads), computed
  on the post-attention tokens. This needs ``embed_dim == head_dim`` and no MLP;
  ``init="random"`` is PyTorch's default initialisation.

Eval mode: ToMe's hard bipartite matching with ``e`` as the metric (or, with
``matching="agglomerative"``, ATC's clustering on ``e``), then the usual size-weighted
merge. Train mode: soft grouping + soft merging
(:mod:`tokenmerge.core.soft_merge`): the token count stays ``N``, sizes become
fractional and feed proportional attention.

The modules live in the patched module's ``token_reducer`` (state_dict keys
``token_reducer.embeds.*`` in a timm ViT, ``vit.token_reducer.embeds.*`` in a Hugging Face
``ViTForImageClassification``, whose trunk is patched) and are saved/loaded on their own with :func:`save_merge_modules` /
:func:`load_merge_modules` (a safetensors file with the architecture in its metadata).
One module set serves every ``r`` up to the one it was trained with.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from torch import nn

from ..core.clustering import agglomerative_max_reduction, agglomerative_plan
from ..core.matching import bipartite_max_reduction, bipartite_soft_matching
from ..core.merge import MergePlan
from ..core.soft_merge import _check_tau, soft_bipartite_step
from .atc import DEFAULT_TAU_SIZE, check_clustering_options
from .base import AttentionTensors, SizeAwareReducer, TokenState
from .registry import register_method

MATCHINGS = ("bipartite", "agglomerative")

__all__ = ["DTEM", "MergeEmbedding", "SoftTokenState", "save_merge_modules", "load_merge_modules"]

FILE_FORMAT = "tokenmerge-dtem-modules"
FILE_VERSION = "1"


class SoftTokenState(NamedTuple):
    """A :class:`~tokenmerge.methods.base.TokenState` during soft (training) merging.

    Same fields, plus ``live``: the tokens at the front that still take part in grouping
    (the rest were merged away in earlier blocks and only fade in attention).
    """

    x: torch.Tensor
    size: Optional[torch.Tensor] = None
    source: Optional[torch.Tensor] = None
    pos: Optional[torch.Tensor] = None
    live: Optional[int] = None


class MergeEmbedding(nn.Module):
    """``[B, N, C]`` tokens -> ``[B, N, embed_dim]`` merge embedding (LayerNorm, then affine or MLP)."""

    def __init__(self, dim: int, embed_dim: int = 64, hidden_dim: Optional[int] = None):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        if hidden_dim:
            self.proj = nn.Sequential(nn.Linear(dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, embed_dim))
        else:
            self.proj = nn.Linear(dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x))

    @torch.no_grad()
    def init_from_keys(self, block: nn.Module) -> None:
        """Start from the block's ToMe metric: its pre-attention norm, then keys averaged over heads.

        ``block`` exposes the backend hooks ``_tm_norm1_module`` and ``_tm_key_projection()``.
        """
        weight, bias, heads, head_dim = block._tm_key_projection()
        dim = weight.shape[1]
        self.proj.weight.copy_(weight.reshape(heads, head_dim, dim).mean(dim=0))
        if bias is not None:
            self.proj.bias.copy_(bias.reshape(heads, head_dim).mean(dim=0))
        else:
            self.proj.bias.zero_()
        norm1 = block._tm_norm1_module
        if getattr(norm1, "weight", None) is not None:
            self.norm.weight.copy_(norm1.weight)
        if getattr(norm1, "bias", None) is not None:
            self.norm.bias.copy_(norm1.bias)
        self.norm.eps = getattr(norm1, "eps", self.norm.eps)


@register_method
class DTEM(SizeAwareReducer):
    """Decoupled Token Embedding for Merging.

    Args:
        embed_dim: merge-embedding width (paper: 64 is enough).
        hidden_dim: if set, a 2-layer MLP with this hidden width instead of an affine map.
        tau: soft-grouping temperature in training (``> 0``; the paper used 0.1-0.3).
        train_r: if set, every merging block uses this ``r`` in training mode (clamped to
            what its live tokens allow) instead of the patched schedule's ``r``; eval mode
            always follows the schedule. Train with the largest ``r`` you will use.
        init: ``"keys"`` (start from ToMe's metric, see the module docstring), ``"random"``,
            or ``"auto"`` (``"keys"`` when ``embed_dim`` equals the head width and there is
            no MLP).
        dim, depth: model width and block count. Normally left out:
            :func:`tokenmerge.patch` binds the reducer to the model (:meth:`bind_blocks`).
        modules: a merge-module file (:func:`save_merge_modules`) loaded when the reducer is
            bound to a model, so ``tokenmerge.patch(model, method="dtem", r=16,
            modules="dtem.safetensors")`` (or a ``best.json`` from ``tokenmerge tune``) gives
            the trained DTEM in one call. ``embed_dim`` and ``hidden_dim`` come from the file.
        matching: how eval mode merges on the learned embedding: ``"bipartite"`` (default,
            the paper's ToMe matching) or ``"agglomerative"`` (ATC's clustering,
            :mod:`tokenmerge.core.clustering`, which can join any number of alike tokens and
            remove more than half of a block's tokens). Training always uses the soft
            bipartite relaxation, so the same module file serves both.
        linkage, tau_size: ATC's options for ``matching="agglomerative"``; left out, ATC's
            defaults (``"complete"``, ``40.0``; see :class:`~tokenmerge.methods.atc.ATC`).
            They are refused with bipartite matching, which has no use for them.
    """

    name = "dtem"

    def __init__(
        self,
        embed_dim: Optional[int] = None,
        hidden_dim: Optional[int] = None,
        tau: float = 0.1,
        train_r: Optional[int] = None,
        init: str = "auto",
        dim: Optional[int] = None,
        depth: Optional[int] = None,
        modules: Optional[str] = None,
        matching: str = "bipartite",
        linkage: Optional[str] = None,
        tau_size: Optional[float] = DEFAULT_TAU_SIZE,
    ):
        super().__init__()
        if matching not in MATCHINGS:
            raise ValueError(f"matching must be one of {MATCHINGS}, got {matching!r}")
        if matching == "bipartite" and (linkage is not None or tau_size != DEFAULT_TAU_SIZE):
            raise ValueError(
                "linkage and tau_size are options of matching='agglomerative'; bipartite matching "
                "has no use for them: add matching='agglomerative' or leave them out"
            )
        self.matching = matching
        self.linkage, self.tau_size = check_clustering_options("complete" if linkage is None else linkage, tau_size)
        self.module_file = None if modules is None else str(modules)
        if modules is not None:
            embed_dim, hidden_dim = _shape_from_file(modules, embed_dim, hidden_dim)
        embed_dim = 64 if embed_dim is None else embed_dim
        if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim <= 0:
            raise ValueError(f"embed_dim must be a positive int, got {embed_dim!r}")
        if hidden_dim is not None and (not isinstance(hidden_dim, int) or hidden_dim <= 0):
            raise ValueError(f"hidden_dim must be a positive int or None, got {hidden_dim!r}")
        if train_r is not None and (not isinstance(train_r, int) or train_r < 0):
            raise ValueError(f"train_r must be a non-negative int or None, got {train_r!r}")
        if init not in ("auto", "keys", "random"):
            raise ValueError(f"init must be 'auto', 'keys' or 'random', got {init!r}")
        self.embed_dim = embed_dim
        self.hidden_dim = hidden_dim
        self.tau = _check_tau(tau)
        self.train_r = train_r
        self.init = init
        self.architecture = ""
        self.embeds = nn.ModuleList()
        if (dim is None) != (depth is None):
            raise ValueError("give both dim= and depth= (or neither, and let patch() bind the model)")
        if dim is not None:
            self._build(dim, depth)
            if self.module_file is not None:
                load_merge_modules(self, self.module_file)

    # -- construction ---------------------------------------------------------------
    @property
    def dim(self) -> Optional[int]:
        return self.embeds[0].norm.normalized_shape[0] if len(self.embeds) else None

    @property
    def depth(self) -> int:
        return len(self.embeds)

    def _build(self, dim: int, depth: int) -> None:
        self.embeds = nn.ModuleList(MergeEmbedding(dim, self.embed_dim, self.hidden_dim) for _ in range(depth))

    def bind_blocks(self, blocks, architecture: str = "") -> None:
        """Build one embedding module per block (called by :func:`tokenmerge.patch`).

        ``blocks`` are a patched model's blocks; they expose ``_tm_key_projection()`` and
        ``_tm_norm1_module`` whatever the backend. A reducer that already has modules
        (trained, loaded, or built with ``dim``/``depth``) keeps them if they fit the model
        and raises otherwise; one created with ``modules=FILE`` loads the file's (once: a
        reducer trained further keeps its weights when it patches another model).
        """
        weight, _, _, head_dim = blocks[0]._tm_key_projection()
        width, depth = int(weight.shape[1]), len(blocks)
        if len(self.embeds):
            if (self.dim, self.depth) != (width, depth):
                raise ValueError(
                    f"this DTEM reducer has modules for width {self.dim} and depth {self.depth}; "
                    f"the model has width {width} and depth {depth}"
                )
            self.architecture = self.architecture or architecture
            return
        self.architecture = architecture
        self._build(width, depth)
        if self.module_file is not None:
            load_merge_modules(self, self.module_file)  # refuses a file for another width or depth
            self.to(device=weight.device)
            return
        keys_fit = self.hidden_dim is None and head_dim == self.embed_dim
        if self.init == "keys" and not keys_fit:
            raise ValueError(
                f"init='keys' needs embed_dim == the head width ({head_dim}) and no MLP; "
                f"got embed_dim={self.embed_dim}, hidden_dim={self.hidden_dim}"
            )
        if self.init == "keys" or (self.init == "auto" and keys_fit):
            for embed, block in zip(self.embeds, blocks):
                embed.init_from_keys(block)
        self.to(device=weight.device)

    def _embedding(self, x: torch.Tensor, block_index: int) -> torch.Tensor:
        if not len(self.embeds):
            raise RuntimeError(
                "DTEM has no embedding modules: patch a model with tokenmerge.patch(model, "
                "method='dtem', ...) or construct it with dim= and depth="
            )
        if block_index >= len(self.embeds):
            raise ValueError(f"block {block_index} has no DTEM module (the reducer has {len(self.embeds)})")
        embed = self.embeds[block_index]
        return embed(x.detach().to(embed.norm.weight.dtype))

    # -- the policy -----------------------------------------------------------------
    def max_reduction(self, num_tokens: int, num_protected: int) -> int:
        if self.matching == "agglomerative":
            return agglomerative_max_reduction(num_tokens, num_protected)
        return bipartite_max_reduction(num_tokens, num_protected)

    def plan_sized(self, x, attn: AttentionTensors, size, r, num_protected, block_index) -> MergePlan:
        metric = self._embedding(x, block_index)
        if self.matching == "agglomerative":
            return agglomerative_plan(metric, r, num_protected, self.linkage, size, self.tau_size)
        return bipartite_soft_matching(metric, r, num_protected)

    def reduce(self, state: TokenState, attn: AttentionTensors, r: int, num_protected: int,
               block_index: int):
        if not self.training:
            return super().reduce(state, attn, r, num_protected, block_index)
        if self.keep_norm:
            raise ValueError(
                "keep_norm applies to hard merges; DTEM's soft (training) merge has no "
                "norm-keeping form: train with keep_norm=False, then patch the trained modules "
                "with keep_norm=True for evaluation"
            )
        if state.source is not None:
            raise ValueError(
                "DTEM's soft (training) merge keeps every token with a fractional size; source "
                "tracking needs hard merges: call model.eval() or patch with trace_source=False"
            )
        live = getattr(state, "live", None)
        live = state.x.shape[1] if live is None else live
        limit = bipartite_max_reduction(live, num_protected)
        if self.train_r is not None:
            r = min(self.train_r, limit)
        elif r > limit:
            raise ValueError(
                f"DTEM trains through the soft bipartite merge, which removes at most {limit} of "
                f"{live} live tokens in a block, and the schedule asks for r={r} (fine with "
                f"matching='agglomerative' in eval mode): train with train_r={limit} (CLI: --method-option "
                f"train_r={limit}) or a smaller r"
            )
        metric = self._embedding(state.x, block_index)
        x, pos = state.x, state.pos
        if pos is not None:
            # Positions (RoPE models) ride along as extra channels, so the soft merge averages
            # them with the tokens' own weights and re-orders them with the tokens; in float32,
            # since a low-precision coordinate would be off by a fraction of a patch.
            x = torch.cat([x.float(), pos], dim=-1)
        x, size, live = soft_bipartite_step(x, state.size, metric, r, self.tau, num_protected, live)
        if pos is not None:
            x, pos = x[..., :-pos.shape[-1]].to(state.x.dtype), x[..., -pos.shape[-1]:]
        return SoftTokenState(x, size, None, pos, live)

    def extra_repr(self) -> str:
        mlp = f", hidden_dim={self.hidden_dim}" if self.hidden_dim else ""
        matching = ""
        if self.matching == "agglomerative":
            matching = f", matching='agglomerative', linkage={self.linkage!r}, tau_size={self.tau_size}"
        return f"method='dtem', embed_dim={self.embed_dim}{mlp}, tau={self.tau}, depth={self.depth}{matching}"

    # -- files ----------------------------------------------------------------------
    def metadata(self) -> dict:
        return {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "method": self.name,
            "architecture": self.architecture,
            "width": str(self.dim),
            "depth": str(self.depth),
            "embed_dim": str(self.embed_dim),
            "hidden_dim": "" if self.hidden_dim is None else str(self.hidden_dim),
            "tau": repr(self.tau),
        }


def _shape_from_file(path, embed_dim, hidden_dim) -> tuple:
    """``(embed_dim, hidden_dim)`` of a merge-module file; explicit values must agree with it."""
    meta = read_merge_module_metadata(path)
    file_embed = int(meta["embed_dim"])
    file_hidden = int(meta["hidden_dim"]) if meta.get("hidden_dim") else None
    for name, given, saved in (("embed_dim", embed_dim, file_embed), ("hidden_dim", hidden_dim, file_hidden)):
        if given is not None and given != saved:
            raise ValueError(
                f"{name}={given} disagrees with the module file {str(path)!r} ({name}={saved}); "
                f"leave {name} out: it is read from the file"
            )
    return file_embed, file_hidden


def _dtem_of(model: nn.Module) -> DTEM:
    if isinstance(model, DTEM):
        return model
    reducer = getattr(model, "token_reducer", None)
    if reducer is None:
        # A Hugging Face wrapper (ViTForImageClassification...) keeps the policy on its trunk.
        from ..backends.adapter import adapter_for

        try:
            adapter = adapter_for(model)
        except TypeError:
            adapter = None
        if adapter is not None and adapter.is_patched:
            reducer = adapter.reducer
    if not isinstance(reducer, DTEM):
        raise ValueError(
            "the model is not patched with DTEM: call tokenmerge.patch(model, method='dtem', r=...) first"
        )
    return reducer


def save_merge_modules(model: nn.Module, path) -> Path:
    """Save a DTEM-patched model's merge embeddings as a small safetensors file.

    The metadata records the architecture name, width, depth and embedding shape, so that
    :func:`load_merge_modules` can refuse a file trained for another model. Non-finite
    weights (a diverged training run) are refused; the file is written atomically.
    """
    from ..io import save_safetensors

    reducer = _dtem_of(model)
    if not len(reducer.embeds):
        raise ValueError("the DTEM reducer has no modules to save")
    path = Path(path)
    state = {k: v.detach().float().cpu().contiguous() for k, v in reducer.state_dict().items()}
    save_safetensors(state, path, metadata=reducer.metadata(), what="DTEM merge modules")
    return path


def read_merge_module_metadata(path) -> dict:
    """The metadata of a merge-module file (raises if it is not one)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"merge-module file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise ValueError(
            f"merge-module file {str(path)!r} cannot be read: it is corrupt, truncated or not a "
            f"safetensors file ({err}); save the modules again with tokenmerge.save_merge_modules"
        ) from None
    if meta.get("format") != FILE_FORMAT:
        raise ValueError(f"{str(path)!r} is not a tokenmerge DTEM module file (no {FILE_FORMAT!r} metadata)")
    _check_metadata(meta, path)
    return meta


def _check_metadata(meta: dict, path: Path) -> None:
    """The shape fields every loader reads with ``int()``: refuse a damaged or hand-edited file."""
    for key in ("width", "depth", "embed_dim"):
        if not str(meta.get(key, "")).isdigit() or int(meta[key]) <= 0:
            raise ValueError(f"{str(path)!r} has a bad {key!r} in its metadata ({meta.get(key)!r}); save the modules again")
    hidden = meta.get("hidden_dim", "")
    if hidden and (not hidden.isdigit() or int(hidden) <= 0):
        raise ValueError(f"{str(path)!r} has a bad 'hidden_dim' in its metadata ({hidden!r}); save the modules again")


def load_merge_modules(model: nn.Module, path) -> nn.Module:
    """Load merge embeddings saved by :func:`save_merge_modules` into a DTEM-patched model.

    Raises ``ValueError`` when the file was trained for another width, depth or embedding
    shape; warns when only the architecture name differs. Returns the model.
    """
    from ..io import check_finite, load_safetensors

    reducer = _dtem_of(model)
    meta = read_merge_module_metadata(path)
    info = {"architecture": reducer.architecture, "width": reducer.dim, "depth": reducer.depth}
    width, depth = int(meta["width"]), int(meta["depth"])
    arch = meta.get("architecture", "")
    trained_for = f"{arch or 'a ViT'} (width {width}, depth {depth})"
    if width != info["width"]:
        raise ValueError(
            f"{path} was trained for {trained_for}; this model has width {info['width']}"
        )
    if depth != info["depth"]:
        raise ValueError(
            f"{path} was trained for {trained_for}; this model has {info['depth']} blocks"
        )
    hidden = int(meta["hidden_dim"]) if meta.get("hidden_dim") else None
    if (int(meta["embed_dim"]), hidden) != (reducer.embed_dim, reducer.hidden_dim):
        raise ValueError(
            f"{path} holds modules with embed_dim={meta['embed_dim']}, hidden_dim={hidden}; the model "
            f"was patched with embed_dim={reducer.embed_dim}, hidden_dim={reducer.hidden_dim}: patch with "
            f"method='dtem', embed_dim={meta['embed_dim']}" + (f", hidden_dim={hidden}" if hidden else "")
        )
    if arch and info["architecture"] and arch != info["architecture"]:
        warnings.warn(
            f"{path} was trained on {arch}; loading it into {info['architecture']} of the same shape",
            stacklevel=2,
        )
    state = load_safetensors(path, "merge-module file", fix="save the modules again with tokenmerge.save_merge_modules")
    check_finite(state, f"refusing to load {str(path)!r}")
    if not len(reducer.embeds):
        reducer._build(width, depth)
    _check_fits(state, reducer.state_dict(), path)
    device = next(reducer.parameters()).device
    reducer.load_state_dict({k: v.to(device) for k, v in state.items()})
    reducer.architecture = arch or reducer.architecture
    return model


def _check_fits(saved: dict, expected: dict, path) -> None:
    """Names and shapes checked before loading, so a bad file changes no weight."""
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    wrong = [k for k in expected if k in saved and saved[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{str(path)!r} does not hold the modules its metadata describes (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, wrong shape {wrong[:3]}); save the modules again"
        )


def describe_file(path) -> str:
    """A one-line human description of a merge-module file."""
    meta = read_merge_module_metadata(path)
    return json.dumps({k: meta[k] for k in ("architecture", "width", "depth", "embed_dim", "hidden_dim")})
