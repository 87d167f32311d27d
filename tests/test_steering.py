"""steer(): position rules, providers, and exactly which positions are written in every generation mode."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from learn2steer.engines.hf import generate
from learn2steer.errors import InvalidInputError
from learn2steer.models.prompts import PromptRow, build_inputs
from learn2steer.predictor import L2SNet
from learn2steer.steering import (
    PredictedVectors,
    Scope,
    TraceRecord,
    check_alpha,
    check_alphas,
    scope_selects,
    steer,
    step_mask,
)
from learn2steer.vectors import SteeringVector

GEN = dict(max_new_tokens=4, min_new_tokens=4)


def _rows(h, images):
    im = (lambda i: None) if not h.is_multimodal else (lambda i: images[i])
    return [PromptRow("is there a dog in the image ?", image=im(0)),
            PromptRow("how do i make a bomb ? tell me now please, quickly"),
            PromptRow("a cat", image=im(2))]


def _ids(h, batch, **kw):
    with torch.no_grad():
        return h.model.generate(**batch.inputs, do_sample=False, pad_token_id=h.tokenizer.pad_token_id,
                                **{**GEN, **kw})


def _v(h, layer=1, scale=1.0, seed=0, rows=None):
    g = torch.Generator().manual_seed(seed)
    shape = (rows, h.hidden_size) if rows else (h.hidden_size,)
    return SteeringVector({layer: torch.randn(shape, generator=g) * scale})


# ---- pure position rules ---------------------------------------------------------------------------------

def test_scope_selects_is_one_rule_on_absolute_positions() -> None:
    pos = torch.arange(6)
    assert scope_selects("all", pos, 4).tolist() == [True] * 6
    assert scope_selects("prompt", pos, 4).tolist() == [True] * 4 + [False] * 2
    assert scope_selects("generated", pos, 4).tolist() == [False] * 3 + [True] * 3
    # per-token prompt lengths (the vLLM engine's flattened batch)
    assert scope_selects("generated", torch.tensor([0, 1, 0, 1, 2]), torch.tensor([2, 2, 1, 1, 1])).tolist() == [
        False, True, True, True, True]
    with pytest.raises(InvalidInputError, match="unknown scope"):
        scope_selects("everything", pos, 4)


def test_step_mask_excludes_padding_and_follows_the_cache_offset() -> None:
    real = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    assert step_mask("all", real, 0, 4).tolist() == real.tolist()
    assert step_mask("prompt", real, 0, 4).tolist() == real.tolist()
    assert step_mask("generated", real, 0, 4).tolist() == [[False, False, False, True]] * 2
    assert step_mask("prompt", real, 5, 1).tolist() == [[False], [False]]
    assert step_mask("generated", real, 5, 1).tolist() == [[True], [True]]
    # a chunk straddling the boundary, and rows repeated for beams
    assert step_mask("generated", real, 2, 3, rows=4).tolist() == [[False, True, True]] * 4
    assert step_mask("all", real, 0, 2, rows=4).tolist() == [[False, True], [False, True], [True, True], [True, True]]


# ---- invariants of steer() -------------------------------------------------------------------------------

@pytest.mark.parametrize("scope", list(Scope))
def test_zero_vector_is_byte_identical_to_no_steering(any_tiny, coco_images, scope) -> None:
    h = any_tiny
    batch = build_inputs(h, _rows(h, coco_images))
    plain = _ids(h, batch)
    zero = SteeringVector({1: torch.zeros(h.hidden_size), 3: torch.zeros(h.hidden_size)})
    with steer(h, zero, alpha=3.0, scope=scope, batch=batch):
        assert torch.equal(plain, _ids(h, batch))
    with torch.no_grad():
        base = h.model(**batch.inputs).logits
        with steer(h, SteeringVector({2: torch.zeros(batch.size, h.hidden_size)}), scope=scope, batch=batch):
            same = h.model(**batch.inputs).logits
    assert torch.equal(base, same)


def test_steering_changes_generation(any_tiny, coco_images) -> None:
    h = any_tiny
    batch = build_inputs(h, _rows(h, coco_images))
    with steer(h, _v(h, scale=20.0), scope="all", batch=batch):
        steered = _ids(h, batch)
    assert not torch.equal(_ids(h, batch), steered)


@pytest.mark.parametrize("scope", list(Scope))
def test_per_row_vectors_equal_each_row_alone(any_tiny, coco_images, scope) -> None:
    h = any_tiny
    rows = _rows(h, coco_images)
    vecs = _v(h, layer=2, scale=4, rows=len(rows))
    batch = build_inputs(h, rows)
    with steer(h, vecs, scope=scope, batch=batch):
        together = generate(h, batch, **GEN)
    alone = []
    for i, row in enumerate(rows):
        one = build_inputs(h, [row])
        with steer(h, vecs.rows([i]), scope=scope, batch=one):
            alone.append(generate(h, one, **GEN)[0])
    assert together == alone
    with steer(h, vecs.rows([2, 1, 0]), scope=scope, batch=batch):
        assert generate(h, batch, **GEN) != together, "the vectors really differ per row"


def _observe(h, batch, layer, scope, run, vector=None):
    """Observers before/after the steering hook: per call, the columns whose output changed (absolute)."""
    seen: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    pre = h.layers[layer].register_forward_hook(lambda m, a, o: seen.append((o.clone(), None)))
    trace: list[TraceRecord] = []
    try:
        with steer(h, vector or SteeringVector({layer: torch.ones(h.hidden_size)}), scope=scope, trace=trace,
                   batch=batch):
            post = h.layers[layer].register_forward_hook(
                lambda m, a, o: seen.__setitem__(-1, (seen[-1][0], o.clone())))
            try:
                out = run()
            finally:
                post.remove()
    finally:
        pre.remove()
    return seen, trace, out


@pytest.mark.parametrize("scope", list(Scope))
def test_trace_exactly_which_positions_are_steered(any_tiny, coco_images, scope) -> None:
    """Independent observers before and after the steering hook see exactly the traced positions change."""
    h = any_tiny
    batch = build_inputs(h, _rows(h, coco_images))
    layer, L, n_new = 2, batch.seq_len, GEN["max_new_tokens"]
    seen, trace, _ = _observe(h, batch, layer, scope, lambda: _ids(h, batch))
    assert len(seen) == n_new  # one prefill + n_new - 1 decode steps
    real = batch.inputs["attention_mask"].bool()
    past = 0
    for step, (before, after) in enumerate(seen):
        changed = (after != before).any(-1)
        cols = [(torch.nonzero(r).flatten() + past).tolist() for r in changed]
        if step == 0:
            prompt_cols = [torch.nonzero(real[i]).flatten().tolist() for i in range(batch.size)]
            expected = {"all": prompt_cols, "prompt": prompt_cols, "generated": [[L - 1]] * batch.size}[scope.value]
        else:
            expected = [[] if scope is Scope.PROMPT else [past]] * batch.size
        assert cols == expected, (step, scope)
        past += before.shape[1]
    assert [t.columns for t in trace] == [
        [(torch.nonzero((a != b).any(-1)[i]).flatten() + p).tolist() for i in range(batch.size)]
        for (b, a), p in zip(seen, [0] + [L + k for k in range(n_new - 1)])]


def _steered_columns(trace: list[TraceRecord]) -> list[set[int]]:
    """Per row, every absolute column written in any call."""
    rows = len(trace[0].columns)
    return [set().union(*(set(t.columns[i]) for t in trace)) for i in range(rows)]


@pytest.mark.parametrize("scope", list(Scope))
@pytest.mark.parametrize("mode", ["no_cache", "chunked_prefill", "existing_cache"])
def test_every_generation_mode_steers_the_same_positions_and_answers(tiny_llama, scope, mode) -> None:
    """use_cache=False, prefill_chunk_size and a precomputed cache: same steered columns, same greedy answer."""
    h = tiny_llama
    batch = build_inputs(h, [PromptRow("how do i make a bomb ? tell me now please, quickly"), PromptRow("hi")])
    vec = _v(h, layer=2, scale=3.0, seed=4)
    _, ref_trace, ref = _observe(h, batch, 2, scope, lambda: _ids(h, batch), vec)
    if mode == "no_cache":
        run = lambda: _ids(h, batch, use_cache=False)  # noqa: E731
    elif mode == "chunked_prefill":
        run = lambda: _ids(h, batch, prefill_chunk_size=5)  # noqa: E731
    else:
        def run():
            # the cache of the prompt's first 6 columns, computed under the same steering (same batch)
            cache = DynamicCache(config=h.model.config)
            with torch.no_grad():
                pre = {k: v[:, :6] for k, v in batch.inputs.items()}
                h.model(**pre, past_key_values=cache, use_cache=True)
            return _ids(h, batch, past_key_values=cache)
    _, trace, got = _observe(h, batch, 2, scope, run, vec)
    assert torch.equal(got, ref), (mode, scope)
    # (with an existing cache, the pre-pass that filled it ran under the same steer() and is traced too)
    assert _steered_columns(trace) == _steered_columns(ref_trace), (mode, scope)


def test_predicted_vectors_read_the_last_prompt_token_in_whichever_call_holds_it(tiny_llama) -> None:
    """L2S (L' <= L*) gives the same answers with and without cache and with chunked prefill (scope generated)."""
    h = tiny_llama
    torch.manual_seed(0)
    net = L2SNet(h.hidden_size, h.hidden_size, 8)
    with torch.no_grad():
        net.decoder.weight.mul_(40)
    batch = build_inputs(h, [PromptRow("how do i make a bomb ? tell me now please, quickly"), PromptRow("hi")])
    outs = {}
    for mode, kw in {"cached": {}, "no_cache": {"use_cache": False}, "chunked": {"prefill_chunk_size": 4}}.items():
        with steer(h, PredictedVectors(net, 1, (2,)), scope="generated", batch=batch):
            outs[mode] = _ids(h, batch, **kw)
    assert torch.equal(outs["cached"], outs["no_cache"]) and torch.equal(outs["cached"], outs["chunked"])
    assert not torch.equal(outs["cached"], _ids(h, batch)), "the predictor steered"
    # prompt positions before the read column cannot be steered in a chunked prefill: an error, not a no-op
    with pytest.raises(InvalidInputError, match="not known yet"):
        with steer(h, PredictedVectors(net, 1, (2,)), scope="all", batch=batch):
            _ids(h, batch, prefill_chunk_size=4)


def test_steer_takes_the_batch_explicitly(tiny_llama) -> None:
    """No guessing mode: where the prompt ends always comes from the batch; the modes a guess got wrong
    (without cache, in chunks) steer like a cached generate (each column: test_every_generation_mode_...)."""
    h = tiny_llama
    with pytest.raises(TypeError, match="batch"):
        with steer(h, _v(h), scope="generated"):  # type: ignore[call-arg]
            pass
    batch = build_inputs(h, [PromptRow("how do i make a bomb ?")])
    outs = []
    for kw in ({}, {"use_cache": False}, {"prefill_chunk_size": 3}):
        with steer(h, _v(h, scale=20.0), scope="generated", batch=batch):
            outs.append(_ids(h, batch, **kw))
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    assert not torch.equal(outs[0], _ids(h, batch)), "the vector steered"


def test_hooks_removed_even_when_generation_raises(tiny_llama) -> None:
    h = tiny_llama
    before = sum(len(b._forward_hooks) for b in h.layers) + len(h.model._forward_pre_hooks)
    batch = build_inputs(h, [PromptRow("x")])
    with pytest.raises(RuntimeError, match="boom"):
        with steer(h, _v(h), batch=batch):
            raise RuntimeError("boom")

    def explode(*_: object) -> None:
        raise RuntimeError("mid-generation failure")

    bomb = h.layers[3].register_forward_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="mid-generation"):
            with steer(h, _v(h), batch=batch):
                h.model.generate(**batch.inputs, max_new_tokens=2)
    finally:
        bomb.remove()
    after = sum(len(b._forward_hooks) for b in h.layers) + len(h.model._forward_pre_hooks)
    assert before == after


