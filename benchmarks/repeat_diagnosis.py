"""Why the model loses to ``personal``: its scores taken apart, on the days a
``nightly_quality.py --lake DIR`` run scored, from the incremental lineage's
checkpoint of each night.

    .venv/bin/python benchmarks/nightly_quality.py --quick --lake /tmp/nq --set gate.enabled=false
    .venv/bin/python benchmarks/repeat_diagnosis.py --lake /tmp/nq --results benchmarks/results/nightly_quality.json

Per night, NDCG@10 on the same users and catalogue as the benchmark of:
the model; ``personal``; the model without history (embeddings, biases, MLP);
its repeat term alone; and rankings by one feature of the same history
(count, recency) with the 7-day popularity as the tie-break, and the count
with item ids hashed into more rows (``--buckets``). If the count
alone beats the learned repeat term over the same history, the loss, not the
window, is what loses; if the count over the whole history (``personal``)
beats the count over the window, the window does.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import nightly_quality as NQ  # noqa: E402


def relocated(run, lake: Path):
    """``run`` with its checkpoint path under ``lake`` when the lake was moved
    or copied (the ledger records absolute paths)."""
    path = run.checkpoint_path
    if not Path(path).exists() and "/incremental/" in path:
        path = str(lake / "incremental" / path.split("/incremental/", 1)[1])
    return dataclasses.replace(run, checkpoint_path=path)


WINDOWS = (20, 50, 200)  # lines of history the count ranking sees (repeat_explore diagnosis)


def explore_parts(model, data, seen, day, users, cat_idx, catalog, pop, tie, full, run, night, when) -> None:
    """A repeat_explore model's NDCG@10 taken apart: its repeat and explore
    terms alone, the count over its own window and longer ones, the gate's mean,
    and how many of the day's purchases its window could have ranked."""
    import torch

    from deltarec.evaluation.baselines import personal_scores
    from deltarec.models.ranking import repeat_features_all

    L = model.history_length
    hist = torch.from_numpy(NQ.user_histories(data, seen, day.users, L))
    parts = {k: [] for k in ("gate", "repeat", "explore")}
    for s in range(0, len(users), 256):
        p = model.parts({"user_idx": users[s:s + 256], "history_idx": hist[s:s + 256]}, {"item_idx": cat_idx})
        for k in parts:
            parts[k].append(p[k].double())
    g, rep, exp_ = (torch.cat(parts[k]).numpy() for k in ("gate", "repeat", "explore"))
    with torch.no_grad():  # the explore score's popularity-and-age term alone, as of the model's day
        timed = model.item_time(model.clock.features(model.lookup("item", cat_idx) if model.embedding == "dynamic"
                                                     else cat_idx)).squeeze(-1).double().numpy()[None, :]
    finite = np.isfinite(rep)
    variants = {"model": full,
                "personal (count over the whole history)": personal_scores(
                    data.user[seen], data.item[seen], day.users, catalog, pop),
                "repeat term alone (log pi) + popularity": np.where(finite, rep, -1e9) + tie,
                "explore term alone": exp_,
                "repeat items first (by pi), then explore": np.where(finite, 1e6 + rep, exp_),
                "repeat items first (by pi), then its time term (popularity, age)": np.where(
                    finite, 1e6 + rep, timed),
                "repeat items first (by pi), then 7-day popularity": np.where(finite, 1e6 + rep, pop[None, :])}
    for w in sorted({L, *WINDOWS}):
        c = repeat_features_all(torch.from_numpy(NQ.user_histories(data, seen, day.users, w)), cat_idx,
                                model.buckets["item"]).numpy()[..., 0]
        variants[f"count over the last {w} lines + popularity" + (" (the model's window)" if w == L else "")] = c + tie
    pr, pc = day.pairs
    print(f"night {night} ({run.run_id}, scored on {when.date()}, {len(day.users)} users; gate g mean "
          f"{g.mean():.3f} (min {g.min():.3f}, max {g.max():.3f}); repeat weights "
          f"{np.round(model.repeat.weight.detach().numpy()[0], 3).tolist()}; of the day's in-catalogue "
          f"purchases {finite[pr, pc].mean():.1%} are in the model's {L}-line window, "
          f"{(variants['personal (count over the whole history)'][pr, pc] >= pop.max() + 1).mean():.1%} in the whole history)")
    for name, S in variants.items():
        print(f"  {name:60s} NDCG@10 {NQ.score_day(S, day, 10)['ndcg10']:.4f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lake", required=True, help="the --lake of a finished nightly_quality.py run")
    ap.add_argument("--results", required=True, help="that run's nightly_quality.json")
    ap.add_argument("--buckets", default="65536,1048576",
                    help="also rank by the count over the same window with item ids hashed into these many rows "
                         "(comma-separated): what hash collisions cost")
    args = ap.parse_args(argv)
    import torch
    from pyspark.sql import functions as F

    from deltarec.config import load_config
    from deltarec.evaluation.baselines import item_counts, personal_scores
    from deltarec.features.examples import bucket
    from deltarec.lake import open_lake
    from deltarec.models.ranking import repeat_features_all
    from deltarec.pipeline.demo import demo_days
    from deltarec.spark import build_spark

    doc = json.loads(Path(args.results).read_text())
    data_path = ROOT.parent / "shared" / "data" / "online_retail" / "online_retail.parquet"
    cfg = load_config(str(ROOT / "conf" / "local.yaml"), [f"demo.data_path={data_path}", *doc["overrides"],
                                                         f"lake.root={Path(args.lake) / 'incremental'}",
                                                         "demo.max_days=0"], environ={})
    spark = build_spark(cfg.replace(spark=cfg.spark.replace(
        conf={"spark.ui.showConsoleProgress": "false", **cfg.spark.conf})))
    spark.sparkContext.setLogLevel("ERROR")
    days, items, _ = demo_days(cfg)
    first = dt.date.fromisoformat(doc["history"][0])
    days = [d for d in days if d[0] >= first][: doc["history_days"] + doc["nights"] + 1]
    lake = open_lake(cfg.lake, spark)
    runs = NQ.ledger_runs(cfg, lake)
    # ids hashed as the lake's runs hashed them (the config file may have changed since)
    feat = {k: v for k, v in (runs[-1].config or {}).get("features", {}).items()
            if k in ("user_buckets", "item_buckets", "salt", "history_length")}
    cfg = cfg.replace(features=cfg.features.replace(**feat))
    data = NQ.Interactions(spark, cfg, days)
    first_seen = dict(zip(items["item_id"].to_pylist(), items["first_seen"].to_pylist()))
    cat_hash = {r["item_id"]: r["h"] for r in spark.createDataFrame(items.select(["item_id"])).select(
        "item_id", bucket(F.col("item_id"), cfg.features.item_buckets).alias("h")).collect()}
    H = cfg.features.history_length
    hashes = {}  # rows of every item id for each bucket count asked for
    for b in [int(x) for x in args.buckets.split(",") if x.strip()]:
        hashes[b] = {r["item_id"]: r["h"] for r in spark.createDataFrame(items.select(["item_id"])).select(
            "item_id", bucket(F.col("item_id"), b).alias("h")).collect()}
    for night, run in enumerate(runs[1:], start=1):
        when = NQ.day_bounds(days[doc["history_days"] + night][0])
        seen = data.before(when)
        catalog = np.array(sorted(i for i, f in first_seen.items() if f is not None and f < when), dtype=object)
        day = NQ.make_day(data, data.before(when + dt.timedelta(days=1), since=when), catalog, 10, night)
        cat_idx = torch.from_numpy(np.array([cat_hash[x] for x in catalog], dtype=np.int64))
        model = NQ.cached_model(relocated(run, Path(args.lake)))
        pop = item_counts(data.item[data.before(when, since=when - dt.timedelta(days=7))], catalog)
        tie = 1e-3 * pop / max(pop.max(), 1)
        full = NQ.model_scores(model, day.users, cat_idx.numpy(), data, seen, H)
        users = torch.tensor([data.user_hash[x] for x in day.users])
        with torch.no_grad():
            no_history = model.score_all(users, cat_idx).double().numpy()
        if hasattr(model, "parts"):  # repeat_explore: its gate, repeat and explore terms apart
            explore_parts(model, data, seen, day, users, cat_idx, catalog, pop, tie, full, run, night, when)
            continue
        f = repeat_features_all(torch.from_numpy(NQ.user_histories(data, seen, day.users, H)), cat_idx,
                                model.buckets["item"]).numpy()
        variants = {
            "model": full, "personal": personal_scores(data.user[seen], data.item[seen], day.users, catalog, pop),
            "model without history": no_history, "repeat term alone": full - no_history + tie,
            f"count in the last {H} + popularity": f[..., 0] + tie,
            f"recency in the last {H} + popularity": f[..., 2] + tie,
        }
        for b, rows in hashes.items():  # the same window, the same count, fewer shared rows
            kept = data.item_idx
            data.item_idx = np.array([rows.get(x, 0) for x in data.item], dtype=np.int64)
            try:
                hb = torch.from_numpy(NQ.user_histories(data, seen, day.users, H))
                cb = torch.from_numpy(np.array([rows[x] for x in catalog], dtype=np.int64))
                variants[f"count in the last {H}, {b} buckets + popularity"] = \
                    repeat_features_all(hb, cb, b).numpy()[..., 0] + tie
            finally:
                data.item_idx = kept
        w = ", ".join(f"{n} {v:.2f}" for n, v in zip(("log1p(count)", "present", "recency", "share"),
                                                       model.repeat.weight.detach().numpy()[0]))
        print(f"night {night} ({run.run_id}, scored on {when.date()}, {len(day.users)} users; repeat weights {w})")
        for name, S in variants.items():
            print(f"  {name:50s} NDCG@10 {NQ.score_day(S, day, 10)['ndcg10']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
