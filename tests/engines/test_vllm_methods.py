"""Methods beyond L2S on vLLM, through the same plugin: CAST (a predictor kind registered by its own module) and
norm-relative strength equal the HF engine token for token (tiny random Llama, float32, greedy, one engine)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.serve
vllm = pytest.importorskip("vllm")

from learn2steer import MethodConfig, SteeringArtifact  # noqa: E402
from learn2steer.activations import Site, read  # noqa: E402
from learn2steer.cast import CASTNet  # noqa: E402
from learn2steer.engines.hf import HFEngine  # noqa: E402
from learn2steer.evaluation.datasets import demo_requests  # noqa: E402
from learn2steer.models.prompts import PromptRow, build_inputs  # noqa: E402
from learn2steer.predictor import L2SNet  # noqa: E402
from learn2steer.vectors import SteeringVector  # noqa: E402

N_NEW = 12
EXAMPLES = demo_requests()[1:60:10]
STEER, CONTEXT = 2, 1


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from learn2steer.engines.vllm.offline import VLLMEngine
    from learn2steer.models.loading import load_model
    from learn2steer.models.tiny import save_tiny

    folder = str(save_tiny("llama", tmp_path_factory.mktemp("llama"), hidden_size=128, num_layers=4, seed=2))
    h = load_model(folder)
    d = h.hidden_size
    batch = build_inputs(h, [PromptRow(e.question) for e in EXAMPLES])
    states = read(h, batch, [Site(CONTEXT, "prompt_last"), Site(STEER, "prompt_last")])
    ctx, norm = states[Site(CONTEXT, "prompt_last")], float(states[Site(STEER, "prompt_last")].norm(dim=-1).mean())
    g = torch.Generator().manual_seed(0)
    cast = CASTNet(d)
    with torch.no_grad():  # a condition that holds for half of the examples, a behaviour vector that changes answers
        cast.center.copy_(ctx.mean(0))
        c = torch.randn(d, generator=g)
        cast.condition.copy_(c / c.norm())
        sims = torch.sort(cast.similarity(ctx)).values  # midway between the middle two: no input on the edge,
        cast.threshold.fill_(float(sims[2:4].mean()))   # where float rounding of h could flip the condition
        b = torch.randn(d, generator=g)
        cast.behaviour.copy_(3.0 * norm * b / b.norm())
    common = dict(model="tiny", hidden_size=d, num_layers=4, steer_layers=[STEER])
    v = torch.randn(d, generator=g)
    torch.manual_seed(0)
    net = L2SNet(d, d)
    arts = {"cast": SteeringArtifact(kind="cast", method="cast", context_layer=CONTEXT, predictor=cast, **common),
            "mean": SteeringArtifact(kind="fixed", method="mean", vector=SteeringVector({STEER: v}), **common),
            "l2s": SteeringArtifact(kind="l2s", method="l2s", context_layer=CONTEXT, predictor=net, **common)}
    engine = VLLMEngine.create(folder, enforce_eager=True, max_model_len=512, block_size=32)
    yield h, engine, arts, cast.holds(ctx)
    engine.close()


def test_cast_and_relative_strength_equal_hf_in_one_mixed_batch(setup) -> None:
    h, engine, arts, holds = setup
    assert 0 < int(holds.sum()) < len(EXAMPLES), "the condition must hold for some examples and not others"
    cfgs = {"none": MethodConfig(), "cast": MethodConfig.from_artifact(arts["cast"], alpha=1.0),
            "mean_relative": MethodConfig.from_artifact(arts["mean"], alpha=1.5, strength="relative"),
            "l2s_relative": MethodConfig.from_artifact(arts["l2s"], alpha=1.5, strength="relative")}
    eos = h.tokenizer.eos_token_id
    reqs, order = [], []
    for name, cfg in cfgs.items():
        reqs += engine.requests(cfg, EXAMPLES, max_new_tokens=N_NEW)
        order += [name] * len(EXAMPLES)
    outs = engine.generate(reqs)
    got: dict[str, list] = {n: [] for n in cfgs}
    for name, o in zip(order, outs):
        got[name].append([t for t in o.outputs[0].token_ids if t != eos])
    for name, cfg in cfgs.items():
        want = [[t for t in x[0] if t != eos] for x in HFEngine(h).answer_tokens(
            cfg, EXAMPLES, max_new_tokens=N_NEW, batch_size=8, progress=False)]
        assert got[name] == want, name
    # CAST steered exactly the examples whose condition holds; relative strength steered everything
    for i, on in enumerate(holds.tolist()):
        assert (got["cast"][i] != got["none"][i]) == on, i
    assert got["mean_relative"] != got["none"] and got["l2s_relative"] != got["none"]


def test_per_input_vectors_that_differ_between_layers_equal_hf(setup) -> None:
    """What the HF engine takes, vLLM takes: per-input vectors with another vector at each layer go inline, one per
    layer (0.3 refused them)."""
    h, engine, _, _ = setup
    d = h.hidden_size
    g = torch.Generator().manual_seed(1)
    rows = {layer: torch.randn(len(EXAMPLES), d, generator=g) * 4.0 for layer in (CONTEXT, STEER)}
    cfg = MethodConfig(method="p2s", vector=SteeringVector(rows), row_ids=[e.id for e in EXAMPLES])
    assert isinstance(engine.extra_args(cfg, EXAMPLES)[0]["steer_vector"][0], list)
    eos = h.tokenizer.eos_token_id
    got = [[t for t in o.outputs[0].token_ids if t != eos] for o in engine.generate(
        engine.requests(cfg, EXAMPLES, max_new_tokens=N_NEW))]
    want = [[t for t in x[0] if t != eos] for x in HFEngine(h).answer_tokens(
        cfg, EXAMPLES, max_new_tokens=N_NEW, batch_size=8, progress=False)]
    plain = [[t for t in x[0] if t != eos] for x in HFEngine(h).answer_tokens(
        MethodConfig(), EXAMPLES, max_new_tokens=N_NEW, batch_size=8, progress=False)]
    assert got == want and got != plain
