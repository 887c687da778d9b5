"""The notebooks in notebooks/, executed cell by cell as Databricks would run
them (markdown cells skipped), in this process with the shared SparkSession,
on a tiny lake; plus one run as a plain script.

One module-scoped lake: nightly_incremental runs the demo on it (a full run
and one night) on the real Online Retail file (skipped, saying so, where it is
absent: the demo's synthetic fallback would make other figures), then one
more day is appended so a next run has work to plan.
"""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REAL_DATA, ROOT, make_config
from deltarec.config import ConfigError
from deltarec.lake import LakeError, open_lake
from deltarec.lake.ledger import Ledger
from deltarec.pipeline.demo import append_day, demo_days
from deltarec.train.checkpoint import verify_checkpoint

NOTEBOOKS = ROOT / "notebooks"
NAMES = ("nightly_incremental", "explore_runs", "full_retrain")
HEADER = "# Databricks notebook source"
SEPARATOR = "# COMMAND ----------"
# make_config's tiny settings, as the notebooks' override widget takes them
TINY = ("lake.engine=delta-rs, train.backend=local, train.num_proc=1, train.progress=false, "
        "train.batch_size=256, features.user_buckets=2048, features.item_buckets=1024, "
        "model.embedding_dim=8, model.hidden=[16], spark.shuffle_partitions=2, "
        f"demo.enabled=true, demo.max_days=4, demo.nights=1\ndemo.data_path={REAL_DATA}")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def cells(name: str) -> list[str]:
    """The notebook's cells; a markdown cell is one whose lines are all `# MAGIC`."""
    text = (NOTEBOOKS / f"{name}.py").read_text()
    assert text.startswith(HEADER + "\n"), f"{name}.py must start with {HEADER!r}"
    parts = [p.strip("\n") for p in text[len(HEADER):].split(f"\n{SEPARATOR}\n")]
    return [p for p in parts if p.strip()]


def is_markdown(cell: str) -> bool:
    return all(line.startswith("# MAGIC") for line in cell.splitlines() if line.strip())


def run_notebook(name: str, *argv: str) -> tuple[dict, str]:
    """Execute the code cells in order in one namespace, widgets from ``argv``;
    returns the namespace and what the cells printed. Any cell's error propagates."""
    ns: dict = {"__name__": "__main__", "__file__": str(NOTEBOOKS / f"{name}.py")}  # as `python NAME.py`
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", [str(NOTEBOOKS / f"{name}.py"), *argv])
        for key in [k for k in os.environ if k.startswith(("DELTAREC__", "DELTAREC_WIDGET_"))]:
            mp.delenv(key)
        with contextlib.redirect_stdout(out):
            for i, cell in enumerate(c for c in cells(name) if not is_markdown(c)):
                exec(compile(cell, f"{name}.py[cell {i}]", "exec"), ns)
    return ns, out.getvalue()


def lake_state(root: Path) -> dict:
    """Every Delta table's latest version and every checkpoint directory under ``root``."""
    from deltalake import DeltaTable

    tables = {p.name: DeltaTable(str(p)).version() for p in root.iterdir() if (p / "_delta_log").is_dir()}
    checkpoints = {str(p.parent) for p in root.rglob("manifest.json")}
    return {"tables": tables, "checkpoints": checkpoints}


@pytest.fixture(scope="module")
def lake(spark, tmp_path_factory, real_data_path):
    root = tmp_path_factory.mktemp("nb") / "lake"
    reports = root.parent / "reports"
    ns, out = run_notebook("nightly_incremental", "--overrides", TINY, "--set", f"lake.root={root}",
                           "--report_dir", str(reports))
    cfg = make_config(root, "demo.max_days=5")
    days, items, _ = demo_days(cfg)
    appended = append_day(open_lake(cfg.lake, spark), cfg, days[4][1], items)
    return {"root": root, "reports": reports, "cfg": cfg, "ns": ns, "out": out, "appended_version": appended,
            "appended_rows": days[4][1].num_rows}


