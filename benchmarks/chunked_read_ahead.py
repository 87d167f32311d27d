"""The cost of chunked prefill with L2S at scope ``all`` on ``l2s serve`` (the read-ahead), over HTTP.

``.venv-serve/bin/python -m benchmarks.chunked_read_ahead --json OUT.json`` serves the embedded SmolLM2-135M-Instruct
with chunked prefill on (a step budget of 32 tokens: the longer demo prompts span 2 chunks) and a random L2S
predictor (L'=10 -> L*=12: its cost does not depend on what it learnt), then sends batches of 16 concurrent chat
requests, variants interleaved, medians of paired repetitions:

* ``chunked_l2s_all_vs_plain_b16``: throughput (requests of 64 new tokens, ``ignore_eos``) with L2S at scope
  ``all`` (each request = a one-token read request, then the request itself) over the same requests unsteered;
* ``chunked_l2s_generated_vs_plain_b16``: the same at scope ``generated`` (no read-ahead: the vector is read in the
  request's own last chunk), which separates the read-ahead's cost from the steering's;
* ``chunked_read_ahead_extra_ttft_ms``: extra wall time of one-token requests (batch 16) with L2S at scope ``all``
  over unsteered ones: the time to first token the read-ahead adds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

BUDGET = 32


def main(reps: int = 3, tokens: int = 64, json_path: Path | None = None) -> dict[str, Any]:
    import torch

    from benchmarks.serve_http import post, served
    from learn2steer.artifacts import SteeringArtifact
    from learn2steer.evaluation.datasets import demo_requests
    from learn2steer.models.loading import DEFAULT_MODEL_NAME
    from learn2steer.predictor import L2SNet

    torch.manual_seed(0)
    art = SteeringArtifact(kind="l2s", method="l2s", model=DEFAULT_MODEL_NAME, hidden_size=576, num_layers=30,
                           steer_layers=[12], context_layer=10, predictor=L2SNet(576, 576))
    tmp = Path(tempfile.mkdtemp(prefix="l2s-chunked-"))
    folder = art.save(tmp / "l2s")
    n = os.cpu_count() or 1
    args = ["--model", "default", "--artifact", f"l2s={folder}", "--chunked-prefill",
            f"--vllm-args=--max-num-batched-tokens={BUDGET}", "--vllm-args=--max-num-seqs=16",
            "--served-model-name", "m"]
    with served(args, log_dir=tmp) as base:
        questions = [e.question for e in demo_requests()[:16]]
        variants: dict[str, dict | None] = {"plain": None, "all": {"steer": "l2s", "scope": "all"},
                                            "generated": {"steer": "l2s", "scope": "generated"}}

        def batch(xargs: dict | None, new: int) -> float:
            def one(q: str) -> dict:
                body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": q}],
                                        "max_tokens": new, "min_tokens": new, "temperature": 0, "ignore_eos": True,
                                        "return_token_ids": True}
                if xargs is not None:
                    body["vllm_xargs"] = xargs
                return post(base + "/v1/chat/completions", body)

            t = time.perf_counter()
            with ThreadPoolExecutor(len(questions)) as pool:
                outs = list(pool.map(one, questions))
            elapsed = time.perf_counter() - t
            assert all(len(o["choices"][0]["token_ids"]) == new for o in outs)
            assert max(len(o["prompt_token_ids"]) for o in outs) > BUDGET, "prompts span chunks"
            return elapsed

        for x in variants.values():  # warm-up
            batch(x, 2)
        full: dict[str, list[float]] = {k: [] for k in variants}
        first: dict[str, list[float]] = {k: [] for k in ("plain", "all")}
        for _ in range(reps):
            for name, x in variants.items():
                full[name].append(batch(x, tokens))
            for name in first:
                first[name].append(batch(variants[name], 1))
    # paired: each repetition's variants ran back to back, so a slow spell of a shared machine cancels
    out = {"chunked_l2s_all_vs_plain_b16": statistics.median(p / a for p, a in zip(full["plain"], full["all"])),
           "chunked_l2s_generated_vs_plain_b16": statistics.median(
               p / g for p, g in zip(full["plain"], full["generated"])),
           "chunked_read_ahead_extra_ttft_ms": 1000 * statistics.median(
               a - p for a, p in zip(first["all"], first["plain"])),
           "seconds": {"full": full, "first_token": first}, "budget_tokens": BUDGET, "new_tokens": tokens,
           "reps": reps, "batch": 16, "cpu_count": n}
    print(json.dumps({k: v for k, v in out.items() if k != "seconds"}, indent=1))
    if json_path is not None:
        json_path.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    main(a.reps, a.tokens, a.json)
