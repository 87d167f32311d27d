"""The pipeline end to end on tiny LLaVA / Qwen2-VL with real COCO images, and on MM-SafetyBench text."""

from __future__ import annotations

import json

import pytest
from conftest import data_path

from learn2steer.errors import InvalidInputError
from learn2steer.evaluation.datasets import MmsbOptions
from learn2steer.evaluation.pipeline import EvalConfig, run_eval
from learn2steer.evaluation.tasks import ChairOptions
from learn2steer.methods import PAPER_METHODS
from learn2steer.predictor import TrainConfig

FAST = TrainConfig(epochs=3)


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_pope_pipeline_with_images(arch, request, tmp_path) -> None:
    handle = request.getfixturevalue(f"tiny_{arch}")
    root = data_path("pope_style", "resized256")
    images = data_path("coco", "codewithminer_resized")
    vision = handle.model.model.vision_tower if arch == "llava" else handle.model.model.visual
    calls: list[int] = []
    hook = vision.register_forward_hook(lambda m, a, o: calls.append(1))
    cfg = EvalConfig(out=tmp_path, task="pope", dataset=f"pope:{root / 'coco_pope_style_adversarial.json'}",
                     image_dir=str(images), limit=36, layers=[1], alphas=[2.0], train=FAST, test_fraction=0.5,
                     max_new_tokens=4, batch_size=6)
    try:
        res = run_eval(cfg, handle=handle, progress=False)
    finally:
        hook.remove()
    assert calls, "the vision tower ran: images flowed through the pipeline"
    assert sorted(r.cell.method for r in res.results) == sorted(PAPER_METHODS)
    split = json.loads((tmp_path / "split.json").read_text())
    assert split["how"] == "image"
    img = {json.loads(x)["question_id"]: json.loads(x)["image"]
           for x in (root / "coco_pope_style_adversarial.json").read_text().splitlines()}
    assert not {img[int(i)] for i in split["train"]} & {img[int(i)] for i in split["test"]}, "no image on both sides"
    n_test = len(split["test"])
    for r in res.results:
        assert r.metrics["n"] == n_test and 0.0 <= r.metrics["accuracy"] <= 1.0
    table = (tmp_path / "table.md").read_text()
    assert "| l2s | 1 | 2 |" in table and "paper_accuracy" in table
    assert (tmp_path / "plots" / "accuracy.png").stat().st_size > 0
    assert (tmp_path / "plots" / "per_category.png").stat().st_size > 0
    assert "per_category.png" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "artifacts" / "L1" / "l2s" / "model.safetensors").exists()
    scores = (tmp_path / "test" / "cells" / "l2s__L1__a2" / "scores.jsonl").read_text().splitlines()
    assert len(scores) == n_test and {"id", "label", "answer"} <= set(json.loads(scores[0]))
    calls.clear()
    again = run_eval(cfg, handle=handle, progress=False)
    assert [r.metrics for r in again.results] == [r.metrics for r in res.results]
    assert not calls, "resumed: nothing is generated again"


def test_chair_captioning_with_vectors_trained_on_pope(tiny_llava, tmp_path) -> None:
    root = data_path("pope_style", "resized256")
    images = data_path("coco", "codewithminer_resized")
    cfg = EvalConfig(out=tmp_path, task="chair", dataset=f"chair:{images}",
                     train_dataset=f"pope:{root / 'coco_pope_style_random.json'}", image_dir=str(images), limit=4,
                     layers=[2], alphas=[1.0], train=FAST, methods=["no_steering", "mean", "l2s", "p2s"],
                     max_new_tokens=6, batch_size=4,
                     chair=ChairOptions(gt=str(data_path("chair", "coco2014_chair_gt_objects.json.gz"))))
    res = run_eval(cfg, handle=tiny_llava, progress=False)
    assert sorted(r.cell.method for r in res.results) == ["l2s", "mean", "no_steering"], "CHAIR does not admit p2s"
    assert json.loads((tmp_path / "settings.json").read_text())["skipped_methods"] == ["p2s"]
    assert all(r.metrics["n"] == 4 for r in res.results)
    split = json.loads((tmp_path / "split.json").read_text())
    assert all(i.startswith("train:") for i in split["train"]), "ids of the training dataset are namespaced"


