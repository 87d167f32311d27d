"""learn2steer's vLLM plugin: per-request fixed and input-dependent (L2S) steering inside vLLM.

Registered through the ``vllm.general_plugins`` entry point, so vLLM calls :func:`register` in every
process (API server, engine core, workers) before the model is built; no fork. It patches:

* the model runner's ``load_model``: once the model is loaded (before anything is compiled), the
  language model's decoder layers are found by structure (:func:`decoder_layers`: the ``ModuleList`` of
  the text config's layer count, also inside multimodal wrappers), not by class, so any decoder
  architecture is steered and a subclass that overrides ``forward`` (Mistral) is not missed. Each layer
  *instance* gets a forward that runs an opaque custom op after the layer's own: ``l2s_vllm::steer_`` on
  ``(hidden_states, residual)`` (their sum is the residual stream, what Hugging Face calls the layer's
  output) or ``l2s_vllm::steer_single_`` on layers that return the residual stream itself. The op reads
  the stream at L' for requests whose last prompt token is in this step (L2S: ``v = g(h)``, stored per
  request) and adds ``alpha * v`` at L* to exactly the positions each request's scope selects. Being
  opaque, the op runs under ``torch.compile`` as well as eagerly (a Python hook would be traced once and
  then silently skipped);
* ``GPUModelRunner._model_forward`` (the CPU runner inherits it): before each forward, the per-token
  plan is built from the runner's input batch (request order, tokens already computed, prompt
  lengths, each request's ``extra_args``). Positions are absolute, so chunked prefill, preemption
  (recomputed positions) and decode steps all steer the same positions as one Hugging Face pass;
* ``_on_request_state_removed``: a finished request's stored vector is freed;
* ``sample_tokens`` / ``execute_model`` and ``Scheduler.update_from_output``: a request whose addition
  would not be finite is failed alone (vLLM's error finish), never written, never the engine's death;
* ``Request.from_engine_core_request`` (engine core): the prefix-cache salt of steered requests;
* ``InputProcessor._validate_params`` and the OpenAI requests' ``to_beam_search_params`` (API process):
  a bad request is an HTTP 400, never an engine crash or an unsteered answer.

If a steered step ever finishes without the op having run (a graph compiled without the plugin, a
replayed CUDA graph), the step fails loudly instead of returning unsteered text. On CUDA the plugin
forces eager mode: CUDA graphs would replay the op's kernels without its Python plan (not testable on
the machines this was built on).
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, cast

import numpy as np
import torch

from learn2steer.engines.vllm.protocol import (
    ENV_ALLOW_PATHS,
    ENV_ARTIFACTS,
    KEYS,
    READ_BACK,
    EngineLimits,
    Registry,
    SteerRequest,
    check_request,
)
from learn2steer.errors import InvalidInputError
from learn2steer.steering import addition, scope_selects

log = logging.getLogger("learn2steer.vllm")
SUPPORTED_VLLM = ("0.32.",)
ENV_TRACE = "L2S_VLLM_TRACE"  # a file: every write is logged as a JSON line (tests)
_TRACING = bool(os.environ.get(ENV_TRACE))  # read when the process starts (workers inherit the environment)

_STATE: dict[str, Any] = {"registered": False, "supported": False, "registry": None}


def registry() -> Registry:
    """This process's artifact registry (built from the environment on first use)."""
    if _STATE["registry"] is None:
        _STATE["registry"] = Registry()
    reg: Registry = _STATE["registry"]
    return reg


def _has_steering(extra: Any) -> bool:
    return isinstance(extra, dict) and any(k in extra for k in KEYS)


def steering_enabled() -> bool:
    """Whether this process may receive steering requests (named artifacts, or the offline engine's paths)."""
    raw = os.environ.get(ENV_ARTIFACTS, "")
    return os.environ.get(ENV_ALLOW_PATHS) == "1" or raw not in ("", "{}")


# ---- the per-step plan (worker) --------------------------------------------------------------------------

@dataclass
class _Write:
    rows: Any                   # flat token rows of this step (np.ndarray, or a tuple in decode steps)
    positions: Any              # their absolute positions (for the trace)
    rid: str
    req: SteerRequest


