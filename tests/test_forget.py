"""The right to be forgotten (issue 19): a forget reaches every table, every
file, the model and its checkpoints, survives crashes, and refuses bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from conftest import ROOT, make_config

SECRET = "test-secret-not-for-production"


# ---------------------------------------------------------------- the model, row by row (no Spark)
def _hashed_checkpoint(tmp_path):
    """A hashed ranking model after one Adam step (so the optimizer has moments), saved."""
    from deltarec.models import build_model
    from deltarec.train.checkpoint import load_checkpoint, save_checkpoint

    params = {"user_buckets": 8, "item_buckets": 16, "embedding_dim": 4, "hidden": [8], "dropout": 0.0,
              "embedding": "hashed", "history_length": 3}
    torch.manual_seed(0)
    model = build_model("ranking", **params)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    b = {"user_idx": torch.tensor([0, 3, 5, 6]), "item_idx": torch.tensor([1, 2, 3, 4]),
         "history_idx": torch.tensor([[1, 2, -1]] * 4)}
    model(b).sum().backward()
    opt.step()
    names = [n for n, _ in model.named_parameters()]
    saved = save_checkpoint(str(tmp_path / "ck"), model, opt, {"model": "ranking", "model_params": params},
                            train_state={"global_step": 1, "optimizer_params": names})
    return load_checkpoint(saved.path, saved.sha256)


def _examples(rows):
    """(user_id, user_idx, item_idx, label) rows → an examples table as the lineage returns it."""
    return pa.table({"user_id": [r[0] for r in rows], "user_idx": pa.array([r[1] for r in rows], pa.int64()),
                     "item_idx": pa.array([r[2] for r in rows], pa.int64()),
                     "label": pa.array([r[3] for r in rows], pa.float32()),
                     "weight": pa.array([1.0] * len(rows), pa.float32()),
                     "history_idx": pa.array([[r[2] % 5] for r in rows], pa.list_(pa.int64())),
                     "holdout": [False] * len(rows)})


def _lineage(table):
    import pyarrow.compute as pc

    def get(columns, users=None):
        t = table if users is None else table.filter(pc.is_in(table["user_id"], pa.array(users, pa.string())))
        return t.select(columns) if columns else t
    return get


BASE = [("u1", 3, 1, 1.0), ("u1", 3, 7, 0.0), ("u2", 5, 2, 1.0), ("u2", 5, 9, 0.0), ("u3", 5, 4, 1.0),
        ("u3", 5, 11, 0.0), ("u3", 5, 6, 1.0), ("u4", 6, 3, 1.0)]


def test_hashed_rows_reset_alone_and_retrained_from_the_others_only(tmp_path):
    from deltarec.models.common import init_rows
    from deltarec.privacy.model import forget_rows

    ck = _hashed_checkpoint(tmp_path)
    before = {k: v.clone() for k, v in ck.model_state.items()}

    def run(rows):
        return forget_rows(ck, ["u1", "u2", "u9"], _lineage(_examples(rows)), batch=7, epochs=3, lr=0.05,
                           batch_size=4)

    out = run(BASE)
    after = out.model.state_dict()
    # u1 alone in bucket 3: reset to the defined initialisation (its bias row to zero)
    want = before["user_emb.weight"].clone()
    init_rows(want, [3], 7, "forget/user_emb.weight")
    assert torch.equal(after["user_emb.weight"][3], want[3]) and not torch.equal(want[3], before["user_emb.weight"][3])
    assert float(after["user_repeat_bias.weight"][3].abs().sum()) == 0.0
    assert "reset" in out.actions["u1"] and "re-trained from 1 other user" in out.actions["u2"]
    assert out.actions["u9"].startswith("absent")
    # u2 shares bucket 5 with u3: re-trained, away from both its old and its reset value
    init_rows(want, [5], 7, "forget/user_emb.weight")
    row5 = after["user_emb.weight"][5]
    assert not torch.equal(row5, before["user_emb.weight"][5]) and not torch.equal(row5, want[5])
    # every other value of the model is bit for bit the old one
    for k, v in before.items():
        rows = [r for r in range(v.shape[0]) if r not in (3, 5)] if k.startswith("user_") else None
        assert torch.equal(after[k][rows] if rows else after[k], v[rows] if rows else v), k
    # the bucket's new value comes from u3's examples alone: change u2's (forgotten) examples -> same row;
    # change u3's -> another row
    other_u2 = [r if r[0] != "u2" else ("u2", 5, r[2] + 3, 1.0 - r[3]) for r in BASE]
    assert torch.equal(run(other_u2).model.state_dict()["user_emb.weight"][5], row5)
    other_u3 = [r if r[0] != "u3" else ("u3", 5, r[2] + 1, 1.0 - r[3]) for r in BASE]
    assert not torch.equal(run(other_u3).model.state_dict()["user_emb.weight"][5], row5)
    # Adam's moments of the reset rows are zero (they were the users' gradients), the others kept
    names = ck.train_state["optimizer_params"]
    i = names.index("user_emb.weight")
    for m in ("exp_avg", "exp_avg_sq"):
        old, new = ck.optimizer_state["state"][i][m], out.optimizer_state["state"][i][m]
        assert float(new[[3, 5]].abs().sum()) == 0.0 and float(old[[3, 5]].abs().sum()) > 0
        assert torch.equal(new[[0, 6]], old[[0, 6]])
    assert out.meta["forgotten_batches"] == [7]


# ---------------------------------------------------------------- end to end on a demo lake
E2E = ("model.embedding=dynamic", "model.vocab.min_count=2", "model.vocab.oov_buckets=4",
       "privacy.pseudonymize=true", "privacy.retention_hours=0", "privacy.enforce_retention=false",
       "mlflow.enabled=true", "demo.max_days=5", "demo.history_days=2", "demo.nights=1", "train.epochs=1",
       "train.full_epochs=1")


@pytest.fixture(scope="module")
def demo(spark, tmp_path_factory, real_data_path):
    """A 3-day demo (first training + one night) with exact ids, pseudonyms and
    MLflow on; the 4th day is left for the night after the forget."""
    from deltarec.pipeline.demo import run_demo

    old = os.environ.get("DELTAREC_PRIVACY_SECRET")
    os.environ["DELTAREC_PRIVACY_SECRET"] = SECRET
    root = tmp_path_factory.mktemp("forget") / "lake"
    cfg = make_config(root, *E2E)
    run_demo(spark, cfg, out=lambda *_: None)
    yield cfg
    if old is None:
        os.environ.pop("DELTAREC_PRIVACY_SECRET", None)
    else:
        os.environ["DELTAREC_PRIVACY_SECRET"] = old


def _strings(value):
    """Every string inside a decoded Parquet value (lists, structs, maps)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def scan_lake(root, needles: dict[str, str]) -> dict[str, set[str]]:
    """{needle name: files under ``root`` that hold it}: every Parquet file by
    its bytes and by every decoded value (data files, change data, log
    checkpoints, vocabularies, MLflow copies), every other file by its bytes
    (a raw id only as a JSON string, since bare digits occur in numbers)."""
    import pyarrow.parquet as pq

    found: dict[str, set[str]] = {n: set() for n in needles}
    for path in sorted(Path(root).rglob("*")):
        if not path.is_file():
            continue
        data = path.read_bytes()
        if path.suffix == ".parquet":
            values = set(_strings(pq.read_table(path).to_pylist()))
            for name, s in needles.items():
                if s.encode() in data or s in values:
                    found[name].add(str(path.relative_to(root)))
        else:
            for name, s in needles.items():
                forms = [s.encode()] if len(s) > 16 else [f'"{s}"'.encode(), f'"{s}\\"'.encode()]
                if any(f in data for f in forms):  # a short id as a JSON string (also escaped, as in stats)
                    found[name].add(str(path.relative_to(root)))
    return found


