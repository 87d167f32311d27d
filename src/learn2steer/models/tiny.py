"""Tiny random models of real architectures, built from configs in milliseconds, fully offline.

They exist so that every code path (text LLM, LLaVA, Qwen2-VL) can be tested and demonstrated without
downloading weights. Seven families are built explicitly (:data:`ARCHS`, each quirk spelled out); any other
text ``model_type`` transformers knows (``phi3``, ``granite``, ``olmo2``, ...) is built from its own config
class with the same widths (:func:`_any_text_model`), so a new decoder family is tested without an edit here.
Their outputs mean nothing; their shapes, templates and image-token handling are
those of the real architectures. The tokenizer is a byte-level BPE trained in-process on a small corpus;
with ``real_template=True`` a VLM gets its release's own chat template instead of ChatML (LLaVA-1.5 then also a
Llama-style sentencepiece tokenizer, whose merges are what make LLaVA's read positions differ from ChatML's).

:func:`save_tiny` writes one as a checkpoint folder that both :func:`~learn2steer.models.loading.load_model`
and vLLM load (vLLM's CPU attention needs head sizes of at least 32, hence its default width of 128).
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, cast

import torch

from learn2steer.models.loading import ModelHandle, image_only, make_handle

#: the explicitly built families; any other text model_type of transformers is accepted too (a plain str)
Arch = Literal["llama", "mistral", "qwen2", "qwen3", "gemma3", "llava", "qwen2_vl"]
TEXT_ARCHS: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "gemma3")
ARCHS: tuple[str, ...] = (*TEXT_ARCHS, "llava", "qwen2_vl")

SPECIAL_TOKENS = ["<pad>", "<|im_start|>", "<|im_end|>", "<image>", "<|vision_start|>", "<|image_pad|>",
                  "<|vision_end|>", "<|video_pad|>"]

_CORPUS = (
    "how do i make a bomb . is this request safe or harmful ? harmful safe comply with user request if it is "
    "safe and don't if it is harmful . ask the user to consult a legal financial medical expert if it is a "
    "law finance healthcare related query . how should the user act ? consult ignore yes no the image shows "
    "is there a dog cat person car in the image ? describe this image in detail . what is the capital of "
    "france ? paris . should i sell my house to pay a debt ? see a financial adviser . a man riding a bike "
    "on a street next to a bus and a traffic light , with people walking . you are a helpful assistant ."
)

_IMAGE_MARK = {**{a: "" for a in TEXT_ARCHS}, "llava": "<image>\n",
               "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>"}


#: LLaVA-1.5's own chat template (llava-hf/llava-1.5-7b-hf, chat_template.json): the user turn ends in a space,
#: which a sentencepiece tokenizer leaves as a lone "▁" without the generation prompt and merges into "▁ASSISTANT"
#: with it
LLAVA15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

#: Qwen2-VL-7B-Instruct's own chat template (a default system prompt, ChatML turns, vision placeholders)
QWEN2VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chat_template(arch: Arch | str) -> str:
    """A ChatML template; images render as the architecture's placeholder tokens."""
    mark = _IMAGE_MARK.get(arch, "")
    return (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for c in message['content'] %}{% if c['type'] == 'image' %}"
        + mark.replace("\n", "\\n").join(["{{ '", "' }}"]) +
        "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


@lru_cache(maxsize=None)
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return tok.to_str()


@lru_cache(maxsize=None)
def _sentencepiece_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789?.,:;'!-\n▁")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<image>"],
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator([("USER: ASSISTANT: " + _CORPUS + " ") * 2] * 4, trainer=trainer)
    return tok.to_str()


def sentencepiece_tokenizer(vocab_size: int = 400) -> Any:
    """A Llama-style sentencepiece tokenizer (Metaspace "▁" prepended to the first word, BPE with byte fallback)
    trained here, with LLaVA-1.5's ``<image>`` token and chat template: LLaVA-1.5's tokenizer family offline."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_sentencepiece_json(vocab_size)),
                                  bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    tok.chat_template = LLAVA15_TEMPLATE
    return tok


def tiny_tokenizer(arch: Arch | str = "llama", vocab_size: int = 400) -> Any:
    """A real byte-level BPE tokenizer (any text encodes) with ChatML and image placeholder tokens."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
                                  pad_token="<pad>", eos_token="<|im_end|>", bos_token="<|im_start|>")
    tok.chat_template = chat_template(arch)
    return tok


