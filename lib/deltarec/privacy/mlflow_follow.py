"""MLflow follows the checkpoints a forget rewrote or deleted.

For each such run, every MLflow run mirroring it that does not carry the new
sha256 (tag ``deltarec.sha256``) is replaced: the rewritten checkpoint is
logged again through ``registry.mlflow_sync.log_run`` (a new MLflow run and
model version, built from the lake as it is after the erasure; the
``champion`` alias moves with it), then the old MLflow run's artifacts and
logged models are deleted from the artifact store, its model versions
deleted and the run itself deleted. Runs already carrying the new sha256 are
skipped, so a rerun after a crash repeats only what is missing. Called after
the tables are erased: a logged model may carry state read from them.

MLflow is a mirror (the lake is the source of truth): a failure is logged
and returned, not raised.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import Config
    from ..lake.engine import LakeEngine
    from ..lake.ledger import RunRecord

log = logging.getLogger("deltarec.privacy")
SHA_TAG = "deltarec.sha256"


def follow(cfg: "Config", lake: "LakeEngine", changed: list["RunRecord"]) -> dict[str, str]:
    from ..registry.mlflow_sync import RUN_TAG, client, log_run, registered_model
    from .checkpoints import for_model

    out: dict[str, str] = {}
    try:
        _, c = client(cfg, lake)
        exp = c.get_experiment_by_name(cfg.mlflow.experiment)
        if exp is None:
            return out
        for rec in changed:
            mcfg = for_model(cfg, rec.model)
            sha = rec.checkpoint_sha256 or "deleted"
            runs = c.search_runs([exp.experiment_id], filter_string=f"tags.{RUN_TAG} = '{rec.run_id}'")
            stale = [r for r in runs if r.data.tags.get(SHA_TAG) != sha]
            if not stale:
                continue
            if rec.checkpoint_path and not any(r.data.tags.get(SHA_TAG) == sha for r in runs):
                c.set_tag(log_run(mcfg, lake, rec)["run_id"], SHA_TAG, sha)
            for r in stale:
                _drop(c, exp.experiment_id, registered_model(mcfg), r.info.run_id, r.info.artifact_uri)
            out[rec.run_id] = "relogged" if rec.checkpoint_path else "deleted"
    except Exception as e:
        log.error("forget: the lake is erased, but following it in MLflow failed: %s: %s", type(e).__name__, e)
        out["error"] = f"{type(e).__name__}: {e}"
    return out


def _drop(c, experiment_id: str, name: str, run_id: str, artifact_uri: str) -> None:
    """Delete an MLflow run's artifacts, logged models and model versions, then the run."""
    try:
        models = c.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'")
    except Exception:  # an MLflow without logged models
        models = []
    for m in models:
        _wipe(m.artifact_location)
        c.delete_logged_model(m.model_id)
    _wipe(artifact_uri)
    try:
        versions = [v for v in c.search_model_versions(f"name='{name}'") if v.run_id == run_id]
    except Exception:  # no registered model
        versions = []
    for v in versions:
        c.delete_model_version(name, v.version)
    c.delete_run(run_id)


def _wipe(uri: str) -> None:
    """Delete every artifact under ``uri``, entry by entry (the root itself is the store's)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repo = get_artifact_repository(uri)
    try:
        entries = repo.list_artifacts()
    except (FileNotFoundError, OSError):
        return
    for f in entries:
        repo.delete_artifacts(f.path)
