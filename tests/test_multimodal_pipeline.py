"""The POPE pipeline end to end on VLM architectures with real COCO images (numbers mean nothing)."""

from __future__ import annotations

import json

import pytest
from conftest import data_path

from learn2steer.evaluation import EvalConfig, run_eval
from learn2steer.methods import METHODS


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_pope_pipeline_with_images(arch, request, tmp_path) -> None:
    handle = request.getfixturevalue(f"tiny_{arch}")
    root = data_path("pope_style", "resized256")
    images = data_path("coco", "codewithminer_resized")
    vision = handle.model.model.vision_tower if arch == "llava" else handle.model.model.visual
    calls: list[int] = []
    hook = vision.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        cfg = EvalConfig(task="pope", dataset=f"pope:{root / 'coco_pope_style_adversarial.json'}",
                         image_dir=str(images), behaviour="hallucination", limit=24, layers=[1], alphas=[2.0],
                         epochs=5, test_fraction=0.5, max_new_tokens=4, batch_size=6)
        table = run_eval(cfg, tmp_path, handle=handle, progress=False)
    finally:
        hook.remove()
    assert calls, "the vision tower ran: images flowed through the pipeline"
    records = json.loads((tmp_path / "results.json").read_text())
    assert sorted(r["method"] for r in records) == sorted(METHODS)
    for r in records:
        m = r["metrics"]["all"]
        assert m["n"] == 12 and 0.0 <= m["accuracy"] <= 1.0
    assert "| l2s | 1 | 2 |" in table
    assert (tmp_path / "plots" / "accuracy.png").stat().st_size > 0
    split = json.loads((tmp_path / "split.json").read_text())
    assert len(split["train"]) == len(split["test"]) == 12
    assert (tmp_path / "artifacts" / "L1" / "l2s" / "predictor.safetensors").exists()
    scores = (tmp_path / "cells" / "l2s__L1__a2" / "scores.jsonl").read_text().splitlines()
    assert len(scores) == 12 and {"id", "label", "parsed"} <= set(json.loads(scores[0]))
    # resuming the finished run recomputes nothing and gives the same table
    calls.clear()
    again = run_eval(cfg, tmp_path, handle=handle, progress=False)
    assert again == table and not calls


def test_chair_captioning_with_vectors_trained_on_pope(tiny_llava, tmp_path) -> None:
    """CHAIR: steer captions with vectors learnt on POPE-style questions (p2s/norm_random need labels)."""
    root = data_path("pope_style", "resized256")
    images = data_path("coco", "codewithminer_resized")
    cfg = EvalConfig(task="chair", dataset=f"chair:{images}",
                     train_dataset=f"pope:{root / 'coco_pope_style_random.json'}", image_dir=str(images),
                     behaviour="hallucination", limit=4, layers=[2], alphas=[1.0], epochs=3,
                     methods=["no_steering", "mean", "l2s", "p2s"], max_new_tokens=6, batch_size=4,
                     chair_gt=data_path("chair", "coco2014_chair_gt_objects.json.gz"),
                     chair_synonyms=data_path("chair", "synonyms.txt"))
    with pytest.warns(UserWarning, match="skipped for CHAIR"):
        table = run_eval(cfg, tmp_path, handle=tiny_llava, progress=False)
    records = json.loads((tmp_path / "results.json").read_text())
    assert sorted(r["method"] for r in records) == ["l2s", "mean", "no_steering"]
    assert all(r["metrics"]["n"] == 4 for r in records) and "chair_s" in table


def test_safety_eval_on_mmsafetybench_text(tiny_llama, tmp_path) -> None:
    cfg = EvalConfig(task="safety", dataset=f"mmsb:{data_path('mmsafetybench')}", tiny=True, behaviour="safety",
                     limit=26, layers=[1], alphas=[1.0], epochs=3, max_new_tokens=4, batch_size=13)
    table = run_eval(cfg, tmp_path, handle=tiny_llama, progress=False)
    records = {r["method"]: r["metrics"] for r in json.loads((tmp_path / "results.json").read_text())}
    assert set(records) == set(METHODS)
    m = records["l2s"]
    assert m["n"] == m["n_decline"] == 13 and m["n_benign"] == 0  # the first 26 tiny items: scenarios 01 and 02
    assert 0.0 <= m["unsafe_score"] <= 1.0 and "unsafe_rate" in table
    scores = (tmp_path / "cells" / "l2s__L1__a1" / "scores.jsonl").read_text().splitlines()
    assert {"refused", "deferred", "unsafe_prob"} <= set(json.loads(scores[0]))
