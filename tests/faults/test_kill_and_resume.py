"""SIGKILL a real `l2s extract` / `l2s eval` at several points; the resumed run equals an uninterrupted one."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import kill_when, l2s, run
from safetensors.torch import load_file


def _shards(d):
    return {p.name: load_file(str(p)) for p in sorted((d / "shards").glob("shard-*.safetensors"))}


@pytest.fixture(scope="module")
def extract_args(model_dir, dataset):
    return ["extract", "--model", str(model_dir), "--dataset", f"jsonl:{dataset}", "--behaviour", "safety",
            "--layers", "1,2", "--context-layers", "3", "--batch-size", "2", "--shard-size", "6"]


@pytest.fixture(scope="module")
def full_extraction(extract_args, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    r = run(l2s(*extract_args, "--out", str(out)))
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.mark.parametrize("after_shards", [0, 9])
def test_killed_extraction_resumes_to_the_same_shards(extract_args, full_extraction, tmp_path, after_shards) -> None:
    out = tmp_path / "ext"
    code = kill_when(l2s(*extract_args, "--out", str(out)),
                     lambda: len(list((out / "shards").glob("shard-*.safetensors"))) >= after_shards
                     and (out / "index.json").exists())
    assert code == -9, "the extraction was killed mid-run"
    r = run(l2s(*extract_args, "--out", str(out)))
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = _shards(full_extraction), _shards(out)
    assert a.keys() == b.keys() and len(a) == 20
    for name in a:
        assert all(torch.equal(a[name][k], b[name][k]) for k in a[name]), name


@pytest.fixture(scope="module")
def eval_args(model_dir, dataset):
    return ["eval", "--model", str(model_dir), "--dataset", f"jsonl:{dataset}", "--limit", "60", "--behaviour",
            "safety_refusal", "--layers", "1", "--alphas", "2,4", "--methods", "no_steering,mean,l2s,p2s",
            "--train-epochs", "3", "--max-new-tokens", "6", "--batch-size", "4"]


@pytest.fixture(scope="module")
def full_eval(eval_args, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    r = run(l2s(*eval_args, "--out", str(out)))
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads((out / "results.json").read_text())


def _lines(out, cell):
    return sum(len(p.read_text().splitlines()) for p in (out / "test" / "cells" / cell).glob("generations*.jsonl"))


@pytest.mark.parametrize("point", ["extraction", "later_cell"])
def test_killed_eval_resumes_to_the_same_results(eval_args, full_eval, tmp_path, point) -> None:
    out = tmp_path / "run"
    ready = {"extraction": lambda: (out / "extraction" / "index.json").exists(),
             "later_cell": lambda: (out / "test" / "cells").exists() and _lines(out, "l2s__L1__a2") >= 4}[point]
    assert kill_when(l2s(*eval_args, "--out", str(out)), ready) == -9
    r = run(l2s(*eval_args, "--out", str(out)))
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads((out / "results.json").read_text())
    assert got["cells"] == full_eval["cells"], "same figures as the uninterrupted run"
    n_test = len(json.loads((out / "split.json").read_text())["test"])
    for cell in (out / "test" / "cells").iterdir():
        ids = [json.loads(x)["id"] for p in cell.glob("generations*.jsonl") for x in p.read_text().splitlines()]
        assert len(ids) == len(set(ids)) == n_test, "every answer once: nothing lost, nothing counted twice"
