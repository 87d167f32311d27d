"""From an extraction folder to saved artifacts: Mean-S, Mean-S(BA) and the L2S predictor."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from learn2steer.artifacts import SteeringArtifact
from learn2steer.predictor import TrainConfig, TrainResult, fit
from learn2steer.vectors import Extraction, mean_vector, rescale_to_group


def l2s_targets(ex: Extraction, layer: int, rescale_group: str | None) -> torch.Tensor:
    z = ex.z[layer]
    return rescale_to_group(z, ex.contrasts, rescale_group) if rescale_group else z


def train_artifacts(ex: Extraction, *, steer_layer: int, context_layer: int, cfg: TrainConfig | None = None,
                    rescale_group: str | None = None, alpha: float = 1.0, scope: str = "all",
                    ids: Sequence[str] | None = None, progress: bool = True
                    ) -> tuple[dict[str, SteeringArtifact], TrainResult]:
    """Train L2S on (h at L', z at L*) and build the Mean-S / Mean-S(BA) vectors from the same inputs."""
    if steer_layer not in ex.z:
        raise ValueError(f"steering layer {steer_layer} was not extracted (have {sorted(ex.z)})")
    if context_layer not in ex.h:
        raise ValueError(f"context layer {context_layer} was not extracted (have {sorted(ex.h)})")
    ex = ex.select(ids) if ids is not None else ex
    cfg = cfg or TrainConfig()
    targets = l2s_targets(ex, steer_layer, rescale_group)
    result = fit(ex.h[context_layer], targets, cfg, progress=progress)
    meta = ex.meta
    common = dict(model=meta["model"], hidden_size=meta["hidden_size"], num_layers=meta["num_layers"],
                  steer_layers=[steer_layer], read_position=meta["read"], alpha=alpha, scope=scope)
    spec = {"name": meta["behaviour"], "fingerprint": meta["behaviour_fingerprint"], "spec": ex.behaviour_spec}
    arts = {
        "l2s": SteeringArtifact(kind="l2s", method="l2s", context_layer=context_layer, predictor=result.net,
                                behaviour=spec, training={**cfg.to_dict(), **result.summary(), "n": len(ex.ids),
                                                          "rescale_group": rescale_group}, **common),
        "mean": SteeringArtifact(kind="fixed", method="mean", vectors={steer_layer: mean_vector(
            ex.z[steer_layer], ex.contrasts)}, behaviour=spec, training={"n": len(ex.ids)}, **common),
    }
    if steer_layer in ex.z_ba:
        arts["mean_ba"] = SteeringArtifact(kind="fixed", method="mean_ba",
                                           vectors={steer_layer: mean_vector(ex.z_ba[steer_layer])},
                                           behaviour=spec, training={"n": len(ex.ids)}, **common)
    return arts, result


def save_artifacts(arts: dict[str, SteeringArtifact], out_dir: str | Path) -> dict[str, Path]:
    return {name: art.save(Path(out_dir) / name) for name, art in arts.items()}
