"""Does a night's Spark work follow the night, not the history?

For each history size (1x, 4x, 16x the night by default) this builds a fresh
lake: synthetic history events (one Delta commit per night-sized chunk),
consumed by one ``prepare_night`` (the first run: event index, user_state,
item_stats, training examples), then appends a fixed night — inserts with ~1%
cancellations, plus a commit of deletes and one of updates of history events
— and times the incremental ``prepare_night`` over the night's versions. Users
and items are the same for every size (the history grows, the audience does
not).

Like is compared with like. A night's *first* run is what production pays; a
*rerun* of the same range (idempotent, so a fair measurement too) is cheaper
(warm caches), so a 16x rerun against a 1x first run flatters the history.
Before any timed run, a throwaway 1x lake's night runs once, so no size's
first run pays the JVM's start-up alone. Then every size's night is timed in
``--repeat`` rounds (order reversed each round, so load that comes and goes
weighs on all sizes alike): round 1 is each size's first run, the later rounds
its reruns (the fastest counts). Wall and CPU seconds (Python + Spark's JVM),
the driver's Python peak memory above its start, Spark jobs and seconds per
stage go to the JSON rows. Prints a table and
``ratio_16x_1x_first=`` (first runs), ``ratio_16x_1x_rerun=`` (fastest reruns)
and, as the last line, ``ratio_16x_1x=<float>``: the first runs' ratio.
Several night sizes (``--night 50000,200000``) are each timed at every
history size (a larger night with a larger audience: users and items grow
with it); ``night_ratio_time=`` and ``driver_rss_ratio_night=`` compare the
largest night with the smallest at 1x history. The driver's figures: its
peak RSS (absolute), its peak above the night's start, and the bytes it read
and wrote (``/proc/self/io``: files and py4j's socket).

    .venv/bin/python benchmarks/delta_scaling.py            # night of 50k events
    .venv/bin/python benchmarks/delta_scaling.py --quick    # night of 5k events
    .venv/bin/python benchmarks/delta_scaling.py --night 50000,200000 --multiples 1
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))


def events(n: int, start: int, users: int, items: int, t0: dt.datetime, seconds: float, rng, cancel: float = 0.0):
    from deltarec.lake import schemas

    u = rng.zipf(1.3, n) % users
    i = rng.zipf(1.2, n) % items
    t = np.sort(rng.uniform(0, seconds, n))
    etype = np.where(rng.random(n) < cancel, "cancel", "purchase")
    qty = np.where(etype == "cancel", -1, rng.integers(1, 5, n))
    return pa.table({
        "event_id": pa.array([f"e{k}" for k in range(start, start + n)], pa.string()),
        "user_id": pa.array(np.char.add("u", u.astype(str)).astype(object), pa.string()),
        "item_id": pa.array(np.char.add("i", i.astype(str)).astype(object), pa.string()),
        "event_time": pa.array([t0 + dt.timedelta(seconds=float(s)) for s in t], schemas.TS),
        "event_type": pa.array(etype.astype(object), pa.string()),
        "order_id": pa.array([f"o{k // 4}" for k in range(start, start + n)], pa.string()),
        "quantity": pa.array(qty, pa.int64()),
        "price": pa.array(rng.uniform(0.5, 20, n).round(2), pa.float64()),
        "rating": pa.nulls(n, pa.float64()),
    }, schema=schemas.BEHAVIOR_EVENTS)


def build(spark, base_cfg_args, night: int, multiple: int, users: int, items: int, workdir: Path) -> dict:
    """A lake with ``multiple`` nights of history consumed by a first run, and
    the night (inserts, deletes, updates) appended, not yet consumed."""
    from deltalake import DeltaTable

    from deltarec.config import load_config
    from deltarec.lake import open_lake, schemas
    from deltarec.pipeline import delta_job as J

    root = workdir / f"lake_{night}_{multiple}x"
    shutil.rmtree(root, ignore_errors=True)
    cfg = load_config(ROOT / "conf" / "local.yaml", base_cfg_args + [f"lake.root={root}"], environ={})
    hist_cfg = load_config(ROOT / "conf" / "local.yaml", base_cfg_args + [f"lake.root={root}", "features.negatives=0"],
                           environ={})
    lake = open_lake(cfg.lake, spark)
    rng = np.random.default_rng(multiple)
    now = dt.datetime.now(dt.timezone.utc)
    day = 86400.0
    n_hist = night * multiple
    for k in range(multiple):  # one commit per night-sized chunk of history
        t0 = now - dt.timedelta(days=multiple + 1 - k)
        lake.write(cfg.lake.events_table, events(night, k * night, users, items, t0, day, rng, 0.005),
                   enable_cdf=True, schema=schemas.BEHAVIOR_EVENTS)
    t = time.perf_counter()
    J.prepare_night(spark, hist_cfg, lake, 0, multiple - 1, "history")
    build_s = time.perf_counter() - t
    # the night: inserts (1% cancellations), then deletes and updates of history events
    first = lake.write(cfg.lake.events_table, events(night, n_hist, users, items, now - dt.timedelta(days=1),
                                                     day - 3600, rng, 0.01), enable_cdf=True,
                       schema=schemas.BEHAVIOR_EVENTS)
    dtab = DeltaTable(lake.uri(cfg.lake.events_table))
    touch = max(1, night // 500)
    gone = rng.choice(n_hist, touch, replace=False)
    dtab.delete("event_id IN (" + ", ".join(f"'e{g}'" for g in gone) + ")")
    fixed = rng.choice(np.setdiff1d(np.arange(n_hist), gone), touch, replace=False)
    dtab.update(predicate="event_id IN (" + ", ".join(f"'e{g}'" for g in fixed) + ")", updates={"quantity": "7"})
    last = lake.version(cfg.lake.events_table)
    index_rows = lake.scan(J.EVENT_INDEX_TABLE, ["event_id"]).count()
    return {"night": night, "multiple": multiple, "history_events": n_hist, "index_rows": index_rows,
            "history_build_s": round(build_s, 1), "_night": (cfg, lake, first, last), "_runs": []}


def cpu_seconds(spark) -> float:
    """CPU seconds of this process and of Spark's JVM (local mode: the
    executors are its threads) — less sensitive than wall time to what else
    runs on the machine."""
    t = time.process_time()
    try:  # spark-submit execs the JVM, so the gateway's process is the JVM
        with open(f"/proc/{spark.sparkContext._gateway.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        t += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (AttributeError, OSError, IndexError, ValueError):
        return float("nan")
    return t


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def io_bytes() -> int:
    """Bytes this process read and wrote through system calls (files, sockets:
    py4j's too), from /proc/self/io; -1 where there is none."""
    try:
        with open("/proc/self/io") as f:
            io = dict(line.split(": ") for line in f.read().splitlines())
        return int(io["rchar"]) + int(io["wchar"])
    except (OSError, KeyError, ValueError):
        return -1


class DriverPeak:
    """The driver's Python process's peak resident memory (sampled every
    10 ms), absolute (``rss_mb``: Python, Arrow and delta-rs's Rust alike) and
    above what it held when the night started (``mb``: what the night's rows
    cost the driver), and the bytes it read and wrote meanwhile (``io_mb``).
    In local mode the JVM is the executors' too, so it is not counted."""

    def __enter__(self):
        import threading

        self.io = io_bytes()
        self.base = self.peak = rss_mb()
        self.t0 = time.perf_counter()
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._sample, daemon=True)
        self._t.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.01):
            rss = rss_mb()
            self.peak = max(self.peak, rss)
            self.samples.append((time.perf_counter() - self.t0, rss))

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_mb())
        self.mb = round(self.peak - self.base, 1)
        self.rss_mb = round(self.peak, 1)
        self.io_mb = round((io_bytes() - self.io) / 2**20, 1) if self.io >= 0 else None

    def by_stage(self, stage_seconds: dict[str, float]) -> dict[str, float]:
        """Peak RSS above the start within each stage (stages in order, from
        the night's start: where the driver's memory went)."""
        out, t = {}, 0.0
        for stage, s in stage_seconds.items():
            inside = [r for at, r in self.samples if t <= at < t + s]
            out[stage] = round(max(inside) - self.base, 1) if inside else None
            t += s
        return out


