"""Nightly quality and cost: deltarec incremental vs full retrain vs the
alternatives, side by side on the Online Retail data, one night at a time.

    .venv/bin/python benchmarks/nightly_quality.py            # N=14 nights (18 min on a quiet 2-core machine)
    .venv/bin/python benchmarks/nightly_quality.py --quick    # 3 nights on 60 days of history
    .venv/bin/python benchmarks/nightly_quality.py --nights 7 --set train.backend=local

The data goes through the normal loader (``pipeline.demo.demo_days`` /
``append_day``) into a lake per deltarec lineage: the history up to a cut-off
as one Delta commit, then one commit per replayed day. Night i appends day D_i, then every strategy
updates on it, and every strategy is scored on day D_i+1, which none has seen:

- incremental   ``run_nightly`` with ``train.strategy=incremental`` (warm start,
                tonight's examples), in its own lake;
- full_retrain  ``run_nightly`` with ``train.strategy=full`` every night, in its own lake;
- stale         the first model (trained on the history), never updated;
- popularity    the most bought items of the last ``eval.popularity_days`` days;
- personal      each customer's own most bought items, topped up with the popular ones;
- als           Spark MLlib ALS (implicitPrefs=True) refitted on all history every night
                (every purchase the pipeline accepts up to that night; its seconds are the fit's);
- tifu_knn      TIFU-KNN (Hu et al., SIGIR 2020; evaluation/tifu_knn.py), a basket being a
                customer's purchases with one timestamp; its parameters tuned (small grid,
                mean NDCG@k) on the ``--tune-days`` days before the first scored one, never on them;
- personal_recency  ``personal`` with each purchase counted 0.5 ** (age / half-life), the
                half-life tuned on the same days.

``--trends``: instead of Online Retail, ``demo.synthetic.generate_trends`` (explicit
ratings of items whose popularity rises and falls within days; a rating >=
features.rating.threshold is a positive), scored by the same protocol.

Scoring is identical for all: the same users (every customer with a purchase on
D_i+1), the same catalogue (items first seen before D_i+1), HR@k / NDCG@k of
each strategy's top k over the whole catalogue, and AUC of the day's purchases
against the same sampled negatives. Cost per strategy and night: wall seconds,
examples processed, seconds per stage (from the run's ``metrics["stages"]``)
and peak resident memory of the driver, the Spark JVM and training workers,
measured alike for every strategy.

Writes ``nightly_quality.{json,md,png}`` to ``--out`` (default
benchmarks/results). The last line printed is the goal check.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)

from deltarec.config import load_config  # noqa: E402
from deltarec.evaluation.baselines import ImplicitALS, item_counts, personal_scores  # noqa: E402
from deltarec.evaluation.metrics import auc, gauc, ranking_metrics, topk_from_scores  # noqa: E402
from deltarec.evaluation.tifu_knn import TifuParams, baskets_of, tifu_scores, vectors_of  # noqa: E402

STRATEGIES = ("incremental", "full_retrain", "stale", "popularity", "personal", "personal_recency", "tifu_knn",
              "als")
BASELINES = ("popularity", "personal", "personal_recency", "tifu_knn", "als")
CHOOSABLE = ("incremental", "full_retrain", "stale", "als")  # --strategies: the ones that cost; the rest always run
LABELS = {"incremental": "deltarec incremental", "full_retrain": "deltarec full retrain",
          "stale": "first model, never updated", "popularity": "most popular (7 days)",
          "personal": "own history + popular", "personal_recency": "own history, decayed + popular",
          "tifu_knn": "TIFU-KNN (tuned before)", "als": "Spark ALS (implicit)"}
COLOURS = {"incremental": "tab:blue", "full_retrain": "tab:purple", "stale": "tab:orange",
           "popularity": "tab:green", "personal": "tab:red", "personal_recency": "tab:pink",
           "tifu_knn": "tab:olive", "als": "tab:brown"}
# Tuning grids (small: each point is scored on every tuning day)
TIFU_GRID = [TifuParams(groups=g, within_decay=w, group_decay=gd, neighbours=nb, alpha=a)
             for g in (3, 7) for w in (0.9,) for gd in (0.6, 0.9) for nb in (100, 300) for a in (0.7, 0.9)]
HALF_LIVES = (7.0, 30.0, 90.0, 365.0)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ memory
def reset_peak(pid: int | str = "self") -> None:
    """Reset a process's peak RSS (Linux ``clear_refs``), so the next reading is this step's."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def jvm_pid() -> int | None:
    """The Spark JVM this driver launched: a child process running java."""
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        if comm == "java" and int(rest[1]) == me:
            return int(entry)
    return None


class Memory:
    """Peak resident memory of the driver (this Python process: the local
    training backend, the count baselines, and everything it already holds),
    of the Spark JVM (the delta job, ALS) and of training worker processes,
    over one step: the same measure (VmHWM after a reset) for every strategy."""

    def __init__(self, jvm: int | None):
        self.jvm = jvm

    def start(self) -> None:
        reset_peak()
        if self.jvm is not None:
            reset_peak(self.jvm)

    def read(self, workers: list[float] | None = None) -> dict[str, float | None]:
        return {"driver_peak_mb": peak_mb(), "jvm_peak_mb": peak_mb(self.jvm) if self.jvm is not None else None,
                "workers_peak_mb": max(workers) if workers else None}


def peak_mb(pid: int | str = "self") -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


# ------------------------------------------------------------------ data
def strategy_config(cfg, root: Path, strategy: str):
    """``cfg`` with its own lake root and strategy. A lake per lineage: the delta
    job keeps state tables (event index, user state, item stats) beside the
    ledger, so two lineages in one lake would share them."""
    return cfg.replace(lake=cfg.lake.replace(root=str(root)), train=cfg.train.replace(strategy=strategy))


