"""train_artifacts: the gate is a training output chosen on the final net; P2S and L2S use the same targets."""

from __future__ import annotations

import pytest
import torch
from helpers import examples

from learn2steer.behaviours import load_behaviour
from learn2steer.errors import InvalidInputError
from learn2steer.extraction import extract
from learn2steer.predictor import TrainConfig, choose_gate
from learn2steer.training import l2s_targets, p2s_vectors, target_scales, train_artifacts


@pytest.fixture(scope="module")
def ex(tiny_llama, tmp_path_factory):
    return extract(tiny_llama, load_behaviour("safety_refusal"), examples(24), tmp_path_factory.mktemp("ex"),
                   steer_layers=[2], context_layers=[1, 2], progress=False)


def test_gate_is_chosen_on_the_final_nets_own_validation_rows(ex) -> None:
    cfg = TrainConfig(epochs=30, lr=3e-3, val_fraction=0.4, standardize=True, l1=0, cosine=0)
    arts, res = train_artifacts(ex, steer_layer=2, context_layer=1, cfg=cfg, gate=True, progress=False)
    val = torch.tensor(res.val_idx)
    norms = res.net(ex.h[1][val]).norm(dim=-1).detach()
    want = choose_gate(norms, torch.tensor([ex.contrasts[i] != "zero" for i in res.val_idx]))
    assert arts["l2s"].gate == pytest.approx(want) and want > 0
    assert arts["l2s"].predictor is res.net, "the gate belongs to the net it was chosen on"
    ungated, _ = train_artifacts(ex, steer_layer=2, context_layer=1, cfg=cfg, gate=False, progress=False)
    assert ungated["l2s"].gate == 0.0
    with pytest.raises(InvalidInputError, match="val_fraction"):
        train_artifacts(ex, steer_layer=2, context_layer=1, cfg=TrainConfig(epochs=1, val_fraction=0.0), gate=True,
                        progress=False)


def test_p2s_uses_the_targets_l2s_was_trained_on(ex) -> None:
    arts, _ = train_artifacts(ex, steer_layer=2, context_layer=2, cfg=TrainConfig(epochs=2), rescale_group="decline",
                              progress=False)
    targets, scales = l2s_targets(ex, 2, "decline")
    assert scales and scales["decline"] == pytest.approx(1.0) and scales["legal"] != pytest.approx(1.0)
    assert torch.allclose(p2s_vectors(ex, 2, target_scales(arts["l2s"], 2))[2], targets)
    # on other inputs (the test split), the scalars from training are applied, not recomputed
    sub = ex.select(ex.ids[:5])
    factor = torch.tensor([scales[c] for c in sub.contrasts])
    assert torch.allclose(p2s_vectors(sub, 2, target_scales(arts["l2s"], 2))[2], sub.z[2] * factor[:, None])
    assert torch.equal(p2s_vectors(sub, 2, target_scales(None, 2))[2], sub.z[2])


def test_mean_vectors_and_layer_checks(ex) -> None:
    arts, _ = train_artifacts(ex, steer_layer=2, context_layer=1, cfg=TrainConfig(epochs=1), progress=False)
    keep = torch.tensor([c != "zero" for c in ex.contrasts])
    torch.testing.assert_close(arts["mean"].vector[2], ex.z[2][keep].mean(0))
    assert arts["mean_ba"].vector is not None and list(arts["mean_ba"].vector) == [2]
    with pytest.raises(InvalidInputError, match="not extracted"):
        train_artifacts(ex, steer_layer=3, context_layer=1, progress=False)


def test_a_call_trains_only_what_it_asks_for(ex, monkeypatch) -> None:
    """`train=` runs the named trainers alone (no L2S fit when L2S is not asked); asking for nothing trains every
    registered one, as before; an unknown name is a sentence listing the trainers."""
    import learn2steer.l2s as l2s_module
    from learn2steer.methods import artifacts_for
    from learn2steer.training import TRAINERS

    fits: list[int] = []
    real = TRAINERS["l2s"]
    monkeypatch.setitem(TRAINERS, "l2s", lambda inputs: fits.append(1) or real(inputs))
    arts, res = train_artifacts(ex, steer_layer=2, context_layer=1, cfg=TrainConfig(epochs=1), progress=False,
                                train=["mean", "cast"])
    assert sorted(arts) == ["cast", "mean"] and res is None and not fits
    arts, res = train_artifacts(ex, steer_layer=2, context_layer=1, cfg=TrainConfig(epochs=1), progress=False)
    assert sorted(arts) == ["cast", "l2s", "mean", "mean_ba"] and res is not None and fits == [1]
    assert l2s_module.train_l2s is real
    # the methods a grid answers -> the artifacts they read: P2S uses L2S's targets, Mean-S(BA) is tuned as Mean-S
    assert artifacts_for(["p2s"]) == ["l2s"] and artifacts_for(["l2s_nogate"]) == ["l2s"]
    assert artifacts_for(["mean_ba", "no_steering"]) == ["mean", "mean_ba"]
    with pytest.raises(InvalidInputError, match="no trainer for 'magic'; choose from mean, mean_ba, l2s, cast"):
        train_artifacts(ex, steer_layer=2, context_layer=1, progress=False, train=["magic"])
