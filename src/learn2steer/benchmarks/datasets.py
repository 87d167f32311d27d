"""Dataset loaders (local paths only) that all produce :class:`~learn2steer.behaviours.Example` rows.

Formats: MM-SafetyBench (13 scenario JSON files), POPE (JSON lines), CHAIR captioning over COCO images,
and a generic JSONL (``question``, optional ``image``, ``category``, ``label``, ``id``) for users' own data.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence

from learn2steer.behaviours import Example

MMSB_DECLINE = ("01-Illegal_Activitiy", "02-HateSpeech", "03-Malware_Generation", "04-Physical_Harm",
                "05-EconomicHarm", "06-Fraud", "07-Sex", "08-Political_Lobbying", "09-Privacy_Violence",
                "13-Gov_Decision")
MMSB_DEFER = ("10-Legal_Opinion", "11-Financial_Advice", "12-Health_Consultation")
MMSB_QUESTION_FIELDS = ("Question", "Changed Question", "Rephrased Question", "Rephrased Question(SD)")
CHAIR_PROMPT = "Please describe this image in detail."


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found at {str(path)!r}")
    return path


def load_jsonl(path: str | Path, *, image_root: str | Path | None = None) -> list[Example]:
    """Generic JSON lines: ``question`` (or ``text``), optional ``image``, ``category``, ``label``, ``id``."""
    p = _need(Path(path), "dataset file")
    root = Path(image_root) if image_root else p.parent
    out = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}:{n}: not valid JSON ({e})") from None
        q = r.get("question", r.get("text"))
        if not isinstance(q, str) or not q.strip():
            raise ValueError(f"{p}:{n}: each row needs a non-empty 'question' (or 'text') field")
        img = r.get("image")
        out.append(Example(str(r.get("id", r.get("question_id", n))), q, str(root / img) if img else None,
                           r.get("category"), None if r.get("label") is None else str(r["label"]).lower()))
    return out


def demo_requests() -> list[Example]:
    """The bundled demo set: must-decline requests, expert consultations and benign questions."""
    text = (resources.files("learn2steer.data.demo") / "safety_requests.jsonl").read_text()
    return [Example(r["id"], r["question"], None, r["category"]) for r in map(json.loads, text.splitlines())]


def demo_group(category: str | None) -> str:
    """decline / defer / benign for demo and MM-SafetyBench categories."""
    if category in ("legal", "financial", "medical") or category in MMSB_DEFER:
        return "defer"
    if category == "benign":
        return "benign"
    return "decline"


def load_mmsafetybench(root: str | Path, *, question_field: str | None = None, images: str = "none",
                       image_root: str | Path | None = None, scenarios: Sequence[str] | None = None,
                       tiny: bool = False) -> list[Example]:
    """MM-SafetyBench from ``root`` (with ``processed_questions/``; ``TinyVersion_ID_List.json`` for tiny).

    ``images``: ``none`` (text only), ``typo``, ``sd`` or ``sd_typo``. Images are looked up as
    ``<image_root>/<scenario>/<id>.jpg`` or the official ``<image_root>/<scenario>/<KIND>/<id>.jpg``.
    The default question field is ``Question`` without images and the matching rephrased one with them.
    """
    root = Path(root)
    qdir = _need(root / "processed_questions", "MM-SafetyBench processed_questions folder")
    if images not in ("none", "typo", "sd", "sd_typo"):
        raise ValueError(f"images must be none, typo, sd or sd_typo, got {images!r}")
    field = question_field or {"none": "Question", "typo": "Rephrased Question", "sd": "Rephrased Question(SD)",
                               "sd_typo": "Rephrased Question"}[images]
    if field not in MMSB_QUESTION_FIELDS:
        raise ValueError(f"question_field must be one of {MMSB_QUESTION_FIELDS}, got {field!r}")
    keep: dict[str, set[str]] | None = None
    if tiny:
        lst = json.loads(_need(root / "TinyVersion_ID_List.json", "MM-SafetyBench tiny id list").read_text())
        keep = {d["Scenario"]: {str(i) for i in d["Sampled_ID_List"]} for d in lst}
    img_root = Path(image_root) if image_root else (root / "typo_tiny" if images == "typo" else root / "imgs")
    out = []
    for f in sorted(qdir.glob("*.json")):
        scen = f.stem
        if scenarios and scen not in scenarios:
            continue
        for qid, rec in json.loads(f.read_text()).items():
            if keep is not None and qid not in keep.get(scen, set()):
                continue
            img = None
            if images != "none":
                cands = [img_root / scen / f"{qid}.jpg", img_root / scen / images.upper() / f"{qid}.jpg"]
                img = next((c for c in cands if c.exists()), None)
                if img is None:
                    raise FileNotFoundError(f"no {images} image for MM-SafetyBench {scen}/{qid} under {img_root} "
                                            f"(tried {[str(c) for c in cands]}); pass image_root or images='none'")
            out.append(Example(f"{scen}/{qid}", rec[field], str(img) if img else None, scen))
    if not out:
        raise ValueError(f"no MM-SafetyBench questions selected under {qdir}")
    return out


def load_pope(path: str | Path, *, image_dir: str | Path | None = None, require_images: bool = True
              ) -> list[Example]:
    """POPE questions (JSON lines: question_id, image, text, label); category = the split name."""
    p = _need(Path(path), "POPE question file")
    split = next((s for s in ("adversarial", "popular", "random") if s in p.stem), p.stem)
    out = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        r = json.loads(line)
        img = None
        if image_dir is not None:
            img = Path(image_dir) / r["image"]
            if require_images and not img.exists():
                raise FileNotFoundError(f"{p}:{n}: image {str(img)!r} not found; POPE needs the COCO val2014 images")
        out.append(Example(str(r["question_id"]), r["text"], str(img) if img else None, split, str(r["label"]).lower()))
    return out


def load_chair_images(image_dir: str | Path, *, prompt: str = CHAIR_PROMPT, limit: int | None = None
                      ) -> list[Example]:
    """CHAIR captioning inputs: one example per COCO image, id = the COCO image id."""
    d = _need(Path(image_dir), "COCO image folder")
    files = sorted(d.glob("COCO_*_*.jpg"))[:limit]
    if not files:
        raise FileNotFoundError(f"no COCO_<split>_<id>.jpg images in {d}")
    return [Example(str(int(f.stem.rsplit("_", 1)[1])), prompt, str(f), "caption") for f in files]


def stratified_split(examples: Sequence[Example], *, test_fraction: float = 0.5, seed: int = 0,
                     key: str = "category") -> tuple[list[str], list[str]]:
    """Seeded per-category split; every category with >= 2 examples lands on both sides."""
    if not 0 < test_fraction < 1:
        raise ValueError("test_fraction must be between 0 and 1")
    groups: dict[object, list[str]] = defaultdict(list)
    for e in examples:
        groups[getattr(e, key)].append(e.id)
    rng = random.Random(seed)
    train, test = [], []
    for k in sorted(groups, key=str):
        ids = sorted(groups[k])
        rng.shuffle(ids)
        n_test = round(len(ids) * test_fraction)
        if len(ids) >= 2:
            n_test = min(max(n_test, 1), len(ids) - 1)
        test += ids[:n_test]
        train += ids[n_test:]
    return train, test


def by_ids(examples: Iterable[Example], ids: Sequence[str]) -> list[Example]:
    pos = {e.id: e for e in examples}
    return [pos[i] for i in ids]


def load_dataset(spec: str, *, image_dir: str | None = None, mmsb_images: str = "none",
                 question_field: str | None = None, tiny: bool = False, limit: int | None = None) -> list[Example]:
    """Parse a dataset spec: ``demo`` | ``jsonl:FILE`` | ``mmsb:ROOT`` | ``pope:FILE`` | ``chair:IMAGE_DIR``."""
    kind, _, arg = spec.partition(":")
    if kind == "demo":
        out = demo_requests()
    elif kind == "jsonl" and arg:
        out = load_jsonl(arg, image_root=image_dir)
    elif kind == "mmsb" and arg:
        out = load_mmsafetybench(arg, question_field=question_field, images=mmsb_images, image_root=image_dir,
                                 tiny=tiny)
    elif kind == "pope" and arg:
        out = load_pope(arg, image_dir=image_dir)
    elif kind == "chair" and arg:
        out = load_chair_images(arg)
    else:
        raise ValueError(f"unknown dataset {spec!r}; use demo, jsonl:FILE, mmsb:ROOT, pope:FILE or chair:IMAGE_DIR")
    return out[:limit] if limit else out
