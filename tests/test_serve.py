"""`deltarec serve` as a real uvicorn process on a free loopback port, asked
over real HTTP (httpx), on a small real lake: it answers from the table and the
champion, refuses every bad input with a 4xx naming the field and stays up,
keeps serving the old champion while a night trains, follows the promotion and
a rollback, and never serves a corrupt checkpoint."""
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from conftest import ROOT, make_config
from deltarec.lake import open_lake
from deltarec.lake.ledger import Ledger
from deltarec.pipeline.demo import append_day, demo_days
from deltarec.serving.table import latest_refresh
from test_recommend import same_ranking, table_rows

BASE = ("demo.history_days=2", "demo.nights=1", "train.epochs=2", "recommend.enabled=true")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, seconds: float, what: str):
    end = time.monotonic() + seconds
    last = None
    while time.monotonic() < end:
        try:
            last = check()
            if last:
                return last
        except httpx.HTTPError as e:
            last = e
        time.sleep(0.2)
    raise AssertionError(f"timed out after {seconds}s waiting for {what} (last: {last!r})")


@pytest.fixture(scope="module")
def served(spark, tmp_path_factory, demo_lake):
    root = tmp_path_factory.mktemp("serve") / "lake"
    cfg = make_config(root, *BASE)
    demo_lake(root, *BASE)  # the same lake as test_recommend's, built once
    lake = open_lake(cfg.lake, spark)
    port = free_port()
    log_path = root.parent / "serve.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "deltarec.cli", "serve", "--conf", str(ROOT / "conf" / "local.yaml"),
         "--set", f"lake.root={root}", "--set", "serve.poll_seconds=0.3", "--port", str(port)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "lib")}, stdout=log, stderr=subprocess.STDOUT)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    try:
        wait_for(lambda: client.get("/health").status_code == 200, 180, "the server's first snapshot")
        yield dict(cfg=cfg, lake=lake, root=root, client=client, proc=proc, ledger=Ledger(lake, cfg.lake.runs_table),
                   log=log_path)
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def health(s) -> dict:
    return s["client"].get("/health").json()


def busiest(s) -> str:
    state = s["lake"].read_arrow(s["cfg"].lake.user_state_table)
    return state.sort_by([("events", "descending"), ("user_id", "ascending")])["user_id"][0].as_py()


def test_health_lookups_popularity_and_live_scoring(served):
    s, c = served, served["client"]
    cfg = s["cfg"]
    champ = s["ledger"].champion(cfg.model.name)
    version, _ = latest_refresh(s["lake"], cfg.recommend.table)
    h = health(s)
    assert (h["status"], h["run_id"], h["table_version"], h["ledger_champion"]) == ("ok", champ.run_id, version,
                                                                                  champ.run_id)
    assert h["loaded_at"] and h["load_seconds"] >= 0 and h["users"] > 100 and h["error"] is None
    rows = table_rows(s["lake"], cfg.recommend.table)
    for user in sorted(u for u in rows if u is not None)[:20]:
        r = c.get(f"/recommendations/{user}", params={"k": 5}).json()
        assert r["run_id"] == champ.run_id and r["table_version"] == version
        assert [e["item_id"] for e in r["items"]] == rows[user][0][:5]
        assert [e["rank"] for e in r["items"]] == [1, 2, 3, 4, 5]
        assert r["fallback"] == (None if rows[user][2][0] == "model" else "popularity")
    r = c.get("/recommendations/no-such-customer", params={"k": 7}).json()
    assert r["fallback"] == "popularity" and [e["item_id"] for e in r["items"]] == rows[None][0][:7]
    user = busiest(s)
    deep = c.get(f"/recommendations/{user}", params={"k": 15}).json()  # deeper than the table: the model
    assert deep["from"] == "model" and len(deep["items"]) == 15
    same_ranking([e["item_id"] for e in deep["items"][:10]], [e["score"] for e in deep["items"][:10]],
                 rows[user][0], rows[user][1])
    live = c.post("/score", json={"user_id": user, "items": [], "k": 10}).json()  # nothing new: the table's list
    assert live["from"] == "model" and live["run_id"] == champ.run_id
    same_ranking([e["item_id"] for e in live["items"]], [e["score"] for e in live["items"]],
                 rows[user][0], rows[user][1])
    item = rows[None][0][0]
    basket = c.post("/score", json={"user_id": user, "items": [item] * 3, "k": 10}).json()
    assert basket["fallback"] is None and len(basket["items"]) == 10
    assert [e["score"] for e in basket["items"]] != [e["score"] for e in live["items"]]  # the basket counts
    newcomer = c.post("/score", json={"user_id": "brand-new", "items": [item]}).json()
    assert newcomer["fallback"] is None and newcomer["from"] == "model"


