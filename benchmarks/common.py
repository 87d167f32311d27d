"""Timing helpers shared by the benchmark scripts: interleaved repetitions, paired ratios, the figure table."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def timings(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, list[float]]:
    """Wall times of each function per repetition; variants interleaved, their order rotated every repetition."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(reps):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            fns[k]()
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
