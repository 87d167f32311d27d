"""Generate with any steering method: no steering, Prompt, Mean-S, Mean-S(BA), Norm-Rnd, P2S, L2S.

A method turns a batch of examples into (prompt rows, a steering context). Fixed methods add one shared
vector; P2S and Norm-Rnd add each row's own vector; L2S predicts each row's vector from the row's own
context representation during the same prefill pass (L' <= L*) or after a read pass that stops at L'.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from learn2steer.activations import Site, read
from learn2steer.artifacts import SteeringArtifact
from learn2steer.behaviours import Example
from learn2steer.generation import generate
from learn2steer.models.loading import ModelHandle
from learn2steer.models.prompts import Batch, PromptRow, build_inputs
from learn2steer.predictor import L2SNet
from learn2steer.steering import Scope, StepState, steer
from learn2steer.vectors import Extraction, norm_random

METHODS = ("no_steering", "prompt", "mean", "mean_ba", "norm_random", "l2s", "p2s")


@dataclass
class L2SProvider:
    """VectorProvider for same-pass L2S: read h at L' on the prefill, write g(h) at the steering layers."""

    net: L2SNet
    context_layer: int
    steer_layers: tuple[int, ...]
    current: torch.Tensor | None = None

    @property
    def observe_layers(self) -> tuple[int, ...]:
        return (self.context_layer,)

    @property
    def write_layers(self) -> tuple[int, ...]:
        return self.steer_layers

    def observe(self, layer: int, hidden: torch.Tensor, state: StepState) -> None:
        if state.is_prefill:
            # under left padding the last column of the prefill is every row's last prompt token
            with torch.no_grad():
                self.current = self.net.to(hidden.device)(hidden[:, -1].float())

    def vector(self, layer: int, state: StepState) -> torch.Tensor | None:
        return self.current


@dataclass
class MethodConfig:
    """How to steer: the method, its strength and where; vectors come from artifacts or per-row maps."""

    method: str = "no_steering"
    alpha: float = 1.0
    steer_layers: Sequence[int] = ()
    scope: Scope | str = Scope.ALL
    fixed: torch.Tensor | None = None                       # mean / mean_ba
    per_example: Mapping[str, torch.Tensor] = field(default_factory=dict)  # p2s / norm_random: id -> [D]
    predictor: L2SNet | None = None                         # l2s
    context_layer: int | None = None                        # l2s
    prompt: str = ""                                        # prompt baseline instruction
    prompt_placement: str = "system"                        # "system" or "user"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.method in ("mean", "mean_ba", "norm_random", "p2s", "l2s") and not self.steer_layers:
            raise ValueError(f"method {self.method!r} needs steer_layers")
        if self.method in ("mean", "mean_ba") and self.fixed is None:
            raise ValueError(f"method {self.method!r} needs a fixed vector (train it with `l2s train`)")
        if self.method == "l2s" and (self.predictor is None or self.context_layer is None):
            raise ValueError("method 'l2s' needs a trained predictor and its context layer")
        if self.method == "prompt" and not self.prompt:
            raise ValueError("method 'prompt' needs an instruction (the behaviour spec's `prompt`)")
        if self.prompt_placement not in ("system", "user"):
            raise ValueError("prompt_placement must be 'system' or 'user'")

    @classmethod
    def from_artifact(cls, art: SteeringArtifact, *, alpha: float | None = None, scope: str | None = None
                      ) -> "MethodConfig":
        common = dict(alpha=art.alpha if alpha is None else alpha, steer_layers=art.steer_layers,
                      scope=scope or art.scope)
        if art.kind == "l2s":
            return cls(method="l2s", predictor=art.predictor, context_layer=art.context_layer, **common)
        return cls(method=art.method, fixed=art.vectors[art.steer_layers[0]], **common)


def config_for(method: str, *, alpha: float = 1.0, layer: int | None = None, scope: Scope | str = Scope.ALL,
               artifacts: Mapping[str, SteeringArtifact] | None = None, extraction: Extraction | None = None,
               prompt: str = "", seed: int = 0) -> MethodConfig:
    """The MethodConfig of ``method`` from trained artifacts (mean, mean_ba, l2s) or, for the per-input
    methods (p2s, norm_random), from an extraction of the inputs being answered."""
    if method in ("no_steering", "prompt"):
        return MethodConfig(method=method, prompt=prompt)
    if layer is None:
        raise ValueError(f"method {method!r} needs a steering layer")
    common: dict = dict(method=method, alpha=alpha, steer_layers=[layer], scope=scope)
    if method in ("mean", "mean_ba", "l2s"):
        if not artifacts or method not in artifacts:
            raise ValueError(f"method {method!r} needs its trained artifact (run `l2s train`)")
        art = artifacts[method]
        if method == "l2s":
            return MethodConfig(predictor=art.predictor, context_layer=art.context_layer, **common)
        return MethodConfig(fixed=art.vectors[layer], **common)
    if extraction is None:
        raise ValueError(f"method {method!r} needs P2S vectors of the inputs it answers (an extraction)")
    z = extraction.z[layer]
    vecs = z if method == "p2s" else norm_random(z, seed=seed)
    return MethodConfig(per_example=dict(zip(extraction.ids, vecs)), **common)


