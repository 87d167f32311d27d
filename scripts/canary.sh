#!/usr/bin/env bash
# The drift canary: the invariant tests against the NEWEST releases of the core dependencies (or the versions
# you name), in a throwaway environment, while CI and scripts/setup.sh stay on the lock (locks/core.txt).
#
#   bash scripts/canary.sh                          # newest releases on the package index
#   bash scripts/canary.sh transformers==5.23.0     # pin some (e.g. to check a lower bound)
#   bash scripts/test.sh --latest                   # the same as the first line
#
# torch stays at the locked version (an unpinned torch pulls gigabytes of CUDA packages; L2S_CANARY_TORCH
# overrides it). The package itself is installed without its declared ranges (--no-deps), so a release newer
# than the tested upper bound is what gets tested. Prints the versions under test, runs the invariant tests
# (steering positions, activations, extraction, the HF engine, artifacts, models), and writes
# $L2S_CANARY_OUT (default canary-report.txt): versions, then pytest's summary. Exit status: pytest's.
# Moving the lock forward: docs/STACK.md.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY="${PYTHON:-python3}"
VENV="${L2S_CANARY_VENV:-$(mktemp -d /tmp/l2s-canary.XXXXXX)/venv}"
OUT="${L2S_CANARY_OUT:-canary-report.txt}"
"$PY" -m venv "$VENV"
VPY="$VENV/bin/python"
pip_install() { "$VPY" -m pip install -q --disable-pip-version-check "$@"; }
TORCH="${L2S_CANARY_TORCH:-$(grep -E '^torch==' locks/core.txt)}"
pip_install "$TORCH"
# the core dependencies by name, without their version ranges, upgraded to the newest (or the pins given)
mapfile -t DEPS < <("$VPY" - <<'PY'
import re, tomllib
with open("pyproject.toml", "rb") as f:
    meta = tomllib.load(f)["project"]
names = [re.split(r"[<>=!~; \[]", d, maxsplit=1)[0] for d in meta["dependencies"]]
print("\n".join(n for n in names if n != "torch"))
PY
)
pip_install --upgrade "${DEPS[@]}" pytest tokenizers "$@"
pip_install --no-deps -e .
{
  echo "# drift canary $(date -u +%Y-%m-%dT%H:%MZ)"
  "$VPY" - <<'PY'
import importlib.metadata as m
for name in ("torch", "transformers", "tokenizers", "huggingface_hub", "accelerate", "safetensors", "numpy"):
    print(f"{name}=={m.version(name)}")
PY
} | tee "$OUT"
set +e
"$VPY" -m pytest -q -p no:cacheprovider -m "not slow and not serve" \
  tests/test_steering.py tests/test_activations.py tests/test_vectors.py tests/test_extraction.py \
  tests/engines/test_hf.py tests/test_artifacts.py tests/models 2>&1 | tee -a "$OUT" | tail -n 15
rc=${PIPESTATUS[0]}
set -e
[ -n "${L2S_CANARY_VENV:-}" ] || rm -rf "$(dirname "$VENV")"
echo "canary: pytest exit $rc; report in $OUT" >&2
exit "$rc"