def positive_types(cfg) -> list[str]:
    return list(getattr(cfg.features, "positive_event_types", None) or ("purchase", "click", "rating"))


def accepted_positives(cfg, events_df):
    """Events the pipeline would accept and label positive, with hashed ids:
    the same ``validate`` rules on the rows seen as one batch of inserts."""
    from pyspark.sql import functions as F

    from deltarec.features.examples import with_indices
    from deltarec.features.validate import validate

    changes = (events_df.withColumn("_change_type", F.lit("insert"))
               .withColumn("_commit_version", F.lit(0).cast("long"))
               .withColumn("_commit_timestamp", F.current_timestamp()))
    ok = validate(changes, cfg.validation, "benchmark").accepted
    # as features/examples.py labels them: a positive event type, or a rating >= features.rating.threshold
    ok = ok.where(F.col("event_type").isin(*positive_types(cfg))
                  | ((F.col("event_type") == "rating") & (F.col("rating") >= F.lit(cfg.features.rating.cut))))
    return with_indices(ok, cfg.features)


def day_bounds(day: dt.date) -> dt.datetime:
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.timezone.utc)


class Interactions:
    """Every accepted purchase of the benchmark's days, in numpy, time ordered."""

    def __init__(self, spark, cfg, days: list[tuple[dt.date, pa.Table]]):
        table = pa.concat_tables([t for _, t in days])
        pos = accepted_positives(cfg, spark.createDataFrame(table)).select(
            "user_id", "item_id", "event_time", "user_idx", "item_idx").toArrow()
        pos = pos.sort_by([("event_time", "ascending"), ("user_id", "ascending"), ("item_id", "ascending")])
        self.user = pos["user_id"].to_numpy(zero_copy_only=False).astype(object)
        self.item = pos["item_id"].to_numpy(zero_copy_only=False).astype(object)
        self.user_idx = pos["user_idx"].to_numpy()
        self.item_idx = pos["item_idx"].to_numpy()
        t = pc.cast(pc.cast(pos["event_time"], pa.timestamp("us", "UTC")), pa.int64()).to_numpy()
        self.time_us = t
        self.user_hash = dict(zip(self.user.tolist(), self.user_idx.tolist()))

    def before(self, when: dt.datetime, since: dt.datetime | None = None) -> np.ndarray:
        """Row mask of events in [since, when)."""
        hi = int(when.timestamp() * 1e6)
        m = self.time_us < hi
        if since is not None:
            m &= self.time_us >= int(since.timestamp() * 1e6)
        return m


# ------------------------------------------------------------------ deltarec models
def serving_run(cfg, lake):
    """The run whose checkpoint serves now: the registry's champion when the
    ledger has one, else the newest committed run."""
    from deltarec.lake.ledger import Ledger

    ledger = Ledger(lake, cfg.lake.runs_table)
    champ = getattr(ledger, "champion", None)
    run = champ(cfg.model.name) if champ else None
    return run or ledger.latest(cfg.model.name)


def ledger_runs(cfg, lake):
    from deltarec.lake.ledger import Ledger

    return Ledger(lake, cfg.lake.runs_table).runs(cfg.model.name)


_MODELS: dict[str, Any] = {}


def cached_model(run):
    """The torch model of a committed run (``train.checkpoint.load_model``, cached by run and path)."""
    from deltarec.train.checkpoint import load_model

    key = run.run_id + run.checkpoint_path
    if key not in _MODELS:
        _MODELS[key] = load_model(run)
    return _MODELS[key]


def user_histories(data: Interactions, mask: np.ndarray, users: np.ndarray, length: int) -> np.ndarray:
    """(users × length) hashed item indices: each user's last ``length``
    accepted purchases among the rows of ``mask`` (time order, newest in the
    last column, -1 padded) — what the delta job's user_state holds before the day."""
    h = np.full((len(users), length), -1, dtype=np.int64)
    rows = np.flatnonzero(mask)
    if not len(rows) or not len(users):
        return h
    p = np.searchsorted(users, data.user[rows])  # users is sorted
    p = np.clip(p, 0, len(users) - 1)
    keep = users[p] == data.user[rows]
    rows, p = rows[keep], p[keep]
    order = np.argsort(p, kind="stable")  # by user, time order kept within a user
    rows, p = rows[order], p[order]
    # position from the end of each user's run of rows: 0 = newest
    ends = np.r_[np.flatnonzero(np.diff(p)), len(p) - 1]
    end_of = np.repeat(ends, np.diff(np.r_[-1, ends]))
    back = end_of - np.arange(len(p))
    take = back < length
    h[p[take], length - 1 - back[take]] = data.item_idx[rows[take]]
    return h


def user_repeats(lake, cfg, users: np.ndarray, when: dt.datetime) -> dict[str, np.ndarray] | None:
    """The users' whole-history repeat lists as serving reads them: the lake's
    ``user_state`` after the night (``features/repeats.py``), as of ``when``
    (the scored day's start); None with ``features.repeat_items=0``."""
    from deltarec.features.repeats import user_arrays

    k = cfg.features.repeat_items
    if not k:
        return None
    return user_arrays(lake.read_arrow(cfg.lake.user_state_table), list(users), int(when.timestamp() * 1_000_000), k,
                       cfg.features.repeat_half_life_days)


