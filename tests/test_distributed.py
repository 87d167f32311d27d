"""More than one process: torchrun ranks split the shards and the grid; the outcome equals one process."""

from __future__ import annotations

import json
import sys
import threading
import time

import torch
from helpers import examples, l2s, run
from safetensors import safe_open
from safetensors.torch import load_file

import learn2steer.extraction as extraction
from learn2steer.behaviours import load_behaviour
from learn2steer.distributed import Ranks
from learn2steer.extraction import extract_to, load_extraction, shard_metadata
from learn2steer.models.tiny import tiny_model


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
            "learn2steer", *args]


def test_ranks_deal_work_out_round_robin() -> None:
    assert Ranks(0, 2).mine(list(range(5))) == [0, 2, 4] and Ranks(1, 2).mine(list(range(5))) == [1, 3]
    assert Ranks().mine([1, 2]) == [1, 2] and Ranks().deal([1, 2]) == [1, 2] and Ranks().is_main


class ThreadRanks(Ranks):
    """Two ranks as threads of one process, with a real barrier between them."""

    def __init__(self, rank: int, wall: threading.Barrier) -> None:
        super().__init__(rank, 2)
        object.__setattr__(self, "wall", wall)

    def barrier(self) -> None:
        self.wall.wait(timeout=120)


def test_ranks_deal_shards_from_one_view_of_the_folder(tmp_path, monkeypatch) -> None:
    # the CI failure this pins: rank 0 scanned the folder after rank 1 had already written shard 1, so it dealt
    # the remaining shards differently, shard 2 went to nobody and three were computed twice
    scan = extraction.shard_status

    def slow_scan_on_rank0(path, ids):
        if threading.current_thread().name == "rank0":
            time.sleep(0.3)
        return scan(path, ids)

    monkeypatch.setattr(extraction, "shard_status", slow_scan_on_rank0)
    spec, exs, wall = load_behaviour("safety"), examples(12), threading.Barrier(2)
    models = [tiny_model("llama") for _ in range(2)]  # one each (reads hook the model); built here, not in threads
    done: list[tuple[int, int]] = []
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        try:
            extract_to(models[r], spec, exs, tmp_path, steer_layers=[1], context_layers=[2], batch_size=2,
                       shard_size=2, with_ba=False, progress=False, job=ThreadRanks(r, wall),
                       on_shard=lambda k: done.append((r, k)))
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)
            wall.abort()

    threads = [threading.Thread(target=rank, args=(r,), name=f"rank{r}") for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(done) == sorted((k % 2, k) for k in range(6)), "every shard once, by its own rank"
    assert load_extraction(tmp_path).ids == [e.id for e in exs]


def test_torchrun_extraction_equals_one_process(model_dir, dataset, tmp_path, monkeypatch) -> None:
    # torchrun gives each rank one thread (OMP_NUM_THREADS=1); the single process gets the same, since small
    # matrix products and attention over a KV cache split their sums by thread count (bits differ, not values)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = ["extract", "--model", str(model_dir), "--dataset", f"jsonl:{dataset}", "--layers", "1,2",
            "--context-layers", "3", "--shard-size", "10", "--batch-size", "5"]
    one = run(l2s(*args, "--out", str(tmp_path / "one")))
    assert one.returncode == 0, one.stderr[-2000:]
    two = run(torchrun(*args, "--out", str(tmp_path / "two")))
    assert two.returncode == 0, two.stderr[-3000:]
    shards = sorted((tmp_path / "one" / "shards").glob("shard-*.safetensors"))
    assert len(shards) == 12
    for k, p in enumerate(shards):
        q = tmp_path / "two" / "shards" / p.name
        a, b = load_file(str(p)), load_file(str(q))
        assert a.keys() == b.keys() and all(torch.equal(a[x], b[x]) for x in a), p.name
        with safe_open(str(q), framework="pt") as f:
            assert shard_metadata(f.metadata())["rank"] == k % 2, "each shard computed once, by its rank"
    assert json.loads((tmp_path / "one" / "index.json").read_text()) == json.loads(
        (tmp_path / "two" / "index.json").read_text())


def test_torchrun_eval_grid_equals_one_process(model_dir, dataset, tmp_path) -> None:
    args = ["eval", "--model", str(model_dir), "--dataset", f"jsonl:{dataset}", "--limit", "40", "--behaviour",
            "safety_refusal", "--layers", "1", "--alphas", "2", "--methods", "no_steering,mean,l2s,p2s",
            "--train-epochs", "3", "--max-new-tokens", "5", "--batch-size", "4"]
    one = run(l2s(*args, "--out", str(tmp_path / "one")))
    assert one.returncode == 0, one.stderr[-2000:]
    two = run(torchrun(*args, "--out", str(tmp_path / "two")))
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "results.json").read_text())["cells"]
    b = json.loads((tmp_path / "two" / "results.json").read_text())["cells"]
    assert a == b
    rank1 = list((tmp_path / "two" / "test" / "cells").glob("*/generations.rank1.jsonl"))
    assert rank1, "the second rank generated part of the grid"
