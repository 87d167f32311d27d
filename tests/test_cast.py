"""CAST: the condition, the threshold, the artifact kind, training from an extraction, steering on the HF engine."""

from __future__ import annotations

import pytest
import torch
from helpers import examples

from learn2steer.artifacts import SteeringArtifact
from learn2steer.behaviours import load_behaviour
from learn2steer.cast import CASTNet, choose_threshold, fit_cast
from learn2steer.engines import generate_with
from learn2steer.engines.hf import generate
from learn2steer.errors import IncompatibleArtifactError
from learn2steer.extraction import extract
from learn2steer.methods import METHODS, MethodConfig, config_for
from learn2steer.models.prompts import PromptRow, build_inputs
from learn2steer.predictor import TrainConfig
from learn2steer.steering import steer
from learn2steer.training import train_artifacts
from learn2steer.vectors import SteeringVector


def test_threshold_and_comparator_are_the_best_separation() -> None:
    sim = torch.tensor([0.1, 0.2, 0.8, 0.9])
    t, greater, acc = choose_threshold(sim, torch.tensor([False, False, True, True]))
    assert greater and 0.2 < t < 0.8 and acc == 1.0
    t, greater, acc = choose_threshold(sim, torch.tensor([True, True, False, False]))
    assert not greater and 0.2 < t < 0.8 and acc == 1.0
    # overlapping groups: 3 of 4 on each side at best
    t, greater, acc = choose_threshold(torch.tensor([0.1, 0.5, 0.3, 0.9]), torch.tensor([False, False, True, True]))
    assert acc == 0.75


def test_fit_cast_learns_the_condition_and_the_mean_behaviour_vector() -> None:
    g = torch.Generator().manual_seed(0)
    d = 16
    axis = torch.zeros(d)
    axis[3] = 1.0
    holds = torch.tensor([True, False] * 20)
    h = torch.randn(40, d, generator=g) * 0.1 + torch.where(holds[:, None], 2.0, -2.0) * axis + 5.0
    z = torch.randn(40, d, generator=g)
    net, figures = fit_cast(h, z, holds, seed=0)
    assert figures["condition_balanced_accuracy"] == 1.0 and figures["comparator"] == ">"
    assert torch.equal(net.holds(h), holds)
    out = net(h)
    assert torch.equal(out[~holds], torch.zeros_like(out[~holds]))
    assert torch.allclose(out[holds][0], net.behaviour) and net.behaviour.norm() > 0
    assert abs(float(net.condition @ axis)) > 0.99   # the condition direction is the separating axis
    with pytest.raises(ValueError, match="both sides"):
        fit_cast(h, z, torch.ones(40, dtype=torch.bool))


@pytest.fixture(scope="module")
def cast_arts(tiny_llama, tmp_path_factory):
    ex = extract(tiny_llama, load_behaviour("safety"), examples(24), tmp_path_factory.mktemp("ex"),
                 steer_layers=[2], context_layers=[1], progress=False)
    arts, _ = train_artifacts(ex, steer_layer=2, context_layer=1, cfg=TrainConfig(epochs=2), alpha=8.0,
                              progress=False)
    return arts


def test_train_artifacts_makes_a_cast_artifact_that_saves_and_loads(cast_arts, tiny_llama, tmp_path) -> None:
    art = cast_arts["cast"]
    assert art.kind == "cast" and art.reads_context and art.context_layer == 1 and art.steer_layers == [2]
    assert "threshold" in art.training and art.training["n"] == 24
    back = SteeringArtifact.load(art.save(tmp_path / "cast"), tiny_llama)
    h = torch.randn(5, tiny_llama.hidden_size)
    assert torch.equal(back.predict_fn()(h), art.predict_fn()(h))
    cfg = (tmp_path / "cast" / "config.json").read_text().replace('"d": ', '"d": -')
    (tmp_path / "cast" / "config.json").write_text(cfg)
    with pytest.raises(IncompatibleArtifactError, match="positive integer d"):
        SteeringArtifact.load(tmp_path / "cast")