@dataclass
class _Plan:
    # layer -> (flat row in this step, request id, request, absolute position) of each L2S read
    captures: dict[int, list[tuple[int, str, SteerRequest, int]]] = field(default_factory=lambda: defaultdict(list))
    writes: dict[int, list[_Write]] = field(default_factory=lambda: defaultdict(list))
    #: reads of L2S requests with L' > L* (read in a pass of their own before this step's steered pass)
    early: dict[int, list[tuple[int, str, SteerRequest, int]]] = field(default_factory=lambda: defaultdict(list))
    stop_after: int | None = None   # a read-only pass: stop the forward after this layer's reads
    stopped: bool = False
    ran: int = 0


class _StopForward(Exception):
    """Raised by the op to end a read-only pass once its deepest read is done (caught by the runner patch)."""


@dataclass
class _Worker:
    """All per-request and per-step state of one worker process, in one place.

    ``failed`` holds requests whose step would have put a non-finite value into the residual stream (a
    predictor that returned NaN, an addition that overflows the model's dtype): their rows are left
    unwritten and they are reported with the step's output, so that the scheduler finishes exactly those
    requests with an error while every other request (and the engine) goes on.
    """

    plan: _Plan | None = None
    vectors: dict[str, torch.Tensor] = field(default_factory=dict)          # request id -> L2S vector (float32)
    requests: dict[str, SteerRequest | None] = field(default_factory=dict)  # request id -> steering (None: none)
    cache: dict[tuple[str, Any], Any] = field(default_factory=dict)          # vectors / predictors per (source, dev)
    failed: dict[str, str] = field(default_factory=dict)                    # request id -> why (until removed)
    unreported: set[str] = field(default_factory=set)                       # failed, not yet told the scheduler
    layers: list[str] = field(default_factory=list)                         # the wrapped layers' module paths

    def fail(self, rid: str, why: str) -> None:
        if rid not in self.failed:
            log.error("learn2steer: request %s failed: %s", rid, why)
            self.failed[rid] = why
            self.unreported.add(rid)
            _trace({"failed": rid, "why": why})
        self.vectors.pop(rid, None)


_W = _Worker()
_REQUESTS, _VECTORS = _W.requests, _W.vectors  # aliases (benchmarks/vllm_plan_probe.py)


def stored_vectors() -> int:
    """How many requests' L2S vectors this worker holds (freed when requests finish)."""
    return len(_W.vectors)


def _fixed(req: SteerRequest, layer: int, device: torch.device) -> torch.Tensor:
    key = (f"{req.key}@{layer}", str(device))
    if key not in _W.cache:
        if req.vector is not None:
            v = torch.tensor(req.vector, dtype=torch.float32)
        else:
            from learn2steer.artifacts import SteeringArtifact

            art = SteeringArtifact.load(str(req.meta.folder))
            assert art.vector is not None
            v = art.vector[layer].float()
        _W.cache[key] = v.to(device)
    out: torch.Tensor = _W.cache[key]
    return out