def time_night(spark, row) -> None:
    """One incremental run over the night (a rerun of the same range is
    idempotent, so every repetition is a fair measurement)."""
    from deltarec.pipeline import delta_job as J

    cfg, lake, first, last = row["_night"]
    c, t = cpu_seconds(spark), time.perf_counter()
    with DriverPeak() as driver:
        res = J.prepare_night(spark, cfg, lake, first, last, "night")
    row["_runs"].append({"s": time.perf_counter() - t, "cpu_s": cpu_seconds(spark) - c, "load1": os.getloadavg()[0],
                         "driver_peak_mb": driver.mb, "driver_rss_mb": driver.rss_mb, "driver_io_mb": driver.io_mb,
                         "driver_stage_mb": driver.by_stage(res.stats["stage_seconds"]),
                         "stages": res.stats["stage_seconds"], "jobs": res.stats["stage_spark_jobs"],
                         "adaptive_off": res.stats.get("adaptive_off")})
    row.update(night_rows=res.consumed, examples=res.examples, quarantined=res.quarantined)


def summary(row) -> dict:
    runs = row["_runs"]
    first, reruns = runs[0], runs[1:]
    best = min(reruns, key=lambda r: r["s"]) if reruns else None
    out = {k: v for k, v in row.items() if not k.startswith("_")}
    out.update(first_s=round(first["s"], 2), first_cpu_s=round(first["cpu_s"], 2),
               rerun_s=round(best["s"], 2) if best else None,
               rerun_cpu_s=round(min(r["cpu_s"] for r in reruns), 2) if reruns else None,
               night_s_all=[round(r["s"], 2) for r in runs], load1_all=[round(r["load1"], 1) for r in runs],
               driver_peak_mb=max((r["driver_peak_mb"] for r in runs if "driver_peak_mb" in r), default=None),
               driver_rss_mb=max(r["driver_rss_mb"] for r in runs), driver_io_mb=first["driver_io_mb"],
               stage_s=first["stages"], stage_spark_jobs=first["jobs"])
    return out