def test_cast_steers_exactly_the_inputs_whose_condition_holds(cast_arts, tiny_llama) -> None:
    """Rows where the condition holds get the behaviour vector (== fixed steering with it); others are untouched."""
    h = tiny_llama
    art = cast_arts["cast"]
    net = art.predictor
    assert isinstance(net, CASTNet)
    exs = examples(8)
    cfg = MethodConfig.from_artifact(art)
    assert cfg.method == "cast" and METHODS["cast"].steers
    got = generate_with(h, cfg, exs, max_new_tokens=5, progress=False)
    plain = generate_with(h, MethodConfig(), exs, max_new_tokens=5, progress=False)
    batch = build_inputs(h, [PromptRow(e.question) for e in exs])
    from learn2steer.activations import Site, read

    holds = net.holds(read(h, batch, [Site(1, "prompt_last")])[Site(1, "prompt_last")])
    assert 0 < int(holds.sum()) < len(exs), "the test needs rows on both sides of the condition"
    with steer(h, SteeringVector({2: net.behaviour.clone()}), alpha=8.0, batch=batch):
        fixed = generate(h, batch, max_new_tokens=5)
    for i in range(len(exs)):
        assert got[i] == (fixed[i] if holds[i] else plain[i]), i
    # the grid's path: config_for finds the trained artifact by the method's registry entry
    assert config_for("cast", alpha=8.0, artifacts=cast_arts).artifact is art


def test_the_vllm_protocol_reads_a_cast_artifact_like_any_predictor(tmp_path) -> None:
    """The engine asks the capability (reads_context), not the kind's name: a CAST artifact is read like L2S."""
    from learn2steer.engines.requests import Registry
    from learn2steer.engines.vllm.protocol import EngineLimits, check_request

    d, n = 16, 6
    cast = SteeringArtifact(kind="cast", method="cast", model="tiny", hidden_size=d, num_layers=n, steer_layers=[3],
                            context_layer=2, predictor=CASTNet(d))
    reg = Registry({"cast": str(cast.save(tmp_path / "cast"))}, allow_paths=False)
    req = reg.parse({"steer": "cast"})
    assert req is not None and req.meta.kind == "cast" and req.meta.reads_context
    assert req.salt([1, 2]) != req.salt([1, 3]), "a predicted vector depends on the whole prompt"
    check_request(req, EngineLimits(hidden_size=d, num_layers=n, chunked_prefill=False))


def test_a_behaviour_s_condition_labels_choose_the_rows_and_change_no_extraction(tiny_llama, tmp_path) -> None:
    """Text-form POPE: CAST's condition holds for the questions whose answer is "no" (condition_labels), and the
    field stays out of the behaviour's fingerprint, so an extraction made before it resumes under it."""
    from dataclasses import replace

    from learn2steer.behaviours import Example
    from learn2steer.cast import condition_rows

    spec = load_behaviour("hallucination_text")
    assert spec.condition_labels == ["no"]
    exs = [Example(f"q{i}", f"Scene: a dog and a cat. Is there a {o} in the scene?", label=lab)
           for i, (o, lab) in enumerate([("dog", "yes"), ("car", "no"), ("cat", "yes"), ("bus", "no")])]
    without = replace(spec, condition_labels=[])
    assert without.fingerprint == spec.fingerprint and without.to_dict() != spec.to_dict()
    extract(tiny_llama, without, exs, tmp_path / "ex", steer_layers=[1], context_layers=[1], progress=False)
    ex = extract(tiny_llama, spec, exs, tmp_path / "ex", steer_layers=[1], context_layers=[1], progress=False)
    assert ex.behaviour_spec is not None and ex.behaviour_spec["condition_labels"] == ["no"], "the index took it"
    assert condition_rows(ex).tolist() == [False, True, False, True]
    with pytest.raises(Exception, match="not among its labels"):
        replace(spec, condition_labels=["maybe"])
