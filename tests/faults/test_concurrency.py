"""Two writers on one folder: the second is refused at once with one sentence; the first finishes intact."""

from __future__ import annotations

import os
import subprocess
import time

import torch
from helpers import REPO, l2s, run
from safetensors.torch import load_file


def test_second_extractor_is_refused_and_the_first_is_unharmed(model_dir, dataset, tmp_path) -> None:
    out = tmp_path / "ext"
    args = l2s("extract", "--model", str(model_dir), "--dataset", f"jsonl:{dataset}", "--layers", "1,2",
               "--batch-size", "1", "--shard-size", "4", "--out", str(out))
    first = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "TQDM_DISABLE": "1"})
    try:
        end = time.monotonic() + 120
        while not list((out / "shards").glob("shard-*.safetensors")) and time.monotonic() < end:
            assert first.poll() is None, first.stderr.read() if first.stderr else ""
            time.sleep(0.01)
        second = run(args)
        assert second.returncode == 2, second.stderr[-1500:]
        assert "is in use by another extraction" in second.stderr and "Traceback" not in second.stderr
    finally:
        assert first.wait(timeout=300) == 0
    ref = tmp_path / "ref"
    assert run(l2s(*args[3:-1], str(ref))).returncode == 0
    for p in sorted((ref / "shards").glob("shard-*.safetensors")):
        a, b = load_file(str(p)), load_file(str(out / "shards" / p.name))
        assert all(torch.equal(a[k], b[k]) for k in a), p.name
