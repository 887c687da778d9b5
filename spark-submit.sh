#!/usr/bin/env bash
# Run a deltarec job with spark-submit.
#
#   ./spark-submit.sh [spark-submit options] jobs/JOB.py [job options]
#
#   ./spark-submit.sh jobs/nightly.py                          # embedded default, conf/local.yaml
#   ./spark-submit.sh jobs/nightly.py --set demo.nights=2      # any config override
#   ./spark-submit.sh --master spark://host:7077 --executor-memory 4g \
#       jobs/nightly.py --conf conf/cluster.yaml              # a cluster (yarn, k8s://..., spark://...)
#
# What it does:
#   1. creates .venv on first use (lib/bootstrap_env.sh; quiet afterwards;
#      DELTAREC_NO_BOOTSTRAP=1 skips it and uses the python on PATH);
#   2. zips lib/deltarec into build/deltarec.zip and ships it with --py-files,
#      also on the executors' PYTHONPATH (for the training ranks' processes);
#   3. takes --master from your flags, else from the config's spark.master, and
#      tells the job the same master (--set spark.master=...);
#   4. with lake.engine=delta-spark adds the Delta SQL extension/catalog and
#      --packages io.delta:delta-spark_2.13:$DELTA_VERSION (or --jars
#      $DELTAREC_DELTA_JARS when set: every jar --packages would fetch,
#      comma-separated; conf/CLUSTER.md lists them);
#   5. prints the exact spark-submit command, then runs it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# Keep in step with the delta-spark pin in setup.py. delta-spark 4.4.x requires
# pyspark>=4.0.1,<=4.2.0: pyspark stays at 4.2.x (setup.py) while this is 4.4.x.
DELTA_VERSION="${DELTA_VERSION:-4.4.1}"

if [ $# -eq 0 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 0
fi

if [ "${DELTAREC_NO_BOOTSTRAP:-0}" = 1 ]; then
  PY="$(command -v python3)"; SUBMIT="$(command -v spark-submit || true)"
else
  bash "$ROOT/lib/bootstrap_env.sh"
  VENV="${DELTAREC_VENV:-$ROOT/.venv}"
  PY="$VENV/bin/python"; SUBMIT="$VENV/bin/spark-submit"
fi
[ -n "$SUBMIT" ] && [ -x "$SUBMIT" ] || { echo "spark-submit.sh: spark-submit not found (pip install pyspark)" >&2; exit 1; }

# split: spark-submit options | job script | job options
spark_opts=(); job=""; job_args=(); user_master=""
while [ $# -gt 0 ]; do
  if [ -z "$job" ]; then
    case "$1" in
      *.py) job="$1" ;;
      --master) user_master="$2"; shift ;;
      --master=*) user_master="${1#--master=}" ;;
      *) spark_opts+=("$1") ;;
    esac
  else
    job_args+=("$1")
  fi
  shift
done
[ -n "$job" ] || { echo "spark-submit.sh: name a job script, e.g. jobs/nightly.py" >&2; exit 2; }
[ -f "$job" ] || { echo "spark-submit.sh: job script '$job' not found" >&2; exit 2; }

has_conf=0
for a in "${job_args[@]+"${job_args[@]}"}"; do [ "$a" = "--conf" ] && has_conf=1; done
[ $has_conf = 1 ] || job_args=(--conf "$ROOT/conf/local.yaml" "${job_args[@]+"${job_args[@]}"}")

cfg_get() { PYTHONPATH="$ROOT/lib${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m deltarec.cli config "${job_args[@]}" --get "$1"; }
if [ -n "$user_master" ]; then
  master="$user_master"; job_args+=(--set "spark.master=$user_master")
else
  master="$(cfg_get spark.master)"
fi
engine="$(cfg_get lake.engine)"

mkdir -p "$ROOT/build"
# Built under a temporary name and renamed: two submits at once never ship a half-written zip.
tmpzip="$(mktemp "$ROOT/build/.deltarec.XXXXXX.zip")"; rm -f "$tmpzip"
(cd "$ROOT/lib" && "$PY" -m zipfile -c "$tmpzip" deltarec >/dev/null) && mv -f "$tmpzip" "$ROOT/build/deltarec.zip"

cmd=("$SUBMIT")
[ -n "$master" ] && cmd+=(--master "$master")
cmd+=(--py-files "$ROOT/build/deltarec.zip" --conf "spark.pyspark.python=$PY")
# --py-files reaches an executor's Python workers through their sys.path only, not
# their environment, so the processes a training backend starts from them (horovod's
# ranks, TorchDistributor's torchrun) would import whatever deltarec the machine has
# installed, or none. Executors keep shipped files in their working directory, where
# those processes start: a relative entry (made absolute by Python at start) finds it.
cmd+=(--conf "spark.executorEnv.PYTHONPATH=deltarec.zip")
# The driver JVM starts before the job's config is read: memory and log level go here.
cmd+=(--driver-memory "$(cfg_get spark.driver_memory)"
      --driver-java-options "-Dlog4j2.configurationFile=file:$ROOT/conf/log4j2.properties")
if [ "$engine" = "delta-spark" ]; then
  cmd+=(--conf spark.sql.extensions=io.delta.sql.DeltaSparkSessionExtension
        --conf spark.sql.catalog.spark_catalog=org.apache.spark.sql.delta.catalog.DeltaCatalog)
  if [ -n "${DELTAREC_DELTA_JARS:-}" ]; then cmd+=(--jars "$DELTAREC_DELTA_JARS")
  else cmd+=(--packages "io.delta:delta-spark_2.13:$DELTA_VERSION"); fi
fi
cmd+=("${spark_opts[@]+"${spark_opts[@]}"}" "$job" "${job_args[@]}")

export PYSPARK_PYTHON="$PY" PYSPARK_DRIVER_PYTHON="$PY"
echo "+ ${cmd[*]}" >&2
exec "${cmd[@]}"
