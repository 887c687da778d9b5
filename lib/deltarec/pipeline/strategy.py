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
    reason: str = ""  # why a night that would warm-start trains from scratch (or could not)

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
            return f"{self.strategy} from {self.warm.run_id}" + (f" ({self.reason})" if self.reason else "")
        if self.parent is None:
            return "full: first run of this lineage"
        why = f"bucket counts changed: {self.rehash_note}" if self.rehashed else self.reason or "train.strategy=full"
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
    reason = ""
    if unlearn and strategy == "full" and asked != "full":
        reason = unlearn
    if parent is not None and strategy != "full":
        strategy, reason = from_scratch_rules(cfg, ledger, parent, asked, strategy)
    moved = rehashed(cfg, parent) if strategy != "full" else {}
    choice = StrategyChoice(strategy, parent, serving, moved, reason)
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


def rejected_streak(runs: list[RunRecord]) -> list[RunRecord]:
    """The newest runs that the gate rejected, in a row, newest first. A
    decision of insufficient evidence is no rejection and does not break the
    streak; a promoted run or a full retrain (the rule's own answer) ends it."""
    streak = []
    for r in sorted(runs, key=lambda r: r.source_last, reverse=True):
        decision = (r.metrics.get("gate") or {}).get("decision") or {}
        if decision.get("verdict") == "insufficient_evidence":
            continue
        if r.status != "candidate" or decision.get("passed") is not False:
            break
        streak.append(r)
        if r.strategy == "full":
            break
    return streak


def from_scratch_rules(cfg: "Config", ledger: Ledger, parent: RunRecord, asked: str,
                       strategy: str) -> tuple[str, str]:
    """(strategy, reason) after the rules that send a warm-starting night
    back to scratch: the parent's weights learned from an excluded run
    (`deltarec registry exclude`), or ``gate.max_consecutive_rejections``
    rejected candidates in a row. With an explicit train.strategy the first
    is refused (ValueError) and the second is logged as not applied."""
    from ..registry.exclusions import excluded_runs, trained_on_excluded

    runs = ledger.runs(cfg.model.name)
    tainted = trained_on_excluded(parent, runs, excluded_runs(ledger.lake, cfg))
    if tainted:
        why = (f"the parent {parent.run_id} learned from excluded run(s) {', '.join(tainted)} "
               "(`deltarec registry exclude`)")
        if asked != "auto":
            raise ValueError(f"train.strategy={asked}: {why}, so warm-starting from it keeps what was excluded. "
                             "Run with train.strategy=full (or auto), or `deltarec registry include` the run(s)")
        log.warning("%s: this night trains from scratch (full)", why)
        return "full", why
    limit = cfg.gate.max_consecutive_rejections
    streak = rejected_streak(runs) if limit else []
    if limit and len(streak) >= limit:
        why = (f"{len(streak)} rejected candidates in a row ({', '.join(r.run_id for r in reversed(streak))}), "
               f"gate.max_consecutive_rejections={limit}")
        if asked != "auto":
            why += (f": NOT retraining from scratch, because train.strategy={asked} was asked explicitly "
                    "(auto or full does)")
            log.warning("%s", why)
            return strategy, why
        log.warning("%s: this night trains from scratch (full)", why)
        return "full", why
    return strategy, ""
