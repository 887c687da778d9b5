"""The cluster launch path: ./spark-submit.sh running jobs/nightly.py end to end
(bootstrap, zip, printed command, spark-submit), and `deltarec plan --json`."""
from __future__ import annotations

import json
import os
import re
import subprocess

from conftest import REAL_DATA, ROOT, make_config
from deltarec.cli import main
from deltarec.lake import open_lake
from deltarec.lake.ledger import Ledger
from deltarec.pipeline.demo import append_day, demo_days
from deltarec.pipeline.nightly import run_nightly

# make_config's tiny settings, as --set flags
TINY = ["lake.engine=delta-rs", "train.backend=local", "train.num_proc=1", "train.progress=false",
        "train.batch_size=256", "features.user_buckets=2048", "features.item_buckets=1024",
        "model.embedding_dim=8", "model.hidden=[16]", "spark.shuffle_partitions=2", "spark.driver_memory=1g",
        "demo.enabled=true", "demo.max_days=4", "demo.nights=1", f"demo.data_path={REAL_DATA}"]


def test_spark_submit_runs_the_nightly_job(tmp_path, real_data_path):
    lake_root = tmp_path / "lake"
    args = ["./spark-submit.sh", "--master", "local[2]", "jobs/nightly.py"]
    for o in [f"lake.root={lake_root}", *TINY]:
        args += ["--set", o]
    env = {k: v for k, v in os.environ.items()
           if k != "DELTAREC_NO_BOOTSTRAP" and not k.startswith("DELTAREC__")}
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"stdout:\n{done.stdout[-2000:]}\nstderr:\n{done.stderr[-4000:]}"
    # the exact command is printed before it runs: the venv's spark-submit, the master, the zipped library
    line = next((ln for ln in done.stderr.splitlines() if ln.startswith("+ ")), "")
    assert re.match(r"\+ \S*/spark-submit --master local\[2\] --py-files \S*/build/deltarec\.zip ", line), line
    assert "jobs/nightly.py --conf " in line and f"--set lake.root={lake_root}" in line
    assert "--set spark.master=local[2]" in line
    # a clean console: no stage bars, no warning (log4j's " WARN "), the config only with -v
    assert "[Stage " not in done.stderr
    assert [ln for ln in done.stderr.splitlines() if " WARN " in ln] == []
    assert "config: {" not in done.stderr

    cfg = make_config(lake_root)
    lake = open_lake(cfg.lake)
    runs = Ledger(lake).runs("ranking")
    # the first run is champion by default; the second is gated (promoted or kept as a candidate)
    assert runs[0].status in ("champion", "retired") and runs[1].status in ("champion", "candidate")
    assert sum(r.status == "champion" for r in runs) == 1
    assert [(r.source_first, r.source_last) for r in runs] == [(0, 2), (3, 3)]
    assert Ledger(lake).watermark("ranking") == lake.version("behavior_events") == 3
    assert runs[1].parent_run_id == runs[0].run_id and runs[1].metrics["train"]["backend"] == "local"
    assert f"run {runs[0].run_id} (full): versions 0..2" in done.stdout
    assert f"demo: data file {REAL_DATA} (" in done.stdout  # the real data, not the synthetic fallback


def plan_json(capsys, lake_root) -> dict:
    argv = ["plan", "--json", "--conf", str(ROOT / "conf" / "local.yaml")]
    for o in [f"lake.root={lake_root}", *TINY]:
        argv += ["--set", o]
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_json_before_and_after_a_run(spark, lake_root, capsys, real_data_path):
    cfg = make_config(lake_root, "demo.enabled=false")
    lake = open_lake(cfg.lake, spark)
    days, items, _ = demo_days(cfg)
    for _, ev in days[:2]:
        append_day(lake, cfg, ev, items)
    gone = days[0][1]["event_id"][0].as_py()
    assert lake.delete("behavior_events", f"event_id = '{gone}'") == 1  # version 2: one delete in the feed
    inserted = days[0][1].num_rows + days[1][1].num_rows

    before = plan_json(capsys, lake_root)
    assert (before["watermark"], before["latest_version"], before["next_range"]) == (-1, 2, [0, 2])
    assert before["change_types"] == {"delete": 1, "insert": inserted}
    assert before["rows"] == inserted + 1 and before["runs"] == 0
    assert (before["strategy"], before["parent"]) == ("full", None) and "first run of this lineage" in before["note"]
    assert not lake.exists("runs") and lake.version("behavior_events") == 2  # planning wrote nothing

    res = run_nightly(spark, cfg, lake=lake)
    assert res.status == "committed" and res.source_versions == (0, 2)

    after = plan_json(capsys, lake_root)
    assert (after["watermark"], after["latest_version"], after["next_range"]) == (2, 2, None)
    assert after["change_types"] == {} and after["rows"] == 0 and after["runs"] == 1
    assert after["note"].startswith("nothing new") and after["strategy"] is None