def test_safety_eval_on_mmsafetybench_text(tiny_llama, tmp_path) -> None:
    cfg = EvalConfig(out=tmp_path, task="safety", dataset=f"mmsb:{data_path('mmsafetybench')}",
                     mmsb=MmsbOptions(tiny=True), limit=26, layers=[1], alphas=[1.0], train=FAST, max_new_tokens=4,
                     batch_size=13)
    res = run_eval(cfg, handle=tiny_llama, progress=False)
    m = res.by_method()["l2s"].metrics
    assert m["n"] == m["n_decline"] and m["n_other"] == 0  # the first 26 tiny items: scenarios 01 and 02
    assert {"unsafe_rate", "refusal_rate", "ed_score", "degenerate_rate"} <= set(m)
    scores = (tmp_path / "test" / "cells" / "l2s__L1__a1" / "scores.jsonl").read_text().splitlines()
    assert {"refused", "ed", "unsafe_prob", "degenerate"} <= set(json.loads(scores[0]))


def test_selection_chooses_on_training_data_only(tiny_llama, tmp_path) -> None:
    cfg = EvalConfig(out=tmp_path, dataset="demo", limit=60, behaviour="safety_refusal", layers=[1, 2],
                     alphas=[1.0, 4.0], select=True, gate=True,
                     methods=["no_steering", "mean", "mean_ba", "l2s", "p2s"],
                     train=TrainConfig(epochs=3, val_fraction=0.3), max_new_tokens=3, batch_size=16)
    res = run_eval(cfg, handle=tiny_llama, progress=False)
    split = json.loads((tmp_path / "split.json").read_text())
    sel = json.loads((tmp_path / "selection" / "split.json").read_text())
    assert set(sel["fit"]) | set(sel["val"]) == set(split["train"]) and not set(sel["val"]) & set(split["test"])
    assert set(res.chosen) == {"mean", "l2s"}
    by = res.by_method()
    assert (by["mean_ba"].cell.layer, by["mean_ba"].cell.alpha) == res.chosen["mean"]
    assert (by["p2s"].cell.layer, by["p2s"].cell.alpha) == res.chosen["l2s"]
    assert "## Chosen on the training split" in (tmp_path / "report.md").read_text()


def test_config_errors_are_clear(tmp_path) -> None:
    with pytest.raises(InvalidInputError, match="output folder"):
        run_eval(EvalConfig())
    with pytest.raises(InvalidInputError, match="chair-gt"), pytest.MonkeyPatch.context() as mp:
        mp.delenv("L2S_COCO_GT", raising=False)
        EvalConfig(task="chair")
    with pytest.raises(InvalidInputError, match="listed twice"):
        EvalConfig(methods=["l2s", "l2s"])


def test_a_given_l2s_artifact_is_evaluated_and_p2s_keeps_the_trained_targets(tiny_llama, tmp_path) -> None:
    """`--l2s-artifact` (e.g. the paper's predictor): the l2s cell steers with it; P2S is unchanged."""
    import torch

    from learn2steer.artifacts import SteeringArtifact
    from learn2steer.methods import config_for, fingerprint

    base = dict(dataset="demo", train_limit=48, test_limit=24, behaviour="safety_refusal", layers=[1], alphas=[1.0],
                methods=["l2s", "p2s", "mean"], train=FAST, max_new_tokens=3, batch_size=20)
    run_eval(EvalConfig(out=tmp_path / "trained", **base), handle=tiny_llama, progress=False)
    given = SteeringArtifact.load(tmp_path / "trained" / "artifacts" / "L1" / "l2s")
    assert any(abs(s - 1) > 1e-3 for s in given.training["group_scales"]["1"].values()), "targets were rescaled"
    with torch.no_grad():
        given.predictor.decoder.weight.mul_(-3.0)  # another predictor, trained without these targets
    given.training = {}
    given.save(tmp_path / "given")
    run_eval(EvalConfig(out=tmp_path / "with_given", l2s_artifact=str(tmp_path / "given"), **base),
             handle=tiny_llama, progress=False)

    def stamp(run: str, cell: str) -> str:
        return json.loads((tmp_path / run / "test" / "cells" / cell / "cell.json").read_text())["fingerprint"]

    assert stamp("with_given", "l2s__L1__a1") == fingerprint(config_for("l2s", artifacts={
        "l2s": SteeringArtifact.load(tmp_path / "given")}))
    assert stamp("with_given", "l2s__L1__a1") != stamp("trained", "l2s__L1__a1")
    assert stamp("with_given", "p2s__L1__a1") == stamp("trained", "p2s__L1__a1")
    with pytest.raises(InvalidInputError, match="add it to --layers"):
        run_eval(EvalConfig(out=tmp_path / "x", l2s_artifact=str(tmp_path / "given"), **{**base, "layers": [2]}),
                 handle=tiny_llama, progress=False)
    with pytest.raises(InvalidInputError, match="is a fixed artifact; l2s steers with l2s artifacts"):
        run_eval(EvalConfig(out=tmp_path / "y", l2s_artifact=str(tmp_path / "trained" / "artifacts" / "L1" / "mean"),
                            **base), handle=tiny_llama, progress=False)
    # the general spelling: any artifact method, here Mean-S's vector negated; L2S keeps the trained one
    mean = SteeringArtifact.load(tmp_path / "trained" / "artifacts" / "L1" / "mean")
    assert mean.vector is not None
    mean.vector = mean.vector.map(lambda v: -v)
    mean.save(tmp_path / "given_mean")
    run_eval(EvalConfig(out=tmp_path / "with_mean", artifacts=[f"mean={tmp_path / 'given_mean'}"], **base),
             handle=tiny_llama, progress=False)
    assert stamp("with_mean", "mean__L1__a1") == fingerprint(config_for("mean", artifacts={
        "mean": SteeringArtifact.load(tmp_path / "given_mean")}))
    assert stamp("with_mean", "mean__L1__a1") != stamp("trained", "mean__L1__a1")
    assert stamp("with_mean", "l2s__L1__a1") == stamp("trained", "l2s__L1__a1")
    for bad, says in ((["mean"], "METHOD=PATH"), (["prompt=x"], "steers with no trained artifact"),
                      (["cast=x"], "not among --methods"), (["mean=a", "mean=b"], "twice")):
        with pytest.raises(InvalidInputError, match=says):
            EvalConfig(out=tmp_path / "z", artifacts=bad, **base)


