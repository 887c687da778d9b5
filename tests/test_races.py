"""A run that loses a race changes nothing (#21 §1): its state writes never
take the winner's place, whether it resumes before its writes (the ledger
guard stops it) or in the middle of them (the writes' own conditions hold).
Each race is compared with a clean twin lake, row for row."""
import datetime as dt
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pytest

from conftest import ROOT, make_config
from deltarec.lake import open_lake, schemas
from deltarec.lake.engine import ConcurrentRunError
from deltarec.lake.ledger import Ledger
from deltarec.pipeline import delta_job as J
from deltarec.pipeline.demo import append_day, demo_days
from deltarec.pipeline.nightly import run_nightly

T0 = dt.datetime.now(dt.timezone.utc).replace(microsecond=0) - dt.timedelta(days=2)
STATE = ("event_index", "user_state", "item_stats")


def ev(eid, user, item, hours):
    return {"event_id": eid, "user_id": user, "item_id": item, "event_time": T0 + dt.timedelta(hours=hours),
            "event_type": "purchase", "order_id": "o", "quantity": 1, "price": 1.0, "rating": None}


VERSIONS = [  # v0, v1, v2: u1 and i1 are touched by every version
    [ev("a", "u1", "i1", 1), ev("b", "u2", "i2", 2)],
    [ev("c", "u1", "i1", 3), ev("d", "u3", "i3", 4)],
    [ev("e", "u1", "i1", 5), ev("f", "u4", "i2", 6)],
]


def state_rows(lake) -> dict[str, list]:
    return {t: sorted(map(repr, lake.read_arrow(t).to_pylist())) for t in STATE}


def small_lake(spark, root):
    cfg = make_config(root, "demo.enabled=false", "features.negatives=0")
    lake = open_lake(cfg.lake, spark)
    for rows in VERSIONS:
        lake.write(cfg.lake.events_table, pa.Table.from_pylist(rows, schema=schemas.BEHAVIOR_EVENTS),
                   enable_cdf=True, schema=schemas.BEHAVIOR_EVENTS)
    return cfg, lake


def test_loser_resumed_at_its_state_writes_leaves_the_winners_state(spark, tmp_path):
    """The loser's state is computed after the winner's writes (as when it is
    paused between its ledger check and its first write): its writes keep no
    row of the winner's later version from standing."""
    cfg, lake = small_lake(spark, tmp_path / "lake")
    J.prepare_night(spark, cfg, lake, 0, 0, "r0")
    J.prepare_night(spark, cfg, lake, 1, 2, "winner")
    J.prepare_night(spark, cfg, lake, 1, 1, "loser")  # no ledger row: only the write conditions protect

    tcfg, twin = small_lake(spark, tmp_path / "twin")
    J.prepare_night(spark, tcfg, twin, 0, 0, "r0")
    J.prepare_night(spark, tcfg, twin, 1, 2, "winner")
    got, want = state_rows(lake), state_rows(twin)
    for t in STATE:
        assert got[t] == want[t], t


def nightly_args(root) -> list[str]:
    args = [sys.executable, "-m", "deltarec.cli", "nightly", "--conf", str(ROOT / "conf" / "local.yaml")]
    for o in [f"lake.root={root}", "demo.enabled=false", "train.backend=local", "train.num_proc=1",
              "train.batch_size=256", "features.user_buckets=2048", "features.item_buckets=1024",
              "model.embedding_dim=8", "model.hidden=[16]", "spark.master=local[1]"]:
        args += ["--set", o]
    return args


def wait_for_line(proc, text: str, limit: float = 300) -> list[str]:
    seen, end = [], time.monotonic() + limit
    while time.monotonic() < end:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if text in line:
            return seen
    raise AssertionError(f"{text!r} never logged:\n{''.join(seen[-40:])}")


def test_paused_loser_fails_at_the_guard_and_changes_no_state(spark, tmp_path, real_data_path):
    """The issue's race: night A is SIGSTOPped right after it logs what it
    consumes; a new day arrives; night B commits it all; A resumes and must
    fail without touching the lake: the state equals a twin that never raced."""
    import shutil

    root, twin_root = tmp_path / "lake", tmp_path / "twin"
    cfg = make_config(root, "demo.enabled=false")
    lake = open_lake(cfg.lake, spark)
    days, items, _ = demo_days(cfg)
    append_day(lake, cfg, days[0][1], items)
    run_nightly(spark, cfg, lake=lake)  # the first night, 0..0
    append_day(lake, cfg, days[1][1], items)
    shutil.copytree(root, twin_root)

    loser = subprocess.Popen(nightly_args(root), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                             cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "lib")})
    try:
        wait_for_line(loser, "consuming")
        os.kill(loser.pid, signal.SIGSTOP)
        append_day(lake, cfg, days[2][1], items)
        won = run_nightly(spark, cfg, lake=lake)
        assert won.source_versions[1] == lake.version(cfg.lake.events_table)
        os.kill(loser.pid, signal.SIGCONT)
        err = loser.stderr.read()
        assert loser.wait(timeout=300) != 0
    finally:
        if loser.poll() is None:
            os.kill(loser.pid, signal.SIGKILL)
    assert "ConcurrentRunError" in err and "another run" in err, err[-3000:]

    tcfg = make_config(twin_root, "demo.enabled=false")
    twin = open_lake(tcfg.lake, spark)
    append_day(twin, tcfg, days[2][1], items)
    run_nightly(spark, tcfg, lake=twin)
    got, want = state_rows(lake), state_rows(twin)
    for t in STATE:
        assert got[t] == want[t], t
    assert [r.run_id for r in Ledger(lake).runs()] == [r.run_id for r in Ledger(twin).runs()]
