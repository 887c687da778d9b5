#!/usr/bin/env bash
# Create (once) the project's virtual environment, then stay quiet.
#
#   bash lib/bootstrap_env.sh            # ensure .venv exists and is complete
#   DELTAREC_VENV=/path bash lib/...     # put it elsewhere
#   DELTAREC_SKIP_HOROVOD=1              # skip the ~5 min horovod compile
#
# Order matters (see ../shared/design/ENVIRONMENT.md):
#   1. torch==2.13.0 first: any other torch requirement resolved before it pulls
#      the newest CUDA build (several GB).
#   2. the project with its extras (pyspark builds from a 456 MB sdist once,
#      pip caches the wheel).
#   3. horovod 0.28.1 from its sdist without build isolation, against the
#      installed torch, with C++14 turned into C++17 (torch >= 2.1 headers need
#      it) and Gloo only (no MPI here).
# A stamp keyed on this file and setup.py makes later calls a no-op.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DELTAREC_VENV:-$ROOT/.venv}"
PY="${DELTAREC_BOOTSTRAP_PYTHON:-python3}"
EXTRAS="spark,training,text,serve,dev"
KEY="$(cat "$ROOT/setup.py" "$ROOT/lib/bootstrap_env.sh" | sha256sum | cut -c1-16)"
STAMP="$VENV/.deltarec-env-$KEY"
[ "${DELTAREC_SKIP_HOROVOD:-0}" = 1 ] && STAMP="$STAMP-nohvd"

if [ -f "$STAMP" ] || { [ "${DELTAREC_SKIP_HOROVOD:-0}" = 1 ] && [ -f "${STAMP%-nohvd}" ]; }; then
  exit 0
fi

LOG="$VENV.bootstrap.log"
say() { printf 'deltarec bootstrap: %s\n' "$*" >&2; }
run() {  # run quietly, show the log tail if it fails
  if ! "$@" >>"$LOG" 2>&1; then
    say "FAILED: $*"; say "last lines of $LOG:"; tail -n 40 "$LOG" >&2; exit 1
  fi
}

: >"$LOG"
say "creating the environment in $VENV (first run only; about 10 minutes, log: $LOG)"
"$PY" -c 'import sys; assert sys.version_info >= (3, 10), sys.version' \
  || { say "need Python >= 3.10 as '$PY' (set DELTAREC_BOOTSTRAP_PYTHON)"; exit 1; }
command -v java >/dev/null || { say "need a Java 17+ runtime on PATH for Spark (apt-get install openjdk-17-jre-headless)"; exit 1; }
[ -x "$VENV/bin/python" ] || run "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
run "${PIP[@]}" install -U pip "setuptools<81" wheel

say "1/3 torch 2.13.0"
run "${PIP[@]}" install "torch==2.13.0"
say "2/3 deltarec[$EXTRAS] (pyspark builds from source once: a few minutes)"
run "${PIP[@]}" install -e "$ROOT[$EXTRAS]"

if [ "${DELTAREC_SKIP_HOROVOD:-0}" != 1 ]; then
  if "$VENV/bin/python" -c 'import horovod.torch' 2>/dev/null; then
    say "3/3 horovod already installed"
  else
    say "3/3 horovod 0.28.1 with Gloo (compiles once: about 5 minutes)"
    command -v cmake >/dev/null || { say "need cmake (apt-get install cmake) to build horovod"; exit 1; }
    run "${PIP[@]}" install psutil cloudpickle packaging pyyaml
    WRAP="$VENV/cxx17"; mkdir -p "$WRAP"
    cat >"$WRAP/g++" <<'WRAPPER'
#!/usr/bin/env bash
# horovod's CMake pins -std=c++14; torch >= 2.1 headers need C++17.
args=(); for a in "$@"; do [ "$a" = "-std=c++14" ] && a="-std=c++17"; args+=("$a"); done
exec /usr/bin/g++ "${args[@]}"
WRAPPER
    chmod +x "$WRAP/g++"
    run env CXX="$WRAP/g++" PATH="$VENV/bin:$PATH" \
      HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_MPI=1 HOROVOD_WITH_GLOO=1 \
      HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_CPU_OPERATIONS=GLOO \
      MAKEFLAGS="-j$(nproc)" CMAKE_POLICY_VERSION_MINIMUM=3.5 \
      "${PIP[@]}" install --no-build-isolation --no-binary horovod "horovod==0.28.1"
    run "$VENV/bin/python" -c 'import horovod.torch as hvd; assert hvd.gloo_built(), "horovod built without Gloo"'
  fi
fi
rm -f "$VENV"/.deltarec-env-*
touch "$STAMP"
say "environment ready: $VENV"
