"""Dynamic vocabularies: string ids → embedding rows that grow with the data.

Rows ``0 .. oov_buckets-1`` are shared out-of-vocabulary rows: an id not (yet)
admitted uses row ``hashed_idx % oov_buckets``. An id is admitted once it has
been seen ``min_count`` times (counted over nights); it then gets a row of its
own, reused from an evicted id (lowest first) or appended at the end. An id
not seen for ``ttl_nights`` nights is evicted and its row freed.

Rows only ever get added: rows of ids that stay keep their index, so a model
grown to the new size keeps their weights bit-identical. All mapping is
vectorised with ``pyarrow.compute.index_in``; there is no per-id Python.

The update is decided once per run (rank 0), from the parent's vocabulary and
tonight's ids, and sent to every rank, so every rank uses the same mapping.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

VOCAB_FILE = "vocab.parquet"


def _plain(a) -> pa.Array:
    if isinstance(a, pa.ChunkedArray):
        a = a.combine_chunks() if a.num_chunks else pa.array([], a.type)
    if pa.types.is_string_view(a.type) or pa.types.is_large_string(a.type):
        a = a.cast(pa.string())
    return a


@dataclass
class Vocabulary:
    name: str  # "user" or "item"
    min_count: int = 1
    ttl_nights: int = 0  # 0: never evict
    oov_buckets: int = 16
    ids: pa.Array = field(default_factory=lambda: pa.array([], pa.string()))
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # -1: seen, not admitted
    hashed: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # the id's hashed bucket
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    last_seen: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # night number
    night: int = 0
    num_rows: int = 0  # embedding table size (oov rows included)
    free: list[int] = field(default_factory=list)  # rows of evicted ids, reused first
    fresh: list[int] = field(default_factory=list)  # rows (re)assigned by the last update: to initialise
    evicted: int = 0  # ids the last update evicted

    def __post_init__(self):
        if self.oov_buckets < 1:
            raise ValueError(f"model.vocab.oov_buckets={self.oov_buckets}: need at least one shared row")
        self.num_rows = max(self.num_rows, self.oov_buckets)

    def __len__(self) -> int:
        return int((self.rows >= 0).sum())

    # ---------------------------------------------------------------- update
    def update(self, ids, hashed) -> "Vocabulary":
        """A new vocabulary after one night of ``ids`` (with their hashed
        buckets): counts and last-seen advance, stale ids are evicted, ids that
        reached ``min_count`` are admitted. ``self`` is left unchanged."""
        ids, hashed = _plain(ids), _plain(hashed)
        night = self.night + 1
        vc = pc.value_counts(ids.drop_null()) if len(ids) else pa.StructArray.from_arrays(
            [pa.array([], pa.string()), pa.array([], pa.int64())], ["values", "counts"])
        values, counts = vc.field("values"), np.asarray(vc.field("counts"), dtype=np.int64)
        # one hashed bucket per distinct id (the first occurrence's)
        first = pc.index_in(values, value_set=ids).to_numpy(zero_copy_only=False)
        h_new = np.asarray(hashed.take(pa.array(first)).to_numpy(zero_copy_only=False), dtype=np.int64) \
            if len(values) else np.zeros(0, np.int64)
        pos = pc.index_in(values, value_set=self.ids)
        known = pc.is_valid(pos).to_numpy(zero_copy_only=False)
        rows, cnt, last, hsh = self.rows.copy(), self.counts.copy(), self.last_seen.copy(), self.hashed.copy()
        at = np.asarray(pos.filter(pa.array(known)).to_numpy(zero_copy_only=False), dtype=np.int64)
        cnt[at] += counts[known]
        last[at] = night
        new = ~known
        all_ids = pa.concat_arrays([self.ids, values.filter(pa.array(new)).cast(pa.string())])
        rows = np.concatenate([rows, np.full(int(new.sum()), -1, np.int64)])
        cnt = np.concatenate([cnt, counts[new]])
        last = np.concatenate([last, np.full(int(new.sum()), night, np.int64)])
        hsh = np.concatenate([hsh, h_new[new]])
        free = list(self.free)
        evicted = 0
        # evict: not seen for ttl nights
        if self.ttl_nights > 0:
            keep = last > night - self.ttl_nights
            evicted = int((rows[~keep] >= 0).sum())
            free += [int(r) for r in rows[~keep] if r >= 0]
            all_ids, rows, cnt, last, hsh = (all_ids.filter(pa.array(keep)), rows[keep], cnt[keep], last[keep],
                                             hsh[keep])
        # admit, in id order so the assignment does not depend on arrival order
        cand = np.flatnonzero((rows < 0) & (cnt >= self.min_count))
        if len(cand):
            order = np.asarray(pc.sort_indices(all_ids.take(pa.array(cand))).to_numpy(), dtype=np.int64)
            cand = cand[order]
        free.sort()
        reuse, free = free[:len(cand)], free[len(cand):]
        appended = list(range(self.num_rows, self.num_rows + len(cand) - len(reuse)))
        assigned = np.array(reuse + appended, dtype=np.int64)
        rows[cand] = assigned
        # stored in id order: the same ids give the same file whatever order they arrived in
        order = np.asarray(pc.sort_indices(all_ids).to_numpy(), dtype=np.int64)
        all_ids, rows, hsh, cnt, last = (all_ids.take(pa.array(order)), rows[order], hsh[order], cnt[order],
                                         last[order])
        return Vocabulary(self.name, self.min_count, self.ttl_nights, self.oov_buckets, all_ids, rows, hsh,
                          cnt, last, night, self.num_rows + len(appended), free, sorted(assigned.tolist()), evicted)

    # ---------------------------------------------------------------- mapping
    def rows_for(self, ids, hashed) -> np.ndarray:
        """Rows of ``ids``: its own row when admitted, else the shared OOV row
        ``hashed % oov_buckets``."""
        ids, hashed = _plain(ids), _plain(hashed)
        oov = np.asarray(hashed.to_numpy(zero_copy_only=False), dtype=np.int64) % self.oov_buckets
        if not len(ids) or not len(self.ids):
            return oov
        pos = pc.index_in(ids, value_set=self.ids)
        valid = pc.is_valid(pos).to_numpy(zero_copy_only=False)
        p = np.asarray(pc.fill_null(pos, 0).to_numpy(zero_copy_only=False), dtype=np.int64)
        got = self.rows[p]
        use = valid & (got >= 0)
        return np.where(use, got, oov)

    def lookup_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(hashed indices sorted, their rows) of the admitted ids: the model's
        lookup for callers that only have hashed indices (scoring). Exact
        unless two admitted ids share a hashed index (see :meth:`shared`):
        then the one with the higher row wins."""
        adm = self.rows >= 0
        h, r = self.hashed[adm], self.rows[adm]
        order = np.lexsort((r, h))
        h, r = h[order], r[order]
        last = np.r_[h[1:] != h[:-1], True] if len(h) else np.zeros(0, bool)
        return np.ascontiguousarray(h[last]), np.ascontiguousarray(r[last])

    def shared(self) -> int:
        """Admitted ids whose hashed index another admitted id also has: the
        ones a scorer with hashed indices only would confuse."""
        h = self.hashed[self.rows >= 0]
        _, counts = np.unique(h, return_counts=True)
        return int(counts[counts > 1].sum())

    def stats(self) -> dict[str, int]:
        """What the run metrics report of this vocabulary."""
        return {"ids": len(self), "rows": self.num_rows, "new_rows": len(self.fresh), "evicted": self.evicted,
                "free_rows": len(self.free), "shared_hash": self.shared()}

    # ---------------------------------------------------------------- io
    def to_table(self) -> pa.Table:
        meta = {"name": self.name, "min_count": self.min_count, "ttl_nights": self.ttl_nights,
                "oov_buckets": self.oov_buckets, "night": self.night, "num_rows": self.num_rows,
                "free": self.free, "fresh": self.fresh, "evicted": self.evicted}
        t = pa.table({"id": self.ids.cast(pa.string()), "row": self.rows, "hashed": self.hashed,
                      "count": self.counts, "last_seen": self.last_seen})
        return t.replace_schema_metadata({"deltarec.vocab": json.dumps(meta)})

    @classmethod
    def from_table(cls, t: pa.Table) -> "Vocabulary":
        meta = json.loads(t.schema.metadata[b"deltarec.vocab"])
        col = lambda n: np.asarray(t[n].to_numpy(), dtype=np.int64)  # noqa: E731
        return cls(meta["name"], meta["min_count"], meta["ttl_nights"], meta["oov_buckets"],
                   _plain(t["id"]), col("row"), col("hashed"), col("count"), col("last_seen"), meta["night"],
                   meta["num_rows"], list(meta["free"]), list(meta["fresh"]), meta.get("evicted", 0))

    def with_policy(self, min_count: int, ttl_nights: int) -> "Vocabulary":
        """The same state under tonight's admission / eviction settings."""
        v = Vocabulary.from_table(self.to_table())
        v.min_count, v.ttl_nights = min_count, ttl_nights
        return v


