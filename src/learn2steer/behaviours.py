"""Behaviours as data: which contrastive prompt (suffix, T+, T-) each input category gets.

P2S needs, per input, a completion pair whose difference points towards the desired behaviour; which
pair is right depends on the input's category (decline vs defer-to-expert) or its label (POPE yes/no).
Keeping that mapping in a YAML file makes the method reusable for new behaviours without code.
"""

from __future__ import annotations

import string
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from learn2steer._io import fingerprint
from learn2steer.activations import ContextPosition
from learn2steer.errors import InvalidInputError, MissingFileError
from learn2steer.models.prompts import ImageLike, PromptRow
from learn2steer.options import check_choice

ZERO = "zero"  # contrast name meaning "the target vector is 0" (leave these inputs alone)
#: where a contrast's target is read in the teacher-forced sequence (see :class:`Contrast`)
ContrastPosition = Literal["turn_end", "last", "completion_mean"]
#: where the Prompt baseline's instruction goes: a system message, before the question, or after it
PromptPlacement = Literal["system", "user", "append"]


@dataclass(frozen=True)
class Example:
    """One dataset row: the user's question, optional image, its category and optional label.

    ``group``: what must stay on one side of a split with it (an image's questions share it); None: the image.
    """

    id: str
    question: str
    image: ImageLike | None = None
    category: str | None = None
    label: str | None = None
    group: str | None = None


@dataclass(frozen=True)
class Contrast:
    """A suffix appended to the question and a pair of teacher-forced answers (T+ desired, T- not).

    ``position``: where in the teacher-forced sequence the target is read (YAML ``position:``; the old
    spelling ``read:`` is still accepted).
    ``turn_end`` (the official safety target): T± is a complete assistant turn and the last token of the
    whole sequence is read (LLaVA-1.5: the space the template puts after the answer; ChatML: the "\n"
    after ``<|im_end|>``). ``last``: the turn is left open and the answer's last token is read
    (learn2steer's reading before 0.3). ``completion_mean``: the mean over the answer's tokens (POPE).
    """

    suffix: str
    positive: str
    negative: str
    position: ContrastPosition = "last"

    def __post_init__(self) -> None:
        check_choice(ContrastPosition, self.position, "contrast position")
        for what, text in (("suffix", self.suffix), ("positive", self.positive), ("negative", self.negative)):
            if not isinstance(text, str):
                raise InvalidInputError(f"contrast {what} must be a string, got {text!r}")
            try:
                fields = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
            except ValueError as e:
                raise InvalidInputError(f"contrast {what} {text!r} has unbalanced braces ({e}); write a literal "
                                        "brace as {{ or }}") from None
            unknown = fields - {"truth", "opposite"}
            if unknown:
                raise InvalidInputError(f"contrast {what} {text!r} uses unknown fields {sorted(unknown)}; only "
                                        "{truth} and {opposite} are filled in (write a literal brace as {{ or }})")


