"""Judges turn (prompt, response) pairs into verdicts: refusal, expert deferral, P(unsafe), quality.

* :class:`KeywordJudge`: offline phrase rules. Fast and approximate: it cannot tell a refusal that
  still leaks harmful content from a real refusal; use it for iteration and demos.
* :class:`LlamaGuardJudge`: a Llama Guard checkpoint from a local path. ``mode="paper"`` reproduces
  the paper (Llama-Guard-3-8B, the official few-shot instruction, the response alone, raw P("unsafe")
  of the first token over the whole vocabulary); ``mode="qa"`` judges question + response with the
  model's own template, P(unsafe) normalised over the "safe"/"unsafe" tokens.
* :class:`HTTPJudge`: any OpenAI-compatible chat endpoint for 1-10 quality scores and pairwise wins,
  with retries, exponential backoff and an overall deadline per request.
* :class:`CachedJudge`: wraps any judge and stores each verdict as soon as it is obtained, so an
  interrupted or failing judge never costs the verdicts already paid for.

One module per concern: ``patterns`` (the phrase rules), ``base`` (:class:`Verdict`, the :class:`Judge`
protocol), ``keyword``, ``llamaguard``, ``http`` and ``cache``; this package face re-exports their public
names and turns a judge spec into a judge (:func:`make_judge`), the one place that knows every kind.
"""

from __future__ import annotations

from pathlib import Path

from learn2steer.errors import InvalidInputError
from learn2steer.evaluation.judges.base import Judge, Verdict
from learn2steer.evaluation.judges.cache import CachedJudge
from learn2steer.evaluation.judges.http import (
    PAIRWISE_PROMPT,
    QUALITY_PROMPT,
    HTTPJudge,
    check_url,
    parse_pairwise,
    parse_rating,
    post_json,
)
from learn2steer.evaluation.judges.keyword import KeywordJudge
from learn2steer.evaluation.judges.llamaguard import PAPER_FEW_SHOT, PAPER_INSTRUCTION, LlamaGuardJudge
from learn2steer.evaluation.judges.patterns import DEFERRAL_PATTERNS, REFUSAL_PATTERNS, is_deferral, is_refusal

__all__ = ["DEFERRAL_PATTERNS", "PAIRWISE_PROMPT", "PAPER_FEW_SHOT", "PAPER_INSTRUCTION", "QUALITY_PROMPT",
           "REFUSAL_PATTERNS", "CachedJudge", "HTTPJudge", "Judge", "KeywordJudge", "LlamaGuardJudge", "Verdict",
           "check_url", "is_deferral", "is_refusal", "make_judge", "parse_pairwise", "parse_rating", "post_json"]


def make_judge(spec: str, *, api_key: str | None = None) -> Judge:
    """``keyword`` | ``llamaguard:PATH`` (paper mode) | ``llamaguard-qa:PATH`` | ``http:BASE_URL#MODEL``
    (also a bare ``http(s)://BASE_URL#MODEL``). Malformed specs fail here, before anything is generated."""
    if spec == "keyword":
        return KeywordJudge()
    for prefix, mode in (("llamaguard:", "paper"), ("llamaguard-qa:", "qa")):
        if spec.startswith(prefix):
            path = spec[len(prefix):]
            if not Path(path).exists():
                raise InvalidInputError(f"Llama Guard path {path!r} does not exist (judges load local folders only)")
            return LlamaGuardJudge(path, mode=mode)
    rest = spec[len("http:"):] if spec.startswith("http:") and not spec.startswith("http://") else spec
    if rest.startswith(("http://", "https://")):
        if "#" not in rest:
            raise InvalidInputError(f"judge {spec!r} needs a model name after '#': http://HOST:PORT/v1#MODEL")
        url, model = rest.rsplit("#", 1)
        return HTTPJudge(url, model, api_key=api_key)
    raise InvalidInputError(f"unknown judge {spec!r}; use keyword, llamaguard:/local/path, llamaguard-qa:/local/path "
                            "or http://HOST:PORT/v1#MODEL")