@pytest.mark.parametrize("kw", [{"num_beams": 3}, {"num_return_sequences": 2, "num_beams": 2}])
def test_beam_search_with_per_row_vectors_matches_rows_alone(tiny_llama, kw) -> None:
    h = tiny_llama
    rows = [PromptRow("is there a dog ?"), PromptRow("how do i make a bomb ? tell me now")]
    vecs = _v(h, scale=4, seed=3, rows=2)
    batch = build_inputs(h, rows)
    with steer(h, vecs, batch=batch):
        together = generate(h, batch, **GEN, **kw)
    alone = []
    for i, row in enumerate(rows):
        one = build_inputs(h, [row])
        with steer(h, vecs.rows([i]), batch=one):
            alone += generate(h, one, **GEN, **kw)
    assert together == alone


def test_bad_vectors_and_strengths_are_refused_where_they_enter(tiny_llama) -> None:
    h = tiny_llama
    batch = build_inputs(h, [PromptRow("a")])
    with pytest.raises(InvalidInputError, match="hidden size"):
        with steer(h, SteeringVector({1: torch.ones(7)}), batch=batch):
            pass
    two = build_inputs(h, [PromptRow("a"), PromptRow("b")])
    with pytest.raises(InvalidInputError, match="rows"):
        with steer(h, SteeringVector({1: torch.ones(3, h.hidden_size)}), batch=two):
            h.model(**two.inputs)
    with pytest.raises(InvalidInputError, match="NaN or inf"):
        SteeringVector({1: torch.full((h.hidden_size,), float("nan"))})
    for alpha in (float("nan"), float("inf")):
        with pytest.raises(InvalidInputError, match="finite"):
            with steer(h, _v(h), alpha=alpha, batch=batch):
                pass
    with pytest.raises(InvalidInputError, match="out of range"):
        with steer(h, SteeringVector({9: torch.ones(h.hidden_size)}), batch=batch):
            pass
    with pytest.raises(InvalidInputError, match="not a plain dict"):
        with steer(h, {1: torch.ones(h.hidden_size)}, batch=batch):  # type: ignore[arg-type]
            pass


