"""Stage 1 of a night: which strategy trains, from which parent.

Reads the run ledger (the champion, every committed run) and the parent's
checkpoint files (their checksums: a corrupt one is never warm-started from).
Writes nothing. ``deltarec plan`` calls the same :func:`choose_strategy`, so
what it announces is what the night does.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..lake.ledger import Ledger, RunRecord

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger("deltarec.nightly")


@dataclass(frozen=True)
class StrategyChoice:
    """What a night trains and against what.

    ``parent``: the usable champion (the lineage parent; the model prequential
    and the gate compare with). ``serving``: the registry's champion now, what
    the ledger commit expects to replace. ``rehashed``: bucket counts that
    changed since the parent (``{key: (parent's, now)}``)."""

    strategy: str  # full | incremental | finetune
    parent: RunRecord | None
    serving: RunRecord | None
    rehashed: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    @property
    def warm(self) -> RunRecord | None:
        """The checkpoint training starts from (None: from scratch)."""
        return self.parent if self.strategy != "full" else None

    @property
    def rehash_note(self) -> str:
        return ", ".join(f"{'model' if k == 'embedding' else 'features'}.{k} {a} -> {b}"
                         for k, (a, b) in self.rehashed.items())

    @property
    def comparable(self) -> bool:
        """The parent can score tonight's ids (there is one, hashed as tonight's)."""
        return self.parent is not None and not self.rehashed

    def describe(self) -> str:
        if self.warm is not None:
            return f"{self.strategy} from {self.warm.run_id}"
        if self.parent is None:
            return "full: first run of this lineage"
        why = f"bucket counts changed: {self.rehash_note}" if self.rehashed else "train.strategy=full"
        return f"full ({why}); parent {self.parent.run_id}"


def usable_parent(ledger: Ledger, model: str) -> RunRecord | None:
    """The champion, when its checkpoint verifies. A corrupt one is refused,
    loudly, and the champion before it is used instead (then any other run,
    newest first)."""
    from ..train.checkpoint import CheckpointError, verify_checkpoint

    runs = ledger.runs(model)
    champ = ledger.champion(model)
    order = ([champ] if champ else []) + sorted(
        (r for r in runs if champ is None or r.run_id != champ.run_id),
        key=lambda r: (r.status == "retired", r.source_last), reverse=True)
    for run in order:
        try:
            verify_checkpoint(run.checkpoint_path, run.checkpoint_sha256)
            return run
        except CheckpointError as e:
            log.error("refusing checkpoint of run %s (%s) as warm start: %s; trying the one before",
                      run.run_id, run.status, e)
    return None


def rehashed(cfg: "Config", parent: RunRecord | None) -> dict[str, tuple[Any, Any]]:
    """How ``parent``'s ids map to rows differently from ``cfg``'s: bucket
    counts (bucket = hash mod count, so a changed count sends every id to
    another hashed row, and a dynamic vocabulary's scoring lookup holds the old
    indices) or the embedding kind (hashed rows and vocabulary rows are
    different tables). Either way the parent cannot be warm-started from."""
    if parent is None:
        return {}
    before = (parent.config or {}).get("features", {})
    out = {k: (before[k], getattr(cfg.features, k)) for k in ("user_buckets", "item_buckets")
           if k in before and before[k] != getattr(cfg.features, k)}
    embedding = (parent.config or {}).get("model", {}).get("embedding", "hashed")
    if embedding != cfg.model.embedding:
        out["embedding"] = (embedding, cfg.model.embedding)
    return out


def choose_strategy(cfg: "Config", ledger: Ledger) -> StrategyChoice:
    """``train.strategy`` resolved against the ledger: ``auto`` is full on the
    first run and incremental after; incremental / finetune without a usable
    parent train from scratch (with a warning); after a bucket-count change
    ``auto`` trains from scratch and an explicit incremental / finetune is
    refused (ValueError naming the change and what to do)."""
    model = cfg.model.name
    parent = usable_parent(ledger, model)
    serving = ledger.champion(model)
    asked = cfg.train.strategy
    strategy = asked
    if asked == "auto" or (asked in ("incremental", "finetune") and parent is None):
        if asked != "auto":
            log.warning("train.strategy=%s needs a parent checkpoint and there is none: training from scratch",
                        asked)
        strategy = "incremental" if parent else "full"
    from ..privacy import full_retrain_due  # privacy.unlearning=retrain after a forget

    unlearn = full_retrain_due(cfg, ledger.lake, ledger, model) if parent is not None else None
    if unlearn and strategy != "full":
        log.warning("%s: this night trains from scratch (full)", unlearn)
        strategy = "full"
    moved = rehashed(cfg, parent) if strategy != "full" else {}
    choice = StrategyChoice(strategy, parent, serving, moved)
    if moved:
        if asked != "auto":
            raise ValueError(
                f"train.strategy={asked}: the parent checkpoint {parent.run_id} hashed ids into another "
                f"number of rows ({choice.rehash_note}), so its rows belong to other ids now. Run once with "
                "train.strategy=full (or auto), or go back to the parent's bucket counts")
        log.warning("parent %s hashed ids into another number of rows (%s): its rows belong to other ids now, "
                    "so this run trains from scratch (full)", parent.run_id, choice.rehash_note)
        choice = StrategyChoice("full", parent, serving, moved)
    return choice
