"""Does a night after 300 nights of small commits cost what a night after 10
does, with ``maintain`` on its schedule? (#20: <= 1.1x, file counts shown.)

For each night count (10 and 300 by default) a fresh lake gets that many
nights' worth of small commits, then one more night's events, and the delta
job's ``prepare_night`` over that night is timed on every lake side by side
(in rounds, the order reversed each round, like ``delta_scaling.py``).

How the lakes are made (a real ``run_nightly`` per night would take ~10 s x 300):

- Night 0 is real: a seed of events (one commit) consumed by the real
  ``prepare_night`` (event index, user_state, item_stats, quarantine, the
  run's training_examples partition), and a ledger row through ``Ledger.commit``.
- Nights 1..N-1 are synthesised in Arrow, but through the project's own
  LakeEngine / Ledger / metrics calls with the same arguments a night uses:
  the source events table gets one commit of ``--rows-per-night`` events;
  ``event_index`` the night's rows (``replaceWhere`` on the night's source
  version); ``user_state`` and ``item_stats`` one MERGE each of the night's
  users and items (counts, last_seen, history and source_version moved on,
  with the commit metadata the delta job writes); ``quarantine_events`` one
  row (``replaceWhere`` on the run id, reason ``synthetic``); a
  ``training_examples`` partition per run (night 0's real example rows
  relabelled, five per event, one file where the executors may write a few);
  the run's ledger row (``Ledger.commit``, status candidate, no checkpoint)
  and its prequential and gate rows (``store_metrics``). Not synthesised: the
  registry's audit rows (written on promotions only) and the recommendations
  table (rewritten whole at each refresh: its current version does not grow).
  Synthetic nights draw users and items from those night 0 saw (their state
  rows exist to be moved on).
- After each committed night the real schedule runs: ``maybe_maintain`` with
  ``maintain.every_nights`` (``--every``, 7 by default) on the lakes that have
  it, with the default retention (168 h: VACUUM frees nothing this young, so
  the figures are the current versions' files, which is what a read lists).

Lakes timed: ``<n>n+sched`` (every count, maintain on its schedule),
``<max>n`` (the largest count without maintain) and ``<max>n+once`` (a copy of
that one, maintained once just before the timed night). The timed night is
the same rows on every lake (same seed: its users, items, 1% cancellations);
its first run is round 1, later rounds rerun it (idempotent). Reported per
lake: seconds (first run, reruns), CPU seconds, Spark jobs and seconds per
stage, and files and bytes of every deltarec table and the source table
before the timed night. Prints a table and, as the last line,
``ratio_300_10=<float>``: the largest count's scheduled lake over the
smallest's, fastest runs (first runs' ratio printed too).

Only ``prepare_night`` is timed, not the whole ``run_nightly``: the synthetic
ledger rows have no checkpoints to train from, and the delta job is what reads
the tables that grow.

    .venv/bin/python benchmarks/lake_upkeep.py            # 10 and 300 nights of 500 events
    .venv/bin/python benchmarks/lake_upkeep.py --quick    # 10 and 60 nights of 200 events
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
import pyarrow.compute as pc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from delta_scaling import cpu_seconds, events  # noqa: E402  (the same event generator and CPU clock)

DAY = 86400.0
MODEL_EVENTS_PER_NIGHT = 5  # an event example and four negatives (features.negatives=4)


def config(base: list[str], root: Path, every: int):
    from deltarec.config import load_config

    return load_config(ROOT / "conf" / "local.yaml", base + [f"lake.root={root}", f"maintain.every_nights={every}"],
                       environ={})


def commit_run(cfg, lake, ledger, run_id: str, version: int, when: dt.datetime) -> None:
    """The run's ledger row and its prequential and gate metrics rows, as a
    committed night leaves them (no checkpoint: nothing trains here)."""
    from deltarec.evaluation.prequential import store_metrics
    from deltarec.lake.ledger import CANDIDATE, RunRecord

    ledger.commit(RunRecord(run_id=run_id, model=cfg.model.name, source_table=cfg.lake.events_table,
                            source_first=version, source_last=version, checkpoint_path="", checkpoint_sha256="",
                            checkpoint_files={}, config={}, code_version="lake_upkeep",
                            metrics={"synthetic": True}, started_at=when, status=CANDIDATE))
    for phase, roles in (("prequential", ("champion", "popularity")), ("gate", ("champion", "candidate"))):
        rows = [{"run_id": run_id, "model": cfg.model.name, "source_first": version, "source_last": version,
                 "phase": phase, "role": role, "model_run_id": None, "metric": metric, "value": 0.1, "n": 100,
                 "computed_at": when} for role in roles for metric in ("ndcg@10", "hr@10", "auc")]
        store_metrics(lake, cfg.lake.metrics_table, run_id, phase, rows)


def known_events(n: int, start: int, users: np.ndarray, items: np.ndarray, t0: dt.datetime, rng) -> pa.Table:
    """Purchases of users and items that already have state rows (zipf-skewed)."""
    from deltarec.lake import schemas

    u = users[rng.zipf(1.3, n) % len(users)]
    i = items[rng.zipf(1.2, n) % len(items)]
    t = np.sort(rng.uniform(0, DAY, n))
    return pa.table({
        "event_id": pa.array([f"e{k}" for k in range(start, start + n)], pa.string()),
        "user_id": pa.array(u.tolist(), pa.string()),
        "item_id": pa.array(i.tolist(), pa.string()),
        "event_time": pa.array([t0 + dt.timedelta(seconds=float(s)) for s in t], schemas.TS),
        "event_type": pa.array(["purchase"] * n, pa.string()),
        "order_id": pa.array([f"o{k // 4}" for k in range(start, start + n)], pa.string()),
        "quantity": pa.array(rng.integers(1, 5, n), pa.int64()),
        "price": pa.array(rng.uniform(0.5, 20, n).round(2), pa.float64()),
        "rating": pa.nulls(n, pa.float64()),
    }, schema=schemas.BEHAVIOR_EVENTS)


def synthetic_night(cfg, lake, ledger, k: int, ev: pa.Table, example_rows: pa.Table, rng) -> None:
    """Night ``k``'s writes, through the calls the delta job and the commit make."""
    from deltarec.lake import schemas
    from deltarec.pipeline.delta_job import STATE_UPDATE_IF

    lk = cfg.lake
    v = lake.write(lk.events_table, ev, schema=schemas.BEHAVIOR_EVENTS)
    run_id = f"night{k:04d}"
    meta = {"run_id": run_id, "source_first": str(v), "source_last": str(v)}
    n = ev.num_rows
    quarantined = pa.table({"run_id": [run_id], "reason": ["synthetic"], "source_version": [v],
                            "change_type": ["insert"], **{c: ev[c][:1] for c in schemas.BEHAVIOR_EVENTS.names},
                            "detail": ["lake_upkeep's synthetic night"]}, schema=schemas.QUARANTINE_EVENTS)
    lake.write(lk.quarantine_table, quarantined, mode="overwrite", replace_where=f"run_id = '{run_id}'",
               schema=schemas.QUARANTINE_EVENTS)
    index = pa.table({"event_id": ev["event_id"], "user_id": ev["user_id"], "item_id": ev["item_id"],
                      "event_type": ev["event_type"], "event_time": ev["event_time"], "rating": ev["rating"],
                      "trained": pa.array([True] * n), "source_version": pa.array([v] * n, pa.int64())},
                     schema=schemas.EVENT_INDEX)
    lake.write(lk.event_index_table, index, mode="overwrite",
               replace_where=f"source_version >= {v} AND source_version <= {v}", schema=schemas.EVENT_INDEX)
    last_seen = pc.max(ev["event_time"])
    hist_len = cfg.features.history_length
    # user_state: each of tonight's users moved on (events, history, last_seen, source_version)
    users = lake.read_arrow(lk.user_state_table, filters=[("user_id", "in", pc.unique(ev["user_id"]).to_pylist())])
    item_idx = dict(zip(*lake.read_arrow(lk.item_stats_table).select(["item_id", "item_idx"]).to_pydict().values()))
    bought: dict[str, list[str]] = {}
    for u, i in zip(ev["user_id"].to_pylist(), ev["item_id"].to_pylist()):
        bought.setdefault(u, []).append(i)
    rows = users.to_pylist()
    for r in rows:
        new = bought[r["user_id"]]
        r["history_ids"] = (list(r["history_ids"] or []) + new)[-hist_len:]
        r["history_idx"] = [item_idx.get(i, -1) for i in r["history_ids"]]
        r["events"] += len(new)
        r["last_seen"] = last_seen.as_py()
        r["source_version"] = v
    lake.merge(lk.user_state_table, pa.Table.from_pylist(rows, schema=schemas.USER_STATE), ["user_id"], update=True,
               commit_metadata=meta, update_if=STATE_UPDATE_IF)
    counts = {r["values"]: r["counts"] for r in pc.value_counts(ev["item_id"]).to_pylist()}
    items = lake.read_arrow(lk.item_stats_table, filters=[("item_id", "in", list(counts))]).to_pylist()
    for r in items:
        r["popularity"] += counts[r["item_id"]]
        r["last_seen"] = last_seen.as_py()
        r["source_version"] = v
    lake.merge(lk.item_stats_table, pa.Table.from_pylist(items, schema=schemas.ITEM_STATS), ["item_id"], update=True,
               commit_metadata=meta, update_if=STATE_UPDATE_IF)
    take = rng.integers(0, example_rows.num_rows, n * MODEL_EVENTS_PER_NIGHT)
    examples = example_rows.take(pa.array(take)).set_column(0, "run_id", pa.array([run_id] * len(take), pa.string()))
    lake.write(lk.examples_table, examples, mode="append", partition_by=["run_id"], schema=schemas.TRAINING_EXAMPLES)
    commit_run(cfg, lake, ledger, run_id, v, dt.datetime.now(dt.timezone.utc))


