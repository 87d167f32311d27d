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


def test_position_and_its_old_spelling_read(tmp_path) -> None:
    """``position:`` names where the target is read; ``read:`` (the old spelling) still loads to the same spec,
    stored specs keep the key "read" (so fingerprints do not move), and both at once are refused."""
    head = "name: b\ndefault: a\ncontrasts:\n  a: {suffix: '', positive: 'Y', negative: 'N', "
    specs = {}
    for key in ("position", "read"):
        p = tmp_path / f"{key}.yaml"
        p.write_text(head + f"{key}: turn_end}}\n")
        specs[key] = load_behaviour(p)
    new, old = specs["position"], specs["read"]
    assert new.position == old.position == new.contrasts["a"].position == "turn_end"
    assert new == old and new.fingerprint == old.fingerprint
    assert new.to_dict()["contrasts"]["a"]["read"] == "turn_end" and "position" not in new.to_dict()["contrasts"]["a"]
    assert BehaviourSpec.from_dict(new.to_dict()) == new
    ex = Example("x", "q")
    assert new.pair(ex) == old.pair(ex) and new.pair(ex)[0].close_turn
    p = tmp_path / "both.yaml"
    p.write_text(head + "position: last, read: last}\n")
    with pytest.raises(InvalidInputError, match="both `position` and `read`"):
        load_behaviour(p)
    with pytest.raises(InvalidInputError, match="contrast position must be one of"):
        BehaviourSpec.from_dict({"name": "b", "contrasts": {"a": {"suffix": "", "positive": "Y", "negative": "N",
                                                                  "read": "middle"}}})
