"""Steering artifacts: a folder laid out like a Hugging Face Hub model repo, validated on load.

::

    config.json            what the artifact is and the model it was made for (schema below)
    vectors.safetensors    a fixed steering vector: tensors ``layer.{L}`` of shape [D]      (kind "fixed")
    model.safetensors      a predictor's state dict (kind "l2s", "cast", or any kind registered with
                           :func:`register_predictor`)
    README.md              a generated model card (behaviour, target model, layers, alpha, data, figures)

The same folder can be pushed to the Hub (:meth:`SteeringArtifact.push_to_hub`) and loaded back from a
repo id; no pickle anywhere. ``config.json`` is checked field by field: a wrong type, a missing key or a
tensor that does not fit the recorded model is an error naming the field; keys a newer version added
are tolerated with a warning. A sha256 of each tensor file is recorded and verified, so a truncated or
swapped file is caught before it steers anything.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from learn2steer import rules
from learn2steer._io import file_sha256, fingerprint, read_json, write_json, write_text_atomic
from learn2steer._version import __version__
from learn2steer.activations import CONTEXT_POSITIONS, ContextPosition
from learn2steer.errors import IncompatibleArtifactError, InvalidInputError, MissingFileError
from learn2steer.models.loading import ModelHandle
from learn2steer.options import check_choice
from learn2steer.predictor import Gated, check_finite_weights
from learn2steer.rules import Scope, Strength, check_alpha, finite_in
from learn2steer.steering import PredictedVectors
from learn2steer.vectors import SteeringVector

CONFIG = "config.json"
VECTORS = "vectors.safetensors"
PREDICTOR = "model.safetensors"
CARD = "README.md"
FORMAT = "learn2steer-artifact"
FORMAT_VERSION = 2
Kind = str  # "fixed", or a registered predictor kind ("l2s", "cast", ...)


# ---- predictor kinds: how an input-dependent method stores its network ---------------------------------------

@dataclass(frozen=True)
class PredictorKind:
    """An artifact kind whose vector is predicted from the input: how its network is described in
    ``config.json`` and rebuilt before its tensors are loaded. A method module registers one
    (:func:`register_predictor`); artifacts, engines and the server then handle it like any other.

    ``describe``: the network -> the JSON-able ``predictor`` entry of ``config.json``; ``build``: that entry ->
    an empty network of the right shape (``load_state_dict`` fills it); ``gated``: the artifact's norm gate
    applies to its output (L2S).
    """

    name: str
    describe: Callable[[torch.nn.Module], dict[str, Any]]
    build: Callable[[dict[str, Any]], torch.nn.Module]
    gated: bool = False


PREDICTORS: dict[str, PredictorKind] = {}


def register_predictor(kind: PredictorKind) -> PredictorKind:
    """Make an artifact kind loadable and savable (one line in the method's module: ``l2s`` in
    :mod:`learn2steer.l2s`, ``cast`` in :mod:`learn2steer.cast`)."""
    if kind.name == "fixed":
        raise ValueError("'fixed' is the kind of fixed vectors, not a predictor kind")
    PREDICTORS[kind.name] = kind
    return kind


# ---- the config schema ------------------------------------------------------------------------------------

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# field -> (check, what a valid value looks like, required)
_SCHEMA: dict[str, tuple[Callable[[Any], bool], str, bool]] = {
    "kind": (lambda v: v == "fixed" or v in PREDICTORS, "'fixed' or a predictor kind (l2s, cast, ...)", True),
    "method": (lambda v: isinstance(v, str) and bool(v), "a method name", True),
    "model": (lambda v: isinstance(v, str), "a model name", True),
    "hidden_size": (lambda v: _is_int(v) and v > 0, "a positive integer", True),
    "num_layers": (lambda v: _is_int(v) and v > 0, "a positive integer", True),
    "steer_layers": (lambda v: isinstance(v, list) and bool(v) and all(_is_int(x) for x in v),
                     "a non-empty list of layer indices", True),
    "context_layer": (lambda v: v is None or _is_int(v), "a layer index or null", False),
    "context_read": (lambda v: v in CONTEXT_POSITIONS, " or ".join(map(repr, CONTEXT_POSITIONS)), False),
    "read_position": (lambda v: isinstance(v, str), "a read position name", False),
    "alpha": (finite_in, "a finite number (in float32)", False),
    "scope": (lambda v: v in [s.value for s in Scope], "'all', 'prompt' or 'generated'", False),
    "strength": (lambda v: v in [s.value for s in Strength], "'absolute' or 'relative'", False),
    "gate": (lambda v: _is_number(v) and v >= 0, "a number >= 0", False),
    "behaviour": (lambda v: isinstance(v, dict), "a mapping", False),
    "training": (lambda v: isinstance(v, dict), "a mapping", False),
    "figures": (lambda v: isinstance(v, dict), "a mapping", False),
    "predictor": (lambda v: isinstance(v, dict), "a mapping (the predictor's shape)", False),
    "files": (lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
              "a mapping file -> sha256", False),
    "version": (lambda v: isinstance(v, str), "a version string", False),
    "format": (lambda v: v == FORMAT, repr(FORMAT), False),
    "format_version": (lambda v: _is_int(v), "an integer", False),
}


def validate_config(cfg: Any, where: str) -> dict[str, Any]:
    """Check an artifact's ``config.json`` against the schema; name the first bad field and the fix."""
    if not isinstance(cfg, dict):
        raise IncompatibleArtifactError(f"{where}: config.json must hold a JSON object")
    for key, (ok, expect, required) in _SCHEMA.items():
        if key not in cfg:
            if required:
                raise IncompatibleArtifactError(f"{where}: config.json lacks the required field {key!r} "
                                                f"({expect}); re-create the artifact with `l2s train`")
            continue
        if not ok(cfg[key]):
            raise IncompatibleArtifactError(f"{where}: config.json field {key!r} must be {expect}, got "
                                            f"{cfg[key]!r}; fix the file or re-create the artifact")
    unknown = sorted(set(cfg) - set(_SCHEMA))
    if unknown:
        warnings.warn(f"{where}: config.json has fields this learn2steer {__version__} does not know "
                      f"({', '.join(unknown)}); they are ignored (was it made by a newer version?)", stacklevel=3)
    if cfg.get("format_version", 1) > FORMAT_VERSION:
        warnings.warn(f"{where}: artifact format {cfg['format_version']} is newer than this learn2steer reads "
                      f"({FORMAT_VERSION}); upgrade learn2steer if loading fails", stacklevel=3)
    if cfg["kind"] != "fixed" and ("predictor" not in cfg or cfg.get("context_layer") is None):
        raise IncompatibleArtifactError(f"{where}: a {cfg['kind']} artifact's config.json needs 'predictor' and "
                                        "'context_layer'")
    return {k: v for k, v in cfg.items() if k in _SCHEMA}