def model_scores(model, users: np.ndarray, cat_idx: np.ndarray, data: Interactions, mask: np.ndarray,
                 history_length: int, repeat: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """(users × catalogue) scores of a deltarec model from the users' hashed ids
    (and, for a model that asks for them, their last items before the day and
    their whole-history repeat lists, ``user_repeats``)."""
    import torch

    u = torch.tensor([data.user_hash[x] for x in users], dtype=torch.long)
    items = torch.from_numpy(cat_idx.astype(np.int64))
    hist = None
    if "history_idx" in getattr(model, "inputs", ()):
        L = max(1, int(getattr(model, "history_length", 0) or history_length))
        hist = torch.from_numpy(user_histories(data, mask, users, L))
    out = []
    with torch.no_grad():
        for s in range(0, len(users), 256):
            kw = {"history_idx": hist[s:s + 256]} if hist is not None else {}
            if repeat is not None and "repeat_idx" in getattr(model, "inputs", ()):
                kw["repeat"] = {c: torch.from_numpy(v[s:s + 256]) for c, v in repeat.items()}
            out.append(model.score_all(u[s:s + 256], items, **kw).double().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(cat_idx)))


# ------------------------------------------------------------------ evaluation
@dataclasses.dataclass
class Day:
    """What every strategy is scored on: the day's users, their purchases, negatives."""

    users: np.ndarray  # customer ids, sorted
    catalog: np.ndarray  # item ids first seen before the day, sorted
    relevant: tuple[np.ndarray, np.ndarray]  # CSR over catalogue positions (outside: >= len(catalog))
    pairs: tuple[np.ndarray, np.ndarray]  # (user row, catalogue column) of in-catalogue purchases
    negatives: tuple[np.ndarray, np.ndarray]  # (user row, column) sampled negatives
    positives: int  # purchase lines of the day
    out_of_catalogue: int  # distinct (user, item) pairs with an item new that day


def make_day(data: Interactions, mask: np.ndarray, catalog: np.ndarray, n_neg: int, seed: int) -> Day:
    import pandas as pd

    users_all, items_all = data.user[mask], data.item[mask]
    pairs = pd.DataFrame({"u": users_all, "i": items_all}).drop_duplicates().sort_values(["u", "i"])
    users = np.array(sorted(pairs["u"].unique()), dtype=object)
    row = pd.Index(users).get_indexer(pairs["u"].to_numpy())
    col = pd.Index(catalog).get_indexer(pairs["i"].to_numpy())
    outside = col < 0
    # Items new that day cannot be ranked by anyone: they stay relevant (a miss for all).
    col_rel = col.copy()
    col_rel[outside] = len(catalog) + np.arange(outside.sum())
    indptr = np.r_[0, np.cumsum(np.bincount(row, minlength=len(users)))]
    inside = ~outside
    rng = np.random.default_rng(seed)
    # n_neg negatives per in-catalogue purchase, uniform over the catalogue, never one the user bought that day.
    bought = set(zip(row.tolist(), col.tolist()))
    nr = np.repeat(row[inside], n_neg)
    nc = rng.integers(0, len(catalog), size=len(nr))
    keep = np.fromiter(((a, b) not in bought for a, b in zip(nr.tolist(), nc.tolist())), bool, len(nr))
    return Day(users, catalog, (indptr, col_rel), (row[inside], col[inside]), (nr[keep], nc[keep]),
               int(mask.sum()), int(outside.sum()))


def score_day(S: np.ndarray, day: Day, k: int) -> dict[str, float]:
    top = topk_from_scores(S, k)
    m = ranking_metrics(top, day.relevant, k)
    pr, pcol = day.pairs
    nr, ncol = day.negatives
    y = np.r_[np.ones(len(pr)), np.zeros(len(nr))]
    s = np.r_[S[pr, pcol], S[nr, ncol]]
    s = np.where(np.isneginf(s), np.finfo(np.float64).min, s)
    users = np.r_[pr, nr]
    return {"ndcg10": m["ndcg"], "hr10": m["hr"], "recall10": m["recall"], "mrr10": m["mrr"],
            "auc": auc(y, s), "gauc": gauc(users, y, s)}


# ------------------------------------------------------------------ tuned baselines
def history_arrays(data: Interactions, seen: np.ndarray):
    return data.user[seen], data.item[seen], data.time_us[seen]


def tifu_day(data: Interactions, seen: np.ndarray, day: Day, pop: np.ndarray, grid) -> dict[TifuParams, np.ndarray]:
    """TIFU-KNN scores of ``day``'s users for each parameter set of ``grid``
    (the baskets computed once): a basket is one customer's lines with one timestamp."""
    u, i, t = history_arrays(data, seen)
    h = baskets_of(u, i, t, day.catalog)
    return {p: tifu_scores(vectors_of(h, p), day.users, p, tie_break=pop) for p in grid}


def personal_recency_day(data: Interactions, seen: np.ndarray, day: Day, pop: np.ndarray, when: dt.datetime,
                         half_life: float) -> np.ndarray:
    u, i, t = history_arrays(data, seen)
    return personal_scores(u, i, day.users, day.catalog, pop, hist_times=t.astype("datetime64[us]"),
                           now=np.datetime64(int(when.timestamp() * 1e6), "us"), half_life_days=half_life)


