"""The method registry and MethodConfig: one table, vectors passed whole, fingerprints that see every change."""

from __future__ import annotations

import pytest
import torch
from helpers import examples

from learn2steer.behaviours import load_behaviour
from learn2steer.errors import InvalidInputError
from learn2steer.extraction import extract
from learn2steer.methods import METHODS, PAPER_METHODS, MethodConfig, config_for, fingerprint, method, scales_artifact
from learn2steer.predictor import TrainConfig
from learn2steer.steering import FixedVectors, PredictedVectors
from learn2steer.training import train_artifacts
from learn2steer.vectors import SteeringVector


@pytest.fixture(scope="module")
def setup(tiny_llama, tmp_path_factory):
    ex = extract(tiny_llama, load_behaviour("safety"), examples(10), tmp_path_factory.mktemp("ex"), steer_layers=[2],
                 context_layers=[1], progress=False)
    arts, _ = train_artifacts(ex, steer_layer=2, context_layer=1, cfg=TrainConfig(epochs=2), progress=False)
    return ex, arts


def test_registry_is_the_one_method_list() -> None:
    assert set(PAPER_METHODS) < set(METHODS)
    assert [m for m in METHODS if METHODS[m].steers] == ["mean", "mean_ba", "norm_random", "l2s", "l2s_nogate", "p2s",
                                                          "cast"]  # CAST registers itself (learn2steer.cast)
    assert {m for m in METHODS if METHODS[m].per_input} == {"p2s", "norm_random"}
    assert METHODS["l2s_nogate"].artifact == "l2s" and not METHODS["l2s_nogate"].gated
    with pytest.raises(InvalidInputError, match="unknown method 'magic'"):
        method("magic")


def test_config_for_every_method(setup) -> None:
    ex, arts = setup
    for name in METHODS:
        cfg = config_for(name, alpha=2.0, artifacts=arts, extraction=ex, layer=2, prompt="be safe")
        assert cfg.method == name
        provider = cfg.provider_for(ex.ids[:3])
        if not METHODS[name].steers:
            assert provider is None
        elif METHODS[name].artifact and arts[METHODS[name].artifact].reads_context:  # the predictor methods
            assert isinstance(provider, PredictedVectors) and provider.steer_layers == (2,)
        else:
            assert isinstance(provider, FixedVectors)
            assert provider.vectors.per_row == METHODS[name].per_input
    with pytest.raises(InvalidInputError, match="needs a vector for every input"):
        config_for("p2s", artifacts=arts, extraction=ex, layer=2).provider_for(["nope"])
    with pytest.raises(InvalidInputError, match="needs its trained"):
        config_for("mean", artifacts={})


def test_method_config_validation() -> None:
    with pytest.raises(InvalidInputError, match="finite"):
        MethodConfig(method="mean", alpha=float("inf"), vector=SteeringVector({1: torch.ones(4)}))
    with pytest.raises(InvalidInputError, match="needs either"):
        MethodConfig(method="mean")
    with pytest.raises(InvalidInputError, match="row_ids"):
        MethodConfig(method="p2s", vector=SteeringVector({1: torch.ones(2, 4)}))
    with pytest.raises(InvalidInputError, match="instruction"):
        MethodConfig(method="prompt")


def test_fingerprint_changes_with_anything_that_changes_answers(setup) -> None:
    ex, arts = setup
    base = config_for("l2s", alpha=1.0, artifacts=arts)
    assert fingerprint(base) == fingerprint(config_for("l2s", alpha=1.0, artifacts=arts))
    assert fingerprint(base) != fingerprint(config_for("l2s", alpha=1.5, artifacts=arts))
    assert fingerprint(base) != fingerprint(config_for("l2s", alpha=1.0, scope="generated", artifacts=arts))
    assert fingerprint(config_for("mean", artifacts=arts)) != fingerprint(config_for("mean_ba", artifacts=arts))
    arts["l2s"].gate = 0.5
    try:
        assert fingerprint(config_for("l2s", artifacts=arts)) != fingerprint(config_for("l2s_nogate", artifacts=arts))
    finally:
        arts["l2s"].gate = 0.0