def test_notebooks_are_databricks_source_with_markdown_and_code():
    for name in NAMES:
        cs = cells(name)
        assert is_markdown(cs[0]) and cs[0].splitlines()[0] == "# MAGIC %md", name
        code = [c for c in cs if not is_markdown(c)]
        assert len(code) >= 3, name
        for i, c in enumerate(code):
            compile(c, f"{name}[{i}]", "exec")


def test_nightly_incremental_runs_the_nights_and_plots_metrics(lake, spark):
    ns = lake["ns"]
    assert f"demo: data file {REAL_DATA} (" in lake["out"]  # the real data, not the synthetic fallback
    assert [r.status for r in ns["results"]] == ["committed", "committed"]
    runs = Ledger(open_lake(lake["cfg"].lake, spark)).runs("ranking")
    assert [(r.source_first, r.source_last) for r in runs] == [(0, 2), (3, 3)]
    assert runs[1].parent_run_id == runs[0].run_id
    # the watermark reached what the source held when the notebook ran (one day was appended after)
    assert runs[-1].source_last == lake["appended_version"] - 1
    for r in runs:
        assert r.run_id in lake["out"]  # the summary table names each run
    png = Path(ns["plot_png"])
    assert png.parent == lake["reports"] and png.stat().st_size > 5000
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert f"[figure] {png}" in lake["out"]


def test_nightly_incremental_dry_run_plans_and_writes_nothing(lake):
    root = lake["root"]
    before = lake_state(root)
    assert {"behavior_events", "items", "runs", "training_examples", "quarantine_events"} <= set(before["tables"])
    assert len(before["checkpoints"]) == 2
    ns, out = run_notebook("nightly_incremental", "--overrides", TINY, "--set", f"lake.root={root}",
                           "--dry-run", "--report_dir", str(lake["reports"]))
    v = lake["appended_version"]
    p = ns["night_plan"]
    assert (p["watermark"], p["latest_version"], p["next_range"]) == (v - 1, v, (v, v))
    assert p["change_types"] == {"insert": lake["appended_rows"]} and p["rows"] == lake["appended_rows"]
    assert ns["results"] == [] and "dry run: nothing was written" in out
    assert f"next run: versions {v}..{v}" in out
    assert lake_state(root) == before


def test_explore_runs_lists_the_lineage(lake, spark):
    root = lake["root"]
    ns, out = run_notebook("explore_runs", "--set", f"lake.root={root}", "--verify", "true",
                           "--report_dir", str(lake["reports"]))
    runs = Ledger(open_lake(lake["cfg"].lake, spark)).runs("ranking")
    rows = ns["run_lineage"]
    assert [r["run_id"] for r in rows] == [r.run_id for r in runs] and len(rows) == 2
    first, night = rows
    assert first["chain"] == first["run_id"] and first["parent"] is None and first["depth"] == 0
    assert night["chain"] == f"{night['run_id']} <- {first['run_id']}" and night["depth"] == 1
    assert [(r["first_version"], r["last_version"]) for r in rows] == [(0, 2), (3, 3)]
    assert all(r["contiguous"] is True and r["verified"] is True for r in rows)
    assert [r["checkpoint"] for r in rows] == [r.checkpoint_path for r in runs]
    assert night["chain"] in out and runs[1].checkpoint_path in out
    assert Path(ns["plot_png"]).read_bytes()[:8] == PNG_MAGIC


