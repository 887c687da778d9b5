"""`deltarec report`: PNG + HTML from the ledger and the metrics table (real Delta, delta-rs, no Spark)."""
import datetime as dt
import os
import subprocess
import sys

from conftest import ROOT, make_config
from deltarec.evaluation.prequential import metric_rows, store_metrics
from deltarec.evaluation.report import load_metrics, write_report
from deltarec.lake import open_lake
from deltarec.lake.ledger import CANDIDATE, CHAMPION, Ledger, RunRecord


def commit(ledger, i, status, parent, champion):
    now = dt.datetime.now(dt.timezone.utc)
    return ledger.commit(RunRecord(
        run_id=f"ranking-{i}", model="ranking", source_table="behavior_events", source_first=i, source_last=i,
        checkpoint_path=f"/nowhere/{i}", checkpoint_sha256="0" * 64, checkpoint_files={}, config={},
        code_version="test", metrics={}, started_at=now, parent_run_id=parent, status=status,
        status_reason="test"), expected_champion=champion)


def test_report_from_lake_tables(lake_root, tmp_path):
    cfg = make_config(lake_root)
    lake = open_lake(cfg.lake, None)
    ledger = Ledger(lake, cfg.lake.runs_table)
    commit(ledger, 0, CHAMPION, None, None)
    commit(ledger, 1, CHAMPION, "ranking-0", "ranking-0")
    commit(ledger, 2, CANDIDATE, "ranking-1", "ranking-1")
    values = {}
    for i in (1, 2):
        pre = {"k": 10, "users": 5, "champion": {"hr": 0.1 * i, "ndcg": 0.05 * i}, "stale": {"hr": 0.02, "ndcg": 0.01},
               "popularity": {"hr": 0.3, "ndcg": 0.2}}
        store_metrics(lake, cfg.lake.metrics_table, f"ranking-{i}", "prequential",
                      metric_rows(f"ranking-{i}", "ranking", i, i, "prequential", pre, {"champion": f"ranking-{i - 1}"}))
        gate = {"n": 50, "users": 5, "candidate": {"auc": 0.6 + i / 100}, "champion": {"auc": 0.61}}
        store_metrics(lake, cfg.lake.metrics_table, f"ranking-{i}", "gate",
                      metric_rows(f"ranking-{i}", "ranking", i, i, "gate", gate, {}))
        values[i] = pre["champion"]["ndcg"]
    # rewriting a night's rows replaces them instead of duplicating them
    store_metrics(lake, cfg.lake.metrics_table, "ranking-1", "gate",
                  metric_rows("ranking-1", "ranking", 1, 1, "gate",
                              {"n": 50, "candidate": {"auc": 0.7}, "champion": {"auc": 0.61}}, {}))
    # rows of an attempt that never committed are left out of the report
    store_metrics(lake, cfg.lake.metrics_table, "ranking-9", "gate",
                  metric_rows("ranking-9", "ranking", 9, 9, "gate", {"n": 1, "candidate": {"auc": 0.1}}, {}))
    rows = load_metrics(lake, cfg)
    assert {r["run_id"] for r in rows} == {"ranking-1", "ranking-2"}
    gate1 = [r for r in rows if r["run_id"] == "ranking-1" and r["phase"] == "gate" and r["role"] == "candidate"]
    assert [r["value"] for r in gate1] == [0.7]
    ndcg = {r["run_id"]: r["value"] for r in rows if r["role"] == "champion" and r["metric"] == "ndcg@10"}
    assert ndcg == {f"ranking-{i}": v for i, v in values.items()}
    scored = {r["run_id"]: r["model_run_id"] for r in rows if r["role"] == "champion" and r["metric"] == "ndcg@10"}
    assert scored == {"ranking-1": "ranking-0", "ranking-2": "ranking-1"}

    out = tmp_path / "report"
    res = subprocess.run([sys.executable, "-m", "deltarec.cli", "report", "--out", str(out), "--json",
                          "--conf", str(ROOT / "conf" / "local.yaml"), "--set", f"lake.root={lake_root}"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "lib")})
    assert res.returncode == 0, res.stderr
    png = (out / "metrics_over_nights.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    page = (out / "index.html").read_text()
    for i in (0, 1, 2):
        assert f"ranking-{i}" in page
    assert "candidate" in page and f"{values[2]:.4f}" in page and "0.7000" in page and "ranking-9" not in page

    again = write_report(lake, cfg, tmp_path / "r2")  # the library call the CLI makes
    assert again["runs"] == 3 and again["metric_rows"] == len(rows)


def test_runs_recorded_before_the_champion_key_still_read(lake_root):
    """Runs committed when the champion's next-day metrics were stored under
    'model' read like new ones in the lineage, the plot and `deltarec status`."""
    from deltarec.evaluation.report import lineage
    from deltarec.pipeline.console import status_line

    cfg = make_config(lake_root)
    ledger = Ledger(open_lake(cfg.lake, None), cfg.lake.runs_table)
    commit(ledger, 0, CHAMPION, None, None)
    now = dt.datetime.now(dt.timezone.utc)
    for i, key in ((1, "model"), (2, "champion")):  # an old run, then a new one
        ledger.commit(RunRecord(
            run_id=f"ranking-{i}", model="ranking", source_table="behavior_events", source_first=i, source_last=i,
            checkpoint_path=f"/nowhere/{i}", checkpoint_sha256="0" * 64, checkpoint_files={}, config={},
            code_version="test", metrics={"prequential": {"k": 10, key: {"hr": 0.5 + i / 10, "ndcg": 0.25 + i / 10}}},
            started_at=now, parent_run_id=f"ranking-{i - 1}", status=CHAMPION, status_reason="test"),
            expected_champion=f"ranking-{i - 1}")
    runs = ledger.runs("ranking")
    rows = lineage(runs)
    assert [r["ndcg"] for r in rows] == [None, 0.35, 0.45] and [r["hr"] for r in rows] == [None, 0.6, 0.7]
    assert rows[2]["chain"] == "ranking-2 <- ranking-1 <- ranking-0"
    assert " 0.3500 " in status_line(runs[1], "then") and " 0.4500 " in status_line(runs[2], "then")
    assert "   -       -  " in status_line(runs[0], "then")  # the first run has no next-day metrics
