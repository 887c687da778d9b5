"""Models by name: adding one is a module plus a line in MODELS.

Every model takes a dict batch (``user_idx``, ``item_idx``, and what it asks
for in ``inputs``, e.g. ``history_idx``) and returns one logit per row; its
``score_all(user_idx, item_idx, history_idx=None)`` scores users × items.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

MODELS: dict[str, Callable[..., Any]] = {}
MODULES = ("ranking", "sequential", "repeat_explore")  # each registers itself on import


def register(name: str):
    def deco(factory):
        MODELS[name] = factory
        return factory
    return deco


def _load_all() -> None:
    for m in MODULES:
        importlib.import_module(f"{__name__}.{m}")


def model_names() -> tuple[str, ...]:
    return MODULES


def build_model(name: str, **params: Any):
    _load_all()
    if name not in MODELS:
        raise ValueError(f"model.name={name!r} is not a known model; known: {', '.join(sorted(MODELS))}")
    import inspect

    known = inspect.signature(MODELS[name]).parameters
    unknown = sorted(set(params) - set(known))
    if unknown:  # a misspelled or another model's parameter is an error, never silently dropped
        raise ValueError(f"model {name!r} has no parameter(s) {', '.join(map(repr, unknown))}; "
                         f"its parameters: {', '.join(known)}")
    return MODELS[name](**params)
