"""The plugin's front-end rules that need no vLLM: where an ``input_last`` request reads.

(The patches themselves run inside vLLM: tests/engines/test_vllm*.py; the per-step plan:
tests/engines/test_vllm_plan.py.)
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from learn2steer import SteeringArtifact
from learn2steer.engines.requests import READ_BACK, Registry
from learn2steer.engines.vllm import plugin
from learn2steer.errors import InvalidInputError
from learn2steer.models.prompts import generation_prompt_ids
from learn2steer.predictor import L2SNet


class _Tokenizer:
    """A chat template that puts ``gen`` after the user turn; one id per character."""

    def __init__(self, gen: str) -> None:
        self.gen = gen

    def apply_chat_template(self, msgs, add_generation_prompt: bool, tokenize: bool) -> str:
        return f"USER: {msgs[-1]['content']}\n" + (self.gen if add_generation_prompt else "")

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return [ord(c) for c in text]


def _ids(text: str) -> list[int]:
    return [ord(c) for c in text]


@pytest.fixture()
def last(tmp_path: Path, monkeypatch) -> None:
    art = SteeringArtifact(kind="l2s", method="l2s", model="t", hidden_size=4, num_layers=3, steer_layers=[1],
                           context_layer=2, context_read="input_last", predictor=L2SNet(4, 4))
    monkeypatch.setattr(plugin._P, "registry", Registry({"last": str(art.save(tmp_path / "last"))}))


def test_each_front_end_finds_its_own_generation_prompt(last) -> None:
    """Two offline engines in one process (two tokenizers, two templates): each input_last request is checked
    against its own model's generation prompt (0.3 kept the first model's for the whole process, so the second
    engine refused every input_last request)."""
    for gen in ("A:", "ASSISTANT:"):
        processor = SimpleNamespace(tokenizer=_Tokenizer(gen))
        sp = SimpleNamespace(skip_reading_prefix_cache=False)
        extra = {"steer": "last"}
        plugin._prepare_read(processor, SimpleNamespace(prompt_token_ids=_ids(f"USER: hi\n{gen}")), sp, extra)
        assert extra[READ_BACK] == len(gen)
        assert sp.skip_reading_prefix_cache, "L' > L*: the whole prompt is computed, never read from the cache"
        with pytest.raises(InvalidInputError, match="generation prompt"):
            plugin._prepare_read(processor, SimpleNamespace(prompt_token_ids=_ids("USER: hi\n")), sp,
                                 {"steer": "last"})


def test_a_template_without_generation_prompt_is_a_sentence() -> None:
    with pytest.raises(InvalidInputError, match="does not append a generation prompt"):
        generation_prompt_ids(_Tokenizer(""))
