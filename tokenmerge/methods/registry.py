"""Method registry: ``create_reducer("tome")``, ``list_methods()``."""

from __future__ import annotations

__all__ = ["register_method", "create_reducer", "list_methods", "get_method_class"]

_METHODS: dict = {}


def register_method(cls):
    """Class decorator: make a :class:`~tokenmerge.methods.base.TokenReducer` available by name."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty `name`")
    _METHODS[cls.name] = cls
    return cls


def list_methods() -> list:
    """Names accepted by ``tokenmerge.patch(model, method=...)``."""
    return sorted(_METHODS)


def get_method_class(name: str):
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(
            f"unknown method {name!r}; available: {', '.join(list_methods())}"
        ) from None


def create_reducer(name: str, **options):
    """Instantiate a method's policy with its options (e.g. ``create_reducer("tcvit", order=2)``)."""
    cls = get_method_class(name)
    try:
        return cls(**options)
    except TypeError as err:
        raise TypeError(f"bad options for method {name!r}: {err}") from None
