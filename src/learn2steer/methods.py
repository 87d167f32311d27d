"""The method registry and the settings of one steered run.

Every method of the paper is one :class:`Method` entry that says how its vectors are obtained and whether
it steers at all; the CLI, the evaluation grid and the tasks read this table instead of keeping their own
lists. A method module registers its entry (:func:`register_method`: L2S in :mod:`learn2steer.l2s`, CAST in
:mod:`learn2steer.cast`), with the *spellings* of its options: ``l2s_nogate`` is L2S without its gate, a
name for (``l2s``, ``gated=False``) that configs, grid cells and result files keep using.
:class:`MethodConfig` is what an engine needs to answer under one method: the strength, the scope and the
vectors, passed whole as a :class:`~learn2steer.vectors.SteeringVector` or as a predictor artifact.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Literal, Mapping, Sequence

import torch

from learn2steer._io import fingerprint as _fingerprint
from learn2steer.artifacts import SteeringArtifact
from learn2steer.behaviours import PromptPlacement
from learn2steer.errors import InvalidInputError
from learn2steer.extraction import Extraction
from learn2steer.options import check_choice
from learn2steer.rules import Scope, Strength, check_alpha
from learn2steer.steering import FixedVectors, VectorProvider
from learn2steer.training import p2s_vectors, target_scales
from learn2steer.vectors import SteeringVector, norm_random

Source = Literal["nothing", "instruction", "artifact", "extraction"]


@dataclass(frozen=True)
class Method:
    """One steering method: where its vectors come from and whether it changes activations at all.

    ``tuned_as``: when layer and strength are chosen on validation data, this method uses the choice
    made for that method (Mean-S(BA) as Mean-S; P2S and Norm-Rnd at L2S's setting, so they are compared
    at equal settings).
    ``source``: ``nothing`` (no steering), ``instruction`` (the Prompt baseline: text, no vectors),
    ``artifact`` (a trained artifact: ``artifact`` names which), ``extraction`` (per-input P2S vectors of
    the very inputs being answered: an oracle that needs each input's contrastive answers).
    ``random_direction``: an extraction method that keeps each P2S vector's norm and draws its direction (Norm-Rnd).
    """

    name: str
    paper_name: str
    source: Source
    artifact: str | None = None
    gated: bool = True
    tuned_as: str | None = None
    summary: str = ""
    #: a spelling's method (``l2s_nogate``: ``l2s``); None for a method itself
    spelling_of: str | None = None
    random_direction: bool = False

    @property
    def base(self) -> str:
        """The method this name spells (itself for a method)."""
        return self.spelling_of or self.name

    @property
    def steers(self) -> bool:
        """True when the method changes activations (artifact or per-input vectors)."""
        return self.source in ("artifact", "extraction")

    @property
    def per_input(self) -> bool:
        """Needs vectors of the test inputs themselves (P2S, Norm-Rnd)."""
        return self.source == "extraction"


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("no_steering", "No steering", "nothing", summary="the model as it is"),
    Method("prompt", "Prompt", "instruction", summary="the behaviour's instruction added to the prompt"),
    Method("mean", "Mean-S", "artifact", "mean", summary="one mean P2S vector for every input (CAA)"),
    Method("mean_ba", "Mean-S(BA)", "artifact", "mean_ba", tuned_as="mean",
           summary="one mean vector with a single behaviour template for every input"),
    Method("norm_random", "Norm-Rnd", "extraction", tuned_as="l2s", random_direction=True,
           summary="a random direction per input with the norm of its P2S vector"),
    Method("p2s", "P2S", "extraction", tuned_as="l2s", summary="each input's own P2S vector (oracle)"),
)}
PAPER_METHODS: tuple[str, ...] = ("no_steering", "prompt", "mean", "mean_ba", "norm_random", "l2s", "p2s")
ALL_METHODS: tuple[str, ...] = tuple(METHODS)  # the methods without a module of their own (modules add to METHODS)


@dataclass(frozen=True)
class Spelling:
    """A name for a method with some of its options set (``l2s_nogate``: L2S with ``gated=False``).

    ``options``: :class:`Method` fields that are :class:`MethodConfig` options (today ``gated``). The spelling
    is tuned as its method (compared at the method's chosen layer and strength).
    """

    name: str
    paper_name: str
    options: Mapping[str, Any] = field(default_factory=dict)
    summary: str = ""


def register_method(m: Method, *spellings: Spelling) -> Method:
    """Add a method (and the spellings of its options) to the registry the CLI, the grids and the engines read
    (one line in the method's module). Listings follow the paper's table (:data:`PAPER_METHODS`), then
    registration order, each spelling after its method."""
    METHODS[m.name] = m
    for s in spellings:
        METHODS[s.name] = replace(m, name=s.name, paper_name=s.paper_name, summary=s.summary or m.summary,
                                  tuned_as=m.tuned_as or m.name, spelling_of=m.name, **dict(s.options))
    rank = {name: k for k, name in enumerate(PAPER_METHODS)}
    ordered = sorted(METHODS.values(), key=lambda x: rank.get(x.base, len(rank)))  # stable: registration order
    METHODS.clear()
    METHODS.update((x.name, x) for x in ordered)
    return m


def spelled(name: str, *, gated: bool = True) -> str:
    """The registered name of method ``name`` with these options: a spelling that sets them, else ``name``."""
    base = method(name).base
    for m in METHODS.values():
        if m.base == base and m.gated == gated:
            return m.name
    return base


def artifacts_for(names: Iterable[str]) -> list[str]:
    """The trained artifacts that answering these methods reads (their own, and those of the methods they
    are tuned as: P2S and Norm-Rnd use L2S's targets and settings), in registry order: what to ask
    :func:`~learn2steer.training.train_artifacts` for."""
    need: set[str] = set()
    todo = list(names)
    while todo:
        m = method(todo.pop())
        if m.artifact and m.artifact not in need:
            need.add(m.artifact)
        if m.tuned_as and m.tuned_as != m.name:
            todo.append(m.tuned_as)
    return [a for a in dict.fromkeys(x.artifact for x in METHODS.values() if x.artifact) if a in need]


def method(name: str) -> Method:
    """The registry entry of ``name``; an unknown name is a clear error listing the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise InvalidInputError(f"unknown method {name!r}; choose from {', '.join(METHODS)}") from None


@dataclass
class MethodConfig:
    """How to answer: the method, its strength and scope, and its vectors.

    Exactly one vector source is set for a steering method: ``vector`` (a fixed [D]-per-layer vector, or
    per-input [N, D] vectors whose rows belong to ``row_ids``) or ``artifact`` (a predictor artifact: L2S, CAST).
    ``gated``: the artifact's norm gate applies (L2S's option; ``l2s_nogate`` spells it off).
    """

    method: str = "no_steering"
    alpha: float = 1.0
    scope: Scope | str = Scope.ALL
    vector: SteeringVector | None = None
    row_ids: list[str] | None = None
    artifact: SteeringArtifact | None = None
    gated: bool = True
    prompt: str = ""
    prompt_placement: PromptPlacement = "system"   # system message | "user": before the question | "append": after it
    strength: Strength | str = Strength.ABSOLUTE   # what alpha measures (steering.Strength)

    def __post_init__(self) -> None:
        m = method(self.method)
        check_alpha(self.alpha)
        self.scope = Scope.parse(self.scope)
        self.strength = Strength.parse(self.strength)
        if m.source == "instruction" and not self.prompt:
            raise InvalidInputError("method 'prompt' needs an instruction (the behaviour spec's `prompt`)")
        check_choice(PromptPlacement, self.prompt_placement, "prompt_placement")
        if not m.steers:
            return
        if (self.vector is None) == (self.artifact is None or not self.artifact.reads_context):
            raise InvalidInputError(f"method {self.method!r} needs either a steering vector or a predictor artifact "
                                    "(train them with `l2s train`)")
        if self.vector is not None and self.vector.per_row:
            if self.row_ids is None or len(self.row_ids) != self.vector.num_rows:
                raise InvalidInputError("per-input vectors need row_ids naming the input of every row")

    @property
    def info(self) -> Method:
        """The method's registry entry."""
        return method(self.method)

    @property
    def steers(self) -> bool:
        """True when this configuration changes activations."""
        return self.info.steers

    @classmethod
    def from_artifact(cls, art: SteeringArtifact, *, alpha: float | None = None, scope: str | None = None,
                      gated: bool = True, strength: str | None = None) -> "MethodConfig":
        """Steer with a saved artifact at its stored (or the given) strength and scope."""
        common: dict[str, Any] = dict(alpha=art.alpha if alpha is None else alpha, scope=scope or art.scope,
                                      strength=strength or art.strength)
        if art.reads_context:
            if art.method not in METHODS:
                raise InvalidInputError(f"artifact method {art.method!r} is not a registered method; import the "
                                        "module that registers it")
            return cls(method=spelled(art.method, gated=gated), artifact=art, gated=gated, **common)
        name = art.method if art.method in METHODS and METHODS[art.method].source == "artifact" else "mean"
        return cls(method=name, vector=art.vector, **common)

    def provider_for(self, example_ids: Sequence[str]) -> VectorProvider | None:
        """The steering provider for a batch of ``example_ids`` (None when the method does not steer)."""
        if not self.steers:
            return None
        if self.artifact is not None and self.artifact.reads_context:
            return self.artifact.provider(gated=self.gated)
        assert self.vector is not None
        if not self.vector.per_row:
            return FixedVectors(self.vector)
        pos = {i: k for k, i in enumerate(self.row_ids or [])}
        missing = [i for i in example_ids if i not in pos]
        if missing:
            raise InvalidInputError(f"method {self.method!r} needs a vector for every input; missing {missing[:3]} "
                                    "(extract P2S vectors for the evaluation inputs first)")
        return FixedVectors(self.vector.rows([pos[i] for i in example_ids]))


def scales_artifact(m: Method) -> str | None:
    """The artifact whose training targets a per-input method applies (their per-group scalars): that of the method
    it is tuned as (P2S and Norm-Rnd: L2S's, so the oracle steers with L2S's very targets); None for others."""
    if not m.per_input or not m.tuned_as or m.tuned_as not in METHODS:
        return None
    return METHODS[m.tuned_as].artifact


def config_for(name: str, *, alpha: float = 1.0, scope: Scope | str = Scope.ALL,
               artifacts: Mapping[str, SteeringArtifact] | None = None, extraction: Extraction | None = None,
               layer: int | None = None, prompt: str = "", seed: int = 0,
               p2s_scales: Mapping[str, float] | None = None, prompt_placement: PromptPlacement = "system",
               strength: str = "absolute") -> MethodConfig:
    """The :class:`MethodConfig` of a registered method, from trained artifacts (mean, mean_ba, l2s) or,
    for the per-input methods (p2s, norm_random), from an extraction of the inputs being answered.

    ``p2s_scales``: the per-group scalars of the L2S training targets, which P2S applies too; by default those
    recorded in the artifact of :func:`scales_artifact` (give them when that artifact was not trained with these
    targets, e.g. the paper's released predictor). ``prompt_placement``: where the Prompt baseline's instruction goes
    (the behaviour spec's ``prompt_placement``).
    """
    m = method(name)
    if m.source == "nothing":
        return MethodConfig(method=name)
    if m.source == "instruction":
        return MethodConfig(method=name, prompt=prompt, prompt_placement=prompt_placement)
    arts = artifacts or {}
    if m.source == "artifact":
        art = arts.get(m.artifact or "")
        if art is None:
            raise InvalidInputError(f"method {name!r} needs its trained {m.artifact!r} artifact (run `l2s train`)")
        if art.reads_context:
            return MethodConfig(method=name, alpha=alpha, scope=scope, artifact=art, gated=m.gated, strength=strength)
        return MethodConfig(method=name, alpha=alpha, scope=scope, vector=art.vector, strength=strength)
    if extraction is None or layer is None:
        raise InvalidInputError(f"method {name!r} needs P2S vectors of the inputs it answers (an extraction) "
                                "and the steering layer")
    scales = p2s_scales if p2s_scales is not None else target_scales(arts.get(scales_artifact(m) or ""), layer)
    z = p2s_vectors(extraction, layer, scales)
    vecs = norm_random(z, seed=seed) if m.random_direction else z
    return MethodConfig(method=name, alpha=alpha, scope=scope, vector=vecs, row_ids=list(extraction.ids),
                        strength=strength)


def fingerprint(cfg: MethodConfig) -> str:
    """A hash of everything that determines a method's answers (settings and tensor contents)."""
    tensors: list[torch.Tensor] = []
    art = cfg.artifact
    layers: list[int] = []
    if cfg.vector is not None:
        tensors += [v for _, v in cfg.vector.items()]
        layers = list(cfg.vector)
    if art is not None and art.predictor is not None:
        tensors += [v for _, v in sorted(art.predictor.state_dict().items())]
        layers = list(art.steer_layers)
    return _fingerprint(cfg.method, cfg.alpha, Scope.parse(cfg.scope).value, layers,
                        art.context_layer if art is not None else None,
                        art.context_read if art is not None else None,
                        art.gate if art is not None and cfg.gated else 0.0,
                        cfg.row_ids, cfg.prompt if method(cfg.method).source == "instruction" else "",
                        cfg.prompt_placement,
                        # only a non-default mode enters the hash, so answers computed before it existed still match
                        *([Strength.parse(cfg.strength).value] if cfg.strength != Strength.ABSOLUTE else []),
                        tensors=tensors)


def prompt_rows(cfg: MethodConfig, examples: Sequence[Any]) -> list[Any]:
    """The prompt rows of ``examples`` under ``cfg`` (the Prompt baseline adds its instruction).

    ``system``: a system message (for Qwen2-VL it replaces the template's default system prompt);
    ``user``: before the question, a blank line between; ``append``: after the question, one space between,
    as the official code does (``question.strip() + " " + instruction``, ``image_text_dataset.py``).
    """
    from learn2steer.models.prompts import PromptRow

    if cfg.method != "prompt":
        return [PromptRow(e.question, e.image) for e in examples]
    if cfg.prompt_placement == "system":
        return [PromptRow(e.question, e.image, system=cfg.prompt) for e in examples]
    if cfg.prompt_placement == "append":
        return [PromptRow(f"{e.question.strip()} {cfg.prompt.strip()}", e.image) for e in examples]
    return [PromptRow(f"{cfg.prompt}\n\n{e.question}", e.image) for e in examples]
