"""Experiment runner: a methods x alpha x layer grid, each cell saved (resumably) with its metrics.

Layout of ``out_dir``::

    cells/<method>__L<layer>__a<alpha>/generations.jsonl   one line per example, appended per batch
    cells/<method>__L<layer>__a<alpha>/scores.jsonl        per-example judge scores / parsed answers
    cells/<method>__L<layer>__a<alpha>/metrics.json        written when the cell is complete
    results.json, table.md, plots/<metric>.png

An interrupted run loses at most the batch in flight: finished cells are skipped and a partial cell
resumes after its last saved example.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

from tqdm.auto import tqdm

from learn2steer.behaviours import Example
from learn2steer.benchmarks.scoring import PER_EXAMPLE
from learn2steer.methods import MethodConfig, fingerprint, generate_with
from learn2steer.models.loading import ModelHandle

UNSTEERED = ("no_steering", "prompt")


@dataclass(frozen=True)
class Cell:
    method: str
    layer: int | None
    alpha: float

    @property
    def name(self) -> str:
        return f"{self.method}__L{self.layer if self.layer is not None else '-'}__a{self.alpha:g}"


def grid(methods: Sequence[str], layers: Sequence[int], alphas: Sequence[float]) -> list[Cell]:
    """Unsteered methods appear once; steered methods once per (layer, alpha)."""
    cells = []
    for m in methods:
        if m in UNSTEERED:
            cells.append(Cell(m, None, 0.0))
        else:
            cells += [Cell(m, layer, a) for layer in layers for a in alphas]
    return cells


def run_cell(handle: ModelHandle, cell: Cell, cfg: MethodConfig, examples: Sequence[Example], out_dir: Path, *,
             batch_size: int, max_new_tokens: int, progress: bool = True) -> list[str]:
    """Generate for one cell, appending each finished batch to generations.jsonl (resumable)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "generations.jsonl"
    done: dict[str, str] = {}
    # a cell resumes only if what it computes is unchanged; otherwise stale answers would be mixed in
    stamp = {"fingerprint": fingerprint(cfg), "max_new_tokens": max_new_tokens, "model": handle.name}
    stamp_path = out_dir / "cell.json"
    if stamp_path.exists() and json.loads(stamp_path.read_text()) != stamp:
        warnings.warn(f"{out_dir.name}: settings or vectors changed since the saved generations; recomputing",
                      stacklevel=2)
        path.unlink(missing_ok=True)
    stamp_path.write_text(json.dumps(stamp))
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by an interruption: recomputed below
                done[r["id"]] = r["response"]
    todo = [e for e in examples if e.id not in done]
    with path.open("a") as f:
        for i in tqdm(range(0, len(todo), batch_size), desc=cell.name, disable=not progress or not todo, leave=False):
            chunk = todo[i:i + batch_size]
            for e, r in zip(chunk, generate_with(handle, cfg, chunk, batch_size=batch_size,
                                                 max_new_tokens=max_new_tokens, progress=False)):
                f.write(json.dumps({"id": e.id, "question": e.question, "category": e.category, "response": r}) + "\n")
                done[e.id] = r
            f.flush()
            os.fsync(f.fileno())
    return [done[e.id] for e in examples]


def run_grid(handle: ModelHandle, examples: Sequence[Example], cells: Sequence[Cell],
             configure: Callable[[Cell], MethodConfig],
             score: Callable[[Cell, list[str], Mapping[str, list[str]]], dict],
             out_dir: str | Path, *, batch_size: int = 8, max_new_tokens: int = 64, progress: bool = True
             ) -> list[dict]:
    """Run every cell (no_steering first, so scorers can compare to it) and return one record per cell."""
    out = Path(out_dir)
    cells = sorted(cells, key=lambda c: c.method != "no_steering")
    responses: dict[str, list[str]] = {}
    records = []
    for cell in tqdm(cells, desc="grid", disable=not progress):
        cdir = out / "cells" / cell.name
        resp = run_cell(handle, cell, configure(cell), examples, cdir, batch_size=batch_size,
                        max_new_tokens=max_new_tokens, progress=progress)
        responses[cell.name] = resp
        metrics = dict(score(cell, resp, responses))
        per_example = metrics.pop(PER_EXAMPLE, None)
        if per_example is not None:
            (cdir / "scores.jsonl").write_text("".join(json.dumps(p) + "\n" for p in per_example))
        rec = {"method": cell.method, "layer": cell.layer, "alpha": cell.alpha, "cell": cell.name, "metrics": metrics}
        (cdir / "metrics.json").write_text(json.dumps(rec, indent=1))
        records.append(rec)
    (out / "results.json").write_text(json.dumps(records, indent=1))
    return records


def markdown_table(records: Sequence[dict], columns: Sequence[str], *, percent: bool = True) -> str:
    """Rows = method (layer, alpha), columns = metrics; the paper's layout."""
    head = "| method | layer | alpha | " + " | ".join(columns) + " |"
    sep = "|---|---|---|" + "---|" * len(columns)
    lines = [head, sep]
    for r in records:
        m = r["metrics"]
        vals = []
        for c in columns:
            v = m.get(c)
            vals.append("-" if v is None or v != v else (f"{100 * v:.1f}" if percent else f"{v:.3f}"))
        lines.append(f"| {r['method']} | {r['layer'] if r['layer'] is not None else '-'} | "
                     f"{r['alpha']:g} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def plot_vs_alpha(records: Sequence[dict], metric: str, path: str | Path, *, title: str = "") -> Path | None:
    """PNG of ``metric`` against alpha, one line per (method, layer); unsteered methods as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in records if metric in r["metrics"]]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    series: dict[str, list[tuple[float, float]]] = {}
    flat: dict[str, float] = {}
    for r in rows:
        if r["method"] in UNSTEERED:
            flat[r["method"]] = r["metrics"][metric]
        else:
            series.setdefault(f"{r['method']} L{r['layer']}", []).append((r["alpha"], r["metrics"][metric]))
    for name, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    for name, v in flat.items():
        ax.axhline(v, linestyle="--", color="grey" if name == "no_steering" else "black", label=name)
    ax.set_xlabel("alpha")
    ax.set_ylabel(metric)
    ax.set_title(title or metric)
    ax.legend(fontsize=7)
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p
