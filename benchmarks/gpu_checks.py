"""Checks only a GPU can make, with random-weight Llama models built from configs (nothing downloaded).

    python -m benchmarks.gpu_checks --json OUT.json

1. Layers on different devices (``device_map``: the first half on CUDA, the rest on the CPU): steering
   with per-row vectors and with a predictor gives the same tokens as the all-CPU model, the scope mask
   is built per device, and the predictor is not moved.
2. bfloat16 on CUDA: a zero vector is bit-for-bit no steering; same-pass L2S equals the two-pass recipe.
3. Overhead of the HF engine on a GPU: greedy generation, 128 new tokens, plain vs L2S vs Mean-S,
   interleaved repetitions, median ratio (a ~1B-parameter random Llama in bfloat16).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch


def _model(hidden: int, layers: int, vocab: int, dtype: torch.dtype, seed: int = 0) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    from learn2steer.models.loading import make_handle
    from learn2steer.models.tiny import tiny_tokenizer

    tok = tiny_tokenizer("llama")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=max(vocab, len(tok)), hidden_size=hidden, intermediate_size=hidden * 3,
                      num_hidden_layers=layers, num_attention_heads=max(4, hidden // 128), num_key_value_heads=4,
                      max_position_embeddings=2048, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.bos_token_id, tie_word_embeddings=False, initializer_range=0.2)
    model = LlamaForCausalLM(cfg).to(dtype)
    return make_handle(model, tok, name=f"random-llama-{hidden}x{layers}")


def check_device_map() -> dict[str, Any]:
    from learn2steer.engines.hf import generate_tokens
    from learn2steer.models.prompts import PromptRow, build_inputs
    from learn2steer.predictor import L2SNet
    from learn2steer.steering import PredictedVectors, steer
    from learn2steer.vectors import SteeringVector

    ref = _model(256, 6, 400, torch.float32)
    split = _model(256, 6, 400, torch.float32)
    from accelerate import dispatch_model

    dmap = {"model.embed_tokens": 0, "model.rotary_emb": 0, **{f"model.layers.{i}": 0 if i < 3 else "cpu"
                                                                 for i in range(6)},
            "model.norm": "cpu", "lm_head": "cpu"}
    split.model = dispatch_model(split.model, device_map=dmap)
    layer_devices = {i: str(next(split.layers[i].parameters()).device) for i in range(6)}
    rows = [PromptRow("how do i make a bomb ? tell me now"), PromptRow("is there a dog ?")]
    g = torch.Generator().manual_seed(1)
    vec = SteeringVector({1: torch.randn(2, 256, generator=g) * 4, 4: torch.randn(2, 256, generator=g) * 4})
    torch.manual_seed(2)
    net = L2SNet(256, 256, 8)
    with torch.no_grad():
        net.decoder.weight.mul_(30)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    out: dict[str, Any] = {"layer_devices": layer_devices}
    cases = (("per_row_vectors", vec), ("predictor_reads_cuda_writes_cpu", PredictedVectors(net, 2, (4,))),
             ("predictor_reads_and_writes_across", PredictedVectors(net, 1, (2, 3, 4))))
    for name, provider in cases:
        results = []
        for h in (ref, split):
            batch = build_inputs(h, rows)
            with steer(h, provider, alpha=1.0, batch=batch):
                results.append(generate_tokens(h, batch, max_new_tokens=12))
        out[name] = {"same_tokens_as_single_device": results[0] == results[1],
                     "steered": results[0] != generate_tokens(ref, build_inputs(ref, rows), max_new_tokens=12)}
    out["predictor_not_moved"] = all(torch.equal(before[k], v) and v.device.type == "cpu"
                                     for k, v in net.state_dict().items())
    return out


def check_bf16() -> dict[str, Any]:
    from learn2steer.activations import Site, read
    from learn2steer.engines.hf import generate_tokens
    from learn2steer.models.prompts import PromptRow, build_inputs
    from learn2steer.predictor import L2SNet
    from learn2steer.steering import PredictedVectors, steer
    from learn2steer.vectors import SteeringVector

    h = _model(512, 8, 400, torch.bfloat16)
    h.model.to("cuda")
    batch = build_inputs(h, [PromptRow("how do i make a bomb ? tell me now"), PromptRow("hi")])
    plain = generate_tokens(h, batch, max_new_tokens=16)
    with steer(h, SteeringVector({3: torch.zeros(512)}), alpha=5.0, batch=batch):
        zero = generate_tokens(h, batch, max_new_tokens=16)
    torch.manual_seed(3)
    net = L2SNet(512, 512, 16).cuda()
    with torch.no_grad():
        net.decoder.weight.mul_(20)
    with steer(h, PredictedVectors(net, 2, (4,)), alpha=1.0, batch=batch):
        same = generate_tokens(h, batch, max_new_tokens=16)
    hx = read(h, batch, [Site(2, "prompt_last")])[Site(2, "prompt_last")]
    with steer(h, SteeringVector({4: net(hx.cuda()).detach().cpu()}), alpha=1.0, batch=batch):
        two = generate_tokens(h, batch, max_new_tokens=16)
    return {"zero_vector_equals_plain": zero == plain, "same_pass_equals_two_pass": same == two,
            "steering_changed_tokens": same != plain, "dtype": str(h.dtype)}


def bench_overhead(batch_size: int, reps: int = 5, new_tokens: int = 128) -> dict[str, Any]:
    from benchmarks.common import generation_variants, ratio, timings
    from learn2steer.evaluation.datasets import demo_requests
    from learn2steer.models.prompts import PromptRow, build_inputs
    from learn2steer.predictor import L2SNet
    from learn2steer.steering import PredictedVectors
    from learn2steer.vectors import SteeringVector

    h = _model(2048, 16, 32000, torch.bfloat16)
    h.model.to("cuda")
    qs = [e.question for e in demo_requests()][:batch_size]
    batch = build_inputs(h, [PromptRow(q) for q in qs])
    net = L2SNet(2048, 2048).cuda()
    mean = torch.randn(2048) * 0.01
    fns = generation_variants(h, batch, new_tokens, {"plain": None, "l2s": PredictedVectors(net, 8, (8,)),
                                                     "mean": SteeringVector({8: mean})})
    for fn in fns.values():
        fn()
    times = timings(fns, reps, sync=torch.cuda.synchronize)
    return {"batch_size": batch_size, "new_tokens": new_tokens, "reps": reps, "seconds": times,
            "tokens_per_s": {k: batch_size * new_tokens / statistics.median(v) for k, v in times.items()},
            "ratio_l2s": ratio(times, "plain", "l2s"), "ratio_mean": ratio(times, "plain", "mean")}


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_checks")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--only", default="", help="comma-separated subset of the checks")
    ap.add_argument("--reps", type=int, default=5, help="repetitions of each overhead timing")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: these checks need a GPU")
    res: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    import transformers

    res["transformers"] = transformers.__version__
    only = set(args.only.split(",")) if args.only else None
    checks = (("device_map", check_device_map), ("bf16", check_bf16),
              ("overhead_b16", lambda: bench_overhead(16, args.reps)),
              ("overhead_b64", lambda: bench_overhead(64, args.reps)))
    for name, fn in checks:
        if only and name not in only:
            continue
        t = time.perf_counter()
        try:
            res[name] = fn()
        except Exception as e:  # report every check, even when one breaks
            res[name] = {"error": f"{type(e).__name__}: {e}"}
        res[name + "_seconds"] = round(time.perf_counter() - t, 1)
        print(name, json.dumps(res[name])[:400], flush=True)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
