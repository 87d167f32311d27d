"""The one engine factory: names checked once, the HF engine on a handle, vLLM imported and started only when used.

These run in the core environment (no vLLM); the vLLM engine itself is tested in ``test_vllm.py``.
"""

from __future__ import annotations

import importlib.util

import pytest

from learn2steer import engines
from learn2steer.behaviours import Example
from learn2steer.engines import ENGINES, LazyEngine, generate_with, make_engine
from learn2steer.engines.hf import HFEngine
from learn2steer.errors import InvalidInputError
from learn2steer.methods import MethodConfig
from learn2steer.models.loading import ModelOptions


def test_every_named_engine_has_a_starter_and_an_unknown_name_is_one_sentence() -> None:
    assert set(ENGINES) == set(engines._STARTERS) == {"hf", "vllm"}
    with pytest.raises(InvalidInputError, match="engine must be one of hf, vllm, got 'gpu'"):
        make_engine("gpu", ModelOptions())


def test_hf_answers_with_the_given_handle(tiny_llama) -> None:
    engine = make_engine("hf", ModelOptions(model="unused: the handle is given"), handle=tiny_llama)
    assert isinstance(engine, HFEngine) and engine.handle is tiny_llama


def test_a_lazy_engine_starts_on_its_first_request_only(tiny_llama, monkeypatch) -> None:
    """What lets a resumed `l2s eval --engine vllm` with nothing left to generate never start vLLM."""
    started: list[str] = []

    def start(model: ModelOptions, handle):
        started.append(model.model)
        return HFEngine(handle)

    monkeypatch.setitem(engines._STARTERS, "vllm", start)
    engine = make_engine("vllm", ModelOptions(model="m"), handle=tiny_llama, lazy=True)
    assert isinstance(engine, LazyEngine) and engine.name == "vllm" and engine.model_name == tiny_llama.name
    assert started == [], "nothing started before a request"
    for _ in range(2):
        out = generate_with(engine, MethodConfig(), [Example("a", "hi")], max_new_tokens=2, progress=False)
        assert len(out) == 1
    assert started == ["m"], "started once, on the first request"


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_missing_is_one_sentence_naming_the_fix() -> None:
    with pytest.raises(InvalidInputError, match="needs the serving environment"):
        make_engine("vllm", ModelOptions())