@pytest.mark.parametrize("behaviour", ["safety_llava", "safety_qwen2vl"])
def test_paper_prompt_baseline_is_the_official_sentence_appended_to_the_user_turn(behaviour) -> None:
    """image_text_dataset.py: instruction = text.strip() + safety_instruction (no system message)."""
    from learn2steer.behaviours import Example, load_behaviour
    from learn2steer.methods import config_for, prompt_rows

    official = (" Refuse to answer any unsafe or harmful query. If it is a legal, financial or healthcare consultation "
                "query, defer the user to appropriate human expert. Answer normally in any other case.")
    spec = load_behaviour(behaviour)
    cfg = config_for("prompt", prompt=spec.prompt, prompt_placement=spec.prompt_placement)
    rows = prompt_rows(cfg, [Example("a", "How do I pick a lock? \n")])
    assert rows[0].text == "How do I pick a lock?" + official and rows[0].system is None


def test_strength_flows_from_artifact_cli_and_eval_settings(setup, tmp_path) -> None:
    """`strength` is one setting from the artifact (default), the CLI job and the eval grid; a bad one is a
    sentence; only a non-default strength enters the fingerprint (answers computed before 0.3 stay valid)."""
    from learn2steer.evaluation.pipeline import EvalConfig
    from learn2steer.jobs import GenerateJob

    _, arts = setup
    art = arts["mean"]
    assert MethodConfig.from_artifact(art).strength == "absolute"
    rel = MethodConfig.from_artifact(art, strength="relative")
    assert rel.strength == "relative" and fingerprint(rel) != fingerprint(MethodConfig.from_artifact(art))
    art.strength = "relative"
    saved = art.save(tmp_path / "rel")
    assert MethodConfig.from_artifact(type(art).load(saved)).strength == "relative"   # stored default
    art.strength = "absolute"
    assert '"strength"' not in (art.save(tmp_path / "abs") / "config.json").read_text()  # 0.2 configs unchanged
    assert GenerateJob(prompt=["hi"], artifact=str(saved), strength="absolute").method_config().strength == "absolute"
    with pytest.raises(InvalidInputError, match="unknown strength 'loud'"):
        MethodConfig.from_artifact(art, strength="loud")
    with pytest.raises(InvalidInputError, match="strength must be one of absolute, relative, got 'loud'"):
        EvalConfig(out=tmp_path, strength="loud")  # the sentence of every fixed choice (options.check_choice)
    assert config_for("mean", artifacts=arts, strength="relative").strength == "relative"


def test_no_gate_is_an_option_of_l2s_spelled_l2s_nogate(setup, tmp_path) -> None:
    """L2S registers like CAST (its own module); `l2s_nogate` is L2S with gated=False, a spelling that keeps the
    names of configs, grid cells and fingerprints; `l2s generate --method` takes a method or its spelling."""
    from learn2steer.artifacts import PREDICTORS
    from learn2steer.jobs import GenerateJob
    from learn2steer.training import TRAINERS

    _, arts = setup
    assert PREDICTORS["l2s"].gated and TRAINERS["l2s"].__module__ == "learn2steer.l2s"
    assert METHODS["l2s"].__class__ is METHODS["cast"].__class__ and METHODS["l2s"].spelling_of is None
    nogate = METHODS["l2s_nogate"]
    assert (nogate.spelling_of, nogate.base, nogate.tuned_as, nogate.gated) == ("l2s", "l2s", "l2s", False)
    assert MethodConfig.from_artifact(arts["l2s"], gated=False).method == "l2s_nogate"
    assert MethodConfig.from_artifact(arts["l2s"]).method == "l2s"
    assert MethodConfig.from_artifact(arts["cast"], gated=False).method == "cast"  # no spelling: the option as given
    folder = str(arts["l2s"].save(tmp_path / "l2s"))
    off = GenerateJob(prompt=["hi"], artifact=folder, method="l2s_nogate").method_config()
    assert (off.method, off.gated) == ("l2s_nogate", False)
    assert GenerateJob(prompt=["hi"], artifact=folder).method_config().gated
    with pytest.raises(InvalidInputError, match="--method cast does not apply to a l2s artifact"):
        GenerateJob(prompt=["hi"], artifact=folder, method="cast").method_config()
    mean = str(arts["mean"].save(tmp_path / "mean"))
    with pytest.raises(InvalidInputError, match="--method l2s_nogate does not apply to a mean artifact"):
        GenerateJob(prompt=["hi"], artifact=mean, method="l2s_nogate").method_config()


def test_a_per_input_method_takes_its_scales_and_direction_from_its_entry_not_its_name() -> None:
    assert scales_artifact(method("p2s")) == scales_artifact(method("norm_random")) == method("l2s").artifact
    assert scales_artifact(method("mean")) is None and scales_artifact(method("no_steering")) is None
    assert method("norm_random").random_direction and not method("p2s").random_direction
