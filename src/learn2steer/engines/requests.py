"""The steering request format, engine-neutral: what a steered request says, how it is checked, and how it
salts a prefix cache.

A request selects steering through flat values (vLLM carries them in ``SamplingParams.extra_args``, the
OpenAI server's ``vllm_xargs``)::

    {"steer": "NAME", "alpha": 1.0, "scope": "all", "gated": true, "strength": "absolute"}

``steer`` names an artifact the server preloaded; ``alpha``, ``scope`` and ``strength`` default to the
artifact's. ``|alpha|`` is bounded by an operator setting (:class:`Registry`'s ``max_alpha``, default 100):
a huge strength is never a useful answer, and one that overflows the model's dtype would put inf into the
residual stream, whose cached blocks other requests then share. An engine that runs trusted callers
(the offline engine) may also accept ``steer_path`` (an artifact folder) and ``steer_vector`` +
``steer_layers`` (this request's own fixed vectors, e.g. P2S: one list of D numbers added at every layer of
``steer_layers``, or one such list per entry of ``steer_layers``); a server refuses those, except inline
vectors where its operator allows them (``l2s serve --inline-vectors``: ``steer_vector`` and vllm-lens's
``apply_steering_vectors``, :mod:`learn2steer.engines.lens`, bounded in count and size).

A server's names are its start-up artifacts and, with ``--registry DIR``, those registered at runtime
(:mod:`learn2steer.engines.store`): the front end pins such a request to the version current when it was
accepted (``l2s_version``, never trusted from the client), and every process loads that version.

Nothing here knows an engine: the vLLM plugin (``engines/vllm/``) reads its settings from its environment
(:mod:`learn2steer.engines.vllm.protocol`) and checks requests against what the running engine allows.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from learn2steer import rules
from learn2steer._io import read_json
from learn2steer.artifacts import validate_config
from learn2steer.engines import lens
from learn2steer.engines.store import ArtifactStore
from learn2steer.errors import InvalidInputError
from learn2steer.options import check_choice
from learn2steer.rules import Scope, ScopeName, Strength, check_alpha, finite_in

DEFAULT_MAX_ALPHA = 100.0
KEYS = ("steer", "alpha", "scope", "gated", "strength", "steer_path", "steer_vector", "steer_layers", lens.KEY,
        *lens.UNSUPPORTED)
#: set by the front end (never by the client: it is overwritten): the registered version a request was pinned to
PIN = "l2s_version"
#: set by the front end of ``l2s serve`` with chunked prefill (never by the client): ``read`` marks the request that
#: reads an L2S vector ahead of a prompt-scope request (it writes nothing), ``ahead`` the request that then uses it
MODE = "l2s_mode"
MODES = ("read", "ahead")
#: set by the engine core for those two: which prompt (and artifact) the vector read ahead belongs to
DIGEST = "l2s_prompt_digest"
#: set by the engine's front end (never by the client: it is overwritten): how many tokens before the last
#: prompt token the L2S read sits (``input_last``: the generation prompt's length; ``prompt_last``: 0)
READ_BACK = "l2s_read_back"
#: set by the front end too: the tokens an ``input_last`` read puts in place, ending at the read position, in a
#: read-only pass (LLaVA-1.5's bare prompt ends in a lone "▁" the full prompt lacks: models.prompts.InputRead)
READ_TOKENS = "l2s_read_tokens"
PROMPT_SCOPES = (Scope.ALL.value, Scope.PROMPT.value)


def has_steering(extra: Any) -> bool:
    """Whether a request's extra arguments ask for steering at all."""
    return isinstance(extra, dict) and any(k in extra for k in KEYS)


def artifact_label(source: str) -> str:
    """A source as a metrics label: the artifact's name, or ``path`` / ``inline`` (never a client's free text)."""
    kind, _, ref = source.partition(":")
    if kind == "name":
        return ref
    if kind == "reg":
        return ref.partition("@")[0]
    return kind


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
        return rules.reads_context(self.kind)