def _predictor(req: SteerRequest, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    key = (f"{req.key}#{req.gated}", str(device))
    if key not in _W.cache:
        from learn2steer.artifacts import SteeringArtifact

        art = SteeringArtifact.load(str(req.meta.folder))
        _W.cache[key] = art.predict_fn(gated=req.gated).to(device).eval()
    fn: Callable[[torch.Tensor], torch.Tensor] = _W.cache[key]
    return fn


def build_plan(runner: Any) -> _Plan | None:
    """What to read and write in this step, from the runner's input batch (None when nothing is steered)."""
    ib = runner.input_batch
    n = int(ib.num_reqs)
    if n == 0:
        return None
    qsl = runner.query_start_loc.np
    computed_all, prompt_all = ib.num_computed_tokens_cpu, ib.num_prompt_tokens
    plan: _Plan | None = None
    for i, rid in enumerate(ib.req_ids[:n]):
        if rid not in _W.requests:
            state = runner.requests.get(rid)
            sp = getattr(state, "sampling_params", None)
            extra = getattr(sp, "extra_args", None) if sp is not None else None
            try:
                _W.requests[rid] = registry().parse(extra) if _has_steering(extra) else None
            except InvalidInputError as e:  # the API process checked it; a differing worker setting fails it here
                _W.requests[rid] = None
                _W.fail(rid, str(e))
        req = _W.requests[rid]
        if req is None or req.alpha == 0.0 or rid in _W.failed:
            continue
        start = int(qsl[i])
        count = int(qsl[i + 1]) - start
        if count <= 0:
            continue
        plan = plan or _Plan()
        computed, prompt_len = int(computed_all[i]), int(prompt_all[i])
        if count == 1:  # a decode step (the common case): plain integers, no arrays
            any_sel = bool(scope_selects(req.scope, computed, prompt_len))
            write = _Write((start,) if any_sel else (), (computed,) if any_sel else (), rid, req)
        else:
            pos = np.arange(computed, computed + count, dtype=np.int64)
            sel = scope_selects(req.scope, pos, prompt_len)
            any_sel = bool(sel.any())
            write = _Write(start + np.flatnonzero(sel), pos[sel], rid, req)
        if req.meta.reads_context:
            assert req.meta.context_layer is not None
            row = req.read_row(prompt_len)
            if rid not in _W.vectors and computed <= row < computed + count:
                reads = plan.early if req.reads_after_writing else plan.captures
                reads[req.meta.context_layer].append((start + row - computed, rid, req, row))
            elif rid not in _W.vectors and any_sel:
                _W.fail(rid, "steering positions before its last prompt token was read (a prompt split across "
                        "steps with a prompt scope); the request checks should have refused this")
                continue
        if any_sel:
            for layer in req.meta.steer_layers:
                plan.writes[layer].append(write)
    return plan


def _trace(record: dict[str, Any]) -> None:
    path = os.environ.get(ENV_TRACE)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _apply(read: Any, residual: torch.Tensor, layer: int) -> None:
    """The op's body: ``read`` is the residual stream after ``layer`` (computed lazily), ``residual`` the tensor
    that carries it into the next layer. Reads L2S captures, then adds alpha * v to the planned rows.

    Nothing non-finite is ever written: the residual rows (and through them the KV cache, whose blocks
    other requests share) would carry it into every later step. A request whose addition is not finite
    (a predictor that returned NaN, an alpha * v that overflows the model's dtype) is failed alone.
    """
    plan = _W.plan
    if plan is None or layer < 0:
        return
    plan.ran += 1
    caps = [c for c in plan.captures.get(layer, ()) if c[1] not in _W.failed]
    if caps:
        rows = torch.tensor([c[0] for c in caps], device=residual.device)
        h = read.index_select(0, rows).float()
        groups: dict[tuple[str, bool], list[int]] = defaultdict(list)  # one predictor call per artifact
        for j, (_, _, req, _) in enumerate(caps):
            groups[(req.key, req.gated)].append(j)
        for idx in groups.values():
            pred = _predictor(caps[idx[0]][2], residual.device)(h[idx]).detach()
            finite = torch.isfinite(pred).all(dim=-1).tolist()
            for k, j in enumerate(idx):
                if finite[k]:
                    _W.vectors[caps[j][1]] = pred[k]
                    if _TRACING:
                        _trace({"read": caps[j][1], "layer": layer, "position": caps[j][3]})
                else:
                    _W.fail(caps[j][1], f"the L2S predictor produced NaN or inf at layer {layer}")
    if plan.stop_after == layer:
        plan.stopped = True
        raise _StopForward()
    writes, vectors = [], []
    for w in plan.writes.get(layer, ()):
        if w.rid in _W.failed:
            continue
        v: torch.Tensor | None = (_W.vectors.get(w.rid) if w.req.meta.reads_context
                                  else _fixed(w.req, layer, residual.device))
        if v is None:  # not reachable by construction (build_plan); never a reason to stop the engine
            _W.fail(w.rid, f"its L2S vector is unknown at layer {layer}")
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
    if any(w.req.strength != "absolute" for w in writes):  # norm-relative: the same function as the HF engine
        start = 0
        for w, v, n in zip(writes, vectors, counts.tolist()):
            if w.req.strength != "absolute":
                stream = read.index_select(0, rows[start:start + n]).float()
                delta[start:start + n] = addition(v.expand(n, -1), stream, w.req.alpha, w.req.strength)
            start += n
    new = residual.index_select(0, rows) + delta.to(residual.dtype)
    ok = torch.isfinite(new).all(dim=-1)
    if not bool(ok.all()):  # rare: find the requests, fail them, write the others
        bad = set(torch.repeat_interleave(torch.arange(len(writes), device=ok.device), counts)[~ok].tolist())
        for j in sorted(bad):
            _W.fail(writes[j].rid, f"alpha * v at layer {layer} is not finite in {residual.dtype}; ask for a "
                                   "smaller alpha")
        rows, new = rows[ok], new[ok]
        writes = [w for j, w in enumerate(writes) if j not in bad]
    residual.index_copy_(0, rows, new)
    if _TRACING:
        for w in writes:
            _trace({"request": w.rid, "layer": layer, "positions": [int(x) for x in w.positions],
                    "alpha": w.req.alpha, "source": w.req.key})


def _steer_impl(hidden: torch.Tensor, residual: torch.Tensor, layer: int) -> None:
    """The op for layers that return ``(hidden_states, residual)``: their sum is the residual stream."""
    if _W.plan is None:
        return
    _apply(_Sum(hidden, residual), residual, layer)


def _steer_single_impl(x: torch.Tensor, layer: int) -> None:
    """The op for layers that return the residual stream itself (Granite, OPT, ...)."""
    if _W.plan is None:
        return
    _apply(x, x, layer)


class _Sum:
    """``hidden + residual`` without materialising it: only the captured rows are ever summed."""

    def __init__(self, hidden: torch.Tensor, residual: torch.Tensor) -> None:
        self.hidden, self.residual = hidden, residual

    def index_select(self, dim: int, rows: torch.Tensor) -> torch.Tensor:
        return self.hidden.index_select(dim, rows) + self.residual.index_select(dim, rows)


def _steer_fake(hidden: torch.Tensor, residual: torch.Tensor, layer: int) -> None:
    return None


def _steer_single_fake(x: torch.Tensor, layer: int) -> None:
    return None


# ---- finding the decoder layers (worker, after the model is loaded) ------------------------------------------

_NOT_LANGUAGE = ("vision", "visual", "vit", "image", "audio", "encoder", "projector", "mm_", "tower")


def decoder_layers(model: Any, num_layers: int) -> list[tuple[str, Any]]:
    """The language model's decoder layers, found by structure rather than by class.

    vLLM models keep them in a ``ModuleList`` (``model.layers``; inside multimodal wrappers
    ``language_model.model.layers``), one entry per layer of the text config. Towers of other modalities
    have their own lists, recognised by name. Pipeline stages hold placeholders for others' layers.
    """
    found = []
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.ModuleList) or len(mod) != num_layers or not name.endswith("layers"):
            continue
        if any(word in part for part in name.lower().split(".") for word in _NOT_LANGUAGE):
            continue
        found.append((name, mod))
    if not found:
        return []
    found.sort(key=lambda item: ("language_model" not in item[0], item[0].count(".")))
    name, layers = found[0]
    return [(f"{name}.{i}", layer) for i, layer in enumerate(layers) if type(layer).__name__ != "PPMissingLayer"]


