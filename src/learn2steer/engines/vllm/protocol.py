"""The vLLM engine's side of the request format (:mod:`learn2steer.engines.requests`): its settings, read
from the environment every vLLM process inherits, and what the running engine can apply.

This module imports no vLLM: the same checks run in the API process (an HTTP 400), the engine process
(cache salt) and the worker (what to add where), and are tested without vLLM installed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from learn2steer.activations import CONTEXT_POSITIONS
from learn2steer.engines.lens import InlineLimits
from learn2steer.engines.requests import (
    DEFAULT_MAX_ALPHA,
    PROMPT_SCOPES,
    Registry,
    SteerRequest,
    check_max_alpha,
)
from learn2steer.engines.store import ArtifactStore
from learn2steer.errors import InvalidInputError

if TYPE_CHECKING:
    from learn2steer.artifacts import SteeringArtifact

ENV_ARTIFACTS = "L2S_VLLM_ARTIFACTS"     # JSON {name: folder}, set by `l2s serve` / the offline engine
ENV_ALLOW_PATHS = "L2S_VLLM_ALLOW_PATHS"  # "1": requests may name artifact folders / inline vectors (offline only)
ENV_MAX_ALPHA = "L2S_VLLM_MAX_ALPHA"      # the largest |alpha| a request may ask for (operator setting)
ENV_REGISTRY = "L2S_VLLM_REGISTRY"        # the folder of artifacts registered at runtime (l2s serve --registry)
ENV_INLINE = "L2S_VLLM_INLINE"            # JSON {"max_vectors": N, "max_hidden": D}: inline vectors allowed
ENV_METRICS = "L2S_VLLM_METRICS_DIR"      # where workers leave their steering counts for /metrics (l2s serve)


def registry_from_env() -> Registry:
    """This process's artifact registry: named artifacts, path permission and the |alpha| bound, as ``l2s
    serve`` or the offline engine set them in the environment before vLLM started its processes."""
    raw = os.environ.get(ENV_ARTIFACTS, "")
    try:
        names = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        raise InvalidInputError(f"${ENV_ARTIFACTS} must hold a JSON object name -> artifact folder") from None
    store = ArtifactStore(os.environ[ENV_REGISTRY]) if os.environ.get(ENV_REGISTRY) else None
    return Registry(names, allow_paths=os.environ.get(ENV_ALLOW_PATHS) == "1", max_alpha=max_alpha_setting(),
                    bound_setting=f"${ENV_MAX_ALPHA}, l2s serve --max-alpha", store=store, inline=inline_setting())


def inline_setting() -> InlineLimits | None:
    """The operator's bounds on inline vectors (``$L2S_VLLM_INLINE``), or None when they are refused."""
    raw = os.environ.get(ENV_INLINE, "")
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
        return InlineLimits(max_vectors=int(cfg["max_vectors"]), max_hidden=int(cfg.get("max_hidden", 16384)))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise InvalidInputError(f"${ENV_INLINE} must hold a JSON object {{\"max_vectors\": N}}") from None


def max_alpha_setting() -> float:
    """The operator's bound on |alpha| (``$L2S_VLLM_MAX_ALPHA``), default 100."""
    raw = os.environ.get(ENV_MAX_ALPHA, "")
    if not raw:
        return DEFAULT_MAX_ALPHA
    try:
        value = float(raw)
    except ValueError:
        raise InvalidInputError(f"${ENV_MAX_ALPHA} must be a number, got {raw!r}") from None
    return check_max_alpha(value)


def check_plugin_installed() -> None:
    """Refuse to start an engine whose processes would not load the plugin (steering would be ignored)."""
    from importlib.metadata import entry_points

    names = {e.name for e in entry_points(group="vllm.general_plugins") if e.value.startswith("learn2steer.")}
    if not names:
        raise InvalidInputError("learn2steer's vLLM plugin is not registered in this environment (its entry point "
                                "is missing); reinstall: bash scripts/setup.sh --serve")
    allowed = os.environ.get("VLLM_PLUGINS")
    if allowed is not None and not names & {x.strip() for x in allowed.split(",")}:
        raise InvalidInputError(f"$VLLM_PLUGINS={allowed!r} excludes learn2steer's plugin; add 'learn2steer' to it")


