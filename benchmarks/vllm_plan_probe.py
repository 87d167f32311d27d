"""Probe: what the vLLM plugin itself costs per decoding step, without vLLM's timing noise.

Run from the repository root (either environment; vLLM is not imported): ``python benchmarks/vllm_plan_probe.py``.

End-to-end vLLM ratios on a 2-core machine swing by +-5% between runs (see RESULTS.md). This probe times the
plugin's own work in isolation, on the shapes of the embedded model (D=576, 30 layers) at batch 16: building
the per-step plan from a runner-shaped input batch, then the op after each of the 30 decoder layers (the
prefill step reads h at L' and predicts v; decode steps add alpha * v at L*). The unsteered baseline runs the
same 30 op calls with no plan. Compare the difference with vLLM's measured time per decoding step.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from learn2steer.artifacts import SteeringArtifact
from learn2steer.engines.requests import Registry
from learn2steer.engines.vllm import plugin
from learn2steer.engines.vllm.plan import build_plan
from learn2steer.predictor import L2SNet

D, LAYERS, L_STAR, BATCH, PROMPT, STEPS = 576, 30, 12, 16, 40, 128


def _runner(extra: dict | None, computed: int, count: int) -> SimpleNamespace:
    ids = [f"r{i}" for i in range(BATCH)]
    sp = SimpleNamespace(extra_args=extra)
    return SimpleNamespace(
        input_batch=SimpleNamespace(num_reqs=BATCH, req_ids=ids,
                                    num_computed_tokens_cpu=np.full(BATCH, computed, dtype=np.int64),
                                    num_prompt_tokens=np.full(BATCH, PROMPT, dtype=np.int64)),
        query_start_loc=SimpleNamespace(np=np.arange(0, BATCH * count + 1, count, dtype=np.int64)),
        requests={i: SimpleNamespace(sampling_params=sp) for i in ids})


def _generation(extra: dict | None) -> float:
    """Seconds of plugin work for one prefill + STEPS decode steps of BATCH requests."""
    state = plugin.worker()
    for i in range(BATCH):  # what vLLM does when a request finishes: the next generation starts afresh
        state.forget(f"r{i}")
    hidden_p, resid_p = torch.randn(BATCH * PROMPT, D), torch.randn(BATCH * PROMPT, D)
    hidden_d, resid_d = torch.randn(BATCH, D), torch.randn(BATCH, D)
    t = time.perf_counter()
    for step in range(STEPS + 1):
        prefill = step == 0
        runner = _runner(extra, 0 if prefill else PROMPT + step - 1, PROMPT if prefill else 1)
        state.plan = build_plan(state, plugin.step_batch(runner), plugin.parse_request)
        hidden, resid = (hidden_p, resid_p) if prefill else (hidden_d, resid_d)
        for layer in range(LAYERS):
            plugin.steer_op(hidden, resid, layer)
        state.plan = None
    return time.perf_counter() - t


def main() -> None:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        art = SteeringArtifact(kind="l2s", method="l2s", model="probe", hidden_size=D, num_layers=LAYERS,
                               steer_layers=[L_STAR], context_layer=L_STAR, predictor=L2SNet(D, D))
        plugin.use_registry(Registry({"l2s": str(art.save(Path(tmp) / "l2s"))}, allow_paths=False))
        _generation({"steer": "l2s"})  # load the predictor once, as a server does
        times: dict[str, list[float]] = {"none": [], "l2s": []}
        for _ in range(9):
            for name, extra in (("none", None), ("l2s", {"steer": "l2s"})):
                times[name].append(_generation(extra))
    med = {k: statistics.median(v) for k, v in times.items()}
    per_step_us = (med["l2s"] - med["none"]) / (STEPS + 1) * 1e6
    print(f"plugin work, batch {BATCH}, {STEPS} new tokens, {LAYERS} op calls per step (9 repetitions, medians)")
    print(f"  unsteered (op calls with no plan): {med['none'] * 1e3:8.2f} ms")
    print(f"  L2S on every request:              {med['l2s'] * 1e3:8.2f} ms")
    print(f"  extra per step:                    {per_step_us:8.1f} us")
    print("Divide by vLLM's time per decoding step (batch 16: about 39 ms here) for the fraction it costs.")


if __name__ == "__main__":
    main()