def _wrap_layer(layer: Any, index: int, path: str) -> None:
    """Run the steering op after this layer instance's own forward, whatever its class."""
    if getattr(layer, "_l2s_wrapped", False):
        return
    orig = layer.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        out = orig(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            torch.ops.l2s_vllm.steer_single_(out, index)
        elif (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.Tensor)
              and isinstance(out[1], torch.Tensor) and out[0].shape == out[1].shape):
            torch.ops.l2s_vllm.steer_(out[0], out[1], index)
        else:
            raise InvalidInputError(f"learn2steer cannot steer {type(layer).__name__} ({path}): its forward returns "
                                    "neither the residual stream nor (hidden_states, residual)")
        return out

    layer.forward = forward
    layer._l2s_wrapped = True


def attach(runner: Any) -> int:
    """Wrap the loaded model's decoder layers; how many were wrapped (0: this model cannot be steered)."""
    model = runner.get_model() if hasattr(runner, "get_model") else runner.model
    text = _text_config(runner.vllm_config.model_config)
    layers = decoder_layers(model, int(text.num_hidden_layers))
    for path, layer in layers:
        _wrap_layer(layer, int(path.rsplit(".", 1)[1]), path)
    _W.layers = [p for p, _ in layers]
    if not layers and steering_enabled():
        raise InvalidInputError(f"learn2steer found no decoder layers in {type(model).__name__} (no ModuleList of "
                                f"{text.num_hidden_layers} layers); this model cannot be steered with vLLM, use the "
                                "HF engine")
    if not layers:
        log.warning("learn2steer: no decoder layers found in %s; steering requests will fail", type(model).__name__)
    return len(layers)


