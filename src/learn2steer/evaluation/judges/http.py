"""An OpenAI-compatible chat endpoint as a judge: 1-10 quality scores and pairwise wins.

The network is the part of judging that fails, so everything about failing lives here: each request runs
under an overall deadline (:func:`post_json`, which a slow drip of bytes cannot outlast), and a failed one
is retried with exponential backoff before a :class:`~learn2steer.errors.JudgeError` says how to resume.
The prompts and the parsers of the replies belong to this judge alone.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence
from urllib.parse import urlsplit

from learn2steer.errors import InvalidInputError, JudgeError
from learn2steer.evaluation.judges.base import Verdict

QUALITY_PROMPT = (
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to "
    "the user question below. Consider helpfulness, relevance, accuracy, depth and safety. Begin with a short "
    "explanation, then rate the response on a scale of 1 to 10 strictly in this format: \"Rating: [[5]]\".\n\n"
    "[Question]\n{question}\n\n[Response]\n{response}"
)
PAIRWISE_PROMPT = (
    "Please act as an impartial judge and compare two AI assistant responses to the user question below. "
    "Consider helpfulness, relevance, accuracy and safety. Do not let the order or length of the responses "
    "influence you. After a short explanation, output your verdict strictly as \"[[A]]\", \"[[B]]\" or "
    "\"[[C]]\" for a tie.\n\n[Question]\n{question}\n\n[Response A]\n{a}\n\n[Response B]\n{b}"
)


def parse_rating(text: str) -> float | None:
    """The 1-10 score of a judge reply (``[[7]]`` or ``Rating: 7``), None when absent or out of range."""
    m = re.search(r"\[\[(\d+(?:\.\d+)?)\]\]", text) or re.search(r"[Rr]ating:\s*(\d+(?:\.\d+)?)", text)
    if not m:
        return None
    v = float(m.group(1))
    return v if 1 <= v <= 10 else None


def parse_pairwise(text: str) -> str | None:
    """``a`` / ``b`` / ``tie`` from a pairwise reply (``[[A]]``, ``[[B]]``, ``[[C]]``), None when absent."""
    m = re.search(r"\[\[([ABC])\]\]", text)
    return {"A": "a", "B": "b", "C": "tie"}[m.group(1)] if m else None


class _Retryable(Exception):
    pass


def check_url(url: str) -> str:
    """An http(s) base URL with a host, or a clear error."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidInputError(f"judge URL {url!r} must look like http://HOST:PORT/v1 (scheme and host)")
    return url.rstrip("/")


def post_json(url: str, payload: dict[str, Any], headers: dict[str, str], deadline: float) -> tuple[int, bytes]:
    """POST JSON and return (status, body), giving up after ``deadline`` seconds in total.

    The request runs in a helper thread so that a server that drips bytes slowly (each read within a
    socket timeout) still cannot hold the caller past the deadline: the socket is shut down then.
    """
    parts = urlsplit(url)
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = cls(parts.hostname or "", parts.port, timeout=deadline)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            conn.connect()
            result["sock"] = conn.sock  # ours to shut down: http.client drops it while reading the body
            conn.request("POST", path, body=json.dumps(payload).encode(),
                         headers={"Content-Type": "application/json", **headers})
            resp = conn.getresponse()
            result["status"], result["body"] = resp.status, resp.read()
        except BaseException as e:  # reported to the caller below
            result["error"] = e

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(deadline)
    if t.is_alive():
        sock = result.get("sock")
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        conn.close()
        t.join(0.5)
        raise TimeoutError(f"no complete reply within {deadline:g} s")
    conn.close()
    if "error" in result:
        raise result["error"]
    return int(result["status"]), bytes(result["body"])


@dataclass
class HTTPJudge:
    """An OpenAI-compatible ``/chat/completions`` endpoint for 1-10 quality scores and pairwise verdicts.

    ``timeout`` bounds each request in total (connect, wait, read); a failed request (connection error,
    timeout, HTTP 429/5xx, malformed reply) is retried ``retries`` times with exponential backoff before
    :class:`~learn2steer.errors.JudgeError` is raised. The API key comes from ``api_key`` or
    ``$L2S_JUDGE_API_KEY`` / ``$OPENAI_API_KEY``. Unparseable ratings give ``quality=None`` and are counted.
    """

    base_url: str
    model: str
    api_key: str | None = None
    timeout: float = 60.0
    retries: int = 4
    backoff: float = 1.0
    name: str = "http"
    calibrated: bool = False

    def __post_init__(self) -> None:
        self.base_url = check_url(self.base_url)
        if not self.model:
            raise InvalidInputError("the HTTP judge needs a model name: http:BASE_URL#MODEL")
        if self.api_key is None:
            self.api_key = os.environ.get("L2S_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")

    @property
    def key(self) -> str:
        """Endpoint and model."""
        return f"http:{self.base_url}#{self.model}"

    def _chat(self, content: str) -> str:
        url = self.base_url + "/chat/completions"
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        payload = {"model": self.model, "temperature": 0, "messages": [{"role": "user", "content": content}]}
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), 30.0))
            try:
                status, body = post_json(url, payload, headers, self.timeout)
                if status == 429 or status >= 500:
                    raise _Retryable(f"HTTP {status}")
                if status >= 400:
                    hint = " (check the API key)" if status in (401, 403) else ""
                    raise JudgeError(f"judge endpoint {url} answered HTTP {status}{hint}: {body[:200]!r}")
                data = json.loads(body)
                return str(data["choices"][0]["message"]["content"])
            except JudgeError:
                raise
            except (_Retryable, TimeoutError, OSError, http.client.HTTPException, ValueError, KeyError, IndexError,
                    TypeError) as e:
                last = e
        raise JudgeError(f"judge endpoint {url} failed {self.retries + 1} times (last: {type(last).__name__}: "
                         f"{last}); the verdicts obtained so far are saved, re-run the same command to resume")

    def judge(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Verdict]:
        """A 1-10 quality score per response (None when the reply has none)."""
        out = []
        for p, r in zip(prompts, responses):
            reply = self._chat(QUALITY_PROMPT.format(question=p, response=r))
            out.append(Verdict(quality=parse_rating(reply), raw={"reply": reply}))
        return out

    def win_rate(self, prompts: Sequence[str], ours: Sequence[str], theirs: Sequence[str]) -> dict[str, float | int]:
        """Pairwise comparison, each pair judged in both orders to cancel position bias."""
        wins = ties = losses = unparsed = 0
        for p, a, b in zip(prompts, ours, theirs):
            first = parse_pairwise(self._chat(PAIRWISE_PROMPT.format(question=p, a=a, b=b)))
            second = parse_pairwise(self._chat(PAIRWISE_PROMPT.format(question=p, a=b, b=a)))
            if first is None or second is None:
                unparsed += 1
                continue
            score = {"a": 1, "tie": 0, "b": -1}[first] - {"a": 1, "tie": 0, "b": -1}[second]
            wins += score > 0
            losses += score < 0
            ties += score == 0
        n = wins + ties + losses
        return {"win_rate": (wins + 0.5 * ties) / n if n else float("nan"), "wins": wins, "ties": ties,
                "losses": losses, "unparsed": unparsed}
