"""The recommendations table and the MLflow model, on small real data with real
Spark, real Delta and real torch: after two demo nights the table holds one
row set per user from the champion, bound to it in the registry; its top-k
equals the champion's scored here independently; users without history get the
popularity list; the pyfunc model loaded by MLflow (without the lake) answers
the same from raw ids; promote and rollback rewrite the table and move the
MLflow alias."""
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from conftest import ROOT, make_config
from deltarec.lake import open_lake
from deltarec.lake.ledger import Ledger
from deltarec.pipeline.recommend import refresh_recommendations
from deltarec.serving.table import latest_refresh, recorded_versions

BASE = ("demo.history_days=2", "demo.nights=1", "train.epochs=2", "recommend.enabled=true")
SAMPLE = 12  # users compared against the independent scoring


@pytest.fixture(scope="module")
def demo(spark, tmp_path_factory, demo_lake):
    root = tmp_path_factory.mktemp("recommend") / "lake"
    cfg = make_config(root, *BASE)
    results, printed = demo_lake(root, *BASE)  # the same lake as test_serve's, built once
    lake = open_lake(cfg.lake, spark)
    return dict(cfg=cfg, lake=lake, root=root, results=results, ledger=Ledger(lake, cfg.lake.runs_table),
                printed=printed)


def table_rows(lake, table, version=None) -> dict:
    """user key (None: the popularity list) → (item ids, scores, sources, run ids), in rank order."""
    t = lake.read_arrow(table, version).sort_by([("user_id", "ascending"), ("rank", "ascending")])
    out = {}
    for r in t.to_pylist():
        e = out.setdefault(r["user_id"], ([], [], [], []))
        for lst, key in zip(e, ("item_id", "score", "source", "run_id")):
            lst.append(r[key])
    return out


def same_ranking(got_items, got_scores, want_items, want_scores, tol=1e-4):
    """Equal lists, except that items whose scores tie (within ``tol``) may swap."""
    assert len(got_items) == len(want_items)
    np.testing.assert_allclose(got_scores, want_scores, atol=tol, rtol=1e-4)
    for i, (g, w) in enumerate(zip(got_items, want_items)):
        if g != w:
            tied = [x for x, s in zip(want_items, want_scores) if abs(s - want_scores[i]) <= tol]
            assert g in tied or i == len(want_items) - 1, (i, g, w, got_items, want_items)


def independent_topk(spark, cfg, lake, champion, users: list[str], k: int, days: int, repeat=None, bought=None):
    """Top-k of ``users`` from the champion's checkpoint: catalogue, ids and
    histories rebuilt here from the lake with Spark's own hashing, every
    catalogue item scored (collisions included) and sorted by (-score, id).
    ``repeat``: ``score_all``'s repeat lists of ``users`` (None: not passed);
    ``bought``: user → item ids appended to their stored history."""
    import datetime as dt

    import torch
    from pyspark.sql import functions as F

    from deltarec.features.examples import bucket
    from deltarec.models import build_model
    from deltarec.train.checkpoint import load_checkpoint

    f = champion.config["features"]
    stats = lake.read_arrow(cfg.lake.item_stats_table)
    cut = pc.max(stats["last_seen"]).as_py() - dt.timedelta(days=days)
    items = sorted(stats.filter(pc.greater_equal(stats["last_seen"], pa.scalar(cut, stats["last_seen"].type)))
                   ["item_id"].to_pylist())
    state = {r["user_id"]: r["history_ids"] + (bought or {}).get(r["user_id"], [])
             for r in lake.read_arrow(cfg.lake.user_state_table).to_pylist()}
    ids_needed = sorted(set(items) | {h for u in users for h in state[u]})
    hashed = spark.createDataFrame([(i,) for i in ids_needed], "item_id string").select(
        "item_id", bucket(F.col("item_id"), f["item_buckets"]).alias("b"))
    item_b = {r.item_id: r.b for r in hashed.collect()}
    user_b = {r.u: r.b for r in spark.createDataFrame([(u,) for u in users], "u string").select(
        "u", bucket(F.col("u"), f["user_buckets"], f["salt"]).alias("b")).collect()}
    ck = load_checkpoint(champion.checkpoint_path, champion.checkpoint_sha256)
    model = build_model(ck.meta["model"], **ck.meta["model_params"])
    model.load_state_dict(ck.model_state)
    model.eval()
    L = model.history_length
    hist = np.full((len(users), L), -1, dtype=np.int64)
    for r, u in enumerate(users):
        h = [item_b[i] for i in state[u]][-L:]
        if h:
            hist[r, L - len(h):] = h
    with torch.no_grad():
        scores = model.score_all(torch.tensor([user_b[u] for u in users]), torch.tensor([item_b[i] for i in items]),
                                 history_idx=torch.from_numpy(hist),
                                 **({} if repeat is None else {"repeat": repeat})).numpy()
    ids = np.asarray(items)
    out = {}
    for r, u in enumerate(users):
        order = np.lexsort((ids, -scores[r]))[:k]
        out[u] = (ids[order].tolist(), scores[r][order].tolist())
    return out


