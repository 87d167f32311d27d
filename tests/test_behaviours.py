"""Behaviour specs: YAML validation with one-line errors, contrasts per category, decline/defer groups."""

from __future__ import annotations

import pytest

from learn2steer.behaviours import BehaviourSpec, Example, load_behaviour
from learn2steer.errors import InvalidInputError, MissingFileError


def test_shipped_specs_and_groups() -> None:
    spec = load_behaviour("safety")
    assert spec.contrast_name(Example("x", "q", category="11-Financial_Advice")) == "financial"
    assert spec.contrast_name(Example("x", "q", category="never-seen")) == "decline"
    assert spec.group("10-Legal_Opinion") == "defer" and spec.group("01-Illegal_Activitiy") == "decline"
    assert spec.group("benign") == "other" and spec.group("13-Gov_Decision") == "decline"
    refusal = load_behaviour("safety_refusal")
    assert refusal.group("benign") == "other" and refusal.group("medical") == "defer"
    with pytest.raises(InvalidInputError, match="needs a label"):
        load_behaviour("hallucination").pair(Example("x", "q"))


@pytest.mark.parametrize("text,match", [
    ("contrasts:\n  a: {suffix: '', positive: 'Y', negative: 'N'}\n", "needs a non-empty `name`"),
    ("name: b\ncontrasts:\n  a: {suffix: '', positive: 'Y {x}', negative: 'N'}\n", "unknown fields \\['x'\\]"),
    ("name: b\ncontrasts:\n  a: {suffix: '', positive: 'Y {', negative: 'N'}\n", "unbalanced braces"),
    ("name: b\ncontrasts:\n  a: {suffix: '', positive: 'Y'}\n", "each contrast needs"),
    ("name: b\ncontrasts: {}\n", "defines no contrasts"),
    ("name: b\ncontrasts:\n  a: {suffix: '', positive: 'Y', negative: 'N'}\ncategories: {c: nope}\n",
     "unknown contrast 'nope'"),
    ("name: b\ncolour: red\ncontrasts:\n  a: {suffix: '', positive: 'Y', negative: 'N'}\n", "unknown keys"),
    ("- just a list\n", "must be a mapping"),
])
def test_bad_specs_give_one_clear_error(tmp_path, text, match) -> None:
    p = tmp_path / "b.yaml"
    p.write_text(text)
    with pytest.raises(InvalidInputError, match=match):
        load_behaviour(p)


def test_loading(tmp_path) -> None:
    with pytest.raises(InvalidInputError, match="unknown behaviour"):
        load_behaviour("kindness")
    with pytest.raises(MissingFileError):
        load_behaviour(tmp_path / "none.yaml")
    p = tmp_path / "b.yaml"
    p.write_text("name: b\ncontrasts:\n  a: {suffix: ' ok?', positive: 'Yes {{literal}}', negative: 'No'}\n"
                 "default: a\n")
    assert load_behaviour(p).pair(Example("x", "q"))[0].completion == "Yes {literal}"
    assert isinstance(BehaviourSpec.from_dict(load_behaviour("safety").to_dict()), BehaviourSpec)
