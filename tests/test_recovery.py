"""A way back from a bad night (#18 items 6 and 10): `registry exclude /
include`, gate.max_consecutive_rejections, and `deltarec skip VERSIONS`.
Real Delta tables (delta-rs) on a ratings table of our own (viewer, film,
score); real ledger commits and registry events; checkpoints are real
manifests that verify. No Spark: what a night trains on and from which
parent are the functions the night calls (inputs.training_files,
strategy.choose_strategy, nightly.next_range)."""
import datetime as dt
import hashlib
import json

import pyarrow as pa
import pytest

from conftest import ROOT, make_config
from deltarec.lake import LakeError, open_lake
from deltarec.lake.ledger import CANDIDATE, CHAMPION, Ledger, RunRecord
from deltarec.pipeline.inputs import select_inputs, training_files
from deltarec.pipeline.strategy import choose_strategy
from deltarec.registry import events
from deltarec.registry.exclusions import exclude, excluded_runs, include

OWN = ["demo.enabled=false", "lake.events_table=film_ratings"]


def setup(lake_root, *overrides):
    cfg = make_config(lake_root, *OWN, *overrides)
    lake = open_lake(cfg.lake, None)
    ledger = Ledger(lake, cfg.lake.runs_table)
    ledger.ensure()
    return cfg, lake, ledger


def checkpoint(lake_root, run_id):
    """A checkpoint folder whose manifest verifies (no weights: nothing here loads it)."""
    path = lake_root / "checkpoints" / run_id
    path.mkdir(parents=True)
    manifest = json.dumps({"files": {}}).encode()
    (path / "manifest.json").write_bytes(manifest)
    return str(path), hashlib.sha256(manifest).hexdigest()


def commit(ledger, cfg, lake_root, run_id, first, *, status=CANDIDATE, passed=None, verdict=None,
           strategy="incremental", parent=None, trained_on=None):
    path, sha = checkpoint(lake_root, run_id)
    gate = {"decision": {"passed": passed, "reason": "test", **({"verdict": verdict} if verdict else {})}}
    ledger.commit(RunRecord(
        run_id=run_id, model=cfg.model.name, source_table=cfg.lake.events_table, source_first=first,
        source_last=first, checkpoint_path=path, checkpoint_sha256=sha, checkpoint_files={}, config={},
        code_version="test", metrics={"gate": gate, "inputs": {"run_ids": trained_on or [run_id]}},
        started_at=dt.datetime.now(dt.timezone.utc), strategy=strategy, parent_run_id=parent, status=status,
        status_reason="test"), expected_champion=ledger.champion(cfg.model.name) and
        ledger.champion(cfg.model.name).run_id)


def examples(lake, cfg, run_ids):
    """Each run's training examples (viewer 1..3 rating film f<n>), partitioned by run_id as the night writes."""
    for n, rid in enumerate(run_ids):
        lake.write(cfg.lake.examples_table, pa.table({
            "run_id": [rid] * 3, "user_idx": [1, 2, 3], "item_idx": [n] * 3, "label": [1.0, 0.0, 1.0]}),
            partition_by=["run_id"])


def files_of(lake, cfg, *run_ids):
    return [f for rid in run_ids for f in lake.data_files(cfg.lake.examples_table, {"run_id": rid})]


