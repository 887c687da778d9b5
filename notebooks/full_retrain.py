# Databricks notebook source
# MAGIC %md
# MAGIC # Full retrain into a separate lineage
# MAGIC
# MAGIC Trains a new model **from scratch over the whole history** (source versions `0..latest` of
# MAGIC `behavior_events`) with the normal nightly pipeline, and records it as a **separate lineage**:
# MAGIC
# MAGIC | lineage state | nightly lineage | this notebook (`lineage_suffix=full`) |
# MAGIC |---|---|---|
# MAGIC | run ledger | `lake.runs_table` (`runs`) | `runs_full` |
# MAGIC | training examples | `training_examples` | `training_examples_full` |
# MAGIC | quarantine | `quarantine_events` | `quarantine_events_full` |
# MAGIC | checkpoints | `checkpoints/` | `checkpoints_full/` |
# MAGIC
# MAGIC The source table, the items table and `model.name` are shared. Because the new ledger is empty, its
# MAGIC first run has no parent: it consumes versions `0..latest` with `train.full_epochs` (strategy `full`),
# MAGIC exactly like the first run of the nightly lineage. The nightly ledger, its watermark and its
# MAGIC checkpoints are not touched, so serving keeps using the nightly model; compare the two lineages with
# MAGIC `explore_runs` (`overrides: lake.runs_table=runs_full`). Later runs with the same lineage tables
# MAGIC (e.g. `deltarec nightly --set lake.runs_table=runs_full --set ...`) continue the new lineage
# MAGIC incrementally. The notebook refuses a suffix whose ledger already holds runs: pick a new one
# MAGIC (e.g. `full_20250101`) for each full retrain.

# COMMAND ----------

import os
import sys

try:
    import deltarec  # noqa: F401
except ImportError:
    sys.path[:0] = [os.path.abspath(p) for p in ("lib", os.path.join("..", "lib")) if os.path.isdir(p)]

from deltarec import notebook as nb
from deltarec.evaluation.report import lineage, load_runs
from deltarec.pipeline.nightly import run_nightly
from deltarec.pipeline.plan import describe_plan, plan

dbutils, display = nb.platform(globals())  # Databricks' own, else local stand-ins

nb.config_widgets(dbutils)
dbutils.widgets.text("lineage_suffix", "full", "Suffix of the new lineage's tables")
dbutils.widgets.dropdown("dry_run", "false", ["true", "false"], "Dry run (plan only)")

# COMMAND ----------

cfg = nb.notebook_config(dbutils.widgets.get("config_file"), dbutils.widgets.get("overrides"))
dry_run = nb.parse_bool(dbutils.widgets.get("dry_run"), "dry_run")
spark = nb.get_spark(cfg)
full_cfg = nb.full_retrain_config(spark, cfg, dbutils.widgets.get("lineage_suffix"))
print(f"new lineage of model {full_cfg.model.name!r}: ledger {full_cfg.lake.runs_table}, examples "
      f"{full_cfg.lake.examples_table}, quarantine {full_cfg.lake.quarantine_table}, checkpoints "
      f"{full_cfg.lake.checkpoints_dir}; nightly ledger {cfg.lake.runs_table} untouched")

# COMMAND ----------

# MAGIC %md
# MAGIC ## Plan (writes nothing): versions 0..latest

# COMMAND ----------

retrain_plan = plan(spark, full_cfg)
print(describe_plan(retrain_plan))

# COMMAND ----------

# MAGIC %md
# MAGIC ## Train from scratch (skipped on a dry run)

# COMMAND ----------

results = [] if dry_run else [run_nightly(spark, full_cfg)]
if results:
    display(nb.table(nb.night_table(results)))
else:
    print("dry run: nothing was written")

# COMMAND ----------

# MAGIC %md
# MAGIC ## The new lineage

# COMMAND ----------

display(nb.table(lineage(load_runs(nb.get_lake(full_cfg, spark), full_cfg))))
