"""Kills and crashed attempts (#21): a real nightly process SIGKILLed from
outside, by PID, at points across the delta job, training's checkpoint write and the ledger commit, then
rerun, leaves every state table, the ledger and the audit trail as a clean
twin lake that was never killed, row for row. A night killed after writing its
quarantine and examples, then a new source version, gets another run id on the
rerun; the rerun's commit removes the killed attempt's rows, and until then
``deltarec status --verify`` reports them (§3). Every exit says why (SIGTERM)."""
import os
import signal
import subprocess
import sys

import pyarrow as pa

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
    for state in (cfg.lake.event_index_table, cfg.lake.user_state_table, cfg.lake.item_stats_table):
        # the killed attempt's state is of version 0, which no run consumed (the ledger is empty)
        assert f"{state} holds" in out.stderr and "consumed only up to -1" in out.stderr, out.stderr[-2000:]

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


def test_sigkill_in_the_delta_job_training_and_around_the_commit_then_rerun_equals_a_clean_twin(
        spark, tmp_path, real_data_path):
    cfg = make_config(tmp_path / "lake", "demo.enabled=false")
    tcfg = make_config(tmp_path / "twin", "demo.enabled=false")
    lake, twin = open_lake(cfg.lake, spark), open_lake(tcfg.lake, spark)
    days, items, _ = demo_days(cfg)
    # Each night is killed at successive points (every rerun is killed further on), then completed:
    # the delta job's state write, training's checkpoint write, just before and just after the ledger commit.
    kills = [["after_state_write", "after_checkpoint_write"], ["before_ledger_commit", "after_ledger_commit"]]
    for night, points in enumerate(kills):
        append_day(lake, cfg, days[night][1], items)
        append_day(twin, tcfg, days[night][1], items)
        for point in points:
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


def test_rerun_resumes_in_run_and_a_paused_loser_stores_no_metrics(spark, lake_root, real_data_path):
    """Two faults on one night (#21 §5), sharing its setup:
    (1) a night killed after an in-run checkpoint resumes from it on the rerun,
    though the rerun rewrote its examples under new file names: the rerun
    trains fewer steps than the run has, and no step twice;
    (2) a loser of the same range (same run id), paused once its candidate is
    written while the winner commits, then resumed, stores no gate or
    prequential metrics: the metrics table holds exactly the ledger's."""
    import json
    from pathlib import Path

    from deltarec.evaluation.prequential import metric_rows
    from deltarec.faults import CRASH_ENV, CRASH_EXIT_CODE

    every = "train.checkpoint_every_steps=5"
    cfg = make_config(lake_root, "demo.enabled=false", every)
    lake = open_lake(cfg.lake, spark)
    days, items, _ = demo_days(cfg)
    append_day(lake, cfg, days[0][1], items)
    first = run_nightly(spark, cfg, lake=lake)
    append_day(lake, cfg, days[1][1], items)
    extra = ["--set", every]

    crashed = subprocess.run(nightly_args(lake_root) + extra, capture_output=True, text=True, cwd=ROOT, timeout=600,
                             env={**os.environ, "PYTHONPATH": str(ROOT / "lib"), CRASH_ENV: "after_inrun_checkpoint"})
    assert crashed.returncode == CRASH_EXIT_CODE, crashed.stderr[-3000:]

    # the loser: another lr (other candidate metrics), no in-run checkpoints of its own
    loser = subprocess.Popen(nightly_args(lake_root) + ["--set", "train.lr=1000.0", "--set",
                                                         "train.checkpoint_every_steps=0"],
                             stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT / "lib"), PAUSE_ENV: "after_checkpoint_write"})
    try:
        wait_for_line(loser, f"{PAUSED} after_checkpoint_write")
        won = run_nightly(spark, cfg, lake=lake)  # the rerun of the crashed night, and the race's winner
        os.kill(loser.pid, signal.SIGCONT)
        err = loser.stderr.read()
        assert loser.wait(timeout=300) != 0
    finally:
        if loser.poll() is None:
            os.kill(loser.pid, signal.SIGKILL)
    assert "ConcurrentRunError" in err, err[-3000:]

    # (1) resumed: steps before the kill + steps of the rerun = the run's steps, the rerun's fewer
    train = won.metrics["train"]
    assert train["resumed_from"] and "/inrun/" in train["resumed_from"], train
    step = lambda path: json.loads(Path(path, "meta.json").read_text())["global_step"]  # noqa: E731
    start, end = step(first.checkpoint["path"]), step(won.checkpoint["path"])
    at_kill = int(Path(train["resumed_from"]).name.removeprefix("step-"))
    assert start < at_kill < end and end - start == train["steps"], (start, at_kill, end, train["steps"])
    assert end - at_kill < train["steps"]

    # (2) the metrics table agrees with the ledger row of the committed run
    record = Ledger(lake, cfg.lake.runs_table).latest(cfg.model.name)
    assert record.run_id == won.run_id and "candidate" in record.metrics["gate"]
    stored = [r for r in lake.read_arrow(cfg.lake.metrics_table).to_pylist() if r["run_id"] == won.run_id]
    gate = record.metrics["gate"]
    want = metric_rows(won.run_id, record.model, 1, 1, "gate", gate,
                       {"candidate": won.run_id, "champion": gate["champion_run_id"]}) + \
        metric_rows(won.run_id, record.model, 1, 1, "prequential", record.metrics["prequential"],
                    record.metrics["prequential"]["runs"])
    key = lambda r: (r["phase"], r["role"], r["metric"], r["value"], r["model_run_id"])  # noqa: E731
    assert sorted(map(key, stored)) == sorted(map(key, want))


def test_a_corrupt_first_run_checkpoint_skips_the_stale_comparison_and_the_night_commits(spark, tmp_path, demo_lake):
    """The lineage's first model is only the prequential 'stale' baseline:
    when its checkpoint is corrupt the night still commits, without that
    comparison, and says why in the run's metrics (#21 §5)."""
    from pathlib import Path

    from test_recommend import BASE

    root = tmp_path / "lake"
    (first, second), _ = demo_lake(root, *BASE)  # test_recommend's and test_serve's lake, built once
    cfg = make_config(root, *BASE, "recommend.enabled=false")
    lake = open_lake(cfg.lake, spark)
    ledger = Ledger(lake, cfg.lake.runs_table)
    assert ledger.champion(cfg.model.name).run_id == second.run_id  # the warm start is intact
    weights = Path(ledger.runs(cfg.model.name)[0].checkpoint_path, "model.safetensors")
    weights.write_bytes(weights.read_bytes()[:-8] + b"garbage!")
    days, items, _ = demo_days(cfg)
    append_day(lake, cfg, days[cfg.demo.history_days + cfg.demo.nights][1], items)

    third = run_nightly(spark, cfg, lake=lake)
    assert third.status == "committed" and third.parent == second.run_id
    pre = Ledger(lake, cfg.lake.runs_table).latest(cfg.model.name).metrics["prequential"]
    assert "stale" not in pre and "stale" not in pre["runs"] and pre["champion"], pre
    assert first.run_id in pre["errors"]["stale"] and "skipped" in pre["errors"]["stale"], pre["errors"]


def test_a_closed_stdout_says_why_instead_of_dying_by_sigpipe(tmp_path):
    """`deltarec ... | head` whose reader has gone: before, SIGPIPE killed the
    process silently (exit -13); now one line says why, exit 141 (#21 §5)."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written
    try:
        proc = subprocess.run([sys.executable, "-m", "deltarec.cli", "config", "--conf",
                               str(ROOT / "conf" / "local.yaml"), "--set", f"lake.root={tmp_path}"],
                              stdout=write_end, stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(ROOT / "lib")})
    finally:
        os.close(write_end)
    assert proc.returncode == 128 + signal.SIGPIPE, (proc.returncode, proc.stderr[-2000:])
    assert "deltarec config: standard output was closed" in proc.stderr and "Traceback" not in proc.stderr, \
        proc.stderr[-2000:]


def test_a_damaged_or_mistyped_lake_fails_naming_the_table_and_the_fix(spark, tmp_path):
    """#21 §5: a mistyped lake.root creates nothing; a torn Delta log file and a
    source VACUUMed past the watermark fail with a message that names the
    table and what to do (deltarec nightly prints ``explain``'s line)."""
    import errno
    from pathlib import Path

    import pytest

    from deltarec.lake import LakeError, schemas
    from deltarec.lake.diagnose import explain
    from test_races import small_lake

    typo = make_config(tmp_path / "lakee", "demo.enabled=false")
    with pytest.raises(LakeError, match="is lake.root right"):
        run_nightly(spark, typo)
    assert not (tmp_path / "lakee").exists()  # no empty ledger, no directory

    cfg, lake = small_lake(spark, tmp_path / "lake")
    log = sorted(Path(lake.uri(cfg.lake.events_table), "_delta_log").glob("*.json"))[-1]
    whole = log.read_text()
    log.write_text(whole[: len(whole) // 2])  # a torn write of the newest version
    with pytest.raises(Exception) as torn:
        run_nightly(spark, cfg, lake=lake)
    hint = explain(torn.value, cfg)
    assert hint and repr(cfg.lake.events_table) in hint and str(log) in hint and "Restore" in hint, (torn.value, hint)
    log.write_text(whole)

    # the source rewritten and VACUUMed before any night consumed it: versions 0..2's files are gone
    lake.write(cfg.lake.events_table, pa.Table.from_pylist([], schema=schemas.BEHAVIOR_EVENTS), mode="overwrite",
               schema=schemas.BEHAVIOR_EVENTS)
    lake.vacuum(cfg.lake.events_table, 0, enforce_retention=False)
    with pytest.raises(Exception) as vacuumed:
        run_nightly(spark, cfg, lake=lake)
    hint = explain(vacuumed.value, cfg)
    assert hint and f"source table {cfg.lake.events_table!r}" in hint and "VACUUM" in hint, (vacuumed.value, hint)
    assert Ledger(lake, cfg.lake.runs_table).runs() == []

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "lake" / "checkpoints" / "x"))
    assert "disk is full" in explain(full, cfg) and "lake.root" in explain(full, cfg)
    assert explain(ValueError("something else"), cfg) is None