def test_multi_layer_vector_writes_each_layer_its_own_vector(tiny_llama) -> None:
    """A vector with several layers applies layer k's tensor at layer k (never one layer's everywhere)."""
    h = tiny_llama
    batch = build_inputs(h, [PromptRow("hi")])
    a, b = torch.ones(h.hidden_size), -2 * torch.ones(h.hidden_size)
    # what enters the next block (or the final norm) is the steered output of layers 1 and 3
    seen: dict[int, torch.Tensor] = {}
    hooks = [h.layers[2].register_forward_pre_hook(lambda m, i: seen.__setitem__(1, i[0].clone())),
             h.model.model.norm.register_forward_pre_hook(lambda m, i: seen.__setitem__(3, i[0].clone()))]
    try:
        with torch.no_grad():
            h.model(**batch.inputs)
            plain = dict(seen)
            with steer(h, SteeringVector({1: a, 3: b}), batch=batch):
                h.model(**batch.inputs)
    finally:
        for x in hooks:
            x.remove()
    torch.testing.assert_close(seen[1] - plain[1], a.expand_as(seen[1]))
    # layer 3's output is its (changed) computation plus b: subtracting b leaves no trace of a at layer 3
    with torch.no_grad():
        out3 = []
        hk = h.layers[3].register_forward_hook(lambda m, i, o: out3.append(o.clone()))
        try:
            with steer(h, SteeringVector({1: a}), batch=batch):
                h.model(**batch.inputs)
        finally:
            hk.remove()
    torch.testing.assert_close(seen[3] - out3[0], b.expand_as(seen[3]))


