"""Steering artifacts: a folder with ``config.json`` and ``vectors.safetensors`` / ``predictor.safetensors``.

An artifact records the model it was made for (hidden size, layer count), so loading it into another
model fails loudly instead of steering with meaningless vectors. No pickle: tensors in safetensors,
everything else in JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file

from learn2steer import __version__
from learn2steer.models.loading import ModelHandle
from learn2steer.predictor import L2SNet

CONFIG = "config.json"
Kind = Literal["fixed", "l2s"]


class IncompatibleArtifactError(ValueError):
    """The artifact was made for a model of another shape."""


@dataclass
class SteeringArtifact:
    """A fixed vector set (Mean-S, Mean-S(BA)) or an L2S predictor, with what is needed to apply it."""

    kind: Kind
    method: str
    model: str
    hidden_size: int
    num_layers: int
    steer_layers: list[int]
    context_layer: int | None = None
    read_position: str = "last"
    alpha: float = 1.0
    scope: str = "all"
    behaviour: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    vectors: dict[int, torch.Tensor] = field(default_factory=dict)
    predictor: L2SNet | None = None
    version: str = __version__

    def __post_init__(self) -> None:
        if self.kind == "fixed" and not self.vectors:
            raise ValueError("a fixed artifact needs vectors")
        if self.kind == "l2s" and (self.predictor is None or self.context_layer is None):
            raise ValueError("an l2s artifact needs a predictor and a context_layer")

    def config(self) -> dict[str, Any]:
        cfg = {k: getattr(self, k) for k in ("kind", "method", "model", "hidden_size", "num_layers", "steer_layers",
                                               "context_layer", "read_position", "alpha", "scope", "behaviour",
                                               "training", "version")}
        if self.predictor is not None:
            cfg["predictor"] = {"d_in": self.predictor.d_in, "d_out": self.predictor.d_out,
                                "hidden": self.predictor.encoder.out_features}
        return cfg

    def save(self, path: str | Path) -> Path:
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        if self.kind == "fixed":
            save_file({f"layer.{k}": v.detach().float().contiguous().cpu() for k, v in self.vectors.items()},
                      str(out / "vectors.safetensors"))
        else:
            assert self.predictor is not None
            save_file({k: v.detach().contiguous().cpu() for k, v in self.predictor.state_dict().items()},
                      str(out / "predictor.safetensors"))
        (out / CONFIG).write_text(json.dumps(self.config(), indent=1))
        return out

    @classmethod
    def load(cls, path: str | Path, handle: ModelHandle | None = None) -> "SteeringArtifact":
        """Load an artifact; with ``handle``, also check it fits that model."""
        p = Path(path)
        if not (p / CONFIG).exists():
            raise FileNotFoundError(f"{p} is not a steering artifact (no {CONFIG}); create one with `l2s train`")
        cfg = json.loads((p / CONFIG).read_text())
        pred_cfg = cfg.pop("predictor", None)
        vectors: dict[int, torch.Tensor] = {}
        predictor = None
        if cfg["kind"] == "fixed":
            vectors = {int(k.split(".")[1]): v for k, v in load_file(str(p / "vectors.safetensors")).items()}
        else:
            predictor = L2SNet(pred_cfg["d_in"], pred_cfg["d_out"], pred_cfg["hidden"])
            predictor.load_state_dict(load_file(str(p / "predictor.safetensors")))
            predictor.eval()
        art = cls(**cfg, vectors=vectors, predictor=predictor)
        if handle is not None:
            art.check_compatible(handle)
        return art

    def check_compatible(self, handle: ModelHandle) -> None:
        if handle.hidden_size != self.hidden_size or handle.num_layers != self.num_layers:
            raise IncompatibleArtifactError(
                f"artifact was made for {self.model!r} (hidden size {self.hidden_size}, {self.num_layers} layers) "
                f"but the loaded model {handle.name!r} has hidden size {handle.hidden_size} and "
                f"{handle.num_layers} layers; extract and train again for this model")
        if handle.name and self.model and handle.name != self.model:
            import warnings
            warnings.warn(f"artifact was made for {self.model!r}, applying it to {handle.name!r} of the same shape",
                          stacklevel=2)
