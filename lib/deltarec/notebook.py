"""Helpers shared by the notebooks in ``notebooks/``.

On Databricks a notebook gets ``dbutils``, ``display`` and ``spark`` from the
platform. Run anywhere else (a local Jupyter, ``python notebooks/NAME.py``, a
test) :func:`platform` gives the stand-ins of ``deltarec.notebook_local``
(widgets from the command line or the environment; a display that prints and
writes PNG files), so one file runs in both places; :func:`get_spark` reuses
the active session (Databricks', or a test's) and otherwise builds one from
the config with :func:`deltarec.spark.build_spark`.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from .config import Config, ConfigError, load_config
from .notebook_local import local_dbutils, local_display

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from .lake.engine import LakeEngine
    from .pipeline.nightly import NightResult

REPO_ROOT = Path(__file__).resolve().parents[2]  # lib/deltarec/notebook.py → the repository


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
    """What ``deltarec nightly`` does (:func:`deltarec.pipeline.nightly.run_configured`)."""
    from .pipeline.nightly import run_configured

    return run_configured(spark, cfg, out=out)


def night_table(results: list["NightResult"]) -> list[dict[str, Any]]:
    """One row per run of this notebook (:func:`deltarec.pipeline.console.night_row`):
    versions, rows, examples, training seconds, next-day metrics per role."""
    from .pipeline.console import night_row

    return [night_row(r) for r in results]


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
    new = cfg.replace(lake=cfg.lake.replace(**{name: f"{getattr(cfg.lake, name)}_{suffix}" for name in LINEAGE_TABLES}))
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
