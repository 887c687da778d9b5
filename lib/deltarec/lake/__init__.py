"""The lake: two Delta engines behind one interface, plus the run ledger."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .engine import ConcurrentRunError, LakeEngine, LakeError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from ..config import LakeConfig

__all__ = ["open_lake", "resolve_engine_name", "LakeEngine", "LakeError", "ConcurrentRunError"]


def resolve_engine_name(engine: str, spark: "SparkSession | None") -> str:
    """``auto`` → delta-spark when Delta Lake works in ``spark`` (its JVM
    classes load; on Spark Connect, the server has Delta), else delta-rs."""
    if engine != "auto":
        return engine
    if spark is not None:
        from .delta_spark import delta_available

        if delta_available(spark):
            return "delta-spark"
    return "delta-rs"


def open_lake(cfg: "LakeConfig", spark: "SparkSession | None" = None) -> LakeEngine:
    name = resolve_engine_name(cfg.engine, spark)
    if name == "delta-rs":
        from .delta_rs import DeltaRsEngine

        return DeltaRsEngine(cfg.root, spark)
    from .delta_spark import DeltaSparkEngine

    return DeltaSparkEngine(cfg.root, spark)