# ---------------------------------------------------------------- item 6: exclude / include
def test_an_excluded_run_is_never_trained_on_again_until_included(lake_root, capsys):
    from deltarec.cli import main

    cfg, lake, ledger = setup(lake_root)
    commit(ledger, cfg, lake_root, "good", 0, status=CHAMPION, passed=True, strategy="full")
    commit(ledger, cfg, lake_root, "bad", 1, passed=False, parent="good")
    commit(ledger, cfg, lake_root, "after", 2, passed=False, parent="good")
    examples(lake, cfg, ["good", "bad", "after", "tonight"])
    champ = ledger.get("good")
    assert training_files(cfg, lake, ledger, "tonight", "incremental", champ) == \
        files_of(lake, cfg, "bad", "after", "tonight")  # the precondition: the bad night is trained on

    with pytest.raises(LakeError, match="is the champion.*rollback"):
        exclude(ledger, lake, cfg, "good", reason="no")
    out = exclude(ledger, lake, cfg, "bad", reason="bad upstream load", by="ops")
    assert out["source_versions"] == [1, 1] and set(excluded_runs(lake, cfg)) == {"bad"}
    with pytest.raises(LakeError, match="already excluded.*registry include bad"):
        exclude(ledger, lake, cfg, "bad", reason="again")
    # the next night's inputs, incremental and full, leave its examples out
    night = select_inputs(None, cfg, lake, ledger, "tonight", choose_strategy(cfg, ledger), 3)  # as run_nightly
    assert night.files == files_of(lake, cfg, "after", "tonight") and night.replay == []
    assert training_files(cfg, lake, ledger, "tonight", "incremental", champ) == \
        files_of(lake, cfg, "after", "tonight")
    assert training_files(cfg, lake, ledger, "tonight", "full", None) == files_of(lake, cfg, "good", "after", "tonight")
    # recorded in registry_events, and visible in status
    ev = [e for e in events(lake, cfg, "bad") if e["action"] == "exclude"]
    assert [(e["by"], e["reason"]) for e in ev] == [("ops", "bad upstream load")]
    conf = ["--conf", str(ROOT / "conf" / "local.yaml"), "--set", f"lake.root={lake_root}", "--set",
            "lake.events_table=film_ratings"]
    assert main(["status", "--json", *conf]) == 0
    status = json.loads(capsys.readouterr().out)
    assert [(e["run_id"], e["reason"]) for e in status["excluded"]] == [("bad", "bad upstream load")]
    assert main(["status", *conf]) == 0
    assert "excluded from training: run bad by ops" in capsys.readouterr().out

    assert main(["registry", "include", "bad", "--reason", "upstream fixed", *conf]) == 0  # undo
    assert "again trained on" in capsys.readouterr().out and excluded_runs(lake, cfg) == {}
    assert training_files(cfg, lake, ledger, "tonight", "incremental", champ) == \
        files_of(lake, cfg, "bad", "after", "tonight")
    with pytest.raises(LakeError, match="not excluded"):
        include(ledger, lake, cfg, "bad")
    with pytest.raises(SystemExit):  # --reason is required
        main(["registry", "exclude", "after", *conf])


def test_a_parent_that_learned_from_an_excluded_run_is_not_warm_started_from(lake_root):
    cfg, lake, ledger = setup(lake_root)
    commit(ledger, cfg, lake_root, "r0", 0, status=CHAMPION, passed=True, strategy="full")
    commit(ledger, cfg, lake_root, "bad", 1, passed=False, parent="r0")
    # r2 trained incrementally on bad's examples and won the gate: its weights hold them
    commit(ledger, cfg, lake_root, "r2", 2, status=CHAMPION, passed=True, parent="r0", trained_on=["bad", "r2"])
    assert choose_strategy(cfg, ledger).strategy == "incremental"
    exclude(ledger, lake, cfg, "bad", reason="poisoned")
    choice = choose_strategy(cfg, ledger)
    assert choice.strategy == "full" and choice.parent.run_id == "r2" and choice.warm is None
    assert "learned from excluded run(s) bad" in choice.describe()
    explicit = make_config(lake_root, *OWN, "train.strategy=incremental")
    with pytest.raises(ValueError, match="learned from excluded run.*train.strategy=full"):
        choose_strategy(explicit, ledger)


