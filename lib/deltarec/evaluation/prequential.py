"""Prequential next-day evaluation: score models on the day that just arrived,
before any of them trains on it."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .metrics import ranking_metrics, topk_from_scores

if TYPE_CHECKING:  # torch is imported where models are scored: reading metrics needs no torch
    import torch


def relevant_sets(users: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, list[set[int]]]:
    """Distinct users (sorted) and, for each, the set of items they interacted with."""
    order = np.lexsort((items, users))
    users, items = users[order], items[order]
    uniq, starts = np.unique(users, return_index=True)
    bounds = list(starts[1:]) + [len(users)]
    return uniq, [set(items[s:e].tolist()) for s, e in zip(starts, bounds)]


def user_histories(rows, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Each user's history before their first row of ``rows`` (an Arrow table
    with user_idx, event_time, history_idx, optionally event_id): (sorted users,
    (U, length) -1 padded). Rows at the same time are taken in the delta job's
    history order (event_id), so the first one's history holds none of the
    scored period's items."""
    from ..data.shards import first_histories

    rows = rows.select([c for c in ("user_idx", "event_time", "history_idx", "event_id") if c in rows.column_names])
    return first_histories(_in_history_order(rows), max(length, 1))


def _in_history_order(rows):
    """``rows`` by user, time and (when present) event_id: the delta job's history order."""
    import pyarrow.compute as pc

    keys = [("user_idx", "ascending"), ("event_time", "ascending")]
    if "event_id" in rows.column_names:
        keys.append(("event_id", "ascending"))
    return rows.take(pc.sort_indices(rows, sort_keys=keys))


def user_repeats(rows, state, k: int, half_life_days: float) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Each user's whole-history repeat lists as of the start of the scored
    day (the day of the first row of ``rows``: an Arrow table with user_id,
    user_idx, event_time, optionally event_id), from USER_STATE rows ``state``
    as they were before the scored period: (sorted users, ``state_arrays``).
    A hashed user's lists are those of the customer of its first row (as
    :func:`user_histories` takes its history)."""
    from ..features.repeats import day_start, to_micros, user_arrays

    rows = _in_history_order(rows.select([c for c in ("user_id", "user_idx", "event_time", "event_id")
                                          if c in rows.column_names]))
    users = np.asarray(rows["user_idx"].to_numpy(), dtype=np.int64)
    uniq, first = np.unique(users, return_index=True)
    ids = rows["user_id"].take(first).to_pylist()
    when = day_start(to_micros(min(rows["event_time"].to_pylist())))
    return uniq, user_arrays(state, ids, when, k, half_life_days)


def align_histories(users: np.ndarray, histories: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray | None:
    """Rows of ``histories`` ((sorted users, (H, L))) for ``users``; -1 (no
    history) for a user it does not have."""
    return None if histories is None else _align(users, *histories, -1)


def align_repeats(users: np.ndarray, repeats: tuple[np.ndarray, dict[str, np.ndarray]] | None
                  ) -> dict[str, np.ndarray] | None:
    """Rows of ``repeats`` ((sorted users, {column: (H, K)}), as
    :func:`user_repeats` gives) for ``users``; empty lists (item -1, features
    0) for a user it does not have."""
    if repeats is None:
        return None
    return {c: _align(users, repeats[0], v, -1 if c == "repeat_idx" else 0) for c, v in repeats[1].items()}


def _align(users: np.ndarray, have: np.ndarray, values: np.ndarray, missing) -> np.ndarray:
    """Rows of ``values`` (one per sorted user of ``have``) for ``users``; ``missing`` for a user it does not have."""
    out = np.full((len(users), *values.shape[1:]), missing, dtype=values.dtype)
    if len(have):
        pos = np.clip(np.searchsorted(have, users), 0, len(have) - 1)
        found = have[pos] == users
        out[found] = values[pos[found]]
    return out


def _takes_history(model) -> bool:
    import inspect

    try:
        return "history_idx" in inspect.signature(model.score_all).parameters
    except (TypeError, ValueError):
        return False


def model_topk(model: "torch.nn.Module", users: np.ndarray, catalog: np.ndarray, k: int,
               chunk: int = 256, histories: np.ndarray | None = None,
               repeats: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Top ``k`` of ``catalog`` for each user; ``histories`` (len(users), L):
    each user's items before the scored period, and ``repeats`` (len(users),
    K each) their repeat lists as of it, for a model that reads them."""
    import torch

    from ..serving.scorer import repeat_items

    model.eval()
    if not repeat_items(model):
        repeats = None
    cat = torch.from_numpy(catalog.astype(np.int64))
    with_hist = histories is not None and _takes_history(model)
    if with_hist and len(histories) != len(users):
        raise ValueError(f"{len(histories)} histories for {len(users)} users: one row per user")
    out = []
    with torch.no_grad():
        for s in range(0, len(users), chunk):
            u = torch.from_numpy(users[s:s + chunk].astype(np.int64))
            kw = {"history_idx": torch.from_numpy(np.ascontiguousarray(histories[s:s + chunk]))} if with_hist else {}
            if repeats is not None:
                kw["repeat"] = {c: torch.from_numpy(np.ascontiguousarray(v[s:s + chunk])) for c, v in repeats.items()}
            scores = model.score_all(u, cat, **kw).numpy()
            out.append(catalog[topk_from_scores(scores, k)])
    return np.concatenate(out) if out else np.zeros((0, k), dtype=np.int64)


