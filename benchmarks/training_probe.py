"""Probe: L2S training of 1,600 x 4,096 with the paper's defaults, where its time goes, and against another version.

Run from the repository root: ``python -m benchmarks.training_probe [--compare OLD_PREDICTOR_PY] [--json OUT.json]``.

The same synthetic data as ``python -m benchmarks`` (seed 0). ``--compare`` loads another version's
``predictor.py`` (e.g. ``git show v0.3:src/learn2steer/predictor.py > /tmp/p.py``) and times both interleaved,
checking that they train bit-identical weights; ``--profile`` adds torch's operator profile of a 20-epoch fit,
the top operators by self time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from learn2steer import predictor


def _data(n: int = 1600, d: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    k = min(100, d)
    return x, torch.tanh(x[:, :k] @ (torch.randn(k, d, generator=g) * 0.1))


def _load(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location("other_predictor", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["other_predictor"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def profile(epochs: int = 20) -> dict[str, Any]:
    """Self CPU time per operator of a ``epochs``-epoch fit (torch.profiler), the top ones and the total."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    x, y = _data()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        predictor.fit(x, y, predictor.TrainConfig(epochs=epochs), progress=False)
    ops = sorted(((e.key, e.count, e.self_cpu_time_total / 1e6) for e in prof.key_averages()), key=lambda r: -r[2])
    total = sum(r[2] for r in ops)
    return {"epochs": epochs, "self_cpu_s": total,
            "ops": [{"op": k, "calls": c, "self_s": s, "share": s / total} for k, c, s in ops[:20]]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.training_probe", description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--compare", type=Path, metavar="PREDICTOR_PY", help="another version's predictor.py")
    ap.add_argument("--reps", type=int, default=3, help="full fits per version (0: only --profile)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    from benchmarks.machine import finish, machine_facts

    facts = machine_facts(cpus=os.cpu_count(), threads=torch.get_num_threads(), device="cpu")
    x, y = _data()
    versions: dict[str, Any] = {"this": predictor}
    if args.compare:
        versions["other"] = _load(args.compare)
    times: dict[str, list[float]] = {k: [] for k in versions}
    nets: dict[str, Any] = {}
    for r in range(args.reps):
        for name in list(versions)[r % len(versions):] + list(versions)[:r % len(versions)]:
            mod = versions[name]
            t = time.perf_counter()
            res = mod.fit(x, y, mod.TrainConfig(), progress=False)
            times[name].append(time.perf_counter() - t)
            nets[name] = res.net.state_dict()
    out: dict[str, Any] = {"n": 1600, "width": 4096, "seconds": times,
                           "median_s": {k: statistics.median(v) for k, v in times.items() if v}}
    if "other" in nets and "this" in nets:
        out["same_weights"] = all(torch.equal(nets["this"][k], nets["other"][k]) for k in nets["this"])
        out["ratio_other_over_this"] = statistics.median(o / t for o, t in zip(times["other"], times["this"]))
    if args.profile:
        out["profile"] = profile()
    out["machine"] = finish(facts)
    for k, v in times.items():
        if not v:
            continue
        print(f"{k}: {[round(t, 2) for t in v]} s, median {statistics.median(v):.2f} s", flush=True)
    if "same_weights" in out:
        print(f"same weights: {out['same_weights']}; other / this (paired median): {out['ratio_other_over_this']:.3f}")
    if "profile" in out:
        for op in out["profile"]["ops"][:12]:
            print(f"  {op['op']:32s} {op['calls']:6d} calls {op['self_s']:7.2f} s {100 * op['share']:5.1f}%")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
