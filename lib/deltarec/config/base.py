"""What every config section shares: :class:`ConfigError`, the :class:`Section`
base class (pydantic, strict, unknown keys refused), the key walk that dotted
keys, ``--set``, ``--explain`` and error messages have in common, and the words
that say what a key allows.

A section is a pydantic model whose fields are its keys; a field that is
itself a :class:`Section` (or ``Section | None``) is a subsection; a
``dict[str, ...]`` field takes free-form names (``spark.conf``).
"""
from __future__ import annotations

import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

import annotated_types as at
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError


class ConfigError(ValueError):
    """A config file, env var or override that does not fit the schema."""


class Section(BaseModel):
    """Base of every config section. Types are strict (YAML already typed the
    values: ``1.5`` for an integer or ``yes`` in quotes for a boolean is an
    error, not a guess; only a number written as text, ``1e-3``, is read as
    the number), NaN/inf are refused, and assignments are validated too."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, validate_assignment=True,
                              validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _numbers_written_as_text(cls, data: Any) -> Any:
        # YAML 1.1 (PyYAML) reads `1e-3` as a string: for a number key, take it as the number it spells.
        if isinstance(data, dict):
            for name, f in cls.model_fields.items():
                v = data.get(name)
                if isinstance(v, str) and unwrap(f.annotation)[0] is float:
                    try:
                        data = {**data, name: float(v)}
                    except ValueError:
                        pass  # stays text: the type check says what is wrong with it
        return data

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as e:
            raise ConfigError(f"{type(self).__name__}: {describe_errors(e, type(self))}") from None

    def replace(self, **changes: Any):
        """A validated copy with ``changes`` (key=value, values as a YAML file
        would give them, or section objects); like ``dataclasses.replace``."""
        try:
            return type(self).model_validate({**dict(self), **changes})
        except ValidationError as e:
            raise ConfigError(f"{type(self).__name__}: {describe_errors(e, type(self))}") from None


def invalid(key: str, value: Any, why: str) -> PydanticCustomError:
    """The error a section's cross-key check raises: ``key`` is the field of
    that section the message is about (the loader prefixes the section's path)."""
    return PydanticCustomError("config_invalid", "{why}", {"key": key, "value": value, "why": why})


# ---------------------------------------------------------------- the schema walk
def unwrap(annotation: Any) -> tuple[Any, bool]:
    """(annotation without Optional / Annotated, whether None is allowed)."""
    optional = False
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            optional = optional or len(args) < len(typing.get_args(annotation))
            if len(args) != 1:
                return annotation, optional
            annotation = args[0]
        else:
            return annotation, optional


def section_of(annotation: Any) -> type[Section] | None:
    base, _ = unwrap(annotation)
    return base if isinstance(base, type) and issubclass(base, Section) else None


def is_mapping(annotation: Any) -> bool:
    return typing.get_origin(unwrap(annotation)[0]) is dict


@dataclass(frozen=True)
class KeyPath:
    """Where a dotted key lands in the schema. ``field`` is None for the top
    level; ``name`` is set when the key goes on into a mapping (``spark.conf.x.y``:
    field ``conf`` of SparkConfig, name ``x.y``)."""

    parts: tuple[str, ...]
    owner: type[Section]
    field: str | None = None
    name: str | None = None

    @property
    def info(self) -> FieldInfo | None:
        return self.owner.model_fields[self.field] if self.field else None

    @property
    def key(self) -> str:
        return ".".join(self.parts)

    @property
    def section(self) -> type[Section] | None:
        """The section this key names (None for a plain value)."""
        if self.field is None:
            return self.owner
        return None if self.name is not None else section_of(self.info.annotation)

    @property
    def value_annotation(self) -> Any:
        """The type a value for this key must have."""
        if self.name is not None:
            return typing.get_args(unwrap(self.info.annotation)[0])[1]
        return self.info.annotation if self.info else self.owner


class UnknownKey(LookupError):
    def __init__(self, prefix: tuple[str, ...], part: str, owner: type[Section] | None):
        self.prefix, self.part, self.owner = prefix, part, owner
        super().__init__(".".join(prefix + (part,)))

    def error(self, key: str) -> ConfigError:
        where = ".".join(self.prefix) or "the top level"
        return ConfigError(f"unknown config key {key!r}; " + (
            f"keys in {where}: {', '.join(self.owner.model_fields)}" if self.owner else f"{where} is a value"))


def walk(root: type[Section], parts: typing.Sequence[str]) -> KeyPath:
    """The schema position of ``parts`` (a dotted key split at its dots);
    :class:`UnknownKey` when a part names no key (``owner`` None: the part
    before it is a value, not a section)."""
    owner: type[Section] | None = root
    field = None
    done: tuple[str, ...] = ()
    for i, part in enumerate(parts):
        if field is not None:
            info = owner.model_fields[field]
            if is_mapping(info.annotation):  # the rest, dots included, is one name in the mapping
                return KeyPath(done + (".".join(parts[i:]),), owner, field, ".".join(parts[i:]))
            sub = section_of(info.annotation)
            if sub is None:
                raise UnknownKey(done, part, None)
            owner = sub
        if part not in owner.model_fields:
            raise UnknownKey(done, part, owner)
        field = part
        done += (part,)
    return KeyPath(tuple(parts), owner, field)


# ---------------------------------------------------------------- what a key allows
def _bounds(metadata: list) -> str:
    lo = hi = None
    for m in metadata:
        if isinstance(m, at.Ge):
            lo = ("[", ">=", m.ge)
        elif isinstance(m, at.Gt):
            lo = ("(", ">", m.gt)
        elif isinstance(m, at.Le):
            hi = ("]", "<=", m.le)
        elif isinstance(m, at.Lt):
            hi = (")", "<", m.lt)
    if lo and hi:
        return f" in {lo[0]}{lo[2]}, {hi[2]}{hi[0]}"
    if lo or hi:
        b = lo or hi
        return f" {b[1]} {b[2]}"
    return ""


def describe_type(annotation: Any, metadata: list | None = None, plural: bool = False) -> str:
    """What a value of this type may be, in words: ``an integer >= 1``,
    ``one of auto, delta-rs``, ``a list of strings``, ``null or a section``."""
    base, optional = unwrap(annotation)
    inner_meta = list(metadata or [])
    if typing.get_origin(annotation) is typing.Annotated:
        inner_meta += [m for a in typing.get_args(annotation)[1:] for m in (getattr(a, "metadata", None) or [a])]
    origin = typing.get_origin(base)
    if origin is Literal:
        text = "one of " + ", ".join(str(c) for c in typing.get_args(base))
    elif origin is list:
        text = "a list of " + describe_type(typing.get_args(base)[0], plural=True)
    elif origin is dict:
        text = "a mapping of names to " + describe_type(typing.get_args(base)[1], plural=True)
    elif section_of(base):
        text = "sections" if plural else "a section"
    else:
        words = {bool: ("true or false", "booleans"), int: ("an integer", "integers"),
                 float: ("a number", "numbers"), str: ("a string", "strings")}
        one, many = words.get(base, (getattr(base, "__name__", str(base)), str(base)))
        text = (many if plural else one) + _bounds(inner_meta)
    return f"null or {text}" if optional else text


def allowed(path: KeyPath) -> str:
    if path.name is not None:
        return describe_type(path.value_annotation)
    info = path.info
    return describe_type(info.annotation, info.metadata) if info else "a section"


def choices(section: type[Section], field: str) -> tuple[Any, ...]:
    """The allowed values of a ``Literal`` key (empty for any other key)."""
    base, _ = unwrap(section.model_fields[field].annotation)
    return typing.get_args(base) if typing.get_origin(base) is Literal else ()


# ---------------------------------------------------------------- errors in words
def origin_of(origins: dict[str, str], key: str) -> str:
    """Where ``key``'s value came from: the longest recorded prefix of it
    (``model.hidden[0]`` → ``model.hidden``), else ``default``."""
    parts = re.sub(r"\[\d+\]", "", key).split(".")
    for n in range(len(parts), 0, -1):
        src = origins.get(".".join(parts[:n]))
        if src:
            return src
    below = [src for k, src in origins.items() if k.startswith(".".join(parts) + ".")]
    return below[0] if below else "default"  # a whole section that was given, e.g. an unknown one


def dotted(loc: typing.Sequence[Any]) -> str:
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def describe_errors(e: ValidationError, root: type[Section], origin=lambda key: None) -> str:
    """One line per error: the dotted key, the bad value, where it came from
    (``origin(key)``: a file, an env var, a ``--set``) and what is allowed."""
    lines = [describe_error(err, root, origin) for err in e.errors(include_url=False)]
    return lines[0] if len(lines) == 1 else f"{len(lines)} config errors:\n  " + "\n  ".join(lines)


def describe_error(err: dict, root: type[Section], origin=lambda key: None) -> str:
    loc = [p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
    names = tuple(p for p in loc if isinstance(p, str))  # list indices dropped: the key's schema position
    kind, value = err["type"], err.get("input")
    if kind == "config_invalid":
        loc, names = loc + [err["ctx"]["key"]], names + (err["ctx"]["key"],)
        value = err["ctx"]["value"]
    key = dotted(loc)
    src = origin(key)
    where = f" ({src})" if src else ""
    try:
        path = walk(root, names)
    except UnknownKey as u:
        section = ".".join(u.prefix) or "the top level"
        if u.owner is None:
            return f"{key}{where}: {section} is a value, not a section"
        keys = sorted(u.owner.model_fields)
        import difflib

        near = difflib.get_close_matches(u.part, keys, n=1)
        hint = f" (did you mean {'.'.join(u.prefix + (near[0],))!r}?)" if near else ""
        return f"unknown config key {key!r}{where}{hint}; keys allowed in {section}: {', '.join(keys)}"
    if kind == "config_invalid":
        return f"{key} = {value!r}{where} is invalid: {err['ctx']['why']}"
    if kind == "value_error":
        return f"{key} = {value!r}{where} is invalid: {err['msg'].removeprefix('Value error, ')}"
    must = allowed(path)
    if path.section is not None and path.field is not None and kind in ("model_type", "model_attributes_type",
                                                                          "dict_type"):
        must = "a section (a mapping of its keys)" + (", or null" if unwrap(path.info.annotation)[1] else "")
    hint = ""
    if kind == "string_type" and isinstance(value, (bool, int, float)):
        hint = f" (YAML read it as {type(value).__name__}: write it in quotes, '{value}')"
    if path.name is not None and isinstance(value, dict):
        hint = f" (a name in {'.'.join(path.parts[:-1])} is one key with its dots, not a nested section)"
    if isinstance(loc[-1], int) and path.name is None:  # an item of a list
        must = f"{describe_type(typing.get_args(unwrap(path.info.annotation)[0])[0])} (an item of {path.key})"
    return f"{key} = {value!r}{where}: must be {must}{hint}"
