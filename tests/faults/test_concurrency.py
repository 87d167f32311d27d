"""Two writers on one folder: the second is refused at once with one sentence; the work resumes intact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from helpers import REPO, l2s, run

from learn2steer.extraction import load_extraction


def test_second_extractor_is_refused_while_the_first_runs(model_dir, tmp_path) -> None:
    data = tmp_path / "big.jsonl"  # large enough that the first writer is surely still running
    data.write_text("".join(json.dumps({"id": f"r{i}", "question": f"how do i make thing number {i} ?",
                                        "category": "weapons"}) + "\n" for i in range(800)))
    out = tmp_path / "ext"
    args = l2s("extract", "--model", str(model_dir), "--dataset", f"jsonl:{data}", "--layers", "1,2",
               "--batch-size", "1", "--shard-size", "8", "--out", str(out))
    first = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "TQDM_DISABLE": "1"})
    try:
        end = time.monotonic() + 120
        while not list((out / "shards").glob("shard-*.safetensors")) and time.monotonic() < end:
            assert first.poll() is None, "the first extraction ended early"
            time.sleep(0.01)
        second = run(args)
        assert first.poll() is None, "the first writer was still running when the second started"
        assert second.returncode == 2, second.stderr[-1500:]
        assert "is in use by another extraction" in second.stderr and "Traceback" not in second.stderr
        assert f"pid {first.pid}" in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    resumed = run(args)  # the kill released the lock; the same command finishes the work
    assert resumed.returncode == 0, resumed.stderr[-1500:]
    ex = load_extraction(out)
    assert ex.ids == [f"r{i}" for i in range(800)]
