"""Arrow schemas of the lake's tables: the contract between jobs, engines and workers."""
from __future__ import annotations

import pyarrow as pa

TS = pa.timestamp("us", tz="UTC")

# deltarec's behaviour schema: what every source is mapped onto.
BEHAVIOR_EVENTS = pa.schema(
    [
        pa.field("event_id", pa.string()),
        pa.field("user_id", pa.string()),
        pa.field("item_id", pa.string()),
        pa.field("event_time", TS),
        pa.field("event_type", pa.string()),
        pa.field("order_id", pa.string()),
        pa.field("quantity", pa.int64()),
        pa.field("price", pa.float64()),
        pa.field("rating", pa.float64()),
    ]
)

ITEMS = pa.schema(
    [
        pa.field("item_id", pa.string()),
        pa.field("text", pa.string()),
        pa.field("first_seen", TS),
    ]
)

# A rejected change row, the reason, and the run that rejected it.
QUARANTINE_EVENTS = pa.schema(
    [
        pa.field("run_id", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("source_version", pa.int64()),
        pa.field("change_type", pa.string()),
        *BEHAVIOR_EVENTS,
    ]
)

TRAINING_EXAMPLES = pa.schema(
    [
        pa.field("run_id", pa.string()),
        pa.field("event_id", pa.string()),
        pa.field("user_id", pa.string()),
        pa.field("item_id", pa.string()),
        pa.field("user_idx", pa.int64()),
        pa.field("item_idx", pa.int64()),
        pa.field("label", pa.float32()),
        pa.field("weight", pa.float32()),
        pa.field("event_time", TS),
    ]
)

# The run ledger: one row per successful run. Its commit is the only thing
# that advances a model's watermark.
RUNS = pa.schema(
    [
        pa.field("run_id", pa.string()),
        pa.field("model", pa.string()),
        pa.field("status", pa.string()),
        pa.field("strategy", pa.string()),
        pa.field("source_table", pa.string()),
        pa.field("source_first", pa.int64()),
        pa.field("source_last", pa.int64()),
        pa.field("parent_run_id", pa.string()),
        pa.field("checkpoint_path", pa.string()),
        pa.field("checkpoint_sha256", pa.string()),
        pa.field("checkpoint_files", pa.string()),  # JSON {file: sha256}
        pa.field("config", pa.string()),  # JSON of the resolved config
        pa.field("code_version", pa.string()),
        pa.field("metrics", pa.string()),  # JSON
        pa.field("started_at", TS),
        pa.field("committed_at", TS),
    ]
)