@dataclass
class BehaviourSpec:
    """Maps input categories to contrasts; see ``data/behaviours/*.yaml`` for the shipped ones."""

    name: str
    contrasts: dict[str, Contrast]
    categories: dict[str, str] = field(default_factory=dict)
    default: str | None = None
    ba: str | None = None
    rescale_group: str | None = None
    prompt: str = ""
    labels: dict[str, list[str]] = field(default_factory=dict)
    description: str = ""
    decline_groups: list[str] = field(default_factory=list)
    defer_groups: list[str] = field(default_factory=list)
    end_offset: dict[str, int] = field(default_factory=dict)
    context_read: ContextPosition = "prompt_last"
    prompt_placement: PromptPlacement = "system"
    #: the labels of the inputs a conditional method (CAST) should steer (text-form POPE: "no"); empty: its
    #: decline / defer groups, else every input with a contrast
    condition_labels: list[str] = field(default_factory=list)

    # fields added after 0.2: left out of ``to_dict`` at their defaults, so older specs keep their fingerprint
    _LATE_DEFAULTS: ClassVar[dict[str, Any]] = {"end_offset": {}, "context_read": "prompt_last",
                                                "prompt_placement": "system", "condition_labels": []}
    # fields that change no extracted tensor (which inputs a conditional method steers): out of the fingerprint,
    # so a finished extraction resumes when only they change
    _NOT_EXTRACTED: ClassVar[tuple[str, ...]] = ("condition_labels",)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise InvalidInputError("a behaviour spec needs a non-empty `name`")
        if not self.contrasts:
            raise InvalidInputError(f"behaviour {self.name!r} defines no contrasts")
        known = set(self.contrasts) | {ZERO}
        for cat, c in self.categories.items():
            if c not in known:
                raise InvalidInputError(f"behaviour {self.name!r}: category {cat!r} uses unknown contrast {c!r} "
                                 f"(defined: {', '.join(sorted(known))})")
        for key in ("default", "ba", "rescale_group"):
            val = getattr(self, key)
            if val is not None and val not in known:
                raise InvalidInputError(f"behaviour {self.name!r}: {key}={val!r} is not a defined contrast")
        positions = {c.position for c in self.contrasts.values()}
        if len(positions) > 1:
            raise InvalidInputError(f"behaviour {self.name!r}: all contrasts must share one position, got {positions}")
        check_choice(ContextPosition, self.context_read, f"behaviour {self.name!r}: context_read")
        check_choice(PromptPlacement, self.prompt_placement, f"behaviour {self.name!r}: prompt_placement")
        if not isinstance(self.end_offset, dict) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in self.end_offset.values()):
            raise InvalidInputError(f"behaviour {self.name!r}: end_offset must map categories to whole numbers >= 0")
        if self.end_offset and self.position != "turn_end":
            raise InvalidInputError(f"behaviour {self.name!r}: end_offset only applies to the position turn_end")
        unknown_labels = sorted(set(self.condition_labels) - set(self.labels))
        if unknown_labels:
            raise InvalidInputError(f"behaviour {self.name!r}: condition_labels {unknown_labels} are not among its "
                                    f"labels ({', '.join(sorted(self.labels)) or 'none'})")

    @property
    def position(self) -> ContrastPosition:
        """Where the P2S target is read (shared by every contrast of the spec)."""
        return next(iter(self.contrasts.values())).position

    def offset(self, example: Example, contrast: str | None = None) -> int:
        """Tokens before the end of the sequence where ``example``'s target is read (``turn_end`` only).

        The official Qwen2-VL safety run reads scenarios 10-13 one token earlier (``<|im_end|>`` instead of
        the "\n" after it), in the per-category pass only (``save_features.py``: ``split == "multi"``), so
        an explicit ``contrast`` (the single template of Mean-S(BA)) reads at the end.
        """
        return 0 if contrast is not None else int(self.end_offset.get(example.category or "", 0))

    def contrast_name(self, example: Example) -> str:
        """The contrast an example gets, by its category (or the spec's default)."""
        name = self.categories.get(example.category or "", self.default)
        if name is None:
            raise InvalidInputError(f"behaviour {self.name!r} has no contrast for category {example.category!r} and no "
                             "default; add the category to the spec's `categories` or set `default`")
        return name

    def pair(self, example: Example, contrast: str | None = None) -> tuple[PromptRow, PromptRow] | None:
        """The (T+, T-) teacher-forced rows for ``example`` (None for the zero contrast)."""
        name = contrast or self.contrast_name(example)
        if name == ZERO:
            return None
        c = self.contrasts[name]
        fields: dict[str, str] = {}
        if self.labels:
            if example.label not in self.labels:
                raise InvalidInputError(f"behaviour {self.name!r} needs a label in {sorted(self.labels)} for example "
                                 f"{example.id!r}, got {example.label!r}")
            fields["truth"], fields["opposite"] = self.labels[example.label]
        text = example.question + c.suffix
        close = c.position == "turn_end"
        return (PromptRow(text, example.image, completion=c.positive.format(**fields), close_turn=close),
                PromptRow(text, example.image, completion=c.negative.format(**fields), close_turn=close))

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain data (stored in extractions and artifacts, so results say what made them)."""
        d = asdict(self)
        # on disk a contrast's position keeps its old key "read": stored specs and their fingerprints stay the same
        d["contrasts"] = {k: {("read" if f == "position" else f): v for f, v in c.items()}
                          for k, c in d["contrasts"].items()}
        for key, default in self._LATE_DEFAULTS.items():
            if d.get(key) == default:
                d.pop(key)
        return d

    @property
    def fingerprint(self) -> str:
        """A short hash of the spec: an extraction refuses to resume under a changed spec (fields that change no
        extracted tensor left out)."""
        return fingerprint({k: v for k, v in self.to_dict().items() if k not in self._NOT_EXTRACTED})

    def group(self, category: str | None) -> str:
        """``decline`` / ``defer`` / ``other`` for a category, from the spec's ``decline_groups`` / ``defer_groups``.

        Tasks use this to tell which inputs should be refused, deferred to an expert, or left alone, so a
        new behaviour YAML needs no code.
        """
        name = self.categories.get(category or "", self.default)
        if name in self.decline_groups:
            return "decline"
        if name in self.defer_groups:
            return "defer"
        return "other"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BehaviourSpec":
        """Build and validate a spec from parsed YAML / JSON; every problem is one sentence."""
        if not isinstance(d, dict):
            raise InvalidInputError("a behaviour spec must be a mapping (YAML keys name, contrasts, categories, ...)")
        d = dict(d)
        if "contrasts" not in d or not isinstance(d["contrasts"], dict):
            raise InvalidInputError("invalid behaviour spec: `contrasts` must map contrast names to "
                                    "{suffix, positive, negative, position}")
        try:
            d["contrasts"] = {k: Contrast(**_contrast_fields(k, v)) for k, v in d["contrasts"].items()}
        except TypeError as e:
            raise InvalidInputError(f"invalid behaviour spec: {e}; each contrast needs suffix, positive, negative "
                             "and optionally position") from None
        allowed = set(cls.__dataclass_fields__)
        unknown = set(d) - allowed
        if unknown:
            raise InvalidInputError(f"invalid behaviour spec: unknown keys {sorted(unknown)} "
                                    f"(allowed: {sorted(allowed)})")
        if "name" not in d:
            raise InvalidInputError("a behaviour spec needs a non-empty `name`")
        return cls(**d)


def _contrast_fields(name: str, v: Any) -> Any:
    """A contrast's YAML fields with the old spelling ``read:`` of ``position:`` renamed (both at once: refused)."""
    if not isinstance(v, dict) or "read" not in v:
        return v
    if "position" in v:
        raise InvalidInputError(f"invalid behaviour spec: contrast {name!r} gives both `position` and `read` (its old "
                                "spelling); keep only `position`")
    return {("position" if k == "read" else k): x for k, x in v.items()}


def shipped_behaviours() -> list[str]:
    """Names of the behaviour specs that ship with learn2steer (``load_behaviour(name)``)."""
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("learn2steer.data.behaviours").iterdir()
                  if p.name.endswith(".yaml"))


def load_behaviour(name_or_path: str | Path) -> BehaviourSpec:
    """Load a shipped behaviour by name (``safety``, ``hallucination``) or a YAML/JSON file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml", ".json"):
        if not p.exists():
            raise MissingFileError(f"behaviour spec {str(p)!r} does not exist")
        text = p.read_text()
    else:
        res = resources.files("learn2steer.data.behaviours") / f"{name_or_path}.yaml"
        if not res.is_file():
            raise InvalidInputError(f"unknown behaviour {name_or_path!r}; shipped: {', '.join(shipped_behaviours())}, "
                             "or pass a path to a .yaml/.json spec")
        text = res.read_text()
    return BehaviourSpec.from_dict(yaml.safe_load(text))