def _cli(cfg, *args, settings=E2E) -> tuple[int, str]:
    """``deltarec ARGS`` in this process, on ``cfg``'s lake with ``settings``."""
    import contextlib
    import io

    from deltarec.cli import main

    sets = [f"lake.root={cfg.lake.root}", "lake.engine=delta-rs", *settings]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main([*args, "--conf", str(ROOT / "conf" / "local.yaml"), *[a for kv in sets for a in ("--set", kv)]])
    return rc, buf.getvalue()


def _user_rows(run, keys):
    """{key: (row, values of every user table at that row)} in a run's checkpoint."""
    from deltarec.models.vocab import vocabs_from_bytes
    from deltarec.train.checkpoint import load_checkpoint

    ck = load_checkpoint(run.checkpoint_path, run.checkpoint_sha256)
    v = vocabs_from_bytes(ck.extras["vocab.parquet"])["user"]
    ids = v.ids.to_pylist()
    out = {}
    for k in keys:
        if k in ids:
            i = ids.index(k)
            row = int(v.rows[i]) if v.rows[i] >= 0 else int(v.hashed[i]) % v.oov_buckets
            out[k] = (row, {n: ck.model_state[n][row].clone() for n in ("user_emb.weight", "user_repeat_bias.weight")})
    return out, ck, ids