def test_after_two_demo_nights_one_row_set_per_user_from_the_champion_bound_in_the_registry(demo):
    cfg, lake, ledger = demo["cfg"], demo["lake"], demo["ledger"]
    runs = ledger.runs(cfg.model.name)
    assert [r.status for r in demo["results"]] == ["committed", "committed"] and len(runs) == 2
    champ = ledger.champion(cfg.model.name)
    version, meta = latest_refresh(lake, cfg.recommend.table)
    assert meta["run_id"] == champ.run_id and meta["checkpoint_sha256"] == champ.checkpoint_sha256
    rows = table_rows(lake, cfg.recommend.table)
    users = set(lake.read_arrow(cfg.lake.user_state_table)["user_id"].to_pylist())
    assert set(rows) - {None} == users and len(users) > 100
    k = cfg.recommend.k
    for user, (items, scores, sources, run_ids) in rows.items():
        assert set(run_ids) == {champ.run_id}
        assert len(items) == len(set(items)) == (cfg.recommend.max_k if user is None else k)
        assert scores == sorted(scores, reverse=True)
        assert len(set(sources)) == 1
    # one Delta commit per refresh (each night's), each bound to the champion of its night, recorded in the registry
    history = sorted(lake.history(cfg.recommend.table), key=lambda h: h["version"])
    assert [h["version"] for h in history] == [0, 1]
    recorded = recorded_versions(lake, cfg)
    assert version == 1 and version in recorded[champ.run_id]
    first = runs[0].run_id
    assert 0 in recorded[first]
    then = table_rows(lake, cfg.recommend.table, version=recorded[first][0])  # time travel: what we served after run 1
    assert {r for _, _, _, ids in then.values() for r in ids} == {first}


def test_the_demo_ends_with_tomorrows_top5_for_three_customers_and_how_to_serve_them(demo):
    cfg, lake = demo["cfg"], demo["lake"]
    lines = demo["printed"][-1].splitlines()
    m = re.search(r"champion (\S+), (\S+) table version (\d+)", lines[0])
    assert m and m.group(2) == cfg.recommend.table, lines[0]
    version = int(m.group(3))
    assert recorded_versions(lake, cfg)[m.group(1)][-1] == version  # the table the night's champion wrote
    rows = table_rows(lake, cfg.recommend.table, version)
    state = lake.read_arrow(cfg.lake.user_state_table)
    busiest = state.sort_by([("events", "descending"), ("user_id", "ascending")])["user_id"].to_pylist()[:3]
    shown = [line for line in lines if line.startswith("  customer ")]
    assert [line.split()[1].rstrip(":") for line in shown] == busiest
    for user, line in zip(busiest, shown):
        want = "".join(rf"[:;] {re.escape(item)}\b.*" for item in rows[user][0][:5])  # that version's top 5
        assert re.search(want, line), (line, rows[user][0][:5])
    assert "deltarec serve" in lines[-1] and f"/recommendations/{busiest[0]}?k=5" in lines[-1]


