"""The report asks the task what to show: a task registered in a test is found by name and reported (table,
plots against alpha, per-category figure, example groups) without an edit of the report or the pipeline."""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import pytest
from helpers import restored

from learn2steer.behaviours import Example
from learn2steer.errors import InvalidInputError
from learn2steer.evaluation.grid import Cell, CellResult
from learn2steer.evaluation.pipeline import EvalConfig
from learn2steer.evaluation.report import write_report
from learn2steer.evaluation.tasks import TASKS, CategoryPlot, Scores, Task, make_task, register_task, task_class

EXS = [Example("a", "q1", category="x"), Example("b", "q2", category="y"), Example("c", "q3", category="x")]
CELLS = [Cell("no_steering", None, 0.0), Cell("mean", 1, 0.5), Cell("mean", 1, 1.0)]
ANSWERS = {"no_steering": ["one two three", "one two", "one"], "mean": ["one", "one", "one two"]}


@pytest.fixture
def task_registry():
    with restored(TASKS) as registry:
        yield registry


def _register() -> type[Task]:
    @register_task("brevity")
    class BrevityTask(Task):
        """Short answers: the share of one-word answers (per topic too) and the mean length in words."""

        default_behaviour = "hallucination"

        @classmethod
        def check(cls, options: Any) -> None:
            if os.environ.get("BREVITY_READY") != "1":
                raise InvalidInputError("task brevity is not ready (a test of the options check)")
        not_percent = ("mean_words",)
        categories_title = "Per topic"

        def score(self, examples: Sequence[Example], responses: Sequence[str],
                  reference: Sequence[str] | None = None) -> Scores:
            short = [len(r.split()) == 1 for r in responses]
            topics = sorted({str(e.category) for e in examples})
            per_topic = {t: sum(s for s, e in zip(short, examples) if e.category == t)
                         / sum(e.category == t for e in examples) for t in topics}
            return Scores({"short_rate": sum(short) / len(short),
                           "mean_words": sum(len(r.split()) for r in responses) / len(responses),
                           "per_topic": per_topic})

        def headline(self, metrics: Mapping[str, Any]) -> dict[str, float]:
            return {k: float(metrics[k]) for k in ("short_rate", "mean_words")}

        def objective(self, metrics: Mapping[str, Any], base: Mapping[str, Any]) -> float:
            return float(metrics["short_rate"])

        def plot_metrics(self, metrics: Mapping[str, Any]) -> list[str]:
            return ["short_rate"]

        def category_plot(self, metrics: Sequence[Mapping[str, Any]]) -> CategoryPlot | None:
            topics = sorted({t for m in metrics for t in m["per_topic"]})
            return CategoryPlot(topics, [("one-word answers", lambda m, t: m["per_topic"].get(t, 0.0))])

        def example_group(self, example: Example) -> str:
            return f"topic {example.category}"

    return BrevityTask


def test_a_registered_task_is_found_by_name_and_reported(task_registry, tmp_path) -> None:
    cls = _register()
    assert task_class("brevity") is cls and cls.name == "brevity"
    task = make_task("brevity")
    assert isinstance(task, cls)
    results = [CellResult(c, ANSWERS[c.method], task.score(EXS, ANSWERS[c.method])) for c in CELLS]
    text = write_report(tmp_path, title="Brevity", intro="", task=task, results=results, examples=EXS).read_text()
    assert "| method | layer | alpha | short_rate | mean_words |" in text
    assert "| mean | 1 | 0.5 | 66.7 | 1.33 |" in text, "short_rate in percent, mean_words (not_percent) as a number"
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["per_category.png", "short_rate.png"]
    assert "## Per topic" in text and "![per category](plots/per_category.png)" in text
    assert "### topic x: q1" in text and "### topic y: q2" in text and "### topic x: q3" not in text
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BREVITY_READY", "1")
        cfg = EvalConfig(task="brevity")
    assert cfg.task == "brevity", "the pipeline's config knows a registered task"
    with pytest.raises(InvalidInputError, match="a test of the options check"):
        EvalConfig(task="brevity")


def test_a_task_without_a_category_figure_reports_without_one(task_registry, tmp_path) -> None:
    cls = _register()
    cls.category_plot = Task.category_plot
    task = make_task("brevity")
    results = [CellResult(c, ANSWERS[c.method], task.score(EXS, ANSWERS[c.method])) for c in CELLS]
    text = write_report(tmp_path, title="Brevity", intro="", task=task, results=results, examples=EXS).read_text()
    assert "per_category" not in text and "## Per topic" not in text


def test_unknown_tasks_list_the_known_ones() -> None:
    with pytest.raises(InvalidInputError, match=r"safety, pope, chair"):
        EvalConfig(task="nope")