# ---------------------------------------------------------------- item 6: max_consecutive_rejections
def test_after_max_consecutive_rejections_the_next_night_retrains_from_scratch(lake_root):
    cfg, lake, ledger = setup(lake_root, "gate.max_consecutive_rejections=3")
    commit(ledger, cfg, lake_root, "r0", 0, status=CHAMPION, passed=True, strategy="full")
    commit(ledger, cfg, lake_root, "r1", 1, passed=False, parent="r0")
    commit(ledger, cfg, lake_root, "r2", 2, passed=False, parent="r0")
    # too few users to decide: neither a rejection nor the end of the streak
    commit(ledger, cfg, lake_root, "r3", 3, passed=False, verdict="insufficient_evidence", parent="r0")
    two = choose_strategy(cfg, ledger)
    assert (two.strategy, two.reason) == ("incremental", "")
    commit(ledger, cfg, lake_root, "r4", 4, passed=False, parent="r0")
    full = choose_strategy(cfg, ledger)
    assert full.strategy == "full" and full.warm is None and full.parent.run_id == "r0"
    assert "3 rejected candidates in a row (r1, r2, r4), gate.max_consecutive_rejections=3" in full.describe()
    # an explicit strategy is not overridden, and the reason says why
    kept = choose_strategy(make_config(lake_root, *OWN, "gate.max_consecutive_rejections=3",
                                       "train.strategy=incremental"), ledger)
    assert kept.strategy == "incremental" and "NOT retraining from scratch" in kept.reason
    assert choose_strategy(make_config(lake_root, *OWN, "gate.max_consecutive_rejections=0"),
                           ledger).strategy == "incremental"  # 0: the rule is off
    # the full retrain, rejected too, starts a new count
    commit(ledger, cfg, lake_root, "r5", 5, passed=False, parent="r0", strategy="full")
    assert choose_strategy(cfg, ledger).strategy == "incremental"


# ---------------------------------------------------------------- item 10: skip
def test_skip_consumes_a_contiguous_range_with_no_training(lake_root, capsys):
    from deltarec.cli import main
    from deltarec.pipeline.nightly import next_range
    from deltarec.registry.skip import skip

    cfg, lake, ledger = setup(lake_root)
    for day in range(4):  # versions 0..3 of a ratings table of our own
        lake.write(cfg.lake.events_table, pa.table({"viewer": [1, 2], "film": ["f1", f"f{day}"],
                                                    "score": [7.0, 9.0]}), enable_cdf=day == 0)
    commit(ledger, cfg, lake_root, "r0", 0, status=CHAMPION, passed=True, strategy="full")
    with pytest.raises(LakeError, match="must start at version 1 .*deltarec skip 1..2"):
        skip(ledger, lake, cfg, "2..2", reason="gap")
    with pytest.raises(LakeError, match="already consumed up to version 0; the next unconsumed version is 1"):
        skip(ledger, lake, cfg, "0..1", reason="overlap")
    with pytest.raises(LakeError, match="at version 3; only versions that exist"):
        skip(ledger, lake, cfg, "1..7", reason="future")
    with pytest.raises(LakeError, match="not a version range"):
        skip(ledger, lake, cfg, "1-2", reason="typo")
    conf = ["--conf", str(ROOT / "conf" / "local.yaml"), "--set", f"lake.root={lake_root}", "--set",
            "lake.events_table=film_ratings"]
    assert main(["skip", "1..2", "--reason", "bad upstream load", "--by", "ops", *conf]) == 0
    assert "versions 1..2 with no training (watermark 0 -> 2)" in capsys.readouterr().out
    assert ledger.watermark(cfg.model.name) == 2 and next_range(cfg, lake, ledger) == (3, 3)  # the next night
    rows = ledger.runs(cfg.model.name, skipped=True)
    assert [(r.run_id, r.status, r.strategy, r.status_reason, r.status_by) for r in rows[1:]] == \
        [("ranking-skip-000001-000002", "skipped", "skip", "bad upstream load", "ops")]
    assert [r.run_id for r in ledger.runs(cfg.model.name)] == ["r0"]  # not a run: nothing trains or serves from it
    assert choose_strategy(cfg, ledger).parent.run_id == "r0"
    assert main(["status", "--json", *conf]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["watermark"] == 2 and status["skipped"][0]["source_versions"] == [1, 2]
    assert main(["status", *conf]) == 0
    assert "skipped: versions 1..2 (no training) by ops" in capsys.readouterr().out
    assert main(["skip", "3", "--reason", "x", *conf]) == 0 and next_range(cfg, lake, ledger) is None