# ---- the artifact -----------------------------------------------------------------------------------------

@dataclass
class SteeringArtifact:
    """A fixed steering vector (Mean-S, Mean-S(BA), an imported control vector) or a predictor that reads
    the input (L2S, CAST, any registered :class:`PredictorKind`), with everything needed to apply it: target
    model shape, layers, default strength and scope."""

    kind: Kind
    method: str
    model: str
    hidden_size: int
    num_layers: int
    steer_layers: list[int]
    vector: SteeringVector | None = None
    predictor: torch.nn.Module | None = None
    context_layer: int | None = None
    context_read: str = "prompt_last"  # the predictor's position (config key kept: existing artifacts load)
    read_position: str = "last"  # the P2S target's position (BehaviourSpec.position; config key kept)
    alpha: float = 1.0
    scope: str = "all"
    strength: str = "absolute"
    gate: float = 0.0
    behaviour: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    version: str = __version__

    def __post_init__(self) -> None:
        n = self.num_layers
        self.steer_layers = [int(x) % n if -n <= int(x) < n else _bad_layer(x, n) for x in self.steer_layers]
        check_alpha(self.alpha, what="artifact alpha")
        Scope.parse(self.scope)
        self.strength = Strength.parse(self.strength).value
        check_choice(ContextPosition, self.context_read, "context_read")
        if self.kind == "fixed":
            if self.vector is None:
                raise InvalidInputError("a fixed artifact needs a steering vector")
            if self.vector.per_row:
                raise InvalidInputError("a fixed artifact holds one [D] vector per layer, not per-input vectors")
            self.vector = self.vector.on_layers(n)
            if sorted(self.vector) != sorted(self.steer_layers):
                raise IncompatibleArtifactError(f"the vector has layers {sorted(self.vector)} but steer_layers "
                                                f"says {sorted(self.steer_layers)}")
            if self.vector.hidden_size != self.hidden_size:
                raise IncompatibleArtifactError(f"the vector has size {self.vector.hidden_size} but hidden_size "
                                                f"says {self.hidden_size}")
        elif self.kind in PREDICTORS:
            if self.predictor is None or self.context_layer is None:
                raise InvalidInputError(f"a {self.kind} artifact needs a predictor and a context_layer")
            self.context_layer = int(self.context_layer) % n if -n <= self.context_layer < n else _bad_layer(
                self.context_layer, n)
            d_in, d_out = getattr(self.predictor, "d_in", None), getattr(self.predictor, "d_out", None)
            if d_out != self.hidden_size or d_in != self.hidden_size:
                raise IncompatibleArtifactError(
                    f"the predictor maps {d_in} -> {d_out} but the model's hidden size is {self.hidden_size}")
            check_finite_weights(self.predictor, f"{self.kind} predictor")
            if not math.isfinite(self.gate) or self.gate < 0:
                raise InvalidInputError(f"gate must be a number >= 0, got {self.gate!r}")
        else:
            raise InvalidInputError(f"artifact kind must be 'fixed' or one of {', '.join(PREDICTORS)}, "
                                    f"got {self.kind!r}")

    # -- application ---------------------------------------------------------------------------------------

    @property
    def reads_context(self) -> bool:
        """The capability engines ask for: the vector is predicted from a hidden state read at
        ``context_layer`` (so it depends on the prompt), rather than fixed."""
        return rules.reads_context(self.kind)

    def predict_fn(self, *, gated: bool = True) -> torch.nn.Module:
        """The callable h -> v of a predictor artifact (gated when its kind and the artifact have a gate)."""
        assert self.predictor is not None, "predict_fn() is for predictor artifacts"
        gate_applies = PREDICTORS[self.kind].gated and gated and self.gate > 0
        return Gated(self.predictor, self.gate) if gate_applies else self.predictor

    def provider(self, *, gated: bool = True) -> PredictedVectors:
        """The steering provider of a predictor artifact: read h at L', add g(h) at L*."""
        assert self.context_layer is not None
        return PredictedVectors(self.predict_fn(gated=gated), self.context_layer, tuple(self.steer_layers),
                                position=self.context_read)

    # -- files ---------------------------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """Everything but the tensors, as written to ``config.json`` (the file list is added on save)."""
        cfg: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION}
        for k in ("kind", "method", "model", "hidden_size", "num_layers", "steer_layers", "context_layer",
                  "context_read", "read_position", "alpha", "scope", "gate", "behaviour", "training", "figures",
                  "version"):
            cfg[k] = getattr(self, k)
        if self.strength != Strength.ABSOLUTE.value:  # written only when set: older readers load the rest
            cfg["strength"] = self.strength
        if self.predictor is not None:
            cfg["predictor"] = PREDICTORS[self.kind].describe(self.predictor)
        return cfg

    def save(self, path: str | Path) -> Path:
        """Write the folder (tensors, config with checksums, model card); returns its path."""
        out = self._write(Path(path), *self._tensors(), self.config())
        write_text_atomic(out / CARD, model_card(self))
        return out

    def save_once(self, root: str | Path) -> Path:
        """The folder ``root/<content hash>`` that holds this artifact for engines: tensors and ``config.json``,
        no model card, written the first time these contents are met and reused after. An engine hands an
        in-memory method to its processes this way, once per distinct artifact (the offline vLLM engine)."""
        name, tensors = self._tensors()
        cfg = self.config()
        out = Path(root) / fingerprint(cfg, tensors=[tensors[k] for k in sorted(tensors)], length=24)
        if not (out / CONFIG).exists():  # written last and atomically: there means complete
            self._write(out, name, tensors, cfg)
        return out

    def _tensors(self) -> tuple[str, dict[str, torch.Tensor]]:
        """The tensor file's name and its tensors (a fixed vector's layers, or the predictor's state dict)."""
        if self.kind == "fixed":
            assert self.vector is not None
            return VECTORS, {f"layer.{k}": v.detach().float().contiguous().cpu() for k, v in self.vector.items()}
        assert self.predictor is not None
        return PREDICTOR, {k: v.detach().contiguous().cpu() for k, v in self.predictor.state_dict().items()}

    @staticmethod
    def _write(out: Path, name: str, tensors: dict[str, torch.Tensor], cfg: dict[str, Any]) -> Path:
        """Write the tensor file, then ``config.json`` with its checksum (each atomically, the config last)."""
        out.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=out)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"format": FORMAT})
            os.replace(tmp, out / name)
        finally:
            Path(tmp).unlink(missing_ok=True)
        write_json(out / CONFIG, {**cfg, "files": {name: file_sha256(out / name)}})
        return out

    @classmethod
    def load(cls, path: str | Path, handle: ModelHandle | None = None, *, revision: str | None = None,
             api: Any = None) -> "SteeringArtifact":
        """Load an artifact from a local folder or a Hub repo id (``owner/name``); with ``handle``, also
        check that it fits that model. ``api`` replaces ``huggingface_hub.HfApi()`` (tests, mirrors)."""
        p = resolve(path, revision=revision, api=api)
        where = str(p)
        if not (p / CONFIG).exists():
            raise MissingFileError(f"{where} is not a steering artifact (no {CONFIG}); create one with `l2s train`")
        cfg = validate_config(read_json(p / CONFIG, what="artifact config"), where)
        files = cfg.pop("files", {})
        cfg.pop("format", None)
        cfg.pop("format_version", None)
        pred_cfg = cfg.pop("predictor", None)
        tensor_file = VECTORS if cfg["kind"] == "fixed" else (PREDICTOR if (p / PREDICTOR).exists()
                                                                else "predictor.safetensors")
        tensors = _load_tensors(p / tensor_file, files.get(tensor_file), where)
        vector, predictor, gate = None, None, float(cfg.pop("gate", 0.0))
        if cfg["kind"] == "fixed":
            try:
                layers = {int(k.split(".", 1)[1]): v for k, v in tensors.items()}
            except (IndexError, ValueError):
                raise IncompatibleArtifactError(f"{where}: {tensor_file} must hold tensors named layer.<index>, "
                                                f"got {sorted(tensors)[:4]}") from None
            vector = SteeringVector(layers)
        else:
            assert pred_cfg is not None
            if "gate" in tensors:  # format 1 stored the gate inside the net
                gate = gate or float(tensors.pop("gate"))
            try:
                predictor = PREDICTORS[cfg["kind"]].build(pred_cfg)
            except IncompatibleArtifactError as e:
                raise IncompatibleArtifactError(f"{where}: {e}") from None
            try:
                predictor.load_state_dict(tensors)
            except RuntimeError as e:
                raise IncompatibleArtifactError(f"{where}: {tensor_file} does not match the predictor shape in "
                                                f"config.json ({str(e).splitlines()[0]})") from None
            predictor.eval()
        try:
            art = cls(**cfg, vector=vector, predictor=predictor, gate=gate)
        except InvalidInputError as e:
            raise IncompatibleArtifactError(f"{where}: {e}") from None
        if handle is not None:
            art.check_compatible(handle)
        return art

    def check_compatible(self, handle: ModelHandle) -> None:
        """Refuse a model of another hidden size or depth; warn for another name of the same shape."""
        self.check_shape(handle.hidden_size, handle.num_layers, handle.name)

    def check_shape(self, hidden_size: int, num_layers: int, name: str = "") -> None:
        """Refuse a model of another hidden size or depth (any engine); warn for another name."""
        if hidden_size != self.hidden_size or num_layers != self.num_layers:
            raise IncompatibleArtifactError(
                f"artifact was made for {self.model!r} (hidden size {self.hidden_size}, {self.num_layers} layers) "
                f"but the loaded model {name!r} has hidden size {hidden_size} and {num_layers} layers; extract "
                "and train again for this model")
        if name and self.model and name != self.model:
            warnings.warn(f"artifact was made for {self.model!r}, applying it to {name!r} of the same shape",
                          stacklevel=3)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    commit_message: str | None = None, api: Any = None) -> str:
        """Upload this artifact as a Hub model repo (created if needed); returns the repo id."""
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi(token=token)
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save(Path(tmp) / "artifact")
            api.create_repo(repo_id, exist_ok=True, private=private, repo_type="model")
            api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                              commit_message=commit_message or f"learn2steer {self.method} artifact")
        return repo_id


