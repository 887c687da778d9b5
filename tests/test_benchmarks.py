"""The benchmarks compare like with like: the figures they print are ratios
whose two sides were measured the same way."""
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))


def test_delta_scaling_compares_first_runs_with_first_runs_and_reruns_with_reruns():
    import delta_scaling

    def row(multiple, seconds, night=50_000):
        runs = [{"s": s, "cpu_s": s, "load1": 1.0, "stages": {}, "jobs": {"x": 1}, "driver_peak_mb": 1.0,
                 "driver_rss_mb": 300.0, "driver_io_mb": 2.0} for s in seconds]  # what each timed night records
        return delta_scaling.summary({"multiple": multiple, "night": night, "_runs": runs})

    # a first run pays what a rerun of the same range does not (warm caches)
    rows = [row(1, [10.0, 8.0]), row(16, [12.0, 8.4])]
    assert delta_scaling.ratio(rows, "first_s") == 12.0 / 10.0
    assert delta_scaling.ratio(rows, "rerun_s") == 8.4 / 8.0
    # not the 16x rerun over the 1x first run (what the fastest of all runs gave)
    mixed = [row(1, [8.0, 10.0]), row(16, [12.0, 8.4])]
    assert delta_scaling.ratio(mixed, "first_s") == 12.0 / 8.0 and delta_scaling.ratio(mixed, "rerun_s") == 8.4 / 10.0
    # night size: the largest night against the smallest, both at 1x history; history: at the smallest night
    sizes = [*rows, row(1, [40.0, 30.0], night=200_000), row(16, [90.0, 80.0], night=200_000)]
    assert delta_scaling.night_ratio(sizes, "first_s") == 40.0 / 10.0
    assert delta_scaling.ratio(sizes, "first_s") == 12.0 / 10.0


def test_train_throughput_reference_is_the_fastest_one_worker_run():
    import train_throughput

    rows = [{"run": "in memory #1", "workers": 1, "per_worker": 200.0},
            {"run": "torch processes", "workers": 1, "per_worker": 240.0},  # beat the in-memory runs
            {"run": "torch processes", "workers": 2, "per_worker": 260.0}]  # two workers: not a reference
    ref = train_throughput.reference(rows)
    assert ref["run"] == "torch processes" and ref["per_worker"] == 240.0
    assert all(r["per_worker"] / ref["per_worker"] <= 1.0 for r in rows if r["workers"] == 1)


def test_nightly_quality_goal_is_against_the_best_baseline_in_the_table():
    import nightly_quality as nq

    def strat(ndcg, seconds=1.0):
        return {"mean_ndcg10": ndcg, "mean_seconds": seconds}

    s = {"incremental": strat(0.35, 10.0), "full_retrain": strat(0.35, 100.0), "stale": strat(0.30),
         "popularity": strat(0.10), "personal": strat(0.31), "personal_recency": strat(0.30),
         "tifu_knn": strat(0.33), "als": strat(0.20)}
    g = nq.goal_check(s)
    # TIFU-KNN is the best baseline: 0.35 < 1.10 x 0.33, so the goal is not met although it beats each one
    assert g["checks"]["ndcg_1.10x_best_baseline_tifu_knn"] is False and not g["met"]
    assert all(g["checks"][f"ndcg_above_{b}"] for b in nq.BASELINES)
    s["incremental"], s["full_retrain"] = strat(0.37, 10.0), strat(0.37, 100.0)
    assert nq.goal_check(s)["met"]


def test_nightly_quality_tunes_baselines_on_days_before_the_scored_ones():
    import datetime as dt

    import numpy as np

    import nightly_quality as nq

    # 6 customers re-buy their own items; customer c's item c was bought long ago, c+10 recently:
    # tomorrow they re-buy the recent one, so a short half-life must win the tuning.
    rows = []
    start = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    for day in range(40):
        for c in range(6):
            item = f"i{c}" if day < 10 else f"i{c + 10}"
            for _ in range(3 if day < 10 else 1):
                rows.append((f"u{c}", item, start + dt.timedelta(days=day, hours=c)))
    data = object.__new__(nq.Interactions)
    data.user = np.array([r[0] for r in rows], dtype=object)
    data.item = np.array([r[1] for r in rows], dtype=object)
    data.time_us = np.array([int(r[2].timestamp() * 1e6) for r in rows])
    first = {f"i{i}": start for i in list(range(6)) + list(range(10, 16))}
    days = [(start + dt.timedelta(days=d)).date() for d in (37, 38, 39)]
    tuned = nq.tune_baselines(data, first, days, 10, 7, seed=1)
    assert tuned["days"] == [str(d) for d in days]
    assert tuned["half_life"] == min(nq.HALF_LIVES)
    scores = tuned["tifu_tuning_ndcg"]
    assert scores[str(nq.dataclasses.asdict(tuned["tifu"]))] == max(scores.values())


def test_nightly_quality_counts_as_positive_what_the_examples_label_positive(spark, tmp_path):
    # a purchase and a rating at or above features.rating.threshold; not a rating below it
    import datetime as dt

    import pyarrow as pa

    import nightly_quality as nq
    from conftest import make_config
    from deltarec.lake import schemas

    t0 = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)
    table = pa.table({
        "event_id": ["e1", "e2", "e3"], "user_id": ["u1"] * 3, "item_id": ["buy", "liked", "disliked"],
        "event_time": pa.array([t0] * 3, schemas.TS), "event_type": ["purchase", "rating", "rating"],
        "order_id": ["o1", None, None], "quantity": pa.array([1, None, None], pa.int64()),
        "price": [1.0, None, None], "rating": [None, 4.0, 2.0]}, schema=schemas.BEHAVIOR_EVENTS)
    cfg = make_config(tmp_path, "features.rating.threshold=3.5")
    got = nq.accepted_positives(cfg, spark.createDataFrame(table)).select("item_id").toArrow()
    assert sorted(got["item_id"].to_pylist()) == ["buy", "liked"]
