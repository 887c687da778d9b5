# Databricks notebook source
# MAGIC %md
# MAGIC # Explore runs
# MAGIC
# MAGIC Reads the run ledger (nothing is written except the plot file): every committed run with its source
# MAGIC version range, parent chain (lineage), checkpoint and checksum, and next-day metrics over nights.
# MAGIC
# MAGIC Widgets: **config_file**, **overrides** (as in `nightly_incremental`; e.g. `lake.runs_table=runs_full`
# MAGIC to look at a full-retrain lineage), **all_models** (every model in the ledger, not only `model.name`),
# MAGIC **verify** (re-hash every checkpoint file against the ledger), **report_dir**.
# MAGIC
# MAGIC Locally: `python notebooks/explore_runs.py --set lake.root=./lake --verify true`.

# COMMAND ----------

import os
import sys

try:
    import deltarec  # noqa: F401
except ImportError:
    sys.path[:0] = [os.path.abspath(p) for p in ("lib", os.path.join("..", "lib")) if os.path.isdir(p)]

from deltarec import notebook as nb
from deltarec.evaluation.report import lineage, load_runs, plot_nights, write_report

dbutils, display = nb.platform(globals())  # Databricks' own, else local stand-ins

nb.config_widgets(dbutils)
dbutils.widgets.dropdown("all_models", "false", ["true", "false"], "All models")
dbutils.widgets.dropdown("verify", "false", ["true", "false"], "Verify checkpoints")
dbutils.widgets.text("report_dir", "reports", "Directory for the plot")

# COMMAND ----------

cfg = nb.notebook_config(dbutils.widgets.get("config_file"), dbutils.widgets.get("overrides"))
all_models = nb.parse_bool(dbutils.widgets.get("all_models"), "all_models")
verify = nb.parse_bool(dbutils.widgets.get("verify"), "verify")
report_dir = dbutils.widgets.get("report_dir") or "reports"
lake = nb.get_lake(cfg)  # delta-rs reads the ledger without a Spark session
print(f"ledger {lake.uri(cfg.lake.runs_table)} ({lake.name}); model {'*' if all_models else cfg.model.name!r}")

# COMMAND ----------

# MAGIC %md
# MAGIC ## Runs and lineage
# MAGIC `chain` lists a run and its ancestors (newest first); `contiguous` says the run's first version is
# MAGIC right after its parent's last one (or 0 for a lineage's first run).

# COMMAND ----------

runs = load_runs(lake, cfg, all_models=all_models)
run_lineage = lineage(runs, verify=verify)
print(f"{len(runs)} committed runs" + ("" if runs else ": run notebooks/nightly_incremental.py first"))
display(nb.table(run_lineage))

# COMMAND ----------

# MAGIC %md
# MAGIC ## Next-day metrics over nights

# COMMAND ----------

plot_png = plot_nights(runs, os.path.join(report_dir, f"{cfg.model.name}-{cfg.lake.runs_table}-nights.png"))
display(nb.image(plot_png))

# COMMAND ----------

# MAGIC %md
# MAGIC ## Registry: champion, candidates, baselines
# MAGIC Next-day metrics of the champion, the candidates the gate rejected, the never-updated first model and
# MAGIC popularity, plus the gate's holdout metrics, from the lake's metrics table (what `deltarec report` writes).

# COMMAND ----------

registry_report = write_report(lake, cfg, os.path.join(report_dir, f"{cfg.model.name}-{cfg.lake.runs_table}"))
print(f"registry report: {registry_report['html']} ({registry_report['metric_rows']} metric rows)")
display(nb.image(registry_report["png"]))
