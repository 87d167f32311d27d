"""Chunked prefill with L2S at scope ``all`` / ``prompt`` on `l2s serve` (the read-ahead): == the HF engine.

Runs in the serving environment (marker ``serve``) on the tiny random LLaVA-1.5 of test_vllm_images.py (text and
COCO images, float32, greedy), served with chunked prefill on and a step budget of 32 tokens, so every prompt is
split over several steps and the first chunks pass L* before the last prompt token exists. Each such request is
served as a read request (plain, one token) and then the request itself with the vector read ahead; the answers
must equal one Hugging Face pass token for token, for L' < L*, L' > L* and ``input_last``, text and images, sent
concurrently. Skips cleanly without the shared COCO images.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.serve
vllm = pytest.importorskip("vllm")

from helpers import l2s_server, post_json  # noqa: E402
from test_vllm_images import N_NEW, SYSTEM, _artifacts, _data_uri, _hf, _strip  # noqa: E402

from learn2steer import MethodConfig, SteeringArtifact  # noqa: E402
from learn2steer.behaviours import Example  # noqa: E402

BUDGET = 32


def test_chunked_prefill_with_l2s_at_prompt_scopes_equals_hf(coco_images, tmp_path) -> None:
    from learn2steer.models.loading import load_model
    from learn2steer.models.tiny import save_tiny

    folder = save_tiny("llava", tmp_path / "llava", seed=1)
    arts = _artifacts(128, 4)
    dirs = {k: str(a.save(tmp_path / k)) for k, a in arts.items()}
    served = [x for k in ("l2s", "deep", "input_last") for x in ("--artifact", f"{k}={dirs[k]}")]
    args = ["--model", str(folder), *served, "--served-model-name", "tiny", "--enforce-eager", "--max-model-len",
            "512", "--chunked-prefill", f"--vllm-args=--max-num-batched-tokens={BUDGET}",
            "--vllm-args=--max-num-seqs=8"]
    handle = load_model(folder)
    loaded = {k: SteeringArtifact.load(v) for k, v in dirs.items()}
    cases = [("none", None, MethodConfig())]
    for name in ("l2s", "deep", "input_last"):
        for scope in ("all", "prompt"):
            cases.append((f"{name}/{scope}", {"steer": name, "scope": scope},
                          MethodConfig.from_artifact(loaded[name], scope=scope)))
    image = coco_images[0]
    inputs = [("text", Example("t", SYSTEM + "what is the capital of france ?")),
              ("image", Example("i", SYSTEM + "describe this image in detail .", image))]

    def body(ex: Example, xargs: dict | None) -> dict:
        content: list | str = ex.question
        if ex.image is not None:
            content = [{"type": "image_url", "image_url": {"url": _data_uri(ex.image)}},
                       {"type": "text", "text": ex.question}]
        out = {"model": "tiny", "max_tokens": N_NEW, "temperature": 0, "return_token_ids": True,
               "messages": [{"role": "user", "content": content}]}
        if xargs is not None:
            out["vllm_xargs"] = xargs
        return out

    jobs = [(kind, ex, name, xargs, cfg) for kind, ex in inputs for name, xargs, cfg in cases]
    with l2s_server(args, tmp_path / "server.log", start_timeout=1800) as base:  # a loaded host starts slowly
        with ThreadPoolExecutor(6) as pool:  # concurrently: read requests and steered chunks share steps
            results = list(pool.map(lambda j: post_json(base + "/v1/chat/completions", body(j[1], j[3])), jobs))
    eos = handle.tokenizer.eos_token_id
    got = {}
    for (kind, ex, name, _, cfg), (status, out) in zip(jobs, results):
        assert status == 200, (kind, name, out)
        assert len(out["prompt_token_ids"]) > 2 * BUDGET, (kind, "the prompt spans several chunks")
        got[(kind, name)] = _strip(out["choices"][0]["token_ids"], eos)
        assert got[(kind, name)] == _hf(handle, cfg, [ex])[0], (kind, name)
    for kind, _ in inputs:
        assert any(got[(kind, n)] != got[(kind, "none")] for n, _, _ in cases[1:]), (kind, "steering changed answers")
