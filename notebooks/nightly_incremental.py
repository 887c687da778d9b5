# Databricks notebook source
# MAGIC %md
# MAGIC # Nightly incremental training
# MAGIC
# MAGIC Consumes the Delta versions of `behavior_events` added since the last committed run (the
# MAGIC watermark in the run ledger), trains the current model on them and commits the run — the same
# MAGIC library call as `./spark-submit.sh jobs/nightly.py` / `deltarec nightly`.
# MAGIC
# MAGIC Widgets:
# MAGIC - **config_file**: YAML config (`conf/local.yaml`, `conf/cluster.yaml`, …; relative to the repository);
# MAGIC - **overrides**: `section.key=value` items, one per line or comma-separated (e.g. `lake.root=/dbfs/deltarec/lake, train.backend=torch`);
# MAGIC - **dry_run**: `true` shows the plan and writes nothing;
# MAGIC - **report_dir**: where the metrics-over-nights PNG goes.
# MAGIC
# MAGIC Outside Databricks the same file runs as a script, widgets coming from the command line:
# MAGIC `python notebooks/nightly_incremental.py --set lake.root=/tmp/lake --dry_run true`.

# COMMAND ----------

# Make `deltarec` importable: installed on the cluster (a wheel or `pip install -e .`), or lib/ of this checkout.
import os
import sys

try:
    import deltarec  # noqa: F401
except ImportError:
    sys.path[:0] = [os.path.abspath(p) for p in ("lib", os.path.join("..", "lib")) if os.path.isdir(p)]

from deltarec import notebook as nb
from deltarec.evaluation.report import load_runs, plot_nights
from deltarec.pipeline.plan import describe_plan, plan

dbutils, display = nb.platform(globals())  # Databricks' own, else local stand-ins

nb.config_widgets(dbutils)
dbutils.widgets.dropdown("dry_run", "false", ["true", "false"], "Dry run (plan only)")
dbutils.widgets.text("report_dir", "reports", "Directory for the plot")

# COMMAND ----------

# MAGIC %md
# MAGIC ## Parameters and session

# COMMAND ----------

cfg = nb.notebook_config(dbutils.widgets.get("config_file"), dbutils.widgets.get("overrides"))
dry_run = nb.parse_bool(dbutils.widgets.get("dry_run"), "dry_run")
report_dir = dbutils.widgets.get("report_dir") or "reports"
spark = nb.get_spark(cfg)
print(f"model {cfg.model.name!r}, lake {cfg.lake.root} ({cfg.lake.engine}), backend {cfg.train.backend}, "
      f"dry_run={dry_run}")

# COMMAND ----------

# MAGIC %md
# MAGIC ## Plan: what the next run would consume (writes nothing)

# COMMAND ----------

night_plan = plan(spark, cfg)
print(describe_plan(night_plan))
if night_plan["change_types"]:
    display(nb.table([{"change_type": k, "rows": v} for k, v in night_plan["change_types"].items()]))

# COMMAND ----------

# MAGIC %md
# MAGIC ## Run the night (skipped on a dry run)

# COMMAND ----------

results = [] if dry_run else nb.run_night(spark, cfg)
if dry_run:
    print("dry run: nothing was written")

# COMMAND ----------

# MAGIC %md
# MAGIC ## Run summary

# COMMAND ----------

if results:
    display(nb.table(nb.night_table(results)))

# COMMAND ----------

# MAGIC %md
# MAGIC ## Next-day metrics over nights
# MAGIC HR@k / NDCG@k on each night's new data, measured before training on it, for the model updated
# MAGIC nightly, the first model never updated, and the most popular items.

# COMMAND ----------

runs = load_runs(nb.get_lake(cfg, spark), cfg)
plot_png = plot_nights(runs, os.path.join(report_dir, f"{cfg.model.name}-nights.png"))
display(nb.image(plot_png))

# COMMAND ----------

# MAGIC %md
# MAGIC ## Tomorrow's recommendations for a few customers
# MAGIC The champion's top 5 from the `recommendations` Delta table, rewritten after the night's commit (and on every
# MAGIC promote / rollback), for the three customers with the most history. `deltarec serve` answers the same over HTTP.

# COMMAND ----------

from deltarec.serving.table import tomorrow_rows

tomorrow = tomorrow_rows(nb.get_lake(cfg, spark), cfg, customers=3, k=5)
if tomorrow:
    display(nb.table(tomorrow))
else:
    print(f"no {cfg.recommend.table} table yet: run the night (or `deltarec recommend`)")
