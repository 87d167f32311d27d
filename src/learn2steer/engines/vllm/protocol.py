"""What a steered vLLM request says, how it is checked, and how it salts the prefix cache.

A request selects steering through ``SamplingParams.extra_args`` (the OpenAI server's ``vllm_xargs``),
flat values only::

    {"steer": "NAME", "alpha": 1.0, "scope": "all", "gated": true}

``steer`` names an artifact preloaded by ``l2s serve --artifact NAME=DIR``; ``alpha`` and ``scope``
default to the artifact's. ``|alpha|`` is bounded by an operator setting (``$L2S_VLLM_MAX_ALPHA``, ``l2s serve
--max-alpha``, default 100): a huge strength is never a useful answer, and one that overflows the model's
dtype would put inf into the residual stream, whose KV blocks other requests then share.
The offline engine may also send ``steer_path`` (an artifact folder) and
``steer_vector`` + ``steer_layers`` (one fixed vector for this request, e.g. P2S); a server refuses those.

This module imports no vLLM: the same checks run in the API process (an HTTP 400), the engine process
(cache salt) and the worker (what to add where), and are tested without vLLM installed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from learn2steer._io import read_json
from learn2steer.artifacts import validate_config
from learn2steer.errors import InvalidInputError
from learn2steer.steering import Scope, Strength, check_alpha, finite_in

ENV_ARTIFACTS = "L2S_VLLM_ARTIFACTS"     # JSON {name: folder}, set by `l2s serve` / the offline engine
ENV_ALLOW_PATHS = "L2S_VLLM_ALLOW_PATHS"  # "1": requests may name artifact folders / inline vectors (offline only)
ENV_MAX_ALPHA = "L2S_VLLM_MAX_ALPHA"      # the largest |alpha| a request may ask for (operator setting)
DEFAULT_MAX_ALPHA = 100.0
KEYS = ("steer", "alpha", "scope", "gated", "strength", "steer_path", "steer_vector", "steer_layers")
#: set by the plugin's front end (never by the client: it is overwritten): how many tokens before the last
#: prompt token the L2S read sits (``input_last``: the generation prompt's length; ``prompt_last``: 0)
READ_BACK = "l2s_read_back"
PROMPT_SCOPES = (Scope.ALL.value, Scope.PROMPT.value)
READS = ("prompt_last", "input_last")


@dataclass(frozen=True)
class SteerMeta:
    """What the engine must know about an artifact before any tensor is loaded."""

    source: str                 # "name:<n>", "path:<folder>" or "inline:<hash>"
    kind: str                   # "fixed", or a predictor kind ("l2s", "cast", ...): see reads_context
    hidden_size: int
    num_layers: int
    steer_layers: tuple[int, ...]
    alpha: float = 1.0
    scope: str = "all"
    context_layer: int | None = None
    context_read: str = "prompt_last"
    gate: float = 0.0
    folder: str | None = None
    strength: str = "absolute"

    @property
    def reads_context(self) -> bool:
        """The capability the engine asks: the vector is predicted from the request's own hidden state at
        ``context_layer`` (any predictor kind: L2S, CAST, ...), not a fixed tensor."""
        return self.kind != "fixed"


@dataclass(frozen=True)
class SteerRequest:
    """One request's resolved steering: which artifact, at which strength and scope."""

    meta: SteerMeta
    alpha: float
    scope: str
    gated: bool = True
    vector: tuple[float, ...] | None = field(default=None, repr=False)
    read_back: int = 0
    strength: str = "absolute"

    @property
    def key(self) -> str:
        """Identity of the vectors applied (same key and settings => same additions)."""
        return self.meta.source

    @property
    def reads_after_writing(self) -> bool:
        """L2S with L' > L*: v must be read in a pass of its own before the steered pass."""
        m = self.meta
        return m.reads_context and m.context_layer is not None and m.context_layer > min(m.steer_layers)

    def read_row(self, prompt_len: int) -> int:
        """The absolute position whose hidden state the predictor reads."""
        return prompt_len - 1 - self.read_back

    def salt(self, prompt_token_ids: Sequence[int], mm_identifiers: Sequence[str] = ()) -> str:
        """The prefix-cache salt: requests whose cached positions would differ never share blocks.

        A fixed vector at scope ``all`` changes every position the same way, so identical settings
        share. Other scopes depend on where the prompt ends (its length is salted in); L2S depends on
        the whole prompt (its vector is predicted from it), so only identical prompts share. An image is
        in the prompt only as placeholder ids, the same for every image of a size, so the L2S salt also
        hashes the multimodal items' identifiers (vLLM's content hashes): another image, another vector.
        """
        parts: list[Any] = [self.key, repr(float(self.alpha)), self.scope, self.gated]
        if self.strength != Strength.ABSOLUTE.value:  # only then: salts of absolute requests stay as they were
            parts.append(self.strength)
        if self.meta.reads_context:
            parts.append(hashlib.sha256(json.dumps(list(prompt_token_ids)).encode()).hexdigest())
            if mm_identifiers:
                parts.append([str(x) for x in mm_identifiers])
        elif self.scope != Scope.ALL.value:
            parts.append(len(prompt_token_ids))
        return "l2s-" + hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


