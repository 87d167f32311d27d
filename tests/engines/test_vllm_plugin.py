"""The plugin's front-end rules that need no vLLM: where an ``input_last`` request reads.

(The patches themselves run inside vLLM: tests/engines/test_vllm*.py; the per-step plan:
tests/engines/test_vllm_plan.py.)
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from learn2steer import SteeringArtifact
from learn2steer.engines.requests import READ_BACK, READ_TOKENS, Registry
from learn2steer.engines.vllm import plugin
from learn2steer.errors import InvalidInputError
from learn2steer.models.prompts import input_read
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
    same = SteeringArtifact(kind="l2s", method="l2s", model="t", hidden_size=4, num_layers=3, steer_layers=[1],
                            context_layer=1, context_read="input_last", predictor=L2SNet(4, 4))
    monkeypatch.setattr(plugin._P, "registry", Registry({"last": str(art.save(tmp_path / "last")),
                                                         "same": str(same.save(tmp_path / "same"))}))


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
        input_read(_Tokenizer(""))


def test_llava15_template_reads_its_lone_space_token_in_a_pass_of_its_own(last) -> None:
    """LLaVA-1.5's template and a sentencepiece tokenizer: the official read is the bare prompt's last token, a lone
    "▁" the full prompt merges into "▁ASSISTANT:". The front end asks the worker to put that "▁" where
    "▁ASSISTANT:" is (read_back 0, the last prompt position) in a pass of its own, never from the prefix cache,
    even with L' <= L* (0.3 read the "?" before the generation prompt in the steered pass)."""
    from learn2steer.models.tiny import tiny_model

    tok = tiny_model("llava", real_template=True).tokenizer
    space, assistant = tok.convert_tokens_to_ids(["▁", "▁ASSISTANT:"])
    prompt = tok.encode("USER: is there a dog ? ASSISTANT:", add_special_tokens=False)
    assert prompt[-1] == assistant
    processor = SimpleNamespace(tokenizer=tok)
    sp = SimpleNamespace(skip_reading_prefix_cache=False)
    extra = {"steer": "same", READ_TOKENS: [9]}  # a client's own value is dropped
    plugin._prepare_read(processor, SimpleNamespace(prompt_token_ids=prompt), sp, extra)
    assert (extra[READ_BACK], extra[READ_TOKENS]) == (0, [space])
    assert sp.skip_reading_prefix_cache
    req = plugin.registry().parse(extra)
    assert req is not None and req.reads_in_own_pass and req.read_row(len(prompt)) == len(prompt) - 1
