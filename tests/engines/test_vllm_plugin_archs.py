"""The plugin finds decoder layers by structure: tiny random Mistral, Qwen3 and Gemma3 steered on vLLM equal HF.

Runs in the serving environment (marker ``serve``). Mistral's decoder layer subclasses Llama's but overrides
``forward`` (a class patch of Llama's layer missed it and the engine died); Qwen3 and Gemma3 have their own
layer classes (Gemma3 with extra norms around the MLP). Each model is tiny (width 128, 4 heads of 32, 2 KV
heads, 4 layers), random and float32, so both engines run the same weights greedily; one vLLM engine per
architecture, shared by its tests.
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.serve
vllm = pytest.importorskip("vllm")

from learn2steer import MethodConfig, SteeringArtifact  # noqa: E402
from learn2steer.engines.hf import HFEngine  # noqa: E402
from learn2steer.evaluation.datasets import demo_requests  # noqa: E402
from learn2steer.predictor import L2SNet  # noqa: E402
from learn2steer.vectors import SteeringVector  # noqa: E402

N_NEW = 12
EXAMPLES = demo_requests()[3:30:9]
STEER, CONTEXT = 2, 1


def build_tiny(arch: str, folder) -> str:
    """A tiny random ``arch`` checkpoint both engines load (save_pretrained + tokenizer)."""
    from learn2steer.models.tiny import save_tiny

    return str(save_tiny(arch, folder, hidden_size=128, num_layers=4, seed=1))


def residual_norm(handle) -> float:
    """The residual stream's norm after layer L* on a prompt (Gemma scales its embeddings: much larger)."""
    ids = handle.tokenizer(EXAMPLES[0].question, return_tensors="pt")
    with torch.no_grad():
        out = handle.model(**ids, output_hidden_states=True)
    return float(out.hidden_states[STEER + 1][0].norm(dim=-1).mean())


def tiny_artifacts(d: int, n: int, norm: float) -> dict[str, SteeringArtifact]:
    """A fixed vector and a random L2S predictor (L'=1 < L*=2), about twice the residual's norm: they change
    greedy answers."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(d, generator=g)
    mean = SteeringArtifact(kind="fixed", method="mean", model="tiny", hidden_size=d, num_layers=n,
                            steer_layers=[STEER], vector=SteeringVector({STEER: 2.0 * norm * v / v.norm()}))
    torch.manual_seed(0)
    net = L2SNet(d, d)
    with torch.no_grad():
        net.decoder.weight.mul_(2.0 * norm)
    l2s = SteeringArtifact(kind="l2s", method="l2s", model="tiny", hidden_size=d, num_layers=n, steer_layers=[STEER],
                           context_layer=CONTEXT, predictor=net)
    return {"mean": mean, "l2s": l2s}


@pytest.fixture(scope="module", params=["mistral", "qwen3", "gemma3"])
def tiny(request, tmp_path_factory):
    """(arch, HF handle, vLLM engine, artifacts) for one architecture; the engine is closed after its tests."""
    from learn2steer.engines.vllm.offline import VLLMEngine
    from learn2steer.models.loading import load_model

    folder = build_tiny(request.param, tmp_path_factory.mktemp(request.param))
    handle = load_model(folder)
    arts = tiny_artifacts(int(handle.model.config.get_text_config().hidden_size), 4, residual_norm(handle))
    old = os.environ.get("L2S_VLLM_MAX_ALPHA")
    os.environ["L2S_VLLM_MAX_ALPHA"] = "1e38"  # lets a request overflow float32 in the op (tested below)
    engine = VLLMEngine.create(folder, enforce_eager=True, max_model_len=512, block_size=32)
    yield request.param, handle, engine, arts
    engine.close()
    if old is None:
        os.environ.pop("L2S_VLLM_MAX_ALPHA")
    else:
        os.environ["L2S_VLLM_MAX_ALPHA"] = old


def _tokens(outs, eos: int) -> list[list[int]]:
    return [[t for t in o.outputs[0].token_ids if t != eos] for o in outs]


def test_steered_tiny_models_equal_hf_token_for_token(tiny) -> None:
    arch, handle, engine, arts = tiny
    cfgs = {"none": MethodConfig(), "mean": MethodConfig.from_artifact(arts["mean"], alpha=1.0),
            "l2s": MethodConfig.from_artifact(arts["l2s"], alpha=1.0)}
    eos = handle.tokenizer.eos_token_id
    reqs, order = [], []
    for name, cfg in cfgs.items():  # one vLLM call: every method in one batch
        reqs += engine.requests(cfg, EXAMPLES, max_new_tokens=N_NEW)
        order += [name] * len(EXAMPLES)
    outs = engine.generate(reqs)
    got: dict[str, list] = {n: [] for n in cfgs}
    for name, toks in zip(order, _tokens(outs, eos)):
        got[name].append(toks)
    for name, cfg in cfgs.items():
        want = [[t for t in x[0] if t != eos] for x in HFEngine(handle).answer_tokens(
            cfg, EXAMPLES, max_new_tokens=N_NEW, batch_size=8, progress=False)]
        assert got[name] == want, (arch, name)
    assert got["mean"] != got["none"] and got["l2s"] != got["none"], (arch, "steering changed the answers")


def test_layers_were_found_by_structure(tiny) -> None:
    """The steered engine answered above; here: the layer search itself, on vLLM's own module tree."""
    from learn2steer.engines.vllm.layers import decoder_layers

    arch, handle, _, _ = tiny
    # HF's module tree has the same shape (model.layers); the search skips vision towers and wrong lengths
    found = decoder_layers(handle.model, 4)
    assert [p for p, _ in found] == [f"model.layers.{i}" for i in range(4)], arch
    assert decoder_layers(handle.model, 5) == []