@dataclass(frozen=True)
class SteerRequest:
    """One request's resolved steering: which artifact, at which strength and scope."""

    meta: SteerMeta
    alpha: float
    scope: str
    gated: bool = True
    #: the request's own vectors (inline): one for every steering layer, or one per entry of ``meta.steer_layers``
    vectors: tuple[tuple[float, ...], ...] | None = field(default=None, repr=False)
    read_back: int = 0
    strength: str = "absolute"
    read_tokens: tuple[int, ...] = ()

    def vector_at(self, layer: int) -> tuple[float, ...]:
        """The inline vector this request adds at ``layer`` (one of ``meta.steer_layers``)."""
        assert self.vectors is not None, "vector_at() is for inline vectors"
        if len(self.vectors) == 1:
            return self.vectors[0]
        return self.vectors[self.meta.steer_layers.index(layer)]
    #: inline vectors that differ per layer (vllm-lens's ``apply_steering_vectors``): (layer, vector) pairs
    layer_vectors: tuple[tuple[int, tuple[float, ...]], ...] | None = field(default=None, repr=False)
    mode: str = ""      # "read" / "ahead": the read-ahead of chunked prefill (MODE); "" for every other request
    digest: str = ""    # the prompt digest a read-ahead vector is kept under (DIGEST)

    def prompt_digest(self, prompt_token_ids: Sequence[int], mm_identifiers: Sequence[str] = ()) -> str:
        """What makes two requests' L2S vectors the same: the artifact (version), gate, read position, prompt
        tokens and images. A vector read ahead is found again under it."""
        parts = [self.key, self.gated, self.read_back, list(prompt_token_ids), [str(x) for x in mm_identifiers]]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]

    @property
    def key(self) -> str:
        """Identity of the vectors applied (same key and settings => same additions)."""
        return self.meta.source

    @property
    def reads_after_writing(self) -> bool:
        """L2S with L' > L*: v must be read in a pass of its own before the steered pass."""
        m = self.meta
        return m.reads_context and rules.reads_after_writing(m.context_layer, m.steer_layers)

    @property
    def reads_in_own_pass(self) -> bool:
        """v is read in a pass of its own before the steered pass: L' > L*, or tokens put in place for the read."""
        return self.reads_after_writing or bool(self.read_tokens)

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
    """The artifacts an engine may steer with: named ones (a server's ``--artifact NAME=DIR``), and, where
    ``allow_paths`` (a trusted caller such as the offline engine), artifact folders and inline vectors."""

    def __init__(self, names: Mapping[str, str] | None = None, allow_paths: bool = False,
                 max_alpha: float = DEFAULT_MAX_ALPHA, bound_setting: str = "max_alpha",
                 store: ArtifactStore | None = None, inline: lens.InlineLimits | None = None) -> None:
        self.names = dict(names or {})
        self.allow_paths = allow_paths
        self.store = store      # artifacts registered at runtime (``l2s serve --registry``)
        self.inline = inline    # inline vectors allowed, within these limits (None: refused unless allow_paths)
        self.max_alpha = check_max_alpha(max_alpha)
        self.bound_setting = bound_setting  # where the operator sets max_alpha (named in the refusal)
        self._meta: dict[str, SteerMeta] = {}

    def meta(self, source: str) -> SteerMeta:
        """The artifact behind a source (``name:``/``path:``), read from its config only."""
        if source not in self._meta:
            kind, _, ref = source.partition(":")
            if kind == "reg":
                assert self.store is not None
                name, _, version = ref.partition("@")
                folder = str(self.store.folder(name, version))
                if not Path(folder).is_dir():
                    raise InvalidInputError(f"steering artifact {name!r} version {version} is no longer on this "
                                            "server; send the request again")
            else:
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
        for key, why in lens.UNSUPPORTED.items():
            if key in ours:
                raise InvalidInputError(f"vllm_xargs {key} is not supported: {why}")
        sources = [k for k in ("steer", "steer_path", "steer_vector", lens.KEY) if k in ours]
        if len(sources) != 1:
            raise InvalidInputError("give exactly one of vllm_xargs 'steer' (an artifact name), 'steer_path', "
                                    f"'steer_vector' or '{lens.KEY}'")
        vectors: tuple[tuple[float, ...], ...] | None = None
        layer_vectors = None
        if "steer" in ours:
            meta = self.meta(self._named(ours["steer"], args.get(PIN)))
        elif lens.KEY in ours:
            if self.inline is None and not self.allow_paths:
                raise InvalidInputError(f"vllm_xargs {lens.KEY}: this server does not accept inline vectors; its "
                                        "operator turns them on with `l2s serve --inline-vectors`")
            for key in ("alpha", "strength", "steer_layers"):
                if key in ours:
                    raise InvalidInputError(f"vllm_xargs {key} does not go with {lens.KEY}: each vector carries its "
                                            "own layer_indices, scale and norm_match")
            got = lens.decode(ours[lens.KEY], self.inline or lens.InlineLimits(), self.max_alpha)
            layer_vectors = got.vectors
            digest = hashlib.sha256(json.dumps(got.vectors).encode()).hexdigest()[:24]
            meta = SteerMeta(source=f"inline:{digest}", kind="fixed", hidden_size=got.hidden_size, num_layers=0,
                             steer_layers=tuple(k for k, _ in got.vectors), alpha=got.alpha, strength=got.strength)
        elif "steer_vector" in ours and self.inline is not None:
            vectors, layers = _inline(ours.get("steer_vector"), ours.get("steer_layers"))
            if len(layers) > self.inline.max_vectors or len(vectors[0]) > self.inline.max_hidden:
                raise InvalidInputError(f"steer_vector: this server accepts at most {self.inline.max_vectors} layers "
                                        f"and {self.inline.max_hidden} values")
            one = vectors[0] if len(vectors) == 1 else vectors  # one vector: the digest (and salt) of 0.3
            digest = hashlib.sha256(json.dumps([one, layers]).encode()).hexdigest()[:24]
            meta = SteerMeta(source=f"inline:{digest}", kind="fixed", hidden_size=len(vectors[0]), num_layers=0,
                             steer_layers=layers)
        elif not self.allow_paths:
            raise InvalidInputError("this server only steers with its named artifacts (vllm_xargs 'steer')")
        elif "steer_path" in ours:
            folder = ours["steer_path"]
            if not isinstance(folder, str) or not (Path(folder) / "config.json").exists():
                raise InvalidInputError(f"steer_path {folder!r} is not an artifact folder")
            meta = self.meta(f"path:{folder}")
        else:
            vectors, layers = _inline(ours.get("steer_vector"), ours.get("steer_layers"))
            one = vectors[0] if len(vectors) == 1 else vectors  # one vector: the digest (and salt) of 0.3
            digest = hashlib.sha256(json.dumps([one, layers]).encode()).hexdigest()[:24]
            meta = SteerMeta(source=f"inline:{digest}", kind="fixed", hidden_size=len(vectors[0]), num_layers=0,
                             steer_layers=layers)
        alpha = ours.get("alpha", meta.alpha)
        check_alpha(alpha)  # the engine adds alpha * v in float32 (or narrower): the operator's bound comes second
        if abs(alpha) > self.max_alpha:
            raise InvalidInputError(f"|alpha| must be at most {self.max_alpha:g} on this engine, got {alpha!r}; "
                                    f"ask for a smaller strength (the operator sets the bound: {self.bound_setting})")
        strength = ours.get("strength", meta.strength)
        if not isinstance(strength, str):
            raise InvalidInputError(f"strength must be absolute or relative, got {strength!r}")
        strength = Strength.parse(strength).value
        scope = check_choice(ScopeName, ours.get("scope", meta.scope), "scope")  # the configs' own check
        gated = ours.get("gated", True)
        if not isinstance(gated, (bool, int)) or isinstance(gated, float):
            raise InvalidInputError(f"gated must be true or false, got {gated!r}")
        back = args.get(READ_BACK, 0)
        if isinstance(back, bool) or not isinstance(back, int) or back < 0:
            raise InvalidInputError(f"{READ_BACK} is set by the plugin, got {back!r}")
        put = args.get(READ_TOKENS, [])
        if not isinstance(put, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                         for t in put):
            raise InvalidInputError(f"{READ_TOKENS} is set by the plugin, got {put!r}")
        mode, digest = args.get(MODE, ""), args.get(DIGEST, "")
        if mode not in ("", *MODES) or not isinstance(digest, str):
            raise InvalidInputError(f"{MODE} and {DIGEST} are set by the plugin, got {mode!r}, {digest!r}")
        return SteerRequest(meta, float(alpha), scope, bool(gated), vectors, read_back=back, strength=strength,
                            read_tokens=tuple(put), layer_vectors=layer_vectors, mode=mode, digest=digest)

    def _named(self, name: Any, pin: Any) -> str:
        """The source of ``steer: name``: a start-up artifact, or a registered one at its pinned (else current)
        version. A name that is not registered, or not yet, is one sentence naming it."""
        if isinstance(name, str) and name in self.names:
            return f"name:{name}"
        if isinstance(name, str) and self.store is not None:
            version = pin if isinstance(pin, str) and pin else self.store.current(name)
            if version is not None:
                return f"reg:{name}@{version}"
        known = sorted(self.names) + (sorted(self.store.names()) if self.store is not None else [])
        ready = " (not registered, or not ready yet)" if self.store is not None else ""
        raise InvalidInputError(f"unknown steering artifact {name!r}{ready}; this server has: "
                                f"{', '.join(known) or 'none'}")

    def pin(self, extra: dict[str, Any]) -> None:
        """Front end: write the registered version this request gets into its extra args (a client's own
        ``l2s_version`` is dropped first), so that every process applies the same version, whatever replaces it
        while the request runs. Start-up artifacts need no pin."""
        extra.pop(PIN, None)
        name = extra.get("steer")
        if self.store is None or not isinstance(name, str) or name in self.names:
            return
        version = self.store.current(name)
        if version is not None:
            extra[PIN] = version


