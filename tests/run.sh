#!/usr/bin/env bash
# Run the test suite: creates .venv on first use (lib/bootstrap_env.sh), then pytest.
#   bash tests/run.sh                 # everything
#   bash tests/run.sh -k ledger -x    # any pytest arguments
#   bash tests/run.sh tests/test_lake.py -x   # only these files
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/lib/bootstrap_env.sh"
cd "$ROOT"
# Test paths given (tests/test_x.py, tests/x.py::name): run those only; otherwise the whole tests/ folder.
paths=()
for a in "$@"; do case "$a" in tests/*|*.py|*::*) paths+=("$a") ;; esac; done
[ ${#paths[@]} -gt 0 ] || set -- tests "$@"
exec "${DELTAREC_VENV:-$ROOT/.venv}/bin/python" -m pytest -p no:cacheprovider -rs "$@"
