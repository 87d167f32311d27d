"""Finding a vLLM model's decoder layers by structure and wrapping each instance with the steering op.

Pure torch (no vLLM import): the plugin calls :func:`decoder_layers` and :func:`wrap_layer` once the
runner has loaded the model, before anything is compiled, so ``torch.compile`` traces the wrapped
forwards and the op stays opaque in the graph. Structure, not class names (EasySteer's rule): a
subclass that overrides ``forward`` (vLLM's Mistral layer) is not missed, and any decoder architecture
whose layers return ``(hidden_states, residual)`` or the residual stream itself is steered.
"""

from __future__ import annotations

from typing import Any

import torch

from learn2steer.errors import InvalidInputError

_NOT_LANGUAGE = ("vision", "visual", "vit", "image", "audio", "encoder", "projector", "mm_", "tower")


def decoder_layers(model: Any, num_layers: int) -> list[tuple[str, Any]]:
    """The language model's decoder layers, found by structure rather than by class.

    vLLM models keep them in a ``ModuleList`` (``model.layers``; inside multimodal wrappers
    ``language_model.model.layers``), one entry per layer of the text config. Towers of other modalities
    have their own lists, recognised by name. Pipeline stages hold placeholders for others' layers.
    """
    found = []
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.ModuleList) or len(mod) != num_layers or not name.endswith("layers"):
            continue
        if any(word in part for part in name.lower().split(".") for word in _NOT_LANGUAGE):
            continue
        found.append((name, mod))
    if not found:
        return []
    found.sort(key=lambda item: ("language_model" not in item[0], item[0].count(".")))
    name, layers = found[0]
    return [(f"{name}.{i}", layer) for i, layer in enumerate(layers) if type(layer).__name__ != "PPMissingLayer"]


def wrap_layer(layer: Any, index: int, path: str) -> None:
    """Run the steering op (``torch.ops.l2s_vllm``, registered by the plugin) after this layer instance's
    own forward, whatever its class. A layer whose output is neither convention is refused at the first
    forward with a sentence (the model loads; a steered request then fails, never silently unsteered)."""
    if getattr(layer, "_l2s_wrapped", False):
        return
    orig = layer.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        out = orig(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            torch.ops.l2s_vllm.steer_single_(out, index)
        elif (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.Tensor)
              and isinstance(out[1], torch.Tensor) and out[0].shape == out[1].shape):
            torch.ops.l2s_vllm.steer_(out[0], out[1], index)
        else:
            raise InvalidInputError(f"learn2steer cannot steer {type(layer).__name__} ({path}): its forward returns "
                                    "neither the residual stream nor (hidden_states, residual)")
        return out

    layer.forward = forward
    layer._l2s_wrapped = True