def test_forget_end_to_end(spark, demo):
    """Issue 19's end-to-end proof: two customers (one with its own vocabulary
    row, one on a shared out-of-vocabulary hash row) and an unknown id are
    forgotten, the next night carries it out, VACUUM with retention 0; then
    (a) no table version holds them, (b) no file under the lake does, (c) their
    rows are reset in every checkpoint and the ledger's sha256s match, (d) they
    are served as unknown users, (e) forget_log proves it without the ids."""
    from deltarec.lake import open_lake
    from deltarec.lake.ledger import Ledger
    from deltarec.models.common import init_rows
    from deltarec.pipeline.demo import append_day, demo_days
    from deltarec.pipeline.nightly import run_nightly
    from deltarec.privacy.keys import pseudonym
    from deltarec.registry.core import events
    from deltarec.train.checkpoint import verify_checkpoint

    cfg = demo
    root = Path(cfg.lake.root)
    lake = open_lake(cfg.lake, spark)
    ledger = Ledger(lake, cfg.lake.runs_table)
    champ = ledger.champion(cfg.model.name)
    events_raw = set(lake.read_arrow(cfg.lake.events_table)["user_id"].to_pylist()) - {None}
    items = set(lake.read_arrow(cfg.lake.items_table)["item_id"].to_pylist())
    key = {u: pseudonym(SECRET.encode(), u) for u in events_raw if u not in items}
    rows, ck, ids = _user_rows(champ, key.values())
    from deltarec.models.vocab import vocabs_from_bytes

    v = vocabs_from_bytes(ck.extras["vocab.parquet"])["user"]
    admitted = sorted(u for u, k in key.items() if k in ids and v.rows[ids.index(k)] >= 0)
    shared = sorted(u for u, k in key.items() if k in ids and v.rows[ids.index(k)] < 0)
    assert admitted and shared, "the demo needs customers with and without their own vocabulary row"
    # A short raw id can occur by chance in another file's bytes (5 digits inside a compressed page), where
    # no scan could prove it gone: take the first customer of each kind whose raw id the scan finds only in
    # the source table, as the rest of the test requires.
    picks = {f"{kind}{i}": u for kind, us in (("a", admitted), ("b", shared)) for i, u in enumerate(us[:8])}
    seen = scan_lake(root, picks)
    clean = [n for n, files in seen.items() if files and all(f.startswith(cfg.lake.events_table + "/")
                                                             for f in files)]
    a = picks[next(n for n in clean if n.startswith("a"))]
    b = picks[next(n for n in clean if n.startswith("b"))]
    needles = {"raw_a": a, "raw_b": b, "key_a": key[a], "key_b": key[b]}
    before = scan_lake(root, needles)
    # the scan sees them before: pseudonyms in derived tables, raw ids only in the source table
    assert before["key_a"] and before["key_b"]
    assert before["raw_a"] and all(f.startswith(cfg.lake.events_table + "/") for f in before["raw_a"] | before["raw_b"])
    old = {r.run_id: _user_rows(r, [key[a], key[b]])[0] for r in ledger.runs()}

    rc, out = _cli(cfg, "forget", a, b, "no-such-customer", "--reason", "GDPR Art. 17")
    assert rc == 0, out
    rc, out = _cli(cfg, "forget", "--status", "--json")
    st = json.loads(out)["status"]
    assert rc == 0 and len(st["pending"]) == 3 and not st["overdue"]

    days, catalogue, _ = demo_days(cfg)
    append_day(lake, cfg, days[3][1], catalogue)
    night = run_nightly(spark, cfg, lake=lake)  # carries out the requests first
    assert night.status == "committed"
    rc, out = _cli(cfg, "forget", "--apply", "--json")  # the source erase is consumed now: VACUUM (retention 0)
    assert rc == 0 and json.loads(out)["applied"]["vacuumed"]["files_vacuumed"] > 0, out

    # (a) + (b): not in any current table version, not in any file under the lake
    after = scan_lake(root, needles)
    assert after == {n: set() for n in needles}, after
    # (c) every checkpoint in the ledger verifies against the sha256 the registry recorded for it; the
    # customers are out of every vocabulary; a's own row holds the defined reset value, b's shared row moved
    rewrites = [e for e in events(lake, cfg) if e["action"] == "forget_rewrite"]
    runs = ledger.runs()
    checked = set()
    for r in runs:
        verify_checkpoint(r.checkpoint_path, r.checkpoint_sha256)
        mine, ck, ids = _user_rows(r, [key[a], key[b]])
        assert not mine and key[a] not in ids and key[b] not in ids
        if r.run_id == night.run_id:
            continue  # trained after the forget, from the rewritten champion
        assert any(e["run_id"] == r.run_id and e["reason"].endswith(r.checkpoint_sha256) for e in rewrites)
        if key[a] in old[r.run_id]:  # a run trained before a's first purchase never had a row for it
            row_a, was_a = old[r.run_id][key[a]]
            reset = ck.model_state["user_emb.weight"].clone()
            init_rows(reset, [row_a], 1, "forget/user_emb.weight")
            assert torch.equal(ck.model_state["user_emb.weight"][row_a], reset[row_a])
            assert not torch.equal(reset[row_a], was_a["user_emb.weight"])
            checked.add("a")
        if key[b] in old[r.run_id]:
            row_b, was_b = old[r.run_id][key[b]]
            assert not torch.equal(ck.model_state["user_emb.weight"][row_b], was_b["user_emb.weight"])
            checked.add("b")
    assert checked == {"a", "b"}
    rc, out = _cli(cfg, "status", "--verify", "--json")
    assert rc == 0 and all(x["checkpoint"]["verified"] for x in json.loads(out)["runs"])
    # runs whose training files the erasure rewrote refuse to be reproduced (it would restore the customers)
    from deltarec.lake.engine import LakeError
    from deltarec.registry.reproduce import reproduce

    with pytest.raises(LakeError, match="not reproducible"):
        reproduce(spark, cfg, lake, runs[0].run_id)
    # (d) served as unknown: no state, no recommendations
    for table in (cfg.lake.user_state_table, "recommendations"):
        if lake.exists(table):
            got = lake.read_arrow(table)["user_id"].to_pylist()
            assert key[a] not in got and key[b] not in got
    # (e) the proof: three requests, no ids, rows and files accounted for
    rc, out = _cli(cfg, "forget", "--status", "--json")
    done = json.loads(out)["status"]["done"]
    assert rc == 0 and len(done) == 3 and {d["status"] for d in done} == {"vacuumed"}
    by_rows = sorted(done, key=lambda d: sum(d["rows_removed"].values()))
    assert sum(by_rows[0]["rows_removed"].values()) == 0 and "unknown user" in by_rows[0]["detail"]
    for d in by_rows[1:]:
        assert d["rows_removed"][cfg.lake.examples_table] > 0 and d["rows_removed"][cfg.lake.events_table] > 0
        assert d["files_vacuumed"] > 0 and set(d["checkpoints"].values()) == {"rewritten"}
    actions = " ".join(x["action"] for d in by_rows[1:] for x in d["model"])
    assert "own row reset" in actions and "re-trained" in actions


