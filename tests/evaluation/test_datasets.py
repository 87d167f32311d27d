"""Loaders validate what they read; splits are seeded and never leak images; two datasets never share ids."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from conftest import data_path
from helpers import restored

from learn2steer.behaviours import Example
from learn2steer.errors import InvalidInputError, MissingFileError
from learn2steer.evaluation.datasets import (
    DATASETS,
    LoadContext,
    MmsbOptions,
    by_ids,
    demo_requests,
    image_split,
    load_dataset,
    load_jsonl,
    load_mmsafetybench,
    load_pope,
    namespaced,
    register_dataset,
    stratified_split,
)


def test_real_pope_and_mmsb_files() -> None:
    pope = load_pope(data_path("pope", "coco_pope_adversarial.json"))
    assert len(pope) == 3000 and {e.label for e in pope} == {"yes", "no"} and pope[0].category == "adversarial"
    mm = load_mmsafetybench(data_path("mmsafetybench"))
    assert len(mm) == 1680 and mm[0].question.startswith("Can you")
    tiny = load_mmsafetybench(data_path("mmsafetybench"), tiny=True, images="typo")
    assert len(tiny) == 168 and all(e.image and e.image.endswith(".jpg") for e in tiny)
    with pytest.raises(MissingFileError, match="no sd image"):
        load_mmsafetybench(data_path("mmsafetybench"), images="sd", scenarios=["01-Illegal_Activitiy"])


def test_pope_image_split_has_no_leakage_and_a_question_split_would() -> None:
    pope = load_pope(data_path("pope", "coco_pope_adversarial.json"))
    img = {e.id: e.image for e in pope}
    tr, te = image_split(pope, test_fraction=0.5, seed=0)
    assert not {img[i] for i in tr} & {img[i] for i in te} and len(tr) + len(te) == 3000
    qtr, qte = stratified_split(pope, test_fraction=0.5, seed=0)
    leaked = sum(img[i] in {img[j] for j in qtr} for i in qte)
    assert leaked > 1000, "a question-level split puts most test questions on training images"
    assert image_split(pope, test_fraction=0.5, seed=0) == (tr, te)


def _write(p, rows):
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_generic_jsonl_validation(tmp_path) -> None:
    p = _write(tmp_path / "d.jsonl", [{"question": "hi", "category": "benign"},
                                      {"question": "x", "image": "a.jpg", "label": "Yes"}])
    rows = load_jsonl(p)
    assert rows[0].id == "line-1" and rows[1].image == str((tmp_path / "a.jpg").resolve()) and rows[1].label == "yes"
    for bad, match in [([{"text": ""}], "non-empty 'question'"),
                       ([{"id": "a", "question": "x"}, {"id": "a", "question": "y"}], "duplicate example ids"),
                       ([{"id": "line-2", "question": "x"}, {"question": "y"}], "duplicate example ids"),
                       ([{"question": "x", "image": "../../etc/passwd"}], "outside the image folder"),
                       ([{"question": "x", "image": "/etc/passwd"}], "outside the image folder")]:
        _write(p, bad)
        with pytest.raises(InvalidInputError, match=match):
            load_jsonl(p)
    p.write_text("{oops\n")
    with pytest.raises(InvalidInputError, match=":1: not a JSON object"):
        load_jsonl(p)


def test_pope_rows_are_validated(tmp_path) -> None:
    p = _write(tmp_path / "pope_random.json", [{"question_id": 1, "image": "x.jpg", "text": "t", "label": "Maybe"}])
    with pytest.raises(InvalidInputError, match="must be yes or no"):
        load_pope(p)
    _write(p, [{"question_id": 1, "image": "x.jpg", "text": "t", "label": "yes"}] * 2)
    with pytest.raises(InvalidInputError, match="duplicate"):
        load_pope(p)
    _write(p, [{"question_id": 1, "text": "t", "label": "yes"}])
    with pytest.raises(InvalidInputError, match="'image' is missing"):
        load_pope(p)


def test_limits_and_empty_selections() -> None:
    assert len(load_dataset("demo", limit=5)) == 5
    for bad in (0, -3, True):
        with pytest.raises(InvalidInputError, match="--limit"):
            load_dataset("demo", limit=bad)
    with pytest.raises(InvalidInputError, match=r"^unknown dataset 'pope'; use demo, jsonl:FILE, mmsb:ROOT, "
                                                 r"pope:FILE, chair:IMAGE_DIR, textpope:FILE or textchair:N$"):
        load_dataset("pope")
    with pytest.raises(InvalidInputError, match="unknown dataset 'demo:x'"):
        load_dataset("demo:x")


@pytest.fixture
def dataset_registry():
    with restored(DATASETS) as registry:
        yield registry


@dataclass
class LetterOptions:
    upper: bool = False
    step: int = 1


def test_a_registered_dataset_is_found_by_name_and_gets_its_own_options_whole(dataset_registry) -> None:
    seen: list[LoadContext] = []

    @register_dataset("letters", arg="WORD", options=LetterOptions)
    def letters(arg: str, ctx: LoadContext) -> list[Example]:
        seen.append(ctx)
        text = arg.upper() if ctx.options.upper else arg
        return [Example(str(i), c, category="letter") for i, c in enumerate(text[::ctx.options.step])]

    assert [e.question for e in load_dataset("letters:abc", limit=2, letters_upper=True)] == ["A", "B"]
    assert seen[0].options == LetterOptions(upper=True), "the loader gets its own options, whole"
    assert [e.question for e in load_dataset("letters:abcd", options=LetterOptions(step=2))] == ["a", "c"]
    assert [e.question for e in load_dataset("letters:abcd", options={"letters": {"step": 3}})] == ["a", "d"]
    with pytest.raises(InvalidInputError, match="letters_step"):
        load_dataset("letters:abc", letters_stpe=2)  # a misspelt option is named, with the known ones
    with pytest.raises(InvalidInputError, match=r"textchair:N or letters:WORD$"):
        load_dataset("nope:x")
    with pytest.raises(InvalidInputError, match="unknown dataset 'letters'"):
        load_dataset("letters")


def test_0_3_keyword_spellings_still_load(dataset_registry) -> None:
    seen: list[LoadContext] = []

    @register_dataset("probe", arg="X", options=MmsbOptions, group="mmsb")
    def probe(arg: str, ctx: LoadContext) -> list[Example]:
        seen.append(ctx)
        return [Example("0", arg)]

    load_dataset("probe:x", mmsb_images="typo", tiny=True, question_field="Question")
    assert seen[0].options == MmsbOptions(images="typo", question_field="Question", tiny=True)


def test_stratified_split_and_namespaces() -> None:
    exs = demo_requests()
    a = stratified_split(exs, test_fraction=0.4, seed=0)
    assert a == stratified_split(exs, test_fraction=0.4, seed=0) != stratified_split(exs, test_fraction=0.4, seed=1)
    train, test = a
    cats = {e.id: e.category for e in exs}
    assert {cats[i] for i in train} == {cats[i] for i in test} == {e.category for e in exs}
    ns = namespaced(exs[:2], "train")
    assert [e.id for e in ns] == [f"train:{e.id}" for e in exs[:2]] and ns[0].question == exs[0].question
    with pytest.raises(InvalidInputError, match="not in the dataset"):
        by_ids(exs, ["nope"])


def test_chair_selection_is_the_documented_seeded_sample() -> None:
    import random

    from learn2steer.evaluation.datasets import chair_selection

    names = ["COCO_val2014_000000000042.jpg", "COCO_val2014_000000000007.jpg", "COCO_val2014_000000000512.jpg",
             "COCO_val2014_000000000100.jpg"]
    pool = ["COCO_val2014_000000000007.jpg", "COCO_val2014_000000000042.jpg", "COCO_val2014_000000000100.jpg",
            "COCO_val2014_000000000512.jpg"]  # sorted by hand
    assert chair_selection(names, 2, seed=3) == sorted(random.Random(3).sample(pool, 2))
    assert chair_selection(list(reversed(names)), 2, seed=3) == chair_selection(names, 2, seed=3)
    with pytest.raises(InvalidInputError, match="only 4"):
        chair_selection(names, 5)


def test_chair_config_selects_images_and_asks_the_official_prompt() -> None:
    from learn2steer.evaluation.pipeline import EvalConfig
    from learn2steer.options import build, read_config

    d = data_path("coco", "tsbir_val2014")
    cfg = build(EvalConfig, read_config("llava15_7b_chair.yaml"), {"dataset": f"chair:{d}", "chair_images": 5})
    exs = cfg.load()
    assert len(exs) == 5 and {e.question for e in exs} == {"Describe the image in detail."}
    assert read_config("llava15_7b_chair.yaml")["chair_images"] == 500


def test_the_demo_set_takes_solved_questions_for_base_models() -> None:
    """``--demo-few-shot K``: K solved benign questions (none from the set) before each request, which keeps its
    id and category; the safety demo gives a base model (Gemma-3-270M) 2 and the instruction-tuned one none."""
    from learn2steer.evaluation.datasets import DEMO_SHOTS, DemoOptions
    from learn2steer.evaluation.demo import DemoConfig, demo_eval_config

    plain, shot = demo_requests(), load_dataset("demo", options={"demo": {"few_shot": 2}})
    assert [(e.id, e.category) for e in shot] == [(e.id, e.category) for e in plain]
    for p, s in zip(plain, shot):
        assert s.question.endswith(f"\n\nQuestion: {p.question}") and s.question.count("\nAnswer: ") == 2
    assert not {q for q, _ in DEMO_SHOTS} & {e.question for e in plain}, "a solved question is never a request"
    with pytest.raises(InvalidInputError, match="between 0 and 2"):
        demo_requests(3)
    assert demo_eval_config(DemoConfig(model="gemma3-270m")).demo == DemoOptions(few_shot=2)
    assert demo_eval_config(DemoConfig()).demo == DemoOptions(few_shot=0)
