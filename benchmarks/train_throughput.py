"""Training throughput: the real pipeline (Parquet → Arrow shard → tensors →
steps with averaged gradients) against a ceiling (the same training loop,
model and batches on tensors already in memory, one process), side by side.

    .venv/bin/python benchmarks/train_throughput.py [--quick] [--rows N]

Prints a table of examples/second for 1 and 2 workers on each backend and the
ceiling; the last line is ``pipeline_to_ceiling=<float>``: the per-worker
throughput of the 2-worker Horovod pipeline over the ceiling (the goal is
>= 0.8). Results also go to benchmarks/results/train_throughput.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)

from deltarec.train.backends import HorovodBackend, LocalBackend, TorchBackend  # noqa: E402
from deltarec.train.loop import TrainSpec, train_worker  # noqa: E402

PARAMS = {"user_buckets": 16384, "item_buckets": 8192, "embedding_dim": 32, "hidden": [64, 32]}


def make_data(n: int, path: Path) -> None:
    rng = np.random.default_rng(0)
    pq.write_table(pa.table({
        "user_idx": pa.array(rng.integers(0, PARAMS["user_buckets"], n), pa.int64()),
        "item_idx": pa.array(rng.integers(0, PARAMS["item_buckets"], n), pa.int64()),
        "label": pa.array((rng.random(n) < 0.2).astype(np.float32)),
        "weight": pa.array(np.ones(n, np.float32)),
    }), path, row_group_size=1 << 16)


def spec(path: Path, out: Path, batch: int) -> TrainSpec:
    return TrainSpec(run_id="bench", files=[str(path)], model_name="ranking", model_params=PARAMS,
                     optimizer="adam", lr=0.003, weight_decay=0.0, batch_size=batch, epochs=1, seed=1,
                     checkpoint_dir=str(out), progress=False)


def ceiling(path: Path, out: Path, batch: int) -> float:
    """The same training loop, model, optimizer and batches in one process, on
    tensors already in memory: only the data path and the other workers are
    missing. Warmed up once (allocator, lazy init) so it is the steady state."""
    from deltarec.data.shards import read_shard, to_shard
    from deltarec.train.collective import LocalCollective

    shard = to_shard(read_shard([str(path)], 0, 1))
    torch.set_num_threads(1)
    train_worker(spec(path, out / "warm", batch), LocalCollective(), shard=shard)
    res = train_worker(spec(path, out / "ceil", batch), LocalCollective(), shard=shard)
    return res["ranks"][0]["examples_per_second"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer rows (a smoke run)")
    ap.add_argument("--rows", type=int, default=None, help="examples per run (default 400000; quick 60000)")
    ap.add_argument("--batch", type=int, default=1024, help="global batch size")
    args = ap.parse_args(argv)
    n = args.rows or (60_000 if args.quick else 400_000)

    from pyspark.sql import SparkSession

    spark = (SparkSession.builder.master("local[2]").appName("train-throughput")
             .config("spark.ui.enabled", "false").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "examples.parquet"
        make_data(n, data)
        ceil = ceiling(data, Path(tmp), args.batch)
        rows.append(("ceiling (same loop, tensors in memory, 1 process)", 1, ceil, ceil))
        runs = [("local", 1, LocalBackend())]
        for w in (1, 2):
            runs += [("horovod", w, HorovodBackend(spark, w)), ("torch", w, TorchBackend(spark, w)),
                     ("torch processes", w, TorchBackend(None, w))]
        for name, w, backend in runs:
            t0 = time.perf_counter()
            res = backend.run(spec(data, Path(tmp) / f"ck-{name}-{w}", args.batch))
            wall = time.perf_counter() - t0
            per_worker = float(np.mean([r["examples_per_second"] for r in res["ranks"]]))
            rows.append((f"{name} pipeline", w, per_worker * w, per_worker))
            print(f"  {name} ×{w}: {per_worker * w:,.0f} ex/s in the workers ({wall:.1f}s wall with launch)",
                  file=sys.stderr)
    print(f"\n{n} examples, global batch {args.batch}, CPU, torch threads 1 per worker\n")
    print("| run | workers | examples/s | per worker | per worker / ceiling |")
    print("|---|---|---|---|---|")
    for label, w, total, per in rows:
        print(f"| {label} | {w} | {total:,.0f} | {per:,.0f} | {per / ceil:.2f} |")
    hvd2 = next(per for label, w, _, per in rows if label == "horovod pipeline" and w == 2)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_throughput.json").write_text(json.dumps(
        {"rows": n, "batch": args.batch, "ceiling": ceil,
         "runs": [{"run": r[0], "workers": r[1], "examples_per_second": r[2], "per_worker": r[3]} for r in rows]},
        indent=1))
    print(f"pipeline_to_ceiling={hvd2 / ceil:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