def tune_baselines(data: Interactions, item_first: dict, days: list[dt.date], k: int, popularity_days: int,
                   seed: int) -> dict[str, Any]:
    """TIFU-KNN's parameters and personal_recency's half-life with the best mean
    NDCG@k over ``days`` (each scored with the history before it), none of them scored later."""
    tifu_sum = {p: 0.0 for p in TIFU_GRID}
    hl_sum = {h: 0.0 for h in HALF_LIVES}
    for j, d in enumerate(days):
        when = day_bounds(d)
        seen = data.before(when)
        day_mask = data.before(when + dt.timedelta(days=1), since=when)
        if not day_mask.any():
            continue
        catalog = np.array(sorted(x for x, f in item_first.items() if f is not None and f < when), dtype=object)
        day = make_day(data, day_mask, catalog, 1, seed + j)
        pop = item_counts(data.item[data.before(when, since=when - dt.timedelta(days=popularity_days))], catalog)
        for p, S in tifu_day(data, seen, day, pop, TIFU_GRID).items():
            tifu_sum[p] += score_day(S, day, k)["ndcg10"]
        for h in HALF_LIVES:
            hl_sum[h] += score_day(personal_recency_day(data, seen, day, pop, when, h), day, k)["ndcg10"]
    best_p = max(TIFU_GRID, key=lambda p: tifu_sum[p])
    best_h = max(HALF_LIVES, key=lambda h: hl_sum[h])
    n = max(len(days), 1)
    return {"tifu": best_p, "half_life": best_h, "days": [str(d) for d in days],
            "tifu_tuning_ndcg": {str(dataclasses.asdict(p)): round(v / n, 5) for p, v in tifu_sum.items()},
            "half_life_tuning_ndcg": {str(h): round(v / n, 5) for h, v in hl_sum.items()}}


def trend_source(args, tmp: Path) -> list[str]:
    """``--trends``: generate_trends' table written to a parquet file, and the
    overrides that make the demo loader read it."""
    import pyarrow.parquet as pq

    from deltarec.demo.synthetic import TREND_COLUMNS, generate_trends

    path = tmp / "trends.parquet"
    pq.write_table(generate_trends(n_users=args.trend_users, n_items=args.trend_items, n_days=args.trend_days,
                                   seed=args.seed, events_per_day=args.trend_events), path)
    cols = [f"demo.columns.{k}={'null' if v is None else v}" for k, v in TREND_COLUMNS.items()]
    return [f"demo.data_path={path}", *cols]


