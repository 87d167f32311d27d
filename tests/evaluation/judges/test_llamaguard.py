"""Llama Guard's paper mode against an independent computation of the official recipe; qa mode's normalisation."""

from __future__ import annotations

import pytest
import torch

from learn2steer.evaluation.judges.llamaguard import PAPER_FEW_SHOT, LlamaGuardJudge


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
