"""The judges package face: judge specs are checked before anything runs (the judges themselves:
tests/evaluation/judges/; the HTTP judge against a flaky server: tests/faults/test_http_judge.py)."""

from __future__ import annotations

import pytest

from learn2steer.errors import InvalidInputError
from learn2steer.evaluation.judges import KeywordJudge, make_judge


def test_judge_specs_are_checked_before_anything_runs(tmp_path) -> None:
    assert isinstance(make_judge("keyword"), KeywordJudge)
    for spec, match in [("llamaguard:/no/such/path", "does not exist"), ("http://host/v1", "model name"),
                        ("http:ftp://x/v1#m", "unknown judge"), ("gpt", "unknown judge")]:
        with pytest.raises(InvalidInputError, match=match):
            make_judge(spec)
    assert make_judge("http://localhost:9/v1#m").key == make_judge("http:http://localhost:9/v1#m").key
