"""The HF engine: one entry point, L2S same pass == two pass, n answers per example, every generation mode."""

from __future__ import annotations

import pytest
import torch
from helpers import QUESTIONS, examples

from learn2steer.activations import Site, read
from learn2steer.behaviours import load_behaviour
from learn2steer.engines import generate_with
from learn2steer.engines.hf import HFEngine, generate
from learn2steer.errors import InvalidInputError
from learn2steer.extraction import extract
from learn2steer.methods import MethodConfig
from learn2steer.models.prompts import PromptRow, build_inputs
from learn2steer.predictor import TrainConfig
from learn2steer.steering import PredictedVectors, steer
from learn2steer.training import train_artifacts
from learn2steer.vectors import SteeringVector


@pytest.fixture(scope="module")
def trained(tiny_llama, tmp_path_factory):
    return extract(tiny_llama, load_behaviour("safety"), examples(16), tmp_path_factory.mktemp("ex"),
                   steer_layers=[1, 2], context_layers=[1, 2, 3], progress=False)


def _arts(ex, steer_layer, context_layer, alpha=6.0):
    return train_artifacts(ex, steer_layer=steer_layer, context_layer=context_layer, cfg=TrainConfig(epochs=10),
                           alpha=alpha, progress=False)[0]


@pytest.mark.parametrize("context_layer", [1, 2])
def test_same_pass_l2s_equals_two_pass(tiny_llama, trained, context_layer) -> None:
    h = tiny_llama
    net = _arts(trained, 2, context_layer)["l2s"].predictor
    batch = build_inputs(h, [PromptRow(q) for q in QUESTIONS[:4]])
    with steer(h, PredictedVectors(net, context_layer, (2,)), alpha=6.0, scope="all", batch=batch):
        same = generate(h, batch, max_new_tokens=5)
    hx = read(h, batch, [Site(context_layer, "prompt_last")])[Site(context_layer, "prompt_last")]
    with steer(h, SteeringVector({2: net(hx).detach()}), alpha=6.0, scope="all", batch=batch):
        two = generate(h, batch, max_new_tokens=5)
    assert same == two


def test_deeper_context_layer_uses_a_read_pass(tiny_llama, trained) -> None:
    """L' > L*: the engine reads h in a pass stopping at L', then writes g(h) at L*."""
    h = tiny_llama
    art = _arts(trained, 1, 3)["l2s"]
    exs = examples(3)
    got = generate_with(h, MethodConfig.from_artifact(art), exs, max_new_tokens=5, progress=False)
    batch = build_inputs(h, [PromptRow(e.question) for e in exs])
    hx = read(h, batch, [Site(3, "prompt_last")])[Site(3, "prompt_last")]
    with steer(h, SteeringVector({1: art.predictor(hx).detach()}), alpha=6.0, batch=batch):
        want = generate(h, batch, max_new_tokens=5)
    assert got == want
    plain = generate_with(h, MethodConfig(), exs, max_new_tokens=5, progress=False)
    assert got != plain


@pytest.mark.parametrize("scope", ["all", "prompt", "generated"])
@pytest.mark.parametrize("kw", [{"use_cache": False}, {"prefill_chunk_size": 4}])
def test_l2s_answers_are_the_same_in_every_generation_mode(tiny_llama, trained, scope, kw) -> None:
    h = tiny_llama
    cfg = MethodConfig.from_artifact(_arts(trained, 2, 1)["l2s"], scope=scope)
    exs = examples(4)
    want = generate_with(h, cfg, exs, max_new_tokens=5, progress=False)
    assert generate_with(h, cfg, exs, max_new_tokens=5, progress=False, **kw) == want


def test_num_return_sequences_gives_n_answers_per_example(tiny_llama, trained) -> None:
    h = tiny_llama
    cfg = MethodConfig.from_artifact(_arts(trained, 2, 1)["l2s"])
    exs = examples(3)
    torch.manual_seed(0)
    out = generate_with(h, cfg, exs, max_new_tokens=4, num_return_sequences=2, do_sample=True, progress=False,
                        batch_size=2)
    assert len(out) == 3 and all(isinstance(a, list) and len(a) == 2 for a in out)
    greedy = generate_with(h, cfg, exs, max_new_tokens=4, num_return_sequences=1, progress=False)
    assert greedy == [[a] for a in generate_with(h, cfg, exs, max_new_tokens=4, progress=False)]
    # beams: each example's n answers are its own (same as answering it alone)
    beams = generate_with(h, cfg, exs, max_new_tokens=4, num_return_sequences=2, num_beams=2, progress=False)
    alone = [generate_with(h, cfg, [e], max_new_tokens=4, num_return_sequences=2, num_beams=2, progress=False)[0]
             for e in exs]
    assert beams == alone


def test_engine_and_handle_are_the_same_entry_point(tiny_llama, trained) -> None:
    h = tiny_llama
    cfg = MethodConfig.from_artifact(_arts(trained, 2, 2)["mean"])
    exs = examples(5)
    assert generate_with(HFEngine(h), cfg, exs, max_new_tokens=4, progress=False) == generate_with(
        h, cfg, exs, max_new_tokens=4, progress=False, batch_size=2)
    with pytest.raises(InvalidInputError, match="HF engine only"):
        generate_with(HFEngine(h), cfg, exs, do_sample=True)
    assert generate_with(h, cfg, [], progress=False) == []


def test_input_last_reads_the_bare_prompt_and_matches_the_in_prompt_column_on_chatml(tiny_llama, trained) -> None:
    """The engine reads input_last from the bare prompt's own pass; on ChatML that hidden state is the one at the
    user turn's last column of the full prompt (causal attention), so the same-pass read must agree."""
    import dataclasses

    h = tiny_llama
    art = dataclasses.replace(_arts(trained, 2, 1)["l2s"], context_read="input_last")
    exs = examples(3)
    got = generate_with(h, MethodConfig.from_artifact(art), exs, max_new_tokens=5, progress=False)
    batch = build_inputs(h, [PromptRow(e.question) for e in exs], input_last=True)
    with steer(h, PredictedVectors(art.predictor, 1, (2,), position="input_last"), alpha=6.0, batch=batch):
        want = generate(h, batch, max_new_tokens=5)
    assert got == want
    last = generate_with(h, MethodConfig.from_artifact(dataclasses.replace(art, context_read="prompt_last")), exs,
                         max_new_tokens=5, progress=False)
    assert got != last, "input_last and prompt_last read different tokens"