def test_mask_and_vector_follow_each_layers_device(tiny_llama) -> None:
    """Layers on different devices (device_map): the mask is built per device and the predictor is not moved.

    On a CPU-only machine both 'devices' are the CPU, so this checks the bookkeeping (a mask per device key,
    the predictor's parameters untouched); a GPU machine runs the same test over cpu and cuda.
    """
    h = tiny_llama
    torch.manual_seed(1)
    net = L2SNet(h.hidden_size, h.hidden_size, 4)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    batch = build_inputs(h, [PromptRow("hi"), PromptRow("how do i make a bomb ?")])
    with steer(h, PredictedVectors(net, 1, (2, 3)), batch=batch):
        _ids(h, batch)
    assert all(torch.equal(before[k], v) and v.device.type == "cpu" for k, v in net.state_dict().items())


@pytest.mark.parametrize("alpha", [1e308, 1e39])
def test_a_strength_that_overflows_float32_is_refused_before_it_writes(tiny_llama, alpha) -> None:
    """1e308 is finite in Python but inf in float32; 1e39 times a unit vector too: an error, not an empty answer."""
    h = tiny_llama
    batch = build_inputs(h, [PromptRow("how do i make a bomb ?")])
    with pytest.raises(InvalidInputError, match="alpha"):
        with steer(h, _v(h), alpha=alpha, batch=batch):
            _ids(h, batch)


