"""Helpers shared by the notebooks in ``notebooks/``.

On Databricks a notebook gets ``dbutils``, ``display`` and ``spark`` from the
platform. Run anywhere else (a local Jupyter, ``python notebooks/NAME.py``, a
test) it uses the stand-ins here, so one file runs in both places:

- :class:`LocalWidgets` answers ``dbutils.widgets.text/dropdown/get``; a
  widget's value comes from the command line (``--name value``, plus
  ``--conf FILE``, repeated ``--set key=value`` and ``--dry-run``), else the
  environment (``DELTAREC_WIDGET_<NAME>``), else the default the notebook gave;
- :class:`LocalDisplay` prints DataFrames, dicts and text and writes figures
  to PNG files;
- :func:`get_spark` reuses the active session (Databricks', or a test's) and
  otherwise builds one from the config with :func:`deltarec.spark.build_spark`.
"""
from __future__ import annotations

import copy
import json
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from .config import Config, ConfigError, load_config

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from .lake.engine import LakeEngine
    from .pipeline.nightly import NightResult

WIDGET_ENV_PREFIX = "DELTAREC_WIDGET_"
OUT_DIR_ENV = "DELTAREC_NB_OUT_DIR"
REPO_ROOT = Path(__file__).resolve().parents[2]  # lib/deltarec/notebook.py → the repository


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


def platform(namespace: Mapping[str, Any]) -> tuple[Any, Any]:
    """(dbutils, display): Databricks' own when the notebook's ``namespace``
    has them, else local stand-ins with widgets from the command line (when
    run as a script) or from env vars / defaults."""
    if "dbutils" in namespace and "display" in namespace:
        return namespace["dbutils"], namespace["display"]
    return local_dbutils(sys.argv[1:] if "__file__" in namespace else []), local_display()


def config_widgets(dbutils: Any) -> None:
    """The two widgets every notebook has: the config file and overrides."""
    dbutils.widgets.text("config_file", "conf/local.yaml", "Config file")
    dbutils.widgets.text("overrides", "", "Overrides (key=value, newline- or comma-separated)")


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
        return json.dumps(obj, indent=1, default=str)
    return str(obj)


def table(rows: list[dict[str, Any]]):
    """A pandas DataFrame of ``rows``: what Databricks' ``display`` shows as a table."""
    import pandas as pd

    return pd.DataFrame(rows)


def image(png: str | os.PathLike):
    """A matplotlib Figure showing a PNG file: ``display`` renders it on
    Databricks; the local stand-in prints the file's path."""
    import matplotlib.image as mpimg
    from matplotlib.figure import Figure

    pixels = mpimg.imread(os.fspath(png))
    h, w = pixels.shape[:2]
    fig = Figure(figsize=(w / 100, h / 100), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(pixels)
    ax.axis("off")
    fig.deltarec_png = os.fspath(png)
    return fig


# ------------------------------------------------------------ parameters
_SPLIT = re.compile(r"\n|,\s*(?=[A-Za-z_][\w.]*\s*=)")  # commas inside values ([16, 8]) stay


def parse_overrides(text: str) -> list[str]:
    """``key=value`` items separated by newlines or commas (a comma inside a
    value, as in ``model.hidden=[16,8]``, is kept)."""
    items = [s.strip() for s in _SPLIT.split(text or "") if s.strip() and not s.strip().startswith("#")]
    for item in items:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.backend=local); "
                              "separate several with newlines or commas")
    return items


def parse_bool(value: str, name: str) -> bool:
    v = str(value).strip().lower()
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no"):
        return False
    raise ValueError(f"widget {name} = {value!r} must be true or false")


def resolve_config_path(path: str) -> Path:
    """``path`` as given, else relative to the parent directory (a notebook in
    a Databricks Repo runs in ``notebooks/``), else to the repository root."""
    if not path or not path.strip():
        raise ConfigError("widget config_file is empty: name a YAML file, e.g. conf/local.yaml")
    p = Path(path.strip()).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, Path.cwd().parent / p, REPO_ROOT / p]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise ConfigError(f"config file {path!r} not found (looked in {', '.join(str(c.parent) for c in candidates)}); "
                      "set the config_file widget to a YAML file such as conf/local.yaml")


