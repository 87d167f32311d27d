from __future__ import annotations

import pytest
import torch

from learn2steer.activations import Site, read
from learn2steer.models.prompts import PromptRow, build_inputs, forward_kwargs


def _rows(h, images):
    im = (lambda i: None) if not h.is_multimodal else (lambda i: images[i])
    return [PromptRow("is there a dog ?", image=im(0)),
            PromptRow("how do i make a bomb ? tell me now please", completion="Harmful"),
            PromptRow("a cat on a street", image=im(2), completion="Yes, the image")]


def test_read_equals_output_hidden_states(any_tiny, coco_images) -> None:
    h = any_tiny
    batch = build_inputs(h, _rows(h, coco_images))
    sites = [Site(layer, pos) for layer in range(h.num_layers) for pos in ("prompt_last", "last")]
    got = read(h, batch, sites)
    with torch.no_grad():
        hs = h.model(**forward_kwargs(h, batch), output_hidden_states=True).hidden_states
    rows = torch.arange(batch.size)
    for layer in range(h.num_layers - 1):
        torch.testing.assert_close(got[Site(layer, "prompt_last")], hs[layer + 1][rows, batch.prompt_last])
        torch.testing.assert_close(got[Site(layer, "last")], hs[layer + 1][:, -1])
    # the final entry of hidden_states has the final norm applied; the residual stream is before it
    final = got[Site(h.num_layers - 1, "last")]
    lm = h.model.model.language_model if h.is_multimodal else h.model.model
    torch.testing.assert_close(lm.norm(final), hs[-1][:, -1])


def test_completion_mean_is_mean_over_span(tiny_llama) -> None:
    h = tiny_llama
    batch = build_inputs(h, [PromptRow("hi", completion="Yes, the image"), PromptRow("a longer question here",
                                                                                         completion="No")])
    got = read(h, batch, [Site(1, "completion_mean"), Site(1, "completion_last")])
    with torch.no_grad():
        hs = h.model(**forward_kwargs(h, batch), output_hidden_states=True).hidden_states[2]
    for i in range(2):
        span = hs[i, batch.span_start[i]:batch.span_end[i]]
        torch.testing.assert_close(got[Site(1, "completion_mean")][i], span.mean(0))
        torch.testing.assert_close(got[Site(1, "completion_last")][i], span[-1])
    with pytest.raises(ValueError, match="teacher-forced completion"):
        read(h, build_inputs(h, [PromptRow("no completion")]), [Site(1, "completion_mean")])


def test_batched_read_equals_batch_size_one(any_tiny, coco_images) -> None:
    h = any_tiny
    rows = _rows(h, coco_images)
    sites = [Site(1, "prompt_last"), Site(2, "last"), Site(2, "completion_mean")]
    full = read(h, build_inputs(h, rows), sites[:2])
    for i, row in enumerate(rows):
        solo = read(h, build_inputs(h, [row]), sites[:2])
        for s in sites[:2]:
            torch.testing.assert_close(full[s][i], solo[s][0], atol=1e-5, rtol=1e-4)


def test_read_stops_after_deepest_layer(tiny_llama) -> None:
    h = tiny_llama
    calls: list[int] = []
    hooks = [layer.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, layer in enumerate(h.layers)]
    try:
        read(h, build_inputs(h, [PromptRow("x")]), [Site(1)])
    finally:
        for hk in hooks:
            hk.remove()
    assert calls == [0, 1]


def test_bad_site_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown read position"):
        Site(0, "middle")  # type: ignore[arg-type]
