"""A flaky OpenAI-compatible judge on 127.0.0.1: 500s, malformed JSON, a slow drip, a bad key, and resumption."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from learn2steer.errors import JudgeError
from learn2steer.evaluation.judges import CachedJudge, HTTPJudge, make_judge


class Flaky(BaseHTTPRequestHandler):
    """Replies according to ``Flaky.script`` (one entry per request; 'ok' when the script runs out)."""

    script: list[str] = []
    seen: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Flaky.seen.append({"body": body, "auth": self.headers.get("Authorization")})
        action = Flaky.script.pop(0) if Flaky.script else "ok"
        if action == "500":
            self.send_response(500)
            self.end_headers()
            return
        if action == "401":
            self.send_response(401)
            self.end_headers()
            self.wfile.write(b'{"error": "bad key"}')
            return
        payload = json.dumps({"choices": [{"message": {"content": "Rating: [[7]]"}}]}).encode()
        if action == "garbage":
            payload = b"<html>oops"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        if action == "drip":
            for byte in payload:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.3)
            return
        self.wfile.write(payload)

    def log_message(self, *a: object) -> None:
        pass


@pytest.fixture()
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    Flaky.script, Flaky.seen = [], []
    yield f"http://127.0.0.1:{srv.server_port}/v1"
    srv.shutdown()


def test_retries_with_backoff_then_succeeds(server) -> None:
    Flaky.script = ["500", "garbage", "500"]
    judge = HTTPJudge(server, "m", retries=4, backoff=0.01, api_key="sk-test")
    assert [v.quality for v in judge.judge(["q"], ["r"])] == [7.0]
    assert len(Flaky.seen) == 4 and Flaky.seen[-1]["auth"] == "Bearer sk-test"


def test_a_slow_drip_cannot_hold_the_run(server) -> None:
    Flaky.script = ["drip", "drip", "drip"]
    judge = HTTPJudge(server, "m", timeout=1.0, retries=2, backoff=0.01)
    t = time.monotonic()
    with pytest.raises(JudgeError, match="failed 3 times .*TimeoutError.*re-run the same command to resume"):
        judge.judge(["q"], ["r"])
    assert time.monotonic() - t < 3 * 1.0 + 2, "each attempt is bounded by the overall timeout"


def test_a_bad_key_fails_at_once(server) -> None:
    Flaky.script = ["401"]
    with pytest.raises(JudgeError, match="HTTP 401 \\(check the API key\\)"):
        HTTPJudge(server, "m", retries=5, backoff=0.01).judge(["q"], ["r"])
    assert len(Flaky.seen) == 1, "not retried"


def test_verdicts_obtained_before_a_failure_are_kept(server, tmp_path) -> None:
    Flaky.script = ["ok", "ok", "500", "500"]
    cache = tmp_path / "verdicts.jsonl"
    judge = CachedJudge(HTTPJudge(server, "m", retries=1, backoff=0.01), cache, chunk=1)
    with pytest.raises(JudgeError):
        judge.judge(["a", "b", "c", "d"], ["1", "2", "3", "4"])
    assert len(cache.read_text().splitlines()) == 2
    Flaky.seen = []
    again = CachedJudge(HTTPJudge(server, "m", retries=1, backoff=0.01), cache, chunk=1)
    assert [v.quality for v in again.judge(["a", "b", "c", "d"], ["1", "2", "3", "4"])] == [7.0] * 4
    assert len(Flaky.seen) == 2, "only the two missing verdicts were asked for"


def test_the_url_form_is_checked_before_generating(server) -> None:
    from learn2steer.errors import InvalidInputError

    assert make_judge(f"http:{server}#m").key == make_judge(f"{server}#m").key
    with pytest.raises(InvalidInputError, match="model name"):
        make_judge(server)
