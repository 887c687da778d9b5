"""Stand-ins for Databricks' ``dbutils`` and ``display`` where a notebook runs
outside Databricks (``deltarec.notebook.platform`` picks them):

- :class:`LocalWidgets` answers ``dbutils.widgets.text/dropdown/get``; a
  widget's value comes from the command line (``--name value``, plus
  ``--conf FILE``, repeated ``--set key=value`` and ``--dry-run``), else the
  environment (``DELTAREC_WIDGET_<NAME>``), else the default the notebook gave;
- :class:`LocalDisplay` prints DataFrames, dicts and text and writes figures
  to PNG files.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

WIDGET_ENV_PREFIX = "DELTAREC_WIDGET_"
OUT_DIR_ENV = "DELTAREC_NB_OUT_DIR"


# ------------------------------------------------------------ widgets
class LocalWidgets:
    """The part of ``dbutils.widgets`` the notebooks use, fed from argv / env."""

    # command-line spellings that map onto the notebooks' widgets
    ALIASES = {"conf": "config_file", "dry-run": "dry_run"}

    def __init__(self, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None):
        self._environ = os.environ if environ is None else environ
        self._defaults: dict[str, str] = {}
        self._choices: dict[str, list[str]] = {}
        self._args, self._sets = _parse_argv(list(sys.argv[1:] if argv is None else argv))

    def text(self, name: str, defaultValue: str = "", label: str | None = None) -> None:  # noqa: N803 (dbutils' names)
        self._defaults[name] = str(defaultValue)

    def dropdown(self, name: str, defaultValue: str, choices: Sequence[str], label: str | None = None) -> None:  # noqa: N803
        self._defaults[name] = str(defaultValue)
        self._choices[name] = [str(c) for c in choices]

    def removeAll(self) -> None:  # noqa: N802 (dbutils' name)
        self._defaults.clear()
        self._choices.clear()

    def get(self, name: str) -> str:
        if name not in self._defaults:
            raise ValueError(f"no widget {name!r} in this notebook; widgets: {', '.join(sorted(self._defaults))}")
        self._check_args()
        env_key = WIDGET_ENV_PREFIX + name.upper()
        value = self._args.get(name, self._environ.get(env_key, self._defaults[name]))
        if name == "overrides" and self._sets:
            value = "\n".join([v for v in [value] if v.strip()] + self._sets)
        if name in self._choices and value not in self._choices[name]:
            raise ValueError(f"widget {name} = {value!r} is not one of {', '.join(self._choices[name])} "
                             f"(set it with --{name} VALUE or {env_key}=VALUE)")
        return value

    def getAll(self) -> dict[str, str]:  # noqa: N802
        return {name: self.get(name) for name in self._defaults}

    def _check_args(self) -> None:
        unknown = sorted(set(self._args) - set(self._defaults))
        if self._sets and "overrides" not in self._defaults:
            unknown.append("set")
        if unknown:
            raise ValueError(f"unknown notebook argument --{unknown[0]}; this notebook's widgets: "
                             f"{', '.join('--' + n for n in sorted(self._defaults))}"
                             + (" (and --set KEY=VALUE)" if "overrides" in self._defaults else ""))


def _parse_argv(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    args: dict[str, str] = {}
    sets: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if not a.startswith("--") or a == "--":
            raise ValueError(f"notebook argument {a!r} must look like --name value or --name=value")
        name, eq, value = a[2:].partition("=")
        if name == "dry-run" and not eq:  # a flag
            value = "true"
        elif not eq:
            if i + 1 >= len(argv):
                raise ValueError(f"notebook argument --{name} needs a value")
            i += 1
            value = argv[i]
        if name == "set":
            sets.append(value)
        else:
            args[LocalWidgets.ALIASES.get(name, name)] = value
        i += 1
    return args, sets


class LocalDbutils:
    """Stands in for Databricks' ``dbutils`` (widgets only)."""

    def __init__(self, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None):
        self.widgets = LocalWidgets(argv, environ)


def local_dbutils(argv: Sequence[str] | None = None) -> LocalDbutils:
    """``argv``: the script's arguments (None: ``sys.argv[1:]``; [] where
    there is no command line of the notebook's own, e.g. Jupyter)."""
    return LocalDbutils(argv)


# ------------------------------------------------------------ display
class LocalDisplay:
    """Stands in for Databricks' ``display``: prints tables, dicts and text;
    writes a figure to ``out_dir/figure-N.png`` (a figure made by
    :func:`image` from a PNG file is only named, not written again)."""

    def __init__(self, out_dir: str | os.PathLike | None = None, out: Callable[[str], Any] = print):
        self.out_dir = Path(out_dir or os.environ.get(OUT_DIR_ENV) or "reports")
        self.out = out
        self.figures: list[str] = []

    def __call__(self, obj: Any) -> None:
        from matplotlib.figure import Figure

        if isinstance(obj, Figure):
            path = getattr(obj, "deltarec_png", None)
            if path is None:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                path = str(self.out_dir / f"figure-{len(self.figures) + 1}.png")
                obj.savefig(path, dpi=100)
            self.figures.append(path)
            self.out(f"[figure] {path}")
            return
        self.out(render(obj))


def local_display(out_dir: str | os.PathLike | None = None) -> LocalDisplay:
    return LocalDisplay(out_dir)


def render(obj: Any, max_rows: int = 100) -> str:
    """Text for a Spark/pandas DataFrame, a list of dicts, a dict or anything else."""
    import pandas as pd

    if hasattr(obj, "toPandas") and hasattr(obj, "schema"):  # a Spark DataFrame
        obj = obj.limit(max_rows).toPandas()
    if isinstance(obj, list) and all(isinstance(r, dict) for r in obj):
        obj = pd.DataFrame(obj)
    if isinstance(obj, pd.DataFrame):
        if obj.empty:
            return "(no rows)"
        with pd.option_context("display.width", 250, "display.max_columns", None, "display.max_colwidth", None):
            return obj.head(max_rows).to_string(index=False)
    if isinstance(obj, dict):
        from .jsonout import dumps

        return dumps(obj, indent=1, default=str)
    return str(obj)
