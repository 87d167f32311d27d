"""Where the language model's decoder blocks live, per architecture.

Steering must touch the residual stream of the *language* model. A VLM also has a vision tower with its
own ``layers``; a generic "find the first ModuleList" search can pick the wrong one, so known
architectures are looked up in an explicit registry and anything else must be named by hand.
"""

from __future__ import annotations

from torch import nn

from learn2steer.errors import InvalidInputError

# model_type -> dotted attribute path from the top-level model to the decoder ModuleList
# (transformers 5.x layouts).
LAYOUTS: dict[str, str] = {
    # text-only causal LMs: <Arch>ForCausalLM.model.layers
    **{
        t: "model.layers"
        for t in (
            "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
            "gemma3_text", "phi", "phi3", "olmo", "olmo2", "granite", "cohere", "stablelm", "starcoder2",
            "smollm3", "deepseek_v3", "internlm2",
        )
    },
    "gpt2": "transformer.h",
    "gptj": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
    "opt": "model.decoder.layers",
    # VLMs: <Arch>ForConditionalGeneration.model.language_model.layers
    **{
        t: "model.language_model.layers"
        for t in (
            "llava", "llava_next", "llava_onevision", "llava_next_video", "vipllava", "video_llava",
            "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3", "mistral3", "paligemma", "aya_vision",
        )
    },
    "idefics3": "model.text_model.layers",
    "smolvlm": "model.text_model.layers",
}


class UnknownArchitectureError(InvalidInputError):
    """Raised when the decoder layers of a model cannot be located safely."""


def _resolve(model: nn.Module, path: str) -> nn.Module | None:
    obj: object = model
    for part in path.split("."):
        if not hasattr(obj, part):
            return None
        obj = getattr(obj, part)
    return obj if isinstance(obj, nn.Module) else None


def find_layers(model: nn.Module, layers_path: str | None = None) -> tuple[nn.ModuleList, str]:
    """Return the decoder ModuleList of the language model and the path it was found at.

    ``layers_path`` overrides the registry (e.g. ``"model.language_model.layers"``) for architectures
    the registry does not know.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if layers_path is None:
        layers_path = LAYOUTS.get(str(model_type))
        if layers_path is None:
            raise UnknownArchitectureError(
                f"learn2steer does not know where the decoder layers of model_type={model_type!r} are. "
                "Pass layers_path='<dotted.path.to.ModuleList>' (e.g. 'model.language_model.layers'), "
                "or CLI --layers-path; print(model) shows the structure. Known types: "
                + ", ".join(sorted(LAYOUTS))
            )
    layers = _resolve(model, layers_path)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise UnknownArchitectureError(
            f"layers_path={layers_path!r} does not name a non-empty nn.ModuleList on "
            f"{type(model).__name__} (model_type={model_type!r}). Check print(model) and pass the path "
            "of the language model's decoder blocks."
        )
    return layers, layers_path
