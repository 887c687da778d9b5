"""The Spark-task side of a recommendations refresh (pipeline/recommend.py):
load the champion once per Python worker (sha256 verified), score a batch of
users with :func:`~deltarec.serving.scorer.top_items`, and either yield the
rows or write them as one Parquet part of the table for the driver to commit.
Everything a task needs arrives in a plain ``spec`` dict (picklable)."""
from __future__ import annotations

import time
import uuid
from typing import Any, Iterator

import pyarrow as pa

from .table import RECOMMENDATIONS

_MODELS: dict[tuple[str, str], Any] = {}  # per Python worker: (checkpoint path, sha256) → model


def _champion_model(path: str, sha256: str):
    """The champion, loaded (and verified) once per Python worker."""
    key = (path, sha256)
    if key not in _MODELS:
        from ..train.checkpoint import load_model

        _MODELS.clear()
        _MODELS[key] = load_model(path, sha256)
    return _MODELS[key]


def score_batch(model, catalog, batch: pa.RecordBatch | pa.Table, spec: dict[str, Any]) -> pa.Table:
    """RECOMMENDATIONS rows of the users in ``batch`` (see ``pipeline.recommend.users_frame``);
    a model that reads the repeat lists gets them as of ``spec["repeat_as_of"]``."""
    from .scorer import excluded, repeat_items, top_items

    ids = batch.column("user_id").to_pylist()
    hist_ids = batch.column("history_ids").to_pylist()
    hist_idx = batch.column("history_idx").to_pylist()
    uidx = batch.column("user_idx").to_pylist()
    scored = [i for i, u in enumerate(ids) if u is not None and hist_ids[i]]
    top = top_items(model, catalog, [uidx[i] for i in scored], [hist_idx[i] for i in scored], spec["k"],
                    [excluded(hist_ids[i], spec["exclude"]) for i in scored], spec["block_pairs"],
                    repeats=_repeats(model, batch, scored, spec) if repeat_items(model) else None)
    by_row = dict(zip(scored, top))
    cols: dict[str, list] = {n: [] for n in ("user_id", "rank", "item_id", "score", "source")}
    for i, u in enumerate(ids):
        picked, source = (by_row[i], "model") if i in by_row else (
            spec["popular"][:spec["max_k"] if u is None else spec["k"]], "popularity")
        for rank, (item, score) in enumerate(picked, 1):
            cols["user_id"].append(u)
            cols["rank"].append(rank)
            cols["item_id"].append(item)
            cols["score"].append(score)
            cols["source"].append(source)
    n = len(cols["rank"])
    cols["run_id"] = [spec["run_id"]] * n
    cols["generated_at"] = [spec["generated_at"]] * n
    return pa.Table.from_pydict(cols, schema=RECOMMENDATIONS)


def _repeats(model, batch: pa.RecordBatch | pa.Table, rows: list[int], spec: dict[str, Any]):
    """The repeat lists of ``batch``'s ``rows`` as of the refresh's time (empty
    lists when the batch has no repeat columns: a user_state that predates them)."""
    import numpy as np

    from ..features.repeats import state_arrays
    from .scorer import repeat_items

    if spec.get("repeat_as_of") is None:  # no item_stats rows: an empty catalogue, nothing is scored
        return None
    ref = np.full(len(rows), spec["repeat_as_of"], dtype=np.int64)
    return state_arrays(batch.take(pa.array(rows, pa.int64())), ref, repeat_items(model),
                        spec["repeat_half_life_days"])


def score_task(spec: dict[str, Any], mode: str):
    """The ``mapInArrow`` function: ``rows`` yields the scored rows (Spark
    writes them), ``parts`` writes one Parquet file into the table directory
    and yields its path, size and counts for the driver's commit."""

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        import os

        import pyarrow.parquet as pq
        import torch

        from .scorer import Catalog

        torch.set_num_threads(spec["threads"])
        model, catalog = None, Catalog.from_dict(spec["catalog"])
        writer, sink, name, rows, users = None, None, None, 0, 0
        load_s = score_s = 0.0
        try:
            for b in batches:
                if b.num_rows == 0:
                    continue
                t0 = time.perf_counter()
                if model is None:
                    model = _champion_model(spec["checkpoint"], spec["sha256"])
                    load_s = time.perf_counter() - t0
                    t0 = time.perf_counter()
                t = score_batch(model, catalog, b, spec)
                score_s += time.perf_counter() - t0
                users += b.num_rows
                if mode == "rows":
                    if t.num_rows:
                        yield from t.to_batches()
                    continue
                if writer is None:
                    name = f"part-{spec['refresh']}-{uuid.uuid4().hex[:12]}.parquet"
                    sink = _open_output(f"{spec['table_uri']}/{name}")
                    writer = pq.ParquetWriter(sink, RECOMMENDATIONS)
                writer.write_table(t)
                rows += t.num_rows
        finally:
            if writer is not None:
                writer.close()
                sink.close()
        if writer is not None:
            path = f"{spec['table_uri']}/{name}"
            size = os.path.getsize(path) if "://" not in path else _size(path)
            yield pa.RecordBatch.from_pydict({"path": [name], "size": [size], "rows": [rows], "users": [users],
                                              "modified": [int(time.time() * 1000)], "load_s": [load_s],
                                              "score_s": [score_s]})
    return run


def _open_output(path: str):
    import os

    if "://" not in path or path.startswith("file://"):
        path = path.removeprefix("file://")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return open(path, "wb")
    from pyarrow import fs as pafs

    fs, p = pafs.FileSystem.from_uri(path)
    return fs.open_output_stream(p)


def _size(path: str) -> int:
    from pyarrow import fs as pafs

    fs, p = pafs.FileSystem.from_uri(path)
    return fs.get_file_info(p).size
