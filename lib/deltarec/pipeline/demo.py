"""The embedded demo: fill an empty lake with real (or synthetic) behaviour,
train the first model on the history, then replay the following days one
night at a time through the normal nightly job."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..demo import source as src
from ..lake import open_lake, schemas
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
        what = f"Online Retail file {path} ({raw.num_rows} rows)"
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
    for _, ev in tqdm(days[:n_hist], desc="load history", unit="day", mininterval=2.0):
        append_day(lake, cfg, ev, items)
    results = [run_nightly(spark, cfg, lake=lake)]
    out(describe(results[0]))
    out(header(cfg.eval.k))
    for day, ev in days[n_hist:n_hist + nights]:
        append_day(lake, cfg, ev, items)
        res = run_nightly(spark, cfg, lake=lake)
        results.append(res)
        out(table_row(str(day), res, cfg.eval.k))
    out(summary(results, lake, cfg, time.perf_counter() - t0))
    try:
        from ..serving.table import tomorrow_text

        out(tomorrow_text(lake, cfg))
    except Exception as e:  # the nights committed; only the printout failed
        log.error("cannot show tomorrow's recommendations: %s: %s", type(e).__name__, e)
    return results


def run_configured(spark: "SparkSession", cfg: "Config", out=print) -> list[NightResult]:
    """What ``deltarec nightly`` does: the demo when ``demo.enabled`` (on a lake
    that already has data that is one nightly run), else one nightly run."""
    if cfg.demo.enabled:
        return run_demo(spark, cfg, out=out)
    result = run_nightly(spark, cfg)
    out(describe(result))
    return [result]


# ------------------------------------------------------------ printing
def describe(r: NightResult) -> str:
    if r.status == "noop":
        return (f"nothing new for model {r.model!r}: watermark {r.watermark} is the latest version; "
                "no run, no checkpoint written")
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(r.quarantine_reasons.items(), key=lambda kv: -kv[1]))
    return (f"run {r.run_id} ({r.strategy}): versions {r.source_versions[0]}..{r.source_versions[1]}, "
            f"{r.rows_consumed} rows consumed = {r.rows_accepted} accepted + {r.rows_quarantined} quarantined"
            f"{' (' + reasons + ')' if reasons else ''}, {r.examples} examples, trained in {r.train_seconds:.1f}s")


def header(k: int) -> str:
    cols = ["night", "versions", "consumed", "quarant.", "examples", "train s",
            f"HR@{k} upd", f"NDCG@{k} upd", f"HR@{k} stale", f"NDCG@{k} stale", f"HR@{k} pop", f"NDCG@{k} pop"]
    return "| " + " | ".join(cols) + " |\n|" + "|".join("---" for _ in cols) + "|"


def table_row(label: str, r: NightResult, k: int) -> str:
    p = r.prequential

    def m(name, key):
        v = p.get(name, {}).get(key)
        return f"{v:.4f}" if v is not None else "-"

    vers = f"{r.source_versions[0]}..{r.source_versions[1]}" if r.source_versions else "-"
    cells = [label, vers, str(r.rows_consumed), str(r.rows_quarantined), str(r.examples),
             f"{r.train_seconds:.1f}", m("model", "hr"), m("model", "ndcg"), m("stale", "hr"),
             m("stale", "ndcg"), m("popularity", "hr"), m("popularity", "ndcg")]
    return "| " + " | ".join(cells) + " |"


def summary(results: list[NightResult], lake, cfg: "Config", seconds: float) -> str:
    nights = [r for r in results[1:] if r.status == "committed" and r.prequential.get("model")]

    def mean(name, key):
        vals = [r.prequential[name][key] for r in nights if name in r.prequential]
        return sum(vals) / len(vals) if vals else float("nan")

    lines = [f"\nsummary: {len(results)} runs committed in {seconds:.0f}s wall"]
    if nights:
        for name, label in (("model", "updated nightly"), ("stale", "first model, never updated"),
                            ("popularity", f"most popular, last {cfg.eval.popularity_days} days")):
            lines.append(f"  mean next-day HR@{cfg.eval.k} {mean(name, 'hr'):.4f}  "
                         f"NDCG@{cfg.eval.k} {mean(name, 'ndcg'):.4f}  {label}")
    lines.append(f"  lake: {lake.root}")
    lines.append(f"  checkpoints: {lake.uri(cfg.lake.checkpoints_dir)}/{cfg.model.name}/")
    lines.append(f"  latest: {results[-1].checkpoint.get('path', '-')}")
    lines.append("  see `deltarec status` (or --json) for the ledger")
    return "\n".join(lines)
