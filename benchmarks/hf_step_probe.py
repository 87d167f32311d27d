"""Probe: what the HF engine's steering hooks themselves cost per decoding step, without the model's timing noise.

Run from the repository root: ``python -m benchmarks.hf_step_probe [--json OUT.json]``.

End-to-end L2S / plain ratios at batch 1 on a shared 2-core machine swing by several percent between runs
(see RESULTS.md), because a decoding step of the embedded model is only a few milliseconds. This probe times the
hooks' own work in isolation, as ``benchmarks/vllm_plan_probe.py`` does for the vLLM plugin: the forward calls
``generate`` makes on the embedded model (its real keyword arguments, recorded once, with a stand-in KV cache of
the right length) are replayed on a stand-in model with the same 30 decoder layers, each returning its input, so
the only work besides a few empty module calls is steer()'s pre-hook and layer hooks. The unsteered baseline
makes the same calls with no hook installed; the difference, per decoding step, is what steering adds. Compare it
with the model's own time per decoding step (printed too, measured on the real model in the same run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from learn2steer import PromptRow, build_inputs, load_default_model
from learn2steer.evaluation.datasets import demo_requests
from learn2steer.models.loading import ModelHandle
from learn2steer.models.prompts import Batch
from learn2steer.predictor import L2SNet
from learn2steer.steering import PredictedVectors, steer
from learn2steer.vectors import SteeringVector

LAYER, STEPS, REPS = 12, 128, 31


class _Cache:
    """A stand-in KV cache: only its length is read (by what it is: ``get_seq_length``)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.n


class _Block(nn.Module):
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x


