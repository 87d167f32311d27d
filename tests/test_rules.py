"""The shared steering rules: one module, one home per rule, and checks made once per vector, not per step."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import learn2steer.rules as rules
import learn2steer.steering as steering
from learn2steer.artifacts import SteeringArtifact
from learn2steer.engines.requests import SteerMeta, SteerRequest
from learn2steer.errors import InvalidInputError
from learn2steer.models.prompts import PromptRow, build_inputs
from learn2steer.predictor import L2SNet
from learn2steer.steering import PredictedVectors, Step, steer
from learn2steer.vectors import SteeringVector

SRC = Path(rules.__file__).parent
GEN = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module + ("" if node.level == 0 else " (relative)"))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_the_rules_module_imports_no_engine_and_no_hook_code() -> None:
    ours = {m for m in _imports(SRC / "rules.py") if m.startswith("learn2steer")}
    assert ours == {"learn2steer.errors"}


def test_modules_that_need_only_the_rules_import_only_the_rules() -> None:
    """vLLM's plan, the request format, the configs and interop use no hook: they never import steering."""
    for rel in ("engines/vllm/plan.py", "engines/requests.py", "jobs.py", "evaluation/pipeline.py", "interop.py"):
        mods = _imports(SRC / rel)
        assert "learn2steer.steering" not in mods and "learn2steer.rules" in mods, rel


def test_steering_still_exports_the_rules_users_import_from_it() -> None:
    for name in ("Scope", "ScopeName", "Strength", "StrengthName", "addition", "check_alpha", "check_alphas",
                 "check_strength", "finite_in", "scope_selects", "MAX_RELATIVE_STRENGTH"):
        assert getattr(steering, name) is getattr(rules, name), name
        assert name in steering.__all__


def test_each_duplicated_rule_has_one_home() -> None:
    """reads_context, L' > L* and predict-then-check live in rules; the former copies are gone from the sources."""
    for kind in ("fixed", "l2s", "cast"):
        meta = SteerMeta(source="x", kind=kind, hidden_size=4, num_layers=4, steer_layers=(1,), context_layer=2)
        assert meta.reads_context is rules.reads_context(kind)
        art = SteeringArtifact.__new__(SteeringArtifact)
        art.kind = kind
        assert art.reads_context is rules.reads_context(kind)
        req = SteerRequest(meta, 1.0, "all")
        assert req.reads_after_writing is (kind != "fixed")  # L'=2 > L*=1
    assert not rules.reads_after_writing(None, (1,)) and not rules.reads_after_writing(2, (2, 5))
    for rel in ("artifacts.py", "engines/requests.py", "engines/hf.py", "steering.py"):
        text = (SRC / rel).read_text()
        assert 'kind != "fixed"' not in text and "_device()" not in text and "> min(" not in text, rel


def test_predict_checked_refuses_a_non_finite_prediction() -> None:
    net = L2SNet(8, 8, 4)
    assert rules.predict_checked(net, torch.randn(3, 8)).shape == (3, 8)
    with pytest.raises(InvalidInputError, match="NaN or inf"):
        rules.predict_checked(lambda h: h * float("nan"), torch.randn(3, 8))


def _counting(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    calls: list[int] = []
    real = getattr(steering, name)

    def counted(*a, **k):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(steering, name, counted)
    return calls


def test_the_addition_is_made_and_checked_once_per_vector_not_per_step(tiny_llama, monkeypatch) -> None:
    """#30: alpha * v, its finiteness and its bound against the residual norm are known once the vector is; a
    decoding step only adds. (0.3 multiplied at every layer call of every step.)"""
    h = tiny_llama
    batch = build_inputs(h, [PromptRow("how do i make a bomb ?"), PromptRow("hi")])
    made, checked = _counting(monkeypatch, "addition"), _counting(monkeypatch, "check_strength")
    with torch.no_grad(), steer(h, SteeringVector({1: torch.randn(h.hidden_size), 3: torch.randn(h.hidden_size)}),
                                alpha=0.5, batch=batch):
        h.model.generate(**batch.inputs, pad_token_id=h.tokenizer.pad_token_id, **GEN)
    assert (len(made), len(checked)) == (2, 2)  # one per layer, for 6 steps
    made.clear()
    checked.clear()
    net = L2SNet(h.hidden_size, h.hidden_size, 8)
    with torch.no_grad(), steer(h, PredictedVectors(net, 1, (2,)), alpha=0.5, batch=batch):
        h.model.generate(**batch.inputs, pad_token_id=h.tokenizer.pad_token_id, **GEN)
    assert (len(made), len(checked)) == (1, 1)


@dataclass
class _Switching:
    """A provider whose vector becomes ``late`` (a new tensor) after the first decoding step."""

    early: torch.Tensor
    late: torch.Tensor
    prompt_len: int
    read_layers: tuple[int, ...] = ()
    write_layers: tuple[int, ...] = (2,)

    def observe(self, layer: int, hidden: torch.Tensor, step: Step) -> None:
        return None

    def vector(self, layer: int, step: Step) -> torch.Tensor:
        return self.early if step.past_len <= self.prompt_len else self.late


@pytest.mark.parametrize("late_scale, match", [(1e38, "overflows"), (1e8, "times the residual stream's norm")])
def test_a_new_vector_is_checked_when_it_appears(tiny_llama, late_scale, match) -> None:
    """The checks run once per vector, so a vector that changes mid-generation is checked again: each refusal
    still fires whenever the vector that would overflow first shows up (alpha 10: 10 * 1e38 is inf in float32)."""
    h = tiny_llama
    batch = build_inputs(h, [PromptRow("how do i make a bomb ?")])
    early = torch.ones(h.hidden_size)
    late = torch.full((h.hidden_size,), late_scale)
    with pytest.raises(InvalidInputError, match=match):
        with torch.no_grad(), steer(h, _Switching(early, late, batch.seq_len), alpha=10.0, batch=batch):
            h.model.generate(**batch.inputs, pad_token_id=h.tokenizer.pad_token_id, **GEN)
    with torch.no_grad(), steer(h, _Switching(early, early.clone(), batch.seq_len), alpha=10.0, batch=batch):
        h.model.generate(**batch.inputs, pad_token_id=h.tokenizer.pad_token_id, **GEN)
