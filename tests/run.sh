#!/usr/bin/env bash
# Run the test suite: creates .venv on first use (lib/bootstrap_env.sh), then pytest.
#   bash tests/run.sh                 # everything
#   bash tests/run.sh -k ledger -x    # any pytest arguments
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/lib/bootstrap_env.sh"
cd "$ROOT"
exec "${DELTAREC_VENV:-$ROOT/.venv}/bin/python" -m pytest tests -p no:cacheprovider -rs "$@"
