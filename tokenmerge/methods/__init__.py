"""One module per method: each is a policy that plans merges, with no knowledge of models."""

from .base import AttentionTensors, TokenReducer, TokenState
from .registry import create_reducer, get_method_class, list_methods, register_method

# Importing a method module registers it.
from . import atc, baselines, drop, dtem, mctf, pitome, tcvit, tome  # noqa: E402,F401

__all__ = [
    "AttentionTensors",
    "TokenReducer",
    "TokenState",
    "create_reducer",
    "get_method_class",
    "list_methods",
    "register_method",
]
