"""The DataFrames one night computes once and reads several times, and their
release when the night is done (before training needs the memory).

Two ways to hold one. ``keep`` caches it: its plan stays, so every later
action re-plans it (cheap for a read or a small select). ``cut`` computes it
now and stores its rows on the executors (a local checkpoint, memory and
disk), replacing its plan with a scan of those rows: later actions plan over
a leaf, not over the joins and windows that made it. Measured on a 50k-event
night (``benchmarks/delta_scaling.py``): with the history slices, validation
and its outputs only cached, 100 of its 137 s went to the driver planning
ever deeper plans (Catalyst analysing them again for each action, the cache
manager comparing them), not to Spark jobs; cut, the night took 34 s.

A cut DataFrame is not recomputed if an executor holding its rows is lost
(Spark's rule for local checkpoints): the night fails and is rerun, which is
idempotent. Under Spark Connect the server releases it with the DataFrame.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import DataFrame


class Held:
    def __init__(self) -> None:
        self._cached: list = []
        self._cut: list = []

    def keep(self, df: "DataFrame") -> "DataFrame":
        """Cached (lazily, on its first action), plan kept."""
        self._cached.append(df if df.is_cached else df.cache())
        return df

    def cut(self, df: "DataFrame") -> "DataFrame":
        """Computed now (one Spark job), stored on the executors, plan cut."""
        out = df.localCheckpoint(eager=True)
        self._cut.append(out)
        return out

    def release(self) -> None:
        for df in self._cached:
            df.unpersist()
        for df in self._cut:
            jdf = getattr(df, "_jdf", None)  # None under Spark Connect
            if jdf is not None:
                # The checkpointed RDD's blocks: the Python API has no call for
                # them, and RDD.unpersist would log a WARN on every night ("its
                # lineage has been truncated"), which is the point of a cut.
                rdd = jdf.queryExecution().logical().rdd()
                df.sparkSession.sparkContext._jsc.sc().unpersistRDD(rdd.id(), False)
        self._cached, self._cut = [], []
