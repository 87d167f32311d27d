"""How often a trained CAST artifact's condition holds where the behaviour says it should, on a run's test inputs.

    python scripts/cast_condition.py RUN/pope L_PRIME     (e.g. runs/hfull-smol/pope 15)

Reads the run's extraction (the per-input methods extract every distinct test input), its split and
``artifacts/L*/cast``; prints the condition's accuracy and balanced accuracy against the behaviour's
``condition_labels`` on the test inputs (text-form POPE: is the object absent?), and how often it fires.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from learn2steer.artifacts import SteeringArtifact
from learn2steer.cast import CASTNet, _balanced_accuracy, condition_rows
from learn2steer.extraction import load_extraction


def main(run: Path, layer: int) -> dict[str, float]:
    ex = load_extraction(run / "extraction")
    train = set(json.loads((run / "split.json").read_text())["train"])
    test = ex.select([i for i in ex.ids if i not in train])
    arts = (SteeringArtifact.load(p) for p in sorted((run / "artifacts").glob("L*/cast")))
    art = next(a for a in arts if a.context_layer == layer)
    assert isinstance(art.predictor, CASTNet)
    fires = art.predictor.holds(test.h[layer].float())
    truth = condition_rows(test)
    out = {"n": len(test.ids), "accuracy": int((fires == truth).sum()) / len(test.ids),
           "balanced_accuracy": _balanced_accuracy(fires, truth),  # the figure CAST's own fit reports
           "fires": float(fires.float().mean()), "should_fire": float(truth.float().mean())}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main(Path(sys.argv[1]), int(sys.argv[2]))
