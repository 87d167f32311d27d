"""Dataset loaders (local paths only) that all produce :class:`~learn2steer.behaviours.Example` rows, and splits.

Formats: MM-SafetyBench (13 scenario JSON files), POPE (JSON lines), CHAIR captioning over COCO images,
the bundled demo requests, and a generic JSONL (``question``, optional ``image``, ``category``,
``label``, ``id``) for users' own data. Every loader validates what it reads where it reads it: ids are
unique (a duplicate would silently swap one example's results for another's), labels are known, image
paths stay inside their image folder, and an empty selection is an error rather than a run that does
nothing.

A dataset spec ``kind:ARG`` is looked up in :data:`DATASETS` (``@register_dataset("kind", arg="FILE")`` on a
function that loads it), so a new format is one registered loader and never an edit of :func:`load_dataset`.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Literal, Sequence

from learn2steer._io import read_json, read_jsonl
from learn2steer.behaviours import Example
from learn2steer.errors import InvalidInputError, MissingFileError
from learn2steer.extraction import check_unique_ids
from learn2steer.options import flat_names, group_options

MMSB_SCENARIOS = ("01-Illegal_Activitiy", "02-HateSpeech", "03-Malware_Generation", "04-Physical_Harm",
                  "05-EconomicHarm", "06-Fraud", "07-Sex", "08-Political_Lobbying", "09-Privacy_Violence",
                  "10-Legal_Opinion", "11-Financial_Advice", "12-Health_Consultation", "13-Gov_Decision")
MMSB_QUESTION_FIELDS = ("Question", "Changed Question", "Rephrased Question", "Rephrased Question(SD)")
MMSB_IMAGES = ("none", "typo", "sd", "sd_typo")
CHAIR_PROMPT = "Describe the image in detail."  # the official descriptive prompt (image_text_dataset.py)
POPE_LABELS = ("yes", "no")


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise MissingFileError(f"{what} not found at {str(path)!r}")
    return path


def inside(root: Path, rel: str, where: str) -> Path:
    """``root / rel``, refusing paths that escape ``root`` (``../``, absolute paths)."""
    p = (root / rel).resolve()
    base = root.resolve()
    if p != base and base not in p.parents:
        raise InvalidInputError(f"{where}: image path {rel!r} points outside the image folder {str(root)!r}; "
                                "use paths relative to --image-dir")
    return p


def load_jsonl(path: str | Path, *, image_root: str | Path | None = None) -> list[Example]:
    """Generic JSON lines: ``question`` (or ``text``), optional ``image``, ``category``, ``label``, ``id``.

    Rows without an ``id`` are named ``line-<n>``; duplicates of any kind are an error.
    """
    p = _need(Path(path), "dataset file")
    root = Path(image_root) if image_root else p.parent
    data = read_jsonl(p, what="dataset file")
    out = []
    for r, n in zip(data.rows, data.line_numbers):
        q = r.get("question", r.get("text"))
        if not isinstance(q, str) or not q.strip():
            raise InvalidInputError(f"{p}:{n}: each row needs a non-empty 'question' (or 'text') field")
        img = r.get("image")
        if img is not None and not isinstance(img, str):
            raise InvalidInputError(f"{p}:{n}: 'image' must be a path string")
        raw_id = r.get("id", r.get("question_id"))
        ex_id = f"line-{n}" if raw_id is None else str(raw_id)
        if not ex_id.strip():
            raise InvalidInputError(f"{p}:{n}: 'id' must not be empty")
        label = r.get("label")
        out.append(Example(ex_id, q, str(inside(root, img, f"{p}:{n}")) if img else None,
                           None if r.get("category") is None else str(r["category"]),
                           None if label is None else str(label).lower()))
    check_unique_ids([e.id for e in out], str(p))
    return out


#: solved benign questions (none of them in the demo set) that a base model sees before each demo request
#: (``--demo-few-shot``): shown only "Answer:", Gemma-3-270M starts a new line, which ends its answer (74% of its
#: demo answers were empty without them)
DEMO_SHOTS: tuple[tuple[str, str], ...] = (
    ("Why is the sea salty?", "Rivers carry salts washed out of rocks into the sea, and they stay there when the "
                              "water evaporates."),
    ("How do I make a cup of tea?", "Boil water, pour it over a tea bag in a cup, wait three minutes, then take "
                                    "the bag out and add milk if you like."),
)


def demo_requests(few_shot: int = 0) -> list[Example]:
    """The bundled demo set: must-decline requests, expert consultations and benign questions; with ``few_shot``
    solved questions of :data:`DEMO_SHOTS` before each one (the form a base model then follows)."""
    if not 0 <= few_shot <= len(DEMO_SHOTS):
        raise InvalidInputError(f"demo few_shot must be between 0 and {len(DEMO_SHOTS)}, got {few_shot}")
    rows = read_jsonl((resources.files("learn2steer.data.demo") / "safety_requests.jsonl").read_text().splitlines())
    shots = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in DEMO_SHOTS[:few_shot])
    return [Example(r["id"], f"{shots}Question: {r['question']}" if few_shot else r["question"], None, r["category"])
            for r in rows]


def load_mmsafetybench(root: str | Path, *, question_field: str | None = None, images: str = "none",
                       image_root: str | Path | None = None, scenarios: Sequence[str] | None = None,
                       tiny: bool = False) -> list[Example]:
    """MM-SafetyBench from ``root`` (with ``processed_questions/``; ``TinyVersion_ID_List.json`` for tiny).

    ``images``: ``none`` (text only), ``typo``, ``sd`` or ``sd_typo`` (the paper's choice). Images are
    looked up as ``<image_root>/<scenario>/<id>.jpg`` or the official ``<image_root>/<scenario>/<KIND>/<id>.jpg``.
    The default question field is ``Question`` without images and the matching rephrased one with them.
    Ids are ``<scenario>/<id>``; the category is the scenario.
    """
    root = Path(root)
    qdir = _need(root / "processed_questions", "MM-SafetyBench processed_questions folder")
    if images not in MMSB_IMAGES:
        raise InvalidInputError(f"mmsb_images must be one of {', '.join(MMSB_IMAGES)}, got {images!r}")
    qf = question_field or {"none": "Question", "typo": "Rephrased Question", "sd": "Rephrased Question(SD)",
                            "sd_typo": "Rephrased Question"}[images]
    if qf not in MMSB_QUESTION_FIELDS:
        raise InvalidInputError(f"question_field must be one of {MMSB_QUESTION_FIELDS}, got {qf!r}")
    keep: dict[str, set[str]] | None = None
    if tiny:
        lst = read_json(_need(root / "TinyVersion_ID_List.json", "MM-SafetyBench tiny id list"))
        keep = {d["Scenario"]: {str(i) for i in d["Sampled_ID_List"]} for d in lst}
    img_root = Path(image_root) if image_root else (root / "typo_tiny" if images == "typo" else root / "imgs")
    out = []
    for f in sorted(qdir.glob("*.json")):
        scen = f.stem
        if scenarios and scen not in scenarios:
            continue
        for qid, rec in read_json(f, what="MM-SafetyBench question file").items():
            if keep is not None and qid not in keep.get(scen, set()):
                continue
            img = None
            if images != "none":
                cands = [img_root / scen / f"{qid}.jpg", img_root / scen / images.upper() / f"{qid}.jpg"]
                img = next((c for c in cands if c.exists()), None)
                if img is None:
                    raise MissingFileError(f"no {images} image for MM-SafetyBench {scen}/{qid} under {img_root} "
                                           f"(tried {[str(c) for c in cands]}); pass --image-dir or "
                                           "--mmsb-images none")
            if not isinstance(rec.get(qf), str):
                raise InvalidInputError(f"{f}: question {qid} has no {qf!r} field")
            # stripped as the official loader does (two Rephrased Questions end in blank lines)
            out.append(Example(f"{scen}/{qid}", rec[qf].strip(), str(img) if img else None, scen))
    if not out:
        raise InvalidInputError(f"no MM-SafetyBench questions selected under {qdir}")
    return out


def load_pope(path: str | Path, *, image_dir: str | Path | None = None, require_images: bool = True
              ) -> list[Example]:
    """POPE questions (JSON lines: question_id, image, text, label); category = the split name.

    The image file name is kept in ``Example.image`` even without ``image_dir`` (as the bare name), so
    splits can keep every question about one image on the same side.
    """
    p = _need(Path(path), "POPE question file")
    split = next((s for s in ("adversarial", "popular", "random") if s in p.stem), p.stem)
    data = read_jsonl(p, what="POPE question file")
    out = []
    for r, n in zip(data.rows, data.line_numbers):
        for key in ("question_id", "image", "text", "label"):
            if key not in r:
                raise InvalidInputError(f"{p}:{n}: POPE rows need question_id, image, text and label; "
                                        f"{key!r} is missing")
        label = str(r["label"]).strip().lower()
        if label not in POPE_LABELS:
            raise InvalidInputError(f"{p}:{n}: POPE label must be yes or no, got {r['label']!r}")
        img: str = str(r["image"])
        if image_dir is not None:
            full = inside(Path(image_dir), img, f"{p}:{n}")
            if require_images and not full.exists():
                raise MissingFileError(f"{p}:{n}: image {str(full)!r} not found; POPE needs the COCO val2014 "
                                       "images (--image-dir)")
            img = str(full)
        out.append(Example(str(r["question_id"]), r["text"], img, split, label))
    check_unique_ids([e.id for e in out], str(p))
    return out


def chair_selection(names: Sequence[str], n: int, seed: int = 0) -> list[str]:
    """``n`` of ``names``, chosen as documented for the CHAIR config: the names sorted, then
    ``random.Random(seed).sample(sorted_names, n)``, returned sorted. The same folder and seed give the same
    images on every machine (it depends on the file names only, never on the order ``glob`` lists them in)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidInputError(f"chair_images must be a whole number >= 1, got {n!r}")
    pool = sorted(names)
    if n > len(pool):
        raise InvalidInputError(f"chair_images is {n} but the folder holds only {len(pool)} COCO images")
    return sorted(random.Random(seed).sample(pool, n))


def load_chair_images(image_dir: str | Path, *, prompt: str = CHAIR_PROMPT, n: int | None = None, seed: int = 0
                      ) -> list[Example]:
    """CHAIR captioning inputs: one example per COCO image (or a :func:`chair_selection` of ``n``), id = the COCO
    image id, the question the official descriptive prompt."""
    d = _need(Path(image_dir), "COCO image folder")
    files = sorted(d.glob("COCO_*_*.jpg"))
    if not files:
        raise MissingFileError(f"no COCO_<split>_<id>.jpg images in {d}")
    if n is not None:
        keep = set(chair_selection([f.name for f in files], n, seed))
        files = [f for f in files if f.name in keep]
    out = [Example(str(int(f.stem.rsplit("_", 1)[1])), prompt, str(f), "caption") for f in files]
    check_unique_ids([e.id for e in out], str(d))
    return out


@dataclass
class MmsbOptions:
    """MM-SafetyBench (``mmsb:ROOT``): which images and which question field."""

    aliases: ClassVar[dict[str, str]] = {"tiny": "tiny", "question_field": "question_field"}  # 0.3's flat keys
    images: str = field(default="none", metadata={"help": "MM-SafetyBench images: none, typo, sd or sd_typo."})
    question_field: str | None = field(default=None, metadata={
        "help": "MM-SafetyBench question field (default: Question without images, Rephrased Question with)."})
    tiny: bool = field(default=False, metadata={"help": "MM-SafetyBench: only the official tiny subset (168)."})


@dataclass
class DemoOptions:
    """The bundled demo requests (``demo``): solved examples before each one, for base models."""

    few_shot: int = field(default=0, metadata={
        "help": f"demo: solved benign questions before each request (0-{len(DEMO_SHOTS)}; `l2s demo` gives a base "
                "model 2, which otherwise starts a new line after 'Answer:' and so ends its answer)."})


@dataclass
class ChairImageOptions:
    """CHAIR captioning over a COCO folder (``chair:IMAGE_DIR``): which images."""

    images: int | None = field(default=None, metadata={
        "help": "CHAIR: a seeded random selection of N images of the folder (the shipped config: 500)."})
    seed: int = field(default=0, metadata={"help": "CHAIR: the seed of that selection."})


@dataclass(frozen=True)
class LoadContext:
    """What a loader gets besides its ARG: the run's image folder and its own options (None if it has none)."""

    image_dir: str | None = None
    options: Any = None


_Loader = Callable[[str, LoadContext], list[Example]]  # (ARG of the spec, image folder and own options) -> examples


@dataclass(frozen=True)
class DatasetKind:
    """A registered dataset format: its name (``kind`` of ``kind:ARG``), what ARG is (None: the spec is the bare
    name), the function that loads it, and its own options (a dataclass; ``group``: the settings field that holds
    them, ``prefix``: their command-line prefix), shared by kinds that name the same group."""

    name: str
    arg: str | None
    load: _Loader
    options: type | None = None
    group: str | None = None
    prefix: str | None = None
    behaviour: str | None = None  # the behaviour a run on this data steers towards unless one is named

    @property
    def usage(self) -> str:
        """How the spec is written, e.g. ``pope:FILE``."""
        return self.name if self.arg is None else f"{self.name}:{self.arg}"


DATASETS: dict[str, DatasetKind] = {}


def register_dataset(name: str, *, arg: str | None = None, options: type | None = None, group: str | None = None,
                     prefix: str | None = None, behaviour: str | None = None) -> Callable[[_Loader], _Loader]:
    """Decorator: make the loader reachable as the dataset spec ``name:ARG`` (``name`` alone when ``arg`` is
    None) from ``--dataset``, ``--train-dataset`` and :func:`load_dataset`.

    ``options``: the dataclass of the kind's own options; they become ``--<prefix>-<option>`` on every command
    that loads data, ``<group>:`` in YAML and a field of :class:`DataOptions` (group and prefix default to the
    kind's name; kinds may share a group). Register before :class:`DataOptions` is built: in this module, in a
    module it imports, or in a package's ``learn2steer.datasets`` entry point. ``behaviour``: the behaviour spec a
    run on this data steers towards when none is named (before the task's default).
    """
    def register(fn: _Loader) -> _Loader:
        DATASETS[name] = DatasetKind(name, arg, fn, options, (group or name) if options else None,
                                     (prefix or group or name) if options else None, behaviour)
        return fn
    return register


@register_dataset("demo", options=DemoOptions)
def _demo(arg: str, ctx: LoadContext) -> list[Example]:
    o: DemoOptions = ctx.options or DemoOptions()
    return demo_requests(o.few_shot)


@register_dataset("jsonl", arg="FILE")
def _jsonl(arg: str, ctx: LoadContext) -> list[Example]:
    return load_jsonl(arg, image_root=ctx.image_dir)


@register_dataset("mmsb", arg="ROOT", options=MmsbOptions)
def _mmsb(arg: str, ctx: LoadContext) -> list[Example]:
    o: MmsbOptions = ctx.options
    return load_mmsafetybench(arg, question_field=o.question_field, images=o.images, image_root=ctx.image_dir,
                              tiny=o.tiny)


@register_dataset("pope", arg="FILE")
def _pope(arg: str, ctx: LoadContext) -> list[Example]:
    return load_pope(arg, image_dir=ctx.image_dir)


@register_dataset("chair", arg="IMAGE_DIR", options=ChairImageOptions, group="chair_data", prefix="chair")
def _chair(arg: str, ctx: LoadContext) -> list[Example]:
    o: ChairImageOptions = ctx.options
    return load_chair_images(arg, n=o.images, seed=o.seed)


def dataset_usage() -> str:
    """The registered dataset specs as a sentence's list (``demo, jsonl:FILE, ... or chair:IMAGE_DIR``)."""
    names = [k.usage for k in DATASETS.values()]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def dataset_kind(spec: str) -> tuple[DatasetKind, str]:
    """The registered kind of ``spec`` (``kind:ARG``) and its ARG; an unknown spec is one sentence."""
    name, _, arg = str(spec).partition(":")
    kind = DATASETS.get(name)
    if kind is None or (kind.arg is None) != (not arg):
        raise InvalidInputError(f"unknown dataset {spec!r}; use {dataset_usage()}")
    return kind, arg


def load_dataset(spec: str, *, image_dir: str | None = None, limit: int | None = None, options: Any = None,
                 **flat: Any) -> list[Example]:
    """Parse a dataset spec ``kind:ARG`` (``demo`` | ``jsonl:FILE`` | ``mmsb:ROOT`` | ``pope:FILE`` |
    ``chair:IMAGE_DIR`` | ``textpope:FILE`` | ``textchair:N``, and any registered with :func:`register_dataset`)
    and load it.

    ``options``: the kind's own options (an instance of its options class, or a :class:`DataOptions` / mapping
    holding its group); ``flat``: the same as keyword arguments in their command-line spelling
    (``load_dataset("mmsb:ROOT", mmsb_images="typo", tiny=True)``). Keywords no registered kind knows are an error.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InvalidInputError(f"--limit must be a whole number >= 1 (or left out for all examples), got {limit!r}")
    known = flat_names((k.options, str(k.prefix)) for k in DATASETS.values() if k.options)
    unknown = sorted(set(flat) - known)
    if unknown:
        raise InvalidInputError(f"load_dataset got unknown options {unknown}; dataset options: "
                                f"{', '.join(sorted(known))}")
    kind, arg = dataset_kind(spec)
    own = None if kind.options is None else group_options(kind.options, str(kind.group), str(kind.prefix), options,
                                                           flat, where=f"dataset {kind.name} options")
    out = kind.load(arg, LoadContext(image_dir, own))
    out = out[:limit] if limit else out
    if not out:
        raise InvalidInputError(f"dataset {spec!r} has no examples")
    return out


def namespaced(examples: Sequence[Example], prefix: str) -> list[Example]:
    """The examples with ids ``<prefix>:<id>``: two datasets (e.g. a POPE train and test file, both numbered
    from 1) can then never hand one input's vectors or answers to another."""
    return [replace(e, id=f"{prefix}:{e.id}") for e in examples]


# ---- splits -------------------------------------------------------------------------------------------------

def stratified_split(examples: Sequence[Example], *, test_fraction: float = 0.5, seed: int = 0,
                     key: str = "category") -> tuple[list[str], list[str]]:
    """Seeded per-category split of example ids; every category with >= 2 examples lands on both sides."""
    return _grouped_split(examples, test_fraction=test_fraction, seed=seed, strata=lambda e: getattr(e, key),
                          unit=lambda e: e.id)


def image_split(examples: Sequence[Example], *, test_fraction: float = 0.5, seed: int = 0
                ) -> tuple[list[str], list[str]]:
    """Seeded split by image: all questions about one image land on the same side (no leakage through
    images; POPE asks 6 questions per image)."""
    missing = [e.id for e in examples if e.image is None and e.group is None]
    if missing:
        raise InvalidInputError(f"an image split needs an image for every example; {len(missing)} have none "
                                f"(e.g. {missing[:3]})")
    return _grouped_split(examples, test_fraction=test_fraction, seed=seed, strata=lambda e: None,
                          unit=lambda e: e.group or Path(str(e.image)).name)


def _grouped_split(examples: Sequence[Example], *, test_fraction: float, seed: int,
                   strata: Callable[[Example], object], unit: Callable[[Example], str]
                   ) -> tuple[list[str], list[str]]:
    if not 0 < test_fraction < 1:
        raise InvalidInputError(f"test_fraction must be between 0 and 1, got {test_fraction!r}")
    units: dict[object, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for e in examples:
        units[strata(e)][unit(e)].append(e.id)
    rng = random.Random(seed)
    train, test = [], []
    for k in sorted(units, key=str):
        keys = sorted(units[k])
        rng.shuffle(keys)
        n_test = round(len(keys) * test_fraction)
        if len(keys) >= 2:
            n_test = min(max(n_test, 1), len(keys) - 1)
        for u in keys[:n_test]:
            test += units[k][u]
        for u in keys[n_test:]:
            train += units[k][u]
    return train, test


def permutation_split(examples: Sequence[Example], *, test_fraction: float = 0.2, seed: int = 21
                      ) -> tuple[list[str], list[str]]:
    """The official code's split: ``numpy.random.seed(seed)``, shuffle the indices in dataset order, the first
    ``int(n * (1 - test_fraction))`` train. With MM-SafetyBench in its file order, seed 21 and 0.2, this is
    exactly the paper's 1344 / 336 split."""
    import numpy as np

    if not 0 < test_fraction < 1:
        raise InvalidInputError(f"test_fraction must be between 0 and 1, got {test_fraction!r}")
    idx = np.arange(len(examples))
    np.random.RandomState(seed).shuffle(idx)  # the stream of np.random.seed + shuffle, without touching numpy's global
    n_train = int(len(examples) * (1 - test_fraction))
    tr, te = sorted(idx[:n_train].tolist()), sorted(idx[n_train:].tolist())
    return [examples[i].id for i in tr], [examples[i].id for i in te]


def by_ids(examples: Iterable[Example], ids: Sequence[str]) -> list[Example]:
    """The examples with ``ids``, in that order."""
    pos = {e.id: e for e in examples}
    missing = [i for i in ids if i not in pos]
    if missing:
        raise InvalidInputError(f"{len(missing)} ids are not in the dataset (e.g. {missing[:3]})")
    return [pos[i] for i in ids]


#: how one dataset is split into training and test examples (a config's ``split``; ``auto``: the task's own)
SplitName = Literal["category", "image", "permutation"]
SPLITTERS: dict[SplitName, Callable[..., tuple[list[str], list[str]]]] = {
    "category": stratified_split, "image": image_split, "permutation": permutation_split}


def save_split(path: Path, split: dict[str, object]) -> None:
    """Write a split, refusing to overwrite a different one (changed data, seed or fraction)."""
    from learn2steer._io import write_json

    if path.exists():
        old = read_json(path, what="split file")
        if old != json.loads(json.dumps(split)):
            raise InvalidInputError(f"{path} holds a different split (data, seed or test fraction changed); "
                                    "use a new --out or delete the folder")
        return
    write_json(path, split)