def build(spark, base, name: str, nights: int, every: int, rows: int, users: int, items: int,
          workdir: Path) -> dict:
    """A lake after ``nights`` nights (night 0 real, the rest synthetic), with
    the timed night's events appended, not yet consumed."""
    from deltarec.lake import open_lake, schemas
    from deltarec.lake.ledger import Ledger
    from deltarec.maintain import maybe_maintain
    from deltarec.pipeline import delta_job as J

    root = workdir / name
    shutil.rmtree(root, ignore_errors=True)
    cfg = config(base, root, every)
    lake = open_lake(cfg.lake, spark)
    ledger = Ledger(lake, cfg.lake.runs_table)
    rng = np.random.default_rng(nights)
    now = dt.datetime.now(dt.timezone.utc)
    t = time.perf_counter()
    seed = max(rows * 4, users * 4)  # night 0 meets most of the audience
    lake.write(cfg.lake.events_table, events(seed, 0, users, items, now - dt.timedelta(days=nights + 1), DAY, rng),
               enable_cdf=True, schema=schemas.BEHAVIOR_EVENTS)
    t0 = time.perf_counter()
    J.prepare_night(spark, cfg, lake, 0, 0, "night0000")
    real_night_s = time.perf_counter() - t0
    commit_run(cfg, lake, ledger, "night0000", 0, now)
    known_users = np.array(sorted(lake.read_arrow(cfg.lake.user_state_table)["user_id"].to_pylist()))
    known_items = np.array(sorted(lake.read_arrow(cfg.lake.item_stats_table)["item_id"].to_pylist()))
    example_rows = lake.read_arrow(cfg.lake.examples_table, filters=[("run_id", "=", "night0000")]) \
        .select(schemas.TRAINING_EXAMPLES.names).cast(schemas.TRAINING_EXAMPLES)
    maintains, maintain_s = 0, 0.0
    for k in range(1, nights):
        ev = known_events(rows, seed + (k - 1) * rows, known_users, known_items,
                          now - dt.timedelta(days=nights + 1 - k), rng)
        synthetic_night(cfg, lake, ledger, k, ev, example_rows, rng)
        tm = time.perf_counter()
        if maybe_maintain(cfg, lake, ledger) is not None:
            maintains += 1
            maintain_s += time.perf_counter() - tm
    build_s = time.perf_counter() - t
    # the timed night: the same rows on every lake (its own seed), 1% cancellations, some new users and items
    night = events(rows, 10**8, users, items, now - dt.timedelta(hours=23), DAY - 3600, np.random.default_rng(7), 0.01)
    first = lake.write(cfg.lake.events_table, night, schema=schemas.BEHAVIOR_EVENTS)
    print(json.dumps({"lake": name, "nights": nights, "every": every, "build_s": round(build_s, 1),
                      "real_night0_s": round(real_night_s, 1), "maintains": maintains,
                      "maintain_s": round(maintain_s, 1)}), flush=True)
    return {"lake": name, "nights": nights, "maintain": f"every {every} nights" if every else "never",
            "build_s": round(build_s, 1), "real_night0_s": round(real_night_s, 1), "maintains": maintains,
            "maintain_s": round(maintain_s, 1), "_night": (cfg, lake, first, first), "_runs": []}


