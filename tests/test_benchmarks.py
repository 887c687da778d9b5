"""The benchmarks compare like with like: the figures they print are ratios
whose two sides were measured the same way."""
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))


def test_delta_scaling_compares_first_runs_with_first_runs_and_reruns_with_reruns():
    import delta_scaling

    def row(multiple, seconds):
        runs = [{"s": s, "cpu_s": s, "load1": 1.0, "stages": {}, "jobs": {"x": 1}} for s in seconds]
        return delta_scaling.summary({"multiple": multiple, "_runs": runs})

    # a first run pays what a rerun of the same range does not (warm caches)
    rows = [row(1, [10.0, 8.0]), row(16, [12.0, 8.4])]
    assert delta_scaling.ratio(rows, "first_s") == 12.0 / 10.0
    assert delta_scaling.ratio(rows, "rerun_s") == 8.4 / 8.0
    # not the 16x rerun over the 1x first run (what the fastest of all runs gave)
    mixed = [row(1, [8.0, 10.0]), row(16, [12.0, 8.4])]
    assert delta_scaling.ratio(mixed, "first_s") == 12.0 / 8.0 and delta_scaling.ratio(mixed, "rerun_s") == 8.4 / 10.0


def test_train_throughput_reference_is_the_fastest_one_worker_run():
    import train_throughput

    rows = [{"run": "in memory #1", "workers": 1, "per_worker": 200.0},
            {"run": "torch processes", "workers": 1, "per_worker": 240.0},  # beat the in-memory runs
            {"run": "torch processes", "workers": 2, "per_worker": 260.0}]  # two workers: not a reference
    ref = train_throughput.reference(rows)
    assert ref["run"] == "torch processes" and ref["per_worker"] == 240.0
    assert all(r["per_worker"] / ref["per_worker"] <= 1.0 for r in rows if r["workers"] == 1)