def check_max_alpha(value: float) -> float:
    """A valid bound on |alpha|: positive and finite in float32."""
    if not finite_in(value) or value <= 0:
        raise InvalidInputError(f"the maximum alpha must be a positive finite number, got {value!r}")
    return float(value)


def _inline(vector: Any, layers: Any) -> tuple[tuple[tuple[float, ...], ...], tuple[int, ...]]:
    """``steer_vector`` (one list of numbers, or one list per steering layer) and ``steer_layers``, checked."""
    per_layer = isinstance(vector, (list, tuple)) and bool(vector) and all(isinstance(v, (list, tuple)) for v in vector)
    vectors = list(vector) if per_layer else [vector]
    if not all(isinstance(v, (list, tuple)) and v and all(finite_in(x) for x in v) for v in vectors):
        raise InvalidInputError("steer_vector must be a non-empty list of finite numbers (in float32), or one such "
                                "list per entry of steer_layers")
    if not isinstance(layers, (list, tuple)) or not layers or not all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in layers):
        raise InvalidInputError("steer_vector needs steer_layers: a non-empty list of layer indices")
    if per_layer and len(vectors) != len(layers):
        raise InvalidInputError(f"steer_vector holds {len(vectors)} vectors for {len(layers)} steer_layers; give one "
                                "per layer, or a single vector for all of them")
    if per_layer and len(set(layers)) != len(layers):
        raise InvalidInputError("steer_layers repeats a layer; with one vector per layer, name each layer once")
    if len({len(v) for v in vectors}) != 1:
        raise InvalidInputError("the vectors of steer_vector must all have the model's hidden size")
    return tuple(tuple(float(x) for x in v) for v in vectors), tuple(int(x) for x in layers)
