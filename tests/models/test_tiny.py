"""Tiny random models: every architecture saves to a folder that loads back with the same logits.

The folders are what the serving tests hand to vLLM (``save_tiny``); here, in the core environment, only
the Hugging Face side: ``load_model`` on the folder gives the in-memory model's logits exactly, and the
prompts the vLLM engine would send for images are the HF engine's ids with each image run collapsed.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from learn2steer.models.loading import load_model
from learn2steer.models.prompts import PromptRow, build_inputs, encode_row, forward_kwargs
from learn2steer.models.tiny import ARCHS, save_tiny, tiny_model


@pytest.mark.parametrize("arch", [*ARCHS, "phi3", "gemma2"])  # and any other text model_type transformers knows
def test_saved_folder_loads_with_the_same_logits(arch, tmp_path, synthetic_images) -> None:
    folder = save_tiny(arch, tmp_path / arch)
    ref = tiny_model(arch, hidden_size=128, max_positions=2048)
    loaded = load_model(folder)
    assert type(loaded.model) is type(ref.model) and loaded.num_layers == 4 and loaded.hidden_size == 128
    text = ref.model.config.get_text_config()
    assert text.hidden_size // text.num_attention_heads >= 32, "vLLM's CPU attention needs head sizes >= 32"
    image = synthetic_images[1] if ref.is_multimodal else None
    rows = [PromptRow("is there a dog in the image ?", image), PromptRow("what is the capital of france ?")]
    b_ref, b_loaded = build_inputs(ref, rows), build_inputs(loaded, rows)
    for key, value in b_ref.inputs.items():
        assert torch.equal(value, b_loaded.inputs[key]), (arch, key)
    with torch.no_grad():
        want = ref.model(**forward_kwargs(ref, b_ref)).logits
        got = loaded.model(**forward_kwargs(loaded, b_loaded)).logits
    assert torch.equal(got, want), (arch, (got - want).abs().max())
    assert want.std() > 0.1, "a random model whose logits are not all alike"


def test_saved_vlm_folders_have_what_vllm_needs(tmp_path) -> None:
    llava = save_tiny("llava", tmp_path / "llava")
    with safe_open(str(llava / "model.safetensors"), "pt") as f:
        tower = [k for k in f.keys() if "vision_tower." in k]
    assert tower and all(".vision_tower.vision_model." in f".{k}" for k in tower), tower[:3]
    qwen = save_tiny("qwen2_vl", tmp_path / "qwen2_vl")
    video = json.loads((qwen / "video_preprocessor_config.json").read_text())
    image = load_model(qwen).processor.image_processor
    assert video["video_processor_type"] == "Qwen2VLVideoProcessor"
    assert (video["patch_size"], video["merge_size"], video["size"]) == (image.patch_size, image.merge_size,
                                                                            dict(image.size))


def test_tiny_model_defaults_are_unchanged() -> None:
    h = tiny_model("llama")
    cfg = h.model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.max_position_embeddings) == (32, 4, 512)


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_vllm_image_prompts_are_unexpanded(arch, synthetic_images) -> None:
    """The offline vLLM engine sends the HF ids with the expanded image run collapsed to one placeholder."""
    from learn2steer.engines.vllm.offline import VLLMEngine
    from learn2steer.models.prompts import collapse_image_tokens, image_token_id

    h = tiny_model(arch)
    engine = VLLMEngine(None, h, h.name, h.hidden_size, h.num_layers)  # prompts only: no vLLM needed
    row = PromptRow("is there a dog in the image ?", synthetic_images[0])
    expanded = encode_row(h, row)[0]["input_ids"][0].tolist()
    image_id = image_token_id(h)
    prompt = engine.prompt_of(row)
    ids = prompt["prompt_token_ids"]
    assert ids.count(image_id) == 1 and expanded.count(image_id) > 1
    k = ids.index(image_id)
    n = expanded.count(image_id)
    assert expanded == ids[:k] + [image_id] * n + ids[k + 1:], "only the image run differs"
    assert prompt["multi_modal_data"]["image"].size == synthetic_images[0].size
    assert engine.prompt_of(PromptRow("hello")) == {"prompt_token_ids": encode_row(h, PromptRow("hello"))[0][
        "input_ids"][0].tolist()}
    with pytest.raises(Exception, match="expected 1 image"):
        collapse_image_tokens([1, image_id, 2, image_id], image_id)
    with pytest.raises(Exception, match="text-only"):
        image_token_id(tiny_model("llama"))
    shutil.rmtree(engine.workdir)


def test_any_text_model_type_is_a_tiny_family_and_a_wrong_one_is_a_sentence() -> None:
    """Beyond the seven explicit families: a config's own head_dim default (Gemma-2: 256) follows the width."""
    cfg = tiny_model("gemma2", hidden_size=128).model.config
    assert (cfg.model_type, cfg.head_dim, cfg.query_pre_attn_scalar, cfg.hidden_size) == ("gemma2", 32, 32, 128)
    with pytest.raises(ValueError, match="unknown tiny architecture 'nope'"):
        tiny_model("nope")
    with pytest.raises(ValueError, match="no causal language model"):
        tiny_model("clip_vision_model")
