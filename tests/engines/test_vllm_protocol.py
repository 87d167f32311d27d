"""The vLLM engine's side of the request format without vLLM: its environment settings and what a running engine
can apply (engines/vllm/protocol.py). These run in the core environment; the engine itself is tested in
``test_vllm.py`` (serving environment)."""

from __future__ import annotations

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
