"""MLflow artifacts follow the checkpoints a forget rewrote or deleted: the
run's ``checkpoint`` artifacts are replaced by the rewritten files (or
deleted), and the run and its model version carry the new sha256. MLflow is
a mirror (the lake is the source of truth): a failure here is logged, not
raised, and ``deltarec forget --status`` still shows the lake's proof."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import Config
    from ..lake.engine import LakeEngine
    from ..lake.ledger import RunRecord

log = logging.getLogger("deltarec.privacy")


def follow(cfg: "Config", lake: "LakeEngine", changed: list["RunRecord"]) -> dict[str, str]:
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    from ..registry.mlflow_sync import RUN_TAG, client, registered_model

    out: dict[str, str] = {}
    try:
        _, c = client(cfg, lake)
        exp = c.get_experiment_by_name(cfg.mlflow.experiment)
        if exp is None:
            return out
        name = registered_model(cfg)
        for rec in changed:
            found = c.search_runs([exp.experiment_id], filter_string=f"tags.{RUN_TAG} = '{rec.run_id}'")
            for run in found:
                if run.data.tags.get("deltarec.sha256") == (rec.checkpoint_sha256 or "deleted"):
                    continue  # followed before a crash
                repo = get_artifact_repository(run.info.artifact_uri)
                try:
                    repo.delete_artifacts("checkpoint")
                except (FileNotFoundError, OSError):
                    pass
                if rec.checkpoint_path:
                    c.log_artifacts(run.info.run_id, rec.checkpoint_path.removeprefix("file://"), "checkpoint")
                c.set_tag(run.info.run_id, "deltarec.sha256", rec.checkpoint_sha256 or "deleted")
                out[rec.run_id] = "rewritten" if rec.checkpoint_path else "deleted"
            try:
                for v in c.search_model_versions(f"name='{name}'"):
                    if v.tags.get(RUN_TAG) == rec.run_id:
                        c.set_model_version_tag(name, v.version, "sha256", rec.checkpoint_sha256 or "deleted")
            except Exception as e:  # no registered model yet
                log.debug("no model versions to retag for %s: %s", rec.run_id, e)
    except Exception as e:
        log.error("forget: the lake is erased, but following it in MLflow failed: %s: %s", type(e).__name__, e)
        out["error"] = f"{type(e).__name__}: {e}"
    return out
