"""Forgetting under nightly increments, with and without each control.

On the Online Retail data: load the first H days and train (full), then K
nights of incremental updates. The Spark half (validation, examples) runs once
per night through ``run_nightly``; each variant then trains its own chain of
checkpoints on exactly those nights' examples with the same trainer
(``train_worker``) and one forgetting control switched on. After K nights each
variant's model is scored on

- backward: the positives of the first H days (what it learned first), and
- forward: the positives of the next day (not trained on by any variant),

as HR@K / NDCG@K over the whole catalogue (evaluation/prequential.py), each
user scored with their history before the scored rows (the ranking model's
repeat term reads it), as the nightly prequential step does.

    .venv/bin/python benchmarks/forgetting.py [--quick] [--nights K] [--history-days H]

Results also go to benchmarks/results/forgetting.json.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)

DATA = (ROOT / ".." / "shared" / "data" / "online_retail" / "online_retail.parquet").resolve()

VARIANTS = {
    "none": {},
    "replay 0.5": {"replay_ratio": 0.5},
    "proximal 0.01": {"proximal": 0.01},
    "ewc 10": {"ewc": 10.0},
    "distill 1.0": {"distill": 1.0},
    "all": {"replay_ratio": 0.5, "proximal": 0.01, "ewc": 10.0, "distill": 1.0},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer days and nights (a few minutes)")
    ap.add_argument("--nights", type=int, default=None, help="K incremental nights (default 5; quick 3)")
    ap.add_argument("--history-days", type=int, default=None, help="H days in the first load (default 10; quick 4)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "forgetting.json"))
    a = ap.parse_args()
    K = a.nights or (3 if a.quick else 5)
    H = a.history_days or (4 if a.quick else 10)

    import pyarrow.parquet as pq
    from pyspark.sql import functions as F

    from deltarec.config import load_config
    from deltarec.evaluation.prequential import catalog_indices, evaluate, user_histories
    from deltarec.lake import open_lake
    from deltarec.pipeline.demo import append_day, demo_days
    from deltarec.pipeline.nightly import run_nightly
    from deltarec.pipeline.training import history_length, model_params
    from deltarec.spark import build_spark
    from deltarec.train.checkpoint import load_model
    from deltarec.train.collective import LocalCollective
    from deltarec.train.loop import TrainSpec, train_worker

    if not DATA.is_file():
        sys.exit(f"Online Retail data not found at {DATA}")
    root = tempfile.mkdtemp(prefix="deltarec-forgetting-")
    cfg = load_config(ROOT / "conf" / "local.yaml", [
        f"lake.root={root}/lake", "lake.engine=delta-rs", "train.backend=local", "train.num_proc=1",
        "train.progress=false", "demo.enabled=false", f"demo.data_path={DATA}", f"demo.max_days={H + K + 1}",
        "train.checkpoint_every_steps=0", "gate.enabled=false", f"train.epochs={a.epochs}",
        f"train.full_epochs={a.epochs}", "features.user_buckets=8192", "features.item_buckets=4096",
        # the first (full) run saves a Fisher for the EWC variants; the variants' own settings come below
        "train.forgetting.ewc=1.0", "train.forgetting.fisher_batches=16", "spark.driver_memory=2g",
    ], environ={})
    t0 = time.perf_counter()
    spark = build_spark(cfg)
    lake = open_lake(cfg.lake, spark)
    days, items, what = demo_days(cfg)
    if len(days) < H + K + 1:
        sys.exit(f"{what} has {len(days)} days; need H + K + 1 = {H + K + 1}")
    print(f"data: {what}; first load {H} days ({days[0][0]}..{days[H - 1][0]}), {K} nights, "
          f"next day {days[H + K][0]}", flush=True)
    for _, ev in days[:H]:
        append_day(lake, cfg, ev, items)
    runs = [run_nightly(spark, cfg, lake=lake)]
    for _, ev in days[H:H + K + 1]:  # the last one only prepares the next day's examples
        append_day(lake, cfg, ev, items)
        runs.append(run_nightly(spark, cfg, lake=lake))
    prep_seconds = time.perf_counter() - t0
    tables = cfg.lake

    width = max(history_length(cfg), 1)

    def positives(run_id: str, users=None):
        """(users, items, histories) of a run's positive events: each user's
        history before their first scored row, as the nightly prequential
        step gives the model (the repeat term reads it)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        df = lake.read(tables.examples_table).where((F.col("run_id") == run_id) & (F.col("label") == 1))
        if "kind" in df.columns:
            df = df.where(F.col("kind") == "event")
        t = df.select("user_idx", "item_idx", "event_time", "history_idx", "event_id").toArrow()
        if users is not None:
            t = t.filter(pc.is_in(t["user_idx"], pa.array(users)))
        return t["user_idx"].to_numpy(), t["item_idx"].to_numpy(), user_histories(t, width)

    first_users = np.unique(positives(runs[0].run_id)[0])
    rng = np.random.default_rng(a.seed)
    keep_users = rng.choice(first_users, size=min(800, len(first_users)), replace=False)
    old_u, old_i, old_h = positives(runs[0].run_id, keep_users)
    next_u, next_i, next_h = positives(runs[-1].run_id)
    cat = catalog_indices(lake.read(tables.items_table), cfg.features)
    k = cfg.eval.k
    train = cfg.train
    base_ck = runs[0].checkpoint
    replay_dir = Path(root) / "replay"
    run_files = {r.run_id: lake.data_files(tables.examples_table, {"run_id": r.run_id}) for r in runs}
    spark.stop()  # the rest is torch only: give the JVM's memory back

    def plain(f: str) -> str:
        return f[len("file://"):] if f.startswith("file://") else f

    def replay_files(older: list[str], rows: int, seed: int, out: Path) -> list[str]:
        """A seeded uniform sample of ``rows`` training rows (holdout = false) of
        the older runs (in the product: train/regularizers.replay_sample on Spark)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        t = pa.concat_tables([pq.read_table(plain(f)) for r in older for f in run_files[r]], promote_options="default")
        if "holdout" in t.column_names:
            t = t.filter(pc.invert(pc.fill_null(t["holdout"], False)))
        pick = np.sort(np.random.default_rng(seed).choice(t.num_rows, size=min(rows, t.num_rows), replace=False))
        out.mkdir(parents=True, exist_ok=True)
        pq.write_table(t.take(pa.array(pick)), out / "replay.parquet")
        return [str(out / "replay.parquet")]

    def scored(model) -> dict:
        return {"backward": evaluate({"m": model}, None, old_u, old_i, cat, k, histories=old_h)["m"],
                "next_day": evaluate({"m": model}, None, next_u, next_i, cat, k, histories=next_h)["m"]}

    results = {}
    for name, ctl in VARIANTS.items():
        tv = time.perf_counter()
        parent = base_ck
        for n, run in enumerate(runs[1:K + 1], start=1):
            files = run_files[run.run_id]
            replay: list[str] = []
            if ctl.get("replay_ratio"):
                rows = sum(pq.ParquetFile(plain(f)).metadata.num_rows for f in files)
                replay = replay_files([r.run_id for r in runs[:n]], int(ctl["replay_ratio"] * rows), a.seed + n,
                                      replay_dir / name.replace(" ", "_") / run.run_id)
            spec = TrainSpec(
                run_id=f"{name}-{n}", files=files, replay_files=replay, model_name=cfg.model.name,
                model_params=model_params(cfg), optimizer=train.optimizer, lr=train.lr, weight_decay=train.weight_decay,
                batch_size=train.batch_size, epochs=train.epochs, seed=train.seed + n,
                checkpoint_dir=str(Path(root) / "ck" / name.replace(" ", "_") / str(n)),
                history_length=history_length(cfg),
                parent_path=parent["path"], parent_sha256=parent["sha256"], progress=False,
                proximal=ctl.get("proximal", 0.0), ewc=ctl.get("ewc", 0.0), distill=ctl.get("distill", 0.0),
                fisher_batches=16 if ctl.get("ewc") else 0)
            parent = train_worker(spec, LocalCollective())["checkpoint"]
        results[name] = {**scored(load_model(parent)), "seconds": round(time.perf_counter() - tv, 1)}
        print(f"  {name}: done in {results[name]['seconds']} s", flush=True)
    results["(first model, no updates)"] = {**scored(load_model(base_ck)), "seconds": 0.0}
    print()
    print(f"after K={K} nightly increments (ranking model, hashed ids, {a.epochs} epochs/night); "
          f"HR@{k} / NDCG@{k} over {len(cat)} items")
    print(f"backward = first {H} days' positives ({len(np.unique(old_u))} users); "
          f"next day = {days[H + K][0]} ({len(np.unique(next_u))} users)")
    head = f"{'control':<28} {'back HR':>8} {'back NDCG':>10} {'next HR':>8} {'next NDCG':>10}"
    print(head)
    print("-" * len(head))
    for name, r in results.items():
        b, f = r["backward"], r["next_day"]
        print(f"{name:<28} {b['hr']:>8.4f} {b['ndcg']:>10.4f} {f['hr']:>8.4f} {f['ndcg']:>10.4f}")
    print(f"\ndata preparation {prep_seconds:.0f} s, total {time.perf_counter() - t0:.0f} s")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"K": K, "H": H, "epochs": a.epochs, "k": k, "results": results,
                                       "data": what}, indent=1))


if __name__ == "__main__":
    main()
