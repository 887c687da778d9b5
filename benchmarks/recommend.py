"""Recommendations for every customer with history: the distributed refresh
(Spark tasks, each loading the champion from the lake and writing its Parquet
part, one Delta commit) against the same scoring in one process from tensors
already in memory, side by side in one run.

    .venv/bin/python benchmarks/recommend.py [--set lake.root=./lake] [--repeat 2]
        [--standalone 2]          # also on a loopback standalone cluster with 2 one-core workers

Needs a lake after the demo (command 1). Writes ``bench_recommendations`` (not
the served table). Prints seconds, users/s per executor core and the ratio of
the refresh's per-core rate to the in-process one (goal >= 0.8), checks that
both give the same top-k for every user, and writes
benchmarks/results/recommend.json. A second reference, the "parallel
ceiling", runs as many plain processes as the refresh has cores, each scoring
its share from tensors in memory: on a shared machine N processes rarely get N
times one, and that ceiling says what the cores gave at that moment. The first refresh also starts the Python
workers (and imports torch in them): it is reported separately as ``cold``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

from deltarec.config import load_config  # noqa: E402

TABLE = "bench_recommendations"


def in_process(cfg, lake, champ, part: int = 0, parts: int = 1, barrier: str | None = None) -> dict:
    """The same scoring (catalogue, histories, top_items) in this process, one
    thread, on tensors built beforehand; only the Spark job, the checkpoint
    load per task, the Parquet write and the commit are missing. ``part`` of
    ``parts``: every parts-th user (the parallel ceiling's workers), started
    together once every worker has touched ``barrier``."""
    import torch

    from deltarec.pipeline.recommend import hashing
    from deltarec.serving.catalog import catalog_from_item_stats
    from deltarec.serving.ids import bucket
    from deltarec.train.checkpoint import load_model
    from deltarec.serving.scorer import excluded, parse_exclude, top_items

    torch.set_num_threads(1)
    ub, ib, salt = hashing(cfg, champ)
    catalog, every = catalog_from_item_stats(lake.read_arrow(cfg.lake.item_stats_table), cfg.recommend.catalog_days, ib)
    state = lake.read_arrow(cfg.lake.user_state_table).to_pylist()
    users = [r for r in state if r["history_ids"]][part::parts]
    uidx = [bucket(r["user_id"], ub, salt) for r in users]
    hist = [[every.get(i, bucket(i, ib)) for i in r["history_ids"]] for r in users]
    rule = parse_exclude(cfg.recommend.exclude)
    ban = [excluded(r["history_ids"], rule) for r in users]
    model = load_model(champ)
    top_items(model, catalog, uidx[:64], hist[:64], cfg.recommend.k, ban[:64])  # warm-up (allocator, lazy init)
    if barrier:
        Path(f"{barrier}.{part}").touch()
        while not all(Path(f"{barrier}.{p}").exists() for p in range(parts)):
            time.sleep(0.01)
    t = time.perf_counter()
    top = top_items(model, catalog, uidx, hist, cfg.recommend.k, ban, cfg.recommend.block_pairs)
    seconds = time.perf_counter() - t
    return {"users": len(users), "seconds": round(seconds, 3), "users_per_s_per_core": round(len(users) / seconds, 1),
            "catalog_items": len(catalog), "top": {r["user_id"]: [i for i, _ in t] for r, t in zip(users, top)}}


def parallel_ceiling(args, cores: int) -> dict:
    """``cores`` plain processes, each scoring every cores-th user as
    :func:`in_process` does, started together: what this machine's cores give
    right now with no Spark at all (on a shared machine, less than cores x one)."""
    import tempfile

    barrier = os.path.join(tempfile.mkdtemp(), "go")
    cmd = [sys.executable, __file__, "--conf", args.conf, *sum((["--set", o] for o in args.overrides), [])]
    procs = [subprocess.Popen([*cmd, "--worker", f"{i}/{cores}", "--barrier", barrier], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "lib")}) for i in range(cores)]
    outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    seconds = max(o["seconds"] for o in outs)
    users = sum(o["users"] for o in outs)
    return {"processes": cores, "users": users, "seconds": round(seconds, 3),
            "users_per_s_per_core": round(users / seconds / cores, 1)}


def executor_cores(spark) -> int:
    """Cores that run tasks: N of local[N], else the executors' cores as the
    driver's status store reports them (through py4j: a benchmark may)."""
    import re

    sc = spark.sparkContext
    m = re.fullmatch(r"local(?:\[(\d+|\*)(?:,\d+)?\])?", sc.master)
    if m:
        return (os.cpu_count() or 1) if m.group(1) == "*" else int(m.group(1) or 1)
    infos = sc._jsc.sc().statusStore().executorList(True)
    return sum(infos.apply(i).totalCores() for i in range(infos.size()) if infos.apply(i).id() != "driver")


def refresh(spark, cfg, lake, label: str) -> dict:
    from deltarec.pipeline.recommend import refresh_recommendations

    cores = executor_cores(spark)
    t = time.perf_counter()
    out = refresh_recommendations(spark, cfg, lake, reason=f"benchmark {label}", by="benchmark")
    seconds = time.perf_counter() - t
    return {"label": label, "seconds": round(seconds, 3), "users": out["users"], "parts": out["parts"],
            "cores": cores, "version": out["version"], "phases": out["phases"],
            "users_per_s_per_core": round(out["users"] / seconds / cores, 1)}


def compare(lake, version: int, top: dict) -> int:
    """Users whose table list differs from the in-process one (beyond score ties)."""
    t = lake.read_arrow(TABLE, version).sort_by([("user_id", "ascending"), ("rank", "ascending")])
    got: dict = {}
    for u, i in zip(t["user_id"].to_pylist(), t["item_id"].to_pylist()):
        if u is not None:
            got.setdefault(u, []).append(i)
    return sum(1 for u, items in top.items() if got.get(u) != items and set(got.get(u, [])) != set(items))


def standalone(workers: int):
    """A loopback standalone cluster (master + one-core workers), stopped by PID afterwards."""
    import pyspark

    home = os.path.dirname(pyspark.__file__)
    env = {**os.environ, "SPARK_HOME": home}
    cls = os.path.join(home, "bin", "spark-class")
    procs = [subprocess.Popen([cls, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", "7177",
                               "--webui-port", "8180"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    time.sleep(8)
    for _ in range(workers):
        procs.append(subprocess.Popen([cls, "org.apache.spark.deploy.worker.Worker", "spark://127.0.0.1:7177",
                                       "--host", "127.0.0.1", "--cores", "1", "--memory", "2g", "--webui-port", "0"],
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(8)
    return procs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conf", default=str(ROOT / "conf" / "local.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--repeat", type=int, default=2, help="warm refreshes after the cold one")
    ap.add_argument("--standalone", type=int, default=0, metavar="N",
                    help="run the refresh on a loopback standalone cluster of N one-core workers instead")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # i/n: one process of the parallel ceiling
    ap.add_argument("--barrier", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        from deltarec.lake import open_lake
        from deltarec.lake.ledger import Ledger

        cfg = load_config(args.conf, args.overrides)
        lake = open_lake(cfg.lake)
        part, parts = (int(x) for x in args.worker.split("/"))
        out = in_process(cfg, lake, Ledger(lake, cfg.lake.runs_table).champion(cfg.model.name), part, parts,
                         args.barrier)
        print(json.dumps({k: v for k, v in out.items() if k != "top"}))
        return 0
    overrides = [f"recommend.table={TABLE}", *args.overrides]
    procs = standalone(args.standalone) if args.standalone else []
    if procs:
        overrides.append("spark.master=spark://127.0.0.1:7177")
    cfg = load_config(args.conf, overrides)
    from deltarec.lake import open_lake
    from deltarec.lake.ledger import Ledger
    from deltarec.spark import build_spark

    load_before = os.getloadavg()
    try:
        spark = build_spark(cfg)
        lake = open_lake(cfg.lake, spark)
        champ = Ledger(lake, cfg.lake.runs_table).champion(cfg.model.name)
        if champ is None:
            print(f"no champion in {lake.root}: run the demo first (./spark-submit.sh jobs/nightly.py)",
                  file=sys.stderr)
            return 1
        base = in_process(cfg, lake, champ)
        runs = [refresh(spark, cfg, lake, "cold")] + [refresh(spark, cfg, lake, f"warm{i + 1}")
                                                       for i in range(args.repeat)]
        warm = min(runs[1:] or runs, key=lambda r: r["seconds"])
        mismatches = compare(lake, warm["version"], base["top"])
        base_again = in_process(cfg, lake, champ)  # the other side of the sandwich: the load moved meanwhile
        ceiling = parallel_ceiling(args, warm["cores"])
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(30)
    inproc = max(base["users_per_s_per_core"], base_again["users_per_s_per_core"])
    result = {
        "lake": str(lake.root), "champion": champ.run_id, "master": cfg.spark.master,
        "in_process": {k: v for k, v in base.items() if k != "top"},
        "in_process_again": {k: v for k, v in base_again.items() if k != "top"},
        "parallel_ceiling": ceiling,
        "ratio_to_parallel_ceiling": round(warm["users_per_s_per_core"] / ceiling["users_per_s_per_core"], 3),
        "refreshes": runs, "warm": warm, "ratio_per_core": round(warm["users_per_s_per_core"] / inproc, 3),
        "ratio_per_core_cold": round(runs[0]["users_per_s_per_core"] / inproc, 3),
        "users_with_different_lists": mismatches, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
    }
    print(f"{'':<18}{'seconds':>9}{'users':>8}{'cores':>6}{'users/s/core':>14}")
    print(f"{'in-process':<18}{base['seconds']:>9.2f}{base['users']:>8}{1:>6}{base['users_per_s_per_core']:>14.1f}")
    for r in runs:
        print(f"{'refresh ' + r['label']:<18}{r['seconds']:>9.2f}{r['users']:>8}{r['cores']:>6}"
              f"{r['users_per_s_per_core']:>14.1f}   " + ", ".join(f"{k} {v:.1f}s" for k, v in r["phases"].items()))
    print(f"{'parallel ceiling':<18}{ceiling['seconds']:>9.2f}{ceiling['users']:>8}{ceiling['processes']:>6}"
          f"{ceiling['users_per_s_per_core']:>14.1f}   ({ceiling['processes']} plain processes, no Spark)")
    print(f"in-process again {base_again['seconds']:.2f}s; users whose lists differ: {mismatches}; "
          f"load average before {load_before[0]:.1f}, after {result['loadavg_after'][0]:.1f}")
    print(f"refresh_to_in_process_per_core={result['ratio_per_core']}  (cold: {result['ratio_per_core_cold']}); "
          f"refresh_to_parallel_ceiling={result['ratio_to_parallel_ceiling']}")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    name = "recommend_standalone.json" if procs else "recommend.json"
    (out / name).write_text(json.dumps(result, indent=1, default=str))
    return 0 if mismatches == 0 else 1


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    os._exit(rc)  # deltalake + pyarrow can abort a finished interpreter at exit
