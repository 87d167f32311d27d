"""Micro-probe: what a read layer's hook costs on a decoding step (PredictedVectors.observe when the call does not
hold the read column), this version against another steering.py, least disturbed of 5 x 20,000 calls.

Run from the repository root: ``python -m benchmarks.read_check_micro OTHER_STEERING_PY`` (e.g. 0.3's, written
with ``git show b4e50ea:src/learn2steer/steering.py > /tmp/steering_0.3.py``).
"""

from __future__ import annotations

import importlib.util
import sys
import timeit

import torch

import learn2steer.steering as this


def main() -> None:
    spec = importlib.util.spec_from_file_location("other_steering", sys.argv[1])
    assert spec is not None and spec.loader is not None
    other = importlib.util.module_from_spec(spec)
    sys.modules["other_steering"] = other  # dataclasses look their module up
    spec.loader.exec_module(other)
    net = torch.nn.Linear(576, 576)
    for rows in (1, 16):
        res = {}
        for name, m in (("other", other), ("this", this)):
            lay = m.Layout(prompt_len=40, real=torch.ones(rows, 40, dtype=torch.bool),
                           read_columns={"prompt_last": torch.full((rows,), 39)})
            step = m.Step(60, 1, rows, lay)
            p = m.PredictedVectors(net, 12, (12,))
            hid = torch.randn(rows, 1, 576)
            res[name] = min(timeit.repeat(lambda p=p, hid=hid, step=step: p.observe(12, hid, step), number=20000,
                                          repeat=5)) / 20000 * 1e6
        print(f"rows {rows}: observe on a decoding step: " + ", ".join(f"{k} {v:.2f} us" for k, v in res.items()))


if __name__ == "__main__":
    main()
