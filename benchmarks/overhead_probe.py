"""Probe: plain / L2S / zero-vector generation side by side (batch 16, 48 tokens), and the cost of one write.

Run from the repository root: ``python -m benchmarks.overhead_probe``. Prints every repetition so that
machine noise is visible next to the medians.
"""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks.common import generation_variants
from learn2steer import PromptRow, build_inputs, load_default_model
from learn2steer.evaluation.datasets import demo_requests
from learn2steer.predictor import L2SNet
from learn2steer.steering import PredictedVectors, step_mask
from learn2steer.vectors import SteeringVector


def main() -> None:
    h = load_default_model()
    batch = build_inputs(h, [PromptRow(e.question) for e in demo_requests()[:16]])
    net = L2SNet(h.hidden_size, h.hidden_size)
    fns = generation_variants(h, batch, 48, {"plain": None, "l2s": PredictedVectors(net, 12, (12,)),
                                             "zero": SteeringVector({12: torch.zeros(h.hidden_size)})})
    fns["plain"]()  # warm-up
    variants = list(fns.items())
    times: dict[str, list[float]] = {k: [] for k, _ in variants}
    for r in range(6):
        for k, fn in (variants if r % 2 == 0 else variants[::-1]):
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    for k, v in times.items():
        print(k, [round(x, 2) for x in v], "median", round(statistics.median(v), 3))

    x = torch.randn(16, 1, h.hidden_size)
    real = torch.ones(16, 90, dtype=torch.bool)
    v = torch.randn(16, h.hidden_size)
    t = time.perf_counter()
    for _ in range(10000):
        torch.where(step_mask("all", real, 100, 1).unsqueeze(-1), x + 0.5 * v.unsqueeze(-2), x)
    print("one steering write (mask + where), microseconds:", (time.perf_counter() - t) / 10000 * 1e6)


if __name__ == "__main__":
    main()
