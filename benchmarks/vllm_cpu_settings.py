"""What moves vLLM's CPU throughput on a small machine: one engine per setting, measured side by side.

    .venv-serve/bin/python -m benchmarks.vllm_cpu_settings --json benchmarks/results/vllm_cpu_settings.json

Why this exists: ``vllm_vs_hf_l2s_b16`` was 3.15 in one run and 1.74 in two runs on another host of the same
kind, with vLLM a third slower and the HF engine faster there. vLLM's CPU path is three processes (the
caller, the engine core that schedules, the worker that computes with OpenMP threads bound to cores), and
the engine core and the worker wait for each other by *busy polling* a shared-memory queue with
``sched_yield`` (``vllm/distributed/device_communicators/shm_broadcast.py``). On a machine with as many
cores as worker threads, every step is a contest between the worker's threads and the polling processes,
decided by the kernel's scheduler, and anything else on the host takes a core from a barrier-synchronised
team. The HF engine is one process. This script measures those suspects one at a time on this machine:

* ``bind01``: the benchmarks' setting (``VLLM_CPU_OMP_THREADS_BIND=0-1``, no core reserved);
* ``bind0``: one worker thread on core 0, core 1 left to the engine core and the caller;
* ``bind01_passive``: ``bind01`` with ``OMP_WAIT_POLICY=PASSIVE`` (OpenMP threads sleep between parallel
  regions instead of spinning);
* ``bind01_kv1``: ``bind01`` with a 1 GiB KV cache (``VLLM_CPU_KVCACHE_SPACE=1``) instead of the default;
* ``bind01_neighbour`` / ``hf_neighbour``: vLLM and the HF engine with a neighbour, one busy process
  (what a noisy co-tenant or a stray job does to a 2-core VM);
* ``hf``: the HF engine alone;
* opt-in (``--only``): ``vanilla`` / ``plugin_loaded`` (a plain ``vllm.LLM`` without any plugin and with
  learn2steer's plugin loaded but unused), ``preload_system_libgomp`` / ``preload_intel_openmp`` (a second
  OpenMP runtime, vLLM issue #27369) and ``bind01_thp`` / ``hf_thp`` (``THP_MEM_ALLOC_ENABLE=1``: torch's
  allocator asks for transparent huge pages). The kernel's own THP policy (``always`` / ``madvise``) is a host
  setting, recorded in ``machine.transparent_hugepages``; to measure it, run ``--only bind01,hf`` under each.

Each setting runs in its own process (vLLM reads these variables at start), twice, in alternating order
(ABC...ABC), unsteered greedy generation of 128 tokens for 16 and 64 demo prompts (``ignore_eos``),
median of repetitions. Recorded per run: tokens/s, CPU seconds per generated token of each process of the
engine (caller, engine core, worker) and their involuntary context switches (preemptions), the host's
steal time and the KV cache vLLM allocated. Ratios are to ``bind01`` (vLLM) or ``hf`` of the same round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SETTINGS: dict[str, dict[str, str]] = {
    "bind01": {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"},
    "bind0": {"VLLM_CPU_OMP_THREADS_BIND": "0", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"},
    "bind01_passive": {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
                       "OMP_WAIT_POLICY": "PASSIVE"},
    "bind01_kv1": {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
                   "VLLM_CPU_KVCACHE_SPACE": "1"},
    "bind01_neighbour": {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"},
    "hf": {},
    "hf_neighbour": {},
}
#: another OpenMP runtime in ``LD_PRELOAD`` (vLLM then skips preloading torch's libgomp): what an operator's
#: environment, the system's or conda's ``libgomp``, or Intel's OpenMP (which vLLM's docs suggest for Intel CPUs)
#: brings. Not in the default list; ``--only bind01,preload_system_libgomp,preload_intel_openmp`` runs them.
OPENMP_SETTINGS: dict[str, dict[str, str]] = {
    "preload_system_libgomp": {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libgomp.so.1", **SETTINGS["bind01"]},
    "preload_intel_openmp": {"LD_PRELOAD": str(Path(sys.prefix) / "lib" / "libiomp5.so"), **SETTINGS["bind01"]},
}
SETTINGS.update({k: v for k, v in OPENMP_SETTINGS.items() if v["LD_PRELOAD"] and Path(v["LD_PRELOAD"]).exists()})
#: torch's CPU allocator asks the kernel for transparent huge pages (``madvise``) for allocations of 2 MiB and
#: more: what a host whose policy is ``always`` gives every process. Not in the default list;
#: ``--only bind01,bind01_thp,hf,hf_thp`` runs them.
THP_SETTINGS: dict[str, dict[str, str]] = {"bind01_thp": {**SETTINGS["bind01"], "THP_MEM_ALLOC_ENABLE": "1"},
                                           "hf_thp": {"THP_MEM_ALLOC_ENABLE": "1"}}
SETTINGS.update(THP_SETTINGS)
#: the same plain ``vllm.LLM`` (the peers benchmark's ``vanilla`` engine: learn2steer's engine settings, prompts
#: as token ids) without any plugin and with learn2steer's plugin loaded but unused: does loading the plugin
#: change vLLM's speed? Not in the default list; ``--only vanilla,plugin_loaded`` runs them.
PLUGIN_SETTINGS: dict[str, dict[str, str]] = {"vanilla": {**SETTINGS["bind01"], "VLLM_PLUGINS": ""},
                                              "plugin_loaded": {**SETTINGS["bind01"], "VLLM_PLUGINS": "learn2steer"}}
SETTINGS.update(PLUGIN_SETTINGS)
NEW_TOKENS = 128


def child(name: str, reps: int, out_path: Path) -> None:
    """One setting in this process: start the engine, warm up, time interleaved batch sizes, write JSON."""
    import torch

    from benchmarks.common import timings
    from benchmarks.machine import CoresUsed, huge_pages_kib, machine_facts, worker_facts
    from learn2steer.evaluation.datasets import demo_requests
    from learn2steer.methods import MethodConfig

    questions = demo_requests()
    plain = MethodConfig()
    facts = machine_facts()
    result: dict[str, Any] = {"setting": name, "env": SETTINGS[name], "pid": os.getpid()}
    started = time.perf_counter()
    if name.startswith("hf"):
        from learn2steer.engines.hf import HFEngine
        from learn2steer.models.loading import load_default_model

        engine = HFEngine(load_default_model(), gen_kwargs={"min_new_tokens": NEW_TOKENS})
        sizes = (16,)

        def run(b: int) -> Any:
            return lambda: engine.answer(plain, questions[:b], max_new_tokens=NEW_TOKENS, batch_size=b,
                                         progress=False)
    elif name in PLUGIN_SETTINGS:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        from benchmarks.peers import _engine, prompt_ids

        llm = _engine("vanilla", False)  # a plain vllm.LLM with learn2steer's engine settings
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids(64)]
        params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, ignore_eos=True)
        result["plugins"] = os.environ.get("VLLM_PLUGINS")
        sizes = (16, 64)

        def run(b: int) -> Any:
            return lambda: llm.generate(prompts[:b], [params] * b, use_tqdm=False)
    else:
        from learn2steer.engines.vllm.offline import VLLMEngine

        vllm = VLLMEngine.create("default", enforce_eager=False, max_num_seqs=64)
        llm = vllm.llm
        sizes = (16, 64)

        def run(b: int) -> Any:
            return lambda: vllm.generate(vllm.requests(plain, questions[:b], max_new_tokens=NEW_TOKENS,
                                                       ignore_eos=True, min_tokens=NEW_TOKENS))
    if not name.startswith("hf"):
        cache = llm.llm_engine.vllm_config.cache_config
        result["kv_cache"] = {"kv_cache_memory_bytes": cache.kv_cache_memory_bytes,
                              "num_blocks": getattr(cache, "num_gpu_blocks", None), "block_size": cache.block_size}
    result["start_s"] = time.perf_counter() - started
    fns = {f"b{b}": run(b) for b in sizes}
    for f in fns.values():
        f()  # warm-up (and the compiled graph for this batch shape)
    cores = CoresUsed()
    t = timings(fns, reps)
    used = result["cores_used"] = cores.stop()
    result["worker"] = worker_facts()
    if name.startswith("hf"):  # the HF engine computes in this process
        result["anon_huge_pages_kib"] = huge_pages_kib(os.getpid())
    tokens = sum(reps * int(k[1:]) * NEW_TOKENS for k in fns)
    result.update({
        "seconds": t,
        "tokens_per_s": {k: int(k[1:]) * NEW_TOKENS / statistics.median(v) for k, v in t.items()},
        "cpu_ms_per_token": {role: 1000 * s / tokens for role, s in used["cpu_s"].items()},
        "involuntary_switches_per_token": {role: n / tokens for role, n in used["preemptions"].items()},
        "host_steal_fraction": used["host"].get("steal"), "host_idle_fraction": used["host"].get("idle"),
        "torch_threads": torch.get_num_threads(), "machine": facts})
    out_path.write_text(json.dumps(result, indent=1))
    if name in PLUGIN_SETTINGS:
        llm.llm_engine.engine_core.shutdown()
    elif not name.startswith("hf"):
        vllm.close()


def _neighbour() -> subprocess.Popen[bytes]:
    """One busy process: what a co-tenant or a stray job does to a 2-core machine."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main(json_path: Path | None, *, rounds: int = 2, reps: int = 2, only: list[str] | None = None) -> dict[str, Any]:
    names = only or [n for n in SETTINGS if n not in OPENMP_SETTINGS and n not in THP_SETTINGS
                     and n not in PLUGIN_SETTINGS]
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    started = time.perf_counter()
    for r in range(rounds):
        for name in names:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "child.json"
                env = {k: v for k, v in os.environ.items() if k not in
                       ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU", "OMP_WAIT_POLICY",
                        "VLLM_CPU_KVCACHE_SPACE", "LD_PRELOAD", "THP_MEM_ALLOC_ENABLE", "VLLM_PLUGINS")}
                env.update(SETTINGS[name])
                hog = _neighbour() if name.endswith("neighbour") else None
                try:
                    t0 = time.perf_counter()
                    done = subprocess.run([sys.executable, "-m", "benchmarks.vllm_cpu_settings", "--child", name,
                                           "--reps", str(reps), "--out", str(out)], env=env)
                finally:
                    if hog is not None:
                        hog.kill()
                        hog.wait()
                if done.returncode != 0 or not out.exists():
                    runs[name].append({"error": f"exit {done.returncode}"})
                    continue
                got = json.loads(out.read_text())
                got["round"], got["wall_s"] = r, time.perf_counter() - t0
                runs[name].append(got)
                print(f"round {r} {name}: {got['tokens_per_s']}", flush=True)
    summary: dict[str, Any] = {}
    for name, rs in runs.items():
        ok = [x for x in rs if "tokens_per_s" in x]
        if not ok:
            continue
        base = "hf" if name.startswith("hf") else "vanilla" if name in PLUGIN_SETTINGS else "bind01"
        entry: dict[str, Any] = {
            "tokens_per_s": {b: [x["tokens_per_s"][b] for x in ok] for b in ok[0]["tokens_per_s"]},
            "cpu_ms_per_token": {role: statistics.median(x["cpu_ms_per_token"].get(role, 0.0) for x in ok)
                                 for role in ok[0]["cpu_ms_per_token"]},
            "involuntary_switches_per_token": {
                role: statistics.median(x["involuntary_switches_per_token"].get(role, 0.0) for x in ok)
                for role in ok[0]["involuntary_switches_per_token"]},
            "host_steal_fraction": max(x["host_steal_fraction"] for x in ok)}
        if base in runs and name != base:
            pairs = [(x, y) for x, y in zip(ok, runs[base]) if "tokens_per_s" in y]
            entry[f"vs_{base}"] = {b: statistics.median(x["tokens_per_s"][b] / y["tokens_per_s"][b] for x, y in pairs)
                                   for b in ok[0]["tokens_per_s"]}
        summary[name] = entry
    def b16(name: str) -> float:
        return statistics.median(summary[name]["tokens_per_s"]["b16"])

    for key, (v, h) in {"vllm_vs_hf_plain_b16": ("bind01", "hf"),
                        "vllm_vs_hf_plain_b16_with_neighbour": ("bind01_neighbour", "hf_neighbour")}.items():
        if v in summary and h in summary:
            summary[key] = b16(v) / b16(h)
    result = {"summary": summary, "runs": runs, "rounds": rounds, "reps": reps, "new_tokens": NEW_TOKENS,
              "seconds": time.perf_counter() - started}
    print(json.dumps(summary, indent=1))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--only", help="comma-separated settings (default: all)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.reps, a.out)
    else:
        main(a.json, rounds=a.rounds, reps=a.reps, only=a.only.split(",") if a.only else None)