# ---- registration ------------------------------------------------------------------------------------------


def _text_config(mc: Any) -> Any:
    return getattr(mc, "hf_text_config", None) or mc.hf_config


def _limits(vllm_config: Any) -> EngineLimits:
    mc = vllm_config.model_config
    text = _text_config(mc)
    return EngineLimits(hidden_size=int(text.hidden_size), num_layers=int(text.num_hidden_layers),
                        chunked_prefill=bool(vllm_config.scheduler_config.enable_chunked_prefill),
                        pipeline_parallel=int(vllm_config.parallel_config.pipeline_parallel_size),
                        model_runner_v2=bool(getattr(vllm_config, "use_v2_model_runner", False)))


BEAM_SEARCH = ("steering does not apply to beam search (vLLM runs each beam as a separate request without "
               "vllm_xargs); use sampling or greedy decoding with steering")


def _patch_front_end(version: str) -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.input_processor import InputProcessor

    orig = InputProcessor._validate_params

    def _validate_params(self: Any, params: Any, supported_tasks: Any) -> Any:
        out = orig(self, params, supported_tasks)
        extra = getattr(params, "extra_args", None)
        if _has_steering(extra):
            try:
                if not _STATE["supported"]:
                    raise InvalidInputError(f"learn2steer's vLLM plugin supports vLLM 0.32.x; this is {version}")
                req = registry().parse(extra)
                assert req is not None
                check_request(req, _limits(self.vllm_config))
            except InvalidInputError as e:
                raise VLLMValidationError(str(e), parameter="vllm_xargs") from None
        return out

    InputProcessor._validate_params = _validate_params
    orig_process = InputProcessor.process_inputs

    def process_inputs(self: Any, *args: Any, **kwargs: Any) -> Any:
        ecr = orig_process(self, *args, **kwargs)
        sp = getattr(ecr, "sampling_params", None)
        extra = getattr(sp, "extra_args", None) if sp is not None else None
        if _has_steering(extra) and _STATE["supported"]:
            try:
                _prepare_read(self, ecr, sp, cast(dict, extra))
            except InvalidInputError as e:
                raise VLLMValidationError(str(e), parameter="vllm_xargs") from None
        return ecr

    InputProcessor.process_inputs = process_inputs
    _patch_beam_search(VLLMValidationError)


def generation_prompt_ids(tokenizer: Any) -> list[int]:
    """The token ids the chat template appends as generation prompt (``<|im_start|>assistant\\n``, ...).

    Found by rendering one user turn with and without it; the difference must be a textual suffix.
    """
    msgs = [{"role": "user", "content": "Hello"}]
    try:
        bare = tokenizer.apply_chat_template(msgs, add_generation_prompt=False, tokenize=False)
        full = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # no chat template, or one that refuses a lone user turn
        raise InvalidInputError(f"the 'input_last' read needs the model's chat template, which failed: {e}") from None
    if not isinstance(bare, str) or not isinstance(full, str) or not full.startswith(bare) or full == bare:
        raise InvalidInputError("the model's chat template does not append a generation prompt to the user turn; "
                                "the 'input_last' read position cannot be located (use the HF engine)")
    return list(tokenizer.encode(full[len(bare):], add_special_tokens=False))


