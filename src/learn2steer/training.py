"""From an extraction to artifacts: the L2S predictor, Mean-S and Mean-S(BA), and every method registered with
:func:`register_trainer` (CAST), trained on the same inputs.

The L2S targets are the P2S vectors, with each contrast group multiplied by one scalar (the official
code's rescaling: e.g. consultation vectors brought to the mean norm of decline vectors). The scalars
are computed on the training rows and stored in the artifact, so P2S at test time uses the very same
targets. The optional norm gate is a training output: chosen on the validation rows that ``fit`` held
out, with the final network's own predictions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from learn2steer.artifacts import SteeringArtifact
from learn2steer.behaviours import ZERO
from learn2steer.errors import InvalidInputError
from learn2steer.extraction import Extraction
from learn2steer.predictor import TrainConfig, TrainResult, choose_gate, fit
from learn2steer.vectors import SteeringVector, group_scales, mean_vector, rescale_groups

Trainer = Callable[[Extraction, int, int, dict[str, Any]], "SteeringArtifact | None"]
TRAINERS: dict[str, Trainer] = {}


def register_trainer(name: str, trainer: Trainer) -> Trainer:
    """Train one more artifact ``name`` with every :func:`train_artifacts` call, from the same extraction rows.

    ``trainer(ex, steer_layer, context_layer, common)`` gets the (selected) extraction, the layers, and the
    fields every artifact of the call shares (model shape, layers, alpha, scope, behaviour); it returns the
    artifact, or None when the data do not support the method (e.g. CAST without inputs to leave alone).
    """
    TRAINERS[name] = trainer
    return trainer


def l2s_targets(ex: Extraction, layer: int, rescale_group: str | None
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """The training targets at ``layer`` and the per-group scalars applied (empty when not rescaled)."""
    z = ex.z[layer]
    if not rescale_group:
        return z, {}
    scales = group_scales(z, ex.contrasts, rescale_group)
    factor = torch.tensor([scales.get(c, 1.0) for c in ex.contrasts], dtype=z.dtype)
    return z * factor[:, None], scales


def train_artifacts(ex: Extraction, *, steer_layer: int, context_layer: int, cfg: TrainConfig | None = None,
                    rescale_group: str | None = None, alpha: float = 1.0, scope: str = "all",
                    ids: Sequence[str] | None = None, gate: bool = False, progress: bool = True
                    ) -> tuple[dict[str, SteeringArtifact], TrainResult]:
    """Train L2S on (h at L', z at L*) and build the Mean-S / Mean-S(BA) vectors from the same inputs.

    ``gate=True`` also chooses a norm gate for L2S on the validation rows (needs ``val_fraction > 0``
    and inputs of the zero contrast, which the gate learns to leave alone).
    """
    if steer_layer not in ex.z:
        raise InvalidInputError(f"steering layer {steer_layer} was not extracted (have {sorted(ex.z)})")
    if context_layer not in ex.h:
        raise InvalidInputError(f"context layer {context_layer} was not extracted (have {sorted(ex.h)})")
    ex = ex.select(ids) if ids is not None else ex
    cfg = cfg or TrainConfig()
    targets, scales = l2s_targets(ex, steer_layer, rescale_group)
    result = fit(ex.h[context_layer], targets, cfg, progress=progress,
                 labels=ex.labels if cfg.balance_labels else None)
    threshold = 0.0
    if gate:
        if not result.val_idx:
            raise InvalidInputError("choosing a gate needs validation rows: set val_fraction > 0")
        val = torch.tensor(result.val_idx)
        with torch.no_grad():
            norms = result.net(ex.h[context_layer][val]).norm(dim=-1)
        threshold = choose_gate(norms, torch.tensor([ex.contrasts[i] != ZERO for i in result.val_idx]))
    meta = ex.meta
    # the extraction index's "read" and the artifact's "read_position" both hold the spec's position (on-disk names)
    common: dict[str, Any] = dict(model=meta["model"], hidden_size=meta["hidden_size"],
                                  num_layers=meta["num_layers"], steer_layers=[steer_layer],
                                  read_position=meta["read"], alpha=alpha, scope=scope,
                                  behaviour={"name": meta["behaviour"], "fingerprint": meta["behaviour_fingerprint"],
                                             "spec": ex.behaviour_spec})
    n = {"n": len(ex.ids)}
    at_layer = SteeringVector({steer_layer: ex.z[steer_layer]})
    arts = {
        "l2s": SteeringArtifact(kind="l2s", method="l2s", context_layer=context_layer, predictor=result.net,
                                context_read=str(meta.get("context_read", "prompt_last")),
                                gate=threshold, training={**cfg.to_dict(), **result.summary(), **n,
                                                          "rescale_group": rescale_group,
                                                          "group_scales": {str(steer_layer): scales}}, **common),
        "mean": SteeringArtifact(kind="fixed", method="mean", vector=mean_vector(at_layer, ex.contrasts),
                                 training=n, **common),
    }
    if ex.z_ba is not None and steer_layer in ex.z_ba:
        arts["mean_ba"] = SteeringArtifact(kind="fixed", method="mean_ba",
                                           vector=mean_vector(SteeringVector({steer_layer: ex.z_ba[steer_layer]})),
                                           training=n, **common)
    for name, trainer in TRAINERS.items():
        art = trainer(ex, steer_layer, context_layer, {**common, "training": n})
        if art is not None:
            arts[name] = art
    return arts, result


def target_scales(l2s: SteeringArtifact | None, layer: int) -> dict[str, float]:
    """The per-group scalars an L2S artifact's training targets were multiplied by at ``layer`` (empty: none)."""
    if l2s is None:
        return {}
    return dict((l2s.training.get("group_scales") or {}).get(str(layer)) or {})


def p2s_vectors(ex: Extraction, layer: int, scales: Mapping[str, float] | None = None) -> SteeringVector:
    """P2S vectors of ``ex``'s inputs at ``layer``, each contrast group multiplied by its scalar in ``scales``
    (:func:`target_scales` of the L2S trained on the same rows: P2S then uses L2S's very targets)."""
    z = SteeringVector({layer: ex.z[layer]})
    if scales:
        return rescale_groups(z, ex.contrasts, "", scales={layer: scales})
    return z


def save_artifacts(arts: dict[str, SteeringArtifact], out_dir: str | Path) -> dict[str, Path]:
    """Save each artifact in ``out_dir/<method>``."""
    return {name: art.save(Path(out_dir) / name) for name, art in arts.items()}
