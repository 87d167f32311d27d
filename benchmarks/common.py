"""Helpers shared by the benchmark scripts: steered generation variants, interleaved repetitions, paired
ratios, the figure table."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping

import torch

from learn2steer.models import Batch, ModelHandle
from learn2steer.steering import VectorProvider, steer
from learn2steer.vectors import SteeringVector


def generation_variants(h: ModelHandle, batch: Batch, new_tokens: int,
                        variants: Mapping[str, SteeringVector | VectorProvider | None], *, alpha: float = 0.5
                        ) -> dict[str, Callable[[], object]]:
    """One callable per variant: greedy generation of exactly ``new_tokens`` tokens for ``batch``, steered at
    every position by the variant's vectors (None: unsteered), so every variant does the same work."""
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
               pad_token_id=h.tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)

    def run(vectors: SteeringVector | VectorProvider | None) -> Callable[[], object]:
        def go() -> object:
            with torch.no_grad():
                if vectors is None:
                    return h.model.generate(**batch.inputs, **gen)
                with steer(h, vectors, alpha=alpha, scope="all", batch=batch):
                    return h.model.generate(**batch.inputs, **gen)
        return go

    return {name: run(v) for name, v in variants.items()}


def timings(fns: dict[str, Callable[[], object]], reps: int, *, sync: Callable[[], None] | None = None
            ) -> dict[str, list[float]]:
    """Wall times of each function per repetition; variants interleaved, their order rotated every repetition.
    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before and after each timed call."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(reps):
        for k in names[r % len(names):] + names[:r % len(names)]:
            if sync is not None:
                sync()
            t = time.perf_counter()
            fns[k]()
            if sync is not None:
                sync()
            times[k].append(time.perf_counter() - t)
    return times


def ratio(times: dict[str, list[float]], base: str, other: str) -> float:
    """Median over repetitions of base/other time, each pair taken back to back (cancels slow drift)."""
    return statistics.median(b / o for b, o in zip(times[base], times[other]))


def print_table(rows: list[tuple[str, float, str]]) -> None:
    """Print figure / value / target rows."""
    width = max(len(r[0]) for r in rows)
    print(f"\n{'figure'.ljust(width)}  {'value':>10}  target")
    for name, v, target in rows:
        print(f"{name.ljust(width)}  {v:>10.4g}  {target}")