# ------------------------------------------------------------------ the benchmark
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nights", type=int, default=None, help="nights replayed (default 14; --quick 3)")
    ap.add_argument("--history-days", type=int, default=None,
                    help="days in the first load (default: every day before the nights; --quick 60)")
    ap.add_argument("--quick", action="store_true", help="3 nights on 60 days of history (a smoke run)")
    ap.add_argument("--conf", default=str(ROOT / "conf" / "local.yaml"), help="config file (default conf/local.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, repeatable (e.g. train.backend=local)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="where results go")
    ap.add_argument("--lake", default=None, help="lake directory to keep (default: a fresh temporary one, removed after)")
    ap.add_argument("--auc-negatives", type=int, default=100, help="sampled negatives per purchase for AUC")
    ap.add_argument("--als-rank", type=int, default=32)
    ap.add_argument("--als-iter", type=int, default=10)
    ap.add_argument("--als-reg", type=float, default=0.1)
    ap.add_argument("--als-alpha", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--tune-days", type=int, default=5,
                    help="days before the first scored one on which TIFU-KNN and personal_recency are tuned")
    ap.add_argument("--strategies", default=",".join(CHOOSABLE),
                    help=f"comma-separated, of {', '.join(CHOOSABLE)} (default: all; incremental always runs: "
                         "it keeps the lake the others are scored from); the count baselines always run")
    ap.add_argument("--trends", action="store_true", help="the trend-driven synthetic data instead of Online Retail")
    ap.add_argument("--trend-users", type=int, default=2000)
    ap.add_argument("--trend-items", type=int, default=600)
    ap.add_argument("--trend-days", type=int, default=60)
    ap.add_argument("--trend-events", type=int, default=1500, help="ratings per day of the trend data")
    args = ap.parse_args(argv)
    args.nights = args.nights or (3 if args.quick else 14)
    if args.history_days is None:
        args.history_days = 60 if args.quick else 0
    if args.nights < 1:
        ap.error(f"--nights must be >= 1, got {args.nights}")
    chosen = [x.strip() for x in args.strategies.split(",") if x.strip()]
    bad = [x for x in chosen if x not in CHOOSABLE]
    if bad:
        ap.error(f"--strategies: unknown {', '.join(bad)}; choose from {', '.join(CHOOSABLE)}")
    args.strategies = ["incremental"] + [x for x in CHOOSABLE if x in chosen and x != "incremental"]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t_all = time.perf_counter()
    lake_dir = Path(args.lake) if args.lake else Path(tempfile.mkdtemp(prefix="deltarec-nightly-quality-"))
    if args.lake and lake_dir.exists() and any(lake_dir.iterdir()):
        raise SystemExit(f"--lake {lake_dir} is not empty: give a new directory (the benchmark starts from nothing)")
    try:
        return benchmark(args, lake_dir, t_all)
    finally:
        if not args.lake:
            shutil.rmtree(lake_dir, ignore_errors=True)


def benchmark(args, lake_dir: Path, t_all: float) -> int:
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    data_path = ROOT.parent / "shared" / "data" / "online_retail" / "online_retail.parquet"
    # One local training process with one torch thread by default: on 2 cores it trains ~4x faster than two
    # Horovod workers (benchmarks/train_throughput.py) and does not spin against Spark; --set overrides it.
    # No gate: every night's model serves, so each strategy is scored on what it trains (with the gate on,
    # a rejected candidate leaves the first model serving in both lineages). --set gate.enabled=true: gated.
    # 8g driver: Spark here is driver and executor at once, and a first load of the whole year builds
    # ~2M examples with their histories (the 4g of conf/local.yaml ran out of heap).
    source = trend_source(args, lake_dir) if args.trends else [f"demo.data_path={data_path}"]
    cfg = load_config(args.conf, [*source, "train.backend=local", "train.num_proc=1",
                                  "spark.driver_memory=8g", "gate.enabled=false", *args.overrides,
                                  f"lake.root={lake_dir}", "demo.max_days=0", "train.progress=false"], environ={})
    k = cfg.eval.k
    if k != 10:
        log(f"eval.k={k}: the *10 names in the results mean @{k}")

    from deltarec.lake import open_lake
    from deltarec.pipeline.demo import append_day, demo_days
    from deltarec.pipeline.nightly import run_nightly
    from deltarec.spark import build_spark

    # no console progress bars: the log stays readable when run in the background
    import torch

    torch.set_num_threads(1)  # as each training worker does; more threads only fight Spark for 2 cores
    spark = build_spark(cfg.replace(spark=cfg.spark.replace(
        conf={"spark.ui.showConsoleProgress": "false", **cfg.spark.conf})))
    spark.sparkContext.setLogLevel("ERROR")
    memory = Memory(jvm_pid())
    if memory.jvm is None:
        log("no Spark JVM found among this process's children: JVM memory is not measured")

    days, items, what = demo_days(cfg)
    n_hist = args.history_days or len(days) - args.nights - 1
    start = len(days) - args.nights - 1 - n_hist if args.history_days else 0
    if n_hist < 1 or start < 0:
        raise SystemExit(f"{what} has {len(days)} days: not enough for {args.nights} nights + 1 scoring day "
                         f"after {args.history_days} days of history")
    days = days[start:]
    hist, nights, score_days = days[:n_hist], days[n_hist:n_hist + args.nights], days[n_hist + 1:n_hist + args.nights + 1]
    log(f"{what}: history {hist[0][0]}..{hist[-1][0]} ({n_hist} days), nights {nights[0][0]}..{nights[-1][0]}, "
        f"scored on {score_days[0][0]}..{score_days[-1][0]}; lake {lake_dir}")

    data = Interactions(spark, cfg, days)
    item_first = dict(zip(items["item_id"].to_pylist(), items["first_seen"].to_pylist()))
    from pyspark.sql import functions as F

    from deltarec.features.examples import bucket

    cat_hash = {r["item_id"]: r["h"] for r in spark.createDataFrame(items.select(["item_id"])).select(
        "item_id", bucket(F.col("item_id"), cfg.features.item_buckets).alias("h")).collect()}

    run = [x for x in STRATEGIES if x in args.strategies or x not in CHOOSABLE]  # scored, in table order
    cfgs = {"incremental": strategy_config(cfg, lake_dir / "incremental", "incremental")}
    if "full_retrain" in run:
        cfgs["full_retrain"] = strategy_config(cfg, lake_dir / "full_retrain", "full")
    lakes = {"incremental": open_lake(cfgs["incremental"].lake, spark)}  # full_retrain's: after the first run

    # ---- the history: one Delta commit through the normal loader, then each lineage's first (full) training
    t = time.perf_counter()
    history = pa.concat_tables([ev for _, ev in hist])
    append_day(lakes["incremental"], cfgs["incremental"], history, items)
    load_seconds = time.perf_counter() - t
    first: dict[str, Any] = {"load_seconds": round(load_seconds, 1)}
    rec = run_pipeline(run_nightly, spark, cfgs["incremental"], lakes["incremental"], memory)
    first["incremental"] = first["full_retrain"] = rec
    log(f"first training: {rec['seconds']:.0f}s, {rec['examples']} examples")
    # Both lineages start from the same first run (strategy full over the same commit, same seed: the
    # same examples and weights), so it runs once and full_retrain's lake starts as a copy of it. Its
    # ledger row keeps the checkpoint path inside the incremental lake; checkpoints are never rewritten.
    if "full_retrain" in run:
        shutil.copytree(lake_dir / "incremental", lake_dir / "full_retrain")
        lakes["full_retrain"] = open_lake(cfgs["full_retrain"].lake, spark)
    stale_run = ledger_runs(cfgs["incremental"], lakes["incremental"])[0]
    als = ImplicitALS(spark, rank=args.als_rank, max_iter=args.als_iter, reg_param=args.als_reg,
                      alpha=args.als_alpha, seed=args.seed)
    if "als" in run:
        first["als"] = fit_als(als, data, day_bounds(nights[0][0]), memory)  # the history only
    # the days before the first scored one (the last of them: the first night's day), never scored
    tune_dates = [d for d, _ in hist[-(args.tune_days - 1):]] + [nights[0][0]] if args.tune_days > 1 else [nights[0][0]]
    t = time.perf_counter()
    tuned = tune_baselines(data, item_first, tune_dates, k, cfg.eval.popularity_days, args.seed * 7919)
    first["tuning_seconds"] = round(time.perf_counter() - t, 1)
    log(f"tuned on {tune_dates[0]}..{tune_dates[-1]} ({first['tuning_seconds']}s): TIFU-KNN {tuned['tifu']}, "
        f"personal half-life {tuned['half_life']} days")

    results: dict[str, list[dict[str, Any]]] = {s: [] for s in run}
    meta = {
        "data": what, "history": [str(hist[0][0]), str(hist[-1][0])], "history_days": n_hist,
        "nights": args.nights, "k": k, "auc_negatives_per_purchase": args.auc_negatives,
        "catalogue": "items first seen before the scored day",
        "users": "every customer with an accepted purchase on the scored day",
        "backend": f"{cfg.train.backend} x{cfg.train.num_proc}", "model": cfg.model.name,
        "epochs": {"incremental": cfg.train.epochs, "full": cfg.train.full_epochs},
        "als": als.params, "popularity_days": cfg.eval.popularity_days,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_average_at_start": os.getloadavg()},
        "overrides": args.overrides, "strategies": run, "first_training": first,
        "tuned": {**tuned, "tifu": dataclasses.asdict(tuned["tifu"])},
        "settings": {"model": cfg.model.model_dump(),
                     "train": cfg.train.model_dump()},
    }
    for i, ((night_day, events), (score_day_date, _)) in enumerate(zip(nights, score_days), start=1):
        for name, c in cfgs.items():  # upstream's commit of the day: no strategy's cost
            append_day(lakes[name], c, events, items)
        cost: dict[str, dict[str, Any]] = {}
        for name, c in cfgs.items():
            cost[name] = run_pipeline(run_nightly, spark, c, lakes[name], memory)
            log(f"night {i} {name}: {cost[name]['seconds']:.0f}s ({cost[name]['train_seconds']:.0f}s training "
                f"{cost[name]['examples']} examples)")
        release_memory(memory.jvm)
        if "als" in run:
            cost["als"] = fit_als(als, data, day_bounds(night_day) + dt.timedelta(days=1), memory)
            log(f"night {i} als: {cost['als']['seconds']:.0f}s")

        # ---- score everyone on the next day, which nobody has trained on
        when = day_bounds(score_day_date)
        seen = data.before(when)
        day_mask = data.before(when + dt.timedelta(days=1), since=when)
        catalog = np.array(sorted(i for i, f in item_first.items() if f is not None and f < when), dtype=object)
        day = make_day(data, day_mask, catalog, args.auc_negatives, args.seed * 1000 + i)
        cat_idx = np.array([cat_hash[x] for x in catalog], dtype=np.int64)
        H = getattr(cfg.features, "history_length", 20)

        scores: dict[str, np.ndarray] = {}
        cost["stale"] = {"seconds": 0.0, "examples": 0}
        # every lineage's lake holds the same user_state (same events): serving reads it whatever the model
        repeat = user_repeats(lakes["incremental"], cfgs["incremental"], day.users, when)
        for name in ("incremental", "full_retrain", "stale"):
            if name not in run:
                continue
            served = stale_run if name == "stale" else serving_run(cfgs[name], lakes[name])
            scores[name] = model_scores(cached_model(served), day.users, cat_idx, data, seen, H, repeat)
            cost[name]["serving_run"] = served.run_id

        recent = data.before(when, since=when - dt.timedelta(days=cfg.eval.popularity_days))
        memory.start()
        t = time.perf_counter()
        pop = item_counts(data.item[recent], catalog)
        scores["popularity"] = np.tile(pop, (len(day.users), 1))
        cost["popularity"] = {"seconds": time.perf_counter() - t, "examples": int(recent.sum()), **memory.read()}
        memory.start()
        t = time.perf_counter()
        scores["personal"] = personal_scores(data.user[seen], data.item[seen], day.users, catalog,
                                             item_counts(data.item[recent], catalog))
        cost["personal"] = {"seconds": time.perf_counter() - t, "examples": int(seen.sum()), **memory.read()}
        if "als" in run:
            scores["als"] = als.scores(day.users, catalog, fallback=pop)
        pop7 = item_counts(data.item[recent], catalog)
        memory.start()
        t = time.perf_counter()
        scores["personal_recency"] = personal_recency_day(data, seen, day, pop7, when, tuned["half_life"])
        cost["personal_recency"] = {"seconds": time.perf_counter() - t, "examples": int(seen.sum()), **memory.read()}
        memory.start()
        t = time.perf_counter()
        scores["tifu_knn"] = tifu_day(data, seen, day, pop7, [tuned["tifu"]])[tuned["tifu"]]
        cost["tifu_knn"] = {"seconds": time.perf_counter() - t, "examples": int(seen.sum()), **memory.read()}

        for name in run:
            q = score_day(scores[name], day, k)
            results[name].append({"night": i, "trained_on": str(night_day), "scored_on": str(score_day_date),
                                  "users": len(day.users), "purchases": day.positives,
                                  "load_average": round(os.getloadavg()[0], 2),
                                  "new_item_pairs": day.out_of_catalogue,
                                  **{m: round(v, 5) for m, v in q.items()}, **round_cost(cost[name])})
        log(f"night {i}/{args.nights} (trained on {night_day}, scored on {score_day_date}, {len(day.users)} users): "
            + ", ".join(f"{s} {results[s][-1]['ndcg10']:.4f}/{results[s][-1]['seconds']:.0f}s" for s in run))
        write_outputs(out_dir, meta, results, time.perf_counter() - t_all, partial=i < args.nights)

    total = time.perf_counter() - t_all
    summary = write_outputs(out_dir, meta, results, total, partial=False)
    print(summary["markdown"])
    print(summary["goal_line"])
    return 0


def round_cost(c: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in c.items()}


PHASES = ("strategy", "delta_job", "inputs", "prequential", "train", "gate")


def phases(run, seconds: float) -> dict[str, float]:
    """Where a night's seconds went, from the stages the run recorded in its
    ledger metrics (``metrics["stages"]``): the delta job's stages summed,
    the others as recorded; 'other' is the rest of the wall time (ledger
    reads and the commit, audit, MLflow)."""
    stages = run.metrics.get("stages") or {}
    out: dict[str, float] = dict.fromkeys(PHASES, 0.0)  # the night's order (the ledger's JSON sorts keys)
    for name, st in stages.items():
        key = "delta_job" if name.startswith("delta_job.") else name
        out[key] = out.get(key, 0.0) + st["seconds"]
    out = {k: round(v, 2) for k, v in out.items() if v or k in PHASES}
    out["other"] = round(seconds - sum(out.values()), 2)
    return out


def run_pipeline(run_nightly, spark, cfg, lake, memory: Memory) -> dict[str, Any]:
    """One ``run_nightly`` with its cost: wall seconds (Spark + training + commit),
    examples trained, peak memory (driver, JVM, training workers: ``Memory``)
    and seconds per stage of the night (``phases``)."""
    memory.start()
    t = time.perf_counter()
    res = run_nightly(spark, cfg, lake=lake)
    seconds = time.perf_counter() - t
    if res.status != "committed":
        raise RuntimeError(f"{cfg.lake.runs_table}: run_nightly did nothing ({res.status}); the benchmark "
                           "appends a day before every night, so this is a bug")
    run = next(r for r in ledger_runs(cfg, lake) if r.run_id == res.run_id)
    tr = run.metrics.get("train", {})
    workers = [r["peak_rss_mb"] for r in tr.get("ranks") or [] if r.get("peak_rss_mb") is not None]
    return {"seconds": seconds, "train_seconds": res.train_seconds, "examples": tr.get("examples_trained"),
            "new_examples": res.examples, "strategy": res.strategy, "status": run.status,
            # the local backend trains in the driver: its memory is the driver's
            **memory.read(workers if tr.get("backend") != "local" else None),
            "run_id": res.run_id, "phases": phases(run, seconds)}


def fit_als(als: ImplicitALS, data: Interactions, until: dt.datetime, memory: Memory) -> dict[str, Any]:
    """Refit ALS on all history before ``until``: every purchase the pipeline
    accepts (the ``Interactions``, validated once for the whole benchmark), as a
    Spark DataFrame. Its seconds are the fit's: counting, indexing, the
    alternating least squares and collecting the factors."""
    rows = data.before(until)
    table = pa.table({"user_id": pa.array(data.user[rows].tolist(), pa.string()),
                      "item_id": pa.array(data.item[rows].tolist(), pa.string())})
    df = als.spark.createDataFrame(table)
    memory.start()
    t = time.perf_counter()
    als.fit(df)
    return {"seconds": time.perf_counter() - t, "examples": als.interactions, **memory.read()}


def release_memory(jvm: int | None) -> None:
    """Collect Python garbage (py4j handles to finished DataFrames) and then the
    JVM's (``jcmd PID GC.run``), so Spark's cleaner drops their broadcasts and
    shuffles: a long benchmark in one SparkSession otherwise grows the
    driver's heap night by night."""
    import gc
    import subprocess

    gc.collect()
    if jvm is not None and shutil.which("jcmd"):
        subprocess.run(["jcmd", str(jvm), "GC.run"], capture_output=True, timeout=120)


# ------------------------------------------------------------------ outputs
def _mean(vals):
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and np.isnan(v))]
    return round(float(np.mean(vals)), 5) if vals else None


