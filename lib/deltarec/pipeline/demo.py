"""The embedded demo: fill an empty lake with real (or synthetic) behaviour,
train the first model on the history, then replay the following days one
night at a time through the normal nightly job.

Reads ``demo.data_path`` (the Online Retail file), or, when that file is
absent, generates synthetic data and says so (a warning, and the "demo: ..."
line names the data used). Writes the behaviour and items tables, one Delta
commit per day, and whatever the nightly runs write."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..demo import source as src
from ..lake import open_lake, schemas
from .console import describe, header, summary, table_row
from .nightly import NightResult, run_nightly

if TYPE_CHECKING:
    import datetime as dt

    import pyarrow as pa
    from pyspark.sql import SparkSession

    from ..config import Config
    from ..lake.engine import LakeEngine

log = logging.getLogger("deltarec.demo")


def demo_days(cfg: "Config") -> tuple[list[tuple["dt.date", "pa.Table"]], "pa.Table", str]:
    """(days of mapped events, items, description of the data used)."""
    d = cfg.demo
    path = Path(d.data_path)
    if path.is_file():
        raw = src.read_source_file(path)
        what = f"data file {path} ({raw.num_rows} rows)"  # demo.data_path: any events file, not only Online Retail
    else:
        from ..demo import synthetic

        log.warning("demo data file %s is absent: using the synthetic generator with drifting "
                    "preferences instead (set demo.data_path to use a real file)", path)
        raw = synthetic.generate(d.synthetic_users, d.synthetic_items, d.synthetic_days, d.seed)
        what = f"synthetic data ({raw.num_rows} rows, {d.synthetic_users} users, {d.synthetic_items} items)"
    events = src.map_columns(raw, d.columns)
    days = src.split_days(events)
    if d.max_days:
        days = days[: d.max_days]
    items = src.items_from(raw, d.columns, events)
    return days, items, what


def append_day(lake: "LakeEngine", cfg: "Config", events: "pa.Table", items: "pa.Table") -> int:
    """One Delta commit of a day's events (change feed on), plus its new items."""
    import pyarrow.compute as pc

    day_items = items.filter(pc.is_in(items["item_id"], value_set=pc.unique(events["item_id"].drop_null())))
    lake.create(cfg.lake.items_table, schemas.ITEMS)
    if day_items.num_rows:
        lake.merge(cfg.lake.items_table, day_items, on=["item_id"], update=False)
    return lake.write(cfg.lake.events_table, events, mode="append", enable_cdf=True,
                      schema=schemas.BEHAVIOR_EVENTS)


def run_demo(spark: "SparkSession", cfg: "Config", out=print) -> list[NightResult]:
    """Load the demo's history, run the first (full) night, then ``demo.nights``
    nights; a lake that already holds the behaviour table gets one nightly run."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    lake = open_lake(cfg.lake, spark)
    if lake.exists(cfg.lake.events_table):
        out(f"lake {lake.root} already holds {cfg.lake.events_table}: no demo data loaded; running the nightly job")
        res = run_nightly(spark, cfg, lake=lake)
        out(describe(res))
        return [res]
    days, items, what = demo_days(cfg)
    nights = cfg.demo.nights
    n_hist = cfg.demo.history_days or len(days) - nights
    if n_hist < 1 or n_hist + nights > len(days):
        raise ValueError(f"demo.history_days={cfg.demo.history_days} and demo.nights={nights} need more than "
                         f"the {len(days)} days in {what}")
    out(f"demo: {what}; lake {lake.root} ({lake.name})")
    out(f"loading {n_hist} days of history ({days[0][0]} .. {days[n_hist - 1][0]}), one Delta commit per day")
    # disable=None: tqdm's rule, a bar only on a terminal; in a log file the
    # nights' table rows are the progress.
    for _, ev in tqdm(days[:n_hist], desc="load history", unit="day", mininterval=2.0, disable=None):
        append_day(lake, cfg, ev, items)
    results = [run_nightly(spark, cfg, lake=lake)]
    out(describe(results[0]))
    out(header(cfg.eval.k))
    for day, ev in days[n_hist:n_hist + nights]:
        append_day(lake, cfg, ev, items)
        res = run_nightly(spark, cfg, lake=lake)
        results.append(res)
        out(table_row(str(day), res))
    out(summary(results, lake, cfg, time.perf_counter() - t0))
    try:
        from ..serving.table import tomorrow_text

        out(tomorrow_text(lake, cfg))
    except Exception as e:  # the nights committed; only the printout failed
        log.error("cannot show tomorrow's recommendations: %s: %s", type(e).__name__, e)
    return results