def _meta_from_config(cfg: dict[str, Any], source: str, folder: str) -> SteerMeta:
    cfg = validate_config(cfg, folder)
    return SteerMeta(source=source, kind=cfg["kind"], hidden_size=cfg["hidden_size"], num_layers=cfg["num_layers"],
                     steer_layers=tuple(int(x) % cfg["num_layers"] for x in cfg["steer_layers"]),
                     alpha=float(cfg.get("alpha", 1.0)), scope=cfg.get("scope", "all"),
                     context_layer=cfg.get("context_layer"), context_read=cfg.get("context_read", "prompt_last"),
                     gate=float(cfg.get("gate", 0.0)), folder=folder, strength=cfg.get("strength", "absolute"))


class Registry:
    """The artifacts a process may steer with: named ones from ``$L2S_VLLM_ARTIFACTS``, and (offline) folders."""

    def __init__(self, names: Mapping[str, str] | None = None, allow_paths: bool | None = None,
                 max_alpha: float | None = None) -> None:
        if names is None:
            raw = os.environ.get(ENV_ARTIFACTS, "")
            try:
                names = json.loads(raw) if raw else {}
            except json.JSONDecodeError:
                raise InvalidInputError(f"${ENV_ARTIFACTS} must hold a JSON object name -> artifact folder") from None
        self.names = dict(names or {})
        self.allow_paths = os.environ.get(ENV_ALLOW_PATHS) == "1" if allow_paths is None else allow_paths
        self.max_alpha = max_alpha_setting() if max_alpha is None else check_max_alpha(max_alpha)
        self._meta: dict[str, SteerMeta] = {}

    def meta(self, source: str) -> SteerMeta:
        """The artifact behind a source (``name:``/``path:``), read from its config only."""
        if source not in self._meta:
            kind, _, ref = source.partition(":")
            folder = self.names[ref] if kind == "name" else ref
            cfg = read_json(Path(folder) / "config.json", what="artifact config")
            self._meta[source] = _meta_from_config(cfg, source, folder)
        return self._meta[source]

    def parse(self, extra_args: Mapping[str, Any] | None) -> SteerRequest | None:
        """The request's steering, or None when it asks for none. Any problem is one clear sentence."""
        args = dict(extra_args or {})
        ours = {k: v for k, v in args.items() if k in KEYS}
        if not ours:
            return None
        sources = [k for k in ("steer", "steer_path", "steer_vector") if k in ours]
        if len(sources) != 1:
            raise InvalidInputError("give exactly one of vllm_xargs 'steer' (an artifact name), 'steer_path' or "
                                    "'steer_vector'")
        vector: tuple[float, ...] | None = None
        if "steer" in ours:
            name = ours["steer"]
            if not isinstance(name, str) or name not in self.names:
                known = ", ".join(sorted(self.names)) or "none"
                raise InvalidInputError(f"unknown steering artifact {name!r}; this server has: {known}")
            meta = self.meta(f"name:{name}")
        elif not self.allow_paths:
            raise InvalidInputError("this server only steers with its named artifacts (vllm_xargs 'steer')")
        elif "steer_path" in ours:
            folder = ours["steer_path"]
            if not isinstance(folder, str) or not (Path(folder) / "config.json").exists():
                raise InvalidInputError(f"steer_path {folder!r} is not an artifact folder")
            meta = self.meta(f"path:{folder}")
        else:
            vector, layers = _inline(ours.get("steer_vector"), ours.get("steer_layers"))
            digest = hashlib.sha256(json.dumps([vector, layers]).encode()).hexdigest()[:24]
            meta = SteerMeta(source=f"inline:{digest}", kind="fixed", hidden_size=len(vector), num_layers=0,
                             steer_layers=layers)
        alpha = ours.get("alpha", meta.alpha)
        check_alpha(alpha)  # the engine adds alpha * v in float32 (or narrower): the operator's bound comes second
        if abs(alpha) > self.max_alpha:
            raise InvalidInputError(f"|alpha| must be at most {self.max_alpha:g} on this engine, got {alpha!r}; "
                                    f"ask for a smaller strength (the operator sets the bound: ${ENV_MAX_ALPHA})")
        strength = ours.get("strength", meta.strength)
        if not isinstance(strength, str):
            raise InvalidInputError(f"strength must be absolute or relative, got {strength!r}")
        strength = Strength.parse(strength).value
        scope = ours.get("scope", meta.scope)
        if scope not in [s.value for s in Scope]:
            raise InvalidInputError(f"scope must be one of all, prompt, generated; got {scope!r}")
        gated = ours.get("gated", True)
        if not isinstance(gated, (bool, int)) or isinstance(gated, float):
            raise InvalidInputError(f"gated must be true or false, got {gated!r}")
        back = args.get(READ_BACK, 0)
        if isinstance(back, bool) or not isinstance(back, int) or back < 0:
            raise InvalidInputError(f"{READ_BACK} is set by the plugin, got {back!r}")
        return SteerRequest(meta, float(alpha), scope, bool(gated), vector, read_back=back, strength=strength)


