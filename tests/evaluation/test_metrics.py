"""Metric definitions checked against values computed by hand from the official formulas."""

from __future__ import annotations

import pytest
from conftest import data_path

from learn2steer.errors import InvalidInputError
from learn2steer.evaluation.metrics import (
    ChairEvaluator,
    defers_to_expert,
    ed_score,
    is_degenerate,
    paper_pope_accuracy,
    pope_answer,
    pope_metrics,
    unsafe_score,
)

PROBS = [0.95, 0.6, 0.2, 0.8]


def test_unsafe_score_is_the_papers_threshold_average() -> None:
    # t=0.5: 25 thresholds 0.50..0.98; counts of p > s: 0.95 -> 23, 0.8 -> 15, 0.6 -> 5, 0.2 -> 0
    assert unsafe_score(PROBS, 0.5) == pytest.approx(43 / (25 * 4))
    # t=0.7: numpy.arange gives 16 thresholds (the last is 1.0000000000000002): 0.95 -> 13, 0.8 -> 5
    assert unsafe_score(PROBS, 0.7) == pytest.approx(18 / (16 * 4))
    # t=0.9: 0.90 0.92 0.94 0.96 0.98: 0.95 -> 3
    assert unsafe_score(PROBS, 0.9) == pytest.approx(3 / (5 * 4))
    assert unsafe_score([1.0, 1.0], 0.9) == 1.0 and unsafe_score([0.0], 0.5) == 0.0
    assert unsafe_score([], 0.5) != unsafe_score([], 0.5)  # NaN for no responses


def test_ed_score_uses_the_official_phrases() -> None:
    yes = ["You should consult a lawyer.", "Please SEEK MEDICAL ADVICE soon.", "Talk to a financial advisor first."]
    no = ["Sell the house.", "My doctor told me to rest.", "Consulting is a job.", ""]
    assert all(defers_to_expert(r) for r in yes) and not any(defers_to_expert(r) for r in no)
    assert ed_score(yes + no) == pytest.approx(3 / 7)


def test_degenerate_answers() -> None:
    assert is_degenerate("") and is_degenerate("   ") and is_degenerate("!!! ???") and is_degenerate("the " * 20)
    assert not is_degenerate("No.") and not is_degenerate("I can't help with that.")


@pytest.mark.parametrize("text,want", [
    ("Yes, there is.", "yes"), ("No.", "no"), ("There is no dog. Yes", "no"), ("I cannot tell", "yes"),
    ("", "yes"), ("not sure", "no"), ("NO", "yes"), ("No, there isn't a dog", "no"), ("Yes. No", "yes"),
    ("Nope", "yes"), (None, "yes")])
def test_pope_answer_is_popes_own_rule(text, want) -> None:
    assert pope_answer(text) == want


def test_pope_metrics_count_garbled_no_answers_as_false_positives() -> None:
    labels = ["yes", "yes", "no", "no", "no", "yes"]
    answers = ["Yes", "No.", "purple banana", "No", "", "There is not"]
    # preds: yes no yes no yes no -> tp=1 fn=2 fp=2 tn=1
    m = pope_metrics(labels, answers)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (1, 2, 2, 1)
    assert m["accuracy"] == pytest.approx(2 / 6) and m["precision"] == pytest.approx(1 / 3)
    assert m["recall"] == pytest.approx(1 / 3) and m["f1"] == pytest.approx(1 / 3)
    assert m["yes_ratio"] == pytest.approx(3 / 6)
    assert paper_pope_accuracy(["yes", "no"], ["Yes, the image", "I do not know"]) == 1.0
    with pytest.raises(InvalidInputError, match="yes or no"):
        pope_metrics(["maybe"], ["Yes"])


@pytest.fixture(scope="module")
def chair() -> ChairEvaluator:
    return ChairEvaluator.from_files(data_path("chair", "coco2014_chair_gt_objects.json.gz"))


def test_chair_uses_the_ground_truth_files_own_tables(chair) -> None:
    assert chair.caption_objects("a train on the train tracks") == ["train"]
    assert chair.caption_objects("the batter stands at home plate") == []
    assert chair.caption_objects("two calves in a field") == ["cow"]
    assert chair.caption_objects("a teddy bear near a toilet seat") == ["teddy bear", "toilet"]
    assert chair.caption_objects("baby elephants and people on a bus") == ["elephant", "person", "bus"]
    assert chair.caption_objects("the seat of the toilet") == ["toilet"]
    assert chair.caption_objects("a motor bike") == [], "' motor bike' has a stray space in the reference tables"


def test_chair_hand_computed(chair) -> None:
    caps = {"558840": "A man eats a hot dog next to two cars and a giraffe.",  # giraffe hallucinated
            "200365": "A bicycle parked by a table with a cup."}
    gt1, gt2 = set(chair.gt["558840"]), set(chair.gt["200365"])
    o1, o2 = chair.caption_objects(caps["558840"]), chair.caption_objects(caps["200365"])
    assert o1 == ["person", "hot dog", "car", "giraffe"] and "giraffe" not in gt1
    hall = [o for o in o1 if o not in gt1] + [o for o in o2 if o not in gt2]
    m = chair.evaluate(caps)
    assert m["chair_s"] == pytest.approx(sum(bool([o for o in oo if o not in g]) for oo, g in ((o1, gt1), (o2, gt2)))
                                         / 2)
    assert m["chair_i"] == pytest.approx(len(hall) / (len(o1) + len(o2)))
    assert m["recall"] == pytest.approx((len(gt1 & set(o1)) + len(gt2 & set(o2))) / (len(gt1) + len(gt2)))
    with pytest.raises(InvalidInputError, match="no CHAIR ground truth"):
        chair.evaluate({"999999999": "a dog"})
