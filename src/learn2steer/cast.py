"""CAST: conditional activation steering (Lee et al. 2024, "Programming Refusal with Conditional Activation
Steering"), as one module: its network, how it is trained from a P2S extraction, and its registrations.

CAST steers with one behaviour vector, but only for inputs whose hidden state at a read layer L' meets a
condition: the cosine similarity between the (centred) state and a condition direction is above (or below)
a threshold. It is the closest published relative of L2S: both read the input before deciding; L2S predicts
a vector per input, CAST switches a fixed one on or off. The paper discusses CAST but never measured it.

Trained here from the same extraction rows as L2S, with the behaviour spec's own split of inputs:

* the condition holds for the inputs of the behaviour's decline and defer groups (refuse; refer to an
  expert) and not for the others (answer normally); a behaviour with ``condition_labels`` (text-form POPE:
  "no", steer where the object is absent): the inputs with those labels; a behaviour with neither: the
  inputs with a non-zero contrast;
* condition direction: difference of the two groups' mean hidden states at L' (after subtracting the
  overall mean; the first principal direction of the contrast in IBM's activation-steering library);
* behaviour vector: the mean P2S vector at L* over the inputs the condition holds for;
* comparator and threshold: chosen on held-out rows (balanced accuracy of the condition).

The network is a predictor like L2S's (h at L' -> the vector to add at L*), so the HF engine, the vLLM
plugin, artifacts and grids handle it through the same capability (``reads_context``), unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from learn2steer.artifacts import PredictorKind, SteeringArtifact, register_predictor
from learn2steer.behaviours import ZERO
from learn2steer.errors import IncompatibleArtifactError
from learn2steer.extraction import Extraction
from learn2steer.methods import Method, register_method
from learn2steer.training import TrainInputs, register_trainer


class CASTNet(nn.Module):
    """h -> behaviour where the condition holds, else 0 (``[N, D] -> [N, D]``, float32).

    Everything is a buffer, so the state dict is the whole model: ``condition`` (unit), ``center``,
    ``behaviour``, ``threshold`` and ``greater`` (1: the condition holds when the similarity is above the
    threshold; 0: below).
    """

    condition: torch.Tensor
    center: torch.Tensor
    behaviour: torch.Tensor
    threshold: torch.Tensor
    greater: torch.Tensor

    def __init__(self, d: int) -> None:
        super().__init__()
        self.register_buffer("condition", torch.zeros(d))
        self.register_buffer("center", torch.zeros(d))
        self.register_buffer("behaviour", torch.zeros(d))
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("greater", torch.ones(()))

    @property
    def d_in(self) -> int:
        """Hidden size read."""
        return int(self.condition.shape[0])

    @property
    def d_out(self) -> int:
        """Hidden size written."""
        return int(self.behaviour.shape[0])

    def similarity(self, h: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of each centred row of ``h`` with the condition direction."""
        x = h.float() - self.center
        return (x @ self.condition) / x.norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)

    def holds(self, h: torch.Tensor) -> torch.Tensor:
        """Bool ``[N]``: where the condition holds."""
        sim = self.similarity(h)
        return torch.where(self.greater > 0, sim > self.threshold, sim < self.threshold)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """The behaviour vector for rows whose condition holds, zeros elsewhere."""
        return self.behaviour.expand(h.shape[0], -1) * self.holds(h)[:, None].to(self.behaviour.dtype)


def _balanced_accuracy(pred: torch.Tensor, truth: torch.Tensor) -> float:
    tpr = float((pred & truth).sum()) / max(int(truth.sum()), 1)
    tnr = float((~pred & ~truth).sum()) / max(int((~truth).sum()), 1)
    return (tpr + tnr) / 2


def choose_threshold(sim: torch.Tensor, holds: torch.Tensor) -> tuple[float, bool, float]:
    """(threshold, greater, balanced accuracy): the comparator and threshold that best separate ``holds`` by
    ``sim``; candidates are the midpoints between sorted similarities (ties: the first, 'greater' first)."""
    s = torch.sort(sim).values
    cands = torch.cat([s[:1] - 1e-6, (s[1:] + s[:-1]) / 2, s[-1:] + 1e-6])
    best = (0.0, True, -1.0)
    for greater in (True, False):
        for t in cands.tolist():
            acc = _balanced_accuracy(sim > t if greater else sim < t, holds)
            if acc > best[2]:
                best = (t, greater, acc)
    return best


