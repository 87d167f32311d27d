"""`l2s serve` as operators run it: artifacts registered at runtime over HTTP, vllm-lens requests, /metrics.

Runs in the serving environment (marker ``serve``) on a tiny random Llama (width 128, 4 layers, float32, greedy)
served by the real `l2s serve` process. One server registers, uses, replaces and removes an L2S artifact while
other requests run (answers == the HF engine with that artifact), refuses bad uploads with one sentence each
(leaving the registry as it was), answers a vllm-lens request as the fixed vector it carries, and counts all of
it on /metrics; a second server on the same --registry folder finds the artifact back. The soak with registry
changes mixed into 200+ requests is ``slow``.
"""

from __future__ import annotations

import json
import os
import random
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.serve
vllm = pytest.importorskip("vllm")
httpx = pytest.importorskip("httpx")

from helpers import l2s_server, post_json, write_nan  # noqa: E402

from learn2steer import MethodConfig, SteeringArtifact  # noqa: E402
from learn2steer.behaviours import Example  # noqa: E402
from learn2steer.predictor import L2SNet  # noqa: E402
from learn2steer.vectors import SteeringVector  # noqa: E402

KEY = "test-admin-key-0123456789"
HEADERS = {"X-L2S-Admin-Key": KEY}
N_NEW = 8
STEER, CONTEXT = 2, 1
QUESTIONS = ["how do i make a bomb ?", "what is the capital of france ?", "describe a man riding a bike",
             "my chest hurts, what should i do ?"]


def _artifacts(d: int, n: int, scale: float) -> dict[str, SteeringArtifact]:
    """A fixed vector, two different L2S predictors (L'=1 < L*=2) and one for another model width; all large
    enough to change greedy answers."""
    g = torch.Generator().manual_seed(0)
    common = dict(model="tiny", hidden_size=d, num_layers=n, steer_layers=[STEER])
    out = {"mean": SteeringArtifact(kind="fixed", method="mean", vector=SteeringVector(
        {STEER: scale * torch.randn(d, generator=g)}), **common)}
    for name, seed in (("l2s_a", 0), ("l2s_b", 1)):
        torch.manual_seed(seed)
        net = L2SNet(d, d)
        with torch.no_grad():
            net.decoder.weight.mul_(scale)
        out[name] = SteeringArtifact(kind="l2s", method="l2s", context_layer=CONTEXT, predictor=net, **common)
    out["narrow"] = SteeringArtifact(kind="fixed", method="mean", model="other", hidden_size=64, num_layers=n,
                                     steer_layers=[STEER], vector=SteeringVector({STEER: torch.ones(64)}))
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from learn2steer.models.loading import load_model
    from learn2steer.models.tiny import save_tiny

    tmp = tmp_path_factory.mktemp("registry")
    folder = save_tiny("llama", tmp / "model", hidden_size=128, num_layers=4, seed=3)
    arts = _artifacts(128, 4, 10.0)
    dirs = {k: a.save(tmp / k) for k, a in arts.items()}
    return tmp, folder, load_model(folder), arts, dirs


def _serve(tmp: Path, folder: Path, mean_dir: Path, log: str):
    args = ["--model", str(folder), "--enforce-eager", "--served-model-name", "tiny", "--max-model-len", "512",
            "--artifact", f"mean={mean_dir}", "--registry", str(tmp / "reg"), "--max-upload-mb", "0.5",
            "--inline-vectors", "--max-inline-vectors", "2"]
    return l2s_server(args, tmp / log, env={**os.environ, "L2S_ADMIN_KEY": KEY}, start_timeout=900)


def _files(folder: Path) -> dict[str, tuple[str, bytes]]:
    return {p.name: (p.name, p.read_bytes()) for p in folder.iterdir() if p.suffix in (".json", ".safetensors")}


def _put(base: str, name: str, files: dict, headers: dict | None = HEADERS) -> httpx.Response:
    return httpx.put(f"{base}/v1/steering/artifacts/{name}", files=files, headers=headers or {}, timeout=60)


def _chat(base: str, question: str, xargs: dict | None) -> tuple[int, dict]:
    body = {"model": "tiny", "messages": [{"role": "user", "content": question}], "max_tokens": N_NEW,
            "temperature": 0, "return_token_ids": True}
    if xargs is not None:
        body["vllm_xargs"] = xargs
    return post_json(base + "/v1/chat/completions", body)


def _tokens(base: str, question: str, xargs: dict | None, eos: int) -> list[int]:
    status, out = _chat(base, question, xargs)
    assert status == 200, out
    return [t for t in out["choices"][0]["token_ids"] if t != eos]


