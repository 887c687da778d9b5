"""What a forget costs, and what the model loses, on a full demo lake.

Forgets a seeded 1 % of the customers with state in one batch (`deltarec
forget` + the forget pass, as the next night would run it) and reports:

- cost: seconds of the erase (checkpoints, each table, the log), rows removed
  and files rewritten per table, checkpoints rewritten; then seconds and files
  of the VACUUM (retention 0 here, Delta's check off: the derived tables;
  the source table's VACUUM waits until a night has consumed its erase);
- loss: the champion before and after, scored with the gate's metrics on its
  own run's held-out rows (events of its last night that nothing trained
  on), for the remaining customers and for the forgotten ones.

It changes the lake: build a throwaway one first, e.g.

    ./spark-submit.sh jobs/nightly.py --set lake.root=/tmp/lake-privacy
    .venv/bin/python benchmarks/forget_cost.py --lake /tmp/lake-privacy

A copy of the lake before the forget is kept at <lake>.before-forget (same
absolute paths, so `--restore` moves it back for another run). Results go
to benchmarks/results/forget_cost.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lake", required=True, help="a full demo lake (it is changed; a copy is kept)")
    ap.add_argument("--fraction", type=float, default=0.01, help="share of customers with state to forget")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--restore", action="store_true", help="first put <lake>.before-forget back")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "forget_cost.json"))
    a = ap.parse_args()

    import pyarrow as pa
    import pyarrow.compute as pc

    from deltarec.config import load_config
    from deltarec.evaluation.gate import evaluate_models
    from deltarec.lake import open_lake
    from deltarec.lake.ledger import Ledger
    from deltarec.privacy import apply_pending, file_requests
    from deltarec.train.checkpoint import load_model

    lake_dir = os.path.abspath(a.lake)
    backup = lake_dir.rstrip("/") + ".before-forget"
    if a.restore:
        if not os.path.isdir(backup):
            sys.exit(f"--restore: no copy at {backup}")
        shutil.rmtree(lake_dir)
        shutil.copytree(backup, lake_dir, symlinks=True)
    elif not os.path.isdir(backup):
        shutil.copytree(lake_dir, backup, symlinks=True)
    load_start = os.getloadavg()
    cfg = load_config(ROOT / "conf" / "local.yaml", [f"lake.root={lake_dir}", "lake.engine=delta-rs",
                                                     "privacy.retention_hours=0", "privacy.enforce_retention=false"])
    lake = open_lake(cfg.lake, None)
    ledger = Ledger(lake, cfg.lake.runs_table)
    champ = ledger.champion(cfg.model.name)
    if champ is None:
        sys.exit(f"no champion in {lake_dir}: build the demo lake first (see the docstring)")
    ex = cfg.lake.examples_table
    rows = lake.lookup(ex, pa.table({"run_id": [champ.run_id]}), None)
    rows = rows.filter(pc.equal(rows["holdout"], True))
    catalogue = np.unique(lake.read_arrow(cfg.lake.item_stats_table)["item_idx"].to_numpy())
    users = sorted(set(lake.read_arrow(cfg.lake.user_state_table)["user_id"].to_pylist()) - {None})
    rng = np.random.default_rng(a.seed)
    n = max(1, int(round(a.fraction * len(users))))
    forgotten = sorted(rng.choice(users, n, replace=False).tolist())
    before = load_model(champ)
    sizes = {t: lake.lookup(t, pa.table({"user_id": forgotten}), ["user_id"]).num_rows
             for t in (ex, cfg.lake.event_index_table, cfg.lake.user_state_table, cfg.lake.events_table)}
    files = {t: len(lake.data_files(t)) for t in sizes}

    t0 = time.perf_counter()
    file_requests(cfg, lake, forgotten, by="benchmark", reason="forget_cost benchmark")
    erased = apply_pending(cfg, lake)["erased"]
    erase_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    derived = load_config(ROOT / "conf" / "local.yaml", [f"lake.root={lake_dir}", "lake.engine=delta-rs",
                                                         "privacy.retention_hours=0", "privacy.enforce_retention=false",
                                                         "privacy.erase_source=false"])
    vac = apply_pending(derived, lake)["vacuumed"]
    vacuum_s = time.perf_counter() - t1
    after = load_model(ledger.champion(cfg.model.name))

    gone = pc.is_in(rows["user_id"], pa.array(forgotten, pa.string())).to_numpy(zero_copy_only=False)
    cols = [c for c in ("user_idx", "item_idx", "label", "history_idx", "event_time", "event_id") if c in rows.column_names]
    scored = {}
    for name, mask in (("remaining", ~gone), ("forgotten", gone)):
        part = rows.filter(pa.array(mask)).select(cols)
        res = evaluate_models({"before": before, "after": after}, part, catalogue, ["ndcg@10", "hr@10", "auc"])
        scored[name] = {"rows": part.num_rows, "users": res.get("users", 0),
                        "before": res.get("before", {}), "after": res.get("after", {})}
    out = {
        "lake": lake_dir, "champion": champ.run_id, "customers_with_state": len(users), "forgotten": n,
        "rows_of_forgotten_before": sizes, "table_files_before": files, "checkpoints": len(ledger.runs()),
        "erase": {"total_seconds": round(erase_s, 2), "stage_seconds": erased["seconds"],
                  **{k: erased[k] for k in ("rows_removed", "files_rewritten", "checkpoints")}},
        "vacuum": {"seconds": round(vacuum_s, 2), "files": vac.get("files_vacuumed"), "tables": vac.get("tables")},
        "holdout": scored, "load_average": {"start": load_start, "end": os.getloadavg()},
        "model": {"name": cfg.model.name, "embedding": cfg.model.embedding,
                  "user_buckets": cfg.features.user_buckets},
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1, default=str))
    print(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