def fit_cast(h: torch.Tensor, z: torch.Tensor, holds: torch.Tensor, *, val_fraction: float = 0.25, seed: int = 0
             ) -> tuple[CASTNet, dict[str, Any]]:
    """CAST from context states ``h`` [N, D] at L', P2S vectors ``z`` [N, D] at L*, and where the condition
    should hold (bool [N]). A seeded, stratified ``val_fraction`` of each group chooses the threshold (all rows
    when a group is too small to hold one out). Returns the network and its training figures."""
    holds = holds.bool()
    if bool(holds.all()) or not bool(holds.any()):
        raise ValueError("CAST needs inputs on both sides of its condition")
    g = torch.Generator().manual_seed(seed)
    train_mask = torch.ones(len(holds), dtype=torch.bool)
    for group in (holds, ~holds):
        idx = torch.nonzero(group).flatten()
        k = int(len(idx) * val_fraction)
        if len(idx) >= 4 and k >= 1:
            train_mask[idx[torch.randperm(len(idx), generator=g)[:k]]] = False
    val_mask = ~train_mask if bool((~train_mask).any()) else train_mask
    net = CASTNet(h.shape[1])
    ht, yt = h[train_mask].float(), holds[train_mask]
    with torch.no_grad():
        net.center.copy_(ht.mean(0))
        direction = (ht[yt] - net.center).mean(0) - (ht[~yt] - net.center).mean(0)
        net.condition.copy_(direction / direction.norm().clamp_min(torch.finfo(torch.float32).tiny))
        net.behaviour.copy_(z[train_mask][yt].float().mean(0))
        t, greater, acc = choose_threshold(net.similarity(h[val_mask]), holds[val_mask])
        net.threshold.fill_(t)
        net.greater.fill_(1.0 if greater else 0.0)
    figures = {"threshold": t, "comparator": ">" if greater else "<", "condition_balanced_accuracy": acc,
               "threshold_rows": int(val_mask.sum()), "n_train": int(train_mask.sum()),
               "condition_rate_train": float(net.holds(ht).float().mean())}
    return net.eval(), figures


def _describe(net: nn.Module) -> dict[str, Any]:
    assert isinstance(net, CASTNet)
    return {"d": net.d_in}


def _build(cfg: dict[str, Any]) -> nn.Module:
    d = cfg.get("d")
    if not isinstance(d, int) or isinstance(d, bool) or d <= 0:
        raise IncompatibleArtifactError("the cast predictor entry needs a positive integer d")
    return CASTNet(d)


def condition_rows(ex: Extraction) -> torch.Tensor:
    """Bool ``[N]``: the inputs CAST's condition should hold for: those whose label is one of the behaviour's
    ``condition_labels`` (text-form POPE: "no", the object is absent), else those of its decline and defer
    groups (refuse, refer to an expert), else, for a behaviour with neither, those with a non-zero contrast."""
    spec = ex.behaviour_spec or {}
    labels = set(spec.get("condition_labels") or [])
    if labels:
        if len(ex.labels) != len(ex.ids):
            raise IncompatibleArtifactError("this behaviour's CAST condition is on labels, and the extraction has "
                                            "none; extract from a labelled dataset")
        return torch.tensor([lab in labels for lab in ex.labels], dtype=torch.bool)
    groups = set(spec.get("decline_groups") or []) | set(spec.get("defer_groups") or [])
    return torch.tensor([c in groups if groups else c != ZERO for c in ex.contrasts], dtype=torch.bool)


def train_cast(inputs: TrainInputs) -> SteeringArtifact | None:
    """The CAST artifact of an extraction (None when the condition would hold for every input or none)."""
    ex, steer_layer, context_layer, common = inputs.ex, inputs.steer_layer, inputs.context_layer, inputs.common
    holds = condition_rows(ex)
    if bool(holds.all()) or not bool(holds.any()):
        return None
    net, figures = fit_cast(ex.h[context_layer], ex.z[steer_layer], holds)
    meta = ex.meta
    return SteeringArtifact(kind="cast", method="cast", context_layer=context_layer, predictor=net,
                            context_read=str(meta.get("context_read", "prompt_last")),
                            **{**common, "training": {**common.get("training", {}), **figures}})


register_predictor(PredictorKind("cast", describe=_describe, build=_build))
register_method(Method("cast", "CAST", "artifact", "cast",
                       summary="one behaviour vector, applied only where a condition on the input's state holds"))
register_trainer("cast", train_cast)