def fingerprint(cfg: MethodConfig) -> str:
    """A hash of everything that determines a method's generations (settings and tensor contents)."""
    h = hashlib.sha256(json.dumps([cfg.method, cfg.alpha, list(cfg.steer_layers), str(Scope(cfg.scope).value),
                                   cfg.context_layer, cfg.prompt if cfg.method == "prompt" else "",
                                   cfg.prompt_placement]).encode())
    tensors: list[torch.Tensor] = []
    if cfg.fixed is not None:
        tensors.append(cfg.fixed)
    tensors += [cfg.per_example[k] for k in sorted(cfg.per_example)]
    if cfg.predictor is not None:
        tensors += [v for _, v in sorted(cfg.predictor.state_dict().items())]
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _rows(cfg: MethodConfig, examples: Sequence[Example]) -> list[PromptRow]:
    if cfg.method != "prompt":
        return [PromptRow(e.question, e.image) for e in examples]
    if cfg.prompt_placement == "system":
        return [PromptRow(e.question, e.image, system=cfg.prompt) for e in examples]
    return [PromptRow(f"{cfg.prompt}\n\n{e.question}", e.image) for e in examples]


def steering_context(handle: ModelHandle, cfg: MethodConfig, examples: Sequence[Example],
                     batch: Batch | None = None) -> AbstractContextManager:
    """The steering context for one batch of ``examples`` under ``cfg`` (no-op for unsteered methods).

    ``batch`` is the encoded batch about to be generated (built here when omitted).
    """
    layers = [handle.check_layer(x) for x in cfg.steer_layers]
    if cfg.method in ("no_steering", "prompt"):
        return nullcontext()
    if cfg.method in ("mean", "mean_ba"):
        return steer(handle, {layer: cfg.fixed for layer in layers}, alpha=cfg.alpha, scope=cfg.scope)  # type: ignore[misc]
    if cfg.method in ("p2s", "norm_random"):
        missing = [e.id for e in examples if e.id not in cfg.per_example]
        if missing:
            raise KeyError(f"method {cfg.method!r} needs a vector for every input; missing {missing[:3]} "
                           "(extract P2S vectors for the evaluation inputs first)")
        v = torch.stack([cfg.per_example[e.id] for e in examples])
        return steer(handle, {layer: v for layer in layers}, alpha=cfg.alpha, scope=cfg.scope)
    assert cfg.predictor is not None and cfg.context_layer is not None
    ctx = handle.check_layer(cfg.context_layer)
    if ctx <= min(layers):
        return steer(handle, L2SProvider(cfg.predictor, ctx, tuple(layers)), alpha=cfg.alpha, scope=cfg.scope)
    # L' > L*: writing at L* would change what L' sees, so read h first in a pass that stops at L'
    if batch is None:
        batch = build_inputs(handle, _rows(cfg, examples))
    h = read(handle, batch, [Site(ctx, "prompt_last")])[Site(ctx, "prompt_last")]
    with torch.no_grad():
        v = cfg.predictor(h)
    return steer(handle, {layer: v for layer in layers}, alpha=cfg.alpha, scope=cfg.scope)


def generate_with(handle: ModelHandle, cfg: MethodConfig, examples: Sequence[Example], *, batch_size: int = 8,
                  max_new_tokens: int = 64, progress: bool = True, **gen_kwargs: object) -> list[str]:
    """Answer ``examples`` under one method, in batches; returns one string per example, in order."""
    out: list[str] = []
    for i in tqdm(range(0, len(examples), batch_size), desc=f"generate [{cfg.method}]", disable=not progress,
                  leave=False):
        chunk = examples[i:i + batch_size]
        batch = build_inputs(handle, _rows(cfg, chunk))
        with steering_context(handle, cfg, chunk, batch):
            out.extend(generate(handle, batch, max_new_tokens=max_new_tokens, **gen_kwargs))  # type: ignore[arg-type]
    return out