def test_an_overflowing_addition_fails_that_request_alone(tiny) -> None:
    """alpha * v finite in Python but inf in float32: that request ends with an error, nothing is written, and
    the engine answers every later request (steered or not, sharing its prompt) exactly as before."""
    arch, handle, engine, arts = tiny
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    mean = MethodConfig.from_artifact(arts["mean"], alpha=1.0)
    eos = handle.tokenizer.eos_token_id
    before = {n: _tokens(engine.run(c, EXAMPLES[:2], max_new_tokens=N_NEW, progress=False), eos)
              for n, c in (("none", MethodConfig()), ("mean", mean))}
    ids = engine.token_ids(MethodConfig(), EXAMPLES[:1])[0]
    d = int(handle.model.config.get_text_config().hidden_size)
    bad = {"steer_vector": [10.0] * d, "steer_layers": [STEER], "alpha": 1e38}  # 1e39 > float32's 3.4e38
    ok = {"steer_vector": [0.01] * d, "steer_layers": [STEER], "alpha": 1.0}
    outs = engine.llm.generate([TokensPrompt(prompt_token_ids=ids)] * 2,
                               [SamplingParams(temperature=0.0, max_tokens=N_NEW, extra_args=x) for x in (bad, ok)],
                               use_tqdm=False)
    assert outs[0].outputs[0].finish_reason == "error", outs[0]
    assert outs[1].outputs[0].finish_reason != "error" and len(outs[1].outputs[0].token_ids) > 0, outs[1]
    after = {n: _tokens(engine.run(c, EXAMPLES[:2], max_new_tokens=N_NEW, progress=False), eos)
             for n, c in (("none", MethodConfig()), ("mean", mean))}
    assert after == before, arch


def test_tensor_parallel_2_equals_hf(tmp_path, monkeypatch) -> None:
    """TP=2 (vLLM's CPU multiproc executor, 2 heads and 1 KV head per rank): each rank holds the full residual
    stream and computes the same v; the steered answers equal HF's (and so TP=1's, tested above)."""
    from learn2steer.engines.vllm.offline import VLLMEngine
    from learn2steer.models.loading import load_model

    folder = build_tiny("mistral", tmp_path / "mistral")
    handle = load_model(folder)
    arts = tiny_artifacts(128, 4, residual_norm(handle))
    cfgs = {"none": MethodConfig(), "mean": MethodConfig.from_artifact(arts["mean"], alpha=1.0),
            "l2s": MethodConfig.from_artifact(arts["l2s"], alpha=1.0)}
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per rank (the CI machine has 2)
    with VLLMEngine.create(folder, enforce_eager=True, max_model_len=512, block_size=32,
                           tensor_parallel_size=2) as engine:
        reqs = [r for c in cfgs.values() for r in engine.requests(c, EXAMPLES, max_new_tokens=N_NEW)]
        outs = _tokens(engine.generate(reqs), handle.tokenizer.eos_token_id)
    eos = handle.tokenizer.eos_token_id
    for k, (name, cfg) in enumerate(cfgs.items()):
        want = [[t for t in x[0] if t != eos] for x in HFEngine(handle).answer_tokens(
            cfg, EXAMPLES, max_new_tokens=N_NEW, batch_size=8, progress=False)]
        assert outs[k * len(EXAMPLES):(k + 1) * len(EXAMPLES)] == want, name
    assert outs[len(EXAMPLES):2 * len(EXAMPLES)] != outs[:len(EXAMPLES)], "steering changed the answers"
