"""What a run shows: the table (``table.md``), plots (PNG) and ``report.md`` linking them.

The plots a user reaches for first: the task's figures against alpha (one line per method and layer), and
the task's per-category picture (safety: the desired behaviour's rate per category, steered vs unsteered;
POPE: accuracy and F1 per split) for each method. What to plot is asked of the task
(:meth:`~learn2steer.evaluation.tasks.Task.plot_metrics`, :meth:`~learn2steer.evaluation.tasks.Task.category_plot`),
never decided here by the task's class: a registered task is reported without an edit of this module.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from learn2steer.behaviours import Example
from learn2steer.evaluation.grid import REFERENCE, CellResult
from learn2steer.evaluation.tasks import Task


def _fmt(v: Any, percent: bool) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{100 * v:.1f}" if percent else f"{v:.3g}"


def markdown_table(records: Sequence[dict[str, Any]], task: Task) -> str:
    """Rows = method (layer, alpha), columns = the task's headline figures (percent unless noted)."""
    heads = [task.headline(r["metrics"]) for r in records]
    columns: list[str] = []
    for h in heads:
        columns += [k for k in h if k not in columns]
    lines = ["| method | layer | alpha | " + " | ".join(columns) + " |", "|---|---|---|" + "---|" * len(columns)]
    for r, h in zip(records, heads):
        vals = [_fmt(h.get(c), c not in task.not_percent) for c in columns]
        lines.append(f"| {r['method']} | {r['layer'] if r['layer'] is not None else '-'} | {r['alpha']:g} | "
                     + " | ".join(vals) + " |")
    plain = task.noted_numbers(columns)
    note = "Figures in %" + (f" except {', '.join(plain)}" if plain else "") + "."
    return "\n".join(lines) + "\n\n" + note + "\n"


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_vs_alpha(records: Sequence[dict[str, Any]], task: Task, metric: str, path: str | Path) -> Path | None:
    """PNG of ``metric`` against alpha, one line per (method, layer); unsteered methods as dashed lines."""
    rows: list[tuple[dict[str, Any], float]] = []
    for r in records:
        v = task.headline(r["metrics"]).get(metric)
        if v is not None and math.isfinite(v):
            rows.append((r, v))
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    series: dict[str, list[tuple[float, float]]] = {}
    flat: dict[str, float] = {}
    for r, v in rows:
        if r["layer"] is None:
            flat[r["method"]] = v
        else:
            series.setdefault(f"{r['method']} L{r['layer']}", []).append((r["alpha"], v))
    for name, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    for name, v in flat.items():
        ax.axhline(v, linestyle="--", color="grey" if name == REFERENCE else "black", label=name)
    ax.set_xlabel("alpha")
    ax.set_ylabel(metric)
    ax.set_title(f"{task.name}: {metric}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


def best_per_method(records: Sequence[dict[str, Any]], task: Task) -> list[dict[str, Any]]:
    """One record per method: its only cell, or the cell with the best task objective."""
    base = next((r["metrics"] for r in records if r["method"] == REFERENCE), None)
    best: dict[str, dict[str, Any]] = {}
    for r in records:
        cur = best.get(r["method"])
        better = base is not None and cur is not None and (
            task.objective(r["metrics"], base) > task.objective(cur["metrics"], base))
        if cur is None or better:
            best[r["method"]] = r
    return list(best.values())


def plot_categories(records: Sequence[dict[str, Any]], task: Task, path: str | Path) -> Path | None:
    """The task's per-category figure (:meth:`Task.category_plot`), one bar per method (its best cell); None
    for tasks without one."""
    rows = best_per_method(records, task)
    plot = task.category_plot([r["metrics"] for r in rows])
    if plot is None:
        return None
    xs, panels = plot.categories, plot.panels
    plt = _plt()
    width_in = min(16.0, max(7.0, 0.13 * len(xs) * max(1, len(rows)) + 2))
    fig, axes = plt.subplots(len(panels), 1, figsize=(width_in, 3.6 * len(panels) + 1.2), squeeze=False)
    width = 0.8 / max(1, len(rows))
    for ax, (title, fn) in zip(axes[:, 0], panels):
        for k, r in enumerate(rows):
            label = r["method"] if r["layer"] is None else f"{r['method']} (L{r['layer']}, a{r['alpha']:g})"
            ax.bar([i + (k - (len(rows) - 1) / 2) * width for i in range(len(xs))],
                   [fn(r["metrics"], x) for x in xs], width, label=label,
                   hatch="//" if r["method"] == REFERENCE else None)
        ax.set_xticks(range(len(xs)), xs, rotation=30, ha="right", fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_title(title, fontsize=9)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, ncol=min(4, len(labels)), loc="lower center")
    fig.tight_layout(rect=(0, 0.06 + 0.03 * ((len(labels) - 1) // 4), 1, 1))
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


def write_report(out: str | Path, *, title: str, intro: str, task: Task, results: Sequence[CellResult],
                 examples: Sequence[Example], sections: Sequence[str] = ()) -> Path:
    """``table.md``, plots and ``report.md`` for a finished grid; returns the report's path."""
    out = Path(out)
    records = [r.record() for r in results]
    table = markdown_table(records, task)
    (out / "table.md").write_text(f"# {title}\n\n{table}")
    plots = [p for p in (plot_vs_alpha(records, task, m, out / "plots" / f"{m}.png")
                         for m in (task.plot_metrics(records[0]["metrics"]) if records else [])) if p is not None]
    cat = plot_categories(records, task, out / "plots" / "per_category.png")
    lines = [f"# {title}", "", intro, "", "## Results", "", table, ""]
    if cat is not None:
        lines += [f"## {task.categories_title}", "",
                  f"![per category]({cat.relative_to(out).as_posix()})", ""]
    lines += list(sections)
    if plots:
        lines += ["## Against alpha", ""] + [f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in plots] + [""]
    lines += ["## Example generations", ""] + _examples(task, results, examples)
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _examples(task: Task, results: Sequence[CellResult], examples: Sequence[Example]) -> list[str]:
    picks: dict[str, int] = {}
    for i, e in enumerate(examples):
        picks.setdefault(task.example_group(e), i)
    lines = []
    for key, i in list(picks.items())[:4]:
        lines += [f"### {key}: {examples[i].question}", ""]
        lines += [f"- **{r.cell.name}**: {r.responses[i]!r}" for r in results]
        lines.append("")
    return lines
