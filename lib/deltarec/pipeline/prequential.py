"""Stage 4 of a night: score what serves now on the new day, before anything
trains on it (prequential evaluation).

Reads tonight's examples (label-1 events), the ledger, the checkpoints of the
champion, the newest rejected candidate and the lineage's first model, (for
the popularity baseline) committed runs' positives and (for a model that reads
the repeat lists) tonight's customers' ``user_state`` rows as the night read
them, before its own commit, through the engine's ``lookup``. Writes
nothing: the result goes into the run's ledger metrics and reaches
``lake.metrics_table`` only once the run commits
(``publish.store_run_metrics``), so a run that loses a race stores none. The
metric code itself is ``evaluation/prequential.py``.
"""
from __future__ import annotations

import datetime as dt
import logging
from typing import TYPE_CHECKING, Any, Callable

from ..lake.ledger import CANDIDATE, Ledger, RunRecord

if TYPE_CHECKING:
    import numpy as np
    from pyspark.sql import DataFrame

    from ..config import Config
    from ..lake.engine import LakeEngine

log = logging.getLogger("deltarec.nightly")


def score_prequential(cfg: "Config", lake: "LakeEngine", ledger: Ledger, new_examples: "DataFrame",
                      items: "DataFrame", parent: RunRecord, run_id: str | None = None, first: int = 0,
                      last: int = 0, catalog: "Callable[[], np.ndarray] | None" = None) -> dict[str, Any]:
    """HR@K/NDCG@K on the new positives, before anything trains on them, for:
    the champion (key 'champion': the warm-start parent), the newest
    candidate the gate did not promote since ('candidate'), the first model
    of the lineage never updated ('stale'), and the most popular items of the
    last ``eval.popularity_days`` days ('popularity'); ``runs`` names the run
    scored in each role; ``errors`` says why a role was left out (a
    checkpoint that cannot be loaded: only the champion's is required).
    ``{}`` when tonight has no positives. A model that reads the repeat lists
    gets them as of the scored day's start from ``user_state`` before the
    commit of source version ``first`` (the state the night started from).
    ``run_id`` and ``last`` are accepted for callers and not used: nothing is
    stored here. ``catalog``: gives the catalogue's item indices (the night
    shares one computation with the gate), else they come from ``items``."""
    from pyspark.sql import functions as F

    from ..evaluation.prequential import catalog_indices, evaluate, user_histories
    from ..serving.scorer import repeat_items
    from ..train.checkpoint import load_model

    pos = new_examples.where(F.col("label") == 1)
    if "kind" in new_examples.columns:  # contract 1: retractions are label 0 anyway; events only
        pos = pos.where(F.col("kind") == "event")
    # histories (and the event id that orders same-time rows as the delta job did) for models that read them
    # (and the customer, whose repeat lists a model may read)
    pos = pos.select("user_idx", "item_idx", "event_time",
                     *[c for c in ("history_idx", "event_id") if c in new_examples.columns],
                     *(["user_id"] if cfg.features.repeat_items else [])).toArrow()
    if pos.num_rows == 0:
        return {}
    k = cfg.eval.k
    start = min(pos["event_time"].to_pylist())
    runs = ledger.runs(cfg.model.name)
    since = start - dt.timedelta(days=cfg.eval.popularity_days)
    top = popular(lake, cfg.lake.examples_table, [r.run_id for r in runs], since, start, k)

    challenger = max((r for r in runs if r.status == CANDIDATE and r.source_first > parent.source_last),
                     key=lambda r: r.source_last, default=None)
    run_ids = {"champion": parent.run_id, "stale": runs[0].run_id if runs else parent.run_id}
    models = {"champion": load_model(parent)}
    errors: dict[str, str] = {}
    # the candidate and the lineage's first model are comparisons, not what serves or warm-starts:
    # one that cannot be loaded (corrupt, tampered, gone) is left out with its reason, never fatal
    for role, run in (("candidate", challenger), ("stale", runs[0] if len(runs) > 1 else None)):
        if run is None:
            continue
        try:
            models[role] = load_model(run)
        except Exception as e:
            errors[role] = (f"cannot load the checkpoint of run {run.run_id} ({type(e).__name__}: {e}); "
                            f"the {role} comparison is skipped tonight")
            log.error("prequential: %s", errors[role])
            run_ids.pop(role, None)
    if len(runs) <= 1:
        models["stale"] = models["champion"]
    if "candidate" in models:
        run_ids["candidate"] = challenger.run_id
    histories = None
    if "history_idx" in pos.column_names:  # each user's items before tonight, for models that read them
        width = max([int(getattr(m, "history_length", 0) or 0) for m in models.values()] + [1])
        histories = user_histories(pos, width)
    K = max(repeat_items(m) for m in models.values())
    repeats = night_repeats(lake, cfg, pos, first, K) if K and "user_id" in pos.column_names else None
    out = evaluate(models, top, pos["user_idx"].to_numpy(), pos["item_idx"].to_numpy(),
                   catalog() if catalog else catalog_indices(items, cfg.features), k, histories=histories,
                   repeats=repeats)
    out["runs"] = run_ids
    if errors:
        out["errors"] = errors
    return out


def night_repeats(lake: "LakeEngine", cfg: "Config", pos, first: int, k: int):
    """:func:`~deltarec.evaluation.prequential.user_repeats` of the customers of
    ``pos`` (tonight's positives) from their ``user_state`` rows before the
    commit of source version ``first``: the lists as the night found them."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from ..evaluation.prequential import user_repeats
    from .delta_job import base_version

    table = cfg.lake.user_state_table
    version = base_version(lake, table, first)
    keys = pa.table({"user_id": pc.unique(pos["user_id"])})
    state = lake.lookup(table, keys, version=version) if version is not None else keys.slice(0, 0)
    return user_repeats(pos, state, k, cfg.features.repeat_half_life_days)


def popular(lake: "LakeEngine", table: str, committed: list[str], since: dt.datetime, until: dt.datetime,
            k: int) -> "np.ndarray | None":
    """The ``k`` items (hashed) with most positive examples of committed runs in
    [since, until), most first (ties: smaller index); None if there are none.
    The engine's ``lookup`` reads three columns of the committed runs' rows
    (delta-rs: in Rust), so no history-sized Spark job runs every night."""
    import numpy as np
    import pyarrow as pa

    from ..features.examples import epoch_micros

    if not committed:
        return None
    rows = lake.lookup(table, pa.table({"run_id": pa.array(committed, pa.string())}),
                       ["item_idx", "event_time"], where="label = 1")
    t = epoch_micros(rows["event_time"]).to_numpy(zero_copy_only=False)
    lo, hi = (int((x if x.tzinfo else x.replace(tzinfo=dt.timezone.utc)).timestamp() * 1_000_000)
              for x in (since, until))
    items = rows["item_idx"].to_numpy(zero_copy_only=False)[(t >= lo) & (t < hi)]
    if not len(items):
        return None
    ids, counts = np.unique(items, return_counts=True)
    return ids[np.lexsort((ids, -counts))][:k]