def test_every_bad_input_gets_a_4xx_naming_the_field_and_the_server_stays_up(served):
    s, c = served, served["client"]
    cfg = s["cfg"]
    known = table_rows(s["lake"], cfg.recommend.table)[None][0][0]
    max_k = cfg.recommend.max_k
    cases = [
        ("GET", "/recommendations/17850?k=0", None, 422, "k"),
        ("GET", f"/recommendations/17850?k={max_k + 1}", None, 422, "k"),
        ("GET", "/recommendations/17850?k=abc", None, 422, "k"),
        ("GET", "/recommendations/17850?k=1.5", None, 422, "k"),
        ("GET", "/recommendations/" + "x" * 300, None, 422, "user_id"),
        ("POST", "/score", b'{"user_id": "17850", "items": [', 400, "body"),
        ("POST", "/score", b"[1, 2]", 422, "body"),
        ("POST", "/score", b"", 422, "body"),
        ("POST", "/score", {"items": [known]}, 422, "user_id"),
        ("POST", "/score", {"user_id": 17850}, 422, "user_id"),
        ("POST", "/score", {"user_id": ""}, 422, "user_id"),
        ("POST", "/score", {"user_id": "u", "items": known}, 422, "items"),
        ("POST", "/score", {"user_id": "u", "items": [1]}, 422, "items[0]"),
        ("POST", "/score", {"user_id": "u", "items": [known, "NO-SUCH-ITEM"]}, 422, "items[1]"),
        ("POST", "/score", {"user_id": "u", "k": 0}, 422, "k"),
        ("POST", "/score", {"user_id": "u", "k": "many"}, 422, "k"),
        ("POST", "/score", {"user_id": "u", "colour": "red"}, 422, "colour"),
        ("POST", "/score", {"user_id": "u", "items": [known] * (cfg.serve.max_items + 1)}, 422, "items"),
    ]
    for method, path, body, status, field in cases:
        if method == "GET":
            r = c.get(path)
        elif isinstance(body, bytes):
            r = c.post(path, content=body, headers={"content-type": "application/json"})
        else:
            r = c.post(path, json=body)
        assert r.status_code == status, (path, body, r.status_code, r.text)
        err = r.json()
        assert err["field"] == field and field.split("[")[0] in err["error"], (path, body, err)
    assert s["proc"].poll() is None and c.get("/health").status_code == 200
    assert c.get(f"/recommendations/{busiest(s)}").status_code == 200


def test_follows_the_champion_through_a_night_a_promotion_and_a_rollback(spark, served):
    from deltarec.pipeline.nightly import run_nightly
    from deltarec.registry import rollback

    s, c = served, served["client"]
    cfg, lake, ledger = s["cfg"], s["lake"], s["ledger"]
    old = ledger.champion(cfg.model.name)
    user = busiest(s)
    days, items, _ = demo_days(cfg)
    append_day(lake, cfg, days[3][1], items)
    night_cfg = make_config(s["root"], *BASE, "gate.enabled=false")  # the new run is promoted whatever it scores
    done, result = threading.Event(), {}

    def night():
        try:
            result["night"] = run_nightly(spark, night_cfg, lake=lake)
        except BaseException as e:  # surfaced below
            result["error"] = e
        finally:
            done.set()

    seen = []  # (time, run_id, table_version, items)
    threading.Thread(target=night, daemon=True).start()
    while not done.is_set():
        r = c.get(f"/recommendations/{user}", params={"k": 10})
        assert r.status_code == 200, r.text
        j = r.json()
        seen.append((time.time(), j["run_id"], j["table_version"], [e["item_id"] for e in j["items"]]))
        time.sleep(0.1)
    assert "error" not in result, result.get("error")
    new = ledger.champion(cfg.model.name)
    assert new.run_id == result["night"].run_id != old.run_id
    version, meta = latest_refresh(lake, cfg.recommend.table)
    assert meta["run_id"] == new.run_id
    wait_for(lambda: health(s)["run_id"] == new.run_id and health(s)["table_version"] == version, 60,
             "the server to swap to the new champion")
    r = c.get(f"/recommendations/{user}").json()
    seen.append((time.time(), r["run_id"], r["table_version"], [e["item_id"] for e in r["items"]]))

    committed = new.committed_at.timestamp()
    during = [x for x in seen if x[0] < committed]
    assert len(during) > 10 and {x[1] for x in during} == {old.run_id}  # the old champion while the night trained
    assert seen[-1][1] == new.run_id
    # every answer is exactly one table version's rows, from the run that wrote that version: never a mix
    versions = {v: table_rows(lake, cfg.recommend.table, v) for v in {x[2] for x in seen}}
    for _, run_id, v, got in seen:
        want_items, _, _, run_ids = versions[v][user]
        assert got == want_items and set(run_ids) == {run_id}

    out = rollback(ledger, lake, cfg, by="test", reason="serve test rollback")
    assert out["champion"] == old.run_id and "version" in out["recommendations"], out
    back = out["recommendations"]["version"]
    wait_for(lambda: health(s)["run_id"] == old.run_id and health(s)["table_version"] == back, 60,
             "the server to follow the rollback")
    r = c.get(f"/recommendations/{user}").json()
    assert r["run_id"] == old.run_id and [e["item_id"] for e in r["items"]] == table_rows(
        lake, cfg.recommend.table, back)[user][0]