# ---------------------------------------------------------------- crashes across the forget pass
CRASHES = ("forget_after_open", "forget_after_checkpoints", "forget_after_ledger", "forget_after_training_examples",
           "forget_before_log", "forget_after_queue_delete")


def _derived_rows(lake, cfg, key) -> dict[str, int]:
    """Rows of ``key`` in each derived table keyed by user, counted here independently of the forget pass."""
    out = {}
    for t in (cfg.lake.event_index_table, cfg.lake.user_state_table, cfg.lake.examples_table,
              cfg.lake.quarantine_table):
        if lake.exists(t):
            out[t] = lake.lookup(t, pa.table({"user_id": [key]}), ["user_id"]).num_rows
    return {t: n for t, n in out.items() if n}


@pytest.mark.parametrize("point", CRASHES)
def test_crash_in_the_forget_pass_is_finished_by_the_rerun(demo, point):
    """Kill `deltarec forget --apply` at each crash point: the log never says
    more than was done, and the rerun leaves exactly the state of an
    uninterrupted pass (rows counted once, every checkpoint rewritten once)."""
    from deltarec.lake import open_lake
    from deltarec.lake.ledger import Ledger
    from deltarec.models.vocab import vocabs_from_bytes
    from deltarec.faults import CRASH_ENV
    from deltarec.privacy import apply_pending, status
    from deltarec.privacy.keys import pseudonym
    from deltarec.privacy.requests import log_rows
    from deltarec.registry.core import events
    from deltarec.train.checkpoint import load_checkpoint

    cfg = demo.model_copy(update={"privacy": demo.privacy.model_copy(update={"erase_source": False})})  # VACUUM now
    lake = open_lake(cfg.lake, None)
    state = lake.read_arrow(cfg.lake.user_state_table)["user_id"].to_pylist()
    raw = sorted(set(lake.read_arrow(cfg.lake.events_table)["user_id"].to_pylist()) - {None})
    candidates = [u for u in raw if pseudonym(SECRET.encode(), u) in state]
    user = candidates[CRASHES.index(point) * 7]
    key = pseudonym(SECRET.encode(), user)
    want = _derived_rows(lake, cfg, key)
    assert want.get(cfg.lake.examples_table)
    sets = [f"lake.root={cfg.lake.root}", "lake.engine=delta-rs", *E2E, "privacy.erase_source=false"]
    assert _cli(cfg, "forget", user, settings=sets[2:])[0] == 0
    args = [sys.executable, "-m", "deltarec.cli", "forget", "--apply", "--conf", str(ROOT / "conf" / "local.yaml")]
    crashed = subprocess.run(args + [a for kv in sets for a in ("--set", kv)], capture_output=True, text=True,
                             cwd=ROOT, timeout=600, env={**os.environ, CRASH_ENV: point,
                                                         "DELTAREC_PRIVACY_SECRET": SECRET,
                                                         "PYTHONPATH": str(ROOT / "lib")})
    assert crashed.returncode == 86, crashed.stderr[-3000:]
    logged = log_rows(cfg, lake)
    last = max(r["batch"] for r in logged)
    claimed = {r["status"] for r in logged if r["batch"] == last}
    assert claimed <= ({"erased"} if point == "forget_after_queue_delete" else {"erasing"}), claimed

    apply_pending(cfg, lake)  # the rerun

    assert _derived_rows(lake, cfg, key) == {}
    row = [d for d in status(cfg, lake)["done"] if d["batch"] == last]
    assert len(row) == 1 and row[0]["status"] == "vacuumed"
    assert {t: n for t, n in row[0]["rows_removed"].items() if n} == want  # counted once, whatever crashed
    ledger = Ledger(lake, cfg.lake.runs_table)
    rewrites = [e for e in events(lake, cfg) if e["action"] == "forget_rewrite"
                and e["reason"].startswith(f"forget batch {last}:")]
    assert sorted(e["run_id"] for e in rewrites) == sorted(r.run_id for r in ledger.runs())  # once per run
    used = {os.path.normpath(r.checkpoint_path) for r in ledger.runs()}
    for r in ledger.runs():
        ck = load_checkpoint(r.checkpoint_path, r.checkpoint_sha256)
        assert last in ck.meta["forgotten_batches"]
        assert key not in vocabs_from_bytes(ck.extras["vocab.parquet"])["user"].ids.to_pylist()
    on_disk = {os.path.normpath(str(p.parent)) for p in Path(cfg.lake.root, "checkpoints").rglob("manifest.json")}
    assert on_disk == used  # no half-written or superseded copy of a checkpoint is left behind


