"""POPE and CHAIR in text form: COCO scenes written from ground-truth objects, and POPE's question sampling.

No pretrained vision-language model can be had on every machine, so the hallucination half of the paper is
also run on text: the image is replaced by a *scene*, a short paragraph that names each ground-truth object of a
COCO 2014 image once (from CHAIR's ground-truth file, ``imid_to_objects``), in a seeded shuffled order, never an
absent one. By default about half of the objects are named by one of CHAIR's synonyms ("a skier" for person), so
answering is more than string matching; ``canonical`` names every object by its COCO class name.

What it measures is the mechanism POPE probes (answer from the evidence in the input, not from co-occurrence
priors: the adversarial split asks for objects that usually appear with what is present), on a language model.
It is not visual grounding, and its figures are not comparable with the paper's image POPE / CHAIR.

:func:`sample_pope` writes POPE-format questions for any set of images with POPE's three negative-sampling rules
(random; popular: the most frequent objects of the ground truth; adversarial: the objects that co-occur most with
the image's objects), so training data never has to come from POPE's own test images. Reserved images, never used
for training, selection or tuning (:func:`is_reserved`; the sampler never draws them): POPE's 500 test images
and every image whose COCO id ends in 7 (kept for independent checks).
"""

from __future__ import annotations

import gzip
import json
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from learn2steer.behaviours import Example
from learn2steer.errors import InvalidInputError, MissingFileError
from learn2steer.evaluation.datasets import LoadContext, load_pope, register_dataset
from learn2steer.evaluation.metrics import ChairEvaluator
from learn2steer.extraction import check_unique_ids

#: where the ground-truth file is looked up when no path is given
COCO_GT_ENV = "L2S_COCO_GT"
POPE_SPLITS = ("random", "popular", "adversarial")
_PLURAL_WORDS = {"people", "children", "men", "women", "kids", "scissors", "skis", "pants", "glasses"}
_OPENERS = ("The scene shows {}.", "In this scene there is {}.", "Here we see {}.")
_MORE = ("There is also {}.", "Nearby is {}.", "You can also see {}.")


@dataclass(frozen=True)
class CocoObjects:
    """COCO 2014 ground-truth object sets (CHAIR canonical names) and CHAIR's word tables."""

    objects: dict[str, list[str]]        # image id -> sorted canonical class names
    synonyms: dict[str, list[str]]       # canonical class -> words that name it (canonical name excluded)
    source: str
    reader: ChairEvaluator | None = field(default=None, repr=False, compare=False)

    def scene(self, image_id: int | str, *, seed: int = 0, canonical: bool = False) -> str:
        """The scene of ``image_id`` (:func:`scene_text`), checked by reading it back with CHAIR's word matching:
        where a combination of names reads otherwise (CHAIR drops "seat" next to "toilet"), the canonical names."""
        objs = self.of(image_id)
        text = scene_text(objs, image_id=image_id, seed=seed, canonical=canonical, synonyms=self.synonyms)
        if not canonical and self.reader is not None and sorted(self.reader.caption_objects(text)) != objs:
            text = scene_text(objs, image_id=image_id, seed=seed, canonical=True)
        return text

    def of(self, image_id: str | int) -> list[str]:
        """The objects of ``image_id``; an id without ground truth is an error."""
        key = str(int(image_id))
        if key not in self.objects:
            raise InvalidInputError(f"COCO image {key} has no ground-truth objects in {self.source}; is it a COCO "
                                    "2014 image id?")
        return self.objects[key]


def coco_gt_path(path: str | Path | None = None) -> Path:
    """The ground-truth file: ``path``, else ``$L2S_COCO_GT``; a missing one is a sentence naming both."""
    given = path or os.environ.get(COCO_GT_ENV)
    if not given:
        raise MissingFileError("the text-form POPE / CHAIR scenes need COCO's ground-truth objects: pass --scene-gt "
                               "(l2s data textpope: --gt; e.g. ../shared/data/chair/coco2014_chair_gt_objects.json.gz) "
                               "or set L2S_COCO_GT")
    p = Path(given)
    if not p.exists():
        raise MissingFileError(f"COCO ground-truth objects file {str(p)!r} not found")
    return p