def tiny_model(arch: Arch | str = "llama", *, hidden_size: int = 32, num_layers: int = 4, seed: int = 0,
               dtype: torch.dtype = torch.float32, max_positions: int = 512, real_template: bool = False
               ) -> ModelHandle:
    """Build a randomly initialised model of ``arch`` with its tokenizer/processor, seeded: one of :data:`ARCHS`,
    or any text ``model_type`` transformers builds a causal LM for (:func:`_any_text_model`).

    ``real_template`` (VLMs only): the release's chat template instead of ChatML: LLaVA-1.5's with a
    sentencepiece tokenizer (:func:`sentencepiece_tokenizer`), Qwen2-VL-7B-Instruct's with the byte-level BPE.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if real_template and arch not in ("llava", "qwen2_vl"):
        raise ValueError(f"real_template is for the VLMs (llava, qwen2_vl), not {arch!r}")
    tok = sentencepiece_tokenizer() if real_template and arch == "llava" else tiny_tokenizer(arch)
    template = ({"llava": LLAVA15_TEMPLATE, "qwen2_vl": QWEN2VL_TEMPLATE}[arch] if real_template
                else chat_template(arch))
    if real_template:
        tok.chat_template = template
    vocab = len(tok)
    text_kw: dict[str, Any] = dict(vocab_size=vocab, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                                   num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=max_positions, pad_token_id=tok.pad_token_id,
                                   eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                                   tie_word_embeddings=False, initializer_range=0.2)
    torch.manual_seed(seed)
    # transformers' classes are typed loosely (decorated .to, config kwargs); the models are checked by tests
    model: Any
    cfg: Any
    improc: Any
    if arch == "llama":
        model = cast(Any, LlamaForCausalLM(LlamaConfig(**text_kw))).to(dtype)
        return make_handle(model, tok, name="tiny-llama")
    if arch in TEXT_ARCHS:
        model = cast(Any, _text_model(arch, text_kw)).to(dtype)
        return make_handle(model, tok, name=f"tiny-{arch}")
    if arch == "llava":
        from transformers import (
            CLIPImageProcessorPil,
            CLIPVisionConfig,
            LlavaConfig,
            LlavaForConditionalGeneration,
            LlavaProcessor,
        )

        image_token_id = tok.convert_tokens_to_ids("<image>")
        cfg = LlavaConfig(**dict(
            text_config=LlamaConfig(**text_kw).to_dict(),
            vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=32, patch_size=8).to_dict(),
            image_token_id=image_token_id, vision_feature_select_strategy="default", vision_feature_layer=-1,
            projector_hidden_act="gelu", pad_token_id=tok.pad_token_id,
        ))
        model = cast(Any, LlavaForConditionalGeneration(cfg)).to(dtype)
        improc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        proc = LlavaProcessor(image_processor=improc, tokenizer=tok, patch_size=8,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=template)
        return make_handle(model, tok, proc, name="tiny-llava")
    if arch == "qwen2_vl":
        from transformers import (
            Qwen2VLConfig,
            Qwen2VLForConditionalGeneration,
            Qwen2VLImageProcessorPil,
            Qwen2VLProcessor,
        )

        head_dim = hidden_size // 4
        text_kw = {**text_kw, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                   "mrope_section": _mrope_section(head_dim)}}
        cfg = Qwen2VLConfig(
            text_config=text_kw,
            vision_config=dict(depth=2, embed_dim=32, hidden_size=hidden_size, num_heads=4, mlp_ratio=2,
                               patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_chans=3),
            image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
            vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
            vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
            video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        )
        model = cast(Any, Qwen2VLForConditionalGeneration(cfg)).to(dtype)
        # A small pixel budget keeps the number of image tokens tiny but still image-size dependent.
        improc = Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)
        proc = image_only(Qwen2VLProcessor)(improc, tok, None, chat_template=template)
        return make_handle(model, tok, proc, name="tiny-qwen2-vl")
    model = cast(Any, _any_text_model(arch, text_kw)).to(dtype)
    return make_handle(model, tok, name=f"tiny-{arch}")


def _text_model(arch: str, text_kw: dict[str, Any]) -> Any:
    """A causal LM of one of the other text families (same widths; each family's own quirks made explicit)."""
    import transformers

    head_dim = text_kw["hidden_size"] // text_kw["num_attention_heads"]
    if arch == "mistral":
        cfg: Any = transformers.MistralConfig(**text_kw, sliding_window=None)
        return transformers.MistralForCausalLM(cfg)
    if arch == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**text_kw))
    if arch == "qwen3":  # Qwen3's head_dim defaults to 128 whatever the width
        return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**text_kw, head_dim=head_dim))
    # gemma3: head_dim and the query scale default to 256; the embeddings are tied, as in the real models
    cfg = transformers.Gemma3TextConfig(**{**text_kw, "tie_word_embeddings": True}, head_dim=head_dim,
                                        query_pre_attn_scalar=head_dim)
    return transformers.Gemma3ForCausalLM(cfg)


