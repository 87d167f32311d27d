"""`l2s serve` over HTTP, as operators run it: a server started for one measurement, and the registry's cost.

``.venv-serve/bin/python -m benchmarks.serve_http --json OUT.json`` serves the embedded SmolLM2-135M-Instruct with a
runtime artifact registry (``--registry``, an admin key in ``$L2S_ADMIN_KEY``) and sends batches of 16 concurrent
chat requests (64 new tokens, ``ignore_eos``), half steered by a start-up L2S artifact and half by a registered one,
variants interleaved, median of paired repetitions:

* ``registry_churn_vs_quiet_b16``: throughput while another client replaces the registered artifact once a second
  (each upload a new version: checked, written, made current; the steered requests that follow load it) over the
  same batch with the registry left alone. Target >= 0.95 (issue #29).
* ``registry_flood_vs_quiet_b16``: the same with replacements back to back, as fast as the server takes them (a
  worst case, no target). The replacements made during each batch are in ``details``.

:func:`served` (start a server, wait for ``/health``, stop it) is shared with ``benchmarks.chunked_read_ahead``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

ADMIN_KEY = "benchmark-admin-key-0123456789"
CHURN_INTERVAL_S = 1.0  # an operator's pace: one replacement a second, each made current at once


def post(url: str, body: dict) -> dict:
    """POST a JSON body, return the JSON answer."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        out: dict = json.loads(r.read())
        return out


@contextmanager
def served(args: list[str], *, env: dict[str, str] | None = None, log_dir: Path | None = None) -> Iterator[str]:
    """``l2s serve ARGS`` on a free local port, bound to every core (as the vLLM benchmarks are); yields its base URL
    once ``/health`` answers, stops it on exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    n = os.cpu_count() or 1
    full_env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": f"0-{n - 1}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
                **(env or {})}
    log_path = (log_dir or Path(tempfile.mkdtemp(prefix="l2s-serve-"))) / "server.log"
    cmd = [sys.executable, "-m", "learn2steer", "serve", *args, "--port", str(port)]
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env)
        base = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    with urllib.request.urlopen(base + "/health", timeout=2):
                        break
                except OSError:
                    if proc.poll() is not None:
                        raise RuntimeError("the server stopped: " + log_path.read_text()[-2000:]) from None
                    time.sleep(1)
            yield base
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def _l2s_folder(root: Path, name: str, seed: int) -> Path:
    """A random L2S artifact for the embedded model (L'=10 -> L*=12: its cost does not depend on what it learnt)."""
    import torch

    from learn2steer.artifacts import SteeringArtifact
    from learn2steer.models.loading import DEFAULT_MODEL_NAME
    from learn2steer.predictor import L2SNet

    torch.manual_seed(seed)
    art = SteeringArtifact(kind="l2s", method="l2s", model=DEFAULT_MODEL_NAME, hidden_size=576, num_layers=30,
                           steer_layers=[12], context_layer=10, predictor=L2SNet(576, 576))
    return Path(art.save(root / name))


def _upload(client: Any, base: str, name: str, folder: Path) -> int:
    """One registry upload through ``client``, an ``httpx.Client`` kept open as an operator's script keeps it: a
    new client per call costs ~18 ms of CPU to build its TLS context, which on this 2-core machine (the client
    runs beside the server) was charged to the server's throughput."""
    files = {p.name: (p.name, p.read_bytes()) for p in sorted(folder.iterdir())
             if p.name in ("config.json", "vectors.safetensors", "model.safetensors")}  # not the model card
    r = client.put(f"{base}/v1/steering/artifacts/{name}", files=files, headers={"X-L2S-Admin-Key": ADMIN_KEY},
                   timeout=120)
    if r.status_code >= 300:
        raise RuntimeError(f"registry upload failed: {r.status_code} {r.text}")
    return r.status_code


def main(reps: int = 5, tokens: int = 64, json_path: Path | None = None) -> dict[str, Any]:
    import httpx

    from learn2steer.evaluation.datasets import demo_requests

    tmp = Path(tempfile.mkdtemp(prefix="l2s-registry-bench-"))
    start_up = _l2s_folder(tmp, "start", 0)
    versions = [_l2s_folder(tmp, f"churn{k}", 1 + k) for k in range(2)]
    args = ["--model", "default", "--artifact", f"fixed_l2s={start_up}", "--registry", str(tmp / "registry"),
            "--served-model-name", "m", "--vllm-args=--max-num-seqs=16"]
    questions = [e.question for e in demo_requests()[:16]]
    with served(args, env={"L2S_ADMIN_KEY": ADMIN_KEY}, log_dir=tmp) as base, httpx.Client() as client:
        _upload(client, base, "churn", versions[0])

        def batch() -> float:
            def one(k: int) -> dict:
                body = {"model": "m", "messages": [{"role": "user", "content": questions[k]}], "max_tokens": tokens,
                        "min_tokens": tokens, "temperature": 0, "ignore_eos": True, "return_token_ids": True,
                        "vllm_xargs": {"steer": "fixed_l2s" if k % 2 else "churn"}}
                return post(base + "/v1/chat/completions", body)

            t = time.perf_counter()
            with ThreadPoolExecutor(len(questions)) as pool:
                outs = list(pool.map(one, range(len(questions))))
            elapsed = time.perf_counter() - t
            assert all(len(o["choices"][0]["token_ids"]) == tokens for o in outs)
            return elapsed

        def churning(interval: float) -> tuple[float, int]:
            stop, done = threading.Event(), [0]

            def loop() -> None:
                while not stop.is_set():
                    _upload(client, base, "churn", versions[(done[0] + 1) % 2])
                    done[0] += 1
                    stop.wait(interval)

            th = threading.Thread(target=loop)
            th.start()
            try:
                return batch(), done[0]
            finally:
                stop.set()
                th.join()

        batch()  # warm-up: both artifacts loaded by the workers
        seconds: dict[str, list[float]] = {"quiet": [], "churn": [], "flood": []}
        changes: dict[str, list[int]] = {"churn": [], "flood": []}
        intervals = {"churn": CHURN_INTERVAL_S, "flood": 0.0}
        names = list(seconds)
        for r in range(reps):
            for variant in names[r % 3:] + names[:r % 3]:  # interleaved, order rotated
                if variant == "quiet":
                    seconds["quiet"].append(batch())
                else:
                    t, n = churning(intervals[variant])
                    seconds[variant].append(t)
                    changes[variant].append(n)
        listing = json.loads(urllib.request.urlopen(urllib.request.Request(
            base + "/v1/steering/artifacts", headers={"X-L2S-Admin-Key": ADMIN_KEY}), timeout=30).read())
    paired = {v: statistics.median(q / c for q, c in zip(seconds["quiet"], seconds[v])) for v in changes}
    out = {"registry_churn_vs_quiet_b16": paired["churn"], "registry_flood_vs_quiet_b16": paired["flood"],
           "details": {"seconds": seconds, "replacements_per_batch": changes, "churn_interval_s": CHURN_INTERVAL_S,
                       "registry_at_end": listing},
           "new_tokens": tokens, "reps": reps, "batch": 16, "cpu_count": os.cpu_count()}
    print(json.dumps({k: v for k, v in out.items() if k != "details"}, indent=1))
    print("replacements per batch:", changes)
    if json_path is not None:
        json_path.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    main(a.reps, a.tokens, a.json)