def check_max_alpha(value: float) -> float:
    """A valid bound on |alpha|: positive and finite in float32."""
    if not finite_in(value) or value <= 0:
        raise InvalidInputError(f"the maximum alpha must be a positive finite number, got {value!r}")
    return float(value)


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


def _inline(vector: Any, layers: Any) -> tuple[tuple[float, ...], tuple[int, ...]]:
    if not isinstance(vector, (list, tuple)) or not vector or not all(
            finite_in(x) for x in vector):
        raise InvalidInputError("steer_vector must be a non-empty list of finite numbers (in float32)")
    if not isinstance(layers, (list, tuple)) or not layers or not all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in layers):
        raise InvalidInputError("steer_vector needs steer_layers: a non-empty list of layer indices")
    return tuple(float(x) for x in vector), tuple(int(x) for x in layers)


@dataclass(frozen=True)
class EngineLimits:
    """What the running engine is and allows, for request checks."""

    hidden_size: int
    num_layers: int
    chunked_prefill: bool
    pipeline_parallel: int = 1
    #: vLLM's V2 model runner (GPU, opt-in or forced by some features): the plugin patches the V1 runner
    model_runner_v2: bool = False


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
    if m.context_read not in READS:
        raise InvalidInputError(f"this L2S artifact reads position {m.context_read!r}; the vLLM engine reads "
                                f"{' or '.join(READS)}")
    if req.scope in PROMPT_SCOPES and limits.chunked_prefill:
        raise InvalidInputError(f"L2S with scope {req.scope!r} must see the whole prompt in one step, but this "
                                "engine has chunked prefill on; use scope 'generated', or start it with chunked "
                                "prefill off (`l2s serve` does so unless told otherwise)")
    if limits.pipeline_parallel > 1:
        raise InvalidInputError("L2S reads and writes the residual stream in one pass; pipeline parallelism "
                                "(layers on different stages) is not supported. Use tensor parallelism")