def _bad_layer(layer: Any, n: int) -> int:
    raise IncompatibleArtifactError(f"layer {layer!r} is out of range for a model with {n} decoder layers")


def _load_tensors(path: Path, sha: str | None, where: str) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise MissingFileError(f"{where}: {path.name} is missing; the artifact folder is incomplete")
    if sha is not None and file_sha256(path) != sha:
        raise IncompatibleArtifactError(f"{path} does not match the checksum in config.json (modified or "
                                        "truncated); restore the file or re-create the artifact")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise IncompatibleArtifactError(f"{path} cannot be read ({str(e).splitlines()[0]}); restore the file or "
                                        "re-create the artifact") from None


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(path: str | Path, *, revision: str | None = None, api: Any = None) -> Path:
    """A local artifact folder, or the local snapshot of a Hub repo id (downloaded by huggingface_hub)."""
    p = Path(path)
    if p.exists():
        return p
    s = str(path)
    if not _REPO_ID.match(s):
        raise MissingFileError(f"artifact {s!r} not found: give a local folder or a Hub repo id (owner/name)")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    try:
        local = api.snapshot_download(s, revision=revision, allow_patterns=[CONFIG, "*.safetensors", CARD])
    except Exception as e:  # network, auth, missing repo: one sentence for the user
        raise MissingFileError(f"artifact {s!r} is not a local folder and could not be fetched from the Hub "
                               f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    return Path(local)


def model_card(art: SteeringArtifact) -> str:
    """A Hub model card: YAML metadata (library, tags, base model) and a readable summary."""
    from huggingface_hub import ModelCard, ModelCardData

    base = art.model if _REPO_ID.match(art.model or "") else None
    data = ModelCardData(library_name="learn2steer", base_model=base,
                         tags=["steering", "activation-steering", "learn2steer", art.method])
    behaviour = art.behaviour.get("name", "unknown") if art.behaviour else "unknown"
    n = art.training.get("n")
    what = (f"an input-dependent **{art.kind} predictor**: it reads the hidden state of the prompt's last token at "
            f"layer {art.context_layer} ({art.context_read}) and predicts the vector to add"
            if art.reads_context else "a fixed steering vector added to the residual stream")
    lines = [
        f"# learn2steer {art.method} artifact: {behaviour}", "",
        f"This is {what} at layer(s) {', '.join(map(str, art.steer_layers))} of `{art.model}` "
        f"(hidden size {art.hidden_size}, {art.num_layers} layers).", "",
        "| setting | value |", "|---|---|",
        f"| method | `{art.method}` |", f"| behaviour | `{behaviour}` |", f"| target model | `{art.model}` |",
        f"| steering layers L* | {art.steer_layers} |",
        *([f"| context layer L' | {art.context_layer} ({art.context_read}) |"] if art.reads_context else []),
        f"| default alpha | {art.alpha:g} |", f"| scope | `{art.scope}` |",
        *([f"| norm gate | {art.gate:.4g} |"] if art.gate else []),
        f"| training examples | {n if n is not None else 'not recorded'} |",
        f"| learn2steer version | {art.version} |", "",
    ]
    if art.figures:
        lines += ["## Measured figures", "", "| figure | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in art.figures.items()] + [""]
    lines += ["## Use", "", "```python", "from learn2steer import SteeringArtifact, MethodConfig, load_model, "
              "generate_with", "h = load_model('/path/to/model')", "art = SteeringArtifact.load('THIS_FOLDER_OR_REPO', "
              "h)", "answers = generate_with(h, MethodConfig.from_artifact(art), examples)", "```", ""]
    if art.kind == "fixed":
        lines += ["A fixed vector can also be exported for llama.cpp: "
                  "`l2s export THIS_FOLDER --format gguf --out vector.gguf`.", ""]
    else:
        lines += [f"{art.kind} needs to read a hidden state while the model runs, which a static control vector "
                  "(llama.cpp, repeng) cannot express; serve it with `l2s serve` (vLLM) or the Python API.", ""]
    card = ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n{{ body }}", body="\n".join(lines))
    return str(card)
