"""Vectors in and out of learn2steer: llama.cpp control vectors, repeng, steering-vectors, the paper's predictors.

Layer numbering is the same everywhere here: layer ``i`` is the output of decoder block ``i`` (0-based),
what Hugging Face calls ``hidden_states[i + 1]``. repeng's ``ControlVector.directions[i]``,
steering-vectors' ``SteeringVector.layer_activations[i]`` (``decoder_block``) and llama.cpp's tensor
``direction.i`` (added to the output of block ``i``; ``direction.0`` is rejected by llama.cpp) all
use it, so no index is shifted on the way. Only fixed vectors can be exported: L2S reads a hidden
state while the model runs, which a static control vector cannot express.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from learn2steer.artifacts import SteeringArtifact
from learn2steer.errors import IncompatibleArtifactError, InvalidInputError, MissingFileError
from learn2steer.predictor import L2SNet
from learn2steer.rules import check_alpha
from learn2steer.vectors import SteeringVector

# HF model_type of models learn2steer names without a config at hand
_MODEL_TYPES = {"SmolLM2-135M-Instruct": "llama"}


# ---- llama.cpp / repeng GGUF --------------------------------------------------------------------------

def model_hint(art: SteeringArtifact) -> str:
    """The HF ``model_type`` of the artifact's model (llama.cpp's and repeng's ``controlvector.model_hint``)."""
    cfg = Path(art.model) / "config.json"
    if cfg.exists():
        import json

        return str(json.loads(cfg.read_text()).get("model_type", ""))
    return _MODEL_TYPES.get(art.model, "")


