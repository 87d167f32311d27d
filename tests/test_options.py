"""Config dataclasses from YAML: typed values, lists kept whole, unknown keys named, nested training settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from learn2steer.errors import InvalidInputError, MissingFileError
from learn2steer.evaluation.pipeline import EvalConfig
from learn2steer.evaluation.tasks import SafetyOptions
from learn2steer.jobs import GenerateJob, TrainJob
from learn2steer.options import build, read_config


def test_values_are_typed_and_merged_in_order() -> None:
    cfg = build(EvalConfig, {"layers": [10, 12], "alphas": "0.5,1e-1", "tiny": True, "out": "runs/x",
                             "train": {"lr": "1e-4", "epochs": 7}}, {"train": {"epochs": 9}})
    assert cfg.layers == [10, 12] and cfg.alphas == [0.5, 0.1] and cfg.mmsb.tiny is True and cfg.out == Path("runs/x")
    assert cfg.train.lr == 1e-4 and cfg.train.epochs == 9, "a later layer wins, key by key"
    job = build(GenerateJob, {"prompt": ["hello", "world"]})
    assert job.prompt == ["hello", "world"], "a list stays a list (v0.1 split it into characters)"


@pytest.mark.parametrize("values,match", [
    ({"tiny": "no"}, "key 'tiny' must be true or false, got 'no'"),
    ({"layers": "ten"}, r"key 'layers'\[0\] must be a whole number"),
    ({"limit": 2.5}, "key 'limit' must be a whole number"),
    ({"colour": 1}, "unknown keys \\['colour'\\]"),
    ({"train": {"lr": "fast"}}, "key 'lr' must be a number"),
    ({"train": 3}, "key 'train' must be a mapping"),
    ({"methods": ["l2s", "magic"]}, "unknown method 'magic'"),
    ({"alphas": [float("nan")]}, "alphas must be finite"),
    ({"alphas": [1e308]}, r"alphas must be finite numbers \(in float32\), got \[1e\+308\]"),
    ({"split": "random"}, "key 'split' must be one of auto, category, image, permutation, got 'random'"),
    ({"dtype": "fp8"}, "key 'dtype' must be one of auto, float32, bfloat16, float16"),
])
def test_bad_values_name_the_key(values, match) -> None:
    with pytest.raises(InvalidInputError, match=match):
        build(EvalConfig, values)


def test_train_job_inlines_training_settings() -> None:
    job = build(TrainJob, {"lr": 5e-5, "decoder_init": "svd", "layer": -1})
    assert job.lr == 5e-5 and job.decoder_init == "svd" and job.layer == -1
    with pytest.raises(InvalidInputError, match="epochs"):
        build(TrainJob, {"epochs": 0})


def test_read_config(tmp_path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("layers: [1, 2]\n")
    assert read_config(p) == {"layers": [1, 2]}
    assert read_config("llava15_7b_safety.yaml")["layers"] == [15]
    p.write_text("- a\n")
    with pytest.raises(InvalidInputError, match="must be a mapping"):
        read_config(p)
    p.write_text("a: [1\n")
    with pytest.raises(InvalidInputError, match="not valid YAML"):
        read_config(p)
    with pytest.raises(MissingFileError):
        read_config("nothing.yaml")


@pytest.mark.parametrize("values,match", [
    ({"engine": "gpu"}, "engine must be one of hf, vllm, got 'gpu'"),
    ({"task": "qa"}, "unknown task 'qa'; choose one of safety, pope, chair"),
    ({"scope": "everywhere"}, "scope must be one of all, prompt, generated"),
    ({"split": "random"}, "split must be one of auto, category, image, permutation"),
    ({"dtype": "fp8"}, "dtype must be one of auto, float32, bfloat16, float16"),
])
def test_a_config_built_in_python_checks_the_same_choices(values, match) -> None:
    """`EvalConfig(engine=...)` skips build(); its __post_init__ refuses what build() refuses, in the same words."""
    with pytest.raises(InvalidInputError, match=match):
        EvalConfig(**values)
    with pytest.raises(InvalidInputError, match="engine must be one of hf, vllm"):
        GenerateJob(engine="gpu")  # type: ignore[arg-type]


def test_a_task_option_built_in_python_checks_its_choices_too() -> None:
    with pytest.raises(InvalidInputError, match="rule must be one of auto, paper, paper_strict, clean, all, got"):
        SafetyOptions(rule="strict")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="key .rule. must be one of auto, paper, paper_strict, clean, all"):
        build(EvalConfig, {"safety_rule": "strict"})  # the flat spelling of 0.3 reaches the task's own option