def test_a_night_racing_the_forget_is_swept_before_the_vacuum(demo):
    """A night that read its changes before the batch opened commits after the
    erasure: its rows of the user and its checkpoint (warm-started from the
    champion before the rewrite) are erased by the next pass, and the log says so."""
    import shutil
    from dataclasses import replace

    from deltarec.lake import open_lake, schemas
    from deltarec.lake.ledger import Ledger
    from deltarec.models.vocab import vocabs_from_bytes
    from deltarec.privacy import apply_pending, file_requests, status
    from deltarec.privacy.keys import pseudonym
    from deltarec.train.checkpoint import load_checkpoint, sha256_bytes, verify_checkpoint

    cfg = demo.model_copy(update={"privacy": demo.privacy.model_copy(update={
        "erase_source": False, "retention_hours": 1000, "enforce_retention": True})})  # erased, not VACUUMed yet
    lake = open_lake(cfg.lake, None)
    ledger = Ledger(lake, cfg.lake.runs_table)
    state = lake.read_arrow(cfg.lake.user_state_table)["user_id"].to_pylist()
    raw = sorted(set(lake.read_arrow(cfg.lake.events_table)["user_id"].to_pylist()) - {None})
    user = [u for u in raw if pseudonym(SECRET.encode(), u) in state][-1]
    key = pseudonym(SECRET.encode(), user)
    champ = ledger.champion(cfg.model.name)
    assert key in vocabs_from_bytes(load_checkpoint(champ.checkpoint_path).extras["vocab.parquet"])["user"].ids.to_pylist()
    raced = str(Path(champ.checkpoint_path).parent / "raced")  # what a racing night trained from the old champion
    shutil.copytree(champ.checkpoint_path, raced)
    rows = lake.lookup(cfg.lake.examples_table, pa.table({"user_id": [key]}))
    want = _derived_rows(lake, cfg, key)

    file_requests(cfg, lake, [user], by="test")
    apply_pending(cfg, lake)
    assert _derived_rows(lake, cfg, key) == {}
    # the racing night commits now: its examples of the user and its checkpoint
    lake.write(cfg.lake.examples_table, rows, mode="append", partition_by=["run_id"], schema=schemas.TRAINING_EXAMPLES)
    files = verify_checkpoint(raced)
    now = ledger.champion(cfg.model.name)
    ledger.set_checkpoints([replace(now, checkpoint_path=raced, checkpoint_files=files,
                                    checkpoint_sha256=sha256_bytes(Path(raced, "manifest.json").read_bytes()))])

    out = apply_pending(cfg, lake)
    assert out["swept"] and _derived_rows(lake, cfg, key) == {}
    champ = ledger.champion(cfg.model.name)
    ck = load_checkpoint(champ.checkpoint_path, champ.checkpoint_sha256)
    assert key not in vocabs_from_bytes(ck.extras["vocab.parquet"])["user"].ids.to_pylist()
    assert not Path(raced).exists()
    mine = [d for d in status(cfg, lake)["done"] if d["batch"] == max(d["batch"] for d in status(cfg, lake)["done"])]
    assert len(mine) == 1 and mine[0]["status"] == "erased" and "racing night" in mine[0]["detail"]
    assert mine[0]["rows_removed"][cfg.lake.examples_table] == want[cfg.lake.examples_table] + rows.num_rows


