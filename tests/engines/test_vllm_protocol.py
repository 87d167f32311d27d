"""The vLLM engine's side of the request format without vLLM: its environment settings and what a running engine
can apply (engines/vllm/protocol.py). These run in the core environment; the engine itself is tested in
``test_vllm.py`` (serving environment)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from helpers import request_registry

from learn2steer.engines.requests import Registry
from learn2steer.engines.vllm.protocol import EngineLimits, check_request, registry_from_env
from learn2steer.errors import InvalidInputError

D, N = 16, 6


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Registry:
    return request_registry(tmp_path_factory.mktemp("arts"), D, N)


LIMITS = EngineLimits(hidden_size=D, num_layers=N, chunked_prefill=False)


def test_what_the_engine_cannot_apply_is_refused(registry) -> None:
    ok = registry.parse({"steer": "l2s"})
    assert ok is not None and not ok.reads_after_writing and ok.read_row(10) == 9
    check_request(ok, LIMITS)
    late = registry.parse({"steer": "late"})  # L'=4 > L*=2: served with a read pass first
    assert late is not None and late.reads_after_writing
    check_request(late, LIMITS)
    back = registry.parse({"steer": "l2s", "l2s_read_back": 3})  # input_last, as the plugin's front end sets it
    assert back is not None and back.read_row(10) == 6
    with pytest.raises(InvalidInputError, match="set by the plugin"):
        registry.parse({"steer": "l2s", "l2s_read_back": -1})
    with pytest.raises(InvalidInputError, match="chunked prefill on"):
        check_request(ok, EngineLimits(hidden_size=D, num_layers=N, chunked_prefill=True))
    gen = registry.parse({"steer": "l2s", "scope": "generated"})
    assert gen is not None
    check_request(gen, EngineLimits(hidden_size=D, num_layers=N, chunked_prefill=True))
    check_request(ok, EngineLimits(hidden_size=D, num_layers=N, chunked_prefill=True, read_ahead=True))
    with pytest.raises(InvalidInputError, match="hidden size 16 and 6 layers; this model has 32 and 6"):
        check_request(ok, EngineLimits(hidden_size=32, num_layers=N, chunked_prefill=False))
    with pytest.raises(InvalidInputError, match="pipeline parallelism"):
        check_request(ok, EngineLimits(hidden_size=D, num_layers=N, chunked_prefill=False, pipeline_parallel=2))


def test_v2_model_runner_refuses_every_steering_request(registry) -> None:
    v2 = EngineLimits(hidden_size=D, num_layers=N, chunked_prefill=False, model_runner_v2=True)
    for name in ("mean", "l2s"):
        req = registry.parse({"steer": name})
        assert req is not None
        with pytest.raises(InvalidInputError, match="VLLM_USE_V2_MODEL_RUNNER=0"):
            check_request(req, v2)


def test_alpha_bound_is_an_operator_setting(registry, monkeypatch) -> None:
    """The default bound (100) admits ordinary strengths; the operator moves it; a bad setting is one sentence."""
    assert registry.max_alpha == 100.0
    for alpha in (100, -100, 0.5, 0):
        req = registry.parse({"steer": "mean", "alpha": alpha})
        assert req is not None and req.alpha == float(alpha)
    strict = Registry(registry.names, allow_paths=False, max_alpha=2.0)
    with pytest.raises(InvalidInputError, match=r"at most 2 on this engine"):
        strict.parse({"steer": "mean", "alpha": 2.5})
    monkeypatch.setenv("L2S_VLLM_MAX_ALPHA", "1e4")
    assert registry_from_env().max_alpha == 1e4
    for bad in ("-1", "inf", "lots"):
        monkeypatch.setenv("L2S_VLLM_MAX_ALPHA", bad)
        with pytest.raises(InvalidInputError, match="L2S_VLLM_MAX_ALPHA|maximum alpha"):
            registry_from_env()


def test_offline_engine_hands_methods_over_without_a_model_card_per_call(tmp_path) -> None:
    """An in-memory method is written once per distinct artifact (tensors + config.json, no README.md) and every
    cell of a grid (another alpha, the gate off) reuses the folder, its settings sent in each request; per-input
    vectors that differ between layers go inline, one per layer."""
    import torch

    from learn2steer import SteeringArtifact
    from learn2steer.behaviours import Example
    from learn2steer.engines.vllm.offline import VLLMEngine
    from learn2steer.methods import MethodConfig
    from learn2steer.predictor import L2SNet
    from learn2steer.vectors import SteeringVector

    engine = VLLMEngine(None, None, "t", D, N)
    engine.workdir = tmp_path
    ex = [Example("a", "hi"), Example("b", "ho")]
    art = SteeringArtifact(kind="l2s", method="l2s", model="t", hidden_size=D, num_layers=N, steer_layers=[2],
                           context_layer=1, predictor=L2SNet(D, D), gate=0.5, strength="relative")
    cells = [MethodConfig.from_artifact(art, alpha=a, gated=g, strength="absolute") for a in (0.5, 2.0) for g in (1, 0)]
    extras = [engine.extra_args(c, ex) for c in cells]
    folders = {x["steer_path"] for e in extras for x in e if x}
    assert len(folders) == 1 and sorted(p.name for p in Path(folders.pop()).iterdir()) == [
        "config.json", "model.safetensors"]
    assert [(e[0]["alpha"], e[0]["gated"], e[0]["strength"]) for e in extras] == [
        (0.5, True, "absolute"), (0.5, False, "absolute"), (2.0, True, "absolute"), (2.0, False, "absolute")]
    fixed = MethodConfig(method="mean", alpha=1.0, vector=SteeringVector({2: torch.ones(D)}))
    assert engine.extra_args(fixed, ex)[0]["steer_path"] == engine.extra_args(replace(fixed, alpha=3.0), ex)[0][
        "steer_path"] and len(list(tmp_path.iterdir())) == 2
    rows = SteeringVector({1: torch.ones(2, D), 3: torch.stack([torch.full((D,), 2.0), torch.full((D,), 3.0)])})
    per = engine.extra_args(MethodConfig(method="p2s", vector=rows, row_ids=["a", "b"]), ex)
    assert per[1]["steer_vector"] == [[1.0] * D, [3.0] * D] and per[1]["steer_layers"] == [1, 3]
    registry = Registry({}, allow_paths=True)
    assert registry.parse(per[1]).vector_at(3) == (3.0,) * D  # type: ignore[union-attr]
    same = engine.extra_args(MethodConfig(method="p2s", vector=SteeringVector({1: torch.ones(2, D), 3: torch.ones(
        2, D)}), row_ids=["a", "b"]), ex)
    assert same[0]["steer_vector"] == [1.0] * D  # one vector for every layer: the 0.3 format
