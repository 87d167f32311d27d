"""The experiment grid: methods x layers x alphas, every cell generated resumably, then scored by the task.

Layout of ``out_dir``::

    cells/<method>__L<layer>__a<alpha>/cell.json          what the answers were computed with (fingerprint)
    cells/<method>__L<layer>__a<alpha>/generations.jsonl  one line per example, appended per batch and fsynced
    cells/<method>__L<layer>__a<alpha>/scores.jsonl       per-example decisions (refused, parsed answer, ...)
    cells/<method>__L<layer>__a<alpha>/metrics.json       the cell's figures
    results.json                                          every finished cell's figures (rewritten per cell)

Examples that are the same input (question, image and label; :func:`input_key`) are answered once per cell
and the answer is written under each of their ids: POPE's three official files share half their questions
(5,127 distinct of 9,000), and greedy decoding answers a repeated input the same way.

An interrupted run loses at most the batch in flight: on resume, a torn last line is cut, finished
examples are skipped, and a cell whose method, vectors or settings changed starts afresh instead of
mixing old answers in. Under ``torchrun`` the batches of all cells are dealt out to the ranks (each
writes ``generations.rank<r>.jsonl``), and rank 0 scores once everything is generated.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from learn2steer._io import JsonlAppender, dumps, read_json, read_jsonl, write_json, write_text_atomic
from learn2steer.behaviours import Example
from learn2steer.distributed import Ranks, ranks
from learn2steer.engines import Engine, generate_with
from learn2steer.evaluation.tasks import Scores, Task
from learn2steer.methods import METHODS, MethodConfig, fingerprint

REFERENCE = "no_steering"


@dataclass(frozen=True)
class Cell:
    """One grid point: a method at a layer and strength (unsteered methods: layer None, alpha 0)."""

    method: str
    layer: int | None
    alpha: float

    @property
    def name(self) -> str:
        """The cell's folder name, e.g. ``l2s__L12__a1.5`` (unsteered methods: ``L-`` and ``a0``)."""
        return f"{self.method}__L{self.layer if self.layer is not None else '-'}__a{self.alpha:g}"


@dataclass
class CellResult:
    """A finished cell: its answers (in example order) and its scores."""

    cell: Cell
    responses: list[str]
    scores: Scores

    @property
    def metrics(self) -> dict[str, Any]:
        """The cell's figures (the task's full metrics, headline and per-category)."""
        return self.scores.metrics

    def record(self) -> dict[str, Any]:
        """The JSON form kept in ``results.json``."""
        return {"method": self.cell.method, "layer": self.cell.layer, "alpha": self.cell.alpha,
                "cell": self.cell.name, "metrics": self.metrics}


def grid(methods: Sequence[str], layers: Sequence[int], alphas: Sequence[float]) -> list[Cell]:
    """Unsteered methods appear once; steering methods once per (layer, alpha)."""
    cells = []
    for m in methods:
        if not METHODS[m].steers:
            cells.append(Cell(m, None, 0.0))
        else:
            cells += [Cell(m, layer, a) for layer in layers for a in alphas]
    return cells


def _gen_files(cdir: Path) -> list[Path]:
    return sorted(cdir.glob("generations*.jsonl"))


def _own_file(cdir: Path, job: Ranks) -> Path:
    return cdir / ("generations.jsonl" if job.rank == 0 else f"generations.rank{job.rank}.jsonl")


def _done(cdir: Path) -> dict[str, str]:
    done: dict[str, str] = {}
    for f in _gen_files(cdir):
        for r in read_jsonl(f, strict=False).rows:  # a torn last line is skipped here, cut before appending
            if isinstance(r.get("id"), str) and isinstance(r.get("response"), str):
                done.setdefault(r["id"], r["response"])
    return done


def input_key(e: Example) -> tuple[Any, ...]:
    """What a greedy answer depends on besides the method: the question, the image and the label (a per-input
    vector is extracted from the label's contrast). An image that is not a path or URL keeps its example apart."""
    if e.image is None or isinstance(e.image, (str, Path)):
        return ("input", e.question, None if e.image is None else str(e.image), e.label)
    return ("id", e.id)


def unique_inputs(examples: Sequence[Example]) -> list[Example]:
    """The first example of each distinct input (:func:`input_key`), in order: the ones a cell generates for."""
    seen: set[tuple[Any, ...]] = set()
    out = []
    for e in examples:
        k = input_key(e)
        if k not in seen:
            seen.add(k)
            out.append(e)
    return out


def _rows(examples: Sequence[Example], answers: Sequence[str]) -> list[dict[str, Any]]:
    return [{"id": e.id, "question": e.question, "category": e.category, "response": a}
            for e, a in zip(examples, answers)]


