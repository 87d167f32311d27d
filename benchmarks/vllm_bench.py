"""vLLM figures (run in the serving environment): ``python -m benchmarks --engine vllm --quick --json OUT``.

All measured in one run on the embedded SmolLM2-135M-Instruct, 128 new tokens per request (``ignore_eos``,
so every variant does the same work), greedy, variants interleaved, median of repetitions:

* ``vllm_l2s_vs_plain_b16`` / ``_b64``: throughput of vLLM with L2S on every request over vLLM with
  the same requests unsteered (same engine, plugin loaded): target >= 0.95;
* ``vllm_vs_hf_l2s_b16``: vLLM's L2S throughput over the HF engine's L2S throughput on the same 16
  prompts: target >= 3;
* ``l2s_extra_ttft_ms``: the extra time to first token of the L2S read (one-token requests, batch 16);
* ``vllm_deep_vs_plain_b16`` / ``deep_read_extra_ttft_ms``: the same with the paper's configuration, L' after
  L* (L'=20 > L*=12: each prefill step that holds a read runs a read-only pass up to L' first) and no prefix
  cache reads, as throughput over unsteered and as extra time to first token;
* ``vllm_images_l2s_vs_plain_b16``: image requests (a random LLaVA-1.5 from ``save_tiny`` whose language model
  has about the embedded model's size (512 wide in 4 heads of 128, 30 layers; L'=10 -> L*=12), real COCO images)
  with L2S over the same image requests unsteered: target >= 0.95. ``vllm_images_tiny_l2s_vs_plain_b16``: the
  same on the 128-wide, 4-layer tiny LLaVA of the tests, whose ~5 ms decoding steps make the plugin's fixed
  per-step work (``benchmarks/vllm_plan_probe.py``) a visible fraction: a lower bound, not what a real
  vision-language model sees.
* over HTTP, each from an ``l2s serve`` of its own (not with ``--smoke``): ``chunked_l2s_all_vs_plain_b16`` /
  ``chunked_l2s_generated_vs_plain_b16`` / ``chunked_read_ahead_extra_ttft_ms`` (chunked prefill with the paper's
  scope, ``benchmarks/chunked_read_ahead.py``) and ``registry_churn_vs_quiet_b16`` (throughput while the runtime
  registry replaces an artifact in use once a second, over without: target >= 0.95; ``registry_flood_vs_quiet_b16``
  back to back; ``benchmarks/serve_http.py``).

The L2S predictor has random weights: the cost of reading h, running g and adding v does not depend on
what g learnt, and ``ignore_eos`` keeps the token count fixed. On a CPU, vLLM's worker is bound to every
core (``VLLM_CPU_OMP_THREADS_BIND=0-(n-1)``, no reserved core; by default vLLM keeps one core for its
engine-core process), so that vLLM and the HF engine compute on the same cores.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks.common import print_table, ratio, timings
from benchmarks.machine import CoresUsed, finish, machine_facts, vllm_attention, vllm_gemm, worker_facts


def main(*, quick: bool = False, smoke: bool = False, json_path: Path | None = None) -> dict[str, Any]:
    from learn2steer.artifacts import SteeringArtifact
    from learn2steer.engines.hf import HFEngine
    from learn2steer.engines.vllm.offline import VLLMEngine
    from learn2steer.evaluation.datasets import demo_requests
    from learn2steer.methods import MethodConfig
    from learn2steer.models.loading import DEFAULT_MODEL_NAME, load_default_model
    from learn2steer.predictor import L2SNet

    if not torch.cuda.is_available():
        n = os.cpu_count() or 1
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{n - 1}")
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    reps = 1 if smoke else (3 if quick else 5)
    new_tokens = 16 if smoke else 128
    started = time.perf_counter()
    torch.manual_seed(0)
    hf = load_default_model()
    art = SteeringArtifact(kind="l2s", method="l2s", model=DEFAULT_MODEL_NAME, hidden_size=576, num_layers=30,
                           steer_layers=[12], predictor=L2SNet(576, 576), context_layer=10, alpha=1.0)
    l2s = MethodConfig.from_artifact(art)
    deep = MethodConfig.from_artifact(SteeringArtifact(kind="l2s", method="l2s", model=DEFAULT_MODEL_NAME,
                                                       hidden_size=576, num_layers=30, steer_layers=[12],
                                                       predictor=L2SNet(576, 576), context_layer=20, alpha=1.0))
    plain = MethodConfig()
    questions = demo_requests()
    facts = machine_facts(vllm_gemm=vllm_gemm())  # the GEMM kernel and oneDNN ISA vLLM uses on this host
    engine = VLLMEngine.create("default", enforce_eager=False, max_num_seqs=64)
    attention, worker = vllm_attention(engine.llm), worker_facts()

    def requests(cfg: MethodConfig, n: int, tokens: int) -> list[tuple[Any, Any]]:
        return engine.requests(cfg, questions[:n], max_new_tokens=tokens, ignore_eos=True, min_tokens=tokens)

    out: dict[str, Any] = {}
    def run(cfg: MethodConfig, n: int, tokens: int) -> Callable[[], object]:
        return lambda: engine.generate(requests(cfg, n, tokens))

    cores: dict[str, Any] = {}
    for b in (16, 64):
        fns = {"plain": run(plain, b, new_tokens), "l2s": run(l2s, b, new_tokens)}
        fns["plain"]()  # warm-up (and the compiled graph for this batch shape)
        fns["l2s"]()
        used = CoresUsed()
        t = timings(fns, reps)
        cores[f"b{b}"] = used.stop()
        out[f"vllm_b{b}"] = {"seconds": t, "tokens_per_s": {k: b * new_tokens / statistics.median(v)
                                                           for k, v in t.items()}}
        out[f"vllm_l2s_vs_plain_b{b}"] = ratio(t, "plain", "l2s")
    hf_engine = HFEngine(hf, gen_kwargs={"min_new_tokens": new_tokens})
    q16 = questions[:16]

    def hf_l2s() -> object:
        return hf_engine.answer(l2s, q16, max_new_tokens=new_tokens, batch_size=16, progress=False)

    def vllm_l2s() -> object:
        return engine.generate(requests(l2s, 16, new_tokens))

    hf_l2s()
    t = timings({"hf": hf_l2s, "vllm": vllm_l2s}, reps)
    out["hf_vs_vllm_b16"] = {"seconds": t, "tokens_per_s": {k: 16 * new_tokens / statistics.median(v)
                                                           for k, v in t.items()}}
    out["vllm_vs_hf_l2s_b16"] = ratio(t, "hf", "vllm")

    def extra_ttft(name: str, cfg: MethodConfig) -> float:
        """Median paired difference of one-token requests (batch 16), steered by ``cfg`` minus unsteered (ms)."""
        ttft = timings({"plain": run(plain, 16, 1), name: run(cfg, 16, 1)}, reps * 3)
        diffs = sorted(1000 * (a - b) for a, b in zip(ttft[name], ttft["plain"]))
        out[f"{name}_ttft_b16"] = {"seconds": ttft, f"paired_{name}_minus_plain_ms": diffs}
        return statistics.median(diffs)

    out["l2s_extra_ttft_ms"] = extra_ttft("l2s", l2s)
    fns = {"plain": run(plain, 16, new_tokens), "deep": run(deep, 16, new_tokens)}
    fns["deep"]()
    t = timings(fns, reps)
    out["vllm_deep_b16"] = {"seconds": t, "tokens_per_s": {k: 16 * new_tokens / statistics.median(v)
                                                          for k, v in t.items()}}
    out["vllm_deep_vs_plain_b16"] = ratio(t, "plain", "deep")
    out["deep_read_extra_ttft_ms"] = extra_ttft("deep", deep)
    engine.close()
    out.update(_images(reps, new_tokens, hidden_size=512, num_layers=30, steer=12, context=10,
                       key="vllm_images_l2s_vs_plain_b16"))
    out.update(_images(reps, new_tokens, hidden_size=128, num_layers=4, steer=2, context=1,
                       key="vllm_images_tiny_l2s_vs_plain_b16"))
    http = {} if smoke else _over_http(reps)
    out.update(http)
    result = {**{k: out.get(k) for k in ("vllm_l2s_vs_plain_b16", "vllm_l2s_vs_plain_b64", "vllm_vs_hf_l2s_b16",
                                          "l2s_extra_ttft_ms", "vllm_deep_vs_plain_b16", "deep_read_extra_ttft_ms",
                                          "vllm_images_l2s_vs_plain_b16", "vllm_images_tiny_l2s_vs_plain_b16",
                                          *HTTP_FIGURES)},
              "details": out, "new_tokens": new_tokens, "reps": reps, "quick": quick, "smoke": smoke,
              "machine": finish({**facts, "device": "cuda" if torch.cuda.is_available() else "cpu",
                                 "vllm_cpu_binding": os.environ.get("VLLM_CPU_OMP_THREADS_BIND"),
                                 "vllm_attention": attention, "vllm_worker": worker,
                                 "vllm_cores_used": cores}),
              "seconds": time.perf_counter() - started}
    try:
        import vllm

        result["machine"]["vllm"] = vllm.__version__
    except ImportError:  # pragma: no cover
        pass
    rows = [("vLLM L2S / plain throughput, batch 16", result["vllm_l2s_vs_plain_b16"], ">= 0.95"),
            ("vLLM L2S / plain throughput, batch 64", result["vllm_l2s_vs_plain_b64"], ">= 0.95"),
            ("vLLM / HF throughput with L2S, batch 16", result["vllm_vs_hf_l2s_b16"], ">= 3"),
            ("extra time to first token of the L2S read, batch 16 (ms, median of paired differences)",
             result["l2s_extra_ttft_ms"], ""),
            ("vLLM deep read (L'=20 > L*=12) / plain throughput, batch 16", result["vllm_deep_vs_plain_b16"], ""),
            ("extra time to first token of a deep read, batch 16 (ms)", result["deep_read_extra_ttft_ms"], ""),
            *([("vLLM image requests L2S / plain throughput, batch 16 (LLaVA, language model 512 x 30)",
                result["vllm_images_l2s_vs_plain_b16"], ">= 0.95"),
               ("vLLM image requests L2S / plain throughput, batch 16 (tiny LLaVA 128 x 4: lower bound)",
                result["vllm_images_tiny_l2s_vs_plain_b16"], "")]
              if result["vllm_images_l2s_vs_plain_b16"] is not None else []),
            *([("l2s serve, chunked prefill (32-token steps): L2S at scope all / plain throughput, batch 16",
                result["chunked_l2s_all_vs_plain_b16"], ""),
               ("l2s serve, chunked prefill: L2S at scope generated / plain throughput, batch 16",
                result["chunked_l2s_generated_vs_plain_b16"], ""),
               ("l2s serve, chunked prefill: extra time to first token of the read-ahead, batch 16 (ms)",
                result["chunked_read_ahead_extra_ttft_ms"], ""),
               ("l2s serve: throughput while the registry replaces an artifact in use once a second / without, b16",
                result["registry_churn_vs_quiet_b16"], ">= 0.95"),
               ("l2s serve: the same with replacements back to back (worst case)",
                result["registry_flood_vs_quiet_b16"], "")] if http else [])]
    print_table(rows)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1))
    return result


#: the figures of `l2s serve` over HTTP (``benchmarks.chunked_read_ahead``, ``benchmarks.serve_http``)
HTTP_FIGURES = ("chunked_l2s_all_vs_plain_b16", "chunked_l2s_generated_vs_plain_b16",
                "chunked_read_ahead_extra_ttft_ms", "registry_churn_vs_quiet_b16", "registry_flood_vs_quiet_b16")


def _over_http(reps: int) -> dict[str, Any]:
    """The serving figures, each from a server of its own: chunked prefill's read-ahead, the registry under churn."""
    from benchmarks import chunked_read_ahead, serve_http

    chunked = chunked_read_ahead.main(reps=reps)
    registry = serve_http.main(reps=reps)
    return {**{k: chunked[k] for k in HTTP_FIGURES if k in chunked},
            "registry_churn_vs_quiet_b16": registry["registry_churn_vs_quiet_b16"],
            "registry_flood_vs_quiet_b16": registry["registry_flood_vs_quiet_b16"],
            "serve_chunked": chunked, "serve_registry": registry}