def _prepare_read(processor: Any, ecr: Any, sp: Any, extra: dict[str, Any]) -> None:
    """Where an L2S request reads, and whether it may read the prefix cache (API process, per request).

    ``input_last`` reads the last token before the generation prompt: the prompt must end with the
    template's generation prompt, whose length is passed on as ``l2s_read_back``. An L' > L* request
    reads layers above the ones it writes, so it must compute its whole prompt: cached blocks of an
    identical request hold steered keys and values there.
    """
    extra.pop(READ_BACK, None)  # only ever set here
    req = registry().parse(extra)
    if req is None or not req.meta.reads_context:
        return
    if req.meta.context_read == "input_last":
        if "gen_prompt" not in _STATE:
            tok = processor.tokenizer
            if tok is None:
                raise InvalidInputError("the 'input_last' read needs the tokenizer; start vLLM without "
                                        "skip_tokenizer_init")
            _STATE["gen_prompt"] = generation_prompt_ids(tok)
        suffix: list[int] = _STATE["gen_prompt"]
        ids = list(ecr.prompt_token_ids or [])
        if len(ids) <= len(suffix) or ids[-len(suffix):] != suffix:
            raise InvalidInputError("this L2S artifact reads the last input token before the generation prompt, "
                                    "but the prompt does not end with the chat template's generation prompt; send "
                                    "a chat request (or a prompt rendered with add_generation_prompt=True)")
        extra[READ_BACK] = len(suffix)
    if req.reads_after_writing:
        sp.skip_reading_prefix_cache = True


def _patch_beam_search(error: Any) -> None:
    """Beam search turns a request into per-beam requests that drop ``vllm_xargs``: refuse, never run unsteered."""
    classes = []
    for module, name in (("vllm.entrypoints.openai.chat_completion.protocol", "ChatCompletionRequest"),
                         ("vllm.entrypoints.openai.completion.protocol", "CompletionRequest")):
        try:
            classes.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            log.warning("learn2steer: %s.%s not found; beam search with steering is not refused", module, name)
    for cls in classes:
        orig = cls.to_beam_search_params

        def to_beam_search_params(self: Any, *args: Any, _orig: Any = orig, **kwargs: Any) -> Any:
            if _has_steering(getattr(self, "vllm_xargs", None)):
                raise error(BEAM_SEARCH, parameter="use_beam_search")
            return _orig(self, *args, **kwargs)

        cls.to_beam_search_params = to_beam_search_params


def _patch_engine_core() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.request import Request

    orig = Request.from_engine_core_request.__func__

    def from_engine_core_request(cls: Any, request: Any, block_hasher: Any) -> Any:
        sp = request.sampling_params
        extra = getattr(sp, "extra_args", None) if sp is not None else None
        if _has_steering(extra):
            req = registry().parse(extra)
            assert req is not None
            mm = [str(getattr(f, "identifier", "")) for f in (getattr(request, "mm_features", None) or [])]
            salt = req.salt(list(request.prompt_token_ids or []), mm)
            request.cache_salt = salt if request.cache_salt is None else f"{request.cache_salt}|{salt}"
        return orig(cls, request, block_hasher)

    Request.from_engine_core_request = classmethod(from_engine_core_request)

    orig_update = Scheduler.update_from_output

    def update_from_output(self: Any, scheduler_output: Any, model_runner_output: Any) -> Any:
        failed = getattr(model_runner_output, "l2s_failed", None)
        if failed:  # vLLM's own path for requests that cannot go on: finished with an error, the rest continue
            self.encoder_cache_mismatch_reqs.update(failed)
        return orig_update(self, scheduler_output, model_runner_output)

    Scheduler.update_from_output = update_from_output


def _report_failed(output: Any) -> Any:
    """Attach this worker's newly failed requests to a step's output (read by the scheduler's patch)."""
    if _W.unreported and output is not None:
        target = getattr(output, "_model_runner_output", output)  # the async wrapper holds the real output
        target.l2s_failed = sorted(_W.unreported)
        _W.unreported.clear()
    return output


def _read_pass(plan: _Plan, forward: Callable[[], Any]) -> None:
    """Read L' > L* requests' hidden states in a forward of this step without any write, stopped after the
    deepest read. It writes this step's KV slots unsteered up to there; the steered pass that follows
    overwrites the same slots, so nothing of it remains. (Measured in a prototype: +55% on the prefill
    steps that hold such a read; decode steps are unchanged.)"""
    read = _Plan(captures=plan.early, stop_after=max(plan.early))
    _W.plan = read
    try:
        forward()
    except Exception:
        if not read.stopped:
            raise
    finally:
        _W.plan = None
    if not read.stopped:
        raise RuntimeError("learn2steer: the read pass of an L' > L* request ended without reaching its layer")


