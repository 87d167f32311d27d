"""Benchmark-only shim for hotwire-vllm on vLLM's CPU build, active only when ``L2S_BENCH_HOTWIRE_CPU`` is set.

``benchmarks/peers.py`` puts this folder on ``PYTHONPATH`` for its hotwire engine process, so the shim reaches
every process vLLM starts (sitecustomize runs at interpreter start; it only installs an import hook).

hotwire 0.1.2 arms its op in a wrapper of ``GPUModelRunner.load_model``; vLLM's ``CPUModelRunner`` overrides
``load_model`` without calling it, so on a CPU hotwire never arms and every request runs unsteered. The modes:

* ``arm``: also wrap ``CPUModelRunner.load_model`` the same way (nothing else changed): hotwire's Triton
  kernel then runs on CPU tensors, which is what fails;
* ``port``: ``arm`` plus a CPU kernel for ``hotwire::steer`` registered with ``torch.library.register_kernel``:
  ``hidden[t] += scales[slot_map[t]] * bank[slot_map[t]]`` where ``slot_map[t] >= 0``, the Triton kernel's
  arithmetic (float32 add). hotwire's own routing (slot map per step, bank, spec parsing) is unchanged.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys

_MODE = os.environ.get("L2S_BENCH_HOTWIRE_CPU", "")


def _cpu_steer(hidden, bank, slot_map, scales):  # type: ignore[no-untyped-def]

    sel = (slot_map >= 0).nonzero().squeeze(1)
    if sel.numel() == 0:
        return
    slots = slot_map.index_select(0, sel).long()
    add = (scales.index_select(0, slots).unsqueeze(1) * bank.index_select(0, slots).float()).to(hidden.dtype)
    hidden.index_add_(0, sel, add)


def _adapt(patch_module) -> None:  # type: ignore[no-untyped-def]
    orig_install = patch_module.install

    def install() -> None:
        orig_install()
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        if getattr(CPUModelRunner.load_model, "_l2s_bench_armed", False):
            return
        orig_load = CPUModelRunner.load_model

        def load_model(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            out = orig_load(self, *args, **kwargs)
            patch_module._install_into_model(self)
            return out

        load_model._l2s_bench_armed = True  # type: ignore[attr-defined]
        CPUModelRunner.load_model = load_model
        if _MODE == "port":
            import torch

            torch.library.register_kernel("hotwire::steer", "cpu", _cpu_steer)
        print(f"l2s-bench: hotwire shim mode={_MODE} pid={os.getpid()}", file=sys.stderr, flush=True)

    patch_module.install = install


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):  # type: ignore[no-untyped-def]
        if name != "hotwire._patch":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        orig_exec = loader.exec_module

        def exec_module(module):  # type: ignore[no-untyped-def]
            orig_exec(module)
            _adapt(module)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


if _MODE in ("arm", "port"):
    sys.meta_path.insert(0, _Finder())
