from __future__ import annotations

import pytest
import torch

from learn2steer.models.prompts import PromptRow, build_inputs


def _rows(images):
    return [PromptRow("is there a dog in the image ?", image=images[0]),
            PromptRow("how do i make a bomb ? is this request safe or harmful ?", completion="Harmful"),
            PromptRow("describe this image", image=images[-1], completion="Yes, the image")]


def test_positions_under_left_padding(any_tiny, coco_images) -> None:
    h = any_tiny
    images = [None, None] if not h.is_multimodal else coco_images
    rows = _rows(images)
    batch = build_inputs(h, rows)
    ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"]
    assert mask[:, -1].all(), "left padding: every row ends in the last column"
    for i, row in enumerate(rows):
        solo = build_inputs(h, [row])
        n = int(mask[i].sum())
        assert torch.equal(ids[i, -n:], solo.inputs["input_ids"][0])  # same tokens, just shifted
        shift = batch.seq_len - solo.seq_len
        assert int(batch.prompt_last[i]) == int(solo.prompt_last[0]) + shift
        if row.completion is None:
            assert batch.prompt_last[i] == batch.seq_len - 1 and batch.span_end[i] == batch.span_start[i]
        else:
            span = ids[i, batch.span_start[i]:batch.span_end[i]]
            assert h.tokenizer.decode(span) == row.completion
            assert batch.span_end[i] == batch.seq_len


def test_qwen2_vl_image_token_count_depends_on_image_size(tiny_qwen2_vl, coco_images) -> None:
    pad = tiny_qwen2_vl.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    counts = [int((build_inputs(tiny_qwen2_vl, [PromptRow("x", image=im)]).inputs["input_ids"] == pad).sum())
              for im in (coco_images[0], coco_images[-1])]
    assert counts[0] != counts[1] and min(counts) > 0


def test_synthetic_images_flow_through_every_vlm(tiny_llava, tiny_qwen2_vl, synthetic_images) -> None:
    for h in (tiny_llava, tiny_qwen2_vl):
        batch = build_inputs(h, [PromptRow("a", image=synthetic_images[0]), PromptRow("b"),
                                 PromptRow("c", image=synthetic_images[1])])
        assert "pixel_values" in batch.inputs and batch.size == 3


def test_text_model_rejects_images_and_missing_files(tiny_llama, tiny_llava, tmp_path) -> None:
    with pytest.raises(ValueError, match="text-only model"):
        build_inputs(tiny_llama, [PromptRow("x", image=tmp_path / "a.jpg")])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_inputs(tiny_llava, [PromptRow("x", image=tmp_path / "missing.jpg")])
    with pytest.raises(ValueError, match="at least one row"):
        build_inputs(tiny_llama, [])


def test_input_last_is_the_user_turn_before_the_generation_prompt(any_tiny, coco_images) -> None:
    h = any_tiny
    rows = [PromptRow("is there a dog ?", image=coco_images[0] if h.is_multimodal else None), PromptRow("a")]
    b = build_inputs(h, rows, input_last=True)
    assert b.input_last is not None and bool((b.input_last < b.prompt_last).all())
    for i, row in enumerate(rows):
        alone = build_inputs(h, [row], add_generation_prompt=False)
        n = alone.seq_len
        pad = b.seq_len - int(b.inputs["attention_mask"][i].sum())
        assert int(b.input_last[i]) == pad + n - 1
        assert torch.equal(b.inputs["input_ids"][i, pad:pad + n], alone.inputs["input_ids"][0])