def generate_cells(engine: Engine, examples: Sequence[Example], cells: Sequence[Cell],
                   configure: Callable[[Cell], MethodConfig], out_dir: str | Path, *, batch_size: int = 8,
                   max_new_tokens: int = 64, progress: bool = True, job: Ranks | None = None) -> dict[str, list[str]]:
    """Generate every cell's answers into ``out_dir/cells`` (resumable; ranks share the batches).

    Returns {cell name: answers in example order} (complete on every rank once all ranks return).
    """
    job = job or ranks()
    out = Path(out_dir)
    configs = {c.name: configure(c) for c in cells}
    for c in cells:
        cdir = out / "cells" / c.name
        stamp = {"fingerprint": fingerprint(configs[c.name]), "max_new_tokens": max_new_tokens,
                 "model": engine.model_name, "method": c.method}
        if job.is_main:
            cdir.mkdir(parents=True, exist_ok=True)
            old = read_json(cdir / "cell.json", what="cell stamp") if (cdir / "cell.json").exists() else None
            if old is not None and old != stamp:
                warnings.warn(f"{c.name}: the method's settings or vectors changed since its answers were saved; "
                              "recomputing them", stacklevel=2)
                for old_file in _gen_files(cdir):
                    old_file.unlink()
                for name in ("scores.jsonl", "metrics.json"):
                    (cdir / name).unlink(missing_ok=True)
            write_json(cdir / "cell.json", stamp)
    job.barrier()
    keys = {e.id: input_key(e) for e in examples}
    work: list[tuple[Cell, list[Example]]] = []
    same: dict[tuple[str, tuple[Any, ...]], list[Example]] = {}  # (cell, input) -> the examples its answer is for
    for c in cells:
        done = _done(out / "cells" / c.name)
        known = {keys[e.id]: done[e.id] for e in examples if e.id in done}
        todo = [e for e in examples if e.id not in done]
        copies = [e for e in todo if keys[e.id] in known]  # an input answered under another id (a resumed run)
        if copies and job.is_main:
            with JsonlAppender(_own_file(out / "cells" / c.name, job)) as appender:
                appender.write_many(_rows(copies, [known[keys[e.id]] for e in copies]))
        reps = []  # the first example of each input still to answer, in order
        for e in todo:
            if keys[e.id] not in known:
                group = same.setdefault((c.name, keys[e.id]), [])
                if not group:
                    reps.append(e)
                group.append(e)
        work += [(c, reps[i:i + batch_size]) for i in range(0, len(reps), batch_size)]
    mine = job.deal(work)
    for c, chunk in tqdm(mine, desc="generate", unit="batch", disable=not progress or not mine):
        answers = generate_with(engine, configs[c.name], chunk, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                progress=False)
        groups = [same[(c.name, keys[e.id])] for e in chunk]
        with JsonlAppender(_own_file(out / "cells" / c.name, job)) as appender:
            appender.write_many(r for g, a in zip(groups, answers) for r in _rows(g, [a] * len(g)))
    job.barrier()
    result: dict[str, list[str]] = {}
    for c in cells:
        done = _done(out / "cells" / c.name)
        missing = [e.id for e in examples if e.id not in done]
        if missing:
            raise RuntimeError(f"cell {c.name} lacks answers for {len(missing)} examples after generation")
        result[c.name] = [done[e.id] for e in examples]
    return result


def run_grid(engine: Engine, examples: Sequence[Example], cells: Sequence[Cell],
             configure: Callable[[Cell], MethodConfig], task: Task, out_dir: str | Path, *, batch_size: int = 8,
             max_new_tokens: int = 64, progress: bool = True, job: Ranks | None = None) -> list[CellResult]:
    """Generate and score every cell; returns one typed result per cell (on rank 0; [] on other ranks).

    The no-steering cell runs first and its answers are the reference every other cell is compared with
    (e.g. which benign answers steering left unchanged).
    """
    job = job or ranks()
    out = Path(out_dir)
    cells = sorted(cells, key=lambda c: c.method != REFERENCE)
    responses = generate_cells(engine, examples, cells, configure, out, batch_size=batch_size,
                               max_new_tokens=max_new_tokens, progress=progress, job=job)
    if not job.is_main:
        return []
    reference = next((responses[c.name] for c in cells if c.method == REFERENCE), None)
    results: list[CellResult] = []
    for c in tqdm(cells, desc="score", disable=not progress):
        cdir = out / "cells" / c.name
        scores = task.score(examples, responses[c.name], reference=reference)
        write_text_atomic(cdir / "scores.jsonl", "".join(dumps(p) + "\n" for p in scores.per_example))
        res = CellResult(c, responses[c.name], scores)
        write_json(cdir / "metrics.json", res.record())
        results.append(res)
        write_json(out / "results.json", [r.record() for r in results])
    return results