def test_explore_runs_runs_as_a_plain_script(lake, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DELTAREC__", "DELTAREC_WIDGET_"))}
    env["PYTHONPATH"] = str(ROOT / "lib")
    done = subprocess.run([sys.executable, "notebooks/explore_runs.py", "--set", f"lake.root={lake['root']}",
                           "--report_dir", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 committed runs" in done.stdout
    assert "ranking-000003-000003 <- ranking-000000-000002" in done.stdout
    assert (tmp_path / "ranking-runs-nights.png").read_bytes()[:8] == PNG_MAGIC


def test_full_retrain_trains_a_separate_lineage_over_all_versions(lake, spark):
    root, cfg = lake["root"], lake["cfg"]
    lake_engine = open_lake(cfg.lake, spark)
    nightly_before = [r.run_id for r in Ledger(lake_engine, "runs").runs()]
    runs_version = lake_engine.version("runs")
    ns, out = run_notebook("full_retrain", "--overrides", TINY, "--set", f"lake.root={root}")
    latest = lake_engine.version("behavior_events")
    full = Ledger(lake_engine, "runs_full").runs()
    assert len(full) == 1
    run = full[0]
    assert (run.source_first, run.source_last, run.strategy, run.parent_run_id) == (0, latest, "full", None)
    assert run.model == "ranking" and run.metrics["examples"] > 0
    assert run.checkpoint_path.startswith(str(root / "checkpoints_full"))
    verify_checkpoint(run.checkpoint_path, run.checkpoint_sha256)
    assert lake_engine.exists("training_examples_full") and lake_engine.exists("quarantine_events_full")
    assert ns["retrain_plan"]["next_range"] == (0, latest)
    # the nightly lineage is untouched
    assert [r.run_id for r in Ledger(lake_engine, "runs").runs()] == nightly_before
    assert lake_engine.version("runs") == runs_version
    # a second full retrain into the same lineage is refused, naming the way out
    with pytest.raises(LakeError, match="already holds 1 run.*pick another lineage suffix"):
        run_notebook("full_retrain", "--overrides", TINY, "--set", f"lake.root={root}")
    assert len(Ledger(lake_engine, "runs_full").runs()) == 1


def test_notebook_parameters_are_checked(spark, tmp_path):
    root = f"lake.root={tmp_path / 'lake'}"
    with pytest.raises(ValueError, match="dry_run = 'maybe'"):
        run_notebook("nightly_incremental", "--set", root, "--dry_run", "maybe")
    with pytest.raises(ConfigError, match="'nonsense'"):
        run_notebook("nightly_incremental", "--set", root, "--overrides", "train.lr=0.1\nnonsense")
    with pytest.raises(ConfigError, match="unknown config key 'train.speed'"):
        run_notebook("explore_runs", "--set", root, "--set", "train.speed=3")
    with pytest.raises(ValueError, match="unknown notebook argument --bogus"):
        run_notebook("explore_runs", "--set", root, "--bogus", "1")
    with pytest.raises(ConfigError, match="'no/such.yaml' not found"):
        run_notebook("explore_runs", "--conf", "no/such.yaml")
    assert not (tmp_path / "lake").exists()


def test_override_widget_splits_on_newlines_and_commas_between_keys():
    from deltarec.notebook import parse_overrides

    assert parse_overrides("a.b=1, model.hidden=[16, 8],c.d=x\n# a comment\n\ne.f= y ") == [
        "a.b=1", "model.hidden=[16, 8]", "c.d=x", "e.f= y"]


def test_databricks_job_runs_a_notebook_with_its_widgets_and_a_valid_config():
    import json
    import re

    from deltarec.notebook import notebook_config

    job = json.loads((ROOT / "conf" / "databricks" / "nightly_job.json").read_text())
    assert job["schedule"]["quartz_cron_expression"] and job["max_concurrent_runs"] == 1
    (task,) = job["tasks"]
    nb_task = task["notebook_task"]
    name = Path(nb_task["notebook_path"]).name
    source = (ROOT / f"{nb_task['notebook_path']}.py").read_text()
    widgets = set(re.findall(r'dbutils\.widgets\.(?:text|dropdown)\("(\w+)"', source))
    if "nb.config_widgets(dbutils)" in source:  # the shared config_file / overrides pair
        widgets |= {"config_file", "overrides"}
    params = nb_task["base_parameters"]
    assert name == "nightly_incremental" and set(params) <= widgets, (set(params) - widgets)
    cfg = notebook_config(params["config_file"], params["overrides"])
    assert (cfg.train.backend, cfg.lake.engine, cfg.train.use_gpu) == ("torch", "delta-spark", True)
    assert params["dry_run"] == "false"
