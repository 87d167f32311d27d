"""What ``l2s extract``, ``l2s train`` and ``l2s generate`` do, as typed settings with a ``run`` method.

Each job is a dataclass (the command's one schema: its fields are the CLI options and the YAML config
keys) whose ``run`` does the work with the library and writes its outputs; the CLI only builds the job
and prints what ``run`` returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from learn2steer._io import dumps, read_json, write_json, write_text_atomic
from learn2steer._version import __version__
from learn2steer.artifacts import SteeringArtifact
from learn2steer.behaviours import Example, load_behaviour
from learn2steer.engines import EngineName, generate_with, make_engine
from learn2steer.errors import InvalidInputError
from learn2steer.evaluation.data import DataOptions
from learn2steer.extraction import extract_to, load_extraction
from learn2steer.methods import METHODS, MethodConfig, artifacts_for, method
from learn2steer.models.loading import ModelHandle, ModelOptions, model_shape
from learn2steer.options import as_dict, check_choices
from learn2steer.predictor import TrainConfig
from learn2steer.rules import Scope, ScopeName, StrengthName, check_alpha
from learn2steer.training import save_artifacts, train_artifacts


def _need_out(out: Path | None) -> Path:
    if out is None:
        raise InvalidInputError("give an output folder (--out, or `out:` in the config file)")
    return Path(out)


@dataclass
class ExtractJob(ModelOptions, DataOptions):
    """``l2s extract``: P2S vectors and context features of a dataset, in resumable shards."""

    out: Path | None = field(default=None, metadata={
        "help": "Output folder (safetensors shards + index.json; re-run to resume)."})
    behaviour: str = field(default="safety", metadata={
        "help": "Shipped behaviour (safety, safety_refusal, hallucination) or a YAML/JSON spec."})
    layers: list[int] = field(default_factory=lambda: [10], metadata={
        "help": "Steering layers L* where z = h(T+) - h(T-) is read (negative: from the end)."})
    context_layers: list[int] = field(default_factory=list, metadata={
        "help": "Context layers L' for h_X (default: the steering layers)."})
    batch_size: int = field(default=8, metadata={"help": "Examples per forward pass."})
    shard_size: int = field(default=256, metadata={"help": "Examples per shard (the unit of resumption)."})

    def run(self, progress: bool = True) -> str:
        """Extract (resumable) and return a one-line summary."""
        out = _need_out(self.out)
        spec = load_behaviour(self.behaviour)
        examples = self.load()
        handle = self.load_model()
        write_json(out / "settings.json", {"command": "extract", "version": __version__, **as_dict(self)})
        extract_to(handle, spec, examples, out, steer_layers=self.layers,
                   context_layers=self.context_layers or self.layers, batch_size=self.batch_size,
                   shard_size=self.shard_size, progress=progress)
        ex = load_extraction(out)
        return f"extracted {len(ex.ids)} examples -> {out} (z at layers {list(ex.z)}, h at {sorted(ex.h)})"


@dataclass
class TrainJob(TrainConfig):
    """``l2s train``: the artifacts of the asked methods (default: every trainable one: L2S, Mean-S, Mean-S(BA),
    CAST, ...) from an extraction; no model loaded."""

    extraction: Path | None = field(default=None, metadata={"help": "Folder written by `l2s extract`."})
    out: Path | None = field(default=None, metadata={
        "help": "Artifacts folder: one folder per artifact (l2s/, mean/, mean_ba/, cast/) is written inside."})
    methods: list[str] = field(default_factory=list, metadata={
        "help": "Methods to train artifacts for (default: every one with a trainer: l2s, mean, mean_ba, cast, ...)."})
    layer: int | None = field(default=None, metadata={"help": "Steering layer L* (default: the first extracted)."})
    context_layer: int | None = field(default=None, metadata={"help": "Context layer L' (default: L*)."})
    rescale: bool = field(default=True, metadata={
        "help": "Rescale targets per contrast group to the behaviour's rescale_group (official)."})
    gate: bool = field(default=False, metadata={"help": "Learn a norm gate for L2S on the validation rows."})
    ids_file: Path | None = field(default=None, metadata={
        "help": "JSON list of ids to train on (or a run's split.json: its 'train' list)."})
    alpha: float = field(default=1.0, metadata={"help": "Default strength stored in the artifacts."})
    scope: ScopeName = field(default="all", metadata={
        "help": "Default scope stored in the artifacts: " + ", ".join(s.value for s in Scope)})
    strength: StrengthName = field(default="absolute", metadata={
        "help": "What alpha measures, stored in the artifacts: absolute (alpha * v) | relative (a fraction of "
                "each position's residual norm)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choices(self)

    def run(self, progress: bool = True) -> str:
        """Train from the extraction, save the artifacts and return a one-line summary."""
        if self.extraction is None:
            raise InvalidInputError("give the extraction folder (--extraction)")
        out = _need_out(self.out)
        check_alpha(self.alpha)
        ex = load_extraction(self.extraction)
        n = int(ex.meta["num_layers"])

        def norm(layer: int, what: str) -> int:
            if not -n <= layer < n:
                raise InvalidInputError(f"{what} {layer} is out of range for a model with {n} layers")
            return layer % n

        layer = norm(self.layer, "--layer") if self.layer is not None else list(ex.z)[0]
        ctx = norm(self.context_layer, "--context-layer") if self.context_layer is not None else layer
        ids = None
        if self.ids_file:
            data = read_json(self.ids_file, what="ids file")
            ids = data["train"] if isinstance(data, dict) and "train" in data else data
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                raise InvalidInputError(f"{self.ids_file} must hold a JSON list of ids (or a split with 'train')")
        spec = ex.behaviour_spec or {}
        cfg = TrainConfig.from_dict(as_dict(self))
        arts, result = train_artifacts(ex, steer_layer=layer, context_layer=ctx, cfg=cfg, ids=ids,
                                       rescale_group=spec.get("rescale_group") if self.rescale else None,
                                       alpha=self.alpha, scope=self.scope, gate=self.gate, progress=progress,
                                       train=self._trainers())
        for art in arts.values():
            art.strength = self.strength  # a StrengthName, checked with the other fixed choices
        write_json(out / "settings.json", {"command": "train", "version": __version__, **as_dict(self)})
        paths = save_artifacts(arts, out)
        done = f"artifacts: {', '.join(str(p) for p in paths.values()) or 'none (the data support none of them)'}"
        if result is None:
            return done
        write_json(out / "training_history.json", result.history)
        return f"best validation loss {result.best_val_loss:.4g} at epoch {result.best_epoch}; {done}"

    def _trainers(self) -> list[str] | None:
        """The trainers ``--methods`` asks for (None: all); a method that trains nothing is named."""
        if not self.methods:
            return None
        for name in self.methods:
            if method(name).source != "artifact":
                trainable = ", ".join(m for m in METHODS if METHODS[m].source == "artifact")
                raise InvalidInputError(f"method {name!r} has no artifact to train; --methods takes {trainable}")
        return artifacts_for(self.methods)


@dataclass
class GenerateJob(ModelOptions, DataOptions):
    """``l2s generate``: answer prompts or a dataset under a method (greedy)."""

    # the same option as DataOptions.dataset, optional here (prompts can be given instead): a narrower override
    dataset: str | None = field(default=None, metadata={  # type: ignore[assignment]
        "help": "Answer a dataset instead of --prompt: demo | jsonl:FILE | mmsb:ROOT | pope:FILE | chair:DIR"})
    prompt: list[str] = field(default_factory=list, metadata={"help": "A user prompt (repeatable).", "repeat": True,
                                                                     "short": "-p"})
    image: list[str] = field(default_factory=list, metadata={
        "help": "An image per prompt (repeatable, same order).", "repeat": True})
    artifact: str | None = field(default=None, metadata={
        "help": "A steering artifact: a local folder or a Hub repo id (owner/name)."})
    method: str = field(default="", metadata={
        "help": "no_steering | prompt without --artifact; with an artifact, its method or a spelling of it "
                "(l2s_nogate: L2S without its gate)."})
    instruction: str = field(default="", metadata={"help": "Instruction of the prompt method (default: the "
                                                           "behaviour's)."})
    behaviour: str = field(default="safety", metadata={"help": "Behaviour whose instruction the prompt method uses."})
    alpha: float | None = field(default=None, metadata={"help": "Strength (default: the artifact's)."})
    scope: ScopeName | None = field(default=None, metadata={
        "help": "all | prompt | generated (default: the artifact's)."})
    strength: StrengthName | None = field(default=None, metadata={
        "help": "absolute | relative: alpha as a fraction of each position's residual norm (default: the "
                "artifact's)."})
    max_new_tokens: int = field(default=200, metadata={"help": "New tokens per answer."})
    batch_size: int = field(default=8, metadata={"help": "Prompts per batch."})
    engine: EngineName = field(default="hf", metadata={"help": "hf | vllm (the serving extra)."})
    out: Path | None = field(default=None, metadata={
        "help": "Write answers as JSON lines here (settings in <out>.settings.json)."})

    def examples(self) -> list[Example]:
        """The prompts (with their images) or the dataset to answer; mixing both is an error."""
        if self.dataset:
            if self.prompt:
                raise InvalidInputError("give --prompt or --dataset, not both")
            return self.load()
        if not self.prompt:
            raise InvalidInputError("give --prompt (repeatable) or --dataset")
        if self.image and len(self.image) != len(self.prompt):
            raise InvalidInputError(f"give one --image per --prompt ({len(self.prompt)}), or none")
        imgs: list[str | None] = list(self.image) if self.image else [None] * len(self.prompt)
        return [Example(str(i), p, im) for i, (p, im) in enumerate(zip(self.prompt, imgs))]

    def method_config(self, handle: ModelHandle | None = None) -> MethodConfig:
        """The method to answer with (the artifact checked against ``handle`` when given)."""
        if self.alpha is not None:
            check_alpha(self.alpha)
        if self.artifact:
            art = SteeringArtifact.load(self.artifact, handle)
            asked = METHODS.get(self.method) if self.method else None  # a spelling sets the method's options
            own = METHODS[art.method].base if art.method in METHODS else art.method
            if self.method and (asked is None or asked.base != own):
                raise InvalidInputError(f"--method {self.method} does not apply to a {art.method} artifact")
            return MethodConfig.from_artifact(art, alpha=self.alpha, scope=self.scope, strength=self.strength,
                                              gated=asked.gated if asked is not None else True)
        m = self.method or "no_steering"
        if m not in METHODS or METHODS[m].steers:
            raise InvalidInputError(f"method {m!r} needs --artifact (train one with `l2s train`)")
        spec = load_behaviour(self.behaviour)
        return MethodConfig(method=m, prompt=self.instruction or spec.prompt, prompt_placement=spec.prompt_placement)

    def run(self, progress: bool = True) -> list[dict[str, Any]]:
        """Answer every example and write them (with the settings) when ``out`` is given."""
        examples = self.examples()
        cfg = self.method_config(None)  # every choice is checked before a model is loaded
        if cfg.artifact is not None:  # and the artifact against the model's config, before any engine starts
            name, hidden_size, num_layers = model_shape(self.model)
            cfg.artifact.check_shape(hidden_size, num_layers, name)
        engine = make_engine(self.engine, self)
        answers = generate_with(engine, cfg, examples, batch_size=self.batch_size, max_new_tokens=self.max_new_tokens,
                                progress=progress)
        rows = [{"id": e.id, "question": e.question, "response": a} for e, a in zip(examples, answers)]
        if self.out:
            out = Path(self.out)
            write_text_atomic(out, "".join(dumps(r) + "\n" for r in rows))
            write_json(out.with_name(out.name + ".settings.json"),
                       {"command": "generate", "version": __version__, **as_dict(self)})
        return rows