def export_gguf(art: SteeringArtifact, path: str | Path, *, scale: float | None = None, hint: str | None = None
                ) -> Path:
    """Write a fixed artifact as a llama.cpp control vector (the layout repeng's ``export_gguf`` writes).

    Tensors ``direction.{layer}`` (float32, [D]) hold ``scale * v`` (default: the artifact's alpha, so
    ``--control-vector FILE`` steers at the artifact's strength); metadata ``controlvector.model_hint``
    and ``controlvector.layer_count`` (the number of directions, as repeng writes). llama.cpp adds the
    vectors at every position, which is learn2steer's scope ``all``.
    """
    import gguf

    if art.kind != "fixed" or art.vector is None:
        raise InvalidInputError("only a fixed vector (Mean-S, Mean-S(BA), an imported vector) can become a "
                                "llama.cpp control vector; L2S predicts its vector from a hidden state while the "
                                "model runs, which a static control vector cannot express")
    if 0 in art.vector:
        raise InvalidInputError("llama.cpp cannot steer the output of block 0 (it rejects direction.0); steer a later "
                                "layer")
    s = art.alpha if scale is None else scale
    check_alpha(s, what="scale")  # the tensors are float32
    hint = hint or model_hint(art)
    if not hint:
        raise InvalidInputError(f"cannot tell the model type of {art.model!r}; pass --model-hint (the HF model_type, "
                                "e.g. llama or qwen2)")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(p), "controlvector")
    writer.add_string("controlvector.model_hint", hint)
    writer.add_uint32("controlvector.layer_count", len(art.vector.layers))
    for layer, v in art.vector.items():
        writer.add_tensor(f"direction.{layer}", (s * v).detach().float().cpu().numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return p


@dataclass
class ControlVectorFile:
    """What a control-vector GGUF holds: the model hint and the per-layer directions."""

    model_hint: str
    vector: SteeringVector


def read_gguf(path: str | Path) -> ControlVectorFile:
    """Read a llama.cpp / repeng control-vector GGUF back (the inverse of :func:`export_gguf`)."""
    import gguf

    p = Path(path)
    if not p.exists():
        raise MissingFileError(f"control vector {str(p)!r} does not exist")
    reader = gguf.GGUFReader(str(p))
    field = reader.get_field("controlvector.model_hint")
    hint = bytes(field.parts[field.data[0]]).decode() if field is not None and field.data else ""
    layers: dict[int, torch.Tensor] = {}
    for t in reader.tensors:
        if not t.name.startswith("direction."):
            continue
        try:
            layer = int(t.name.split(".", 1)[1])
        except ValueError:
            raise InvalidInputError(f"{p}: tensor {t.name!r} is not direction.<layer>") from None
        layers[layer] = torch.tensor(np.asarray(t.data, dtype=np.float32).reshape(-1))
    if not layers:
        raise InvalidInputError(f"{p} holds no direction.<layer> tensors; is it a control vector?")
    return ControlVectorFile(hint, SteeringVector(layers))


# ---- peers ----------------------------------------------------------------------------------------------

def vector_from_peer(obj: Any) -> SteeringVector:
    """A :class:`SteeringVector` from a repeng ``ControlVector`` (``directions``), a steering-vectors
    ``SteeringVector`` (``layer_activations``, decoder-block layers) or a plain {layer: array} mapping."""
    if hasattr(obj, "layer_activations"):
        if getattr(obj, "layer_type", "decoder_block") != "decoder_block":
            raise InvalidInputError(f"steering-vectors layer_type {obj.layer_type!r} is not supported; learn2steer "
                                    "steers decoder block outputs (layer_type='decoder_block')")
        layers = obj.layer_activations
    elif hasattr(obj, "directions"):
        layers = obj.directions
    elif isinstance(obj, Mapping):
        layers = obj
    else:
        raise InvalidInputError(f"cannot read a steering vector from a {type(obj).__name__}; pass a repeng "
                                "ControlVector, a steering-vectors SteeringVector or a {layer: vector} mapping")
    try:
        return SteeringVector({int(k): torch.as_tensor(np.asarray(v, dtype=np.float32)).reshape(-1)
                               for k, v in layers.items()})
    except (TypeError, ValueError) as e:
        raise InvalidInputError(f"the vector's layers must be integers and its values numbers ({e})") from None


def load_vector_file(path: str | Path) -> tuple[SteeringVector, str]:
    """A fixed vector from a saved peer form: a control-vector ``.gguf`` (repeng ``export_gguf``), a
    ``.safetensors`` of ``{layer: [D]}`` tensors, or a ``.pt`` holding a ``{layer: tensor}`` dict
    (steering-vectors' ``layer_activations``), loaded with ``weights_only=True`` (no pickle). Returns the
    vector and the model hint (when the file has one)."""
    p = Path(path)
    if not p.exists():
        raise MissingFileError(f"vector file {str(p)!r} does not exist")
    if p.suffix == ".gguf":
        f = read_gguf(p)
        return f.vector, f.model_hint
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        raw = load_file(str(p))
        return vector_from_peer({k.split(".")[-1]: v for k, v in raw.items()}), ""
    if p.suffix in (".pt", ".pth"):
        try:
            raw = torch.load(p, weights_only=True, map_location="cpu")
        except Exception as e:  # pickled objects are refused by weights_only
            raise InvalidInputError(f"{p} is not a plain {{layer: tensor}} file ({type(e).__name__}); learn2steer "
                                    "never unpickles objects: save `sv.layer_activations` (steering-vectors) or use "
                                    "repeng's export_gguf") from None
        return vector_from_peer(raw), ""
    raise InvalidInputError(f"unknown vector file type {p.suffix!r}; use .gguf, .safetensors or .pt")


def fixed_artifact(vector: SteeringVector, *, model: str, hidden_size: int, num_layers: int, method: str = "imported",
                   alpha: float = 1.0, scope: str = "all", source: str = "") -> SteeringArtifact:
    """Wrap an imported vector as a fixed artifact (checked against the target model's shape)."""
    if vector.per_row:
        raise InvalidInputError("an imported vector must hold one [D] vector per layer")
    if vector.hidden_size != hidden_size:
        raise IncompatibleArtifactError(f"the vector has size {vector.hidden_size} but the model's hidden size is "
                                        f"{hidden_size}")
    return SteeringArtifact(kind="fixed", method=method, model=model, hidden_size=hidden_size, num_layers=num_layers,
                            steer_layers=list(vector), vector=vector, alpha=alpha, scope=scope,
                            training={"imported_from": source})


# ---- the paper's released predictors ------------------------------------------------------------------

@dataclass(frozen=True)
class OfficialSetting:
    """Where a released predictor was trained and how the official code applies it."""

    model: str
    hidden_size: int
    num_layers: int
    steer_layer: int
    context_layer: int
    alpha: float
    context_read: str
    read_position: str


OFFICIAL: dict[tuple[str, str], OfficialSetting] = {
    # official scripts: LLaVA safety reads layer 30 on a context pass without the generation prompt, steers 15;
    # its targets were read at the last token of the complete assistant turn (behaviours' "turn_end")
    ("llava-1.5-7b", "safety"): OfficialSetting("llava-hf/llava-1.5-7b-hf", 4096, 32, 15, 30, 2.2, "input_last",
                                                "turn_end"),
    # POPE reads the last prompt token (the ':' of 'ASSISTANT:') at the steering layer itself
    ("llava-1.5-7b", "pope"): OfficialSetting("llava-hf/llava-1.5-7b-hf", 4096, 32, 14, 14, 1.0, "prompt_last",
                                              "completion_mean"),
    ("qwen2-vl-7b", "safety"): OfficialSetting("Qwen/Qwen2-VL-7B-Instruct", 3584, 28, 14, 14, 2.2, "input_last",
                                               "turn_end"),
}
#: released in the official tree but not in this project's shared copy (../shared/data/official_l2s): no settings
#: checked against the file here, so it is not imported
NOT_COPIED = {("qwen2-vl-7b", "pope"): "src/assets/L2S/hallucination/qwen2vlinstruct_17_average_all_pope_train_-1.pt"}


def import_official(path: str | Path, *, model: str, task: str) -> SteeringArtifact:
    """The paper's released L2S network at ``path`` as an artifact with the official L*, L', alpha and read
    position, and no input standardisation. Loaded with ``torch.load(weights_only=True)`` only."""
    key = (model, task)
    if key not in OFFICIAL:
        known = ", ".join(f"--model {m} --task {t}" for m, t in OFFICIAL)
        if key in NOT_COPIED:
            raise InvalidInputError(f"the official --model {model} --task {task} predictor ({NOT_COPIED[key]} in "
                                    "github.com/jayneelparekh/learn-to-steer) is not in this project's copy of the "
                                    "released predictors, so its import is not checked; the importable ones: "
                                    f"{known}")
        raise InvalidInputError(f"no released predictor is known for --model {model} --task {task} (known: {known})")
    s = OFFICIAL[key]
    p = Path(path)
    if not p.exists():
        raise MissingFileError(f"predictor file {str(p)!r} does not exist")
    try:
        raw = torch.load(p, weights_only=True, map_location="cpu")
    except Exception as e:
        raise InvalidInputError(f"{p} is not a plain PyTorch state dict ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:100]})") from None
    if isinstance(raw, Mapping) and "steering_model" in raw and isinstance(raw["steering_model"], Mapping):
        raw = raw["steering_model"]
    want = {"encoder.weight", "encoder.bias", "decoder.weight"}
    if not isinstance(raw, Mapping) or set(raw) != want:
        got = sorted(raw)[:6] if isinstance(raw, Mapping) else type(raw).__name__
        raise InvalidInputError(f"{p} does not have the official layout (keys encoder.weight, encoder.bias, "
                                f"decoder.weight, optionally under steering_model); found {got}")
    enc_w, enc_b, dec_w = raw["encoder.weight"], raw["encoder.bias"], raw["decoder.weight"]
    k, d_in = enc_w.shape
    if d_in != s.hidden_size or tuple(dec_w.shape) != (s.hidden_size, k) or tuple(enc_b.shape) != (k,):
        raise IncompatibleArtifactError(f"{p} maps {d_in} -> {tuple(dec_w.shape)} but {model} has hidden size "
                                        f"{s.hidden_size}; is it the predictor of another model?")
    net = L2SNet(s.hidden_size, s.hidden_size, int(k))
    net.load_state_dict({"encoder.weight": enc_w.float(), "encoder.bias": enc_b.float(),
                         "decoder.weight": dec_w.float(), "in_mean": torch.zeros(s.hidden_size),
                         "in_std": torch.ones(s.hidden_size)})
    net.eval()
    return SteeringArtifact(kind="l2s", method="l2s", model=s.model, hidden_size=s.hidden_size,
                            num_layers=s.num_layers, steer_layers=[s.steer_layer], predictor=net,
                            context_layer=s.context_layer, context_read=s.context_read, read_position=s.read_position,
                            alpha=s.alpha, scope="all",
                            behaviour={"name": "safety" if task == "safety" else "hallucination"},
                            training={"source": "official learn-to-steer release (MIT)", "file": p.name})