def ratio(rows, key: str) -> float:
    """16x history : 1x history, at the smallest night."""
    night = min(r["night"] for r in rows)
    by = {r["multiple"]: r[key] for r in rows if r["night"] == night}
    return by[16] / by[1] if by.get(1) and by.get(16) else float("nan")


def night_ratio(rows, key: str) -> float:
    """Largest night : smallest night, at 1x history."""
    by = {r["night"]: r[key] for r in rows if r["multiple"] == 1}
    return by[max(by)] / by[min(by)] if len(by) > 1 and by[min(by)] else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--night", default="50000",
                    help="events in the timed night; several (50000,200000): each at every history size")
    ap.add_argument("--multiples", default="1,4,16", help="history sizes, in nights (ratios need 1 and 16)")
    ap.add_argument("--quick", action="store_true", help="a 5k-event night")
    ap.add_argument("--repeat", type=int, default=2,
                    help="time each night this many times (in rounds): the first run, then reruns (the fastest counts)")
    ap.add_argument("--workdir", default=None, help="where the lakes go (default: a temp dir, removed after)")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every run (e.g. spark.adaptive_min_rows=0: adaptive execution on)")
    args = ap.parse_args(argv)
    nights = [5_000] if args.quick else [int(n) for n in args.night.split(",")]
    multiples = [int(m) for m in args.multiples.split(",")]

    def audience(night: int) -> tuple[int, int]:  # users, items: a larger night has a larger audience
        return max(1000, night // 5), max(500, night // 20)

    from deltarec.config import load_config
    from deltarec.spark import build_spark

    base = ["lake.engine=delta-rs", "demo.enabled=false", "validation.max_quarantine_fraction=1.0",
            "features.negatives=4", "spark.conf={spark.ui.showConsoleProgress: 'false'}", *args.set]
    spark = build_spark(load_config(ROOT / "conf" / "local.yaml", base, environ={}))
    spark.sparkContext.setLogLevel("ERROR")
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="delta_scaling_"))
    rows = []
    try:
        warm = build(spark, base, nights[0], 1, *audience(nights[0]), workdir / "warmup")  # JVM start-up, JIT: paid here
        time_night(spark, warm)
        print(json.dumps({"warm_up_night_s": round(warm["_runs"][0]["s"], 2)}), flush=True)
        for night in nights:
            for m in multiples:
                rows.append(build(spark, base, night, m, *audience(night), workdir))
        # Every size's nights are timed in rounds, the order reversed each round,
        # so a change in the machine's load over time weighs on all sizes alike.
        for k in range(args.repeat):
            for row in (rows if k % 2 == 0 else rows[::-1]):
                time_night(spark, row)
                print(json.dumps({"night": row["night"], "multiple": row["multiple"], **row["_runs"][-1]}),
                      flush=True)
        rows = [summary(r) for r in rows]
        for r in rows:
            print(json.dumps(r), flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nnights of {', '.join(f'{n} events ({audience(n)[0]} users, {audience(n)[1]} items)' for n in nights)}"
          f"; spark {spark.conf.get('spark.master')}")
    print("| night | history | history events | index rows | night rows | examples | first run s | reruns s | "
          "first run CPU s | Spark jobs | driver peak RSS MB | above start MB | driver I/O MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['night']} | {r['multiple']}x | {r['history_events']} | {r['index_rows']} | {r['night_rows']} | "
              f"{r['examples']} | {r['first_s']:.2f} | {', '.join(map(str, r['night_s_all'][1:])) or '–'} | "
              f"{r['first_cpu_s']:.1f} | {sum(r['stage_spark_jobs'].values())} | {r['driver_rss_mb']} | "
              f"{r['driver_peak_mb']} | {r['driver_io_mb']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    print(f"ratio_16x_1x_rerun={ratio(rows, 'rerun_s'):.3f}  (fastest reruns; "
          f"CPU {ratio(rows, 'rerun_cpu_s'):.3f})")
    print(f"ratio_16x_1x_first={ratio(rows, 'first_s'):.3f}  (first runs; CPU {ratio(rows, 'first_cpu_s'):.3f})")
    print(f"driver_peak_ratio_16x_1x={ratio(rows, 'driver_peak_mb'):.3f}  (the driver's Python, above its start; "
          f"peak RSS {ratio(rows, 'driver_rss_mb'):.3f})")
    print(f"night_ratio_time={night_ratio(rows, 'first_s'):.3f}  driver_rss_ratio_night={night_ratio(rows, 'driver_rss_mb'):.3f}"
          f"  driver_io_ratio_night={night_ratio(rows, 'driver_io_mb'):.3f}  (largest night : smallest, 1x history)")
    print(f"ratio_16x_1x={ratio(rows, 'first_s'):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
