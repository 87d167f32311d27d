"""What every judge returns and the interface every judge has.

In a module of their own so that each judge, the cache and the tasks can depend on the interface
without depending on one another.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence


@dataclass
class Verdict:
    """What a judge says of one response; fields a judge cannot tell stay None."""

    unsafe_prob: float | None = None
    refused: bool | None = None
    deferred: bool | None = None
    quality: float | None = None
    raw: dict[str, Any] = field(default_factory=dict)


class Judge(Protocol):
    """Scores responses; ``key`` identifies the judge and its settings (verdict cache key).

    ``calibrated``: its ``unsafe_prob`` is a real probability (Llama Guard), so the paper's threshold-averaged
    unsafe scores mean something; a keyword rule's 0/1 is not.
    """

    name: str
    calibrated: bool

    @property
    def key(self) -> str:
        """Identifies the judge and its settings; verdicts are cached under it."""
        ...

    def judge(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Verdict]:
        """One verdict per (prompt, response) pair, in order."""
        ...
