"""Registry end to end on small real data, real Spark, real Delta, real torch:
a deliberately worse candidate (absurd learning rate) is rejected with its
reason, a normal one is promoted in one commit and logged to MLflow, the
prequential table is filled per night, `reproduce` rebuilds a checkpoint,
and `rollback` restores the previous champion with who and why."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, make_config
from deltarec.lake import open_lake
from deltarec.lake.ledger import CANDIDATE, CHAMPION, RETIRED, Ledger
from deltarec.pipeline.demo import append_day, demo_days, run_demo
from deltarec.pipeline.nightly import run_nightly

BASE = ("demo.history_days=2", "demo.nights=1", "train.epochs=2")


def cli(lake_root, *args):
    out = subprocess.run(
        [sys.executable, "-m", "deltarec.cli", *args, "--conf", str(ROOT / "conf" / "local.yaml"),
         "--set", f"lake.root={lake_root}"], capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT / "lib"), "USER": "tester"})
    return out


@pytest.fixture(scope="module")
def nights(spark, tmp_path_factory, real_data_path):
    """demo (full run + one night), a worse night (rejected), an operator promoting it anyway, then a
    sound full retrain gated against that wrecked champion (promoted) with MLflow on."""
    from deltarec.pipeline.plan import plan
    from deltarec.pipeline.prequential import score_prequential
    from deltarec.registry import promote

    root = tmp_path_factory.mktemp("registry") / "lake"
    cfg = make_config(root, *BASE)
    # gate off for the demo's night: the second run is promoted whatever its metrics
    first, second = run_demo(spark, make_config(root, *BASE, "gate.enabled=false"), out=lambda *_: None)
    lake = open_lake(cfg.lake, spark)
    ledger = Ledger(lake, cfg.lake.runs_table)
    days, items, _ = demo_days(cfg)
    champion_before_worse = ledger.champion(cfg.model.name)

    append_day(lake, cfg, days[3][1], items)
    worse_cfg = make_config(root, *BASE, "train.lr=1000.0")  # through real training: it wrecks the weights
    worse = run_nightly(spark, worse_cfg, lake=lake)
    # what the next night's prequential step scores while the rejected candidate is the newest run
    probe = score_prequential(cfg, lake, ledger,
                              lake.read(cfg.lake.examples_table).where(f"run_id = '{worse.run_id}'"),
                              lake.read(cfg.lake.items_table), ledger.champion(cfg.model.name))
    append_day(lake, cfg, days[4][1], items)
    plan_after_reject = plan(spark, cfg, lake=lake)  # what the next night would do now
    promote(ledger, lake, cfg, worse.run_id, by="ops", reason="test: serve the wrecked model")

    mlruns = root.parent / "mlruns"
    ml_cfg = make_config(root, *BASE, "mlflow.enabled=true", f"mlflow.tracking_uri=file://{mlruns}",
                         "mlflow.experiment=test-exp", "mlflow.registered_model=test-model",
                         "train.strategy=full")  # a sound model from scratch, gated against the wrecked one
    runs_version = lake.version(cfg.lake.runs_table)
    better = run_nightly(spark, ml_cfg, lake=lake)
    return dict(cfg=cfg, lake=lake, ledger=ledger, root=root, first=first, second=second, worse=worse,
                better=better, champion_before_worse=champion_before_worse, mlruns=mlruns, ml_cfg=ml_cfg,
                runs_version_before_better=runs_version, probe=probe, plan_after_reject=plan_after_reject)


def test_first_run_is_champion_and_every_run_advances_the_watermark(nights):
    ledger, cfg = nights["ledger"], nights["cfg"]
    runs = ledger.runs(cfg.model.name)
    assert len(runs) == 4
    from deltarec.registry import events

    first_event = events(nights["lake"], cfg, runs[0].run_id)[0]
    assert runs[0].parent_run_id is None and first_event["action"] == "first"
    assert first_event["reason"].startswith("first run") and runs[0].status == RETIRED
    assert ledger.watermark(cfg.model.name) == runs[-1].source_last  # the rejected candidate counts too
    assert [r.status for r in runs].count(CHAMPION) == 1
    # gate.enabled=false promoted the demo's night without evaluating it
    assert nights["second"].registry_status == CHAMPION and "gate.enabled=false" in nights["second"].gate["decision"]["reason"]
    assert nights["champion_before_worse"].run_id == nights["second"].run_id


def test_worse_candidate_is_not_promoted_and_the_reason_is_stored(nights):
    ledger, cfg, worse = nights["ledger"], nights["cfg"], nights["worse"]
    from deltarec.registry import events

    row = ledger.get(worse.run_id)  # an operator promoted it later (the fixture), so read the record of the night
    assert worse.registry_status == CANDIDATE
    gate_event = events(nights["lake"], cfg, worse.run_id)[0]
    assert (gate_event["action"], gate_event["by"]) == ("gate_reject", "gate")
    reason = row.metrics["gate"]["decision"]["reason"]
    assert reason.startswith("gate failed") and gate_event["reason"] == reason
    checks = row.metrics["gate"]["decision"]["checks"]
    assert any(not c["passed"] and c["candidate"] < c["champion"] for c in checks)
    for c in checks:  # the stored reason names each failed metric with both values
        if not c["passed"]:
            assert c["metric"] in reason and f"{c['candidate']:.5f}" in reason
    # the champion kept serving: the worse night's parent, and still champion until the next night
    assert row.parent_run_id == nights["champion_before_worse"].run_id


def test_better_candidate_is_promoted_in_one_commit_from_the_champion(nights):
    ledger, cfg, lake, better, worse = nights["ledger"], nights["cfg"], nights["lake"], nights["better"], nights["worse"]
    row = ledger.get(better.run_id)
    assert row.status == CHAMPION and row.metrics["gate"]["decision"]["passed"]
    checks = row.metrics["gate"]["decision"]["checks"]
    assert all(c["passed"] and c["candidate"] > c["champion"] for c in checks)
    retired = ledger.get(worse.run_id)  # the champion it beat
    assert retired.status == RETIRED and retired.status_reason == f"superseded by {better.run_id}"
    assert row.parent_run_id == worse.run_id and row.metrics["train"]["warm_start"] is None
    # full = every committed run's examples plus tonight's (contract 3)
    all_runs = [r.run_id for r in ledger.runs(cfg.model.name)]
    assert row.metrics["inputs"]["run_ids"] == all_runs
    ex = lake.read_arrow(cfg.lake.examples_table)
    trainable = ex.num_rows - (sum(ex["holdout"].to_pylist()) if "holdout" in ex.column_names else 0)
    assert row.metrics["train"]["examples_trained"] == trainable * cfg.train.full_epochs  # holdout never trains
    # insert of the new row + retirement of the old champion = exactly one new version of the runs table
    assert lake.version(cfg.lake.runs_table) == nights["runs_version_before_better"] + 1
    assert lake.history(cfg.lake.runs_table)[0]["operation"] == "MERGE"


def test_plan_names_the_champion_as_parent_after_a_rejected_candidate(nights):
    """`deltarec plan` says what the night does: warm start from the usable
    champion, not from the newest run (here a rejected candidate)."""
    p, second, worse = nights["plan_after_reject"], nights["second"].run_id, nights["worse"].run_id
    assert nights["worse"].registry_status == CANDIDATE  # the precondition: the newest run is not the champion
    assert (p["strategy"], p["parent"], p["error"]) == ("incremental", second, None)
    assert f"incremental from {second}" in p["note"] and worse not in p["note"]


def test_incremental_trains_on_the_runs_after_the_champion(nights):
    from deltarec.pipeline.inputs import training_files

    ledger, cfg, lake = nights["ledger"], nights["cfg"], nights["lake"]
    second, worse, better = nights["second"].run_id, nights["worse"].run_id, nights["better"].run_id
    got = training_files(cfg, lake, ledger, "tonight", "incremental", ledger.get(second))
    want = []
    for rid in (worse, better, "tonight"):  # candidates after the champion, then tonight: each version once
        want += lake.data_files(cfg.lake.examples_table, {"run_id": rid})
    assert got == want and len(got) >= 2


def test_prequential_metrics_are_stored_per_night(nights):
    lake, cfg, better, worse = nights["lake"], nights["cfg"], nights["better"], nights["worse"]
    # with a rejected candidate newer than the champion, the candidate is scored next to it
    probe = nights["probe"]
    assert probe["runs"] == {"champion": nights["second"].run_id, "candidate": worse.run_id,
                             "stale": nights["first"].run_id}
    assert {"champion", "candidate", "stale"} <= set(probe) and probe["candidate"] != probe["champion"]
    rows = lake.read_arrow(cfg.lake.metrics_table).to_pylist()
    pre = [r for r in rows if r["run_id"] == better.run_id and r["phase"] == "prequential"]
    assert {r["role"] for r in pre} == {"champion", "stale", "popularity"}
    by = {(r["role"], r["metric"]): r for r in pre}
    k = cfg.eval.k
    assert by[("champion", f"ndcg@{k}")]["value"] == better.prequential["champion"]["ndcg"]
    assert by[("champion", f"hr@{k}")]["model_run_id"] == worse.run_id  # the champion serving that night
    assert by[("stale", f"hr@{k}")]["value"] == better.prequential["stale"]["hr"]
    gate = [r for r in rows if r["run_id"] == better.run_id and r["phase"] == "gate"]
    assert {(r["role"], r["metric"]) for r in gate} == {(ro, m) for ro in ("candidate", "champion")
                                                          for m in cfg.gate.metrics}
    # every committed night after the first has its rows, exactly once (replaceWhere per run and phase)
    keys = [(r["run_id"], r["phase"], r["role"], r["metric"]) for r in rows]
    assert len(keys) == len(set(keys))
    assert {r["run_id"] for r in rows} == {nights["second"].run_id, worse.run_id, better.run_id}


def test_mlflow_logged_params_metrics_checkpoint_and_alias(nights):
    from mlflow import MlflowClient

    better, mlruns = nights["better"], nights["mlruns"]
    assert "error" not in better.mlflow, better.mlflow
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    uri = f"file://{mlruns}"
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = c.get_experiment_by_name("test-exp")
    (run,) = c.search_runs([exp.experiment_id])
    assert run.data.tags["deltarec_run_id"] == better.run_id
    assert run.data.params["train.lr"] == str(nights["ml_cfg"].train.lr)
    row = nights["ledger"].get(better.run_id)
    assert run.data.metrics["gate.candidate.auc"] == pytest.approx(row.metrics["gate"]["candidate"]["auc"])
    arts = {a.path for a in c.list_artifacts(run.info.run_id, "checkpoint")}
    assert {"checkpoint/manifest.json", "checkpoint/model.safetensors"} <= arts
    assert c.get_model_version_by_alias("test-model", "champion").tags["deltarec_run_id"] == better.run_id


def test_registry_list_and_show_json(nights):
    out = cli(nights["root"], "registry", "list", "--json")
    assert out.returncode == 0, out.stderr
    entries = json.loads(out.stdout)
    runs = nights["ledger"].runs(nights["cfg"].model.name)
    assert [(e["id"], e["status"], e["parent"]) for e in entries] == [
        (r.run_id, r.status, r.parent_run_id) for r in runs]
    better = nights["better"].run_id
    out = cli(nights["root"], "registry", "show", better, "--json")
    assert out.returncode == 0, out.stderr
    show = json.loads(out.stdout)
    first, second, worse = nights["first"].run_id, nights["second"].run_id, nights["worse"].run_id
    assert [c["id"] for c in show["parent_chain"]] == [worse, second, first]
    assert show["inputs"]["examples_version"] is not None
    assert [t["id"] for t in show["inputs"]["trained_on"]] == [first, second, worse, better]
    assert show["config"]["train"]["lr"] == nights["ml_cfg"].train.lr and show["code_version"]
    assert show["metrics"]["gate"]["decision"]["passed"] is True
    assert [e["action"] for e in show["events"]][-1] == "gate_promote"
    bad = cli(nights["root"], "registry", "show", "no-such-run", "--json")
    assert bad.returncode == 1 and "no run 'no-such-run'" in bad.stderr


def test_reproduce_rebuilds_the_checkpoint(spark, nights):
    from deltarec.registry.reproduce import reproduce

    res = reproduce(spark, nights["cfg"], nights["lake"], nights["better"].run_id, tolerance=1e-4)
    assert res["passed"], res
    names = {c["metric"] for c in res["comparisons"]}
    assert {"train.loss", "gate.auc", "gate.ndcg@10"} <= names
    assert (res["backend"], res["world_size"]) == ("local", 1)
    assert res["identical_weights"] is True  # same files, order, seed and parent on the local backend


def test_reproduce_trains_on_the_recorded_backend_with_as_many_workers(spark, tmp_path, real_data_path):
    """A run trained by 2 torch.distributed processes is rebuilt by 2 of them
    (each rank reads its own shard: one process would see another order)."""
    from deltarec.registry.reproduce import reproduce

    cfg = make_config(tmp_path / "lake", "demo.max_days=3", "demo.nights=1", "train.backend=torch",
                      "train.launcher=processes", "train.num_proc=2", "gate.enabled=true")
    _, night = run_demo(spark, cfg, out=lambda *_: None)
    lake = open_lake(cfg.lake, spark)
    run = Ledger(lake, cfg.lake.runs_table).get(night.run_id)
    train = run.metrics["train"]
    assert (train["backend"], train["world_size"], train["launcher"]) == ("torch", 2, "processes")
    assert run.metrics["gate"].get("candidate")  # the gate scored it: there are metrics to compare
    # reproduced under a config that names another backend: what the run recorded wins
    res = reproduce(spark, make_config(tmp_path / "lake", "train.backend=local"), lake, night.run_id, tolerance=1e-4)
    assert (res["backend"], res["world_size"]) == ("torch", 2)
    assert res["passed"] and res["identical_weights"] is True, res


def test_rollback_restores_the_previous_champion_and_records_who_and_why(nights, tmp_path):
    # on a copy of the lake: the other tests read the fixture's ledger as the nights left it
    root = tmp_path / "lake"
    shutil.copytree(nights["root"], root)
    cfg = nights["cfg"]
    lake = open_lake(make_config(root, *BASE).lake)
    ledger = Ledger(lake, cfg.lake.runs_table)
    better, old = nights["better"].run_id, nights["worse"].run_id
    assert ledger.champion(cfg.model.name).run_id == better  # as the nights left it
    v = lake.version(cfg.lake.runs_table)
    out = cli(root, "registry", "rollback", "--json", "--by", "alice", "--reason", "CTR dropped")
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert (res["champion"], res["previous_champion"], res["by"]) == (old, better, "alice")
    assert lake.version(cfg.lake.runs_table) == v + 1  # the pointer moved in one commit
    assert ledger.champion(cfg.model.name).run_id == old
    back = ledger.get(better)
    assert back.status == RETIRED and back.status_by == "alice" and "CTR dropped" in back.status_reason
    ev = [e for e in json.loads(cli(root, "registry", "show", old, "--json").stdout)["events"]
          if e["action"] == "rollback"]
    assert ev and ev[-1]["by"] == "alice" and ev[-1]["reason"] == "CTR dropped"
    # promote back (default --by = the OS user), then rollbacks walk back through the champions, not forth
    out = cli(root, "registry", "promote", better, "--json", "--reason", "fixed upstream")
    assert out.returncode == 0 and json.loads(out.stdout)["by"] == "tester"
    assert ledger.champion(cfg.model.name).run_id == better
    assert json.loads(cli(root, "registry", "rollback", "--json").stdout)["champion"] == old
    out = cli(root, "registry", "rollback", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["champion"] == nights["second"].run_id
    assert nights["ledger"].champion(cfg.model.name).run_id == better  # the fixture's lake is untouched


def test_gate_reports_new_user_and_new_item_slices(nights):
    import numpy as np

    lake, cfg, better = nights["lake"], nights["cfg"], nights["better"]
    ex = lake.read_arrow(cfg.lake.examples_table)
    run = np.array(ex["run_id"].to_pylist())
    earlier = np.isin(run, [r.run_id for r in nights["ledger"].runs(cfg.model.name)
                            if r.source_last < better.source_versions[0]])
    tonight = run == better.run_id
    if "holdout" in ex.column_names:
        tonight &= np.array(ex["holdout"].to_pylist(), dtype=bool)
    slices = nights["ledger"].get(better.run_id).metrics["gate"]["slices"]
    for col, name in (("user_idx", "new_users"), ("item_idx", "new_items")):
        ids = ex[col].to_numpy()
        want = int((tonight & ~np.isin(ids, ids[earlier])).sum())
        assert want > 0 and slices[name]["n"] == want
        assert set(slices[name]) == {"n", "candidate", "champion"}
