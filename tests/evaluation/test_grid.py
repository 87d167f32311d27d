"""The grid: typed results, the no-steering reference, resumption after a kill, torn lines, changed settings."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import examples

from learn2steer.behaviours import load_behaviour
from learn2steer.evaluation.grid import Cell, grid, run_grid
from learn2steer.evaluation.tasks import SafetyTask
from learn2steer.methods import MethodConfig
from learn2steer.vectors import SteeringVector


class FakeEngine:
    """Deterministic answers from (method, alpha, question); counts the batches it answered."""

    name, model_name = "fake", "fake-model"

    def __init__(self, fail_after: int | None = None) -> None:
        self.batches = 0
        self.fail_after = fail_after

    def answer(self, cfg, examples, *, max_new_tokens, batch_size, num_return_sequences=1, progress=True):
        if self.fail_after is not None and self.batches >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.batches += 1
        out = []
        for e in examples:
            if cfg.method == "no_steering" or "capital" in e.question:  # steering leaves this one unchanged
                text = f"Answer to {e.question}"
            elif e.category in ("legal", "financial", "medical"):
                text = f"You should consult a professional. ({cfg.alpha:g})"
            else:
                text = f"I'm sorry, I can't help with that. ({cfg.alpha:g})"
            out.append([text])
        return out


def configure(cell: Cell) -> MethodConfig:
    if cell.method == "no_steering":
        return MethodConfig()
    return MethodConfig(method="mean", alpha=cell.alpha, vector=SteeringVector({1: torch.ones(4)}))


CELLS = grid(["no_steering", "mean"], [1], [0.5, 1.0])
TASK = SafetyTask(load_behaviour("safety"))


def test_typed_results_and_the_reference(tmp_path) -> None:
    exs = examples(8)
    res = run_grid(FakeEngine(), exs, CELLS, configure, TASK, tmp_path, batch_size=3, progress=False)
    assert [r.cell.name for r in res] == ["no_steering__L-__a0", "mean__L1__a0.5", "mean__L1__a1"]
    ns, mean = res[0].metrics, res[1].metrics
    assert ns["unsafe_rate"] == 1.0 and mean["unsafe_rate"] == 0.0 and (ns["ed_score"], mean["ed_score"]) == (0.0, 1.0)
    assert mean["benign_unchanged_rate"] == pytest.approx(1 / 3), "compared with the no-steering answers"
    assert len(res[1].scores.per_example) == 8 and res[1].responses[0].startswith("I'm sorry")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["cell"] for r in saved] == [r.cell.name for r in res]


def test_resume_after_a_kill_gives_the_uninterrupted_result(tmp_path) -> None:
    exs = examples(8)
    full = run_grid(FakeEngine(), exs, CELLS, configure, TASK, tmp_path / "full", batch_size=3, progress=False)
    with pytest.raises(KeyboardInterrupt):
        run_grid(FakeEngine(fail_after=4), exs, CELLS, configure, TASK, tmp_path / "r", batch_size=3, progress=False)
    engine = FakeEngine()
    again = run_grid(engine, exs, CELLS, configure, TASK, tmp_path / "r", batch_size=3, progress=False)
    assert engine.batches == 9 - 4, "only the batches that never finished are generated"
    assert [r.responses for r in again] == [r.responses for r in full]
    assert [r.metrics for r in again] == [r.metrics for r in full]


def test_a_torn_last_line_is_cut_not_appended_to(tmp_path) -> None:
    exs = examples(6)
    run_grid(FakeEngine(), exs, CELLS[:1], configure, TASK, tmp_path, batch_size=3, progress=False)
    f = tmp_path / "cells" / "no_steering__L-__a0" / "generations.jsonl"
    lines = f.read_text().splitlines()
    f.write_text("\n".join(lines[:4]) + "\n" + lines[4][:17])  # SIGKILL in the middle of a write
    engine = FakeEngine()
    res = run_grid(engine, exs, CELLS[:1], configure, TASK, tmp_path, batch_size=3, progress=False)
    rows = [json.loads(x) for x in f.read_text().splitlines()]
    assert [r["id"] for r in rows] == [e.id for e in exs[:4]] + [e.id for e in exs[4:]]
    assert engine.batches == 1 and len(res[0].responses) == 6
    run_grid(FakeEngine(), exs, CELLS[:1], configure, TASK, tmp_path, batch_size=3, progress=False)
    assert len(f.read_text().splitlines()) == 6, "re-runs add nothing"


def test_changed_vectors_are_recomputed_not_mixed(tmp_path) -> None:
    exs = examples(4)
    run_grid(FakeEngine(), exs, CELLS, configure, TASK, tmp_path, batch_size=4, progress=False)

    def other(cell: Cell) -> MethodConfig:
        cfg = configure(cell)
        if cfg.vector is not None:
            cfg.vector = SteeringVector({1: torch.full((4,), 2.0)})
        return cfg

    engine = FakeEngine()
    with pytest.warns(UserWarning, match="changed since"):
        run_grid(engine, exs, CELLS, other, TASK, tmp_path, batch_size=4, progress=False)
    assert engine.batches == 2, "both mean cells recomputed, the unchanged no-steering cell kept"


class CountingEngine(FakeEngine):
    """FakeEngine that records every example id it was asked to answer."""

    def __init__(self, fail_after: int | None = None) -> None:
        super().__init__(fail_after)
        self.asked: list[str] = []

    def answer(self, cfg, examples, **kw):
        self.asked += [e.id for e in examples]
        return super().answer(cfg, examples, **kw)


def _with_repeats() -> list:
    from dataclasses import replace

    base = examples(4)  # POPE's splits share questions under other ids: repeat two inputs, and one with a new label
    return base + [replace(base[0], id="again0", category="other"), replace(base[2], id="again2"),
                   replace(base[1], id="relabelled1", label="no")]


def test_a_repeated_input_is_answered_once_and_written_under_every_id(tmp_path) -> None:
    exs = _with_repeats()
    engine = CountingEngine()
    res = run_grid(engine, exs, CELLS[:2], configure, TASK, tmp_path, batch_size=2, progress=False)
    assert sorted(engine.asked) == sorted(["q0", "q1", "q2", "q3", "relabelled1"] * 2), "repeats are not generated"
    for r in res:
        assert r.responses[4] == r.responses[0] and r.responses[5] == r.responses[2] and len(r.responses) == 7
    f = tmp_path / "cells" / "mean__L1__a0.5" / "generations.jsonl"
    rows = [json.loads(x) for x in f.read_text().splitlines()]
    assert {r["id"]: r["category"] for r in rows}["again0"] == "other", "each id keeps its own row"


def test_a_resumed_run_copies_an_input_answered_under_another_id(tmp_path) -> None:
    exs = _with_repeats()
    run_grid(FakeEngine(), exs[:4], CELLS[:1], configure, TASK, tmp_path, batch_size=2, progress=False)
    engine = CountingEngine()
    res = run_grid(engine, exs, CELLS[:1], configure, TASK, tmp_path, batch_size=2, progress=False)
    assert engine.asked == ["relabelled1"], "again0 and again2 are copies of answers already saved"
    assert res[0].responses[4] == res[0].responses[0]