def test_table_topk_equals_the_champion_scored_independently(spark, demo):
    cfg, lake = demo["cfg"], demo["lake"]
    champ = demo["ledger"].champion(cfg.model.name)
    rows = table_rows(lake, cfg.recommend.table)
    model_users = sorted(u for u, (_, _, src, _) in rows.items() if u is not None and src[0] == "model")
    rng = np.random.default_rng(0)
    sample = sorted(rng.choice(model_users, size=SAMPLE, replace=False).tolist())
    want = independent_topk(spark, cfg, lake, champ, sample, cfg.recommend.k, cfg.recommend.catalog_days)
    for u in sample:
        items, scores, _, _ = rows[u]
        same_ranking(items, scores, *want[u])


def test_popularity_list_and_users_without_history(spark, demo):
    """The null-key rows are the catalogue's most bought items of the last
    recommend.popularity_days (counted here from the committed runs' positive
    examples); a user with no history is scored from that list, flagged."""
    import datetime as dt

    from deltarec.serving.batch import score_batch
    from deltarec.serving.catalog import catalog_from_item_stats
    from deltarec.train.checkpoint import load_model

    cfg, lake = demo["cfg"], demo["lake"]
    R = cfg.recommend
    rows = table_rows(lake, R.table)
    items, scores, sources, _ = rows[None]
    ex = lake.read_arrow(cfg.lake.examples_table).filter((pc.field("label") == 1.0) & (pc.field("kind") == "event"))
    stats = lake.read_arrow(cfg.lake.item_stats_table)
    newest = pc.max(stats["last_seen"]).as_py()
    catalogue = set(stats.filter(pc.greater_equal(stats["last_seen"], pa.scalar(
        newest - dt.timedelta(days=R.catalog_days), stats["last_seen"].type)))["item_id"].to_pylist())
    recent = ex.filter(pc.greater_equal(ex["event_time"], pa.scalar(
        pc.max(ex["event_time"]).as_py() - dt.timedelta(days=R.popularity_days), ex["event_time"].type)))
    counts = {}
    for i in recent["item_id"].to_pylist():
        if i in catalogue:
            counts[i] = counts.get(i, 0) + 1
    want = sorted(counts, key=lambda i: (-counts[i], i))[:R.max_k]
    assert items == want and scores == [float(counts[i]) for i in want] and set(sources) == {"popularity"}

    # a user the state knows but with an empty history: through the same task code, with the real champion
    champ = demo["ledger"].champion(cfg.model.name)
    catalog, _ = catalog_from_item_stats(stats, R.catalog_days, champ.config["features"]["item_buckets"])
    spec = {"k": R.k, "max_k": R.max_k, "exclude": None, "block_pairs": 4096, "run_id": champ.run_id,
            "popular": list(zip(items, scores)), "generated_at": dt.datetime.now(dt.timezone.utc)}
    batch = pa.table({"user_id": ["no-history", "17850"], "user_idx": [1, 2],
                      "history_ids": [[], ["85123A"]], "history_idx": [[], [5]]})
    out = score_batch(load_model(champ), catalog, batch, spec)
    mine = out.filter(pc.equal(out["user_id"], "no-history"))
    assert mine["item_id"].to_pylist() == items[:R.k] and set(mine["source"].to_pylist()) == {"popularity"}
    assert set(out.filter(pc.equal(out["user_id"], "17850"))["source"].to_pylist()) == {"model"}


def test_exclude_purchased_and_last_n(spark, demo):
    cfg, lake = demo["cfg"], demo["lake"]
    state = {r["user_id"]: r["history_ids"] for r in lake.read_arrow(cfg.lake.user_state_table).to_pylist()}
    before = lake.version(cfg.recommend.table)
    for rule, table in (("purchased", "recs_purchased"), ("last-2", "recs_last2")):
        c = make_config(demo["root"], *BASE, f"recommend.exclude={rule}", f"recommend.table={table}")
        out = refresh_recommendations(spark, c, lake)
        assert out["version"] == 0 and out["users"] == len(state)
        rows = table_rows(lake, table)
        hits = 0
        for u, (items, _, src, _) in rows.items():
            if u is None or src[0] != "model":
                continue
            banned = set(state[u] if rule == "purchased" else state[u][-2:])
            assert not banned & set(items), (rule, u)
            assert len(items) == cfg.recommend.k
            hits += bool(banned)
        assert hits > 10
    assert lake.version(cfg.recommend.table) == before  # other tables untouched


