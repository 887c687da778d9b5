"""deltarec maintain (#20 item 5): OPTIMIZE compacts deltarec's own tables
without changing a row, VACUUM deletes the files no version needs, checkpoint
attempts no run committed go (committed ones and replay samples stay), the
source table is never touched, and status shows files and bytes per table."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from conftest import make_config

from deltarec.cli import main
from deltarec.lake import open_lake
from deltarec.lake.ledger import Ledger
from deltarec.maintain import compacted_tables, maintain, table_sizes
from deltarec.pipeline.demo import append_day, demo_days
from deltarec.pipeline.nightly import run_nightly
from deltarec.train.checkpoint import verify_checkpoint

RETENTION = ("maintain.retention_hours=0", "maintain.enforce_retention=false")


def parquet_on_disk(lake_root, table) -> set[str]:
    return {str(p) for p in Path(lake_root, table).rglob("*.parquet")}


def sorted_rows(lake, table):
    t = lake.read_arrow(table)
    return t.sort_by([(c, "ascending") for c in t.column_names
                      if not str(t.schema.field(c).type).startswith(("list", "large_list", "map", "struct"))])


def test_maintain_compacts_vacuums_and_drops_uncommitted_checkpoints(spark, lake_root, real_data_path, capsys):
    cfg = make_config(lake_root, "demo.enabled=false", "recommend.enabled=true", *RETENTION)
    lake = open_lake(cfg.lake, spark)
    days, items, _ = demo_days(cfg)
    for i in range(3):  # three nights: every state table MERGEd three times, the ledger appended to
        append_day(lake, cfg, days[i][1], items)
        run_nightly(spark, cfg, lake=lake)
    ledger = Ledger(lake, cfg.lake.runs_table)
    runs = ledger.runs(cfg.model.name)
    assert len(runs) == 3

    committed = runs[-1].checkpoint_path
    run_dir = os.path.dirname(committed)
    stale, fresh = os.path.join(run_dir, "deadbeef"), os.path.join(run_dir, "inrun")
    shutil.copytree(committed, stale)  # an attempt a rerun replaced
    shutil.copytree(committed, fresh)  # a night writing right now
    old = time.time() - 3600
    for dirpath, _, files in os.walk(stale):
        for f in [*files, ""]:
            os.utime(os.path.join(dirpath, f) if f else dirpath, (old, old))
    source = cfg.lake.events_table
    source_files, source_version = parquet_on_disk(lake_root, source), lake.version(source)
    contents = {t: sorted_rows(lake, t) for t in compacted_tables(cfg) if lake.exists(t)}
    before = table_sizes(lake, list(contents))
    grown = [t for t, s in before.items() if s["files"] > 1]
    assert grown, before  # something to compact, or the test proves nothing
    rec = cfg.recommend.table
    assert rec in contents, before  # each night rewrote it: maintain keeps its rows, drops replaced files

    one_hour = cfg.replace(maintain=cfg.maintain.replace(retention_hours=1))
    report = maintain(one_hour, lake, optimize=False, vacuum=False)
    assert report["checkpoints_removed"] == [stale]  # older than 1 h; "inrun" is younger and stays
    assert os.path.isdir(fresh) and os.path.isdir(committed)

    report = maintain(cfg, lake)  # retention 0: everything no version needs goes
    for t in grown:
        e = report["tables"][t]
        assert e["optimize"]["files_removed"] >= 2 and e["files_after"] < e["files_before"], (t, e)
        # VACUUM: what is on disk is exactly what the current version references
        assert len(parquet_on_disk(lake_root, t)) == e["files_after"], t
    for t, rows in contents.items():
        assert sorted_rows(lake, t).equals(rows), t  # compaction changes no row
    e = report["tables"][rec]
    assert e["vacuumed_files"] >= 1 and len(parquet_on_disk(lake_root, rec)) == e["files_after"], e
    assert not os.path.exists(fresh)  # retention 0: the in-run folder of a run that committed goes too
    for r in ledger.runs(cfg.model.name):  # committed checkpoints and the examples they name stay
        verify_checkpoint(r.checkpoint_path, r.checkpoint_sha256)
        for f in lake.data_files(cfg.lake.examples_table, {"run_id": r.run_id}):
            assert os.path.exists(f.removeprefix("file://")), f
    assert parquet_on_disk(lake_root, source) == source_files and lake.version(source) == source_version

    append_day(lake, cfg, days[3][1], items)  # the next night runs on the maintained lake
    assert run_nightly(spark, cfg, lake=lake).status == "committed"

    capsys.readouterr()
    assert main(["status", "--json", "--conf", str(Path(__file__).parents[1] / "conf" / "local.yaml"),
                 "--set", f"lake.root={lake_root}"]) == 0
    tables = json.loads(capsys.readouterr().out)["tables"]
    now = table_sizes(lake, list(tables))
    assert tables == now and tables[cfg.lake.user_state_table]["files"] >= 1
    assert tables[cfg.lake.examples_table]["bytes"] > 0


def test_a_failing_maintain_after_the_night_leaves_the_commit_standing(spark, lake_root):
    """Any error of the end-of-night step (here delta-rs's own, from OPTIMIZE
    reading a damaged file: not a LakeError nor an OSError) is logged and
    returned: the night it follows is committed and must not be reported as
    failed."""
    import pyarrow as pa

    from deltarec.lake import schemas
    from deltarec.maintain import maybe_maintain

    cfg = make_config(lake_root, "maintain.every_nights=1", *RETENTION)
    lake = open_lake(cfg.lake, spark)
    ledger = Ledger(lake, cfg.lake.runs_table)
    table = cfg.lake.event_index_table
    rows = pa.Table.from_pylist([{"event_id": f"e{n}", "source_version": n} for n in range(4)])
    rows = pa.Table.from_pylist(rows.to_pylist(), schema=schemas.EVENT_INDEX)
    for n in range(2):  # two small files: OPTIMIZE has work to do
        lake.write(table, rows.slice(2 * n, 2), schema=schemas.EVENT_INDEX)
    damaged = sorted(parquet_on_disk(lake_root, table))[0]
    Path(damaged).write_bytes(b"not parquet")
    out = maybe_maintain(cfg, lake, ledger)
    assert out is not None and "error" in out and out["error"], out