@dataclass(frozen=True)
class EngineLimits:
    """What the running engine is and allows, for request checks."""

    hidden_size: int
    num_layers: int
    chunked_prefill: bool
    pipeline_parallel: int = 1
    #: vLLM's V2 model runner (GPU, opt-in or forced by some features): the plugin patches the V1 runner
    model_runner_v2: bool = False
    #: the front end reads an L2S vector ahead of a chunked prompt (``l2s serve``; not the offline engine)
    read_ahead: bool = False


def check_request(req: SteerRequest, limits: EngineLimits) -> None:
    """Refuse, with a sentence naming the fix, what this engine cannot apply exactly."""
    m = req.meta
    if limits.model_runner_v2:
        raise InvalidInputError("this engine runs vLLM's V2 model runner, which the learn2steer plugin does not "
                                "patch (steering would be silently skipped); start it with VLLM_USE_V2_MODEL_RUNNER=0")
    if m.hidden_size != limits.hidden_size or (m.num_layers and m.num_layers != limits.num_layers):
        raise InvalidInputError(f"artifact {m.source} was made for a model of hidden size {m.hidden_size} and "
                                f"{m.num_layers} layers; this model has {limits.hidden_size} and {limits.num_layers}")
    bad = [x for x in m.steer_layers if not 0 <= x < limits.num_layers]
    if bad:
        raise InvalidInputError(f"steering layers {bad} are out of range for a model with {limits.num_layers} layers")
    if not m.reads_context:
        return
    assert m.context_layer is not None
    if not 0 <= m.context_layer < limits.num_layers:
        raise InvalidInputError(f"this L2S artifact reads layer {m.context_layer}, out of range for a model with "
                                f"{limits.num_layers} layers")
    if m.context_read not in CONTEXT_POSITIONS:
        raise InvalidInputError(f"this L2S artifact reads position {m.context_read!r}; the vLLM engine reads "
                                f"{' or '.join(CONTEXT_POSITIONS)}")
    if req.scope in PROMPT_SCOPES and limits.chunked_prefill and not limits.read_ahead:
        raise InvalidInputError(f"L2S with scope {req.scope!r} must see the whole prompt in one step, but this "
                                "engine has chunked prefill on; use scope 'generated', or start it with chunked "
                                "prefill off, or serve with `l2s serve`, which reads the vector ahead")
    if limits.pipeline_parallel > 1:
        raise InvalidInputError("L2S reads and writes the residual stream in one pass; pipeline parallelism "
                                "(layers on different stages) is not supported. Use tensor parallelism")


def check_artifact(folder: str | Path, limits: EngineLimits, name: str = "",
                   max_alpha: float = DEFAULT_MAX_ALPHA) -> "SteeringArtifact":
    """Everything an artifact must pass before any request may use it (start-up ``--artifact``, the registry's
    uploads, and registered artifacts found again after a restart): its files (schema, checksums, safetensors),
    the model's shape and layers, finite tensors, a predictor's output on a probe input (finite, the model's
    width), and what one pass can apply with its own defaults. (Loading already refuses non-finite vectors and
    predictor weights.)"""
    import torch

    from learn2steer.artifacts import SteeringArtifact

    where = f"artifact {name!r}" if name else f"artifact {folder}"
    art = SteeringArtifact.load(folder)
    if art.hidden_size != limits.hidden_size or art.num_layers != limits.num_layers:
        raise InvalidInputError(f"{where} was made for a model of hidden size {art.hidden_size} and {art.num_layers} "
                                f"layers; this model has {limits.hidden_size} and {limits.num_layers}")
    if art.predictor is not None:
        probe = torch.randn(2, art.hidden_size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            out = art.predict_fn(gated=False)(probe)
        if tuple(out.shape) != (2, art.hidden_size) or not bool(torch.isfinite(out).all()):
            raise InvalidInputError(f"{where}: its predictor does not map a hidden state to a finite vector of size "
                                    f"{art.hidden_size}")
    req = Registry({"x": str(folder)}, max_alpha=max_alpha).parse({"steer": "x"})
    assert req is not None
    try:
        check_request(req, limits)
    except InvalidInputError as e:
        raise InvalidInputError(f"{where}: {e}") from None
    return art