def _patch_runner() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    orig_forward = GPUModelRunner._model_forward
    orig_removed = GPUModelRunner._on_request_state_removed
    orig_sample = GPUModelRunner.sample_tokens
    orig_execute = GPUModelRunner.execute_model

    def _model_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        plan = build_plan(self)
        if plan is not None and plan.early:
            _read_pass(plan, lambda: orig_forward(self, *args, **kwargs))
        _W.plan = plan
        try:
            out = orig_forward(self, *args, **kwargs)
        finally:
            _W.plan = None
        if plan is not None and plan.writes and plan.ran == 0 and not _W.unreported:
            raise RuntimeError("learn2steer: this step had steered requests but the steering op never ran (a "
                               "compiled graph without the plugin, e.g. a stale compile cache: set "
                               "VLLM_DISABLE_COMPILE_CACHE=1, or run with enforce_eager)")
        return out

    def _on_request_state_removed(self: Any, req_id: str, req_state: Any) -> None:
        had = _W.vectors.pop(req_id, None) is not None
        _W.failed.pop(req_id, None)
        if _W.requests.pop(req_id, None) is not None:
            _trace({"freed": req_id, "had_vector": had, "stored_now": len(_W.vectors)})
        orig_removed(self, req_id, req_state)

    def sample_tokens(self: Any, *args: Any, **kwargs: Any) -> Any:
        return _report_failed(orig_sample(self, *args, **kwargs))

    def execute_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        return _report_failed(orig_execute(self, *args, **kwargs))

    GPUModelRunner._model_forward = _model_forward
    GPUModelRunner._on_request_state_removed = _on_request_state_removed
    GPUModelRunner.sample_tokens = sample_tokens
    GPUModelRunner.execute_model = execute_model
    runners = [GPUModelRunner]
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        runners.append(CPUModelRunner)  # overrides load_model without calling GPUModelRunner's
    except ImportError:
        pass
    for cls in runners:
        if "load_model" not in vars(cls):
            continue
        orig_load = vars(cls)["load_model"]

        def load_model(self: Any, *args: Any, _orig: Any = orig_load, **kwargs: Any) -> Any:
            out = _orig(self, *args, **kwargs)
            attach(self)  # before the first forward, so torch.compile traces the wrapped layers
            return out

        cls.load_model = load_model


def _force_eager_on_cuda() -> None:
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform

    if not current_platform.is_cuda_alike():
        return
    orig = EngineArgs.create_engine_config

    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not self.enforce_eager:
            log.warning("learn2steer: enforce_eager=True on CUDA (CUDA graphs would replay the steering op without "
                        "its per-step plan)")
            self.enforce_eager = True
        return orig(self, *args, **kwargs)

    EngineArgs.create_engine_config = create_engine_config


def register() -> None:
    """The ``vllm.general_plugins`` entry point: install the patches (idempotent, every process)."""
    if _STATE["registered"]:
        return
    _STATE["registered"] = True
    # The plugin patches the V1 model runner (the only one on CPU; on GPU vLLM 0.32 picks V2 when Triton is
    # there). Pin V1 unless the user chose otherwise; a V2 engine refuses steering requests (check_request).
    # Plugins load before the engine config is made and before worker processes start, so this is in time.
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    import vllm

    version = str(getattr(vllm, "__version__", "unknown"))
    _STATE["supported"] = version.startswith(SUPPORTED_VLLM)
    _patch_front_end(version)  # first: without the rest, steering requests are refused, never ignored
    if not _STATE["supported"]:
        log.error("learn2steer's vLLM plugin supports vLLM %s; found %s: steering requests will be refused",
                  "/".join(SUPPORTED_VLLM), version)
        return
    from torch.library import Library
    from vllm.utils.torch_utils import direct_register_custom_op

    lib = Library("l2s_vllm", "FRAGMENT")
    direct_register_custom_op("steer_", _steer_impl, mutates_args=["residual"], fake_impl=_steer_fake, target_lib=lib)
    direct_register_custom_op("steer_single_", _steer_single_impl, mutates_args=["x"], fake_impl=_steer_single_fake,
                              target_lib=lib)
    _STATE["library"] = lib  # the ops live as long as their Library object
    _patch_runner()
    _patch_engine_core()
    _force_eager_on_cuda()
