"""How well an L2S predictor recovers its P2S targets on a run's held-out rows (and how much the targets cancel).

    .venv/bin/python scripts/target_diagnostics.py RUN/pope 15

Prints, at steering layer L: the mean norm of the training targets against the norm of their mean (Mean-S steers
with the mean: when targets point opposite ways per input, it is short), and on the test rows the cosine between
L2S's prediction and the P2S oracle's vector, the share of rows where it is positive (the prediction points the
oracle's way) and the ratio of norms. Reads RUN/extraction, RUN/split.json and RUN/artifacts/L<L>/l2s.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from learn2steer.artifacts import SteeringArtifact
from learn2steer.extraction import load_extraction


def main() -> None:
    run, layer = Path(sys.argv[1]), int(sys.argv[2])
    ex = load_extraction(run / "extraction")
    split = json.loads((run / "split.json").read_text())
    pos = {i: k for k, i in enumerate(ex.ids)}
    train = [pos[i] for i in split["train"] if i in pos]
    test = [pos[i] for i in split["test"] if i in pos]
    z = ex.z[layer].float()
    art = SteeringArtifact.load(run / "artifacts" / f"L{layer}" / "l2s")
    with torch.no_grad():
        pred = art.predictor(ex.h[art.context_layer][test].float())
    cos = torch.nn.functional.cosine_similarity(pred, z[test], dim=-1)
    out = {"layer": layer, "n_train": len(train), "n_test": len(test),
           "train_mean_target_norm": round(z[train].norm(dim=-1).mean().item(), 3),
           "train_norm_of_mean_target": round(z[train].mean(0).norm().item(), 3),
           "test_cos_l2s_p2s_mean": round(cos.mean().item(), 4),
           "test_share_cos_positive": round((cos > 0).float().mean().item(), 4),
           "test_norm_ratio_l2s_p2s": round((pred.norm(dim=-1) / z[test].norm(dim=-1)).mean().item(), 4)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
