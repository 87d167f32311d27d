from __future__ import annotations

import pytest
import torch

from learn2steer.generation import generate
from learn2steer.models.prompts import PromptRow, build_inputs
from learn2steer.steering import Scope, TraceRecord, scope_mask, steer

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


def test_scope_mask_is_a_pure_column_rule() -> None:
    attn = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    assert scope_mask("all", attn, 0, 4).tolist() == attn.tolist()
    assert scope_mask("prompt", attn, 0, 4).tolist() == attn.tolist()
    assert scope_mask("generated", attn, 0, 4).tolist() == [[False, False, False, True]] * 2
    step = torch.ones(2, 1, dtype=torch.bool)
    assert scope_mask("prompt", step, 5, 4).tolist() == [[False], [False]]
    assert scope_mask("generated", step, 5, 4).tolist() == [[True], [True]]
    with pytest.raises(ValueError):
        scope_mask("everything", attn, 0, 4)


@pytest.mark.parametrize("scope", list(Scope))
def test_zero_vector_is_byte_identical_to_no_steering(any_tiny, coco_images, scope) -> None:
    h = any_tiny
    batch = build_inputs(h, _rows(h, coco_images))
    plain = _ids(h, batch)
    with steer(h, {1: torch.zeros(h.hidden_size), 3: torch.zeros(batch.size, h.hidden_size)}, alpha=3.0, scope=scope):
        zero = _ids(h, batch)
    assert torch.equal(plain, zero)
    with torch.no_grad():
        base = h.model(**batch.inputs).logits
        with steer(h, {2: torch.zeros(h.hidden_size)}, scope=scope):
            same = h.model(**batch.inputs).logits
    assert torch.equal(base, same)


def test_steering_changes_generation(any_tiny, coco_images) -> None:
    h = any_tiny
    batch = build_inputs(h, _rows(h, coco_images))
    plain = _ids(h, batch)
    with steer(h, {1: torch.randn(h.hidden_size, generator=torch.Generator().manual_seed(1))}, alpha=20.0,
               scope="all"):
        steered = _ids(h, batch)
    assert not torch.equal(plain, steered)


@pytest.mark.parametrize("scope", list(Scope))
def test_per_row_vectors_equal_each_row_alone(any_tiny, coco_images, scope) -> None:
    h = any_tiny
    rows = _rows(h, coco_images)
    vecs = torch.randn(len(rows), h.hidden_size, generator=torch.Generator().manual_seed(0)) * 4
    batch = build_inputs(h, rows)
    with steer(h, {2: vecs}, scope=scope):
        together = generate(h, batch, **GEN)
    alone = []
    for i, row in enumerate(rows):
        with steer(h, {2: vecs[i]}, scope=scope):
            alone.append(generate(h, build_inputs(h, [row]), **GEN)[0])
    assert together == alone
    # and the vectors really differ per row: swapping them changes the answers
    with steer(h, {2: vecs.flip(0)}, scope=scope):
        swapped = generate(h, batch, **GEN)
    assert swapped != together


@pytest.mark.parametrize("scope", list(Scope))
def test_trace_exactly_which_positions_are_steered(any_tiny, coco_images, scope) -> None:
    """Independent observers before and after the steering hook see exactly the traced positions change."""
    h = any_tiny
    batch = build_inputs(h, _rows(h, coco_images))
    layer, L, n_new = 2, batch.seq_len, GEN["max_new_tokens"]
    seen: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    pre = h.layers[layer].register_forward_hook(lambda m, a, o: seen.append((o.clone(), None)))
    trace: list[TraceRecord] = []
    try:
        with steer(h, {layer: torch.ones(h.hidden_size)}, scope=scope, trace=trace):
            post = h.layers[layer].register_forward_hook(
                lambda m, a, o: seen.__setitem__(-1, (seen[-1][0], o.clone())))
            try:
                _ids(h, batch)
            finally:
                post.remove()
    finally:
        pre.remove()
    assert len(seen) == n_new  # one prefill + n_new - 1 decode steps
    real = batch.inputs["attention_mask"].bool()
    past = 0
    for step, (before, after) in enumerate(seen):
        changed = (after != before).any(-1)  # [B, cur]
        cols = [(torch.nonzero(r).flatten() + past).tolist() for r in changed]
        if step == 0:
            prompt_cols = [torch.nonzero(real[i]).flatten().tolist() for i in range(batch.size)]
            expected = {"all": prompt_cols, "prompt": prompt_cols, "generated": [[L - 1]] * batch.size}[scope.value]
        else:
            expected = [[] if scope is Scope.PROMPT else [past]] * batch.size
        assert cols == expected, (step, scope)
        past += before.shape[1]
    # the engine's own trace agrees with what the observers saw (it omits nothing, adds nothing)
    assert [t.columns for t in trace] == [
        [(torch.nonzero((a != b).any(-1)[i]).flatten() + p).tolist() for i in range(batch.size)]
        for (b, a), p in zip(seen, [0] + [L + k for k in range(n_new - 1)])]


def test_hooks_removed_even_when_generation_raises(tiny_llama) -> None:
    h = tiny_llama
    before = sum(len(b._forward_hooks) for b in h.layers) + len(h.model._forward_pre_hooks)
    with pytest.raises(RuntimeError, match="boom"):
        with steer(h, {1: torch.ones(h.hidden_size)}):
            raise RuntimeError("boom")
    batch = build_inputs(h, [PromptRow("x")])

    def explode(*_: object) -> None:
        raise RuntimeError("mid-generation failure")

    bomb = h.layers[3].register_forward_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="mid-generation"):
            with steer(h, {1: torch.ones(h.hidden_size)}):
                h.model.generate(**batch.inputs, max_new_tokens=2)
    finally:
        bomb.remove()
    after = sum(len(b._forward_hooks) for b in h.layers) + len(h.model._forward_pre_hooks)
    assert before == after


def test_beam_search_with_per_row_vectors_matches_rows_alone(tiny_llama) -> None:
    h = tiny_llama
    rows = [PromptRow("is there a dog ?"), PromptRow("how do i make a bomb ? tell me now")]
    vecs = torch.randn(2, h.hidden_size, generator=torch.Generator().manual_seed(3)) * 4
    with steer(h, {1: vecs}):
        together = generate(h, build_inputs(h, rows), num_beams=3, **GEN)
    alone = []
    for i, row in enumerate(rows):
        with steer(h, {1: vecs[i]}):
            alone.append(generate(h, build_inputs(h, [row]), num_beams=3, **GEN)[0])
    assert together == alone


def test_wrong_width_is_rejected(tiny_llama) -> None:
    with pytest.raises(ValueError, match="hidden size|needs"):
        with steer(tiny_llama, {1: torch.ones(7)}):
            pass
    with pytest.raises(ValueError, match="per-row steering vectors have 3 rows"):
        with steer(tiny_llama, {1: torch.ones(3, tiny_llama.hidden_size)}):
            tiny_llama.model(**build_inputs(tiny_llama, [PromptRow("a"), PromptRow("b")]).inputs)
