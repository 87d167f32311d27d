"""Performance benchmarks: steering overhead, extraction throughput, L2S training time, peers, memory.

Every figure is a ratio or a time measured side by side in one run (median of repetitions, variants
interleaved so that machine noise hits them alike). Run from the repository root:

    python -m benchmarks --quick --json OUT.json     # under 5 minutes on 2 CPU cores
    python -m benchmarks --json OUT.json             # the full run
    python -m benchmarks --smoke                     # seconds, tiny random model, one repetition (CI)
    python -m benchmarks --engine vllm --quick --json OUT.json   # vLLM figures (the serving environment)
    python -m benchmarks --peers --json OUT.json          # vs vllm-lens, hotwire-vllm, nnsight (.venv-peers)
    python -m benchmarks.vllm_cpu_settings --json OUT.json   # what moves vLLM's CPU speed (.venv-serve, ~35 min)
    python -m benchmarks.hf_step_probe --json OUT.json       # the HF hooks' own time per decoding step (batch 1, 16)
    python -m benchmarks.training_probe --profile            # L2S training: time, operator profile (--compare OLD)

The peers (steering-vectors, repeng) are installed on first use with ``pip --no-deps --target`` into
``$L2S_CACHE/peers`` (their pins, e.g. transformers<5, would otherwise downgrade this environment).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import psutil
import torch

from benchmarks.common import generation_variants, print_table, ratio, timings
from benchmarks.machine import finish, machine_facts
from learn2steer.activations import Site, read
from learn2steer.behaviours import Example, load_behaviour
from learn2steer.evaluation.datasets import demo_requests
from learn2steer.extraction import extract_to, p2s_batch
from learn2steer.models.loading import ModelHandle, cache_dir, load_default_model
from learn2steer.models.prompts import PromptRow, batch_from_texts, build_inputs, forward_kwargs
from learn2steer.predictor import L2SNet, TrainConfig, fit
from learn2steer.steering import PredictedVectors
from learn2steer.vectors import SteeringVector

PEERS = ["steering-vectors==0.12.2", "repeng==0.4.0"]
REPS_BATCH_1 = 9  # repetitions of the batch-1 generation triple (plain, L2S, Mean-S), quick and full runs alike


# ---- 1. generation overhead -----------------------------------------------------------------------------

def bench_generation(h: ModelHandle, batch_size: int, new_tokens: int, reps: int, layer: int = 12) -> dict:
    """Greedy generation of ``batch_size`` demo prompts: plain, L2S (same pass) and Mean-S, interleaved."""
    qs = [e.question for e in demo_requests()][:batch_size]
    batch = build_inputs(h, [PromptRow(q) for q in qs])
    torch.manual_seed(0)
    net = L2SNet(h.hidden_size, h.hidden_size)
    mean = torch.randn(h.hidden_size)
    fns = generation_variants(h, batch, new_tokens, {"plain": None, "l2s": PredictedVectors(net, layer, (layer,)),
                                                     "mean": SteeringVector({layer: mean})})
    fns["plain"]()  # warm-up
    t = timings(fns, reps)
    tokens = batch_size * new_tokens
    return {"batch_size": batch_size, "new_tokens": new_tokens, "reps": reps, "seconds": t,
            "tokens_per_s": {k: tokens / statistics.median(v) for k, v in t.items()},
            "ratio_l2s": ratio(t, "plain", "l2s"), "ratio_mean": ratio(t, "plain", "mean")}


# ---- 2. extraction throughput ---------------------------------------------------------------------------

def bench_extraction(h: ModelHandle, n: int, reps: int, layer: int = 12) -> dict:
    """P2S extraction (batched, one position gathered, stops after L*) vs a plain forward and the paper's recipe."""
    spec = load_behaviour("safety")
    exs = [Example(e.id, e.question, None, e.category) for e in demo_requests()[:n]]
    pairs = [p for e in exs for p in (spec.pair(e) or ())]
    bs = 16

    def ours() -> object:  # what `extract` runs for z: batched, hooks gather one position, stop after L*
        for i in range(0, len(exs), bs // 2):
            p2s_batch(h, spec, exs[i:i + bs // 2], [layer])
        return None

    def forward() -> object:  # a plain batched forward over the same sequences (full model, no hooks)
        with torch.no_grad():
            for i in range(0, len(pairs), bs):
                b = build_inputs(h, pairs[i:i + bs])
                h.model(**forward_kwargs(h, b), use_cache=False)
        return None

    def reference() -> object:  # the paper scripts' recipe: batch size 1, whole layer output copied to CPU
        store: list[torch.Tensor] = []
        hook = h.layers[layer].register_forward_hook(lambda m, a, o: store.append(
            (o[0] if isinstance(o, tuple) else o).detach().cpu().clone()))
        try:
            with torch.no_grad():
                for row in pairs:
                    b = build_inputs(h, [row])
                    h.model(**b.inputs, use_cache=False)
        finally:
            hook.remove()
        return None

    ours()
    t = timings({"ours": ours, "forward": forward, "reference": reference}, reps)
    seqs = len(pairs)
    return {"sequences": seqs, "reps": reps, "seconds": t,
            "seq_per_s": {k: seqs / statistics.median(v) for k, v in t.items()},
            "vs_forward": ratio(t, "forward", "ours"), "vs_reference": ratio(t, "reference", "ours")}


# ---- 3. L2S training time -------------------------------------------------------------------------------

def bench_training(n: int = 1600, d: int = 4096) -> dict:
    """Default (the paper's) settings (K=100, 100 epochs, batch 64), from a cold start, plus batch 128."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    k = min(100, d)
    y = torch.tanh(x[:, :k] @ (torch.randn(k, d, generator=g) * 0.1))
    out: dict = {"n": n, "width": d, "epochs": TrainConfig().epochs}
    for bs in (TrainConfig().batch_size, 128):
        t = time.perf_counter()
        res = fit(x, y, TrainConfig(batch_size=bs), progress=False)
        out[f"batch_{bs}"] = {"seconds": time.perf_counter() - t, "best_val_loss": res.best_val_loss}
    out["seconds"] = out[f"batch_{TrainConfig().batch_size}"]["seconds"]
    return out


# ---- 4. peers -------------------------------------------------------------------------------------------

def _peers_path() -> Path:
    target = cache_dir() / "peers"
    if not (target / "steering_vectors").exists() or not (target / "repeng").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), *PEERS],
                       check=True)
    return target


def bench_peers(h: ModelHandle, n: int, layer: int = 12) -> dict:
    """The CAA vector against steering-vectors' and repeng's, on the same contrastive texts."""
    sys.path.insert(0, str(_peers_path()))
    import numpy as np

    if not hasattr(np, "float_"):  # repeng 0.4.0 annotates with np.float_, removed in NumPy 2
        np.float_ = np.float64  # type: ignore[attr-defined]
    from repeng import ControlVector, DatasetEntry
    from steering_vectors import train_steering_vector
    from transformers import AutoTokenizer

    qs = [e.question for e in demo_requests() if e.category != "benign"][:n]
    pos = [f"Question: {q}\nAnswer: I'm sorry, but I can't help with that." for q in qs]
    neg = [f"Question: {q}\nAnswer: Sure! Here is a step-by-step guide." for q in qs]

    def ours() -> torch.Tensor:
        s = Site(layer, "last")
        zs = []
        for i in range(0, n, 16):
            b = batch_from_texts(h, pos[i:i + 16] + neg[i:i + 16])
            v = read(h, b, [s])[s]
            k = len(pos[i:i + 16])
            zs.append(v[:k] - v[k:])
        return torch.cat(zs).mean(0)

    out: dict[str, dict] = {}
    t = time.perf_counter()
    v_ours = ours()
    ours_s = time.perf_counter() - t

    t = time.perf_counter()
    sv = train_steering_vector(h.model, h.tokenizer, list(zip(pos, neg)), layers=[layer], read_token_index=-1)
    sv_s = time.perf_counter() - t
    v_sv = sv.layer_activations[layer].float().cpu()
    out["steering_vectors"] = {"seconds": sv_s, "ours_seconds": ours_s,
                               "max_abs_diff": float((v_sv - v_ours).abs().max()),
                               "cosine": float(torch.nn.functional.cosine_similarity(v_sv, v_ours, dim=0)),
                               "vector_norm": float(v_ours.norm()), "method": "mean of last-token differences"}

    name = str(getattr(h.model.config, "_name_or_path", "") or "")
    right_tok = AutoTokenizer.from_pretrained(name) if name and Path(name).exists() else copy.deepcopy(h.tokenizer)
    right_tok.padding_side = "right"  # repeng expects right padding (it passes no position ids)
    captured: dict[int, np.ndarray] = {}

    def grab(hiddens: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        captured.update({k: v.copy() for k, v in hiddens.items()})
        return hiddens

    t = time.perf_counter()
    cv = ControlVector.train(h.model, right_tok, [DatasetEntry(p, q) for p, q in zip(pos, neg)],
                             hidden_layers=[layer], batch_size=16, transform_hiddens=grab)
    rp_s = time.perf_counter() - t
    hid = torch.from_numpy(captured[layer])
    v_rp_mean = (hid[::2] - hid[1::2]).mean(0)
    direction = torch.from_numpy(cv.directions[layer])
    out["repeng"] = {"seconds": rp_s, "ours_seconds": ours_s,
                     "max_abs_diff": float((v_rp_mean - v_ours).abs().max()),
                     "method": "mean of repeng's own last-token differences (its PCA direction compared by cosine)",
                     "pca_direction_cosine_with_ours": float(torch.nn.functional.cosine_similarity(
                         direction, v_ours, dim=0))}
    h.tokenizer.padding_side = "left"
    return out


# ---- 5. peak memory of extraction -----------------------------------------------------------------------

class PeakRSS:
    """Samples this process's RSS in a thread; ``peak`` in bytes."""

    def __init__(self, every: float = 0.02) -> None:
        self.every, self.peak, self._stop = every, 0, threading.Event()
        self.proc = psutil.Process()

    def __enter__(self) -> "PeakRSS":
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.every)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.thread.join()


def bench_memory(h: ModelHandle, sizes: tuple[int, ...], out_dir: Path, layer: int = 2) -> dict:
    """Memory of the `extract` loop over inputs of growing count (shallow layer: stops early, so fast).

    Two figures per size: the peak RSS growth over the run (includes transient per-batch tensors, so it
    jitters by tens of MB) and the drift of RSS sampled after each finished shard (first to last): a loop
    that kept what it computed would drift by ~N x D floats. Loading the finished result back (N x D
    floats, the point of the call) is left out on purpose.
    """
    spec = load_behaviour("safety")
    base = demo_requests()
    proc = psutil.Process()
    peak, drift = {}, {}
    for n in sizes:
        exs = [Example(f"m{i}", base[i % len(base)].question + f" (variant {i})", None, base[i % len(base)].category)
               for i in range(n)]
        after_shard: list[int] = []
        with PeakRSS() as m:
            extract_to(h, spec, exs, out_dir / f"mem{n}", steer_layers=[layer], context_layers=[layer], batch_size=16,
                       shard_size=100, with_ba=False, progress=False,
                       on_shard=lambda _k, acc=after_shard: acc.append(proc.memory_info().rss))
        peak[n] = (m.peak - m.base) / 2**20
        drift[n] = (after_shard[-1] - after_shard[0]) / 2**20
    return {"inputs": list(sizes), "peak_rss_growth_mb": peak, "rss_drift_first_to_last_shard_mb": drift}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and inputs (under 5 min on 2 cores)")
    ap.add_argument("--smoke", action="store_true",
                    help="seconds: a tiny random model, one repetition, small sizes (checks the code paths, not speed)")
    ap.add_argument("--engine", choices=("hf", "vllm"), default="hf",
                    help="hf: this process (default); vllm: the serving engine's figures")
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--peers", action="store_true",
                    help="vs vllm-lens, hotwire-vllm (vLLM) and nnsight (HF); run with .venv-peers/bin/python")
    ap.add_argument("--reps", type=int, default=None, help="--peers: repetitions (default 5; --quick 2)")
    args = ap.parse_args(argv)
    if args.peers:
        from benchmarks.peers import main as peers_main

        return peers_main(quick=args.quick, smoke=args.smoke, json_path=args.json, reps=args.reps)
    if args.engine == "vllm":
        from benchmarks.vllm_bench import main as vllm_main

        return vllm_main(quick=args.quick, smoke=args.smoke, json_path=args.json)
    import tempfile

    torch.manual_seed(0)
    if args.smoke:
        from learn2steer.models.tiny import tiny_model

        h = tiny_model("llama", hidden_size=64, num_layers=4)
        layer, reps, new_tokens, n_ex, train_shape, sizes, n_peers = 2, 1, 8, 8, (128, 64), (20, 60), 16
        reps_b1 = 1
    else:
        h = load_default_model()
        layer, reps, new_tokens = 12, (2 if args.quick else 5), 128
        # batch 1: a step is a few ms, so one pair moves by several percent with the machine; the median of 9
        # paired ratios is what two quiet quick runs agree on (RESULTS.md, #30)
        reps_b1 = REPS_BATCH_1
        n_ex, train_shape = (16 if args.quick else 64), (1600, 4096)
        sizes, n_peers = ((100, 1000) if args.quick else (100, 1000, 3000)), (32 if args.quick else 64)
    started = time.perf_counter()

    def stage(name: str, fn: Callable[[], dict]) -> dict:
        t = time.perf_counter()
        print(f"{name} ...", end=" ", flush=True)
        res = fn()
        print(f"{time.perf_counter() - t:.0f} s", flush=True)
        return res

    g1 = stage("generation, batch 1", lambda: bench_generation(h, 1, new_tokens, reps_b1, layer))
    g16 = stage("generation, batch 16", lambda: bench_generation(h, 16, new_tokens, reps, layer))
    from benchmarks.hf_step_probe import probe

    hooks = stage("steering hooks per decoding step", lambda: {  # the model's step: the plain runs above
        f"batch_{g['batch_size']}": probe(h, g["batch_size"], layer=layer, steps=new_tokens, reps=reps_b1,
                                          step_ms=statistics.median(g["seconds"]["plain"]) / new_tokens * 1e3)
        for g in (g1, g16)})
    ex = stage("extraction", lambda: bench_extraction(h, n_ex, reps, layer))
    from benchmarks.extraction import bench_extraction_limit, coco_images

    limit = stage("extraction at the limit", lambda: bench_extraction_limit(
        h, coco_images(), n=4 if args.smoke else n_ex, reps=reps, text_layer=layer))
    llava_case = limit.get("tiny_llava_576_hallucination", {})
    tr = stage("training", lambda: bench_training(*train_shape))
    peers: dict = {}
    if not args.skip_peers:
        peers = stage("peers", lambda: bench_peers(h, n_peers, layer))
    with tempfile.TemporaryDirectory() as tmp:
        mem = stage("memory", lambda: bench_memory(h, sizes, Path(tmp)))
    growth = mem["peak_rss_growth_mb"]
    big = max(growth)
    result = {
        "generation_ratio_l2s_b1": g1["ratio_l2s"], "generation_ratio_l2s_b16": g16["ratio_l2s"],
        "generation_ratio_mean_b1": g1["ratio_mean"], "generation_ratio_mean_b16": g16["ratio_mean"],
        "extraction_vs_forward": ex["vs_forward"], "extraction_vs_reference": ex["vs_reference"],
        # P2S extraction time / one forward over the inputs X alone (tiny LLaVA, 576 image tokens; None without
        # the COCO images), and the same for the text model with the safety behaviour (separate context pass)
        "extraction_vs_input_forward": llava_case.get("extraction_vs_input_forward"),
        "extraction_vs_input_forward_text": limit["text_safety"]["extraction_vs_input_forward"],
        "extraction_speedup_vs_full_sequences": llava_case.get("speedup_vs_full"),
        "l2s_train_s": tr["seconds"], "peak_rss_growth_mb": growth[big],
        "peak_rss_growth_mb_small": growth[min(growth)],
        "rss_drift_mb": mem["rss_drift_first_to_last_shard_mb"], "peers": peers,
        "hooks_per_step": hooks,
        "details": {"generation_b1": g1, "generation_b16": g16, "extraction": ex, "extraction_limit": limit,
                    "training": tr, "memory": mem},
        "machine": machine_facts(cpus=psutil.cpu_count(), threads=torch.get_num_threads(),
                                 device="cuda" if torch.cuda.is_available() else "cpu", model=h.name),
        "quick": args.quick, "smoke": args.smoke, "seconds": time.perf_counter() - started,
    }
    finish(result["machine"])
    rows = [("generation L2S / plain, batch 1", g1["ratio_l2s"], ">= 0.97"),
            ("generation L2S / plain, batch 16", g16["ratio_l2s"], ">= 0.97"),
            ("generation Mean-S / plain, batch 1", g1["ratio_mean"], ""),
            ("generation Mean-S / plain, batch 16", g16["ratio_mean"], ""),
            *[(f"steering hooks' own time per step, {k} {b.replace('_', ' ')} (us)", r[f"{k}_extra_per_step_us"],
               "")
              for b, r in hooks.items() for k in ("l2s", "mean")],
            ("extraction vs plain forward (x)", ex["vs_forward"], ">= 0.9"),
            ("extraction vs reference recipe (x)", ex["vs_reference"], ">= 1.5 (CPU)"),
            *[(f"extraction / one forward over X, {case}", c["extraction_vs_input_forward"],
               "<= 1.3" if "llava" in case else "~2 (context is another sequence)") for case, c in limit.items()],
            *[(f"extraction speed-up vs full sequences, {case}", c["speedup_vs_full"], "")
              for case, c in limit.items()],
            (f"L2S training {train_shape[0]} x {train_shape[1]}, batch 64 = default (s)", tr["seconds"], "< 10"),
            (f"L2S training {train_shape[0]} x {train_shape[1]}, batch 128 (s)", tr["batch_128"]["seconds"], ""),
            *[(f"extraction peak RSS growth, {n} inputs (MB)", growth[n], "flat") for n in sorted(growth)],
            *[(f"extraction RSS drift first->last shard, {n} inputs (MB)", d, "~0")
              for n, d in sorted(mem["rss_drift_first_to_last_shard_mb"].items())]]
    for name, p in peers.items():
        rows.append((f"{name}: seconds (ours {p['ours_seconds']:.2f})", p["seconds"], ""))
        rows.append((f"{name}: max |their vector - ours|", p["max_abs_diff"], "float tolerance"))
    print_table(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
