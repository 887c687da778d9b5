"""Prequential next-day evaluation: score models on the day that just arrived,
before any of them trains on it."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .metrics import ranking_metrics, topk_from_scores


def relevant_sets(users: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, list[set[int]]]:
    """Distinct users (sorted) and, for each, the set of items they interacted with."""
    order = np.lexsort((items, users))
    users, items = users[order], items[order]
    uniq, starts = np.unique(users, return_index=True)
    bounds = list(starts[1:]) + [len(users)]
    return uniq, [set(items[s:e].tolist()) for s, e in zip(starts, bounds)]


@torch.no_grad()
def model_topk(model: torch.nn.Module, users: np.ndarray, catalog: np.ndarray, k: int,
               chunk: int = 256) -> np.ndarray:
    model.eval()
    cat = torch.from_numpy(catalog.astype(np.int64))
    out = []
    for s in range(0, len(users), chunk):
        u = torch.from_numpy(users[s:s + chunk].astype(np.int64))
        scores = model.score_all(u, cat).numpy()
        out.append(catalog[topk_from_scores(scores, k)])
    return np.concatenate(out) if out else np.zeros((0, k), dtype=np.int64)


def evaluate(models: dict[str, torch.nn.Module], popular: np.ndarray | None, users: np.ndarray,
             items: np.ndarray, catalog: np.ndarray, k: int) -> dict[str, Any]:
    """HR@k / NDCG@k (and recall, MRR) per model and for the popularity list."""
    uniq, relevant = relevant_sets(users, items)
    out: dict[str, Any] = {"users": int(len(uniq)), "k": k}
    if len(uniq) == 0 or len(catalog) == 0:
        return out
    for name, model in models.items():
        out[name] = _rounded(ranking_metrics(model_topk(model, uniq, catalog, k), relevant, k))
    if popular is not None and len(popular):
        top = np.tile(np.asarray(popular[:k], dtype=np.int64), (len(uniq), 1))
        out["popularity"] = _rounded(ranking_metrics(top, relevant, k))
    return out


def _rounded(d: dict[str, float]) -> dict[str, float]:
    return {k: round(float(v), 5) for k, v in d.items()}
