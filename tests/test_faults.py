"""Kills and crashed attempts (#21): a real nightly process SIGKILLed from
outside, by PID, at points across the delta job and the ledger commit, then
rerun, leaves every state table, the ledger and the audit trail as a clean
twin lake that was never killed, row for row. A night killed after writing its
quarantine and examples, then a new source version, gets another run id on the
rerun; the rerun's commit removes the killed attempt's rows, and until then
``deltarec status --verify`` reports them (§3). Every exit says why (SIGTERM)."""
import os
import signal
import subprocess
import sys

from conftest import ROOT, make_config
from deltarec.lake import open_lake
from deltarec.lake.ledger import Ledger
from deltarec.pipeline import delta_job as J
from deltarec.pipeline.demo import append_day, demo_days
from deltarec.pipeline.nightly import run_nightly
from deltarec.pipeline.publish import attempt_tables
from deltarec.faults import PAUSE_ENV, PAUSED
from deltarec.registry.core import events
from test_races import nightly_args, state_rows, wait_for_line


def verify(lake_root):
    return subprocess.run(
        [sys.executable, "-m", "deltarec.cli", "status", "--verify", "--conf", str(ROOT / "conf" / "local.yaml"),
         "--set", f"lake.root={lake_root}"], capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT / "lib")})


def test_killed_attempts_rows_are_reported_then_removed_by_the_commit_of_its_range(spark, lake_root, real_data_path):
    cfg = make_config(lake_root, "demo.enabled=false")
    lake = open_lake(cfg.lake, spark)
    days, items, _ = demo_days(cfg)
    append_day(lake, cfg, days[0][1], items)
    killed = f"{cfg.model.name}-000000-000000"
    J.prepare_night(spark, cfg, lake, 0, 0, killed)  # what a night killed after its delta job leaves
    ledger = Ledger(lake, cfg.lake.runs_table)
    tables = attempt_tables(cfg)
    assert ledger.orphan_run_ids(tables) == {cfg.lake.quarantine_table: [killed], cfg.lake.examples_table: [killed]}
    out = verify(lake_root)
    assert out.returncode == 1 and killed in out.stderr, out.stderr[-2000:]

    append_day(lake, cfg, days[1][1], items)  # a new version before the rerun: another run id
    res = run_nightly(spark, cfg, lake=lake)
    assert res.run_id == f"{cfg.model.name}-000000-000001"
    assert ledger.orphan_run_ids(tables) == {}
    for t in tables[:2]:
        assert set(lake.read_arrow(t)["run_id"].to_pylist()) == {res.run_id}, t
    assert verify(lake_root).returncode == 0


def start_night(root, **env):
    return subprocess.Popen(nightly_args(root), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "lib"), **env})


def kill_at(root, point):
    proc = start_night(root, **{PAUSE_ENV: point})
    try:
        wait_for_line(proc, f"{PAUSED} {point}")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def lake_record(lake, cfg):
    ledger = Ledger(lake, cfg.lake.runs_table)
    return {**state_rows(lake),
            "runs": [(r.run_id, r.source_first, r.source_last, r.status) for r in ledger.runs()],
            "audit": sorted((e["run_id"], e["action"], e["previous_champion"]) for e in events(lake, cfg)),
            "attempts": {t: sorted(set(lake.read_arrow(t)["run_id"].to_pylist())) for t in attempt_tables(cfg)[:2]}}


def test_sigkill_in_the_delta_job_and_after_the_commit_then_rerun_equals_a_clean_twin(spark, tmp_path,
                                                                                      real_data_path):
    cfg = make_config(tmp_path / "lake", "demo.enabled=false")
    tcfg = make_config(tmp_path / "twin", "demo.enabled=false")
    lake, twin = open_lake(cfg.lake, spark), open_lake(tcfg.lake, spark)
    days, items, _ = demo_days(cfg)
    for night, point in enumerate(["after_state_write", "after_ledger_commit"]):
        append_day(lake, cfg, days[night][1], items)
        append_day(twin, tcfg, days[night][1], items)
        kill_at(tmp_path / "lake", point)
        run_nightly(spark, cfg, lake=lake)  # the rerun (a no-op after the commit: it repairs the audit)
        run_nightly(spark, tcfg, lake=twin)
    got, want = lake_record(lake, cfg), lake_record(twin, tcfg)
    assert set(got) == set(want) and len(want["runs"]) == 2
    for k in want:
        assert got[k] == want[k], k


def test_sigterm_says_why_it_stopped(spark, lake_root, real_data_path):
    cfg = make_config(lake_root, "demo.enabled=false")
    lake = open_lake(cfg.lake, spark)
    days, items, _ = demo_days(cfg)
    append_day(lake, cfg, days[0][1], items)
    proc = start_night(lake_root)
    try:
        wait_for_line(proc, "consuming")
        os.kill(proc.pid, signal.SIGTERM)
        err = proc.stderr.read()
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    assert rc == 128 + signal.SIGTERM and "stopped by SIGTERM" in err, (rc, err[-2000:])
    assert Ledger(lake, cfg.lake.runs_table).runs() == []