# ---------------------------------------------------------------- bad input
def test_bad_ids_are_refused_unknown_ids_done_with_zero_rows_and_overdue_flagged(tmp_path, monkeypatch):
    import datetime as dt

    from deltarec.lake import open_lake
    from deltarec.privacy import PrivacyError, apply_pending, status
    from deltarec.privacy.requests import FORGET_REQUESTS

    monkeypatch.delenv("DELTAREC_PRIVACY_SECRET", raising=False)
    plain = ("privacy.retention_hours=0", "privacy.enforce_retention=false", "demo.enabled=false")
    cfg = make_config(tmp_path / "lake", *plain)
    lake = open_lake(cfg.lake, None)
    import contextlib
    import io

    for bad, why in (("", "an empty user id"), ("   ", "an empty user id"), ("ab\x01c", "control characters"),
                     ("x" * 200, "200 characters")):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc, out = _cli(cfg, "forget", bad, settings=plain)
        assert rc == 2 and why in err.getvalue() and "Nothing was recorded" in err.getvalue()
    assert _cli(cfg, "forget", settings=plain)[0] == 2
    assert not lake.exists(cfg.privacy.requests_table)  # nothing recorded from a refused call
    with pytest.raises(PrivacyError, match="empty user id"):
        from deltarec.privacy import file_requests

        file_requests(cfg, lake, ["ok-1", ""], by="t")
    # rows an upstream system appended itself: a null id, a blank one, an unknown one, an old one
    old = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=40)
    now = dt.datetime.now(dt.timezone.utc)
    lake.create(cfg.privacy.requests_table, FORGET_REQUESTS)
    lake.write(cfg.privacy.requests_table, pa.Table.from_pylist([
        {"request_id": None, "user_id": None, "requested_at": now, "requested_by": "crm", "reason": None},
        {"request_id": "r-blank", "user_id": " ", "requested_at": now, "requested_by": "crm", "reason": None},
        {"request_id": "r-unknown", "user_id": "nobody", "requested_at": old, "requested_by": "crm",
         "reason": "Art. 17"}], schema=FORGET_REQUESTS), mode="append", schema=FORGET_REQUESTS)
    st = status(cfg, lake)
    assert len(st["pending"]) == 3 and st["overdue"] == ["r-unknown"]
    rc, _ = _cli(cfg, "forget", "--status", settings=plain)
    assert rc == 1  # an overdue request fails the status check, for monitoring
    apply_pending(cfg, lake)
    done = {d["request_id"]: d for d in status(cfg, lake)["done"]}
    assert len(done) == 3
    refused = [d for d in done.values() if d["status"] == "refused"]
    assert len(refused) == 2 and all("empty user id" in d["detail"] for d in refused)
    assert done["r-unknown"]["status"] == "vacuumed" and "unknown user" in done["r-unknown"]["detail"]
    assert sum(done["r-unknown"]["rows_removed"].values()) == 0
    # pseudonyms need the secret, from the environment or a file, never from the config
    strict = make_config(tmp_path / "lake", "privacy.pseudonymize=true")
    with pytest.raises(PrivacyError, match="DELTAREC_PRIVACY_SECRET"):
        apply_pending(strict, lake)
    empty = tmp_path / "secret"
    empty.write_text("")
    with pytest.raises(PrivacyError, match="is empty"):
        apply_pending(make_config(tmp_path / "lake", "privacy.pseudonymize=true", f"privacy.secret_file={empty}"),
                      lake)


