#!/usr/bin/env bash
# The project's test command (README and CI): set up, then run every test not marked slow.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
"${PYTHON:-python3}" -m ruff check src tests benchmarks
exec "${PYTHON:-python3}" -m pytest -m "not slow" -q "$@"
