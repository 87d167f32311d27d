#!/usr/bin/env bash
# Are this tree's `l2s eval` reports byte-identical to another commit's on the same inputs?
#   bash scripts/reports_vs_ref.sh REF [WORKDIR]     (e.g. REF=b4e50ea, the last 0.3 commit)
# Runs the same three evaluations (safety on the bundled requests with every method, image POPE on the official
# questions whose COCO images ../shared/data holds, image CHAIR with vectors trained on them) on tiny random
# models with the two source trees (PYTHONPATH; one environment, .venv), then compares every file each run wrote,
# leaving out what records where and when it ran (locks, settings.json, timings). Exit 0: identical.
set -euo pipefail
ref=${1:?give the reference commit, e.g. b4e50ea}
work=${2:-/tmp/l2s-reports-vs-$ref}
root=$(cd "$(dirname "$0")/.." && pwd)
data=${L2S_DATA:-$root/../shared/data}
py=$root/.venv/bin/python
rm -rf "$work" && mkdir -p "$work"
git -C "$root" worktree add --detach "$work/ref-src" "$ref" >/dev/null
trap 'git -C "$root" worktree remove --force "$work/ref-src"' EXIT
PYTHONPATH=$root/src $py - "$work" "$data" <<'PY'
import json, os, shutil, sys
from pathlib import Path
from learn2steer.models.tiny import save_tiny
work, data = Path(sys.argv[1]), Path(sys.argv[2])
for arch in ("llama", "llava"):
    save_tiny(arch, work / f"tiny-{arch}")
have = {p.name: p.parent for d in (data / "coco").iterdir() for p in d.glob("*.jpg")}
rows = [json.loads(line) for line in open(data / "pope" / "coco_pope_random.json")]
keep = [r for r in rows if r["image"] in have]
(work / "images").mkdir()
for name in {r["image"] for r in keep}:
    shutil.copy(have[name] / name, work / "images" / name)
(work / "pope.json").write_text("".join(json.dumps(r) + "\n" for r in keep))
print(f"{len(keep)} POPE questions with images")
PY
fast="--train-epochs 3 --max-new-tokens 4 --batch-size 8 --layers 1 --alphas 1.0"
for tree in ref new; do
  src=$root/src; [ $tree = ref ] && src=$work/ref-src/src
  run() { PYTHONPATH=$src $py -m learn2steer eval "$@" > "$work/$tree.log" 2>&1 || { tail -5 "$work/$tree.log"; exit 1; }; }
  run --model "$work/tiny-llama" --task safety --dataset demo --behaviour safety_refusal --test-limit 16 \
      --methods no_steering,prompt,mean,mean_ba,norm_random,l2s,p2s,cast --out "$work/$tree/safety" $fast
  run --model "$work/tiny-llava" --task pope --dataset "pope:$work/pope.json" --image-dir "$work/images" \
      --test-fraction 0.5 --methods no_steering,prompt,mean,mean_ba,norm_random,l2s,p2s --out "$work/$tree/pope" $fast
  run --model "$work/tiny-llava" --task chair --dataset "chair:$data/coco/codewithminer_resized" --limit 4 \
      --train-dataset "pope:$work/pope.json" --image-dir "$work/images" \
      --chair-gt "$data/chair/coco2014_chair_gt_objects.json.gz" --methods no_steering,mean,l2s \
      --out "$work/$tree/chair" $fast
done
cd "$work"
status=0
while IFS= read -r f; do
  case "$f" in *.lock*|*/settings.json|*/.lock*) continue;; esac
  a=ref/$f; b=new/$f
  if [ ! -e "$b" ]; then
    # 0.4 trains only the artifacts its methods read (#27); anything else missing is a difference
    case "$f" in */artifacts/*) echo "not trained here (no method reads it): $f";; *) echo "only in $ref: $f"; status=1;; esac
    continue
  fi
  if [[ $f == *.json ]]; then
    # timings record when and how fast it ran, not what it computed
    same=$($py -c "import json,sys
def drop(x):
    if isinstance(x, dict): return {k: drop(v) for k, v in x.items() if k not in ('timings', 'timings_s', 'version')}
    if isinstance(x, list): return [drop(v) for v in x]
    return x
print(drop(json.load(open(sys.argv[1]))) == drop(json.load(open(sys.argv[2]))))" "$a" "$b")
    [ "$same" = True ] || { echo "differs: $f"; status=1; }
  elif [[ $f == */artifacts/*/README.md ]]; then  # a model card names the version that wrote it
    cmp -s <(grep -v "learn2steer version" "$a") <(grep -v "learn2steer version" "$b") || { echo "differs: $f"; status=1; }
  elif [[ $f == *report.md ]]; then
    cmp -s <(grep -v -i "seconds\|timing\| s)" "$a") <(grep -v -i "seconds\|timing\| s)" "$b") || { echo "differs: $f"; status=1; }
  else
    cmp -s "$a" "$b" || { echo "differs: $f"; status=1; }
  fi
done < <(cd ref && find . -type f | sed 's|^\./||' | sort)
(cd new && find . -type f | sed 's|^\./||' | sort) | while IFS= read -r f; do
  [ -e "ref/$f" ] || case "$f" in *.lock*|*/settings.json) ;; *) echo "only in this tree: $f";; esac
done
echo "compared $(cd ref && find . -type f | wc -l) files; status $status"
exit $status