def write_outputs(out_dir: Path, meta: dict, results: dict, seconds: float, partial: bool) -> dict[str, Any]:
    strategies = {}
    for name, nights in results.items():
        strategies[name] = {
            "mean_ndcg10": _mean([n["ndcg10"] for n in nights]), "mean_hr10": _mean([n["hr10"] for n in nights]),
            "mean_auc": _mean([n["auc"] for n in nights]), "mean_gauc": _mean([n["gauc"] for n in nights]),
            "mean_seconds": _mean([n["seconds"] for n in nights]),
            "mean_examples": _mean([n.get("examples") for n in nights]),
            **{f"max_{m}": max([n.get(m) or 0 for n in nights], default=None) or None
               for m in ("driver_peak_mb", "jvm_peak_mb", "workers_peak_mb")},
            "nights": nights,
        }
        phased = [n["phases"] for n in nights if n.get("phases")]
        if phased:
            strategies[name]["mean_phases"] = {k: _mean([ph.get(k) for ph in phased])
                                               for k in dict.fromkeys(k for ph in phased for k in ph)}
    goal = goal_check(strategies)
    doc = {"benchmark": "nightly_quality", "partial": partial, "total_seconds": round(seconds, 1),
           **meta, "goal": goal, "strategies": strategies}
    (out_dir / "nightly_quality.json").write_text(json.dumps(doc, indent=1, default=str))
    md = markdown(doc)
    (out_dir / "nightly_quality.md").write_text(md + "\n" + goal["line"] + "\n")
    try:
        plot(out_dir / "nightly_quality.png", doc)
    except Exception as e:  # a plot must never lose the figures
        log(f"plot failed: {type(e).__name__}: {e}")
    return {"markdown": md, "goal_line": goal["line"]}