@lru_cache(maxsize=4)
def _load(path: str) -> CocoObjects:
    opener: Any = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise InvalidInputError(f"COCO ground truth {path!r} cannot be read ({e})") from None
    if "imid_to_objects" not in data or "inverse_synonym_dict" not in data:
        raise InvalidInputError(f"{path} is not CHAIR's ground-truth file (it needs imid_to_objects and "
                                "inverse_synonym_dict)")
    objects = {str(k): sorted(set(v)) for k, v in data["imid_to_objects"].items()}
    # a synonym is used only if CHAIR's own word matching reads it back as its class and nothing else ("a stove top
    # oven" reads as oven twice, "an iPhone" as nothing: both left out), so a scene names exactly its objects
    reader = ChairEvaluator.from_files(path)
    syn: dict[str, set[str]] = {}
    for word, cls in data["inverse_synonym_dict"].items():
        word = word.strip()
        if word and cls and word != cls and reader.caption_objects(f"there is {_article(word)}.") == [cls]:
            syn.setdefault(cls, set()).add(word)
    return CocoObjects(objects, {k: sorted(v) for k, v in syn.items()}, path, reader)


def load_coco_objects(path: str | Path | None = None) -> CocoObjects:
    """The ground-truth objects of :func:`coco_gt_path` (parsed once per process)."""
    return _load(str(coco_gt_path(path)))


def image_id_of(image: str) -> int:
    """The COCO id in a POPE record's ``image`` field: its trailing digits, whatever the prefix or extension."""
    m = re.search(r"(\d+)(?:\.[A-Za-z]+)?$", str(image))
    if m is None:
        raise InvalidInputError(f"cannot read a COCO image id from {image!r}: expected trailing digits "
                                "(COCO_val2014_000000310196.jpg)")
    return int(m.group(1))


def _article(name: str) -> str:
    last = name.split()[-1]
    if last in _PLURAL_WORDS or (last.endswith("s") and not last.endswith(("ss", "us"))):
        return f"some {name}"
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def scene_text(objects: Sequence[str], *, image_id: int | str, seed: int = 0, canonical: bool = False,
               synonyms: dict[str, list[str]] | None = None) -> str:
    """A paragraph naming each of ``objects`` once, in an order (and with names) seeded by ``seed`` and the image.

    Deterministic: the same image, objects and seed give the same text on every machine. With ``canonical``
    False, each object is named by a CHAIR synonym with probability 1/2 (when it has one).
    """
    if not objects:
        raise InvalidInputError(f"COCO image {image_id} has no ground-truth objects; a scene needs at least one")
    rng = random.Random(f"{seed}:{int(image_id)}")
    names = []
    for o in sorted(set(objects)):
        words = (synonyms or {}).get(o, [])
        use = not canonical and words and rng.random() < 0.5
        names.append(rng.choice(words) if use else o)
    rng.shuffle(names)
    chunks = [names[i:i + 3] for i in range(0, len(names), 3)]
    sentences = [rng.choice(_OPENERS if k == 0 else _MORE).format(_join([_article(n) for n in c]))
                 for k, c in enumerate(chunks)]
    return " ".join(sentences)


def scene_question(text: str) -> str:
    """A POPE question about the scene: "in the image" becomes "in the scene"."""
    return re.sub(r"\b(in|of) the (image|picture|photo)\b", r"\1 the scene", text)


# ---- reserved images -----------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def pope_test_images() -> frozenset[int]:
    """COCO ids of POPE's 500 test images (the same 500 in its three official splits; shipped as ids only)."""
    text = (resources.files("learn2steer.data.scenes") / "pope_test_image_ids.txt").read_text()
    return frozenset(int(x) for line in text.splitlines() if not line.startswith("#") for x in line.split())


def is_reserved(image_id: int) -> bool:
    """Never for training, selection or tuning: POPE's 500 test images and every COCO id ending in 7."""
    return image_id % 10 == 7 or image_id in pope_test_images()


# ---- POPE's sampling ----------------------------------------------------------------------------------------

def _counts(coco: CocoObjects) -> tuple[Counter[str], dict[str, Counter[str]]]:
    freq: Counter[str] = Counter()
    co: dict[str, Counter[str]] = {}
    for objs in coco.objects.values():
        freq.update(objs)
        for a in objs:
            c = co.setdefault(a, Counter())
            c.update(b for b in objs if b != a)
    return freq, co