def copy(spark, base, row: dict, workdir: Path, name: str) -> dict:
    """A copy of ``row``'s lake (its timed night not yet consumed)."""
    from deltarec.lake import open_lake

    cfg, _, first, last = row["_night"]
    root = workdir / name
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(cfg.lake.root, root)
    cfg = config(base, root, 0)
    return {**{k: v for k, v in row.items() if not k.startswith("_")}, "lake": name,
            "_night": (cfg, open_lake(cfg.lake, spark), first, last), "_runs": []}


def maintained_copy(spark, base, row: dict, workdir: Path) -> dict:
    """A copy of ``row``'s lake, maintained once just before its timed night."""
    from deltarec.maintain import maintain

    out = copy(spark, base, row, workdir, row["lake"] + "+once")
    cfg, lake, first, last = out["_night"]
    t = time.perf_counter()
    maintain(cfg, lake)
    s = time.perf_counter() - t
    return {**out, "maintain": "once, before the timed night", "maintains": 1, "maintain_s": round(s, 1)}


def sizes(row: dict) -> dict:
    from deltarec.maintain import owned_tables, table_sizes

    cfg, lake, _, _ = row["_night"]
    return table_sizes(lake, [cfg.lake.events_table, *owned_tables(cfg)])


def time_night(spark, row) -> None:
    from deltarec.pipeline import delta_job as J

    cfg, lake, first, last = row["_night"]
    c, t = cpu_seconds(spark), time.perf_counter()
    res = J.prepare_night(spark, cfg, lake, first, last, "timed")
    row["_runs"].append({"s": round(time.perf_counter() - t, 2), "cpu_s": round(cpu_seconds(spark) - c, 2),
                         "load1": os.getloadavg()[0], "stages": res.stats["stage_seconds"],
                         "jobs": res.stats["stage_spark_jobs"]})
    row.update(night_rows=res.consumed, examples=res.examples)


