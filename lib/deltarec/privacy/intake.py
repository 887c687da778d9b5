"""Where user ids enter the lake: the delta job's change-feed read.

One call, ``ingest(changes)``, does two things to a night's change rows:

- **forgotten users stay out**: a row of a user in ``forget_log`` whose
  ``event_time`` is at or before the request's cut-off (``opened_at``) is
  dropped (counted in the log): it is the source table's erase of that user
  (``privacy.erase_source``), or the owner's own later DELETE of it, or an old
  event arriving late. Without this a source-table DELETE of a forgotten
  user would come back as retraction examples or quarantine rows holding the
  id. Later events are a returning customer's new data and are kept.
- **pseudonyms**: with ``privacy.pseudonymize=true`` ``user_id`` becomes
  ``HMAC-SHA256(secret, user_id)`` before anything is validated, joined or
  written, so no derived table, model or log holds the raw id. A null id
  stays null (quarantined as before); validation's id rules then see the
  pseudonym, so a malformed raw id is no longer told apart.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from . import requests as rq
from .keys import KeyMap

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from ..config import Config
    from ..lake.engine import LakeEngine

log = logging.getLogger("deltarec.privacy")


def ingest(spark: "SparkSession", cfg: "Config", lake: "LakeEngine", changes: "DataFrame") -> "DataFrame":
    from pyspark.sql import functions as F
    from pyspark.sql.types import StringType

    cutoffs = [(r["user_hash"], r["opened_at"]) for r in rq.log_rows(cfg, lake)
               if r["user_hash"] and r["status"] != rq.REFUSED]
    if not cfg.privacy.pseudonymize and not cutoffs:
        return changes
    to_key, to_hash = KeyMap(cfg, lake).spark_functions()
    key_udf = F.udf(to_key, StringType(), useArrow=True)
    hash_udf = F.udf(to_hash, StringType(), useArrow=True)
    out = changes.withColumn("user_id", key_udf(F.col("user_id"))) if cfg.privacy.pseudonymize else changes
    if cutoffs:
        latest: dict[str, object] = {}
        for h, at in cutoffs:  # a user forgotten twice: the later cut-off
            latest[h] = max(latest.get(h, at), at)
        gone = spark.createDataFrame(list(latest.items()), "_forget_hash string, _forget_cutoff timestamp")
        out = out.withColumn("_forget_hash", hash_udf(F.col("user_id"))).join(
            F.broadcast(gone), "_forget_hash", "left")
        erased = F.col("_forget_cutoff").isNotNull() & (
            F.col("event_time").isNull() | (F.col("event_time") <= F.col("_forget_cutoff")))
        out = out.withColumn("_forgotten", erased)
        dropped = out.where("_forgotten").count()  # one small job: nothing leaves silently
        if dropped:
            log.info("privacy: %d change rows of forgotten users (at or before their request) left out", dropped)
        out = out.where(~F.col("_forgotten")).drop("_forget_hash", "_forget_cutoff", "_forgotten")
    return out
