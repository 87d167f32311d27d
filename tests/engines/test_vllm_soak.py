"""A soak of `l2s serve`: a few hundred mixed requests with malformed and extreme ones interleaved.

What a hostile or careless client must never do to a shared server: get a 5xx for a bad request, poison the
answers of others (an inf written into shared KV blocks made every later short answer empty in 0.2), or
leave per-request state behind. Runs in the serving environment (marker ``serve``) on a tiny random Llama
(width 128, float32, greedy) served by the real `l2s serve` process; the plugin's trace
(``$L2S_VLLM_TRACE``) shows the worker's stored vectors after every finished request.
"""

from __future__ import annotations

import json
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytestmark = pytest.mark.serve
vllm = pytest.importorskip("vllm")

from helpers import l2s_server, post_json  # noqa: E402

from learn2steer import SteeringArtifact  # noqa: E402
from learn2steer.predictor import L2SNet  # noqa: E402
from learn2steer.vectors import SteeringVector  # noqa: E402

QUESTIONS = ["how do i make a bomb ?", "what is the capital of france ?", "should i sell my house to pay a debt ?",
             "describe a man riding a bike", "how do i hurt people ?", "my chest hurts, what should i do ?"]
GOOD = [None, {"steer": "mean"}, {"steer": "l2s"}, {"steer": "mean", "strength": "relative", "alpha": 0.5},
        {"steer": "l2s", "scope": "generated", "alpha": 2.0}]
BAD = [({"steer": "nope"}, {}), ({"steer": "mean", "alpha": "high"}, {}), ({"steer": "mean", "alpha": 1e308}, {}),
       ({"steer": "mean", "alpha": 1e30}, {}), ({"steer": "mean", "alpha": -1e39}, {}),
       ({"steer": "l2s", "scope": "everywhere"}, {}), ({"steer": "mean", "strength": "loud"}, {}),
       ({"steer": "l2s", "gated": 0.5}, {}), ({"steer_path": "/etc"}, {}), ({"steer": ["mean"]}, {}),
       ({"steer": "mean"}, {"use_beam_search": True, "n": 2})]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from learn2steer.models.tiny import save_tiny

    tmp = tmp_path_factory.mktemp("soak")
    folder = save_tiny("llama", tmp / "model", hidden_size=128, num_layers=4, seed=3)
    g = torch.Generator().manual_seed(0)
    common = dict(model="tiny", hidden_size=128, num_layers=4, steer_layers=[2])
    torch.manual_seed(0)
    net = L2SNet(128, 128)
    with torch.no_grad():
        net.decoder.weight.mul_(10.0)
    vec = SteeringVector({2: 20 * torch.randn(128, generator=g)})
    arts = {"mean": SteeringArtifact(kind="fixed", method="mean", vector=vec, **common),
            "l2s": SteeringArtifact(kind="l2s", method="l2s", context_layer=1, predictor=net, **common)}
    trace = tmp / "trace.jsonl"
    args = ["--model", str(folder), "--enforce-eager", "--served-model-name", "tiny",
            *[x for k, a in arts.items() for x in ("--artifact", f"{k}={a.save(tmp / k)}")]]
    with l2s_server(args, tmp / "server.log", env={**os.environ, "L2S_VLLM_TRACE": str(trace)}) as base:
        yield base, trace


def _chat(base: str, question: str, xargs: dict | None, more: dict) -> tuple[int, dict]:
    body = {"model": "tiny", "messages": [{"role": "user", "content": question}], "max_tokens": 6,
            "temperature": 0, **more}
    if xargs is not None:
        body["vllm_xargs"] = xargs
    return post_json(base + "/v1/chat/completions", body)


def test_soak_bad_requests_never_poison_good_ones(server) -> None:
    base, trace = server
    good = [(q, x) for q in QUESTIONS for x in GOOD] * 5                           # 150 well-formed
    bad = [(QUESTIONS[i % len(QUESTIONS)], x, more) for i, (x, more) in enumerate(BAD * 6)]  # 66 malformed
    key = lambda q, x: (q, json.dumps(x, sort_keys=True))  # noqa: E731

    def run(items: list) -> list[tuple[int, dict]]:
        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(lambda it: _chat(base, it[0], it[1], it[2] if len(it) > 2 else {}), items))

    clean = {key(q, x): body["choices"][0]["message"]["content"] for (q, x), (s, body) in zip(good, run(good))
             if s == 200}
    assert len(clean) == len(QUESTIONS) * len(GOOD), "every well-formed request answered"
    mixed = good + bad
    random.Random(0).shuffle(mixed)
    results = run(mixed)
    assert all(s < 500 for s, _ in results), [b for s, b in results if s >= 500][:3]
    for item, (status, body) in zip(mixed, results):
        if len(item) == 3:   # malformed: a 400 whose message is one sentence, not a traceback
            text = json.dumps(body)
            assert status == 400, (item, body)
            message = body.get("error", {}).get("message", "") if isinstance(body.get("error"), dict) else text
            assert message and "Traceback" not in message and len(message) < 400, (item, message)
        else:
            q, x = item
            assert status == 200 and body["choices"][0]["message"]["content"] == clean[key(q, x)], (item, body)
    # steering changed answers (the soak exercised steered requests, not just refusals)
    for x in ({"steer": "mean"}, {"steer": "l2s"}):
        assert any(clean[key(q, x)] != clean[key(q, None)] for q in QUESTIONS), x
    # every request's stored vector was freed: the worker holds none at the end
    time.sleep(1)
    freed = [json.loads(line) for line in trace.read_text().splitlines() if '"freed"' in line]
    assert freed and freed[-1]["stored_now"] == 0, freed[-3:]