def evaluate(models: dict[str, "torch.nn.Module"], popular: np.ndarray | None, users: np.ndarray,
             items: np.ndarray, catalog: np.ndarray, k: int,
             histories: tuple[np.ndarray, np.ndarray] | None = None,
             repeats: tuple[np.ndarray, dict[str, np.ndarray]] | None = None) -> dict[str, Any]:
    """HR@k / NDCG@k (and recall, MRR) per model and for the popularity list.
    ``histories``: (sorted users, (H, L)) as :func:`user_histories` gives,
    passed to every model that reads a history; ``repeats``: (sorted users,
    (H, K) arrays) as :func:`user_repeats` gives, to every model that reads them."""
    uniq, relevant = relevant_sets(users, items)
    out: dict[str, Any] = {"users": int(len(uniq)), "k": k}
    if len(uniq) == 0 or len(catalog) == 0:
        return out
    hist = align_histories(uniq, histories)
    rep = align_repeats(uniq, repeats)
    top_k = min(k, len(catalog))  # eval.k beyond a small catalogue: the whole catalogue is the top k
    for name, model in models.items():
        out[name] = _rounded(ranking_metrics(model_topk(model, uniq, catalog, top_k, histories=hist, repeats=rep),
                                             relevant, top_k))
    if popular is not None and len(popular):
        top = np.tile(np.asarray(popular[:k], dtype=np.int64), (len(uniq), 1))
        out["popularity"] = _rounded(ranking_metrics(top, relevant, min(k, top.shape[1])))
    return out


def _rounded(d: dict[str, float]) -> dict[str, float]:
    return {k: round(float(v), 5) for k, v in d.items()}


def catalog_indices(items, features) -> np.ndarray:
    """The hashed item indices models rank over: every item of the catalogue
    ``items`` (a Spark DataFrame with item_id), distinct and sorted."""
    from ..features.examples import catalog

    return np.unique(catalog(items, features).select("item_idx").toArrow()["item_idx"].to_numpy())


# ------------------------------------------------------------ lake storage
# metrics["prequential"] keys, which are also the role names in the metrics table
ROLES = ("champion", "candidate", "stale", "popularity")
# runs committed before the champion's key was 'champion' stored it as 'model'
_LEGACY_KEYS = {"champion": "model"}


def role_metrics(prequential: dict[str, Any] | None, role: str) -> dict[str, float]:
    """One role's metrics from a run's ``metrics["prequential"]`` ({} if absent),
    reading what older runs stored under another key."""
    pre = prequential or {}
    got = pre.get(role)
    if got is None and role in _LEGACY_KEYS:
        got = pre.get(_LEGACY_KEYS[role])
    return got if isinstance(got, dict) else {}


def metric_rows(run_id: str, model: str, first: int, last: int, phase: str, results: dict[str, Any],
                run_ids: dict[str, str | None]) -> list[dict[str, Any]]:
    """Long rows (one per role and metric) of a prequential or gate result.

    ``results`` is :func:`evaluate`'s dict (prequential: the ``ROLES``,
    metrics without @k) or the gate's (roles champion / candidate, metrics
    already named like ``ndcg@10``); ``run_ids`` maps a role to the run whose
    checkpoint was scored."""
    import datetime as dt

    now = dt.datetime.now(dt.timezone.utc)
    k = results.get("k")
    rows = []
    for role in ROLES if phase == "prequential" else ("champion", "candidate"):
        vals = results.get(role)
        if not isinstance(vals, dict):
            continue
        for metric, value in sorted(vals.items()):
            name = f"{metric}@{k}" if phase == "prequential" and k and "@" not in metric else metric
            ranking = "@" in name
            rows.append({"run_id": run_id, "model": model, "source_first": first, "source_last": last,
                         "phase": phase, "role": role, "model_run_id": run_ids.get(role), "metric": name,
                         "value": float(value),
                         "n": int(results.get("users", 0) if ranking else results.get("n", results.get("users", 0))),
                         "computed_at": now})
    return rows


def store_metrics(lake, table: str, run_id: str, phase: str, rows: list[dict[str, Any]]) -> None:
    """Replace this run's rows of ``phase``: a rerun of a crashed night
    rewrites them instead of adding a second copy."""
    import pyarrow as pa

    from ..lake import schemas

    lake.create(table, schemas.PREQUENTIAL_METRICS)
    where = f"run_id = '{run_id.replace(chr(39), chr(39) * 2)}' AND phase = '{phase}'"
    if not rows:
        lake.delete(table, where)
        return
    data = pa.Table.from_pylist(rows, schema=schemas.PREQUENTIAL_METRICS)
    lake.write(table, data, mode="overwrite", replace_where=where, schema=schemas.PREQUENTIAL_METRICS)