def summary(row) -> dict:
    runs = row["_runs"]
    best = min(runs, key=lambda r: r["s"])
    out = {k: v for k, v in row.items() if not k.startswith("_")}
    out.update(first_s=runs[0]["s"], best_s=best["s"], night_s_all=[r["s"] for r in runs],
               cpu_s_all=[r["cpu_s"] for r in runs], load1_all=[round(r["load1"], 1) for r in runs],
               stage_s_first=runs[0]["stages"], stage_s_best=best["stages"], stage_spark_jobs=runs[0]["jobs"])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nights", default="10,300", help="night counts of history (the ratio: largest over smallest)")
    ap.add_argument("--rows-per-night", type=int, default=500, help="events in each night (and the timed one)")
    ap.add_argument("--every", type=int, default=7, help="maintain.every_nights on the scheduled lakes")
    ap.add_argument("--repeat", type=int, default=3, help="rounds: the first run, then reruns (fastest counts)")
    ap.add_argument("--quick", action="store_true", help="10 and 60 nights of 200 events, 2 rounds")
    ap.add_argument("--workdir", default=None, help="where the lakes go (default: a temp dir, removed after)")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args(argv)
    if args.quick:
        args.nights, args.rows_per_night, args.repeat = "10,60", 200, 2
    counts = sorted(int(n) for n in args.nights.split(","))
    rows_per_night = args.rows_per_night
    users, items = 1000, 300
    load_start = os.getloadavg()

    from deltarec.config import load_config
    from deltarec.spark import build_spark

    base = ["lake.engine=delta-rs", "demo.enabled=false", "validation.max_quarantine_fraction=1.0",
            "features.negatives=4", "spark.conf={spark.ui.showConsoleProgress: 'false'}"]
    spark = build_spark(load_config(ROOT / "conf" / "local.yaml", base, environ={}))
    spark.sparkContext.setLogLevel("ERROR")
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="lake_upkeep_"))
    lakes = []
    try:
        for n in counts:
            lakes.append(build(spark, base, f"{n}n+sched", n, args.every, rows_per_night, users, items, workdir))
        big = build(spark, base, f"{counts[-1]}n", counts[-1], 0, rows_per_night, users, items, workdir)
        lakes += [big, maintained_copy(spark, base, big, workdir)]
        warm = copy(spark, base, lakes[0], workdir, "warm-up")  # the timed night's code paths, once, untimed
        time_night(spark, warm)
        print(json.dumps({"warm_up_night_s": warm["_runs"][0]["s"]}), flush=True)
        for row in lakes:
            row["tables"] = sizes(row)
            print(json.dumps({"lake": row["lake"], "tables": row["tables"]}), flush=True)
        for k in range(args.repeat):  # alternating order: load that comes and goes weighs on all alike
            for row in (lakes if k % 2 == 0 else lakes[::-1]):
                time_night(spark, row)
                print(json.dumps({"lake": row["lake"], **row["_runs"][-1]}), flush=True)
        rows = [summary(r) for r in lakes]
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    load_end = os.getloadavg()
    print(f"\nnights of {rows_per_night} events; {users} users, {items} items; timed: prepare_night of one more "
          f"night; load average {load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end")
    print("| lake | maintain | first run s | all runs s | CPU s | Spark jobs | slowest stages (first run) |")
    print("|---|---|---:|---|---|---:|---|")
    for r in rows:
        top = sorted(r["stage_s_first"].items(), key=lambda kv: -kv[1])[:3]
        print(f"| {r['lake']} | {r['maintain']} ({r['maintains']}x, {r['maintain_s']} s) | {r['first_s']:.2f} | "
              f"{', '.join(map(str, r['night_s_all']))} | {', '.join(map(str, r['cpu_s_all']))} | "
              f"{sum(r['stage_spark_jobs'].values())} | {', '.join(f'{s} {v:.2f}' for s, v in top)} |")
    tables = list(rows[0]["tables"])
    print("\nfiles (MB) of each table's current version before the timed night")
    print("| table | " + " | ".join(r["lake"] for r in rows) + " |")
    print("|---|" + "---:|" * len(rows))
    for t in tables:
        cells = [f"{r['tables'][t]['files']} ({r['tables'][t]['bytes'] / 1e6:.2f})" if t in r["tables"] else "–"
                 for r in rows]
        print(f"| {t} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "load_start": load_start, "load_end": load_end},
                                              indent=2, default=str))
    by = {r["lake"]: r for r in rows}
    lo, hi = by[f"{counts[0]}n+sched"], by[f"{counts[-1]}n+sched"]
    raw = by[f"{counts[-1]}n"]
    print(f"ratio_{counts[-1]}_{counts[0]}_first={hi['first_s'] / lo['first_s']:.3f}  (first runs)")
    print(f"ratio_{counts[-1]}_{counts[0]}_no_maintain={raw['best_s'] / lo['best_s']:.3f}  (fastest runs)")
    print(f"ratio_{counts[-1]}_{counts[0]}_once={by[raw['lake'] + '+once']['best_s'] / lo['best_s']:.3f}  "
          "(maintained once before the night; fastest runs)")
    print(f"ratio_{counts[-1]}_{counts[0]}_cpu={min(hi['cpu_s_all']) / min(lo['cpu_s_all']):.3f}  "
          "(least CPU seconds, Python + Spark's JVM: less sensitive to the machine's load)")
    print(f"ratio_{counts[-1]}_{counts[0]}={hi['best_s'] / lo['best_s']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
