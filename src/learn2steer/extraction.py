"""P2S extraction (sharded, resumable, multi-process): per-input steering vectors and context features.

``extract`` runs, per example, the prompt (question+suffix) once and the two teacher-forced answers T+ / T-
from its KV cache (:mod:`learn2steer.branches`; full sequences for models that compute their own positions),
and the plain question (from the same pass when the contrast adds no suffix), and stores
z_X = h(T+) - h(T-) at the steering layers and h_X (last prompt token) at the context layers.
Results go to safetensors shards of a fixed number of examples beside an ``index.json``
that lists the examples. A shard file is written under a unique temporary name and renamed into place
when complete, and it records the ids it holds; on resume every shard is verified against the index and
a missing, truncated or misplaced one is recomputed. Under ``torchrun`` each rank computes every
``world``-th missing shard; the result is the same files a single process
writes with as many threads per process (small products split their sums by thread count).

This is its own module, apart from :mod:`learn2steer.vectors` (the vector type and the baselines), because
it is the only part that needs a model, prompts, files and ranks: what only consumes vectors need not load it.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, cast

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from learn2steer._io import FolderLock, fingerprint, read_json, write_json
from learn2steer._version import __version__
from learn2steer.activations import Position, Site, read
from learn2steer.behaviours import BehaviourSpec, Example
from learn2steer.branches import BranchRead, can_branch, read_branches
from learn2steer.distributed import Ranks, ranks
from learn2steer.errors import InvalidInputError, MissingFileError
from learn2steer.models.loading import ModelHandle
from learn2steer.models.prompts import PromptRow, bare_prompts, build_inputs
from learn2steer.vectors import SteeringVector

INDEX = "index.json"


# ---- P2S and context features for one batch -----------------------------------------------------------------

def _chunks(seq: Sequence[Any], n: int) -> list[Sequence[Any]]:
    return [seq[i:i + n] for i in range(0, len(seq), n)]


@torch.no_grad()
def p2s_batch(handle: ModelHandle, spec: BehaviourSpec, examples: Sequence[Example], steer_layers: Sequence[int],
              *, contrast: str | None = None, branch: bool | None = None) -> dict[int, torch.Tensor]:
    """z_X = h(T+) - h(T-) per example at each steering layer (zero rows for the ``zero`` contrast).

    With ``position: turn_end`` the rows are complete assistant turns and the token read is the last of the
    sequence, or ``spec.offset(...)`` tokens before it (the official Qwen2-VL quirk for scenarios 10-13).
    ``branch`` (default: whenever the model allows, :func:`~learn2steer.branches.can_branch`): compute
    the shared prompt once and T+ / T- from its cache (:func:`~learn2steer.branches.read_branches`) instead
    of two full sequences; equal up to float rounding.
    """
    return p2s_and_context(handle, spec, examples, steer_layers, contrast=contrast, branch=branch)[0]


@torch.no_grad()
def p2s_and_context(handle: ModelHandle, spec: BehaviourSpec, examples: Sequence[Example],
                    steer_layers: Sequence[int], *, contrast: str | None = None, context_layers: Sequence[int] = (),
                    branch: bool | None = None) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor] | None]:
    """:func:`p2s_batch`, plus h_X at ``context_layers`` read in the same prompt pass when that prompt *is* the
    context's (the contrast adds no suffix, every example has a pair, the context is the last prompt token);
    otherwise the context is None and the caller reads it with :func:`context_batch`."""
    pairs = [spec.pair(e, contrast) for e in examples]
    live = [i for i, p in enumerate(pairs) if p is not None]
    out = {layer: torch.zeros(len(examples), handle.hidden_size) for layer in steer_layers}
    if not live:
        return out, None
    if branch is None:
        branch = can_branch(handle)
    offsets = [spec.offset(examples[i], contrast) if spec.position == "turn_end" else 0 for i in live]
    same_prompt = (bool(context_layers) and branch and len(live) == len(examples)
                   and spec.context_read == "prompt_last"
                   and all(p is not None and p[0].text == e.question for p, e in zip(pairs, examples)))
    if branch:
        position: BranchRead = "completion_mean" if spec.position == "completion_mean" else "completion_last"
        got = read_branches(handle, [p for p in pairs if p is not None], steer_layers, position=position,
                            offsets=[[o, o] for o in offsets], context_layers=context_layers if same_prompt else ())
        for layer in steer_layers:
            out[layer][live] = got.targets[layer][:, 0] - got.targets[layer][:, 1]
        return out, (got.context if same_prompt else None)
    rows = [p[0] for p in pairs if p is not None] + [p[1] for p in pairs if p is not None]
    batch = build_inputs(handle, rows)
    at = cast(Position, spec.position)
    if spec.position == "turn_end":
        batch.span_end = batch.span_end - torch.tensor(offsets * 2, dtype=torch.long, device=batch.span_end.device)
        if bool((batch.span_end <= batch.span_start).any()):
            raise InvalidInputError(f"behaviour {spec.name!r}: an end_offset reaches back before the answer")
        at = "completion_last"
    sites = [Site(layer, at) for layer in steer_layers]
    full = read(handle, batch, sites)
    n = len(live)
    for s in sites:
        out[s.layer][live] = full[s][:n] - full[s][n:]
    return out, None


@torch.no_grad()
def context_batch(handle: ModelHandle, examples: Sequence[Example], context_layers: Sequence[int],
                  position: str = "prompt_last") -> dict[int, torch.Tensor]:
    """h_X at each context layer: what L2S sees at test time.

    ``position`` ``prompt_last``: the last token of the prompt with the generation prompt. ``input_last`` (the
    official safety predictors): the last token of the user turn without the generation prompt, read in a forward
    pass over that bare prompt alone, as the official code does (no token-prefix matching).
    """
    rows = [PromptRow(e.question, e.image) for e in examples]
    batch = bare_prompts(handle, rows) if position == "input_last" else build_inputs(handle, rows)
    got = read(handle, batch, [Site(layer, "prompt_last") for layer in context_layers])
    return {s.layer: v for s, v in got.items()}


# ---- extraction ---------------------------------------------------------------------------------------------

@dataclass
class Extraction:
    """Everything ``extract`` produced, loaded back into memory (float32, CPU), rows in ``ids`` order."""

    ids: list[str]
    categories: list[str | None]
    contrasts: list[str]
    z: SteeringVector                       # per row, at the steering layers
    h: dict[int, torch.Tensor]              # context layer -> [N, D]
    z_ba: SteeringVector | None             # per row, with the BA contrast for every input
    meta: dict[str, Any]
    behaviour_spec: dict[str, Any] | None = None
    labels: list[str | None] = field(default_factory=list)

    def select(self, ids: Sequence[str]) -> "Extraction":
        """The rows of ``ids``, in that order; an id that was not extracted is an error."""
        pos = {i: k for k, i in enumerate(self.ids)}
        missing = [i for i in ids if i not in pos]
        if missing:
            raise InvalidInputError(f"{len(missing)} ids are not in this extraction (e.g. {missing[:3]}); "
                                    "extract them first")
        idx = [pos[i] for i in ids]
        t = torch.tensor(idx, dtype=torch.long)
        return Extraction(list(ids), [self.categories[i] for i in idx], [self.contrasts[i] for i in idx],
                          self.z.rows(t), {k: v[t] for k, v in self.h.items()},
                          self.z_ba.rows(t) if self.z_ba is not None else None, self.meta, self.behaviour_spec,
                          [self.labels[i] for i in idx] if self.labels else [])


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def shard_status(path: Path, ids: Sequence[str]) -> str | None:
    """None when the shard at ``path`` is whole and holds exactly ``ids``; else what is wrong with it."""
    if not path.exists():
        return "is missing"
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = shard_metadata(f.metadata()).get("ids")
            if stored != list(ids):
                return "holds other examples than the index says (swapped, or copied from another run)"
            keys = list(f.keys())
            for key in keys:
                if f.get_slice(key).get_shape()[0] != len(ids):
                    return f"has the wrong number of rows in {key}"
    except (SafetensorError, OSError, ValueError) as e:
        return f"is unreadable ({str(e).splitlines()[0][:80]})"
    return None if keys else "is empty"


SHARD_KEY = "learn2steer.shard"


def shard_metadata(raw: dict[str, str] | None) -> dict[str, Any]:
    """What a shard's safetensors header records: ``ids`` (in row order) and the ``rank`` that computed it.

    Stored as one JSON string under one key: safetensors writes its metadata map in no fixed order, and a
    single key keeps a recomputed shard byte-identical to the first. Shards of v0.1 (a bare ``ids`` key)
    still read.
    """
    raw = raw or {}
    if SHARD_KEY in raw:
        return dict(json.loads(raw[SHARD_KEY]))
    return {"ids": json.loads(raw["ids"])} if "ids" in raw else {}


def _write_shard(path: Path, tensors: dict[str, torch.Tensor], ids: Sequence[str], rank: int = 0) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp,
                  metadata={SHARD_KEY: json.dumps({"ids": list(ids), "rank": rank})})
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def extract(handle: ModelHandle, spec: BehaviourSpec, examples: Sequence[Example], out_dir: str | Path, *,
            steer_layers: Sequence[int], context_layers: Sequence[int], batch_size: int = 8,
            shard_size: int = 256, with_ba: bool = True, progress: bool = True,
            on_shard: Callable[[int], None] | None = None) -> Extraction:
    """Extract P2S vectors and context features for ``examples`` into ``out_dir`` and load the result.

    Re-running with the same arguments skips every shard that is whole and recomputes any that is missing
    or damaged; other settings in an existing folder are an error rather than a silent mix. One process
    at a time per folder (a second one is refused); under ``torchrun`` the ranks split the shards.
    Memory stays flat while extracting (finished shards go to disk); use :func:`extract_to` to skip
    loading the result back.
    """
    extract_to(handle, spec, examples, out_dir, steer_layers=steer_layers, context_layers=context_layers,
               batch_size=batch_size, shard_size=shard_size, with_ba=with_ba, progress=progress, on_shard=on_shard)
    return load_extraction(out_dir)


def extract_to(handle: ModelHandle, spec: BehaviourSpec, examples: Sequence[Example], out_dir: str | Path, *,
               steer_layers: Sequence[int], context_layers: Sequence[int], batch_size: int = 8,
               shard_size: int = 256, with_ba: bool = True, progress: bool = True,
               on_shard: Callable[[int], None] | None = None, job: Ranks | None = None) -> Path:
    """Like :func:`extract`, without loading the result (for datasets larger than memory)."""
    if not examples:
        raise InvalidInputError("the dataset is empty: nothing to extract (check --dataset / --limit)")
    if batch_size < 1 or shard_size < 1:
        raise InvalidInputError("batch_size and shard_size must be at least 1")
    out = Path(out_dir)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    job = job or ranks()
    steer_layers = sorted({handle.check_layer(x) for x in steer_layers})
    context_layers = sorted({handle.check_layer(x) for x in context_layers})
    if not steer_layers or not context_layers:
        raise InvalidInputError("extraction needs at least one steering layer and one context layer")
    ids = [e.id for e in examples]
    check_unique_ids(ids, "the dataset")
    settings = {"model": handle.name, "hidden_size": handle.hidden_size, "num_layers": handle.num_layers,
                "behaviour": spec.name, "behaviour_fingerprint": spec.fingerprint, "steer_layers": steer_layers,
                # the index keeps the key "read" for the position: existing extraction folders still resume
                "context_layers": context_layers, "read": spec.position, "shard_size": shard_size,
                "with_ba": with_ba and spec.ba is not None, "ids_fingerprint": fingerprint(ids)}
    if spec.context_read != "prompt_last":  # only when set: older extraction folders keep resuming
        settings["context_read"] = spec.context_read
    # one lock per rank: a second job on this folder (whatever its size) collides with this one at rank 0
    with FolderLock(out, "extraction", name=f".lock-rank{job.rank}"):
        index_path = out / INDEX
        if job.is_main:
            index = read_json(index_path, what="extraction index") if index_path.exists() else None
            if index is not None and index.get("settings") != settings:
                old = index.get("settings", {})
                diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
                raise InvalidInputError(f"{out} already holds an extraction with other settings {diff}; "
                                        "use another output folder or delete it")
            if index is not None and index.get("behaviour_spec") != spec.to_dict():
                # the same fingerprint: only fields that change no tensor moved (e.g. condition_labels); the
                # index keeps the spec the artifacts are trained under
                write_json(index_path, {**index, "behaviour_spec": spec.to_dict()})
            if index is None:
                write_json(index_path, {
                    "settings": settings, "version": __version__,
                    "examples": [{"id": e.id, "category": e.category, "contrast": spec.contrast_name(e),
                                  "label": e.label} for e in examples],
                    "behaviour_spec": spec.to_dict()})
        job.barrier()
        groups = _chunks(list(examples), shard_size)
        todo = [k for k in range(len(groups))
                if shard_status(out / "shards" / _shard_name(k), [e.id for e in groups[k]]) is not None]
        mine = job.deal(todo)
        done_before = len(examples) - sum(len(groups[k]) for k in todo)
        bar = tqdm(total=len(examples), initial=done_before, desc="P2S extraction", unit="ex",
                   disable=not progress or not job.is_main)
        for k in mine:
            tensors: dict[str, list[torch.Tensor]] = {}
            for chunk in _chunks(groups[k], batch_size):
                # the prompt once, T+ / T- from its cache, and h_X from that pass when the prompt is the context's
                z, h = p2s_and_context(handle, spec, chunk, steer_layers, context_layers=context_layers)
                if h is None:
                    h = context_batch(handle, chunk, context_layers, str(settings.get("context_read", "prompt_last")))
                parts = {**{f"z/{k}": v for k, v in z.items()}, **{f"h/{k}": v for k, v in h.items()}}
                if settings["with_ba"]:
                    need = [i for i, e in enumerate(chunk) if spec.contrast_name(e) != spec.ba]
                    zba = {k: v.clone() for k, v in z.items()}
                    if need:
                        extra = p2s_batch(handle, spec, [chunk[i] for i in need], steer_layers, contrast=spec.ba)
                        for layer in steer_layers:
                            zba[layer][need] = extra[layer]
                    parts.update({f"z_ba/{k}": v for k, v in zba.items()})
                for key, v in parts.items():
                    tensors.setdefault(key, []).append(v)
                bar.update(min(len(chunk) * job.world, len(examples) - bar.n))  # other ranks' share, estimated
            _write_shard(out / "shards" / _shard_name(k), {key: torch.cat(v) for key, v in tensors.items()},
                         [e.id for e in groups[k]], job.rank)
            if on_shard is not None:
                on_shard(k)
        bar.close()
        job.barrier()
    return out


def check_unique_ids(ids: Sequence[str], where: str) -> None:
    """Example ids key every saved result; a duplicate would silently swap one example's results for another's."""
    seen: set[str] = set()
    dup: list[str] = []
    for i in ids:
        if i in seen:
            dup.append(i)
        seen.add(i)
    if dup:
        raise InvalidInputError(f"{where} has duplicate example ids (e.g. {sorted(set(dup))[:3]}); "
                                "give every row a unique 'id'")


def load_extraction(out_dir: str | Path) -> Extraction:
    """Load a finished extraction folder; a missing or damaged shard is an error naming it and the fix."""
    out = Path(out_dir)
    index_path = out / INDEX
    if not index_path.exists():
        raise MissingFileError(f"{out} has no {INDEX}; run `l2s extract` (or learn2steer.extract) first")
    index = read_json(index_path, what="extraction index")
    settings, ex = index["settings"], index["examples"]
    groups = _chunks([e["id"] for e in ex], settings["shard_size"])
    parts: dict[str, list[torch.Tensor]] = {}
    for k, ids in enumerate(groups):
        path = out / "shards" / _shard_name(k)
        problem = shard_status(path, ids)
        if problem is not None:
            raise MissingFileError(f"extraction shard {path} {problem}; re-run the same extract command "
                                   "to recompute it")
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                parts.setdefault(key, []).append(f.get_tensor(key))
    cat = {key: torch.cat(v) for key, v in parts.items()}

    def group(prefix: str) -> dict[int, torch.Tensor]:
        return {int(key.split("/")[1]): v for key, v in cat.items() if key.startswith(prefix + "/")}

    z_ba = group("z_ba")
    return Extraction([e["id"] for e in ex], [e["category"] for e in ex], [e["contrast"] for e in ex],
                      SteeringVector(group("z")), group("h"), SteeringVector(z_ba) if z_ba else None, settings,
                      index.get("behaviour_spec"), [e.get("label") for e in ex])