def goal_check(s: dict) -> dict[str, Any]:
    if "full_retrain" not in s or "stale" not in s or "als" not in s:
        return partial_goal_check(s)
    g = lambda name, key: s[name][key]  # noqa: E731
    inc, full = g("incremental", "mean_ndcg10"), g("full_retrain", "mean_ndcg10")
    if inc is None or full is None:
        return {"line": "goal: no nights scored yet", "met": False}
    best = max(BASELINES, key=lambda b: g(b, "mean_ndcg10") or 0.0)
    checks = {
        "ndcg_vs_full_retrain": inc >= full * 0.98,
        "ndcg_above_stale": inc > (g("stale", "mean_ndcg10") or 0.0),
        f"ndcg_1.10x_best_baseline_{best}": inc >= 1.10 * g(best, "mean_ndcg10"),
        **{f"ndcg_above_{b}": inc > g(b, "mean_ndcg10") for b in BASELINES},
        "seconds_at_most_20pct_of_full": g("incremental", "mean_seconds") <= 0.2 * g("full_retrain", "mean_seconds"),
    }
    ratio = g("incremental", "mean_seconds") / g("full_retrain", "mean_seconds")
    line = (f"goal {'MET' if all(checks.values()) else 'NOT MET'}: incremental NDCG@10 {inc:.4f} vs full retrain "
            f"{full:.4f} ({(inc / full - 1) * 100:+.1f}%), stale {g('stale', 'mean_ndcg10'):.4f}, "
            + ", ".join(f"{b} {g(b, 'mean_ndcg10'):.4f}" for b in BASELINES)
            + f" (best {best}: incremental/best = {inc / g(best, 'mean_ndcg10'):.3f}); "
            f"time {ratio:.0%} of full retrain's; "
            + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in checks.items()))
    return {"line": line, "met": all(checks.values()), "checks": checks, "time_ratio": round(ratio, 4)}


