"""Where a night's time goes: seconds and Spark jobs per stage.

A :class:`StageClock` charges each stage with the wall time and the Spark
jobs since the previous mark. Spark is lazy, so a stage is charged with the
work its own actions trigger. The nightly records the result in the run's
ledger metrics (``metrics["stages"]``), which is what benchmarks read.
Reads: the SparkContext's status tracker. Writes: nothing.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


class StageClock:
    def __init__(self, spark: "SparkSession | None"):
        self._tracker = spark.sparkContext.statusTracker() if spark is not None else None
        self.seconds: dict[str, float] = {}
        self.jobs: dict[str, int] = {}
        self._t, self._j = time.perf_counter(), self._last_job()

    def _last_job(self) -> int:
        if self._tracker is None:
            return -1
        return max(self._tracker.getJobIdsForGroup(None) or [-1])

    def mark(self, stage: str) -> None:
        """Charge the time and Spark jobs since the last mark to ``stage``."""
        t, j = time.perf_counter(), self._last_job()
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + t - self._t, 3)
        self.jobs[stage] = self.jobs.get(stage, 0) + j - self._j
        self._t, self._j = t, j

    def add(self, seconds: dict[str, float], jobs: dict[str, int], prefix: str = "") -> None:
        """Take another clock's stages (e.g. the delta job's) under ``prefix``,
        and restart from now: their time is not charged twice."""
        for stage, s in seconds.items():
            self.seconds[prefix + stage] = round(self.seconds.get(prefix + stage, 0.0) + s, 3)
            self.jobs[prefix + stage] = self.jobs.get(prefix + stage, 0) + int(jobs.get(stage, 0))
        self._t, self._j = time.perf_counter(), self._last_job()

    def record(self) -> dict[str, dict[str, Any]]:
        """``{stage: {"seconds": s, "spark_jobs": n}}`` in the order the stages ran."""
        return {stage: {"seconds": s, "spark_jobs": self.jobs.get(stage, 0)} for stage, s in self.seconds.items()}