class _Model(nn.Module):
    """The same number of decoder blocks, each returning its input; the hidden state is fixed per call shape."""

    def __init__(self, real: nn.Module, num_layers: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.config: Any = real.config
        self.layers = nn.ModuleList(_Block() for _ in range(num_layers))
        self.anchor = nn.Parameter(torch.zeros(1, dtype=dtype), requires_grad=False)  # the handle's dtype
        self.hidden: dict[tuple[int, int], torch.Tensor] = {}

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        ids = kwargs["input_ids"]
        key = (int(ids.shape[0]), int(ids.shape[1]))
        if key not in self.hidden:
            self.hidden[key] = torch.randn(*key, self.config.hidden_size, generator=torch.Generator().manual_seed(0)
                                           ).to(self.anchor.dtype)
        x = self.hidden[key]
        for block in self.layers:
            x = block(x)
        return x


def _record(h: ModelHandle, batch: Batch) -> list[dict[str, Any]]:
    """The keyword arguments of generate's first two forward calls (prefill, one decode step)."""
    calls: list[dict[str, Any]] = []

    def grab(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        assert not args, "generate passes keyword arguments only"
        calls.append(dict(kwargs))

    hook = h.model.register_forward_pre_hook(grab, with_kwargs=True)
    model: Any = h.model  # a transformers GenerationMixin
    try:
        with torch.no_grad():
            model.generate(**batch.inputs, max_new_tokens=2, do_sample=False, pad_token_id=h.tokenizer.pad_token_id,
                             temperature=None, top_p=None, top_k=None)
    finally:
        hook.remove()
    p = batch.seq_len
    return [{k: (_Cache(p * i) if callable(getattr(v, "get_seq_length", None)) else v) for k, v in c.items()}
            for i, c in enumerate(calls[:2])]


def _generation(stub: _Model, calls: list[dict[str, Any]], steps: int) -> float:
    """Seconds of one prefill and ``steps`` decoding calls (the decode call replayed, as the hooks see it)."""
    prefill, decode = calls
    t = time.perf_counter()
    stub(**prefill)
    for _ in range(steps):
        stub(**decode)
    return time.perf_counter() - t


def model_ms_per_step(h: ModelHandle, batch: Batch, steps: int = 32, reps: int = 3) -> float:
    """The real model's time per greedy decoding step (median of ``reps`` generations of ``steps`` tokens)."""
    gen = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=h.tokenizer.pad_token_id,
               temperature=None, top_p=None, top_k=None)
    real = []
    model: Any = h.model
    with torch.no_grad():
        for _ in range(reps):
            t = time.perf_counter()
            model.generate(**batch.inputs, **gen)
            real.append((time.perf_counter() - t) / steps)
    return statistics.median(real) * 1e3


def probe(h: ModelHandle, batch_size: int, *, layer: int = LAYER, steps: int = STEPS, reps: int = REPS,
          step_ms: float | None = None, model_step: bool = True, other: Any = None) -> dict[str, Any]:
    """Per-step hook time of L2S (read and write at ``layer``) and Mean-S (a fixed vector there), ``batch_size``
    rows; ``step_ms``: the model's own time per decoding step (measured here when not given and ``model_step``).
    ``other``: another version of the steering module (``--compare``), timed interleaved with this one."""
    batch = build_inputs(h, [PromptRow(e.question) for e in demo_requests()[:batch_size]])
    calls = _record(h, batch)
    stub = _Model(h.model, h.num_layers, h.dtype)
    sh = ModelHandle(model=stub, tokenizer=h.tokenizer, layers=stub.layers, name="stub")
    torch.manual_seed(0)
    net = L2SNet(h.hidden_size, h.hidden_size)
    mean = SteeringVector({layer: torch.randn(h.hidden_size)})
    versions = {"": (steer, PredictedVectors)}
    if other is not None:
        versions["other_"] = (other.steer, other.PredictedVectors)
    variants = {f"{tag}{k}": (fns[0], (lambda p=fns[1]: p(net, layer, (layer,))) if k == "l2s" else (lambda: mean))
                for tag, fns in versions.items() for k in ("l2s", "mean")}
    times: dict[str, list[float]] = {"none": [], **{k: [] for k in variants}}
    with torch.no_grad():
        for r in range(reps + 1):  # the first round warms up and is dropped; the order rotates every round
            names = ["none", *variants]
            for name in names[r % len(names):] + names[:r % len(names)]:
                if name == "none":
                    took = _generation(stub, calls, steps)
                else:
                    steer_fn, make = variants[name]
                    with steer_fn(sh, make(), alpha=0.5, scope="all", batch=batch):
                        took = _generation(stub, calls, steps)
                if r:
                    times[name].append(took)
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}  # under load, the least disturbed repetition
    out: dict[str, Any] = {"batch_size": batch_size, "steps": steps, "reps": reps, "layers": h.num_layers,
                           "unsteered_calls_ms": med["none"] * 1e3, "seconds": times}
    for k in variants:
        out[f"{k}_extra_per_step_us"] = (med[k] - med["none"]) / (steps + 1) * 1e6
        out[f"{k}_extra_per_step_us_min"] = (low[k] - low["none"]) / (steps + 1) * 1e6
    if step_ms is None and not model_step:
        return out
    out["model_ms_per_step"] = step_ms if step_ms is not None else model_ms_per_step(h, batch)
    for k in variants:
        out[f"{k}_fraction_of_step"] = out[f"{k}_extra_per_step_us"] / 1e3 / out["model_ms_per_step"]
    return out


