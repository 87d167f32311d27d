"""Steering metrics on vLLM's ``/metrics`` (``l2s serve``): what was asked, what was refused, what the predictors did.

Two sides, because the numbers live in two kinds of process:

* the API process counts requests per artifact and method, refusals (HTTP 400s) by reason and registry
  changes, as ``prometheus_client`` counters on the registry vLLM's ``/metrics`` serves;
* the worker (tensor-parallel rank 0; every rank computes the same vectors) sees each predicted vector: it keeps
  per-artifact gate counts and a norm histogram in memory and a daemon thread writes them every
  :data:`FLUSH_S` to ``$L2S_VLLM_METRICS_DIR/worker-<pid>.json`` (write, then rename). A collector in the API
  process reads those files at scrape time. (prometheus's own multiprocess mode would do this for every vLLM
  metric too and change how vLLM's gauges are exported; this touches only ours.)

``prometheus_client`` is imported only where counters are made (the API process): the worker side is plain JSON.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

from learn2steer.engines.requests import SteerRequest, artifact_label

FLUSH_S = 0.5
NORM_BUCKETS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, float("inf"))

#: refusal reasons (the ``reason`` label of ``l2s_refused_total``): the first whose words appear in the message
REASONS = (
    ("unknown_artifact", ("unknown steering artifact", "no longer on this server")),
    ("beam_search", ("beam search",)),
    ("inline", ("inline", "apply_steering_vectors", "steer_vector", "is not supported:")),
    ("alpha", ("alpha",)),
    ("scope", ("scope",)),
    ("strength", ("strength",)),
    ("gated", ("gated",)),
    ("chunked_prefill", ("chunked prefill",)),
    ("shape", ("hidden size", "out of range")),
    ("input_last", ("generation prompt",)),
    ("paths", ("named artifacts", "steer_path")),
    ("version", ("supports vllm", "v2 model runner")),
)


def reason_of(message: str) -> str:
    """The ``reason`` label of a refusal (``other`` when none of :data:`REASONS` matches)."""
    low = message.lower()
    for reason, words in REASONS:
        if any(w.lower() in low for w in words):
            return reason
    return "other"


class _ApiMetrics:
    """The API process's counters (made on first use, on prometheus_client's default registry)."""

    def __init__(self) -> None:
        from prometheus_client import Counter

        self.requests = Counter("l2s_requests", "Steered requests accepted, per artifact and method",
                                ["artifact", "method"])
        self.refused = Counter("l2s_refused", "Steering requests refused with an HTTP 400, per reason", ["reason"])
        self.registry = Counter("l2s_registry_changes", "Artifact registry changes (add, replace, remove)",
                                ["action"])
        self.registry_refused = Counter("l2s_registry_refused", "Artifact registry calls refused (4xx), per reason",
                                        ["reason"])


_API: _ApiMetrics | None = None
_LOCK = threading.Lock()


def enabled() -> bool:
    """Whether this server exports steering metrics (``l2s serve`` sets ``$L2S_VLLM_METRICS_DIR``)."""
    from learn2steer.engines.vllm.protocol import ENV_METRICS

    return bool(os.environ.get(ENV_METRICS))


def api() -> _ApiMetrics:
    global _API
    with _LOCK:
        if _API is None:
            _API = _ApiMetrics()
        return _API


def count_request(req: SteerRequest) -> None:
    if enabled():
        api().requests.labels(artifact_label(req.meta.source), req.meta.kind).inc()


def count_refusal(message: str) -> None:
    if enabled():
        api().refused.labels(reason_of(message)).inc()


# ---- worker side ---------------------------------------------------------------------------------------------

class WorkerStats:
    """Per-artifact gate counts and predicted-vector norms of one worker, written to a JSON file for the API."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / f"worker-{os.getpid()}.json"
        self.gate: dict[str, dict[str, int]] = {}
        self.norm: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._dirty = threading.Event()
        threading.Thread(target=self._loop, name="l2s-metrics", daemon=True).start()

    def observe(self, req: SteerRequest, norm: float) -> None:
        """One predicted vector (after the gate): ``closed`` when the gate zeroed it."""
        label = artifact_label(req.meta.source)
        with self._lock:
            g = self.gate.setdefault(label, {"open": 0, "closed": 0})
            g["open" if norm > 0 else "closed"] += 1
            h = self.norm.setdefault(label, {"buckets": [0] * len(NORM_BUCKETS), "sum": 0.0})
            h["buckets"][next(i for i, b in enumerate(NORM_BUCKETS) if norm <= b)] += 1
            h["sum"] += norm
        self._dirty.set()

    def flush(self) -> None:
        with self._lock:
            data = json.dumps({"gate": self.gate, "norm": self.norm})
            self._dirty.clear()
        fd, tmp = tempfile.mkstemp(prefix=".worker-", dir=self.path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(data)
        os.replace(tmp, self.path)

    def _loop(self) -> None:
        while True:
            self._dirty.wait()
            try:
                self.flush()
            except OSError:  # the server is shutting down (its folder is gone): metrics are best effort
                return
            threading.Event().wait(FLUSH_S)


class WorkerCollector:
    """A prometheus collector (API process) over the workers' files: ``l2s_gate_total`` and
    ``l2s_predicted_vector_norm``."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        gate: dict[tuple[str, str], int] = {}
        norm: dict[str, tuple[list[int], float]] = {}
        for f in sorted(self.folder.glob("worker-*.json")):
            try:
                data = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            for art, states in data.get("gate", {}).items():
                for state, n in states.items():
                    gate[(art, state)] = gate.get((art, state), 0) + int(n)
            for art, h in data.get("norm", {}).items():
                counts, total = norm.get(art, ([0] * len(NORM_BUCKETS), 0.0))
                norm[art] = ([a + int(b) for a, b in zip(counts, h["buckets"])], total + float(h["sum"]))
        g = CounterMetricFamily("l2s_gate", "Predicted vectors per artifact: open (added) or closed (the gate "
                                            "zeroed it)", labels=["artifact", "state"])
        for (art, state), n in sorted(gate.items()):
            g.add_metric([art, state], n)
        yield g
        h = HistogramMetricFamily("l2s_predicted_vector_norm", "L2 norm of each predicted steering vector (after "
                                                               "the gate), per artifact", labels=["artifact"])
        for art, (counts, total) in sorted(norm.items()):
            cum, buckets = 0, []
            for b, n in zip(NORM_BUCKETS, counts):
                cum += n
                buckets.append(("+Inf" if b == float("inf") else repr(b), cum))
            h.add_metric([art], buckets, total)
        yield h
