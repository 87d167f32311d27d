"""A cache in front of any judge, so a judge that fails or is interrupted never costs the verdicts already paid for."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from learn2steer._io import JsonlAppender, fingerprint, read_jsonl, repair_jsonl
from learn2steer.evaluation.judges.base import Judge, Verdict


class CachedJudge:
    """Any judge, with each verdict stored in a JSON-lines file the moment it is obtained.

    Verdicts are keyed by the judge's ``key`` and the exact (prompt, response), so a re-run judges only
    what is new, and a changed judge never reuses another judge's verdicts.
    """

    def __init__(self, inner: Judge, path: str | Path, *, chunk: int = 8) -> None:
        self.inner, self.path, self.chunk = inner, Path(path), chunk
        self.name = inner.name
        self.calibrated = bool(getattr(inner, "calibrated", False))
        repair_jsonl(self.path)
        self.cache: dict[str, Verdict] = {}
        if self.path.exists():
            for r in read_jsonl(self.path, strict=False).rows:
                if isinstance(r.get("key"), str) and isinstance(r.get("verdict"), dict):
                    self.cache[r["key"]] = Verdict(**r["verdict"])

    @property
    def key(self) -> str:
        """The wrapped judge's key."""
        return self.inner.key

    def judge(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Verdict]:
        """Cached verdicts, asking the wrapped judge only for new pairs (saved chunk by chunk)."""
        keys = [fingerprint(self.inner.key, p, r, length=24) for p, r in zip(prompts, responses)]
        todo: dict[str, tuple[str, str]] = {}
        for k, p, r in zip(keys, prompts, responses):
            if k not in self.cache:
                todo.setdefault(k, (p, r))
        items = list(todo.items())
        with JsonlAppender(self.path) as out:
            for i in range(0, len(items), self.chunk):
                part = items[i:i + self.chunk]
                verdicts = self.inner.judge([p for _, (p, _) in part], [r for _, (_, r) in part])
                out.write_many({"key": k, "verdict": asdict(v)} for (k, _), v in zip(part, verdicts))
                self.cache.update({k: v for (k, _), v in zip(part, verdicts)})
        return [self.cache[k] for k in keys]