def _images(reps: int, new_tokens: int, *, hidden_size: int, num_layers: int, steer: int, context: int,
            key: str) -> dict[str, Any]:
    """Image requests with and without L2S on a random LLaVA-1.5 of this language-model size (nothing without the
    COCO images)."""
    import tempfile

    from benchmarks.extraction import coco_images
    from learn2steer.artifacts import SteeringArtifact
    from learn2steer.behaviours import Example
    from learn2steer.engines.vllm.offline import VLLMEngine
    from learn2steer.methods import MethodConfig
    from learn2steer.models.tiny import save_tiny
    from learn2steer.predictor import L2SNet

    images = coco_images(4)
    if not images:
        return {key: None, f"{key}_skipped": "no COCO images (set L2S_DATA)"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_tiny("llava", Path(tmp) / "llava", hidden_size=hidden_size, num_layers=num_layers, seed=1)
        torch.manual_seed(0)
        art = SteeringArtifact(kind="l2s", method="l2s", model="tiny", hidden_size=hidden_size, num_layers=num_layers,
                               steer_layers=[steer], predictor=L2SNet(hidden_size, hidden_size), context_layer=context)
        cfgs = {"plain": MethodConfig(), "l2s": MethodConfig.from_artifact(art)}
        examples = [Example(f"i{k}", "describe this image in detail .", images[k % len(images)]) for k in range(16)]
        engine = VLLMEngine.create(str(folder), enforce_eager=True, max_model_len=512, max_num_seqs=16)
        try:
            fns = {name: (lambda c=cfg: engine.generate(engine.requests(c, examples, max_new_tokens=new_tokens,
                                                                         ignore_eos=True, min_tokens=new_tokens)))
                   for name, cfg in cfgs.items()}
            for f in fns.values():
                f()
            t = timings(fns, reps)
        finally:
            engine.close()
    return {key.replace("_l2s_vs_plain", ""): {
        "seconds": t,
        "model": f"random LLaVA-1.5 (save_tiny), language model {hidden_size} x {num_layers}, COCO images",
        "tokens_per_s": {k: 16 * new_tokens / statistics.median(v) for k, v in t.items()}},
        key: ratio(t, "plain", "l2s")}