def profile_generation(h: ModelHandle, *, layer: int = LAYER, steps: int = STEPS) -> dict[str, Any]:
    """Where the time of one batch-1 L2S-steered greedy generation goes, by cProfile (which inflates Python-heavy
    parts: read the shares, and the probe above for the hooks' true cost). Buckets: the model's torch kernels,
    the hooks of learn2steer (self time of every function in its package, its callees in torch included in
    ``hooks_inclusive``), and the rest (transformers' and torch's Python: generate's loop, module calls)."""
    import cProfile
    import pstats

    batch = build_inputs(h, [PromptRow(demo_requests()[0].question)])
    torch.manual_seed(0)
    provider = PredictedVectors(L2SNet(h.hidden_size, h.hidden_size), layer, (layer,))
    gen = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=h.tokenizer.pad_token_id,
               temperature=None, top_p=None, top_k=None)
    prof = cProfile.Profile()
    model: Any = h.model
    with torch.no_grad(), steer(h, provider, alpha=0.5, scope="all", batch=batch):
        model.generate(**batch.inputs, **gen)  # warm-up
        prof.enable()
        model.generate(**batch.inputs, **gen)
        prof.disable()
    st: Any = pstats.Stats(prof)
    stats = st.stats  # (file, line, name) -> (calls, primitive calls, self s, cumulative s, callers)
    total = sum(s[2] for s in stats.values())
    ours = {k: v for k, v in stats.items() if "/learn2steer/" in k[0]}
    kernels = sum(v[2] for k, v in stats.items() if k[0] == "~" and "torch" in k[2])
    hook_keys = [k for k in ours if k[2] in ("hook", "pre_hook")]
    inclusive = sum(ours[k][3] for k in hook_keys)
    per_fn = sorted(((f"{Path(k[0]).name}:{k[2]}", v[0], v[2]) for k, v in ours.items()), key=lambda r: -r[2])
    return {"steps": steps, "total_s": total, "per_step_ms": total / steps * 1e3,
            "torch_builtin_calls_s": kernels, "hooks_inclusive_s": inclusive,
            "hooks_inclusive_per_step_us": inclusive / steps * 1e6,
            "learn2steer_self_s": sum(r[2] for r in per_fn),
            "learn2steer_functions": [{"function": n, "calls": c, "self_s": s} for n, c, s in per_fn[:15]]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.hf_step_probe", description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--no-model-step", action="store_true",
                    help="skip timing the real model's decoding step (the hooks' figures only)")
    ap.add_argument("--compare", type=Path, metavar="STEERING_PY",
                    help="also time another version's steering.py (e.g. 0.3's, from `git show`), interleaved")
    ap.add_argument("--profile", action="store_true",
                    help="also profile one batch-1 L2S generation (cProfile): where its time goes")
    args = ap.parse_args(argv)
    from benchmarks.machine import finish, machine_facts

    facts = machine_facts(cpus=os.cpu_count(), threads=torch.get_num_threads(), device="cpu")
    h = load_default_model()
    other = None
    if args.compare:
        import importlib.util

        spec = importlib.util.spec_from_file_location("other_steering", args.compare)
        assert spec is not None and spec.loader is not None
        other = importlib.util.module_from_spec(spec)
        sys.modules["other_steering"] = other  # dataclasses look their module up
        spec.loader.exec_module(other)
    res: dict[str, Any] = {f"batch_{b}": probe(h, b, model_step=not args.no_model_step, other=other)
                           for b in (1, 16)}
    if args.profile:
        prof = res["profile_batch_1"] = profile_generation(h, steps=64)
        print(f"profile, batch 1: {prof['per_step_ms']:.2f} ms/step under cProfile; hooks (inclusive) "
              f"{prof['hooks_inclusive_per_step_us']:.1f} us/step; torch built-ins {prof['torch_builtin_calls_s']:.2f} "
              f"of {prof['total_s']:.2f} s")
        for f in prof["learn2steer_functions"]:
            print(f"  {f['function']:40s} {f['calls']:6d} calls {f['self_s'] * 1e3:8.2f} ms self")
    for name, r in res.items():
        if not name.startswith("batch_"):
            continue
        step = f"model {r['model_ms_per_step']:.2f} ms/step; " if "model_ms_per_step" in r else ""
        for tag in ("", "other_") if other is not None else ("",):
            print(f"{name}: {step}{'--compare ' if tag else ''}hooks' extra per step (median / least disturbed): "
                  f"L2S {r[f'{tag}l2s_extra_per_step_us']:.1f} / {r[f'{tag}l2s_extra_per_step_us_min']:.1f} us, "
                  f"Mean-S {r[f'{tag}mean_extra_per_step_us']:.1f} / {r[f'{tag}mean_extra_per_step_us_min']:.1f} us",
                  flush=True)
    res["machine"] = finish({**facts, "model": h.name})
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
