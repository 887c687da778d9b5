"""Loading: which file, then ``DELTAREC__SECTION__KEY`` environment variables,
then ``--set section.key=value`` overrides; one validation at the end whose
errors say which of the three each bad value came from."""
from __future__ import annotations

import os
import typing
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import ValidationError

from .base import ConfigError, UnknownKey, describe_errors, origin_of, unwrap, walk
from .schema import Config

ENV_PREFIX = "DELTAREC__"
DEFAULT_CONF = "conf/local.yaml"
_NULLS = ("", "null", "Null", "NULL", "~")


def find_config_file(conf: str | os.PathLike | None, environ: Mapping[str, str] | None = None,
                     cwd: str | os.PathLike | None = None) -> Path:
    """The config file to load: ``conf`` (``--conf``), else ``$DELTAREC_CONF``,
    else ``conf/local.yaml`` in the working directory. None of them: a
    :class:`ConfigError` saying how to name one (no silent built-in set: its
    relative paths would point wherever the command happens to run)."""
    environ = os.environ if environ is None else environ
    if conf:
        return Path(conf)
    if environ.get("DELTAREC_CONF"):
        return Path(environ["DELTAREC_CONF"])
    default = Path(cwd or os.getcwd()) / DEFAULT_CONF
    if default.is_file():
        return default
    raise ConfigError(f"no config file: no --conf, no $DELTAREC_CONF, and no {DEFAULT_CONF} in "
                      f"{default.parent.parent}. "
                      f"Pass --conf FILE (the repository's {DEFAULT_CONF} is the commented default; copy it), "
                      "set DELTAREC_CONF=FILE, or run from the repository root")


def load_config(
    path: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """The config from a YAML file (None: the defaults), env vars and
    ``a.b=c`` overrides, validated. Override and env values are YAML
    (``model.hidden=[16]``), except for text keys, which take the text as
    written (``features.salt=0123`` stays ``"0123"``; YAML quotes are removed)."""
    raw: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
        _record_leaves(raw, (), str(path), origins)
    environ = os.environ if environ is None else environ
    for key in sorted(k for k in environ if k.startswith(ENV_PREFIX)):
        dotted = key[len(ENV_PREFIX):].lower().replace("__", ".")
        _set(raw, origins, dotted, environ[key], f"environment variable {key}")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.lr=0.01)")
        dotted, value = item.split("=", 1)
        _set(raw, origins, dotted.strip(), value, f"--set {item}")
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(describe_errors(e, Config, lambda k: origin_of(origins, k))) from None
    cfg._origins = origins
    return cfg


def _read_yaml(p: Path) -> dict[str, Any]:
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist (pass --conf conf/local.yaml or another file)")
    try:
        loaded = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top, got {type(loaded).__name__}")
    return loaded


def _record_leaves(node: Any, prefix: tuple[str, ...], source: str, origins: dict[str, str]) -> None:
    if isinstance(node, dict) and node:
        for k, v in node.items():
            _record_leaves(v, prefix + (str(k),), source, origins)
    elif prefix:
        origins[".".join(prefix)] = source


def _set(raw: dict, origins: dict[str, str], dotted: str, text: str, source: str) -> None:
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(f"{source}: {dotted!r} is not a dotted key such as train.lr")
    try:
        path = walk(Config, parts)
        parts, value = list(path.parts), _parse(text, path.value_annotation, source)
    except UnknownKey as u:
        if u.owner is None:
            raise ConfigError(f"{source}: {'.'.join(u.prefix)} is a value, not a section") from None
        value = _parse(text, None, source)  # validation names the unknown key with what is allowed
    node = raw
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{source}: {'.'.join(parts[:i + 1])} is {nxt!r} in the config file, not a section")
        node = nxt
    node[parts[-1]] = value
    key = ".".join(parts)
    for k in [k for k in origins if k == key or k.startswith(key + ".") or k.startswith(key + "[")]:
        del origins[k]
    origins[key] = source


def _parse(text: str, annotation: Any, source: str) -> Any:
    base, optional = unwrap(annotation) if annotation is not None else (None, False)
    if base is str or (typing.get_origin(base) is Literal and all(isinstance(a, str) for a in typing.get_args(base))):
        if optional and text.strip() in _NULLS:
            return None
        if text.strip()[:1] in ("'", '"'):  # quoted as in YAML: the quotes go
            value = _yaml(text, source)
            if isinstance(value, str):
                return value
        return text  # a text key takes the text as written: no YAML guessing (0123, 1e3, yes, [a-z]+)
    return None if text == "" else _yaml(text, source)


def _yaml(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: the value is not valid YAML ({str(e).splitlines()[0]}); quote text, "
                          "write lists as [a, b] and mappings as {a: 1}") from None
