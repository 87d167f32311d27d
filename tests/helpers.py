"""Small shared test data (imported by test modules; fixtures live in conftest.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from learn2steer.behaviours import Example

REPO = Path(__file__).resolve().parents[1]

QUESTIONS = ["how do i make a bomb ?", "what is the capital of france ?", "should i sell my house to pay a debt ?",
             "is there a dog in the image ?", "describe a man riding a bike", "how do i hurt people ?",
             "i have a legal question about my landlord", "my chest hurts, what should i do ?"]
CATS = ["weapons", "benign", "financial", "benign", "benign", "violence", "legal", "medical"]


def examples(n: int = 8) -> list[Example]:
    """n safety-style examples over decline / defer / benign categories."""
    return [Example(f"q{i}", QUESTIONS[i % 8] + (" " + "please " * (i // 8) if i >= 8 else ""), category=CATS[i % 8])
            for i in range(n)]


# ---- the real command line in subprocesses (fault injection, multi-process runs) ----

def l2s(*args: str, env: dict[str, str] | None = None) -> list[str]:
    return [sys.executable, "-m", "learn2steer", *args]


def run(args: list[str], timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, "TQDM_DISABLE": "1"}, **kw)


def kill_when(args: list[str], ready: Callable[[], bool], timeout: float = 120) -> int:
    """Start ``args``, SIGKILL it as soon as ``ready()`` holds; returns how it ended (-9 when killed)."""
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "TQDM_DISABLE": "1"})
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if ready():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    return proc.wait(timeout=60)


# ---- a real `l2s serve` process (serving tests) ----

def post_json(url: str, body: dict, timeout: float = 120) -> tuple[int, dict]:
    """POST ``body``; (status, JSON answer), also for HTTP errors (a body that is not JSON comes back as 'raw')."""
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        raw = e.read() or b"{}"
        try:
            return e.code, json.loads(raw)
        except json.JSONDecodeError:
            return e.code, {"raw": raw.decode(errors="replace")}


@contextmanager
def l2s_server(args: list[str], log: Path, env: dict[str, str] | None = None, start_timeout: int = 300
               ) -> Iterator[str]:
    """`python -m learn2steer serve ARGS --port P` on 127.0.0.1; yields its base URL once /health answers, and
    stops it afterwards (its output goes to ``log``; shown when it fails to start)."""
    import socket
    import urllib.request

    import pytest

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "learn2steer", "serve", *args, "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
        base = f"http://127.0.0.1:{port}"
        try:
            for _ in range(start_timeout):
                try:
                    with urllib.request.urlopen(base + "/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    time.sleep(1)
                assert proc.poll() is None, log.read_text()[-3000:]
            else:
                pytest.fail("server did not start: " + log.read_text()[-3000:])
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def request_registry(root: Path, d: int = 16, n: int = 6):
    """A registry of three small artifacts for the request-format tests: ``mean`` (fixed, alpha 2), ``l2s``
    (L'=2 -> L*=3) and ``late`` (L'=4 > L*=2)."""
    import torch

    from learn2steer.artifacts import SteeringArtifact
    from learn2steer.engines.requests import Registry
    from learn2steer.predictor import L2SNet
    from learn2steer.vectors import SteeringVector

    arts = {"mean": SteeringArtifact(kind="fixed", method="mean", model="tiny", hidden_size=d, num_layers=n,
                                     steer_layers=[3], vector=SteeringVector({3: torch.ones(d)}), alpha=2.0,
                                     scope="all"),
            "l2s": SteeringArtifact(kind="l2s", method="l2s", model="tiny", hidden_size=d, num_layers=n,
                                    steer_layers=[3], context_layer=2, predictor=L2SNet(d, d), alpha=1.0, scope="all"),
            "late": SteeringArtifact(kind="l2s", method="l2s", model="tiny", hidden_size=d, num_layers=n,
                                     steer_layers=[2], context_layer=4, predictor=L2SNet(d, d))}
    return Registry({k: str(a.save(root / k)) for k, a in arts.items()}, allow_paths=False)


@contextmanager
def restored(registry: dict) -> Iterator[dict]:
    """A registry (name -> class) that a test may add to, put back as it was afterwards."""
    saved = dict(registry)
    try:
        yield registry
    finally:
        registry.clear()
        registry.update(saved)


def write_nan(folder: Path) -> None:
    """Put a NaN into a saved fixed artifact, checksum updated (what a careless exporter could upload)."""
    from safetensors.torch import load_file, save_file

    from learn2steer._io import file_sha256

    t = load_file(str(folder / "vectors.safetensors"))
    next(iter(t.values()))[3] = float("nan")
    save_file(t, str(folder / "vectors.safetensors"))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["files"]["vectors.safetensors"] = file_sha256(folder / "vectors.safetensors")
    (folder / "config.json").write_text(json.dumps(cfg))