def test_text_pope_then_chair_with_pope_s_vectors_and_choices(tiny_llama, tmp_path) -> None:
    """The hallucination demo's shape on a tiny model: text-form POPE trained on `l2s data textpope` questions,
    chosen on training scenes, tested on official questions; CHAIR on scene descriptions reuses its artifacts."""
    from learn2steer.evaluation.scenes import SceneOptions, load_coco_objects, sample_pope, write_pope_files

    gt = str(data_path("chair", "coco2014_chair_gt_objects.json.gz"))
    write_pope_files(tmp_path / "data", sample_pope(load_coco_objects(gt), images=8, seed=0))
    scene = SceneOptions(gt=gt)
    pope = EvalConfig(out=tmp_path / "pope", task="pope", dataset=f"textpope:{data_path('pope')}",
                      train_dataset=f"textpope:{tmp_path / 'data'}", scene=scene, test_limit=12, layers=[1, 2],
                      alphas=[1.0, 2.0], select=True, train=FAST, methods=["no_steering", "mean", "l2s", "p2s"],
                      max_new_tokens=3, batch_size=16)
    res = run_eval(pope, handle=tiny_llama, progress=False)
    assert json.loads((tmp_path / "pope" / "settings.json").read_text())["behaviour"] is None
    assert "hallucination_text" in (tmp_path / "pope" / "extraction" / "index.json").read_text(), "the data's spec"
    assert set(res.by_method()["l2s"].metrics["per_split"]) == {"random", "popular", "adversarial"}
    assert set(res.chosen) == {"mean", "l2s"}
    chair = EvalConfig(out=tmp_path / "chair", task="chair", dataset="textchair:5", scene=scene,
                       chair=ChairOptions(gt=gt), train_dataset=f"textpope:{tmp_path / 'data'}",
                       reuse=tmp_path / "pope", layers=[1, 2], methods=["no_steering", "mean", "l2s", "p2s"],
                       max_new_tokens=4, batch_size=8)
    got = run_eval(chair, handle=tiny_llama, progress=False)
    assert not (tmp_path / "chair" / "extraction").exists(), "reused: nothing extracted or trained"
    by = got.by_method()
    assert (by["l2s"].cell.layer, by["l2s"].cell.alpha) == res.chosen["l2s"] and "p2s" not in by
    assert {"chair_s", "chair_i", "recall", "mean_words"} <= set(by["mean"].metrics)
    with pytest.raises(InvalidInputError, match="per-input extraction"):
        run_eval(EvalConfig(out=tmp_path / "x", task="pope", dataset=f"textpope:{tmp_path / 'data'}", scene=scene,
                            reuse=tmp_path / "pope", layers=[1], methods=["no_steering", "p2s"]), handle=tiny_llama,
                 progress=False)
    with pytest.raises(InvalidInputError, match="chose no layer and alpha for cast"):
        run_eval(EvalConfig(out=tmp_path / "z", task="chair", dataset="textchair:5", scene=scene,
                            chair=ChairOptions(gt=gt), reuse=tmp_path / "pope", layers=[1, 2], methods=["cast"]),
                 handle=tiny_llama, progress=False)
    with pytest.raises(InvalidInputError, match="holds no trained artifacts"):
        run_eval(EvalConfig(out=tmp_path / "y", task="pope", dataset=f"textpope:{tmp_path / 'data'}", scene=scene,
                            reuse=tmp_path / "chair", layers=[1], methods=["mean"]), handle=tiny_llama,
                 progress=False)
