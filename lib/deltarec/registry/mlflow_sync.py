"""Optional MLflow mirror of the registry: each committed run becomes an MLflow
run (params, per-night metrics, the checkpoint as artifacts) and a version of
a registered model; the champion carries the alias 'champion'.

The lake registry stays the source of truth: MLflow is written after the
ledger commit, and a failure there is logged, never undoes a commit.
"""
from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config import Config
    from ..lake.engine import LakeEngine
    from ..lake.ledger import RunRecord

log = logging.getLogger("deltarec.mlflow")
ALIAS = "champion"
RUN_TAG = "deltarec_run_id"


class MlflowUnavailable(RuntimeError):
    pass


def tracking_uri(cfg: "Config", lake: "LakeEngine") -> str:
    if cfg.mlflow.tracking_uri:
        return cfg.mlflow.tracking_uri
    if "://" in lake.root and not lake.root.startswith("file://"):
        raise MlflowUnavailable(f"mlflow.tracking_uri is unset and lake.root {lake.root!r} is not local: "
                                "set mlflow.tracking_uri (e.g. databricks or http://host:5000)")
    return "file://" + lake.uri("mlruns").removeprefix("file://")


def registered_model(cfg: "Config") -> str:
    return cfg.mlflow.registered_model or f"deltarec-{cfg.model.name}"


def client(cfg: "Config", lake: "LakeEngine"):
    """(mlflow module, MlflowClient) for the configured store; a clear error
    when mlflow is missing."""
    try:
        import mlflow
        from mlflow import MlflowClient
    except ImportError as e:
        raise MlflowUnavailable(f"mlflow.enabled=true but mlflow cannot be imported ({e}): install it "
                                "(pip install mlflow-skinny) or set mlflow.enabled=false") from None
    uri = tracking_uri(cfg, lake)
    if uri.startswith("file:") or "://" not in uri:
        # MLflow 3 refuses its file store unless asked for explicitly; a local
        # store under the lake is what this config chose.
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow, MlflowClient(tracking_uri=uri, registry_uri=uri)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _metrics(run: "RunRecord") -> dict[str, float]:
    from ..evaluation.prequential import ROLES, role_metrics

    m = run.metrics
    out: dict[str, float] = {}
    pre = m.get("prequential") or {}
    k = pre.get("k")
    for role in ROLES:
        for name, v in role_metrics(pre, role).items():
            out[f"prequential.{role}.{name}_at_{k}"] = v
    gate = m.get("gate") or {}
    for role in ("candidate", "champion"):
        for name, v in (gate.get(role) or {}).items():
            out[f"gate.{role}.{name.replace('@', '_at_')}"] = v
    train = m.get("train") or {}
    for name in ("loss", "seconds", "steps"):
        if isinstance(train.get(name), (int, float)):
            out[f"train.{name}"] = train[name]
    if isinstance(m.get("examples"), (int, float)):
        out["examples"] = m["examples"]
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float)) and v == v}


def log_run(cfg: "Config", lake: "LakeEngine", run: "RunRecord") -> dict[str, Any]:
    """One MLflow run + registered model version for a committed ledger run."""
    mlflow, c = client(cfg, lake)
    mlflow.set_experiment(cfg.mlflow.experiment)
    params = {k: v for k, v in _flat(run.config).items()
              if k.split(".")[0] in ("train", "model", "features", "gate", "eval")}
    params.update({"strategy": run.strategy, "parent_run_id": run.parent_run_id,
                   "source_first": run.source_first, "source_last": run.source_last,
                   "code_version": run.code_version})
    with mlflow.start_run(run_name=run.run_id, tags={RUN_TAG: run.run_id, "deltarec.status": run.status,
                                                      "deltarec.model": run.model}) as active:
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        mlflow.log_metrics(_metrics(run), step=run.source_last)  # step = the night (last source version)
        if "://" not in run.checkpoint_path or run.checkpoint_path.startswith("file://"):
            mlflow.log_artifacts(run.checkpoint_path.removeprefix("file://"), artifact_path="checkpoint")
        try:  # the version's model: a pyfunc (raw ids in, raw item ids out) loadable with mlflow + torch
            from ..serving.pyfunc import log_model

            info, pyfunc_error = log_model(lake, cfg, run), None
        except Exception as e:
            info, pyfunc_error = None, f"{type(e).__name__}: {e}"
            log.error("run %s: no pyfunc model logged (%s); the version points at the checkpoint files",
                      run.run_id, pyfunc_error)
        mlflow_run_id = active.info.run_id
    name = registered_model(cfg)
    try:
        c.get_registered_model(name)
    except Exception:
        c.create_registered_model(name)
    source = info.model_uri if info else f"runs:/{mlflow_run_id}/checkpoint"
    mv = c.create_model_version(name, source, run_id=mlflow_run_id, model_id=info.model_id if info else None,
                                tags={RUN_TAG: run.run_id, "sha256": run.checkpoint_sha256})
    out = {"tracking_uri": tracking_uri(cfg, lake), "run_id": mlflow_run_id, "registered_model": name,
           "version": str(mv.version), "model_uri": f"models:/{name}/{mv.version}"}
    if pyfunc_error:
        out["pyfunc_error"] = pyfunc_error
    if run.status == "champion":
        c.set_registered_model_alias(name, ALIAS, mv.version)
        out["alias"] = ALIAS
    return out


def set_champion_alias(cfg: "Config", lake: "LakeEngine", run: "RunRecord") -> dict[str, Any]:
    """Point alias 'champion' at the model version of ``run`` (logging the run first if MLflow lacks it)."""
    _, c = client(cfg, lake)
    name = registered_model(cfg)
    versions = []
    try:
        versions = [v for v in c.search_model_versions(f"name='{name}'") if v.tags.get(RUN_TAG) == run.run_id]
    except Exception:  # no such registered model yet
        versions = []
    if not versions:
        return log_run(cfg, lake, run)  # sets the alias when run.status is champion
    v = max(versions, key=lambda v: int(v.version))
    c.set_registered_model_alias(name, ALIAS, v.version)
    return {"registered_model": name, "version": str(v.version), "alias": ALIAS}