def test_a_corrupt_champion_is_never_served_and_said_so(spark, served):
    from deltarec.pipeline.recommend import refresh_quietly

    s, c = served, served["client"]
    cfg, lake, ledger = s["cfg"], s["lake"], s["ledger"]
    good = ledger.champion(cfg.model.name)
    bad = next(r for r in reversed(ledger.runs(cfg.model.name)) if r.run_id != good.run_id)
    path = os.path.join(bad.checkpoint_path, "model.safetensors")
    saved = path + ".bak"
    shutil.copy(path, saved)
    user = busiest(s)
    try:
        with open(path, "r+b") as f:  # the files rot after the run was committed
            f.seek(64)
            f.write(b"\x00" * 16)
        # promoted behind the registry's back (`registry promote` verifies and would refuse)
        ledger.set_champion(cfg.model.name, bad.run_id, by="test", reason="corrupt champion")
        assert "error" in refresh_quietly(spark, cfg, lake, reason="test")  # the executors refuse it too
        h = wait_for(lambda: (lambda h: h if h["error"] else None)(health(s)), 60, "the failure in /health")
        assert bad.run_id in h["error"] and "model.safetensors" in h["error"] and h["status"] == "degraded"
        assert h["run_id"] == good.run_id and h["ledger_champion"] == bad.run_id
        for _ in range(20):
            r = c.get(f"/recommendations/{user}")
            assert r.status_code == 200 and r.json()["run_id"] == good.run_id
        assert bad.run_id in s["log"].read_text()  # and in the log
    finally:
        shutil.move(saved, path)
        ledger.set_champion(cfg.model.name, good.run_id, by="test", reason="back to the good one")
    wait_for(lambda: health(s)["status"] == "ok", 60, "the server to recover")
    assert health(s)["run_id"] == good.run_id and s["proc"].poll() is None


def test_a_user_erased_from_the_table_is_gone_from_the_answers(served):
    """`deltarec forget` erases a user from the recommendations table with the
    lake's delete_keys (one commit, no refresh): the server swaps to that
    version and answers the user as a stranger, from the table and from
    POST /score (their stored history is dropped too)."""
    import pyarrow as pa

    s, c = served, served["client"]
    cfg, lake = s["cfg"], s["lake"]
    user = busiest(s)
    assert c.get(f"/recommendations/{user}").json()["fallback"] is None
    assert c.post("/score", json={"user_id": user, "items": []}).json()["from"] == "model"  # their history
    assert lake.delete_keys(cfg.recommend.table, pa.table({"user_id": [user]}))["rows"] == cfg.recommend.k
    erased = lake.version(cfg.recommend.table)
    wait_for(lambda: health(s)["table_version"] == erased, 60, "the server to serve the erased version")
    popular = table_rows(lake, cfg.recommend.table, erased)[None][0]
    r = c.get(f"/recommendations/{user}", params={"k": 5}).json()
    assert r["fallback"] == "popularity" and [e["item_id"] for e in r["items"]] == popular[:5]
    r = c.post("/score", json={"user_id": user, "items": [], "k": 5}).json()
    assert r["fallback"] == "popularity" and [e["item_id"] for e in r["items"]] == popular[:5]
    assert health(s)["status"] == "ok" and s["proc"].poll() is None