def partial_goal_check(s: dict) -> dict[str, Any]:
    """The goals an ablation run (``--strategies`` without every strategy) can check."""
    inc = s["incremental"]["mean_ndcg10"]
    if inc is None:
        return {"line": "goal: no nights scored yet", "met": False}
    scored = [b for b in BASELINES if b in s]
    best = max(scored, key=lambda b: s[b]["mean_ndcg10"] or 0.0)
    checks = {f"ndcg_1.10x_best_baseline_{best}": inc >= 1.10 * s[best]["mean_ndcg10"],
              **({"ndcg_above_stale": inc > (s["stale"]["mean_ndcg10"] or 0.0)} if "stale" in s else {}),
              **{f"ndcg_above_{b}": inc > s[b]["mean_ndcg10"] for b in scored}}
    line = (f"goals checked (ablation: {', '.join(s)}): incremental NDCG@10 {inc:.4f}; "
            + ", ".join(f"{b} {s[b]['mean_ndcg10']:.4f}" for b in s if b != "incremental")
            + f" (best baseline {best}: incremental/best = {inc / s[best]['mean_ndcg10']:.3f}); "
            + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in checks.items()))
    return {"line": line, "met": all(checks.values()), "checks": checks}


def _f(v, fmt=".4f"):
    return "-" if v is None else format(v, fmt)


def markdown(doc: dict) -> str:
    s = doc["strategies"]
    k = doc["k"]
    lines = [f"### Nightly quality and cost ({doc['data']}; {len(s['incremental']['nights'])} nights"
             f"{', PARTIAL' if doc['partial'] else ''}; total {doc['total_seconds'] / 60:.1f} min)", "",
             f"Means over nights (NDCG@{k} / HR@{k} over the catalogue, AUC vs {doc['auc_negatives_per_purchase']} "
             "sampled negatives per purchase; seconds per night). Memory: the highest peak resident set over the "
             "nights of each process during the strategy's step, the same measure for every strategy: the driver "
             "(this Python process, where the local backend trains and the count baselines count; it includes "
             "what the driver already holds), the Spark JVM (the delta job; ALS's fit) and training workers "
             "(other backends).", "",
             f"| strategy | NDCG@{k} | HR@{k} | AUC | GAUC | seconds | examples | driver MB | JVM MB | workers MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    shown = [x for x in STRATEGIES if x in s]
    for name in shown:
        m = s[name]
        lines.append(f"| {name} | {_f(m['mean_ndcg10'])} | {_f(m['mean_hr10'])} | {_f(m['mean_auc'])} | "
                     f"{_f(m['mean_gauc'])} | {_f(m['mean_seconds'], '.1f')} | {_f(m['mean_examples'], ',.0f')} | "
                     f"{_f(m['max_driver_peak_mb'], '.0f')} | {_f(m['max_jvm_peak_mb'], '.0f')} | "
                     f"{_f(m['max_workers_peak_mb'], '.0f')} |")
    for name in ("incremental", "full_retrain"):
        ph = s[name].get("mean_phases") if name in s else None
        if ph:
            lines += ["", f"Where a {name} night's seconds go (means): "
                      + ", ".join(f"{p} {_f(v, '.1f')}" for p, v in ph.items())]
    lines += ["", f"Per night: NDCG@{k} / seconds", "",
              "| night | trained on | scored on | users | " + " | ".join(shown) + " |",
              "|---|---|---|---|" + "---|" * len(shown)]
    for j, n in enumerate(s["incremental"]["nights"]):
        cells = [f"{_f(s[x]['nights'][j]['ndcg10'])} / {_f(s[x]['nights'][j]['seconds'], '.0f')}" for x in shown]
        lines.append(f"| {n['night']} | {n['trained_on']} | {n['scored_on']} | {n['users']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(path: Path, doc: dict) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    s = doc["strategies"]
    fig = Figure(figsize=(13, 8))
    axes = fig.subplots(2, 2)
    k = doc["k"]
    for ax, key, title in ((axes[0, 0], "ndcg10", f"next-day NDCG@{k}"), (axes[0, 1], "hr10", f"next-day HR@{k}"),
                           (axes[1, 0], "auc", "next-day AUC (sampled negatives)"),
                           (axes[1, 1], "seconds", "wall seconds per night (log)")):
        for name in [x for x in STRATEGIES if x in s]:
            pts = [(n["night"], n.get(key)) for n in s[name]["nights"] if n.get(key)]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", ms=3, label=LABELS[name], color=COLOURS[name])
        ax.set_title(title)
        ax.set_xlabel("night")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    axes[1, 1].set_yscale("log")
    axes[0, 0].legend(fontsize="small")
    fig.suptitle(f"deltarec nightly benchmark: {Path(doc['data'].split('(')[0].strip()).name}, "
                 f"{len(s['incremental']['nights'])} nights, backend {doc['backend']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