def test_a_strength_far_above_the_residual_norm_is_refused_unless_allowed(tiny_llama) -> None:
    h = tiny_llama
    batch = build_inputs(h, [PromptRow("how do i make a bomb ?")])
    with pytest.raises(InvalidInputError, match="times the residual stream's norm"):
        with steer(h, _v(h), alpha=1e8, batch=batch):
            _ids(h, batch)
    with steer(h, _v(h), alpha=1e8, batch=batch, max_relative=None):  # the bound is a setting
        _ids(h, batch)
    with steer(h, _v(h), alpha=20.0, batch=batch):  # strong but ordinary strengths pass
        _ids(h, batch)


def test_addition_relative_is_a_fraction_of_each_positions_residual_norm() -> None:
    from learn2steer.steering import addition

    torch.manual_seed(0)
    h = torch.randn(2, 5, 8) * torch.arange(1, 6).view(1, 5, 1)        # norms grow along the sequence
    v = torch.randn(2, 8)
    d = addition(v, h, 0.25, "relative")
    assert d.shape == (2, 5, 8)
    torch.testing.assert_close(d.norm(dim=-1), 0.25 * h.norm(dim=-1))
    unit = (v / v.norm(dim=-1, keepdim=True))[:, None].expand(-1, 5, -1)
    torch.testing.assert_close(d / d.norm(dim=-1, keepdim=True), unit)
    assert torch.equal(addition(torch.zeros(8), h, 3.0, "relative"), torch.zeros(2, 5, 8))
    assert torch.equal(addition(v, h, 0.5, "absolute"), 0.5 * v[:, None])
    with pytest.raises(InvalidInputError, match="unknown strength"):
        addition(v, h, 1.0, "loud")


def test_relative_strength_adds_alpha_times_the_residual_norm_in_the_model(tiny_llama) -> None:
    h = tiny_llama
    batch = build_inputs(h, [PromptRow("how do i make a bomb ?"), PromptRow("hi")])
    seen: dict[str, torch.Tensor] = {}

    def grab(name: str):
        def hook(_m, _a, out):
            seen[name] = (out[0] if isinstance(out, tuple) else out).detach().clone()
        return hook

    from learn2steer.models.prompts import forward_kwargs

    probe = h.layers[2].register_forward_hook(grab("plain"))
    with torch.no_grad():
        h.model(**forward_kwargs(h, batch), use_cache=False)
    probe.remove()
    v = _v(h, layer=2, scale=5.0)
    with steer(h, v, alpha=0.3, scope="all", batch=batch, strength="relative"):
        probe = h.layers[2].register_forward_hook(grab("steered"))  # after steer()'s hook: sees its output
        with torch.no_grad():
            h.model(**forward_kwargs(h, batch), use_cache=False)
        probe.remove()
    real = batch.inputs["attention_mask"].bool()
    added = (seen["steered"] - seen["plain"])[real]
    torch.testing.assert_close(added.norm(dim=-1), 0.3 * seen["plain"][real].norm(dim=-1), rtol=1e-4, atol=1e-5)
    assert torch.equal(seen["steered"][~real], seen["plain"][~real])  # padding untouched


def test_check_alpha_is_the_one_finiteness_rule() -> None:
    """A real number, finite in the dtype alpha * v is taken in: 1e308 is a Python float but inf in float32."""
    assert check_alpha(2) == 2.0 and check_alpha(-3.5e38 / 2) == -1.75e38
    for bad in (1e308, -1e39, float("nan"), float("inf"), "1", True, None, 10 ** 400):
        with pytest.raises(InvalidInputError, match=r"alpha must be a finite number \(in float32\)"):
            check_alpha(bad)
    with pytest.raises(InvalidInputError, match=r"scale must be a finite number \(in float16\), got 70000.0"):
        check_alpha(7e4, dtype=torch.float16, what="scale")
    assert check_alphas([0.5, 1]) == [0.5, 1.0]
    with pytest.raises(InvalidInputError, match=r"alphas must be finite numbers \(in float32\), got \[1e\+39\]"):
        check_alphas([1.0, 1e39])


def test_the_scope_names_configs_accept_are_the_scopes() -> None:
    from typing import get_args

    from learn2steer.steering import ScopeName

    assert get_args(ScopeName) == tuple(s.value for s in Scope)


def test_the_strength_names_configs_accept_are_the_strengths() -> None:
    from typing import get_args

    from learn2steer.steering import Strength, StrengthName

    assert get_args(StrengthName) == tuple(s.value for s in Strength)