# ---------------------------------------------------------------- policies (last: they delete checkpoints)
def test_keep_checkpoints_deletes_the_others_and_unlearning_retrain_makes_the_next_night_full(spark, demo):
    from deltarec.lake import open_lake
    from deltarec.lake.ledger import CHAMPION, Ledger
    from deltarec.pipeline.demo import append_day, demo_days
    from deltarec.pipeline.nightly import run_nightly
    from deltarec.privacy import apply_pending, file_requests, full_retrain_due
    from deltarec.privacy.keys import pseudonym
    from deltarec.registry.core import events
    from deltarec.train.checkpoint import verify_checkpoint

    cfg = demo.model_copy(update={"privacy": demo.privacy.model_copy(update={
        "keep_checkpoints": 0, "unlearning": "retrain", "erase_source": False})})
    lake = open_lake(cfg.lake, spark)
    ledger = Ledger(lake, cfg.lake.runs_table)
    runs = ledger.runs(cfg.model.name)
    keep = {r.run_id for r in runs if r.status == CHAMPION} | {runs[0].run_id}
    assert len(runs) > len(keep)
    state = lake.read_arrow(cfg.lake.user_state_table)["user_id"].to_pylist()
    user = next(u for u in sorted(set(lake.read_arrow(cfg.lake.events_table)["user_id"].to_pylist()) - {None})
                if pseudonym(SECRET.encode(), u) in state)
    file_requests(cfg, lake, [user], by="test")
    apply_pending(cfg, lake)
    for r in ledger.runs(cfg.model.name):
        if r.run_id in keep:
            verify_checkpoint(r.checkpoint_path, r.checkpoint_sha256)
        else:
            old = next(x for x in runs if x.run_id == r.run_id).checkpoint_path
            assert r.checkpoint_path == "" and not os.path.exists(old)
            assert [e["action"] for e in events(lake, cfg, r.run_id) if e["run_id"] == r.run_id].count(
                "checkpoint_deleted") == 1
    rc, out = _cli(cfg, "status", "--verify", "--json", settings=(*E2E, "privacy.keep_checkpoints=0"))
    listed = {x["run_id"]: x["checkpoint"] for x in json.loads(out)["runs"]}
    assert rc == 0 and all(listed[k].get("verified") for k in keep)
    assert all(c.get("deleted") for k, c in listed.items() if k not in keep)
    # exact unlearning: the next night trains from scratch over the erased examples, and only that one
    assert full_retrain_due(cfg, lake, ledger, cfg.model.name)
    days, catalogue, _ = demo_days(cfg)
    append_day(lake, cfg, days[4][1], catalogue)
    night = run_nightly(spark, cfg, lake=lake)
    assert night.status == "committed" and night.strategy == "full"
    assert full_retrain_due(cfg, lake, ledger, cfg.model.name) is None
