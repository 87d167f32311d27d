"""read_branches(): continuations of one prompt from its cache == the same rows as full sequences."""

from __future__ import annotations

import pytest
import torch

from learn2steer.activations import Site, read
from learn2steer.branches import can_branch, read_branches
from learn2steer.errors import InvalidInputError
from learn2steer.models.prompts import PromptRow, build_inputs

ANSWERS = [("harmful", "safe"), ("consult an expert now", "ok")]


def _groups(h, images, close_turn=False):
    im = (lambda i: images[i]) if h.is_multimodal else (lambda i: None)
    texts = ["how do i make a bomb ? tell me now please, quickly", "a cat", "is there a dog in the image ?"]
    return [[PromptRow(t, im(i), completion=a, close_turn=close_turn) for a in ANSWERS[i % 2]]
            for i, t in enumerate(texts)]


def _full(h, groups, layers, position):
    rows = [r for g in groups for r in g]
    batch = build_inputs(h, rows)
    got = read(h, batch, [Site(x, position) for x in layers])
    return {x: got[Site(x, position)].view(len(groups), len(groups[0]), -1) for x in layers}


@pytest.mark.parametrize("arch", ["llama", "llava"])
@pytest.mark.parametrize("position", ["last", "completion_mean"])
def test_branches_equal_full_sequences(request, coco_images, arch, position) -> None:
    h = request.getfixturevalue(f"tiny_{arch}")
    groups = _groups(h, coco_images)
    got = read_branches(h, groups, [1, 3], position=position, context_layers=[2])
    want = _full(h, groups, [1, 3], position)
    for layer in (1, 3):
        torch.testing.assert_close(got.targets[layer], want[layer], atol=1e-4, rtol=1e-4)
    prompts = build_inputs(h, [PromptRow(g[0].text, g[0].image) for g in groups])
    ctx = read(h, prompts, [Site(2, "prompt_last")])[Site(2, "prompt_last")]
    torch.testing.assert_close(got.context[2], ctx, atol=1e-4, rtol=1e-4)
    # the two continuations differ: a read that ignored them would pass the context test alone
    assert not torch.allclose(got.targets[3][:, 0], got.targets[3][:, 1])


def test_closed_turns_and_end_offsets_read_the_official_token(tiny_llama) -> None:
    """turn_end rows (the template's end tokens follow the answer), read one token before the end for group 1."""
    h = tiny_llama
    groups = _groups(h, None, close_turn=True)
    offsets = [[0, 0], [1, 1], [0, 0]]
    got = read_branches(h, groups, [2], position="completion_last", offsets=offsets)
    batch = build_inputs(h, [r for g in groups for r in g])
    batch.span_end = batch.span_end - torch.tensor([o for per in offsets for o in per])
    want = read(h, batch, [Site(2, "completion_last")])[Site(2, "completion_last")].view(3, 2, -1)
    torch.testing.assert_close(got.targets[2], want, atol=1e-4, rtol=1e-4)


def test_groups_must_share_their_prompt_and_models_with_own_positions_are_refused(tiny_llama, tiny_qwen2_vl) -> None:
    h = tiny_llama
    with pytest.raises(InvalidInputError, match="share one prompt"):
        read_branches(h, [[PromptRow("a", completion="x"), PromptRow("b", completion="y")]], [1])
    assert can_branch(h) and not can_branch(tiny_qwen2_vl)
    with pytest.raises(InvalidInputError, match="full sequences"):
        read_branches(tiny_qwen2_vl, [[PromptRow("a", completion="x")]], [1])
