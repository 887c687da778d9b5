"""Models by name: adding one is a module plus a line in MODELS."""
from __future__ import annotations

from typing import Any, Callable

MODELS: dict[str, Callable[..., Any]] = {}


def register(name: str):
    def deco(factory):
        MODELS[name] = factory
        return factory
    return deco


def build_model(name: str, **params: Any):
    from . import ranking  # noqa: F401  (registers itself)

    if name not in MODELS:
        raise ValueError(f"model.name={name!r} is not a known model; known: {', '.join(sorted(MODELS))}")
    return MODELS[name](**params)
