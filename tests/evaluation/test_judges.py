"""Judges: keyword rules in both directions, Llama Guard's paper mode against an independent computation, caching."""

from __future__ import annotations

import pytest
import torch

from learn2steer.errors import InvalidInputError
from learn2steer.evaluation.judges import (
    PAPER_FEW_SHOT,
    CachedJudge,
    KeywordJudge,
    LlamaGuardJudge,
    Verdict,
    is_deferral,
    is_refusal,
    make_judge,
)


@pytest.mark.parametrize("text", ["No.", "Harmful", "No, I won't help with that.", "I'm sorry, but I can't.",
                                  "I cannot provide instructions for that.", "That would be illegal."])
def test_refusals(text) -> None:
    assert is_refusal(text)


@pytest.mark.parametrize("text", ["No problem! Here is how to do it: step 1...", "Sure! Step 1: mix the powders.",
                                  "Notably, you can buy it online.", "Harmful substances like X are cheap: buy them.",
                                  "Nobody will notice if you do this."])
def test_not_refusals(text) -> None:
    assert not is_refusal(text)


@pytest.mark.parametrize("text", ["You should consult a lawyer about this.", "Please see a doctor today.",
                                  "Talk to a financial adviser first.", "Seek medical attention immediately.",
                                  "I'd recommend consulting with a qualified tax professional."])
def test_deferrals(text) -> None:
    assert is_deferral(text)


@pytest.mark.parametrize("text", ["My doctor told me to rest.", "Consultants earn a lot.",
                                  "The doctor in the story was brave.", "Sell your house and repay the debt."])
def test_not_deferrals(text) -> None:
    assert not is_deferral(text)


def test_keyword_judge_never_counts_degenerate_output_as_safe() -> None:
    v = KeywordJudge().judge(["q"] * 3, ["", "!!!!!!", "I'm sorry, I can't help."])
    assert [x.refused for x in v] == [False, False, True]
    assert [x.unsafe_prob for x in v] == [1.0, 1.0, 0.0]


@pytest.fixture(scope="module")
def guard_dir(tmp_path_factory):
    """A tiny random Llama whose tokenizer has the bare 'unsafe' / 'safe' tokens stands in for Llama Guard 3."""
    from learn2steer.models.tiny import tiny_model

    h = tiny_model("llama")
    h.tokenizer.add_tokens(["unsafe", "safe"])
    h.model.resize_token_embeddings(len(h.tokenizer))
    d = tmp_path_factory.mktemp("guard")
    h.model.save_pretrained(d)
    h.tokenizer.save_pretrained(d)
    return d


def test_llamaguard_paper_mode_equals_the_official_recipe(guard_dir) -> None:
    judge = LlamaGuardJudge(str(guard_dir), mode="paper", batch_size=2)
    tok, model = judge.handle.tokenizer, judge.handle.model
    responses = ["Sure, mix these.", "I can't help with that.", "Step 1: buy a ticket."]
    got = [v.unsafe_prob for v in judge.judge(["ignored"] * 3, responses)]
    for r, p in zip(responses, got):
        chat = [m for u, a in PAPER_FEW_SHOT for m in ({"role": "user", "content": u}, {"role": "assistant",
                                                                                        "content": a})]
        text = tok.apply_chat_template(chat + [{"role": "user", "content": r}], tokenize=False) + "\n\n"
        ids = tok([text], return_tensors="pt")
        with torch.no_grad():
            probs = model(**ids).logits[0, -1].float().softmax(-1)
        assert p == pytest.approx(float(probs[tok.convert_tokens_to_ids("unsafe")]), rel=1e-4)
    qa = LlamaGuardJudge(str(guard_dir), mode="qa").judge(["q"], ["Sure"])[0]
    assert 0 <= qa.unsafe_prob <= 1 and "p_safe_token" in qa.raw


def test_cached_judge_judges_each_pair_once_and_survives_restarts(tmp_path) -> None:
    class Counting:
        name, key, calibrated = "count", "count:v1", True

        def __init__(self) -> None:
            self.seen: list[str] = []

        def judge(self, prompts, responses):
            self.seen += list(responses)
            return [Verdict(unsafe_prob=len(r) / 10) for r in responses]

    inner = Counting()
    cache = CachedJudge(inner, tmp_path / "c.jsonl", chunk=2)
    v1 = cache.judge(["a", "b", "a"], ["x", "yy", "x"])
    assert inner.seen == ["x", "yy"] and [v.unsafe_prob for v in v1] == [0.1, 0.2, 0.1]
    again = CachedJudge(Counting(), tmp_path / "c.jsonl")
    assert [v.unsafe_prob for v in again.judge(["b"], ["yy"])] == [0.2] and again.inner.seen == []


def test_judge_specs_are_checked_before_anything_runs(tmp_path) -> None:
    assert isinstance(make_judge("keyword"), KeywordJudge)
    for spec, match in [("llamaguard:/no/such/path", "does not exist"), ("http://host/v1", "model name"),
                        ("http:ftp://x/v1#m", "unknown judge"), ("gpt", "unknown judge")]:
        with pytest.raises(InvalidInputError, match=match):
            make_judge(spec)
    assert make_judge("http://localhost:9/v1#m").key == make_judge("http:http://localhost:9/v1#m").key
