"""The champion's network from its checkpoint, checksums verified first."""
from __future__ import annotations

from typing import Any


def load_model(path: str, sha256: str) -> tuple[Any, dict[str, Any]]:
    """(model in eval mode, checkpoint meta) of the checkpoint at ``path``
    whose manifest hashes to ``sha256``; raises ``CheckpointError`` (bad
    checksum, missing files) before building anything."""
    from ..models import build_model
    from ..train.checkpoint import load_checkpoint

    ck = load_checkpoint(path, sha256)
    model = build_model(ck.meta["model"], **ck.meta["model_params"])
    model.load_state_dict(ck.model_state)
    model.eval()
    return model, ck.meta
