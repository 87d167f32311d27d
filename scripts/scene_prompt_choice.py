"""Choose the text-form POPE prompt on TRAINING scenes only: unsteered accuracy / yes-ratio per few-shot count.

    .venv/bin/python scripts/scene_prompt_choice.py --model gemma3-270m --train runs/hq/data \
        --gt ../shared/data/chair/coco2014_chair_gt_objects.json.gz --n 90 --out docs/results/scene_prompt_gemma.json

The training questions are those of `l2s data textpope` (non-reserved images); POPE's test files are never read.
Writes one JSON with the figures of each choice and the command's settings.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from learn2steer.engines.hf import generate
from learn2steer.evaluation.datasets import by_ids, stratified_split
from learn2steer.evaluation.metrics import pope_metrics
from learn2steer.evaluation.scenes import SceneOptions, load_textpope
from learn2steer.models.loading import load_model
from learn2steer.models.prompts import PromptRow, build_inputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="default")
    ap.add_argument("--train", required=True, help="a folder of textpope_{random,popular,adversarial}.json")
    ap.add_argument("--gt", required=True)
    ap.add_argument("--n", type=int, default=90, help="training questions (stratified by split)")
    ap.add_argument("--shots", default="0,2,4")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    handle = load_model(a.model)
    res = {"model": handle.name, "train": a.train, "n": a.n, "choices": {}}
    for k in [int(x) for x in a.shots.split(",")]:
        exs = load_textpope(a.train, SceneOptions(gt=a.gt, few_shot=k))
        _, keep = stratified_split(exs, test_fraction=a.n / len(exs), seed=7)
        exs = by_ids(exs, keep)
        t = time.perf_counter()
        answers: list[str] = []
        for i in range(0, len(exs), 16):
            part = exs[i:i + 16]
            answers += generate(handle, build_inputs(handle, [PromptRow(e.question) for e in part]), max_new_tokens=3)
        m = pope_metrics([e.label or "" for e in exs], answers)
        res["choices"][f"few_shot={k}"] = {**m, "seconds": round(time.perf_counter() - t, 1),
                                           "answers_sample": answers[:6]}
        print(k, {x: m[x] for x in ("accuracy", "f1", "yes_ratio")}, flush=True)
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
