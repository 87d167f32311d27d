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


# ---- the official input_last read on the releases' own templates (issue #28) -----------------------------------

@pytest.fixture(scope="module")
def real_llava():
    """Tiny LLaVA with LLaVA-1.5's own template and a Llama-style sentencepiece tokenizer trained here."""
    from learn2steer.models.tiny import tiny_model

    return tiny_model("llava", real_template=True)


@pytest.fixture(scope="module")
def real_qwen():
    from learn2steer.models.tiny import tiny_model

    return tiny_model("qwen2_vl", real_template=True)


def _hidden(h, ids: list[int], layer: int, encoded: dict | None = None) -> torch.Tensor:
    """Layer ``layer``'s output at the last of ``ids`` (one row, no padding; ``encoded``: a rendering of at least
    that length whose image inputs and token-aligned extras, cut to ``ids``, go along)."""
    n = len(ids)
    enc = encoded or {}
    width = enc["input_ids"].shape[1] if "input_ids" in enc else -1
    kw = {k: (v[:, :n] if v.dim() == 2 and tuple(v.shape) == (1, width) else v) for k, v in enc.items()}
    kw.update(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, n, dtype=torch.long))
    with torch.no_grad():
        return h.model(**kw, output_hidden_states=True).hidden_states[layer + 1][0, -1]


def test_llava15_template_ends_the_bare_prompt_in_a_lone_space_token(real_llava) -> None:
    """Hand-written renderings: the bare prompt is "USER: q " (its last token a lone "▁"), the full prompt
    "USER: q ASSISTANT:" ends in one "▁ASSISTANT:" (this tokenizer's merge); InputRead says so."""
    from learn2steer.models.prompts import input_read

    tok = real_llava.tokenizer
    q = "is there a dog in the image ?"
    bare = tok.encode(f"USER: {q} ", add_special_tokens=False)
    full = tok.encode(f"USER: {q} ASSISTANT:", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(bare[-2:]) == ["▁?", "▁"]
    assert tok.convert_ids_to_tokens(full[-2:]) == ["▁?", "▁ASSISTANT:"]
    assert bare[:-1] == full[:-1]
    read = input_read(tok)
    assert read.generation == tuple(tok.convert_tokens_to_ids(["▁ASSISTANT:"]))
    assert read.bare_tail == tuple(tok.convert_tokens_to_ids(["▁"]))
    assert read.back == 0 and read.matches(full)


def test_qwen2vl_template_reads_the_token_before_the_generation_prompt(real_qwen) -> None:
    from learn2steer.models.prompts import input_read

    tok = real_qwen.tokenizer
    read = input_read(tok)
    assert read.bare_tail == ()
    assert read.generation == tuple(tok.encode("<|im_start|>assistant\n", add_special_tokens=False))
    sys_turn = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    full = tok.encode(f"{sys_turn}<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    assert read.matches(full) and tok.convert_ids_to_tokens(full[-1 - read.back]) == "Ċ"


@pytest.mark.parametrize("family", ["llava15", "qwen2vl"])
def test_the_bare_state_is_the_full_prompt_with_the_tail_put_in_place(family, real_llava, real_qwen,
                                                                     coco_images) -> None:
    """What the vLLM plugin computes in its read pass (the full prompt, ``bare_tail`` put where the generation
    prompt starts, read at ``back`` before the end) is the hidden state of the bare prompt's own pass (the
    official read, the HF engine's), with an image and without."""
    from learn2steer.models.prompts import _encode, input_read

    h = real_llava if family == "llava15" else real_qwen
    read = input_read(h.tokenizer)
    for image in (coco_images[0], None):
        row = PromptRow("is there a dog in the image ?", image)
        full = _encode(h, row, completion=False, add_generation_prompt=True)
        bare = _encode(h, row, completion=False, add_generation_prompt=False)
        ids = full["input_ids"][0].tolist()
        assert read.matches(ids)
        p = len(ids) - len(read.generation)
        put = ids[:p] + list(read.bare_tail) + ids[p + len(read.bare_tail):]
        row_at = len(ids) - 1 - read.back
        assert put[:row_at + 1] == bare["input_ids"][0].tolist(), "the same tokens up to the read"
        want = _hidden(h, bare["input_ids"][0].tolist(), 1, bare)
        torch.testing.assert_close(_hidden(h, put[:row_at + 1], 1, full), want)
        if family == "llava15":  # the token before the generation prompt (0.3's vLLM read) is another state
            assert not torch.allclose(_hidden(h, ids[:p], 1, full), want, atol=1e-3)


def test_input_length_on_the_llava15_template_names_the_read_that_works(real_llava, real_qwen) -> None:
    """The same-pass column exists on ChatML (hand-counted: the bare prompt's length); on LLaVA-1.5's template no
    position of the full prompt's pass holds the bare prompt's last state: a sentence naming bare_prompts()."""
    from learn2steer.models.prompts import _encode, input_length

    row = PromptRow("is there a dog ?")
    ids = _encode(real_qwen, row, completion=False, add_generation_prompt=True)["input_ids"][0]
    sys_turn = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    n = len(real_qwen.tokenizer.encode(f"{sys_turn}<|im_start|>user\nis there a dog ?<|im_end|>\n",
                                       add_special_tokens=False))
    assert input_length(real_qwen, row, ids) == n
    ids = _encode(real_llava, row, completion=False, add_generation_prompt=True)["input_ids"][0]
    with pytest.raises(ValueError, match=r"ends in \['▁'\].*bare_prompts\(\)"):
        input_length(real_llava, row, ids)