def test_corrupt_champion_checkpoint_is_refused_and_the_table_keeps_its_version(spark, demo):
    from deltarec.train.checkpoint import CheckpointError

    cfg, lake = demo["cfg"], demo["lake"]
    champ = demo["ledger"].champion(cfg.model.name)
    path = os.path.join(champ.checkpoint_path, "model.safetensors")
    before = lake.version(cfg.recommend.table)
    saved = path + ".bak"
    shutil.copy(path, saved)
    try:
        with open(path, "r+b") as f:
            f.seek(100)
            b = f.read(1)
            f.seek(100)
            f.write(bytes([b[0] ^ 0xFF]))
        with pytest.raises(CheckpointError, match="model.safetensors"):
            refresh_recommendations(spark, cfg, lake)
    finally:
        shutil.move(saved, path)
    assert lake.version(cfg.recommend.table) == before


def test_recommend_cli_answers_from_the_table(demo):
    cfg = demo["cfg"]
    rows = table_rows(demo["lake"], cfg.recommend.table)
    user = sorted(u for u in rows if u is not None)[0]

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "deltarec.cli", "recommend", *args, "--conf",
                               str(ROOT / "conf" / "local.yaml"), "--set", f"lake.root={demo['root']}"],
                              capture_output=True, text=True, cwd=ROOT, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(ROOT / "lib")})

    out = cli("--user", user, "--k", "3", "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert [e["item_id"] for e in got["items"]] == rows[user][0][:3] and got["fallback"] is None
    out = cli("--user", "no-such-customer", "--json")
    got = json.loads(out.stdout)
    assert got["fallback"] == "popularity" and [e["item_id"] for e in got["items"]] == rows[None][0][:cfg.recommend.k]
    out = cli("--user", user, "--k", "0")
    assert out.returncode == 2 and "--k 0" in out.stderr and "recommend.max_k" in out.stderr


def test_python_hashing_equals_spark(spark):
    from pyspark.sql import functions as F

    from deltarec.features.examples import bucket as spark_bucket
    from deltarec.serving.ids import bucket

    ids = ["", "1", "12347", "85123A", "POST", "héllo ☃", "x" * 31, "y" * 32, "z" * 77]
    df = spark.createDataFrame([(i,) for i in ids], "v string")
    got = df.select("v", spark_bucket(F.col("v"), 65536).alias("a"), spark_bucket(F.col("v"), 1000, "s").alias("b"))
    for r in got.collect():
        assert (bucket(r.v, 65536), bucket(r.v, 1000, "s")) == (r.a, r.b), r.v


def test_pyfunc_model_from_raw_ids_without_the_lake_and_alias_follows_promote_and_rollback(spark, demo, tmp_path):
    from mlflow import MlflowClient

    from deltarec.registry import promote, rollback
    from deltarec.registry.mlflow_sync import RUN_TAG, log_run

    cfg, lake, ledger = demo["cfg"], demo["lake"], demo["ledger"]
    mlruns = tmp_path / "mlruns"
    ml = make_config(demo["root"], *BASE, "mlflow.enabled=true", f"mlflow.tracking_uri=file://{mlruns}",
                     "mlflow.registered_model=recs-model")
    champ = ledger.champion(cfg.model.name)
    logged = log_run(ml, lake, champ)
    assert "pyfunc_error" not in logged and logged["alias"] == "champion"
    rows = table_rows(lake, cfg.recommend.table)
    users = sorted(u for u, (_, _, src, _) in rows.items() if u is not None and src[0] == "model")[:SAMPLE]
    script = textwrap.dedent(f"""
        import json, os, sys
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
        import mlflow, pandas as pd
        mlflow.set_tracking_uri("file://{mlruns}"); mlflow.set_registry_uri("file://{mlruns}")
        m = mlflow.pyfunc.load_model("models:/recs-model@champion")
        out = m.predict(pd.DataFrame({{"user_id": {users + ['no-such-customer']!r}}}))
        print(json.dumps({{"rows": out.to_dict("records"),
                          "deltarec": __import__("deltarec").__file__,
                          "lake_code": sorted(n for n in sys.modules
                                              if n.startswith(("deltarec.lake", "deltarec.pipeline")))}}))
    """)
    away = str(demo["root"]) + ".away"
    os.rename(demo["root"], away)  # the model must not need the lake
    try:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                              env=env, timeout=300)
    finally:
        os.rename(away, demo["root"])
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert str(mlruns) in got["deltarec"] and got["lake_code"] == []  # the logged code, no lake modules
    for r in got["rows"]:
        if r["user_id"] == "no-such-customer":
            assert r["fallback"] == "popularity" and r["item_ids"] == rows[None][0][:cfg.recommend.k]
            continue
        assert r["run_id"] == champ.run_id and r["fallback"] is None
        same_ranking(r["item_ids"], r["scores"], rows[r["user_id"]][0], rows[r["user_id"]][1])

    # the alias and the table follow promote and rollback
    c = MlflowClient(tracking_uri=f"file://{mlruns}", registry_uri=f"file://{mlruns}")
    other = next(r for r in ledger.runs(cfg.model.name) if r.run_id != champ.run_id)
    out = promote(ledger, lake, ml, other.run_id, by="test", reason="test promote")
    assert out["recommendations"]["run_id"] == other.run_id, out["recommendations"]
    assert c.get_model_version_by_alias("recs-model", "champion").tags[RUN_TAG] == other.run_id
    assert latest_refresh(lake, cfg.recommend.table)[1]["run_id"] == other.run_id
    assert {r for _, _, _, ids in table_rows(lake, cfg.recommend.table).values() for r in ids} == {other.run_id}
    out = rollback(ledger, lake, ml, by="test", reason="test rollback")
    assert out["champion"] == champ.run_id and out["recommendations"]["run_id"] == champ.run_id
    assert c.get_model_version_by_alias("recs-model", "champion").tags[RUN_TAG] == champ.run_id
    version, meta = latest_refresh(lake, cfg.recommend.table)
    assert meta["run_id"] == champ.run_id and version in recorded_versions(lake, cfg)[champ.run_id]
    again = table_rows(lake, cfg.recommend.table)
    assert set(again) == set(rows)
    for u, (items, scores, src, _) in again.items():  # the same model on the same state: the same lists
        assert src == rows[u][2]
        same_ranking(items, scores, rows[u][0], rows[u][1])


def test_with_pseudonyms_a_request_id_maps_to_the_key_the_tables_hold(tmp_path, monkeypatch):
    """privacy.pseudonymize: user_state and the recommendations table hold
    pseudonyms, so the server and `recommend --user` must look up the same
    key privacy computes for the lake; without a secret, a clear error."""
    from deltarec.privacy import PrivacyError, stored_keys
    from deltarec.serving.ids import user_key

    cfg = make_config(tmp_path / "lake", "privacy.pseudonymize=true")
    monkeypatch.setenv(cfg.privacy.secret_env, "test-secret")
    lake = open_lake(cfg.lake, None)
    raw = ["12347", "17850", "new-customer"]
    assert [user_key(u, cfg) for u in raw] == stored_keys(cfg, lake, raw)
    assert user_key("12347", cfg) != "12347"
    assert user_key("12347", make_config(tmp_path / "lake")) == "12347"  # pseudonyms off: the id itself
    monkeypatch.delenv(cfg.privacy.secret_env)
    with pytest.raises(PrivacyError, match=cfg.privacy.secret_env):
        user_key("12347", cfg)