def vocabs_to_bytes(vocabs: dict[str, Vocabulary]) -> bytes:
    """All vocabularies of a model in one parquet file (a ``table`` column says whose)."""
    parts = []
    metas = {}
    for name, v in sorted(vocabs.items()):
        t = v.to_table()
        metas[name] = json.loads(t.schema.metadata[b"deltarec.vocab"])
        parts.append(t.replace_schema_metadata(None).append_column("table", pa.array([name] * t.num_rows,
                                                                                        pa.string())))
    t = pa.concat_tables(parts).replace_schema_metadata({"deltarec.vocabs": json.dumps(metas)})
    buf = io.BytesIO()
    pq.write_table(t, buf)
    return buf.getvalue()


def vocabs_from_bytes(data: bytes) -> dict[str, Vocabulary]:
    t = pq.read_table(io.BytesIO(data))
    metas = json.loads(t.schema.metadata[b"deltarec.vocabs"])
    out = {}
    for name, meta in metas.items():
        part = t.filter(pc.equal(t["table"], name)).drop_columns(["table"])
        out[name] = Vocabulary.from_table(part.replace_schema_metadata({"deltarec.vocab": json.dumps(meta)}))
    return out


def hash_collisions(ids, hashed) -> dict[str, float]:
    """Of the distinct ``ids`` (with their hashed indices): how many share their
    index with another distinct id, and that share: what hashed embeddings
    confuse (reported per night in the run metrics)."""
    ids, hashed = _plain(ids), _plain(hashed)
    t = pa.table({"id": ids, "h": hashed}).group_by(["id", "h"]).aggregate([])
    per_h = t.group_by("h").aggregate([("id", "count")])
    counts = np.asarray(per_h["id_count"].to_numpy(), dtype=np.int64)
    shared = int(counts[counts > 1].sum())
    return {"ids": t.num_rows, "shared": shared, "rate": round(shared / t.num_rows, 5) if t.num_rows else 0.0}
