"""L2S (Learning to Steer, arXiv 2508.12815) as one method module, registered like CAST (:mod:`learn2steer.cast`):
how its artifact stores the predictor, how it is trained from an extraction, and its method entry.

The network and its fit are :mod:`learn2steer.predictor` (``L2SNet``, ``fit``, ``Gated``, ``choose_gate``);
this module wires them in:

* the artifact kind ``l2s``: ``config.json``'s ``predictor`` entry is the net's shape (``d_in``, ``d_out``,
  ``hidden``), and the artifact's norm gate applies to its output (``gated``);
* the trainer ``l2s``: ``g`` fitted on (h at L', the rescaled P2S targets at L*), the per-group scalars and the
  fit's summary recorded in the artifact, and with ``gate`` a norm gate chosen on the validation rows;
* the method ``l2s``, with its gate as an option of the method: ``l2s_nogate`` is the spelling of L2S
  without its gate (``MethodConfig.gated=False``), so configs, grid cells and result files that name it keep
  working.
"""

from __future__ import annotations

from typing import Any

import torch

from learn2steer.artifacts import PredictorKind, SteeringArtifact, register_predictor
from learn2steer.behaviours import ZERO
from learn2steer.errors import IncompatibleArtifactError, InvalidInputError
from learn2steer.methods import Method, Spelling, register_method
from learn2steer.predictor import L2SNet, choose_gate, fit
from learn2steer.training import Trained, TrainInputs, l2s_targets, register_trainer


def _describe(net: torch.nn.Module) -> dict[str, Any]:
    assert isinstance(net, L2SNet)
    return {"d_in": net.d_in, "d_out": net.d_out, "hidden": net.hidden}


def _build(cfg: dict[str, Any]) -> torch.nn.Module:
    if not all(isinstance(cfg.get(k), int) and not isinstance(cfg[k], bool) and cfg[k] > 0
               for k in ("d_in", "d_out", "hidden")):
        raise IncompatibleArtifactError("the predictor entry needs positive integers d_in, d_out, hidden")
    return L2SNet(cfg["d_in"], cfg["d_out"], cfg["hidden"])


def train_l2s(inputs: TrainInputs) -> Trained:
    """Fit ``g`` on (h at L', z at L*) with the call's :class:`~learn2steer.predictor.TrainConfig`, targets
    rescaled to ``rescale_group``; with ``gate``, choose the norm gate on the validation rows the fit held out,
    with the final network's own predictions."""
    ex, cfg, layer, ctx = inputs.ex, inputs.cfg, inputs.steer_layer, inputs.context_layer
    targets, scales = l2s_targets(ex, layer, inputs.rescale_group)
    result = fit(ex.h[ctx], targets, cfg, progress=inputs.progress, labels=ex.labels if cfg.balance_labels else None)
    threshold = 0.0
    if inputs.gate:
        if not result.val_idx:
            raise InvalidInputError("choosing a gate needs validation rows: set val_fraction > 0")
        val = torch.tensor(result.val_idx)
        with torch.no_grad():
            norms = result.net(ex.h[ctx][val]).norm(dim=-1)
        threshold = choose_gate(norms, torch.tensor([ex.contrasts[i] != ZERO for i in result.val_idx]))
    common = inputs.common
    training = {**cfg.to_dict(), **result.summary(), **common["training"], "rescale_group": inputs.rescale_group,
                "group_scales": {str(layer): scales}}
    art = SteeringArtifact(kind="l2s", method="l2s", context_layer=ctx, predictor=result.net,
                           context_read=str(ex.meta.get("context_read", "prompt_last")), gate=threshold,
                           **{**common, "training": training})
    return Trained(art, result)


register_predictor(PredictorKind("l2s", describe=_describe, build=_build, gated=True))
register_method(Method("l2s", "L2S", "artifact", "l2s",
                       summary="the learned predictor g(h) of each input's own vector"),
                Spelling("l2s_nogate", "L2S (no gate)", {"gated": False},
                         summary="L2S without the learned norm gate (the paper's L2S when the artifact has a gate)"))
register_trainer("l2s", train_l2s)