def sample_pope(coco: CocoObjects, *, images: int, seed: int = 0, per_image: int = 3, min_objects: int = 3
                ) -> dict[str, list[dict[str, Any]]]:
    """POPE-format questions for ``images`` seeded non-reserved COCO images, one list per negative-sampling rule.

    As POPE builds its files: each image with at least ``min_objects`` objects gets ``per_image`` "yes" questions
    about objects it has and ``per_image`` "no" questions about objects it lacks, sampled at random (``random``),
    among the most frequent objects of the ground truth (``popular``) or among the objects that co-occur most with
    the image's (``adversarial``); frequency and co-occurrence are counted over the whole ground-truth file.
    """
    if images < 1:
        raise InvalidInputError(f"--images must be a whole number >= 1, got {images}")
    pool = sorted(int(k) for k, v in coco.objects.items() if len(v) >= min_objects and not is_reserved(int(k)))
    if images > len(pool):
        raise InvalidInputError(f"only {len(pool)} non-reserved COCO images have {min_objects}+ objects; ask for "
                                "fewer --images")
    rng = random.Random(seed)
    chosen = sorted(rng.sample(pool, images))
    freq, co = _counts(coco)
    by_freq = [o for o, _ in sorted(freq.items(), key=lambda kv: (-kv[1], kv[0]))]
    classes = sorted(freq)
    out: dict[str, list[dict[str, Any]]] = {s: [] for s in POPE_SPLITS}
    for image_id in chosen:
        objs = coco.of(image_id)
        yes = sorted(rng.sample(objs, per_image))
        absent = [o for o in classes if o not in objs]
        adv: Counter[str] = Counter()
        for o in objs:
            adv.update(co.get(o, Counter()))
        negatives = {
            "random": sorted(rng.sample(absent, per_image)),
            "popular": [o for o in by_freq if o not in objs][:per_image],
            "adversarial": [o for o, _ in sorted(adv.items(), key=lambda kv: (-kv[1], kv[0])) if o not in objs
                            ][:per_image],
        }
        for split in POPE_SPLITS:
            neg = negatives[split]
            if len(neg) < per_image:  # too few co-occurring absent objects: fill with popular ones, as POPE does
                neg += [o for o in by_freq if o not in objs and o not in neg][:per_image - len(neg)]
            rows = out[split]
            for obj, label in [(o, "yes") for o in yes] + [(o, "no") for o in neg]:
                rows.append({"question_id": len(rows) + 1, "image": f"COCO_2014_{image_id:012d}",
                             "text": f"Is there {_a(obj)} in the image?", "label": label})
    return out


def _a(name: str) -> str:
    """POPE's question wording: "a"/"an" and the class name ("Is there a dining table in the image?")."""
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def write_pope_files(out: str | Path, questions: dict[str, list[dict[str, Any]]], prefix: str = "textpope"
                     ) -> list[Path]:
    """One POPE-format JSON-lines file per split: ``<out>/<prefix>_<split>.json``."""
    from learn2steer._io import write_text_atomic

    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, rows in questions.items():
        paths.append(write_text_atomic(d / f"{prefix}_{split}.json",
                                       "".join(json.dumps(r) + "\n" for r in rows)))
    return paths


# ---- the text-form datasets ----------------------------------------------------------------------------------

POPE_INSTRUCTION = "Answer with just one word, yes or no."
DESCRIBE = "Describe the scene in detail."


@dataclass
class SceneOptions:
    """How COCO images become text scenes (``textpope:FILE``, ``textchair:N``)."""

    gt: str | None = field(default=None, metadata={
        "help": "COCO ground-truth objects (coco2014_chair_gt_objects.json.gz; default: $L2S_COCO_GT)."})
    canonical: bool = field(default=False, metadata={
        "help": "Name every object by its COCO class (default: about half by a CHAIR synonym)."})
    seed: int = field(default=0, metadata={"help": "Seed of the scenes' wording and order (textchair: and images)."})
    few_shot: int = field(default=0, metadata={
        "help": "Solved examples about other (non-reserved) scenes before each POPE question or description "
                "request (base models)."})
    instruction: str = field(default=POPE_INSTRUCTION, metadata={"help": "The answer instruction after a question."})

    def __post_init__(self) -> None:
        if isinstance(self.few_shot, bool) or not isinstance(self.few_shot, int) or self.few_shot < 0:
            raise InvalidInputError(f"scene few_shot must be a whole number >= 0, got {self.few_shot!r}")


def _scene(coco: CocoObjects, image_id: int, o: SceneOptions) -> str:
    return coco.scene(image_id, seed=o.seed, canonical=o.canonical)


