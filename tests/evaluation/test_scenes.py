"""Text-form POPE / CHAIR: scenes name exactly their image's objects, POPE's sampling rules, reserved images."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
from conftest import data_path

from learn2steer.errors import InvalidInputError, MissingFileError
from learn2steer.evaluation.datasets import image_split, load_dataset
from learn2steer.evaluation.metrics import ChairEvaluator
from learn2steer.evaluation.scenes import (
    SceneOptions,
    description_shots,
    few_shot_block,
    image_id_of,
    is_reserved,
    load_coco_objects,
    load_textchair,
    load_textpope,
    pope_test_images,
    sample_pope,
    scene_question,
    scene_text,
    write_pope_files,
)


@pytest.fixture(scope="module")
def gt() -> str:
    return str(data_path("chair", "coco2014_chair_gt_objects.json.gz"))


def test_a_scene_names_each_object_once_and_never_an_absent_one(gt) -> None:
    """Read back with CHAIR's own word matching, each of 1000 random scenes names exactly its image's objects."""
    coco = load_coco_objects(gt)
    reader = ChairEvaluator.from_files(gt)
    ids = [i for i in random.Random(1).sample(sorted(coco.objects), 1000) if coco.objects[i]]
    synonyms_used = 0
    for i in ids:
        text = coco.scene(i, seed=0)
        assert sorted(reader.caption_objects(text)) == coco.objects[i], (i, text)
        synonyms_used += sum(o not in text for o in coco.objects[i])
    assert synonyms_used > len(ids) // 2, "some objects are named by a synonym, so the task is more than matching"
    canon = scene_text(["person", "dog"], image_id=5, canonical=True, synonyms=coco.synonyms)
    assert "person" in canon and "dog" in canon
    # where synonyms would read otherwise (CHAIR drops "seat" next to "toilet"), the scene falls back to class names
    assert "seat" in scene_text(coco.of(305409), image_id=305409, seed=0, synonyms=coco.synonyms)
    assert coco.scene(305409, seed=0) == scene_text(coco.of(305409), image_id=305409, seed=0, canonical=True)


def test_scenes_are_seeded_and_deterministic(gt) -> None:
    coco = load_coco_objects(gt)
    objs = coco.of(310196)
    a = scene_text(objs, image_id=310196, seed=0, synonyms=coco.synonyms)
    assert a == scene_text(objs, image_id=310196, seed=0, synonyms=coco.synonyms)
    assert a != scene_text(objs, image_id=310196, seed=3, synonyms=coco.synonyms)
    with pytest.raises(InvalidInputError, match="no ground-truth objects"):
        scene_text([], image_id=1)


def test_image_ids_and_questions() -> None:
    assert image_id_of("COCO_val2014_000000310196.jpg") == 310196
    assert image_id_of("COCO_2014_000000000042") == 42 and image_id_of("anything/123.png") == 123
    with pytest.raises(InvalidInputError, match="trailing digits"):
        image_id_of("no-digits.jpg")
    assert scene_question("Is there a car in the image?") == "Is there a car in the scene?"


def test_reserved_images() -> None:
    pope = pope_test_images()
    assert len(pope) == 500 and all(is_reserved(i) for i in pope)
    assert is_reserved(1237) and not is_reserved(1238) or 1238 in pope


def test_sampling_follows_pope_and_never_uses_reserved_images(gt, tmp_path) -> None:
    coco = load_coco_objects(gt)
    qs = sample_pope(coco, images=40, seed=0)
    assert sample_pope(coco, images=40, seed=0) == qs, "seeded"
    freq = Counter(o for v in coco.objects.values() for o in v)
    for rows in qs.values():
        assert len(rows) == 240 and Counter(r["label"] for r in rows) == {"yes": 120, "no": 120}
        for r in rows:
            image, obj = image_id_of(r["image"]), r["text"].split(" a ", 1)[-1].split(" an ", 1)[-1]
            obj = obj.removesuffix(" in the image?")
            assert not is_reserved(image)
            assert (obj in coco.of(image)) == (r["label"] == "yes"), r
    popular_neg = Counter(r["text"] for r in qs["popular"] if r["label"] == "no")
    top = [o for o, _ in freq.most_common(5)]
    assert any(o in t for t in popular_neg for o in top), "popular negatives are frequent objects"
    # adversarial negatives co-occur with the image's objects more than random ones do
    def co(rows: list[dict]) -> float:
        score = 0
        for r in rows:
            if r["label"] == "no":
                image = coco.of(image_id_of(r["image"]))
                obj = r["text"].removeprefix("Is there a ").removeprefix("n ").removesuffix(" in the image?")
                score += sum(obj in v and any(o in v for o in image) for v in list(coco.objects.values())[:20000])
        return score
    assert co(qs["adversarial"]) > co(qs["random"])
    paths = write_pope_files(tmp_path, qs)
    assert sorted(p.name for p in paths) == ["textpope_adversarial.json", "textpope_popular.json",
                                             "textpope_random.json"]
    assert json.loads(paths[0].read_text().splitlines()[0])["question_id"] == 1


def test_textpope_on_the_official_files(gt) -> None:
    pope = data_path("pope")
    one = load_textpope(pope / "coco_pope_random.json", SceneOptions(gt=gt))
    assert len(one) == 3000 and one[0].id == "1" and one[0].category == "random" and one[0].label == "yes"
    assert one[0].image is None and one[0].group == "coco:310196"
    assert "in the scene?" in one[0].question and "image" not in one[0].question
    assert one[0].question.endswith("Answer with just one word, yes or no.")
    every = load_dataset(f"textpope:{pope}", options=SceneOptions(gt=gt))
    assert len(every) == 9000 and {e.id.split(":")[0] for e in every} == {"random", "popular", "adversarial"}
    train, test = image_split(every, test_fraction=0.5, seed=0)
    groups = {e.id: e.group for e in every}
    assert not {groups[i] for i in train} & {groups[i] for i in test}, "an image's questions stay on one side"
    with pytest.raises(MissingFileError, match="scene-gt"), pytest.MonkeyPatch.context() as mp:
        mp.delenv("L2S_COCO_GT", raising=False)
        load_textpope(pope / "coco_pope_random.json")


def test_few_shot_examples_use_other_non_reserved_scenes(gt) -> None:
    coco = load_coco_objects(gt)
    block = few_shot_block(coco, SceneOptions(gt=gt, few_shot=3))
    assert block.count("Scene: ") == 3 and block.count("Answer: Yes") == 2 and block.count("Answer: No") == 1
    assert few_shot_block(coco, SceneOptions(gt=gt)) == ""
    ex = load_textpope(data_path("pope", "coco_pope_random.json"), SceneOptions(gt=gt, few_shot=3))[0]
    assert ex.question.startswith(block) and ex.question.count("Scene: ") == 4
    with pytest.raises(InvalidInputError, match="few_shot"):
        SceneOptions(few_shot=-1)


def test_textchair_describes_pope_test_scenes(gt) -> None:
    exs = load_textchair(20, SceneOptions(gt=gt))
    assert len(exs) == 20 and all(int(e.id) in pope_test_images() for e in exs)
    assert exs == load_textchair(20, SceneOptions(gt=gt)) and exs[0].question.endswith("Describe the scene in detail.")
    reader = ChairEvaluator.from_files(gt)
    perfect = {e.id: e.question for e in exs}  # the scene itself is a description with no hallucination
    assert reader.evaluate(perfect)["chair_s"] == 0.0 and reader.evaluate(perfect)["recall"] == 1.0
    with pytest.raises(InvalidInputError, match="1 to 500"):
        load_textchair(501, SceneOptions(gt=gt))


def test_a_base_model_gets_solved_descriptions_of_other_non_reserved_scenes(gt) -> None:
    coco = load_coco_objects(gt)
    o = SceneOptions(gt=gt, few_shot=2)
    shots = description_shots(coco, o)
    assert description_shots(coco, SceneOptions(gt=gt)) == ""
    blocks = [b for b in shots.split("\n\n") if b]
    assert len(blocks) == 2 and all(b.count("\nAnswer: The scene shows ") == 1 for b in blocks)
    reader = ChairEvaluator.from_files(gt)
    shot_rows = sample_pope(coco, images=2, seed=o.seed + 1, per_image=1)["random"]
    images = sorted({image_id_of(r["image"]) for r in shot_rows})
    for b in blocks:  # each solved answer names exactly its scene's objects, and no reserved image is used
        scene, answer = b.split("\n")[0][len("Scene: "):], b.split("\nAnswer: ")[1]
        image = next(i for i in images if coco.scene(i, seed=o.seed) == scene)
        assert not is_reserved(image) and sorted(reader.caption_objects(answer)) == coco.of(image)
    exs = load_textchair(3, o)
    assert all(e.question.startswith(shots) and e.question.count("Scene: ") == 3 for e in exs)
    assert [e.question[len(shots):] for e in exs] == [e.question for e in load_textchair(3, SceneOptions(gt=gt))]
    with pytest.raises(InvalidInputError, match="number of scenes"):
        load_dataset("textchair:x", options=SceneOptions(gt=gt))