def notebook_config(config_file: str, overrides: str, extra: Sequence[str] = ()) -> Config:
    """The config from the ``config_file`` and ``overrides`` widgets (then ``extra``)."""
    return load_config(resolve_config_path(config_file), parse_overrides(overrides) + list(extra))


# ------------------------------------------------------------ spark and lake
def get_spark(cfg: Config) -> "SparkSession":
    """The active session (Databricks', or one a caller already started), else
    a new one built from ``cfg``."""
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    from .spark import build_spark

    return build_spark(cfg)


def get_lake(cfg: Config, spark: "SparkSession | None" = None) -> "LakeEngine":
    """The lake for reading ledgers: with delta-rs no JVM is needed; delta-spark
    (or ``auto`` inside a running session) uses Spark."""
    from pyspark.sql import SparkSession

    from .lake import open_lake

    spark = spark or SparkSession.getActiveSession()
    if spark is None and cfg.lake.engine == "delta-spark":
        spark = get_spark(cfg)
    return open_lake(cfg.lake, spark)


# ------------------------------------------------------------ steps
def run_night(spark: "SparkSession", cfg: Config, out: Callable[[str], Any] = print) -> list["NightResult"]:
    """What ``deltarec nightly`` does (see :func:`deltarec.pipeline.demo.run_configured`)."""
    from .pipeline.demo import run_configured

    return run_configured(spark, cfg, out=out)


def night_table(results: list["NightResult"]) -> list[dict[str, Any]]:
    """One row per run of this notebook: versions, rows, examples, next-day metrics."""
    rows = []
    for r in results:
        row: dict[str, Any] = {
            "status": r.status, "run_id": r.run_id, "strategy": r.strategy,
            "versions": f"{r.source_versions[0]}..{r.source_versions[1]}" if r.source_versions else "-",
            "consumed": r.rows_consumed, "quarantined": r.rows_quarantined, "examples": r.examples,
            "train_s": round(r.train_seconds, 1),
        }
        for name in ("model", "stale", "popularity"):
            m = r.prequential.get(name, {})
            row[f"ndcg_{name}"] = m.get("ndcg")
            row[f"hr_{name}"] = m.get("hr")
        rows.append(row)
    return rows


LINEAGE_TABLES = ("runs_table", "examples_table", "quarantine_table", "checkpoints_dir", "event_index_table",
                  "user_state_table", "item_stats_table", "metrics_table", "registry_events_table")
_SUFFIX = re.compile(r"^[A-Za-z0-9_]+$")


def full_retrain_config(spark: "SparkSession", cfg: Config, suffix: str = "full") -> Config:
    """``cfg`` with the lineage's own tables renamed ``<name>_<suffix>`` (ledger,
    training examples, quarantine, checkpoints), after checking that the
    source table exists and that ledger holds no run yet: the first run on an
    empty ledger consumes versions 0..latest from scratch (strategy ``full``).
    The source table, items and the model name are shared with the nightly
    lineage."""
    from .lake import LakeError, open_lake
    from .lake.ledger import Ledger

    if not suffix or not _SUFFIX.match(suffix):
        raise ValueError(f"lineage suffix {suffix!r} must be letters, digits or _ (e.g. full or full_20250101)")
    new = copy.deepcopy(cfg)
    for name in LINEAGE_TABLES:
        setattr(new.lake, name, f"{getattr(cfg.lake, name)}_{suffix}")
    lake = open_lake(new.lake, spark)
    if not lake.exists(cfg.lake.events_table):
        raise LakeError(f"no source table {lake.uri(cfg.lake.events_table)} to retrain on: run the nightly "
                        "job (or notebooks/nightly_incremental.py) first, or point lake.root at your lake")
    existing = Ledger(lake, new.lake.runs_table).runs(new.model.name)
    if existing:
        last = existing[-1]
        raise LakeError(
            f"ledger {lake.uri(new.lake.runs_table)} already holds {len(existing)} run(s) of model "
            f"{new.model.name!r} (last {last.run_id}, versions {last.source_first}..{last.source_last}): a full "
            f"retrain starts a new lineage; pick another lineage suffix than {suffix!r} (e.g. {suffix}_2)")
    return new
