"""The only place a SparkSession is built."""
from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from .config import Config


def build_spark(cfg: "Config", *, delta_jars: str | None = None) -> "SparkSession":
    """Get or create the session for ``cfg``.

    ``spark.master`` from config is applied only when set (``null`` keeps what
    spark-submit or the platform chose). With ``lake.engine=delta-spark`` the
    Delta SQL extension and catalog are configured; the jars themselves must
    come from ``--packages``/``--jars`` or the platform. ``delta_jars``
    (comma-separated paths, as ``--jars`` takes them) puts Delta's jars on the
    classpath and turns the extension on whatever the engine: the test
    session, which serves both engines, gets them this way.
    """
    from pyspark.sql import SparkSession

    # Executors (and horovod's workers) must run this interpreter, with torch.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    sc = cfg.spark
    builder = SparkSession.builder.appName(sc.app_name)
    if sc.master:
        builder = builder.master(sc.master)
    settings = {
        "spark.sql.shuffle.partitions": str(sc.shuffle_partitions),
        "spark.default.parallelism": str(sc.shuffle_partitions),
        "spark.driver.memory": sc.driver_memory,
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.ui.enabled": "false",
        # Stage bars would interleave with our own progress and logs on the console.
        "spark.ui.showConsoleProgress": "false",
        "spark.pyspark.python": sys.executable,
        # PySpark 4 records the Python call site of every DataFrame/Column call
        # in the JVM (for the "DataFrame query context" of errors): about five
        # py4j round trips per call, over half of the ~27,000 a small night
        # makes while it builds plans (validate: 4,627 calls -> 1,657). A
        # night's errors still name the stage and the value; set it back to
        # true with --set spark.conf.spark.python.sql.dataFrameDebugging.enabled=true
        "spark.python.sql.dataFrameDebugging.enabled": "false",
    }
    if delta_jars:
        settings["spark.jars"] = delta_jars
    if cfg.lake.engine == "delta-spark" or delta_jars:
        from .lake.delta_spark import DELTA_CATALOG, DELTA_EXTENSION

        settings["spark.sql.extensions"] = DELTA_EXTENSION
        settings["spark.sql.catalog.spark_catalog"] = DELTA_CATALOG
    settings.update(sc.conf)
    for k, v in settings.items():
        builder = builder.config(k, v)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark
