"""Frozen item-text embeddings, computed with Spark and kept in the lake.

Table ``model.text.table`` holds one row per (item_id, text_hash,
encoder_version) with the mean-pooled encoder output. Each night only items
whose (text, encoder) pair has no row yet are encoded — in Arrow batches on
the executors (``mapInArrow``), the encoder loaded once per Python worker —
and MERGEd in (insert only: a rerun adds nothing). Training then reads a
snapshot of the current vectors by hashed item index.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import TYPE_CHECKING, Any, Iterator

import pyarrow as pa

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from ..config import Config

TEXT_EMBEDDINGS = pa.schema([
    pa.field("item_id", pa.string()),
    pa.field("text_hash", pa.string()),
    pa.field("encoder_version", pa.string()),
    pa.field("embedding", pa.list_(pa.float32())),
])

_CACHE: dict[str, Any] = {}  # per Python worker: encoder name → (tokenizer, encoder)


def encoder_version(cfg: "Config") -> str:
    """What makes two embeddings comparable: the encoder (its config and
    weights' size and mtime-free identity), the pooling and the token limit."""
    from ..models.text import resolve_encoder

    text = cfg.model.text
    path = resolve_encoder(text.model)
    ident = path
    conf = os.path.join(path, "config.json")
    if os.path.isfile(conf):  # a local directory: identify it by its config and weight file sizes
        sizes = sorted((f, os.path.getsize(os.path.join(path, f))) for f in os.listdir(path)
                       if f.endswith((".safetensors", ".bin")))
        ident = hashlib.sha256((open(conf).read() + json.dumps(sizes)).encode()).hexdigest()[:16]
    return f"{os.path.basename(path.rstrip('/')) or path}:{ident}:mean:{text.max_length}"


def _snapshot_dir(cfg: "Config") -> str:
    # plain files next to the tables (local lake roots; the checkpoint keeps a copy in its buffers)
    root = cfg.lake.root[len("file://"):] if cfg.lake.root.startswith("file://") else cfg.lake.root
    return os.path.join(os.path.abspath(root), f"{cfg.model.text.table}_snapshot")


def text_params(cfg: "Config") -> dict[str, Any]:
    """The text tower's constructor arguments (model_params["text"])."""
    from transformers import AutoConfig

    from ..models.text import resolve_encoder

    text = cfg.model.text
    path = resolve_encoder(text.model)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dim = AutoConfig.from_pretrained(path).hidden_size
    snap = _snapshot_dir(cfg)
    tag = hashlib.sha256(encoder_version(cfg).encode()).hexdigest()[:12]
    return {"mode": text.mode, "encoder": text.model, "dim": dim, "top_k": text.top_k, "lora_rank": text.lora_rank,
            "lora_alpha": text.lora_alpha, "max_length": text.max_length,
            "embeddings_path": f"{snap}/embeddings-{tag}.parquet", "texts_path": f"{snap}/texts.parquet"}


def _encode_partition(encoder: str, version: str, max_length: int, batch_size: int):
    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        import torch

        from ..models.text import encode_texts, load_encoder

        torch.set_num_threads(1)
        if encoder not in _CACHE:
            _CACHE[encoder] = load_encoder(encoder)
        tok, enc = _CACHE[encoder]
        for b in batches:
            if b.num_rows == 0:
                continue
            texts = [t or "" for t in b.column("text").to_pylist()]
            vecs = encode_texts(tok, enc, texts, max_length, batch_size)
            emb = pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1), pa.float32()), vecs.shape[1])
            yield pa.RecordBatch.from_arrays(
                [b.column("item_id"), b.column("text_hash"), pa.array([version] * b.num_rows, pa.string()),
                 emb.cast(pa.list_(pa.float32()))], schema=TEXT_EMBEDDINGS)
    return run


def changed_items(spark: "SparkSession", cfg: "Config", lake, items: "DataFrame") -> "DataFrame":
    """(item_id, text, text_hash) of items whose text has no embedding for this encoder version yet."""
    from pyspark.sql import functions as F

    version = encoder_version(cfg)
    cur = items.select("item_id", F.coalesce(F.col("text"), F.lit("")).alias("text")).dropDuplicates(["item_id"]) \
        .withColumn("text_hash", F.sha2(F.col("text"), 256))
    table = cfg.model.text.table
    if not lake.exists(table):
        return cur
    have = lake.read(table).where(F.col("encoder_version") == version).select("item_id", "text_hash")
    return cur.join(have, ["item_id", "text_hash"], "left_anti")


def ensure_text_embeddings(spark: "SparkSession", cfg: "Config", lake, items: "DataFrame") -> dict[str, int]:
    """Encode the items whose text changed (frozen mode), MERGE them into the
    lake table, and write the snapshots training reads: tonight's texts by
    hashed item index (all modes) and the current embeddings (frozen)."""
    from pyspark.sql import functions as F

    from ..features.examples import bucket

    text = cfg.model.text
    version = encoder_version(cfg)
    params = text_params(cfg)
    if "text" not in items.columns:
        items = items.withColumn("text", F.lit(None).cast("string"))
    cur = items.select("item_id", F.coalesce(F.col("text"), F.lit("")).alias("text")).dropDuplicates(["item_id"])
    cur = cur.withColumn("item_idx", bucket(F.col("item_id"), cfg.features.item_buckets))
    import pyarrow.parquet as pq

    os.makedirs(os.path.dirname(params["texts_path"]), exist_ok=True)
    # items sharing a bucket: the smallest item id's text, so the choice is stable
    texts = cur.groupBy("item_idx").agg(F.min_by("text", "item_id").alias("text")).orderBy("item_idx").toArrow()
    pq.write_table(texts, params["texts_path"])
    stats = {"items": texts.num_rows, "encoded": 0}
    if text.mode != "frozen":
        return stats
    todo = changed_items(spark, cfg, lake, items)
    new = todo.select("item_id", "text", "text_hash").mapInArrow(
        _encode_partition(text.model, version, text.max_length, text.batch_size),
        "item_id string, text_hash string, encoder_version string, embedding array<float>")
    new_arrow = new.toArrow()
    stats["encoded"] = new_arrow.num_rows
    lake.create(text.table, TEXT_EMBEDDINGS)
    if new_arrow.num_rows:
        lake.merge(text.table, new_arrow.cast(TEXT_EMBEDDINGS), ["item_id", "text_hash", "encoder_version"],
                   update=False)
    cur_hash = cur.withColumn("text_hash", F.sha2(F.col("text"), 256))
    emb = (lake.read(text.table).where(F.col("encoder_version") == version)
           .join(cur_hash, ["item_id", "text_hash"]).groupBy("item_idx")
           .agg(F.min_by("embedding", "item_id").alias("embedding")).orderBy("item_idx").toArrow())
    pq.write_table(emb, params["embeddings_path"])
    return stats
