"""`deltarec serve` under a bounded local load, from a separate process (this
one; the server is a subprocess): requests/s, p50/p99 latency and errors, once
steady and once across a promotion swap, plus a short POST /score phase.

    .venv/bin/python benchmarks/serve_load.py [--set lake.root=./lake] [--requests 3000] [--concurrency 8]

Needs a lake after the demo with at least two runs. The swap phase promotes
another run with ``deltarec registry promote`` (a separate process, which
rewrites the recommendations table on Spark) while the load runs, waits for the
server to swap, and rolls back at the end, so the lake's champion is as before.
Every answer of the swap phase is checked against the table version it names
(time travel): an answer mixing two champions would count as ``half_loaded``.
Results go to benchmarks/results/serve_load.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))

from deltarec.config import load_config  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def load(base: str, paths: list[tuple[str, str, dict | None]], concurrency: int,
               until=None) -> list[dict]:
    """Send ``paths`` (method, path, json) with ``concurrency`` workers; with
    ``until`` (a callable), keep cycling through them until it returns True."""
    import httpx

    out: list[dict] = []
    queue = iter(paths)
    lock = asyncio.Lock()

    async def next_request():
        nonlocal queue
        async with lock:
            try:
                return next(queue)
            except StopIteration:
                if until is None or until():
                    return None
                queue = iter(paths)
                return next(queue)

    async def worker(client):
        while True:
            req = await next_request()
            if req is None:
                return
            method, path, body = req
            t = time.perf_counter()
            try:
                r = await (client.get(path) if method == "GET" else client.post(path, json=body))
                ms = (time.perf_counter() - t) * 1000
                j = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
                out.append({"path": path, "status": r.status_code, "ms": ms, "run_id": j.get("run_id"),
                            "version": j.get("table_version"), "user": j.get("user_id"),
                            "items": [e["item_id"] for e in j.get("items", [])], "at": time.time()})
            except Exception as e:
                out.append({"path": path, "status": 0, "ms": (time.perf_counter() - t) * 1000, "error": repr(e),
                            "at": time.time()})

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    for r in out:
        r["wall"] = wall
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU of process ``pid`` so far (Linux /proc): the server's
    cost per request, which the machine's load does not inflate as it does latency."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(server, base: str, paths, concurrency: int, until=None) -> dict:
    c0 = cpu_seconds(server.pid)
    rows = asyncio.run(load(base, paths, concurrency, until))
    out = summary(rows)
    out["server_cpu_ms_per_request"] = round((cpu_seconds(server.pid) - c0) * 1000 / max(len(rows), 1), 3)
    return out, rows


def summary(rows: list[dict]) -> dict:
    ms = np.array([r["ms"] for r in rows]) if rows else np.zeros(1)
    wall = rows[0]["wall"] if rows else 1.0
    ok = [r for r in rows if r["status"] == 200]
    return {"requests": len(rows), "seconds": round(wall, 2), "requests_per_s": round(len(rows) / wall, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "max_ms": round(float(ms.max()), 2), "errors": len(rows) - len(ok),
            "runs_answering": sorted({r["run_id"] for r in ok})}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conf", default=str(ROOT / "conf" / "local.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    cfg = load_config(args.conf, args.overrides)
    from deltarec.lake.delta_rs import DeltaRsEngine
    from deltarec.lake.ledger import Ledger

    lake = DeltaRsEngine(cfg.lake.root)
    ledger = Ledger(lake, cfg.lake.runs_table)
    champ = ledger.champion(cfg.model.name)
    other = next((r for r in reversed(ledger.runs(cfg.model.name)) if champ and r.run_id != champ.run_id), None)
    if champ is None or other is None or not lake.exists(cfg.recommend.table):
        print(f"{lake.root} needs a champion, another run and a {cfg.recommend.table} table: run the demo first",
              file=sys.stderr)
        return 1
    users = sorted({u for u in lake.read_arrow(cfg.recommend.table)["user_id"].to_pylist() if u is not None})
    rng = random.Random(args.seed)
    # 90% customers the table knows, 10% unknown ones (the popularity fallback)
    gets = [("GET", f"/recommendations/{rng.choice(users) if rng.random() < 0.9 else f'new-{i}'}?k=10", None)
            for i in range(args.requests)]
    items = [i for i in lake.read_arrow(cfg.lake.item_stats_table)["item_id"].to_pylist()][:2000]
    posts = [("POST", "/score", {"user_id": rng.choice(users), "items": rng.sample(items, 3), "k": 10})
             for _ in range(max(200, args.requests // 10))]

    port = free_port()
    (ROOT / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    common = ["--conf", args.conf, *sum((["--set", o] for o in args.overrides), [])]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "lib")}
    server = subprocess.Popen([sys.executable, "-m", "deltarec.cli", "serve", *common, "--set",
                               "serve.poll_seconds=0.5", "--port", str(port)], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=open(ROOT / "benchmarks" / "results" /
                                                                     "serve_load.server.log", "w"))
    base = f"http://127.0.0.1:{port}"
    import httpx

    def health():
        try:
            return httpx.get(f"{base}/health", timeout=5).json()
        except Exception:
            return {}

    result: dict = {"lake": str(lake.root), "champion": champ.run_id, "promoted": other.run_id,
                    "concurrency": args.concurrency, "loadavg_before": os.getloadavg()}
    try:
        t = time.time()
        while health().get("status") != "ok":
            if time.time() - t > 300 or server.poll() is not None:
                print("the server did not come up; see benchmarks/results/serve_load.server.log", file=sys.stderr)
                return 1
            time.sleep(0.5)
        asyncio.run(load(base, gets[:200], args.concurrency))  # warm-up
        result["steady"] = measured(server, base, gets, args.concurrency)[0]
        result["score"] = measured(server, base, posts, args.concurrency)[0]

        # across a promotion: load runs until the server has served the new champion for 2 s
        promote = subprocess.Popen([sys.executable, "-m", "deltarec.cli", "registry", "promote", other.run_id,
                                    "--by", "benchmark", "--reason", "serve_load swap", *common], cwd=ROOT, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        swapped_at = [None]

        def done() -> bool:
            if swapped_at[0] is None and health().get("run_id") == other.run_id:
                swapped_at[0] = time.time()
            return (swapped_at[0] is not None and time.time() - swapped_at[0] > 2) or \
                (promote.poll() is not None and promote.returncode != 0)

        result["swap"], rows = measured(server, base, gets, args.concurrency, until=done)
        promote_out = promote.communicate()[0]
        result["swap"]["promote_rc"] = promote.returncode
        # every answer is one table version's rows, from the run that wrote it
        from deltarec.serving.table import refresh_metadata

        meta = {int(h["version"]): refresh_metadata(h) for h in lake.history(cfg.recommend.table)}
        tables: dict = {}
        half, odd = 0, []
        for r in rows:
            if r["status"] != 200:
                continue
            v = r["version"]
            if v not in tables:
                t = lake.read_arrow(cfg.recommend.table, v)
                by_user: dict = {}
                for u, i in zip(t["user_id"].to_pylist(), t["item_id"].to_pylist()):
                    by_user.setdefault(u, []).append(i)
                tables[v] = by_user
            want = tables[v].get(r["user"], tables[v].get(None, []))[:10]
            if r["items"] != want or (meta.get(v) or {}).get("run_id") != r["run_id"]:
                half += 1
                if len(odd) < 10:  # kept, so a failure can be read, not guessed
                    odd.append({**{k: r.get(k) for k in ("path", "user", "run_id", "version", "items", "at")},
                                "table_items": want, "table_run_id": (meta.get(v) or {}).get("run_id")})
        result["swap"]["half_loaded_or_mixed"] = half
        result["swap"]["mismatches"] = odd
        result["swap"]["answers_by_run"] = {run: sum(1 for r in rows if r.get("run_id") == run)
                                            for run in result["swap"]["runs_answering"]}
        print(promote_out.strip().splitlines()[-2:] if promote_out else "")
    finally:
        back = subprocess.run([sys.executable, "-m", "deltarec.cli", "registry", "rollback", "--by", "benchmark",
                               "--reason", "serve_load: back to the champion", *common], cwd=ROOT, env=env,
                              capture_output=True, text=True)
        result["rolled_back"] = back.returncode == 0
        server.terminate()
        server.wait(30)
    result["loadavg_after"] = os.getloadavg()
    for phase in ("steady", "score", "swap"):
        s = result[phase]
        print(f"{phase:<7} {s['requests']:>6} requests  {s['requests_per_s']:>7.1f} req/s  p50 {s['p50_ms']:>6.2f} ms  "
              f"p99 {s['p99_ms']:>7.2f} ms  max {s['max_ms']:>7.1f} ms  errors {s['errors']}  "
              f"server CPU {s['server_cpu_ms_per_request']:.2f} ms/request  runs {s['runs_answering']}")
    print(f"swap: half-loaded or mixed answers {result['swap']['half_loaded_or_mixed']}; rolled back: "
          f"{result['rolled_back']}; load average before {result['loadavg_before'][0]:.1f}, after "
          f"{result['loadavg_after'][0]:.1f}")
    out = ROOT / "benchmarks" / "results"
    (out / "serve_load.json").write_text(json.dumps(result, indent=1, default=str))
    return 0 if result["swap"]["half_loaded_or_mixed"] == 0 and result["steady"]["errors"] == 0 else 1


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    os._exit(rc)