def _shot_questions(coco: CocoObjects, o: SceneOptions) -> list[dict[str, Any]]:
    """The solved examples' source: one yes and one no question about each of ``o.few_shot`` seeded non-reserved
    images (POPE's random rule), image by image."""
    return sample_pope(coco, images=o.few_shot, seed=o.seed + 1, per_image=1)["random"]


def few_shot_block(coco: CocoObjects, o: SceneOptions) -> str:
    """``o.few_shot`` solved questions (alternately yes and no) about seeded non-reserved scenes, or ""."""
    if not o.few_shot:
        return ""
    shots = _shot_questions(coco, o)
    rows = [shots[2 * k + k % 2] for k in range(o.few_shot)]  # scene k's yes question (even k) or no (odd k)
    return "".join(f"Scene: {_scene(coco, image_id_of(r['image']), o)}\nQuestion: {scene_question(r['text'])} "
                   f"{o.instruction}\nAnswer: {r['label'].capitalize()}\n\n" for r in rows)


def description_shots(coco: CocoObjects, o: SceneOptions) -> str:
    """``o.few_shot`` solved descriptions of seeded non-reserved scenes (the images of :func:`few_shot_block`), or
    "": a base model shown "Answer:" with no example of a description starts a new line, which ends its answer."""
    if not o.few_shot:
        return ""
    images = list(dict.fromkeys(image_id_of(r["image"]) for r in _shot_questions(coco, o)))[:o.few_shot]
    return "".join(f"Scene: {_scene(coco, i, o)}\n{DESCRIBE}\nAnswer: The scene shows "
                   f"{_join([_article(n) for n in coco.of(i)])}.\n\n" for i in images)


def pope_prompt(scene: str, question: str, o: SceneOptions, shots: str = "") -> str:
    """The user text of one text-form POPE question: solved examples, the scene, the question, the instruction."""
    return f"{shots}Scene: {scene}\nQuestion: {scene_question(question)} {o.instruction}".rstrip()


def load_textpope(path: str | Path, options: SceneOptions | None = None) -> list[Example]:
    """POPE-format questions (a file, or a folder of ``*_{random,popular,adversarial}.json``) about text scenes.

    Ids are the files' ``question_id`` (``<split>:<question_id>`` for a folder), the category the split, the
    group the COCO image (a split keeps an image's questions together)."""
    o = options or SceneOptions()
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.glob("*.json") if any(f.stem.endswith(f"_{s}") for s in POPE_SPLITS))
        if not files:
            raise MissingFileError(f"no POPE-format files (*_random.json, *_popular.json, *_adversarial.json) in {p}")
    else:
        files = [p]
    coco = load_coco_objects(o.gt)
    shots = few_shot_block(coco, o)
    out = []
    for f in files:
        for e in load_pope(f):
            image_id = image_id_of(str(e.image))
            text = pope_prompt(_scene(coco, image_id, o), e.question, o, shots)
            out.append(Example(f"{e.category}:{e.id}" if len(files) > 1 else e.id, text, None, e.category, e.label,
                               group=f"coco:{image_id}"))
    check_unique_ids([e.id for e in out], str(p))
    return out


def load_textchair(n: int, options: SceneOptions | None = None) -> list[Example]:
    """``n`` seeded scenes of POPE's 500 test images to describe; id = the COCO image id (CHAIR scores by it)."""
    o = options or SceneOptions()
    pool = sorted(pope_test_images())
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(pool):
        raise InvalidInputError(f"textchair:N takes 1 to {len(pool)} scenes (POPE's test images), got {n!r}")
    coco = load_coco_objects(o.gt)
    ids = sorted(random.Random(o.seed).sample(pool, n))
    shots = description_shots(coco, o)
    return [Example(str(i), f"{shots}Scene: {_scene(coco, i, o)}\n{DESCRIBE}", None, "description",
                    group=f"coco:{i}") for i in ids]


@register_dataset("textpope", arg="FILE", options=SceneOptions, group="scene", behaviour="hallucination_text")
def _textpope(arg: str, ctx: LoadContext) -> list[Example]:
    return load_textpope(arg, ctx.options)


@register_dataset("textchair", arg="N", options=SceneOptions, group="scene", behaviour="hallucination_text")
def _textchair(arg: str, ctx: LoadContext) -> list[Example]:
    if not arg.strip().isdigit():
        raise InvalidInputError(f"textchair:N takes a number of scenes, got {arg!r}")
    return load_textchair(int(arg), ctx.options)
