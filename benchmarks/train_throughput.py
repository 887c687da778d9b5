"""Training throughput: the real pipeline (Parquet → Arrow shard → tensors →
steps with averaged gradients) against a ceiling (the same training loop,
model and batches on tensors already in memory, one process), side by side.

    .venv/bin/python benchmarks/train_throughput.py [--quick] [--rows N]
        [--backends horovod,torch,processes] [--workers 1,2] [--gpu]

Prints a table of examples/second for 1 and 2 workers on each backend and the
ceiling; the last line is ``pipeline_to_ceiling=<float>``: the per-worker
throughput of the 2-worker pipeline of the first backend named (Horovod by
default) over the ceiling (the goal is >= 0.8). Results also go to
benchmarks/results/train_throughput.json. ``--gpu`` trains on CUDA (one GPU:
ceiling, local and 1-worker torch processes over NCCL; no Spark needed).
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


def spec(path: Path, out: Path, batch: int, gpu: bool = False, optimizer: str = "adam") -> TrainSpec:
    return TrainSpec(run_id="bench", files=[str(path)], model_name="ranking", model_params=PARAMS,
                     optimizer=optimizer, lr=0.003, weight_decay=0.0, batch_size=batch, epochs=1, seed=1,
                     checkpoint_dir=str(out), progress=False, use_gpu=gpu)


def ceiling(path: Path, out: Path, batch: int, gpu: bool = False, optimizer: str = "adam") -> dict:
    """The same training loop, model, optimizer and batches in one process, on
    tensors already in memory: only the data path and the other workers are
    missing. Warmed up once (allocator, lazy init) so it is the steady state."""
    from deltarec.data.shards import read_shard, to_shard
    from deltarec.train.collective import LocalCollective

    shard = to_shard(read_shard([str(path)], 0, 1))
    torch.set_num_threads(1)
    train_worker(spec(path, out / "warm", batch, gpu, optimizer), LocalCollective(), shard=shard)
    res = train_worker(spec(path, out / "ceil", batch, gpu, optimizer), LocalCollective(), shard=shard)
    return res["ranks"][0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer rows (a smoke run)")
    ap.add_argument("--rows", type=int, default=None, help="examples per run (default 400000; quick 60000)")
    ap.add_argument("--batch", type=int, default=1024, help="global batch size")
    ap.add_argument("--backends", default="horovod,torch,processes",
                    help="comma list of horovod, torch (TorchDistributor), processes (torch local processes)")
    ap.add_argument("--workers", default="1,2", help="comma list of worker counts")
    ap.add_argument("--gpu", action="store_true", help="train on CUDA (workers share the visible GPUs)")
    ap.add_argument("--optimizer", default="adam",
                    help="train.optimizer of every run (adam, lazy_adam, adagrad, ...; default adam)")
    args = ap.parse_args(argv)
    n = args.rows or (60_000 if args.quick else 400_000)
    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(names) - {"horovod", "torch", "processes"})
    if unknown:
        ap.error(f"--backends: unknown {unknown}; choose from horovod, torch, processes")
    workers = [int(w) for w in args.workers.split(",")]
    if args.gpu and not torch.cuda.is_available():
        ap.error("--gpu: torch sees no CUDA device here")

    spark = None
    if {"horovod", "torch"} & set(names):
        from pyspark.sql import SparkSession

        spark = (SparkSession.builder.master("local[2]").appName("train-throughput")
                 .config("spark.ui.enabled", "false").getOrCreate())
        spark.sparkContext.setLogLevel("ERROR")
    make = {"horovod": lambda w: HorovodBackend(spark, w), "torch": lambda w: TorchBackend(spark, w, args.gpu),
            "processes": lambda w: TorchBackend(None, w, args.gpu)}
    labels = {"horovod": "horovod", "torch": "torch", "processes": "torch processes"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "examples.parquet"
        make_data(n, data)
        c = ceiling(data, Path(tmp), args.batch, args.gpu, args.optimizer)
        ceil = c.get("steady_examples_per_second") or c["examples_per_second"]
        rows.append(("ceiling (same loop, tensors in memory, 1 process)", 1, ceil, ceil,
                     c["examples_per_second"], c["setup_seconds"]))
        runs = [("local", 1, LocalBackend())]
        for w in workers:
            runs += [(labels[b], w, make[b](w)) for b in names]
        for name, w, backend in runs:
            t0 = time.perf_counter()
            res = backend.run(spec(data, Path(tmp) / f"ck-{name}-{w}", args.batch, args.gpu, args.optimizer))
            wall = time.perf_counter() - t0
            per_worker = float(np.mean([r.get("steady_examples_per_second") or r["examples_per_second"]
                                        for r in res["ranks"]]))
            whole = float(np.mean([r["examples_per_second"] for r in res["ranks"]]))
            setup = max(r["setup_seconds"] for r in res["ranks"])
            rows.append((f"{name} pipeline", w, per_worker * w, per_worker, whole, setup))
            print(f"  {name} ×{w}: {per_worker * w:,.0f} ex/s in the workers, steady state "
                  f"({wall:.1f}s wall with launch); per rank: "
                  + "; ".join(f"rank {r['rank']} {r.get('steady_examples_per_second') or 0:,.0f} ex/s, "
                              f"data wait {r['data_seconds']:.2f}s, gradient exchange {r['sync_seconds']:.2f}s, "
                              f"steps {r['compute_seconds']:.2f}s" for r in res["ranks"]), file=sys.stderr)
    where = f"CUDA ({torch.cuda.get_device_name()})" if args.gpu else "CPU, torch threads 1 per worker"
    print(f"\n{n} examples, global batch {args.batch}, optimizer {args.optimizer}, {where}, "
          f"{os.cpu_count()} cores\n")
    print("Steady state = after the first steps (one-off lazy imports, allocator growth); whole run = "
          "from the worker's start incl. reading its shard; setup = start to first step.\n")
    print("| run | workers | examples/s | per worker | per worker / ceiling | whole run per worker / ceiling "
          "| setup s |")
    print("|---|---|---|---|---|---|---|")
    for label, w, total, per, whole, setup in rows:
        print(f"| {label} | {w} | {total:,.0f} | {per:,.0f} | {per / ceil:.2f} | {whole / ceil:.2f} | {setup:.1f} |")
    head = f"{labels[names[0]]} pipeline" if names else "local pipeline"
    most = max(r[1] for r in rows if r[0] == head)
    per_head = next(r[3] for r in rows if r[0] == head and r[1] == most)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_throughput.json").write_text(json.dumps(
        {"rows": n, "batch": args.batch, "optimizer": args.optimizer, "ceiling": ceil, "gpu": args.gpu, "cores": os.cpu_count(),
         "ratio_of": f"{head} x{most}",
         "runs": [{"run": r[0], "workers": r[1], "examples_per_second": r[2], "per_worker": r[3],
                   "whole_run_per_worker": r[4], "setup_seconds": r[5]} for r in rows]},
        indent=1))
    print(f"\nratio below: {head} ×{most}, steady state per worker, over the ceiling")
    print(f"pipeline_to_ceiling={per_head / ceil:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