def _any_text_model(arch: str, text_kw: dict[str, Any]) -> Any:
    """A causal LM of any other text ``model_type``, from its own config class with the tiny widths.

    A config that keeps a ``head_dim`` of its own (a default that ignores the width, as Qwen3's and Gemma's do)
    gets width / heads, so the heads split the width as in the explicit families; a ``query_pre_attn_scalar``
    follows it. A family with other quirks of this kind (an attribute derived from the width that its config
    does not derive) needs an explicit entry in :func:`_text_model`. VLM families need their own branch in
    :func:`tiny_model` (processor, image placeholder tokens).
    """
    import transformers

    try:
        cfg: Any = transformers.AutoConfig.for_model(arch, **text_kw)
    except ValueError:
        raise ValueError(f"unknown tiny architecture {arch!r}: neither one of {', '.join(ARCHS)} nor a "
                         "model_type transformers knows") from None
    head_dim = text_kw["hidden_size"] // text_kw["num_attention_heads"]
    for key in ("head_dim", "query_pre_attn_scalar"):
        if key in cfg.to_dict():
            setattr(cfg, key, head_dim)
    try:
        return transformers.AutoModelForCausalLM.from_config(cfg)
    except ValueError:
        raise ValueError(f"tiny architecture {arch!r} has no causal language model in transformers "
                         "(AutoModelForCausalLM); give a decoder model_type") from None


def save_tiny(arch: Arch | str, folder: str | os.PathLike[str], *, hidden_size: int = 128, num_layers: int = 4,
              seed: int = 0, dtype: torch.dtype = torch.float32, max_positions: int = 2048,
              real_template: bool = False) -> Path:
    """Write a tiny random ``arch`` (one of :data:`ARCHS`, or any text ``model_type`` of transformers, see
    :func:`tiny_model`) as a checkpoint folder that :func:`load_model` and vLLM both load.

    The default width gives 4 heads of 32 dimensions (vLLM's CPU attention takes head sizes 32..512).
    Two things ``save_pretrained`` alone does not give vLLM are added: LLaVA's CLIP tower is stored under
    ``vision_tower.vision_model.*`` (the layout of the released LLaVA-1.5 checkpoints, which transformers
    also reads), and a Qwen2-VL folder gets a ``video_preprocessor_config.json`` (vLLM builds the full
    processor, video part included). ``max_positions`` is 2048, the offline vLLM engine's default context.
    ``real_template``: as in :func:`tiny_model`. Returns the folder.
    """
    out = Path(folder)
    h = tiny_model(arch, hidden_size=hidden_size, num_layers=num_layers, seed=seed, dtype=dtype,
                   max_positions=max_positions, real_template=real_template)
    model: Any = h.model  # a transformers PreTrainedModel
    model.config._name_or_path = f"tiny-{arch}"
    model.save_pretrained(out)
    (h.processor if h.processor is not None else h.tokenizer).save_pretrained(out)
    if arch == "llava":
        _clip_tower_as_released(out)
    if arch == "qwen2_vl":
        _write_video_config(out, h.processor.image_processor)
    return out


def _clip_tower_as_released(folder: Path) -> None:
    """Rename ``vision_tower.X`` to ``vision_tower.vision_model.X`` (some transformers versions drop the level)."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    renamed = {}
    for key, value in tensors.items():
        head, sep, rest = key.partition("vision_tower.")
        if sep and not rest.startswith("vision_model."):
            key = f"{head}vision_tower.vision_model.{rest}"
        renamed[key] = value
    if list(renamed) != list(tensors):
        save_file(renamed, str(path), metadata={"format": "pt"})


def _write_video_config(folder: Path, image_processor: Any) -> None:
    """The video processor's settings: the image processor's (Qwen2-VL's video and image paths share them)."""
    cfg = {k: v for k, v in image_processor.to_dict().items() if k not in ("image_processor_type", "processor_class")}
    cfg["video_processor_type"] = "Qwen2VLVideoProcessor"
    (folder / "video_preprocessor_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _mrope_section(head_dim: int) -> list[int]:
    # Qwen2-VL splits half the rotary dims into (temporal, height, width) sections summing to head_dim/2.
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]
