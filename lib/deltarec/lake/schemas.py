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
        pa.field("detail", pa.string()),  # what exactly was wrong (e.g. the value that did not cast)
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
        pa.field("kind", pa.string()),  # event | negative | retraction
        pa.field("history_ids", pa.list_(pa.string())),  # the user's items before this event, oldest first
        pa.field("history_idx", pa.list_(pa.int64())),
        pa.field("holdout", pa.bool_()),  # from the source event id: tonight's evaluation slice
        # The customer's whole-history repeat lists as of the event's day (features/repeats.py; empty with
        # features.repeat_items=0): items, decayed counts rescaled to that day, counts, days since the last.
        pa.field("repeat_ids", pa.list_(pa.string())),
        pa.field("repeat_idx", pa.list_(pa.int64())),
        pa.field("repeat_weights", pa.list_(pa.float32())),
        pa.field("repeat_counts", pa.list_(pa.float32())),
        pa.field("repeat_ages", pa.list_(pa.float32())),
    ]
)

# Every change the delta job consumed, one row per (event id, source version):
# for dedup against earlier runs and to find what a delete, a correction or a
# cancellation retracts. The newest row of an event id is its current state.
EVENT_INDEX = pa.schema(
    [
        pa.field("event_id", pa.string()),
        pa.field("user_id", pa.string()),
        pa.field("item_id", pa.string()),
        pa.field("event_type", pa.string()),
        pa.field("event_time", TS),
        pa.field("rating", pa.float64()),
        pa.field("trained", pa.bool_()),  # it produced an event example that is still in force
        pa.field("source_version", pa.int64()),
    ]
)

# Per user, kept by MERGE from each night's accepted events.
USER_STATE = pa.schema(
    [
        pa.field("user_id", pa.string()),
        pa.field("user_idx", pa.int64()),
        pa.field("history_ids", pa.list_(pa.string())),  # last features.history_length items, oldest first
        pa.field("history_idx", pa.list_(pa.int64())),
        pa.field("events", pa.int64()),
        pa.field("retractions", pa.int64()),
        pa.field("first_seen", TS),
        pa.field("last_seen", TS),
        pa.field("source_version", pa.int64()),  # last source version that changed this row
        # Whole-history repeat lists (features/repeats.py; null: features.repeat_items=0 or written before),
        # one entry per distinct item bought, ranked by decayed count; decayed counts as of repeat_as_of.
        pa.field("repeat_ids", pa.list_(pa.string())),
        pa.field("repeat_idx", pa.list_(pa.int64())),
        pa.field("repeat_counts", pa.list_(pa.float64())),  # purchases minus retractions
        pa.field("repeat_decayed", pa.list_(pa.float64())),  # sum of 0.5 ** (age / repeat_half_life_days)
        pa.field("repeat_last", pa.list_(TS)),  # last purchase
        pa.field("repeat_as_of", TS),
    ]
)

# Per item, kept by MERGE from each night's accepted events and the items table.
ITEM_STATS = pa.schema(
    [
        pa.field("item_id", pa.string()),
        pa.field("item_idx", pa.int64()),
        pa.field("popularity", pa.int64()),  # events minus retractions
        pa.field("first_seen", TS),
        pa.field("last_seen", TS),
        pa.field("text_hash", pa.string()),
        pa.field("text_changed", pa.bool_()),  # the text differs from the one seen before
        pa.field("source_version", pa.int64()),
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
        # Registry: who/why/when of the last status change (the gate's verdict
        # for a candidate; `deltarec registry promote|rollback` records --by/--reason).
        pa.field("status_reason", pa.string()),
        pa.field("status_by", pa.string()),
        pa.field("status_at", TS),
    ]
)

# Per night and model role: next-day (prequential, before training) and gate
# (tonight's holdout, after training) metrics. Rewritten per run_id.
PREQUENTIAL_METRICS = pa.schema(
    [
        pa.field("run_id", pa.string()),
        pa.field("model", pa.string()),
        pa.field("source_first", pa.int64()),
        pa.field("source_last", pa.int64()),
        pa.field("phase", pa.string()),  # prequential | gate
        pa.field("role", pa.string()),  # champion | candidate | stale | popularity
        pa.field("model_run_id", pa.string()),  # the run whose checkpoint was scored (null: popularity)
        pa.field("metric", pa.string()),  # e.g. ndcg@10, hr@10, auc
        pa.field("value", pa.float64()),
        pa.field("n", pa.int64()),  # users (ranking metrics) or examples (pointwise) scored
        pa.field("computed_at", TS),
    ]
)

# Append-only audit log of champion changes (the runs table holds the state).
REGISTRY_EVENTS = pa.schema(
    [
        pa.field("event_id", pa.string()),
        pa.field("model", pa.string()),
        pa.field("action", pa.string()),  # first | gate_promote | gate_reject | promote | rollback
        pa.field("run_id", pa.string()),  # the run the action is about (new champion / rejected candidate)
        pa.field("previous_champion", pa.string()),
        pa.field("by", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("at", TS),
    ]
)
