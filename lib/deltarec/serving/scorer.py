"""Top-k from a model over a catalogue: the one scoring routine shared by the
Spark tasks that write the recommendations table, the server's live
``POST /score`` and the MLflow model. Needs torch and numpy only.

Ids hashed into buckets may collide: two catalogue items in one bucket get the
same score from every model (the text tower is per bucket too). So a user is
scored once per *bucket* (a block matrix product inside ``model.score_all``),
``torch.topk`` picks the best buckets, and each bucket expands to its item ids
in id order: the ranking is a function of the scores and the ids alone, the
same on every executor and in every process.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

EXCLUDE = re.compile(r"none|purchased|last-([1-9][0-9]*)")


def parse_exclude(value: str) -> int | None:
    """``recommend.exclude`` → how many of the newest history items a user is
    not recommended: None for none, -1 for purchased (all of the stored
    history), N for last-N."""
    m = EXCLUDE.fullmatch(value or "")
    if not m:
        raise ValueError(f"recommend.exclude={value!r}: use none, purchased or last-N (e.g. last-5)")
    if value == "none":
        return None
    return -1 if value == "purchased" else int(m.group(1))


def excluded(history_ids: Sequence[str], rule: int | None) -> frozenset[str]:
    """Item ids ``rule`` (see :func:`parse_exclude`) keeps from a user with ``history_ids`` (oldest first)."""
    if rule is None or not history_ids:
        return frozenset()
    return frozenset(history_ids if rule < 0 else history_ids[-rule:])


@dataclass(frozen=True)
class Catalog:
    """What may be recommended: distinct buckets (sorted) and, per bucket, its item ids (sorted)."""

    buckets: np.ndarray
    items: tuple[tuple[str, ...], ...]

    @classmethod
    def build(cls, item_ids: Sequence[str], item_idx: Sequence[int]) -> "Catalog":
        idx = np.asarray(item_idx, dtype=np.int64)
        ids = np.asarray(list(item_ids), dtype=object)
        if len(ids) != len(idx):
            raise ValueError(f"catalog: {len(ids)} item ids for {len(idx)} buckets")
        order = np.lexsort((ids.astype(str), idx)) if len(ids) else np.zeros(0, np.int64)
        idx, ids = idx[order], ids[order]
        buckets, starts = np.unique(idx, return_index=True)
        ends = list(starts[1:]) + [len(idx)]
        return cls(buckets, tuple(tuple(ids[s:e]) for s, e in zip(starts, ends)))

    def __len__(self) -> int:
        return sum(len(i) for i in self.items)

    def to_dict(self) -> dict:
        """Plain values (a Spark closure, torch.save) for :meth:`from_dict`."""
        return {"buckets": self.buckets.tolist(), "items": [list(i) for i in self.items]}

    @classmethod
    def from_dict(cls, d: dict) -> "Catalog":
        return cls(np.asarray(d["buckets"], dtype=np.int64), tuple(tuple(i) for i in d["items"]))


def pad_histories(histories: Sequence[Sequence[int]], length: int) -> np.ndarray:
    """(U, length) int64: each history's newest ``length`` items, left-padded with -1."""
    out = np.full((len(histories), max(length, 1)), -1, dtype=np.int64)
    if length <= 0:
        return out
    for r, h in enumerate(histories):
        h = list(h)[-length:]
        if h:
            out[r, length - len(h):] = h
    return out


def history_length(model: torch.nn.Module) -> int:
    """Items of history the model reads (0: none)."""
    return int(getattr(model, "history_length", 0) or 0)


def repeat_items(model: torch.nn.Module) -> int:
    """Items of the whole-history repeat lists the model reads (0: none; its
    ``score_all`` then takes no ``repeat``)."""
    import inspect

    try:
        takes = "repeat" in inspect.signature(model.score_all).parameters
    except (AttributeError, TypeError, ValueError):
        return 0
    return int(getattr(model, "repeat_items", 0) or 0) if takes else 0


@torch.no_grad()
def top_items(model: torch.nn.Module, catalog: Catalog, user_idx: Sequence[int],
              histories: Sequence[Sequence[int]] | None, k: int,
              exclude: Sequence[frozenset[str]] | None = None,
              block_pairs: int = 1 << 14,
              repeats: dict[str, np.ndarray] | None = None) -> list[list[tuple[str, float]]]:
    """For each user: up to ``k`` (item id, score), best first.

    ``histories``: each user's hashed item indices, oldest first (None: as
    users with no history); ``exclude``: item ids each user must not get;
    ``repeats``: the users' whole-history repeat lists as of the time scored
    (``features.repeats.state_arrays``: (U, K) each), passed to a model that
    reads them (:func:`repeat_items`) and ignored by any other.
    Users are scored in blocks of about ``block_pairs`` user × bucket scores."""
    n_users, n_buckets = len(user_idx), len(catalog.buckets)
    if n_users == 0 or n_buckets == 0:
        return [[] for _ in range(n_users)]
    model.eval()
    L = history_length(model)
    cat = torch.from_numpy(catalog.buckets)
    users = np.asarray(user_idx, dtype=np.int64)
    hist = pad_histories(histories, L) if (L and histories is not None) else None
    if repeats is not None and not repeat_items(model):
        repeats = None
    if repeats is not None and any(len(v) != n_users for v in repeats.values()):
        raise ValueError(f"repeats has {[len(v) for v in repeats.values()]} rows for {n_users} users: one per user")
    block = max(1, block_pairs // n_buckets)
    out: list[list[tuple[str, float]]] = []
    for s in range(0, n_users, block):
        e = min(s + block, n_users)
        kw = {"history_idx": torch.from_numpy(hist[s:e])} if hist is not None else {}
        if repeats is not None:
            kw["repeat"] = {c: torch.from_numpy(np.ascontiguousarray(v[s:e])) for c, v in repeats.items()}
        scores = model.score_all(torch.from_numpy(users[s:e]), cat, **kw).float()
        skip = list(exclude[s:e]) if exclude is not None else [frozenset()] * (e - s)
        # k + |excluded| buckets hold at least k allowed items (a bucket holds >= 1)
        depth = min(n_buckets, k + max(len(x) for x in skip))
        vals, pos = torch.topk(scores, depth, dim=1)
        for row_vals, row_pos, ban in zip(vals.tolist(), pos.tolist(), skip):
            picked: list[tuple[str, float]] = []
            for v, b in zip(row_vals, row_pos):
                for item in catalog.items[b]:
                    if item not in ban:
                        picked.append((item, v))
                if len(picked) >= k:
                    break
            out.append(picked[:k])
    return out
