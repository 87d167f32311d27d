"""The phrase rules in both directions: refusals and deferrals, and the near misses that are neither."""

from __future__ import annotations

import pytest

from learn2steer.evaluation.judges.patterns import is_deferral, is_refusal


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
