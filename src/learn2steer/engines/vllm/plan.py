"""What the vLLM plugin reads and writes in one engine step, and the steering op's body: pure torch / numpy.

Nothing here imports vLLM, so the per-step logic is tested on plain arrays (``tests/engines/
test_vllm_plan.py``) the way :mod:`~learn2steer.engines.vllm.protocol` tests the request format; the
plugin (:mod:`~learn2steer.engines.vllm.plugin`) only adapts vLLM's runner to :class:`StepBatch` and
calls :func:`build_plan`, :func:`apply` and :func:`read_pass`.

All per-request state of a worker lives in one :class:`WorkerState` (nnsight keeps per-request state on
the runner, never in loose module globals): the parsed requests, L2S vectors read from each request's
own hidden state, failed requests, and the tensors loaded for them. Everything a request brought is
freed when vLLM removes it (:meth:`WorkerState.forget`): its vector, its inline fixed vectors; only
artifact-backed tensors stay, in a bounded cache, because every later request of that artifact reuses them.
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from learn2steer.engines.requests import SteerRequest
from learn2steer.errors import InvalidInputError
from learn2steer.rules import Strength, addition, scope_selects

log = logging.getLogger("learn2steer.vllm")
ENV_TRACE = "L2S_VLLM_TRACE"  # a file: every write is logged as a JSON line (tests)
_TRACING = bool(os.environ.get(ENV_TRACE))  # read when the process starts (workers inherit the environment)
ARTIFACT_CACHE = 64  # artifact-backed vectors / predictors kept per worker (least recently used go first)
AHEAD_CACHE = 4096   # vectors read ahead of chunked prompts, kept until used (a few MB at most)


def trace(record: dict[str, Any]) -> None:
    """Append one JSON line to ``$L2S_VLLM_TRACE`` (tests compare the positions written with HF's)."""
    path = os.environ.get(ENV_TRACE)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


@dataclass
class Write:
    rows: Any                   # flat token rows of this step (np.ndarray, or a tuple in decode steps)
    positions: Any              # their absolute positions (for the trace)
    rid: str
    req: SteerRequest


#: (flat row in this step, request id, request, absolute position) of one read of a context hidden state
Read = tuple[int, str, SteerRequest, int]


@dataclass
class Plan:
    """One step's reads (layer -> rows whose stream the predictor reads) and writes (layer -> rows to steer)."""

    captures: dict[int, list[Read]] = field(default_factory=lambda: defaultdict(list))
    writes: dict[int, list[Write]] = field(default_factory=lambda: defaultdict(list))
    #: reads in a pass of their own before this step's steered pass (L' > L*, or tokens put in place)
    early: dict[int, list[Read]] = field(default_factory=lambda: defaultdict(list))
    #: (flat row, token id) put in place of the prompt's token in that pass only (an input_last read_tokens)
    put: list[tuple[int, int]] = field(default_factory=list)
    stop_after: int | None = None   # a read-only pass: stop the forward after this layer's reads
    stopped: bool = False
    ran: int = 0


@dataclass(frozen=True)
class StepBatch:
    """The runner's view of one step, as plain arrays: request ``i`` owns flat rows
    ``query_start_loc[i]:query_start_loc[i+1]``, has ``num_computed[i]`` tokens already in the cache and a
    prompt of ``num_prompt[i]`` tokens; ``extra_args(rid)`` is its ``SamplingParams.extra_args``."""

    req_ids: Sequence[str]
    query_start_loc: np.ndarray
    num_computed: np.ndarray
    num_prompt: np.ndarray
    extra_args: Callable[[str], Any]


class StopForward(Exception):
    """Raised by the op to end a read-only pass once its deepest read is done (caught by :func:`read_pass`)."""


@dataclass
class WorkerState:
    """All per-request and per-step state of one worker process, in one place.

    ``failed`` holds requests whose step would have put a non-finite value into the residual stream (a
    predictor that returned NaN, an addition that overflows the model's dtype): their rows are left
    unwritten and they are reported with the step's output, so that the scheduler finishes exactly those
    requests with an error while every other request (and the engine) goes on.
    """

    plan: Plan | None = None
    vectors: dict[str, torch.Tensor] = field(default_factory=dict)          # request id -> L2S vector (float32)
    requests: dict[str, SteerRequest | None] = field(default_factory=dict)  # request id -> steering (None: none)
    inline: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)  # request id -> its own fixed vectors
    cache: OrderedDict[tuple[str, str], Any] = field(default_factory=OrderedDict)  # artifact tensors (LRU)
    failed: dict[str, str] = field(default_factory=dict)                    # request id -> why (until removed)
    unreported: set[str] = field(default_factory=set)                       # failed, not yet told the scheduler
    layers: list[str] = field(default_factory=list)                         # the wrapped layers' module paths
    #: told of every vector a predictor produced (request, its norm): the metrics of ``l2s serve``; None: off
    observer: Callable[[SteerRequest, float], None] | None = None
    #: vectors read ahead of chunked prompts (prompt digest -> v), until the request that uses them starts (LRU)
    ahead: OrderedDict[str, torch.Tensor] = field(default_factory=OrderedDict)

    def keep_ahead(self, digest: str, v: torch.Tensor) -> None:
        self.ahead[digest] = v
        self.ahead.move_to_end(digest)
        while len(self.ahead) > AHEAD_CACHE:
            self.ahead.popitem(last=False)

    def fail(self, rid: str, why: str) -> None:
        if rid not in self.failed:
            log.error("learn2steer: request %s failed: %s", rid, why)
            self.failed[rid] = why
            self.unreported.add(rid)
            trace({"failed": rid, "why": why})
        self.vectors.pop(rid, None)

    def forget(self, rid: str) -> None:
        """vLLM removed the request: free everything it brought."""
        had = self.vectors.pop(rid, None) is not None
        self.inline.pop(rid, None)
        self.failed.pop(rid, None)
        self.unreported.discard(rid)
        if self.requests.pop(rid, None) is not None:
            trace({"freed": rid, "had_vector": had, "stored_now": len(self.vectors)})

    def stored(self) -> int:
        """Tensors held for live requests (L2S vectors and inline vectors); 0 once every request finished."""
        return len(self.vectors) + len(self.inline)

    def _cached(self, key: tuple[str, str], load: Callable[[], Any]) -> Any:
        if key in self.cache:
            self.cache.move_to_end(key)
        else:
            self.cache[key] = load()
            while len(self.cache) > ARTIFACT_CACHE:
                self.cache.popitem(last=False)
        return self.cache[key]

    def fixed(self, rid: str, req: SteerRequest, layer: int, device: torch.device) -> torch.Tensor:
        """The fixed vector ``req`` adds at ``layer``: the request's own (inline) or its artifact's."""
        if req.vectors is not None or req.layer_vectors is not None:
            own = self.inline.setdefault(rid, {})
            if layer not in own:
                values = req.vector_at(layer) if req.layer_vectors is None else dict(req.layer_vectors)[layer]
                own[layer] = torch.tensor(values, dtype=torch.float32, device=device)
            return own[layer]

        def load() -> torch.Tensor:
            from learn2steer.artifacts import SteeringArtifact

            art = SteeringArtifact.load(str(req.meta.folder))
            assert art.vector is not None
            return art.vector[layer].float().to(device)

        out: torch.Tensor = self._cached((f"{req.key}@{layer}", str(device)), load)
        return out

    def predictor(self, req: SteerRequest, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
        def load() -> Callable[[torch.Tensor], torch.Tensor]:
            from learn2steer.artifacts import SteeringArtifact

            return SteeringArtifact.load(str(req.meta.folder)).predict_fn(gated=req.gated).to(device).eval()

        fn: Callable[[torch.Tensor], torch.Tensor] = self._cached((f"{req.key}#{req.gated}", str(device)), load)
        return fn


def build_plan(state: WorkerState, batch: StepBatch,
               parse: Callable[[Any], SteerRequest | None]) -> Plan | None:
    """What to read and write in this step (None when nothing is steered).

    ``parse`` turns a request's ``extra_args`` into its steering (the process's artifact registry); it
    runs once per request, the result is kept in ``state`` until the request is forgotten.
    """
    n = len(batch.req_ids)
    if n == 0:
        return None
    qsl = batch.query_start_loc
    plan: Plan | None = None
    for i, rid in enumerate(batch.req_ids):
        if rid not in state.requests:
            try:
                state.requests[rid] = parse(batch.extra_args(rid))
            except InvalidInputError as e:  # the API process checked it; a differing worker setting fails it here
                state.requests[rid] = None
                state.fail(rid, str(e))
        req = state.requests[rid]
        if req is None or req.alpha == 0.0 or rid in state.failed:
            continue
        if req.mode == "ahead" and rid not in state.vectors:  # chunked prefill: v was read by an earlier request
            v = state.ahead.get(req.digest)
            if v is None:
                state.fail(rid, "the L2S vector read ahead of its chunked prompt is no longer held; send it again")
                continue
            state.vectors[rid] = v
        start = int(qsl[i])
        count = int(qsl[i + 1]) - start
        if count <= 0:
            continue
        plan = plan or Plan()
        computed, prompt_len = int(batch.num_computed[i]), int(batch.num_prompt[i])
        if count == 1:  # a decode step (the common case): plain integers, no arrays
            any_sel = bool(scope_selects(req.scope, computed, prompt_len))
            write = Write((start,) if any_sel else (), (computed,) if any_sel else (), rid, req)
        else:
            pos = np.arange(computed, computed + count, dtype=np.int64)
            sel = scope_selects(req.scope, pos, prompt_len)
            any_sel = bool(sel.any())
            write = Write(start + np.flatnonzero(sel), pos[sel], rid, req)
        if req.mode == "read":  # the read-ahead request reads v and writes nothing
            any_sel = False
        if req.meta.reads_context:
            assert req.meta.context_layer is not None
            row = req.read_row(prompt_len)
            first = row - len(req.read_tokens) + 1  # the read_tokens' first position (row itself when none)
            if rid not in state.vectors and computed <= row < computed + count:
                if first < computed:
                    state.fail(rid, "its input_last read puts tokens in place at positions another step computed "
                                    "(a prompt split across steps); start the engine with chunked prefill off")
                    continue
                reads = plan.early if req.reads_in_own_pass and req.mode != "read" else plan.captures
                reads[req.meta.context_layer].append((start + row - computed, rid, req, row))
                plan.put += [(start + first + k - computed, t) for k, t in enumerate(req.read_tokens)]
            elif rid not in state.vectors and any_sel:
                state.fail(rid, "steering positions before its last prompt token was read (a prompt split across "
                                "steps with a prompt scope); the request checks should have refused this")
                continue
        if any_sel:
            for layer in req.meta.steer_layers:
                plan.writes[layer].append(write)
    return plan


class Sum:
    """``hidden + residual`` without materialising it: only the captured rows are ever summed."""

    def __init__(self, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        self.hidden, self.residual = hidden, residual

    def index_select(self, dim: int, rows: torch.Tensor) -> torch.Tensor:
        return self.hidden.index_select(dim, rows) + self.residual.index_select(dim, rows)


def apply(state: WorkerState, stream: Any, residual: torch.Tensor, layer: int) -> None:
    """The op's body: ``stream`` is the residual stream after ``layer`` (a tensor, or a lazy :class:`Sum`),
    ``residual`` the tensor that carries it into the next layer. Reads L2S captures, then adds alpha * v
    to the planned rows.

    Nothing non-finite is ever written: the residual rows (and through them the KV cache, whose blocks
    other requests share) would carry it into every later step. A request whose addition is not finite
    (a predictor that returned NaN, an alpha * v that overflows the model's dtype) is failed alone.
    """
    plan = state.plan
    if plan is None or layer < 0:
        return
    plan.ran += 1
    caps = [c for c in plan.captures.get(layer, ()) if c[1] not in state.failed]
    if caps:
        rows = torch.tensor([c[0] for c in caps], device=residual.device)
        h = stream.index_select(0, rows).float()
        groups: dict[tuple[str, bool], list[int]] = defaultdict(list)  # one predictor call per artifact
        for j, (_, _, req, _) in enumerate(caps):
            groups[(req.key, req.gated)].append(j)
        for idx in groups.values():
            pred = state.predictor(caps[idx[0]][2], residual.device)(h[idx]).detach()
            finite = torch.isfinite(pred).all(dim=-1).tolist()
            norms = pred.float().norm(dim=-1).tolist() if state.observer is not None else None
            for k, j in enumerate(idx):
                if finite[k]:
                    state.vectors[caps[j][1]] = pred[k]
                    if caps[j][2].mode == "read":
                        state.keep_ahead(caps[j][2].digest, pred[k])
                    if norms is not None and state.observer is not None:
                        state.observer(caps[j][2], norms[k])
                    if _TRACING:
                        trace({"read": caps[j][1], "layer": layer, "position": caps[j][3]})
                else:
                    state.fail(caps[j][1], f"the L2S predictor produced NaN or inf at layer {layer}")
    if plan.stop_after == layer:
        plan.stopped = True
        raise StopForward()
    writes, vectors = [], []
    for w in plan.writes.get(layer, ()):
        if w.rid in state.failed:
            continue
        v: torch.Tensor | None = (state.vectors.get(w.rid) if w.req.meta.reads_context
                                  else state.fixed(w.rid, w.req, layer, residual.device))
        if v is None:  # not reachable by construction (build_plan); never a reason to stop the engine
            state.fail(w.rid, f"its L2S vector is unknown at layer {layer}")
            continue
        writes.append(w)
        vectors.append(v)
    if not writes:
        return
    # one addition for the whole step: each write's alpha * v, repeated over its rows
    alphas = torch.tensor([w.req.alpha for w in writes], device=residual.device)
    counts = torch.tensor([len(w.rows) for w in writes], device=residual.device)
    delta = (alphas[:, None] * torch.stack(vectors)).repeat_interleave(counts, dim=0)
    rows = torch.from_numpy(np.concatenate([np.asarray(w.rows, dtype=np.int64) for w in writes])).to(residual.device)
    # norm-relative: the same function as the HF engine
    if any(w.req.strength != Strength.ABSOLUTE.value for w in writes):
        start = 0
        for w, v, n in zip(writes, vectors, counts.tolist()):
            if w.req.strength != Strength.ABSOLUTE.value:
                base = stream.index_select(0, rows[start:start + n]).float()
                delta[start:start + n] = addition(v.expand(n, -1), base, w.req.alpha, w.req.strength)
            start += n
    new = residual.index_select(0, rows) + delta.to(residual.dtype)
    ok = torch.isfinite(new).all(dim=-1)
    if not bool(ok.all()):  # rare: find the requests, fail them, write the others
        bad = set(torch.repeat_interleave(torch.arange(len(writes), device=ok.device), counts)[~ok].tolist())
        for j in sorted(bad):
            state.fail(writes[j].rid, f"alpha * v at layer {layer} is not finite in {residual.dtype}; ask for a "
                                      "smaller alpha")
        rows, new = rows[ok], new[ok]
        writes = [w for j, w in enumerate(writes) if j not in bad]
    residual.index_copy_(0, rows, new)
    if _TRACING:
        for w in writes:
            trace({"request": w.rid, "layer": layer, "positions": [int(x) for x in w.positions],
                   "alpha": w.req.alpha, "source": w.req.key})


def put_tokens(put: Sequence[tuple[int, int]], kwargs: dict[str, Any],
               embed: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
    """Put token ``t`` at flat row ``r`` for each ``(r, t)`` of ``put`` into a read pass's (copied) inputs: the
    ids, and the embeddings when the model takes those (multimodal models: ``embed`` is the model's
    ``embed_input_ids``)."""
    if not put:
        return
    ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    if ids is None and embeds is None:
        raise RuntimeError("learn2steer: a read pass must put tokens in place but the forward got neither "
                           "input_ids nor inputs_embeds")
    rows = torch.tensor([r for r, _ in put], dtype=torch.long)
    toks = torch.tensor([t for _, t in put], dtype=torch.long)
    if ids is not None:
        ids[rows.to(ids.device)] = toks.to(ids.device, ids.dtype)
    if embeds is not None:
        if embed is None:
            raise RuntimeError("learn2steer: a read pass must embed the tokens it puts in place but has no "
                               "embedding function")
        embeds[rows.to(embeds.device)] = embed(toks.to(embeds.device)).to(embeds.dtype)


def read_pass(state: WorkerState, plan: Plan, forward: Callable[..., Any], args: Sequence[Any],
              kwargs: dict[str, Any], embed: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """Read the early requests' hidden states (L' > L*, or an ``input_last`` read with tokens put in place:
    :func:`put_tokens`) in a forward of this step without any write, stopped after the deepest read.

    It writes this step's KV slots unsteered up to there; the steered pass that follows overwrites the
    same slots, so nothing of it remains. The step's input tensors are the runner's persistent buffers
    and a layer may update its residual input in place (vLLM's fused add + RMSNorm kernel does on GPUs;
    a multimodal model's first residual IS the ``inputs_embeds`` buffer): the read pass gets copies of
    them, so the steered pass starts from exactly the inputs it would have had without a read pass.
    """
    def copy(x: Any) -> Any:
        return x.clone() if isinstance(x, torch.Tensor) else x

    first = Plan(captures=plan.early, stop_after=max(plan.early))
    kw = {k: copy(v) for k, v in kwargs.items()}
    put_tokens(plan.put, kw, embed)
    state.plan = first
    try:
        forward(*[copy(a) for a in args], **kw)
    except Exception:
        if not first.stopped:
            raise
    finally:
        state.plan = None
    if not first.stopped:
        raise RuntimeError("learn2steer: the read pass of an L' > L* request ended without reaching its layer")
