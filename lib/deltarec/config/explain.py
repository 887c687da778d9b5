"""``deltarec config --explain KEY`` and ``--get KEY``: a key's description,
what it allows, its default and its value, read from the schema itself."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel

from .base import UnknownKey, allowed, choices, walk
from .schema import Config


@dataclass(frozen=True)
class KeyDoc:
    """What the schema says about one key; ``keys`` lists a section's own keys."""

    key: str
    description: str
    allowed: str
    default: Any
    choices: tuple[Any, ...] = ()
    keys: tuple["KeyDoc", ...] = ()

    @property
    def is_section(self) -> bool:
        return bool(self.keys)


def explain(key: str = "") -> KeyDoc:
    """The documentation of ``key`` (a dotted key or section; "" = the top level)."""
    try:
        path = walk(Config, key.split(".") if key else [])
    except UnknownKey as u:
        raise u.error(key) from None
    info = path.info
    if path.name is not None:  # a name inside a mapping (spark.conf.spark.sql.x)
        return KeyDoc(key, info.description or "", allowed(path), None)
    section = path.section
    description = info.description if info else (Config.__doc__ or "")
    if section is not None and section.__doc__ and section.__doc__.strip() not in description:
        description = f"{description}\n{section.__doc__.strip()}" if info and description else section.__doc__.strip()
    default = info.get_default(call_default_factory=True) if info else Config()
    keys = ()
    if section is not None:
        keys = tuple(explain(f"{key}.{name}" if key else name) for name in section.model_fields)
    return KeyDoc(key, " ".join(description.split()), allowed(path), _plain(default),
                  choices(path.owner, path.field) if path.field else (), keys)


def _plain(value: Any) -> Any:
    return value.model_dump() if isinstance(value, BaseModel) else value


def scalar_text(value: Any) -> str:
    """A value as one line of YAML: ``true``, ``null``, ``local[2]``, ``[64, 32]``."""
    text = yaml.safe_dump(_plain(value), default_flow_style=True, width=10**6).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def value_text(value: Any, as_json: bool = False) -> str:
    """``--get`` output: JSON with ``as_json``; else a scalar plain (text as is)
    and a section, list or mapping as YAML."""
    value = _plain(value)
    if as_json:
        return json.dumps(value, indent=2 if isinstance(value, (dict, list)) else None, sort_keys=False)
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list)):
        return yaml.safe_dump(value, sort_keys=False, default_flow_style=None, width=10**6).rstrip("\n")
    return scalar_text(value)


def _current(cfg: Config, key: str) -> Any:
    return cfg if not key else cfg.get(key)


def explain_text(key: str, cfg: Config) -> str:
    """``--explain``: for a key, its description, what it allows, its default
    and its current value with where that came from; for a section, its
    description and each key's line."""
    doc = explain(key)
    if not doc.is_section:
        return "\n".join([
            f"{doc.key}: {doc.description}",
            f"  allowed: {doc.allowed}",
            f"  default: {scalar_text(doc.default)}",
            f"  current: {scalar_text(cfg.get(doc.key))}  ({cfg.origin(doc.key)})",
        ])
    lines = [f"{doc.key or 'deltarec config'}: {doc.description}"]
    unset = _current(cfg, doc.key) is None  # an optional section left null (source.columns)
    if unset:
        lines.append(f"  current: null  ({cfg.origin(doc.key)}); the keys it takes when set:")
    for k in doc.keys:
        if k.is_section:
            lines.append(f"  {k.key}: section, see `deltarec config --explain {k.key}`")
            continue
        current = k.default if unset else cfg.get(k.key)
        note = "" if current == k.default else f"  (default {scalar_text(k.default)}; {cfg.origin(k.key)})"
        lines.append(f"  {k.key} = {scalar_text(current)}{note}   [{k.allowed}]")
        lines.append(f"      {k.description}")
    return "\n".join(lines)
