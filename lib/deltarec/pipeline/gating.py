"""Stage 6 of a night: the champion/challenger gate, with new-user and
new-item slices.

Reads tonight's held-out examples (``holdout = true``), the candidate's and
the champion's checkpoints, and which users / items earlier committed runs
had (through the engine's ``lookup``). Writes nothing: the result reaches
``lake.metrics_table`` (phase ``gate``) only once the run commits
(``publish.store_run_metrics``). The decision rule and the metrics are ``evaluation/gate.py``.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable

from ..evaluation.gate import GateDecision
from ..lake.ledger import Ledger

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa
    from pyspark.sql import DataFrame

    from ..config import Config
    from ..lake.engine import LakeEngine
    from .strategy import StrategyChoice

log = logging.getLogger("deltarec.nightly")


def gate_candidate(cfg: "Config", lake: "LakeEngine", new_examples: "DataFrame", items: "DataFrame",
                   choice: "StrategyChoice", checkpoint: dict[str, Any], run_id: str, first: int,
                   last: int, catalog: "Callable[[], np.ndarray] | None" = None) -> dict[str, Any]:
    """``metrics["gate"]``: the decision (``{"passed", "reason", "checks"}``)
    and, when the models were scored, both models' metrics on tonight's
    held-out rows and the per-slice metrics. Promoted without scoring: a
    lineage's first run, ``gate.enabled=false``, and a bucket-count change
    (the champion cannot score ids hashed the new way). ``catalog``: gives
    the catalogue's item indices (shared with the prequential stage), else
    they come from ``items``."""
    if choice.parent is None:
        return {"decision": GateDecision(True, "first run of the lineage: champion by default").to_dict()}
    if choice.rehashed:
        return {"decision": GateDecision(True, f"bucket counts changed ({choice.rehash_note}): the champion cannot "
                                               "score ids hashed the new way; champion by default").to_dict()}
    if not cfg.gate.enabled:
        return {"decision": GateDecision(True, "gate.enabled=false: promoted without evaluation").to_dict()}
    return score_gate(cfg, lake, new_examples, items, choice.parent, checkpoint, run_id, first, last, catalog)


def score_gate(cfg: "Config", lake: "LakeEngine", new_examples: "DataFrame", items: "DataFrame", champion,
               checkpoint: dict[str, Any], run_id: str, first: int, last: int,
               catalog: "Callable[[], np.ndarray] | None" = None) -> dict[str, Any]:
    """Score the candidate (``checkpoint``) and ``champion`` on tonight's
    held-out rows (contract 1: ``holdout = true``) and decide."""
    from pyspark.sql import functions as F

    from ..evaluation.gate import decide, evaluate_models
    from ..evaluation.metrics import slice_masks
    from ..evaluation.prequential import catalog_indices
    from ..train.checkpoint import load_model

    if "holdout" in new_examples.columns:
        rows, where = new_examples.where(F.col("holdout")), "holdout = true rows of tonight's examples"
    else:  # until training_examples has the column: biased toward the candidate, and said so
        rows, where = new_examples, "ALL of tonight's examples (no holdout column; the candidate trained on them)"
    # pointwise metrics over every row (negatives and retractions are label 0);
    # ranking metrics over the label-1 rows, i.e. the held-out events.
    # Slices (reported, never gating): users / items no earlier committed run had, and eval.slice_column.
    slice_col = cfg.eval.slice_column
    slice_error = None
    if slice_col and slice_col not in new_examples.columns:
        slice_error = (f"eval.slice_column={slice_col!r} is not a column of {cfg.lake.examples_table} "
                       f"(columns: {', '.join(new_examples.columns)}); no per-value slices")
        log.error("gate: %s", slice_error)
        slice_col = None
    # history_idx, event_time, event_id: each held-out user's history for the ranking metrics
    # (and user_id: the customer's repeat lists, for a model that reads them)
    data = rows.select("user_idx", "item_idx", "label",
                       *[c for c in dict.fromkeys(("history_idx", "event_time", "event_id", slice_col,
                                                   "user_id" if cfg.features.repeat_items else None))
                         if c and c in new_examples.columns]).toArrow()
    committed = [r.run_id for r in Ledger(lake, cfg.lake.runs_table).runs(cfg.model.name)]
    table = cfg.lake.examples_table
    masks = slice_masks(new_users=unseen(lake, table, data, "user_idx", committed),
                        new_items=unseen(lake, table, data, "item_idx", committed),
                        by=data[slice_col].to_numpy(zero_copy_only=False) if slice_col else None,
                        by_name=slice_col or "column") if data.num_rows else {}
    masks.pop("all", None)
    models = {"candidate": load_model(checkpoint), "champion": load_model(champion)}
    indices = catalog() if catalog else catalog_indices(items, cfg.features)
    res = evaluate_models(models, data, indices, list(cfg.gate.metrics), slices=masks,
                          gate=cfg.gate, repeats=held_out_repeats(cfg, lake, data, models, first))
    decision = decide(res.get("candidate", {}), res.get("champion", {}), cfg.gate, users=res["holdout_users"],
                      bootstrap=res.get("bootstrap"))
    if res["n"] == 0:
        decision = GateDecision(False, f"gate failed: no rows to score ({where} is empty)")
    out = {"decision": decision.to_dict(), "scored_on": where, "n": res["n"], "users": res.get("users", 0),
           "holdout_users": res["holdout_users"],
           "candidate": res.get("candidate", {}), "champion": res.get("champion", {}),
           "champion_run_id": champion.run_id, "slices": res.get("slices", {})}
    if slice_error:
        out["slices_error"] = slice_error
    return out


def held_out_repeats(cfg: "Config", lake: "LakeEngine", data: "pa.Table", models: dict, first: int):
    """The repeat lists of the held-out rows' customers as the night found
    them (``user_state`` before the commit of ``first``, as the prequential
    step reads them), for the models that read them; None when none does."""
    import pyarrow.compute as pc

    from ..serving.scorer import repeat_items
    from .prequential import night_repeats

    k = max(repeat_items(m) for m in models.values())
    if not k or "user_id" not in data.column_names:
        return None
    pos = data.filter(pc.equal(data["label"], 1))
    return night_repeats(lake, cfg, pos, first, k) if pos.num_rows else None


def unseen(lake: "LakeEngine", table: str, rows: "pa.Table", col: str, committed: list[str]) -> "np.ndarray":
    """Boolean mask over ``rows``: its ``col`` value is in no committed run's
    examples. Found by the engine's ``lookup`` on tonight's distinct values
    (delta-rs: a column read), not a Spark scan of every run's examples."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    values = rows[col].to_numpy(zero_copy_only=False)
    if not len(values) or not committed:
        return np.ones(len(values), dtype=bool)
    hits = lake.lookup(table, pa.table({col: pc.unique(rows[col]).drop_null()}), ["run_id", col])
    seen = hits.filter(pc.is_in(hits["run_id"], pa.array(committed, pa.string())))[col]
    return ~np.isin(values, seen.to_numpy(zero_copy_only=False))
