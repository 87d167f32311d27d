"""CachedJudge: each (prompt, response) judged once, and the verdicts survive a restart."""

from __future__ import annotations

from learn2steer.evaluation.judges.base import Verdict
from learn2steer.evaluation.judges.cache import CachedJudge


def test_cached_judge_judges_each_pair_once_and_survives_restarts(tmp_path) -> None:
    class Counting:
        name, key, calibrated = "count", "count:v1", True

        def __init__(self) -> None:
            self.seen: list[str] = []

        def judge(self, prompts, responses):
            self.seen += list(responses)
            return [Verdict(unsafe_prob=len(r) / 10) for r in responses]

    inner = Counting()
    cache = CachedJudge(inner, tmp_path / "c.jsonl", chunk=2)
    v1 = cache.judge(["a", "b", "a"], ["x", "yy", "x"])
    assert inner.seen == ["x", "yy"] and [v.unsafe_prob for v in v1] == [0.1, 0.2, 0.1]
    again = CachedJudge(Counting(), tmp_path / "c.jsonl")
    assert [v.unsafe_prob for v in again.judge(["b"], ["yy"])] == [0.2] and again.inner.seen == []