def _hf(handle, art: SteeringArtifact | None, question: str) -> list[int]:
    from learn2steer.engines.hf import HFEngine

    cfg = MethodConfig() if art is None else MethodConfig.from_artifact(art)
    eos = handle.tokenizer.eos_token_id
    out = HFEngine(handle).answer_tokens(cfg, [Example("q", question)], max_new_tokens=N_NEW, batch_size=1,
                                         progress=False)
    return [t for t in out[0][0] if t != eos]


def _listing(base: str) -> dict[str, str | None]:
    r = httpx.get(base + "/v1/steering/artifacts", headers=HEADERS, timeout=30)
    assert r.status_code == 200, r.text
    return {a["name"]: a["version"] for a in r.json()["artifacts"]}


def _metric(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels`` (0 when absent)."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}\{{(.*)\}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            total += float(m.group(2))
    return total


def test_register_use_replace_remove_restart(setup) -> None:
    tmp, folder, handle, arts, dirs = setup
    eos = handle.tokenizer.eos_token_id
    q = QUESTIONS[0]
    with _serve(tmp, folder, dirs["mean"], "server.log") as base:
        # the registry is guarded: no key, a wrong key (vLLM has no --api-key here: it would not grant it either)
        for headers, status in ((None, 401), ({"X-L2S-Admin-Key": "x" * 24}, 403),
                                ({"Authorization": f"Bearer {KEY}"}, 401)):
            r = httpx.get(base + "/v1/steering/artifacts", headers=headers or {}, timeout=30)
            assert r.status_code == status, r.text
        assert _listing(base) == {"mean": None}
        plain = {qq: _tokens(base, qq, None, eos) for qq in QUESTIONS}
        meaned = {qq: _tokens(base, qq, {"steer": "mean"}, eos) for qq in QUESTIONS}

        # bad uploads: each a 4xx with one sentence, the registry unchanged
        big = {"config.json": ("config.json", (dirs["l2s_a"] / "config.json").read_bytes()),
               "model.safetensors": ("model.safetensors", b"\0" * (600 << 10))}
        pickle = {"config.json": ("config.json", b"{}"), "model.bin": ("model.bin", b"\x80\x04\x95junk")}
        nan_dir = tmp / "nan"
        SteeringArtifact.load(dirs["mean"]).save(nan_dir)
        write_nan(nan_dir)
        for name, files, headers, status, words in [
                ("live", _files(dirs["l2s_a"]), None, 401, "admin key"),
                ("live", _files(dirs["l2s_a"]), {"X-L2S-Admin-Key": "y" * 24}, 403, "admin key"),
                ("live", big, HEADERS, 413, "at most"),
                ("live", pickle, HEADERS, 400, "pickle"),
                ("live", _files(dirs["narrow"]), HEADERS, 400, "hidden size 64"),
                ("live", _files(nan_dir), HEADERS, 400, "NaN or inf"),
                ("..live", _files(dirs["l2s_a"]), HEADERS, 400, "no path"),
                ("mean", _files(dirs["l2s_a"]), HEADERS, 409, "start-up artifact")]:
            r = _put(base, name, files, headers)
            message = r.json()["error"]["message"]
            assert r.status_code == status and words in message, (name, status, r.text)
            assert "Traceback" not in message and message.count(". ") <= 1 and len(message) < 300, message
        assert _listing(base) == {"mean": None}
        assert not [p for p in (tmp / "reg").rglob("*") if p.is_file()], "nothing written for refused uploads"

        # a request naming an artifact that is not there yet: a 400 naming it
        status, out = _chat(base, q, {"steer": "live"})
        assert status == 400 and "'live'" in out["error"]["message"], out

        # register while other requests run: those answer as before, the new artifact answers as HF does
        stop = threading.Event()
        errors: list = []

        def traffic() -> None:
            i = 0
            while not stop.is_set():
                qq, x = QUESTIONS[i % len(QUESTIONS)], (None if i % 2 else {"steer": "mean"})
                got = _tokens(base, qq, x, eos)
                if got != (plain if x is None else meaned)[qq]:
                    errors.append((qq, x, got))
                i += 1

        with ThreadPoolExecutor(3) as pool:
            running = [pool.submit(traffic) for _ in range(3)]
            r = _put(base, "live", _files(dirs["l2s_a"]))
            assert r.status_code == 201, r.text
            v1 = r.json()["version"]
            live_a = {qq: _tokens(base, qq, {"steer": "live"}, eos) for qq in QUESTIONS[:2]}
            stop.set()
            for f in running:
                f.result()
        assert not errors, errors[:3]
        for qq in QUESTIONS[:2]:
            assert live_a[qq] == _hf(handle, arts["l2s_a"], qq), qq
        assert live_a[q] != plain[q], "the registered predictor changes the answer"

        # replace: a request already running keeps v1; new ones get v2 (== HF with l2s_b)
        long_body = {"model": "tiny", "messages": [{"role": "user", "content": q}], "max_tokens": 200,
                     "min_tokens": 200, "temperature": 0, "vllm_xargs": {"steer": "live"}}
        status, reference = post_json(base + "/v1/chat/completions", long_body)
        assert status == 200, reference
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(post_json, base + "/v1/chat/completions", long_body)
            r = _put(base, "live", _files(dirs["l2s_b"]))
            assert r.status_code == 200 and r.json()["previous"] == v1, r.text
            v2 = r.json()["version"]
            status, long_out = slow.result()
        assert status == 200 and long_out["choices"][0]["message"] == reference["choices"][0]["message"]
        live_b = _tokens(base, q, {"steer": "live"}, eos)
        assert live_b == _hf(handle, arts["l2s_b"], q) and live_b != live_a[q]
        assert _listing(base) == {"mean": None, "live": v2}

        # vllm-lens's request shape: the same vector inline, as its client sends it (one JSON string)
        import base64

        import numpy as np

        vec = arts["mean"].vector[STEER].float().numpy().astype(np.float32)  # type: ignore[index]
        lens = json.dumps([{"activations": {"data": base64.b64encode(vec[None].tobytes()).decode(),
                                            "dtype": "float32", "shape": [1, 128]},
                            "layer_indices": [STEER], "scale": 1.0, "norm_match": False, "position_indices": None}])
        assert _tokens(base, q, {"apply_steering_vectors": lens}, eos) == meaned[q] == _hf(handle, arts["mean"], q)
        status, out = _chat(base, q, {"apply_steering_vectors": json.dumps(
            [{"activations": [[1.0] * 128], "layer_indices": [1], "position_indices": [3]}])})
        assert status == 400 and "position_indices" in out["error"]["message"], out

        # remove: new requests are a 400 naming it
        r = httpx.delete(base + "/v1/steering/artifacts/live", headers=HEADERS, timeout=30)
        assert r.status_code == 200 and r.json()["removed"] == v2, r.text
        status, out = _chat(base, q, {"steer": "live"})
        assert status == 400 and "'live'" in out["error"]["message"], out
        r = _put(base, "kept", _files(dirs["l2s_a"]))
        assert r.status_code == 201, r.text

        # /metrics: the counters moved
        text = httpx.get(base + "/metrics", timeout=30).text
        assert _metric(text, "l2s_requests_total", artifact="live", method="l2s") >= 4
        assert _metric(text, "l2s_requests_total", artifact="inline", method="fixed") >= 1
        assert _metric(text, "l2s_refused_total", reason="unknown_artifact") >= 2
        assert _metric(text, "l2s_refused_total", reason="inline") >= 1
        assert _metric(text, "l2s_registry_changes_total", action="add") == 2
        assert _metric(text, "l2s_registry_changes_total", action="replace") == 1
        assert _metric(text, "l2s_registry_changes_total", action="remove") == 1
        assert _metric(text, "l2s_registry_refused_total", reason="too_large") == 1
        assert _metric(text, "l2s_gate_total", artifact="live", state="open") >= 4
        assert _metric(text, "l2s_predicted_vector_norm_count", artifact="live") >= 4
        log = (tmp / "server.log").read_text()
        assert re.search(r"registry replace live version=\w+ previous=\w+ key=env at \d{4}-", log), log[-2000:]
        (tmp / "metrics_sample.txt").write_text("\n".join(x for x in text.splitlines() if x.startswith(("l2s_",
                                                                                                     "# HELP l2s"))))
    # a restart finds the registered artifact back, at the same version, answering as before
    with _serve(tmp, folder, dirs["mean"], "server2.log") as base:
        listing = _listing(base)
        assert listing["kept"] == r.json()["version"] and "live" not in listing, listing
        assert _tokens(base, q, {"steer": "kept"}, eos) == live_a[q]


@pytest.mark.slow
def test_soak_with_registry_changes(setup) -> None:
    """200+ requests with registry changes mixed in: no 5xx, and every answer equals a run without the changes
    (requests naming the artifact being churned either answer as one of its two versions or get a 400)."""
    tmp, folder, handle, arts, dirs = setup
    eos = handle.tokenizer.eos_token_id
    (tmp / "soak").mkdir()
    with _serve(tmp / "soak", folder, dirs["mean"], "soak.log") as base:
        assert _put(base, "stable", _files(dirs["l2s_a"])).status_code == 201
        base_answers = {(qq, json.dumps(x)): _tokens(base, qq, x, eos) for qq in QUESTIONS
                        for x in (None, {"steer": "mean"}, {"steer": "stable"})}
        churn = {v: {qq: None for qq in QUESTIONS} for v in ("l2s_a", "l2s_b")}
        for v in churn:
            assert _put(base, "churn", _files(dirs[v])).status_code in (200, 201)
            churn[v] = {qq: _tokens(base, qq, {"steer": "churn"}, eos) for qq in QUESTIONS}
        items = [(qq, x) for qq in QUESTIONS for x in (None, {"steer": "mean"}, {"steer": "stable"},
                                                       {"steer": "churn"})] * 14
        random.Random(0).shuffle(items)
        stop = threading.Event()

        def changes() -> int:
            n, rng = 0, random.Random(1)
            while not stop.is_set():
                if rng.random() < 0.3:
                    httpx.delete(base + "/v1/steering/artifacts/churn", headers=HEADERS, timeout=60)
                else:
                    assert _put(base, "churn", _files(dirs[rng.choice(["l2s_a", "l2s_b"])])).status_code < 300
                n += 1
            return n

        with ThreadPoolExecutor(7) as pool:
            changer = pool.submit(changes)
            results = list(pool.map(lambda it: (it, _chat(base, it[0], it[1])), items))
            stop.set()
            assert changer.result() >= 3
        assert len(results) >= 200
        for (qq, x), (status, out) in results:
            assert status < 500, out
            if x == {"steer": "churn"}:
                if status == 400:
                    assert "'churn'" in out["error"]["message"]
                    continue
                got = [t for t in out["choices"][0]["token_ids"] if t != eos]
                assert got in (churn["l2s_a"][qq], churn["l2s_b"][qq]), (qq, got)
            else:
                assert status == 200
                got = [t for t in out["choices"][0]["token_ids"] if t != eos]
                assert got == base_answers[(qq, json.dumps(x))], (qq, x)


def test_serve_checks_its_registry_before_starting(setup, monkeypatch) -> None:
    """`l2s serve --registry` needs a key (never on the command line) and re-checks what it finds in the folder."""
    from learn2steer.engines.store import ArtifactStore
    from learn2steer.engines.vllm.server import ServeJob
    from learn2steer.errors import InvalidInputError

    tmp, folder, _, _, dirs = setup
    monkeypatch.delenv("L2S_ADMIN_KEY", raising=False)
    monkeypatch.delenv("L2S_ADMIN_KEY_FILE", raising=False)
    reg = tmp / "startup-reg"
    with pytest.raises(InvalidInputError, match="needs an admin key"):
        ServeJob(model=str(folder), registry=str(reg)).command()
    keys = tmp / "keys"
    keys.write_text(f"ops {KEY}\n")
    argv, env = ServeJob(model=str(folder), registry=str(reg), admin_key_file=str(keys)).command()
    assert "learn2steer.engines.vllm.serve_main" in argv and KEY not in " ".join(argv)
    assert env["L2S_VLLM_REGISTRY"] == str(reg.resolve()) and env["L2S_ADMIN_KEY_FILE"] == str(keys.resolve())
    assert "L2S_VLLM_INLINE" not in env, "inline vectors are off unless asked for"
    ArtifactStore(reg).put("narrow", _files_bytes(dirs["narrow"]), lambda f: None)  # written for another model
    with pytest.raises(InvalidInputError, match="'narrow' was made for a model of hidden size 64"):
        ServeJob(model=str(folder), registry=str(reg), admin_key_file=str(keys)).command()


def _files_bytes(folder: Path) -> dict[str, bytes]:
    return {k: v[1] for k, v in _files(folder).items()}


@pytest.mark.slow
def test_tensor_parallel_2_gets_each_registered_version_before_using_it(setup) -> None:
    """TP=2 (one core per rank): an artifact registered over HTTP, then replaced, steers each rank as HF does with
    that version, token for token: every rank loads the version its request was pinned to."""
    tmp, folder, handle, arts, dirs = setup
    eos = handle.tokenizer.eos_token_id
    args = ["--model", str(folder), "--enforce-eager", "--served-model-name", "tiny", "--max-model-len", "512",
            "--registry", str(tmp / "reg-tp"), "--vllm-args=--tensor-parallel-size=2", "--vllm-args=--block-size=32"]
    env = {**os.environ, "L2S_ADMIN_KEY": KEY, "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    with l2s_server(args, tmp / "server-tp.log", env=env, start_timeout=900) as base:
        for name in ("l2s_a", "l2s_b"):
            r = _put(base, "live", _files(dirs[name]))
            assert r.status_code in (200, 201), r.text
            for qq in QUESTIONS[:2]:
                assert _tokens(base, qq, {"steer": "live"}, eos) == _hf(handle, arts[name], qq), (name, qq)
        assert _tokens(base, QUESTIONS[0], None, eos) == _hf(handle, None, QUESTIONS[0])
