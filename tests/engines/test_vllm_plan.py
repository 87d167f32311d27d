"""The vLLM plugin's per-step plan and op body, without vLLM: plain arrays in, rows read and written out.

The same functions run inside vLLM's worker (``tests/engines/test_vllm*.py`` check them there against the
HF engine); here each rule is checked on hand-built steps: which rows a scope writes, where an L2S request
reads (and when in a pass of its own), that a non-finite addition fails its request alone, that a
read-only pass cannot disturb the steered pass's inputs, and that a finished request leaves nothing behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from learn2steer import SteeringArtifact
from learn2steer.engines.requests import Registry
from learn2steer.engines.vllm.plan import (
    ARTIFACT_CACHE,
    Plan,
    StepBatch,
    StopForward,
    Sum,
    WorkerState,
    apply,
    build_plan,
    put_tokens,
    read_pass,
)
from learn2steer.predictor import L2SNet

D, N = 8, 4


def _batch(reqs: list[tuple[str, dict[str, Any] | None, int, int, int]]) -> StepBatch:
    """(id, extra_args, tokens in this step, tokens already computed, prompt length) per request."""
    counts = [r[2] for r in reqs]
    extra = {r[0]: r[1] for r in reqs}
    return StepBatch(req_ids=[r[0] for r in reqs], query_start_loc=np.concatenate([[0], np.cumsum(counts)]),
                     num_computed=np.array([r[3] for r in reqs]), num_prompt=np.array([r[4] for r in reqs]),
                     extra_args=extra.__getitem__)


@pytest.fixture()
def registry(tmp_path: Path) -> Registry:
    torch.manual_seed(0)
    net = L2SNet(D, D)
    arts = {"l2s": SteeringArtifact(kind="l2s", method="l2s", model="t", hidden_size=D, num_layers=N,
                                    steer_layers=[2], context_layer=1, predictor=net),
            "deep": SteeringArtifact(kind="l2s", method="l2s", model="t", hidden_size=D, num_layers=N,
                                     steer_layers=[1], context_layer=3, predictor=net),
            "last": SteeringArtifact(kind="l2s", method="l2s", model="t", hidden_size=D, num_layers=N,
                                     steer_layers=[2], context_layer=1, context_read="input_last", predictor=net)}
    return Registry({k: str(a.save(tmp_path / k)) for k, a in arts.items()}, allow_paths=True)


def test_plan_of_a_mixed_step(registry: Registry) -> None:
    """A prefill of 5 tokens (fixed vector, scope generated: only the last prompt token, whose output is the
    first generated token's input), a 4-token prefill of an
    L2S request (read at its last prompt token, written everywhere), a deep L2S prefill (read in the early
    pass), a decode row, and an unsteered request."""
    state = WorkerState()
    inline = {"steer_vector": [1.0] * D, "steer_layers": [2], "scope": "generated"}
    batch = _batch([("gen", inline, 5, 0, 5), ("l2s", {"steer": "l2s"}, 4, 0, 4), ("deep", {"steer": "deep"}, 3, 0, 3),
                    ("dec", {"steer_vector": [2.0] * D, "steer_layers": [0, 2]}, 1, 7, 6), ("none", None, 2, 0, 2)])
    plan = build_plan(state, batch, registry.parse)
    assert plan is not None
    assert {layer: [r[:2] for r in reads] for layer, reads in plan.captures.items()} == {1: [(8, "l2s")]}
    assert {layer: [r[:2] for r in reads] for layer, reads in plan.early.items()} == {3: [(11, "deep")]}
    written = {layer: {w.rid: list(w.rows) for w in ws} for layer, ws in plan.writes.items()}
    assert written == {2: {"gen": [4], "l2s": [5, 6, 7, 8], "dec": [12]}, 1: {"deep": [9, 10, 11]}, 0: {"dec": [12]}}
    assert state.requests["none"] is None and "gen" in state.requests
    assert build_plan(WorkerState(), _batch([("none", None, 3, 0, 3)]), registry.parse) is None


def test_apply_reads_then_writes_and_fails_a_non_finite_request_alone(registry: Registry) -> None:
    state = WorkerState()
    big = {"steer_vector": [3e38] * D, "steer_layers": [2], "alpha": 10.0}
    batch = _batch([("l2s", {"steer": "l2s"}, 3, 0, 3), ("big", big, 2, 0, 2),
                    ("ok", {"steer_vector": [1.0] * D, "steer_layers": [2], "alpha": 0.5}, 2, 0, 2)])
    state.plan = build_plan(state, batch, registry.parse)
    hidden, residual = torch.randn(7, D), torch.randn(7, D)
    before = residual.clone()
    apply(state, Sum(hidden, residual), residual, 1)  # the L2S read: nothing written at layer 1
    assert torch.equal(residual, before)
    v = state.vectors["l2s"]
    assert torch.allclose(v, state.predictor(state.requests["l2s"], torch.device("cpu"))(  # type: ignore[arg-type]
        (hidden[2] + residual[2])[None])[0])
    apply(state, Sum(hidden, residual), residual, 2)
    assert torch.allclose(residual[:3], before[:3] + v)
    assert torch.equal(residual[3:5], before[3:5]), "the overflowing request's rows are left as they were"
    assert torch.allclose(residual[5:], before[5:] + 0.5)
    assert set(state.failed) == {"big"} and "not finite" in state.failed["big"]
    assert torch.isfinite(residual).all()


def test_a_predictor_nan_fails_its_request_alone(registry: Registry, monkeypatch) -> None:
    state = WorkerState()
    state.plan = build_plan(state, _batch([("a", {"steer": "l2s"}, 2, 0, 2), ("b", {"steer": "l2s"}, 2, 0, 2)]),
                            registry.parse)
    monkeypatch.setattr(state, "predictor", lambda req, dev: lambda h: torch.stack([h[0], h[1] * float("nan")]))
    residual = torch.randn(4, D)
    apply(state, residual, residual, 1)
    assert set(state.vectors) == {"a"} and set(state.failed) == {"b"}


def test_read_pass_gives_the_steered_pass_untouched_inputs(registry: Registry) -> None:
    """A layer may update its residual input in place (vLLM's fused add + RMSNorm on GPUs); for a multimodal
    model that input is the runner's ``inputs_embeds`` buffer. The read pass runs on copies."""
    state = WorkerState()
    plan = build_plan(state, _batch([("deep", {"steer": "deep"}, 3, 0, 3)]), registry.parse)
    assert plan is not None and plan.early
    embeds = torch.randn(3, D)
    original = embeds.clone()
    layers_seen = []

    def forward(*, inputs_embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = inputs_embeds
        for layer in range(N):
            x.mul_(1.5)  # in place, as a fused kernel would
            layers_seen.append(layer)
            apply(state, x, x, layer)
        return x

    read_pass(state, plan, forward, (), {"inputs_embeds": embeds, "positions": torch.arange(3)})
    assert torch.equal(embeds, original), "the buffer the steered pass reads is unchanged"
    assert layers_seen == [0, 1, 2, 3] and "deep" in state.vectors  # stopped after L' = 3 (the last layer)
    assert torch.allclose(state.vectors["deep"], state.predictor(state.requests["deep"], torch.device("cpu"))(  # type: ignore[arg-type]
        (original[2] * 1.5 ** 4)[None])[0])
    assert state.plan is None


def test_read_pass_that_never_reaches_its_layer_is_an_error(registry: Registry) -> None:
    state = WorkerState()
    plan = build_plan(state, _batch([("deep", {"steer": "deep"}, 3, 0, 3)]), registry.parse)
    assert plan is not None
    with pytest.raises(RuntimeError, match="without reaching its layer"):
        read_pass(state, plan, lambda **k: None, (), {})
    with pytest.raises(ValueError):  # any other error of the forward is the forward's, not swallowed
        read_pass(state, plan, lambda **k: (_ for _ in ()).throw(ValueError("boom")), (), {})
    assert issubclass(StopForward, Exception) and isinstance(plan, Plan)


def test_finished_requests_leave_nothing_behind(registry: Registry) -> None:
    """vLLM removes a request: its L2S vector and its inline vectors go (0.3 kept inline vectors forever)."""
    state = WorkerState()
    reqs = [(f"r{i}", {"steer_vector": [float(i)] * D, "steer_layers": [2]}, 2, 0, 2) for i in range(5)]
    reqs.append(("l", {"steer": "l2s"}, 2, 0, 2))
    state.plan = build_plan(state, _batch(reqs), registry.parse)
    residual = torch.zeros(12, D)
    for layer in range(N):
        apply(state, residual, residual, layer)
    assert torch.equal(residual[2:4], torch.ones(2, D)), "each inline request adds its own vector"
    assert state.stored() == 6
    for rid, *_ in reqs:
        state.forget(rid)
    assert state.stored() == 0 and not state.requests and not state.failed


def test_artifact_tensors_are_bounded(registry: Registry, tmp_path: Path) -> None:
    state = WorkerState()
    for i in range(ARTIFACT_CACHE + 5):
        state._cached((f"path:{i}", "cpu"), lambda: torch.zeros(1))
    assert len(state.cache) == ARTIFACT_CACHE and ("path:0", "cpu") not in state.cache


def test_an_input_last_read_with_tokens_put_in_place(registry: Registry) -> None:
    """LLaVA-1.5's template: the official state is the bare prompt's lone "▁" (token 7 here), which the full prompt
    lacks. The read (L'=1 <= L*=2) moves to a pass of its own in which that token replaces the prompt's at the read
    row, in the ids and in the embeddings; the steered pass's inputs stay untouched."""
    state = WorkerState()
    last = {"steer": "last", "l2s_read_back": 0, "l2s_read_tokens": [7]}
    batch = _batch([("other", None, 2, 0, 2), ("last", last, 5, 0, 5)])
    plan = build_plan(state, batch, registry.parse)
    assert plan is not None and not plan.captures
    assert {layer: [r[:2] for r in reads] for layer, reads in plan.early.items()} == {1: [(6, "last")]}
    assert plan.put == [(6, 7)]
    assert {layer: {w.rid: list(w.rows) for w in ws} for layer, ws in plan.writes.items()} == {2: {"last": [2, 3, 4,
                                                                                                        5, 6]}}
    emb = torch.nn.Embedding(16, D)
    ids = torch.tensor([1, 2, 3, 4, 5, 6, 9])
    embeds = emb(ids).detach()
    before = (ids.clone(), embeds.clone())
    seen: list[torch.Tensor] = []

    def forward(*, input_ids: torch.Tensor, inputs_embeds: torch.Tensor) -> None:
        seen.append(input_ids.clone())
        x = inputs_embeds
        for layer in range(N):
            x = x.cumsum(0)  # a causal mix: row 6 depends on rows 0..6
            apply(state, x, x, layer)

    read_pass(state, plan, forward, (), {"input_ids": ids, "inputs_embeds": embeds},
              embed=lambda t: emb(t).detach())
    assert torch.equal(ids, before[0]) and torch.equal(embeds, before[1]), "the steered pass's inputs are untouched"
    assert seen[0].tolist() == [1, 2, 3, 4, 5, 6, 7]
    put = emb(torch.tensor([1, 2, 3, 4, 5, 6, 7])).detach()
    h = put.cumsum(0).cumsum(0)[6]  # layer 1's output at the read row, with token 7 in place
    want = state.predictor(state.requests["last"], torch.device("cpu"))(h[None])[0]  # type: ignore[arg-type]
    torch.testing.assert_close(state.vectors["last"], want)


def test_tokens_put_in_place_must_be_in_the_read_step(registry: Registry) -> None:
    """Two tokens put in place ending at the read row, the first one computed in an earlier step: that request
    fails alone (its earlier chunk already holds the full prompt's token there)."""
    state = WorkerState()
    two = {"steer": "last", "l2s_read_back": 1, "l2s_read_tokens": [7, 8]}
    plan = build_plan(state, _batch([("two", two, 2, 6, 8)]), registry.parse)  # positions 6, 7; reads 5, 6
    assert (plan is None or not plan.early) and "two" in state.failed
    with pytest.raises(RuntimeError, match="neither"):
        put_tokens([(0, 1)], {"input_ids": None, "inputs_embeds": None}, None)


def test_inline_vectors_per_layer_are_written_at_their_own_layers() -> None:
    """A request whose vectors differ between layers adds each layer's own (the HF engine's per-input vectors)."""
    state = WorkerState()
    extra = {"steer_vector": [[1.0] * D, [3.0] * D], "steer_layers": [0, 2], "alpha": 2.0}
    state.plan = build_plan(state, _batch([("r", extra, 2, 0, 2)]), Registry({}, allow_paths=True).parse)
    added = {}
    for layer in (0, 2):
        residual = torch.zeros(2, D)
        apply(state, residual, residual, layer)
        added[layer] = residual
    assert torch.equal(added[0], torch.full((2, D), 2.0)) and torch.equal(added[2], torch.full((2, D), 6.0))


def test_read_ahead_of_a_chunked_prompt(registry: Registry) -> None:
    """Chunked prefill (``l2s serve``): a ``read`` request reads v at its last prompt token and writes nothing (also
    with L' > L*: no pass of its own); the ``ahead`` request with the same digest then steers its first chunk,
    which comes before its last prompt token, with that v, and reads nothing itself."""
    state = WorkerState()
    for name in ("l2s", "deep"):
        read = {"steer": name, "l2s_mode": "read", "l2s_prompt_digest": f"p-{name}"}
        first = build_plan(state, _batch([(f"r-{name}", read, 4, 0, 10)]), registry.parse)  # chunk 1: no write
        assert first is not None and not first.writes and not first.captures
        last = build_plan(state, _batch([(f"r-{name}", read, 6, 4, 10)]), registry.parse)  # reads at row 9 - 4
        assert last is not None and not last.writes and not last.early
        assert [r[:2] for reads in last.captures.values() for r in reads] == [(5, f"r-{name}")]
        state.plan = last
        h = torch.randn(6, D)
        for layer in range(N):
            apply(state, h, h.clone(), layer)
        assert torch.equal(state.ahead[f"p-{name}"], state.vectors[f"r-{name}"])
        ahead = {"steer": name, "l2s_mode": "ahead", "l2s_prompt_digest": f"p-{name}"}
        plan = build_plan(state, _batch([(f"a-{name}", ahead, 4, 0, 10)]), registry.parse)  # its first chunk
        assert plan is not None and not plan.captures and not plan.early
        assert [list(w.rows) for ws in plan.writes.values() for w in ws] == [[0, 1, 2, 3]]
        assert torch.equal(state.vectors[f"a-{name}"], state.ahead[f"p-{name}"])
    lost = {"steer": "l2s", "l2s_mode": "ahead", "l2s_prompt_digest": "gone"}
    assert build_plan(state, _batch([("lost", lost, 4, 0, 10)]), registry.parse) is None
    assert "no longer held" in state.failed["lost"], "a vector that is not there fails that request, never unsteered"
