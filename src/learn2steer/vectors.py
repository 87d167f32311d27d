"""Steering vectors: P2S extraction (sharded, resumable) and the baselines built from its output.

``extract`` runs, per example, the two teacher-forced sequences (question+suffix+T+ / T-) and the plain
question, and stores z_X = h(T+) - h(T-) at the steering layers and h_X (last prompt token) at the
context layers. Results go to safetensors shards of a fixed number of examples plus an ``index.json``;
a shard is renamed into place only when complete, so an interrupted run resumes at the first missing
shard and never recomputes or half-writes anything.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from learn2steer import __version__
from learn2steer.activations import Site, read
from learn2steer.behaviours import ZERO, BehaviourSpec, Example
from learn2steer.models.loading import ModelHandle
from learn2steer.models.prompts import PromptRow, build_inputs

INDEX = "index.json"


def _write_json_atomic(path: Path, obj: object) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _chunks(seq: Sequence, n: int) -> list[Sequence]:
    return [seq[i:i + n] for i in range(0, len(seq), n)]


@torch.no_grad()
def p2s_batch(handle: ModelHandle, spec: BehaviourSpec, examples: Sequence[Example], steer_layers: Sequence[int],
              *, contrast: str | None = None) -> dict[int, torch.Tensor]:
    """z_X = h(T+) - h(T-) per example at each steering layer (zero rows for the ``zero`` contrast)."""
    pairs = [spec.pair(e, contrast) for e in examples]
    live = [i for i, p in enumerate(pairs) if p is not None]
    out = {layer: torch.zeros(len(examples), handle.hidden_size) for layer in steer_layers}
    if not live:
        return out
    rows = [pairs[i][0] for i in live] + [pairs[i][1] for i in live]  # type: ignore[index]
    sites = [Site(layer, spec.read) for layer in steer_layers]  # type: ignore[arg-type]
    got = read(handle, build_inputs(handle, rows), sites)
    n = len(live)
    for s in sites:
        out[s.layer][live] = got[s][:n] - got[s][n:]
    return out


@torch.no_grad()
def context_batch(handle: ModelHandle, examples: Sequence[Example], context_layers: Sequence[int]
                  ) -> dict[int, torch.Tensor]:
    """h_X: the last prompt token of the plain question at each context layer (what L2S sees at test time)."""
    rows = [PromptRow(e.question, e.image) for e in examples]
    got = read(handle, build_inputs(handle, rows), [Site(layer, "prompt_last") for layer in context_layers])
    return {s.layer: v for s, v in got.items()}


@dataclass
class Extraction:
    """Everything ``extract`` produced, loaded back into memory (float32, CPU)."""

    ids: list[str]
    categories: list[str | None]
    contrasts: list[str]
    z: dict[int, torch.Tensor]       # steering layer -> [N, D]
    h: dict[int, torch.Tensor]       # context layer -> [N, D]
    z_ba: dict[int, torch.Tensor]    # steering layer -> [N, D] with the BA contrast for every input
    meta: dict
    behaviour_spec: dict | None = None

    def select(self, ids: Sequence[str]) -> "Extraction":
        pos = {i: k for k, i in enumerate(self.ids)}
        missing = [i for i in ids if i not in pos]
        if missing:
            raise KeyError(f"{len(missing)} ids not in this extraction (e.g. {missing[:3]}); extract them first")
        idx = torch.tensor([pos[i] for i in ids], dtype=torch.long)
        return Extraction(list(ids), [self.categories[i] for i in idx], [self.contrasts[i] for i in idx],
                          {k: v[idx] for k, v in self.z.items()}, {k: v[idx] for k, v in self.h.items()},
                          {k: v[idx] for k, v in self.z_ba.items()}, self.meta, self.behaviour_spec)

    def vectors_by_id(self, layer: int) -> dict[str, torch.Tensor]:
        return {i: self.z[layer][k] for k, i in enumerate(self.ids)}


def extract(handle: ModelHandle, spec: BehaviourSpec, examples: Sequence[Example], out_dir: str | Path, *,
            steer_layers: Sequence[int], context_layers: Sequence[int], batch_size: int = 8,
            shard_size: int = 256, with_ba: bool = True, progress: bool = True,
            on_shard: Callable[[int], None] | None = None, load: bool = True) -> Extraction | None:
    """Extract P2S vectors and context features for ``examples`` into ``out_dir`` (resumable).

    Memory stays flat in the number of examples: finished shards go to disk. ``load=False`` skips loading
    the result back (then None is returned; use :func:`load_extraction` later). Re-running with the same
    arguments skips finished shards; different settings in an existing folder
    are an error rather than a silent mix.
    """
    out = Path(out_dir)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    steer_layers = sorted({handle.check_layer(x) for x in steer_layers})
    context_layers = sorted({handle.check_layer(x) for x in context_layers})
    ids = [e.id for e in examples]
    if len(set(ids)) != len(ids):
        raise ValueError("example ids must be unique; found duplicates")
    settings = {"model": handle.name, "hidden_size": handle.hidden_size, "num_layers": handle.num_layers,
                "behaviour": spec.name, "behaviour_fingerprint": spec.fingerprint, "steer_layers": steer_layers,
                "context_layers": context_layers, "read": spec.read, "shard_size": shard_size,
                "with_ba": with_ba and spec.ba is not None, "ids_fingerprint": _fingerprint(ids)}
    index_path = out / INDEX
    index = json.loads(index_path.read_text()) if index_path.exists() else None
    if index is not None and index["settings"] != settings:
        diff = {k: (index["settings"].get(k), v) for k, v in settings.items() if index["settings"].get(k) != v}
        raise ValueError(f"{out} already holds an extraction with other settings {diff}; "
                         "use another output folder or delete it")
    if index is None:
        index = {"settings": settings, "version": __version__, "shards": {},
                 "examples": [{"id": e.id, "category": e.category, "contrast": spec.contrast_name(e)}
                              for e in examples], "behaviour_spec": spec.to_dict()}
        _write_json_atomic(index_path, index)
    groups = _chunks(list(examples), shard_size)
    todo = [k for k in range(len(groups)) if f"shard-{k:05d}" not in index["shards"]]
    bar = tqdm(total=len(examples), initial=len(examples) - sum(len(groups[k]) for k in todo),
               desc="P2S extraction", unit="ex", disable=not progress)
    for k in todo:
        tensors: dict[str, list[torch.Tensor]] = {}
        for chunk in _chunks(groups[k], batch_size):
            z = p2s_batch(handle, spec, chunk, steer_layers)
            h = context_batch(handle, chunk, context_layers)
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
            bar.update(len(chunk))
        name = f"shard-{k:05d}"
        tmp = out / "shards" / f".{name}.tmp"
        save_file({key: torch.cat(v).contiguous() for key, v in tensors.items()}, str(tmp),
                  metadata={"ids": json.dumps([e.id for e in groups[k]])})
        os.replace(tmp, out / "shards" / f"{name}.safetensors")
        index["shards"][name] = {"n": len(groups[k]), "first": k * shard_size}
        _write_json_atomic(index_path, index)
        if on_shard is not None:
            on_shard(k)
    bar.close()
    return load_extraction(out) if load else None


def _fingerprint(ids: Sequence[str]) -> str:
    import hashlib
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def load_extraction(out_dir: str | Path) -> Extraction:
    """Load a finished extraction folder; fails clearly if shards are missing (run extract again)."""
    out = Path(out_dir)
    index_path = out / INDEX
    if not index_path.exists():
        raise FileNotFoundError(f"{out} has no {INDEX}; run `l2s extract` (or learn2steer.extract) first")
    index = json.loads(index_path.read_text())
    n_shards = -(-len(index["examples"]) // index["settings"]["shard_size"])
    missing = [k for k in range(n_shards) if f"shard-{k:05d}" not in index["shards"]]
    if missing:
        raise RuntimeError(f"extraction in {out} is incomplete ({len(missing)} of {n_shards} shards missing); "
                           "re-run the same extract command to resume")
    parts: dict[str, list[torch.Tensor]] = {}
    for k in range(n_shards):
        for key, v in load_file(str(out / "shards" / f"shard-{k:05d}.safetensors")).items():
            parts.setdefault(key, []).append(v)
    cat = {key: torch.cat(v) for key, v in parts.items()}

    def group(prefix: str) -> dict[int, torch.Tensor]:
        return {int(key.split("/")[1]): v for key, v in cat.items() if key.startswith(prefix + "/")}

    ex = index["examples"]
    return Extraction([e["id"] for e in ex], [e["category"] for e in ex], [e["contrast"] for e in ex],
                      group("z"), group("h"), group("z_ba"), index["settings"], index.get("behaviour_spec"))


# ---- baselines: plain functions over extracted vectors ------------------------------------------------

def mean_vector(z: torch.Tensor, contrasts: Sequence[str] | None = None) -> torch.Tensor:
    """Mean-S: the mean of z over training inputs (inputs mapped to the zero contrast are left out)."""
    if contrasts is not None:
        keep = torch.tensor([c != ZERO for c in contrasts])
        z = z[keep]
    if len(z) == 0:
        raise ValueError("no training vectors to average")
    return z.mean(0)


def norm_random(z: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Norm-Rnd: per input, a random direction (seeded) with the norm of that input's z."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(z.shape, generator=g)
    return d / d.norm(dim=-1, keepdim=True) * z.norm(dim=-1, keepdim=True)


def rescale_to_group(z: torch.Tensor, contrasts: Sequence[str], group: str) -> torch.Tensor:
    """Rescale every input's z to the mean norm of the ``group`` contrast (balances Consult vs Harmful)."""
    sel = torch.tensor([c == group for c in contrasts])
    if not bool(sel.any()):
        return z
    target = z[sel].norm(dim=-1).mean()
    norms = z.norm(dim=-1, keepdim=True)
    return torch.where(norms > 0, z / norms.clamp_min(1e-12) * target, z)
