"""``privacy.unlearning=retrain``: exact unlearning by a full retrain.

Row-level unlearning (``privacy/model.py``) leaves what the shared layers
learnt from a user. A batch erased with ``unlearning=retrain`` makes the next
night of each model train from scratch over the (erased) examples of every
committed run, until one such full run has committed after the erasure.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from . import requests as rq

if TYPE_CHECKING:
    from ..config import Config
    from ..lake.engine import LakeEngine
    from ..lake.ledger import Ledger


def full_retrain_due(cfg: "Config", lake: "LakeEngine", ledger: "Ledger", model: str) -> str | None:
    """Why ``model``'s next night must be a full retrain (None: it need not)."""
    asked = [r for r in rq.log_rows(cfg, lake) if r["unlearning"] == "retrain" and r["erased_at"] is not None
             and r["status"] in (rq.ERASED, rq.VACUUMED)]
    if not asked:
        return None
    last = max(asked, key=lambda r: r["erased_at"])
    full = [r for r in ledger.runs(model) if r.strategy == "full" and r.started_at >= last["erased_at"]]
    if full:
        return None
    return (f"forget batch {last['batch']} asked for exact unlearning (privacy.unlearning=retrain) and no full "
            f"retrain of model {model!r} has started since its erasure at {last['erased_at'].isoformat()}")
