"""From an extraction to artifacts: every method registered with :func:`register_trainer` (L2S in
:mod:`learn2steer.l2s`, CAST in :mod:`learn2steer.cast`; Mean-S and Mean-S(BA) here), trained on the same
inputs, and the P2S targets they share.

The L2S targets are the P2S vectors, with each contrast group multiplied by one scalar (the official
code's rescaling: e.g. consultation vectors brought to the mean norm of decline vectors). The scalars
are computed on the training rows and stored in the L2S artifact, so P2S at test time uses the very same
targets (:func:`target_scales`, :func:`p2s_vectors`).

A call trains what it is asked for (``train``: trainer names) or, asked for nothing, every registered
trainer; each trainer gets the whole :class:`TrainInputs` of the call and reads the settings it has.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, Sequence

import torch

from learn2steer.artifacts import SteeringArtifact
from learn2steer.errors import InvalidInputError
from learn2steer.extraction import Extraction
from learn2steer.predictor import TrainConfig, TrainResult
from learn2steer.vectors import SteeringVector, group_scales, mean_vector, rescale_groups


@dataclass(frozen=True)
class TrainInputs:
    """What every trainer gets from one :func:`train_artifacts` call.

    ``ex``: the (selected) extraction rows; ``common``: the fields every artifact of the call shares (model
    shape, layers, alpha, scope, behaviour, ``training: {"n": rows}``); ``cfg``, ``rescale_group`` and
    ``gate``: the call's settings for a fitted predictor (L2S reads them; a trainer without a network of its
    own ignores them).
    """

    ex: Extraction
    steer_layer: int
    context_layer: int
    common: dict[str, Any]
    cfg: TrainConfig
    rescale_group: str | None = None
    gate: bool = False
    progress: bool = False


@dataclass
class Trained:
    """A trainer's artifact with the gradient-descent fit behind it (its history and validation rows), for a
    trainer that has one to hand back (L2S); a trainer without one returns the artifact alone."""

    artifact: SteeringArtifact
    fit: TrainResult | None = None


Trainer = Callable[[TrainInputs], "SteeringArtifact | Trained | None"]
TRAINERS: dict[str, Trainer] = {}


def register_trainer(name: str, trainer: Trainer) -> Trainer:
    """Make artifact ``name`` trainable by :func:`train_artifacts` (one line in the method's module).

    ``trainer(inputs)`` gets the call's :class:`TrainInputs` and returns the artifact (or a :class:`Trained`),
    or None when the data do not support the method (e.g. CAST without inputs to leave alone).
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


def train_mean(inputs: TrainInputs) -> SteeringArtifact:
    """Mean-S: the mean P2S vector at L* (CAA), one fixed vector for every input."""
    at_layer = SteeringVector({inputs.steer_layer: inputs.ex.z[inputs.steer_layer]})
    return SteeringArtifact(kind="fixed", method="mean", vector=mean_vector(at_layer, inputs.ex.contrasts),
                            **inputs.common)


def train_mean_ba(inputs: TrainInputs) -> SteeringArtifact | None:
    """Mean-S(BA): the mean vector of the single behaviour template (None: the extraction has no BA vectors)."""
    z_ba, layer = inputs.ex.z_ba, inputs.steer_layer
    if z_ba is None or layer not in z_ba:
        return None
    return SteeringArtifact(kind="fixed", method="mean_ba", vector=mean_vector(SteeringVector({layer: z_ba[layer]})),
                            **inputs.common)


register_trainer("mean", train_mean)
register_trainer("mean_ba", train_mean_ba)


def train_artifacts(ex: Extraction, *, steer_layer: int, context_layer: int, cfg: TrainConfig | None = None,
                    rescale_group: str | None = None, alpha: float = 1.0, scope: str = "all",
                    ids: Sequence[str] | None = None, gate: bool = False, progress: bool = True,
                    train: Collection[str] | None = None
                    ) -> tuple[dict[str, SteeringArtifact], TrainResult | None]:
    """The artifacts of (h at L', z at L*): L2S, Mean-S, Mean-S(BA), CAST, ... from the same inputs.

    ``train``: the trainers to run (names in :data:`TRAINERS`; :func:`learn2steer.methods.artifacts_for`
    turns method names into them); None: every registered one. ``gate=True`` also chooses a norm gate for
    L2S on the validation rows (needs ``val_fraction > 0`` and inputs of the zero contrast, which the gate
    learns to leave alone). Returns the artifacts by name and the fit of the trained network (L2S's; None
    when no trainer that ran fits one).
    """
    names = list(TRAINERS) if train is None else list(dict.fromkeys(train))
    unknown = [n for n in names if n not in TRAINERS]
    if unknown:
        raise InvalidInputError(f"no trainer for {', '.join(map(repr, unknown))}; choose from {', '.join(TRAINERS)}")
    if steer_layer not in ex.z:
        raise InvalidInputError(f"steering layer {steer_layer} was not extracted (have {sorted(ex.z)})")
    if context_layer not in ex.h:
        raise InvalidInputError(f"context layer {context_layer} was not extracted (have {sorted(ex.h)})")
    ex = ex.select(ids) if ids is not None else ex
    meta = ex.meta
    # the extraction index's "read" and the artifact's "read_position" both hold the spec's position (on-disk names)
    common: dict[str, Any] = dict(model=meta["model"], hidden_size=meta["hidden_size"],
                                  num_layers=meta["num_layers"], steer_layers=[steer_layer],
                                  read_position=meta["read"], alpha=alpha, scope=scope,
                                  behaviour={"name": meta["behaviour"], "fingerprint": meta["behaviour_fingerprint"],
                                             "spec": ex.behaviour_spec},
                                  training={"n": len(ex.ids)})
    inputs = TrainInputs(ex, steer_layer, context_layer, common, cfg or TrainConfig(), rescale_group, gate, progress)
    arts: dict[str, SteeringArtifact] = {}
    result: TrainResult | None = None
    for name in names:
        out = TRAINERS[name](inputs)
        if isinstance(out, Trained):
            result = result or out.fit
            out = out.artifact
        if out is not None:
            arts[name] = out
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
