"""learn2steer's vLLM plugin: per-request fixed and input-dependent (L2S) steering inside vLLM.

Registered through the ``vllm.general_plugins`` entry point, so vLLM calls :func:`register` in every
process (API server, engine core, workers) before the model is built; no fork. This module holds only
the patches; what each step reads and writes is :mod:`~learn2steer.engines.vllm.plan` (pure, tested
without vLLM), finding and wrapping the layers :mod:`~learn2steer.engines.vllm.layers`. It patches:

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
  (recomputed positions) and decode steps all steer the same positions as one Hugging Face pass. A step
  holding the read of an L2S request with L' > L* first runs a read-only pass (stopped after L');
* ``_on_request_state_removed``: everything a finished request brought (its L2S vector, its inline
  vectors) is freed;
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

import logging
import os
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from learn2steer.engines.requests import (
    DIGEST,
    MODE,
    PIN,
    PROMPT_SCOPES,
    READ_BACK,
    READ_TOKENS,
    Registry,
    SteerRequest,
    has_steering,
)
from learn2steer.engines.vllm import metrics
from learn2steer.engines.vllm.layers import decoder_layers, wrap_layer
from learn2steer.engines.vllm.plan import (
    ENV_TRACE,
    StepBatch,
    Sum,
    WorkerState,
    apply,
    build_plan,
    read_pass,
)
from learn2steer.engines.vllm.protocol import (
    ENV_ALLOW_PATHS,
    ENV_ARTIFACTS,
    ENV_INLINE,
    ENV_METRICS,
    ENV_REGISTRY,
    EngineLimits,
    check_request,
    registry_from_env,
)
from learn2steer.errors import InvalidInputError
from learn2steer.models.prompts import InputRead, input_read

__all__ = ["ENV_TRACE", "decoder_layers", "parse_request", "register", "registry", "steer_op", "steering_enabled",
           "stored_vectors", "use_registry", "worker"]

log = logging.getLogger("learn2steer.vllm")
SUPPORTED_VLLM = ("0.32.",)


@dataclass
class _Process:
    """What the plugin knows in this process (API server, engine core or worker), in one object."""

    registered: bool = False
    supported: bool = False
    registry: Registry | None = None
    library: Any = None                          # the ops live as long as their torch Library object
    worker: WorkerState = field(default_factory=WorkerState)
    read_ahead: bool = False                     # this front end reads L2S vectors ahead of chunked prompts
    marks: dict[int, tuple[str, str | None]] = field(default_factory=dict)  # id(params) -> (mode, pinned version)


_P = _Process()
_W = _P.worker  # the worker's per-request state; outside this module: worker()


def registry() -> Registry:
    """This process's artifact registry (built from the environment on first use)."""
    if _P.registry is None:
        _P.registry = registry_from_env()
    return _P.registry


def use_registry(reg: Registry | None) -> None:
    """Make ``reg`` this process's artifact registry; None: the next use re-reads the environment (the offline
    engine sets it first). A probe that drives the plugin without vLLM gives its own."""
    _P.registry = reg


def reload_registry() -> None:
    """Forget the registry: the next use re-reads the environment (the offline engine sets it first)."""
    use_registry(None)


def worker() -> WorkerState:
    """This process's worker state: the step's plan (set around each forward), the requests' vectors and the
    artifact cache. The op reads it; a probe that times the plugin's own work builds plans into it
    (:func:`~learn2steer.engines.vllm.plan.build_plan`) and calls :func:`steer_op` per layer."""
    return _W


def steering_enabled() -> bool:
    """Whether this process may receive steering requests (named artifacts, or the offline engine's paths)."""
    raw = os.environ.get(ENV_ARTIFACTS, "")
    return (os.environ.get(ENV_ALLOW_PATHS) == "1" or raw not in ("", "{}") or bool(os.environ.get(ENV_REGISTRY))
            or bool(os.environ.get(ENV_INLINE)))


# ---- the per-step plan (worker): learn2steer.engines.vllm.plan does the work ---------------------------------

def stored_vectors() -> int:
    """How many tensors this worker holds for live requests (L2S vectors, inline vectors; freed when they finish)."""
    return _W.stored()


def step_batch(runner: Any) -> StepBatch:
    """The runner's input batch as plain arrays (only the first ``num_reqs`` rows are this step's)."""
    ib = runner.input_batch
    n = int(ib.num_reqs)

    def extra_args(rid: str) -> Any:
        sp = getattr(runner.requests.get(rid), "sampling_params", None)
        return getattr(sp, "extra_args", None) if sp is not None else None

    return StepBatch(req_ids=list(ib.req_ids[:n]), query_start_loc=runner.query_start_loc.np,
                     num_computed=ib.num_computed_tokens_cpu, num_prompt=ib.num_prompt_tokens,
                     extra_args=extra_args)


def parse_request(extra: Any) -> SteerRequest | None:
    """A request's steering from its ``extra_args`` with this process's registry (None: it asks for none)."""
    return registry().parse(extra) if has_steering(extra) else None


def steer_op(hidden: torch.Tensor, residual: torch.Tensor, layer: int) -> None:
    """The op for layers that return ``(hidden_states, residual)``: their sum is the residual stream."""
    if _W.plan is None:
        return
    apply(_W, Sum(hidden, residual), residual, layer)


def _steer_single_impl(x: torch.Tensor, layer: int) -> None:
    """The op for layers that return the residual stream itself (Granite, OPT, ...)."""
    if _W.plan is None:
        return
    apply(_W, x, x, layer)


def _steer_fake(hidden: torch.Tensor, residual: torch.Tensor, layer: int) -> None:
    return None


def _steer_single_fake(x: torch.Tensor, layer: int) -> None:
    return None


def attach(runner: Any) -> int:
    """Wrap the loaded model's decoder layers; how many were wrapped (0: this model cannot be steered)."""
    model = runner.get_model() if hasattr(runner, "get_model") else runner.model
    text = _text_config(runner.vllm_config.model_config)
    layers = decoder_layers(model, int(text.num_hidden_layers))
    for path, layer in layers:
        wrap_layer(layer, int(path.rsplit(".", 1)[1]), path)
    _W.layers = [p for p, _ in layers]
    if not layers and steering_enabled():
        raise InvalidInputError(f"learn2steer found no decoder layers in {type(model).__name__} (no ModuleList of "
                                f"{text.num_hidden_layers} layers); this model cannot be steered with vLLM, use the "
                                "HF engine")
    if not layers:
        log.warning("learn2steer: no decoder layers found in %s; steering requests will fail", type(model).__name__)
    _observe_for_metrics()
    return len(layers)


def _observe_for_metrics() -> None:
    """``l2s serve``: this worker reports its predicted vectors to /metrics (tensor-parallel rank 0 only: every
    rank computes the same vectors)."""
    folder = os.environ.get(ENV_METRICS)
    if not folder or _W.observer is not None:
        return
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        rank = int(get_tensor_model_parallel_rank())
    except (ImportError, AssertionError, RuntimeError):
        rank = 0
    if rank == 0:
        _W.observer = metrics.WorkerStats(folder).observe


# ---- registration ------------------------------------------------------------------------------------------


def _text_config(mc: Any) -> Any:
    return getattr(mc, "hf_text_config", None) or mc.hf_config


def _limits(vllm_config: Any) -> EngineLimits:
    mc = vllm_config.model_config
    text = _text_config(mc)
    return EngineLimits(hidden_size=int(text.hidden_size), num_layers=int(text.num_hidden_layers),
                        chunked_prefill=bool(vllm_config.scheduler_config.enable_chunked_prefill),
                        pipeline_parallel=int(vllm_config.parallel_config.pipeline_parallel_size),
                        model_runner_v2=bool(getattr(vllm_config, "use_v2_model_runner", False)),
                        read_ahead=_P.read_ahead)


BEAM_SEARCH = ("steering does not apply to beam search (vLLM runs each beam as a separate request without "
               "vllm_xargs); use sampling or greedy decoding with steering")


def _patch_front_end(version: str) -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.input_processor import InputProcessor

    orig = InputProcessor._validate_params

    def _validate_params(self: Any, params: Any, supported_tasks: Any) -> Any:
        out = orig(self, params, supported_tasks)
        extra = getattr(params, "extra_args", None)
        if has_steering(extra):
            try:
                if not _P.supported:
                    raise InvalidInputError(f"learn2steer's vLLM plugin supports vLLM 0.32.x; this is {version}")
                for key in (PIN, MODE, DIGEST):  # set by the front end only, never by a client
                    cast(dict, extra).pop(key, None)
                mark = _P.marks.get(id(params))
                if mark is not None:  # a read-ahead pair (enable_read_ahead): its mode and the version both use
                    cast(dict, extra)[MODE] = mark[0]
                    if mark[1] is not None:
                        cast(dict, extra)[PIN] = mark[1]
                req = registry().parse(extra)
                assert req is not None
                check_request(req, _limits(self.vllm_config))
            except InvalidInputError as e:
                metrics.count_refusal(str(e))
                raise VLLMValidationError(str(e), parameter="vllm_xargs") from None
        return out

    InputProcessor._validate_params = _validate_params
    orig_process = InputProcessor.process_inputs

    def process_inputs(self: Any, *args: Any, **kwargs: Any) -> Any:
        ecr = orig_process(self, *args, **kwargs)
        sp = getattr(ecr, "sampling_params", None)
        extra = getattr(sp, "extra_args", None) if sp is not None else None
        if has_steering(extra) and _P.supported:
            try:
                _pin(self, cast(dict, extra))
                _prepare_read(self, ecr, sp, cast(dict, extra))
            except InvalidInputError as e:
                metrics.count_refusal(str(e))
                raise VLLMValidationError(str(e), parameter="vllm_xargs") from None
            if metrics.enabled() and cast(dict, extra).get(MODE) != "read":
                req = registry().parse(extra)
                if req is not None:
                    metrics.count_request(req)
        return ecr

    InputProcessor.process_inputs = process_inputs
    _patch_beam_search(VLLMValidationError)


def _pin(processor: Any, extra: dict[str, Any]) -> None:
    """A request naming a registered artifact gets the version current now, in its own extra args: the engine
    core and every worker apply that version, whatever replaces it meanwhile. Checked again once pinned (it may
    have been replaced since the request was validated)."""
    reg = registry()
    if reg.store is None:
        return
    if not (MODE in extra and PIN in extra):  # a read-ahead pair keeps the version pinned for both
        reg.pin(extra)
    if PIN in extra:
        req = reg.parse(extra)
        assert req is not None
        check_request(req, _limits(processor.vllm_config))


def _prepare_read(processor: Any, ecr: Any, sp: Any, extra: dict[str, Any]) -> None:
    """Where an L2S request reads, and whether it may read the prefix cache (API process, per request).

    ``input_last`` reads the state the official code reads: the last token of the bare prompt in a pass of its
    own (:class:`~learn2steer.models.prompts.InputRead`). The prompt must end with the template's generation
    prompt; how far before the last prompt token the read sits is passed on as ``l2s_read_back``, and the
    tokens the bare prompt ends in where the full prompt differs (LLaVA-1.5: its lone "▁") as
    ``l2s_read_tokens``, which the worker puts in place in a read-only pass. A request read in a pass of its
    own (those, and L' > L*) must compute its whole prompt: cached blocks of an identical request hold steered
    keys and values, and the read position itself must be computed.
    """
    extra.pop(READ_BACK, None)  # only ever set here
    extra.pop(READ_TOKENS, None)
    req = registry().parse(extra)
    if req is None or not req.meta.reads_context:
        return
    own_pass = req.reads_after_writing
    if req.meta.context_read == "input_last":
        # per front end, not per process: one process may hold several offline engines (other tokenizers)
        read: InputRead | None = getattr(processor, "_l2s_input_read", None)
        if read is None:
            tok = processor.tokenizer
            if tok is None:
                raise InvalidInputError("the 'input_last' read needs the tokenizer; start vLLM without "
                                        "skip_tokenizer_init")
            read = input_read(tok)
            processor._l2s_input_read = read
        if not read.matches(list(ecr.prompt_token_ids or [])):
            raise InvalidInputError("this L2S artifact reads the last input token before the generation prompt, "
                                    "but the prompt does not end with the chat template's generation prompt; send "
                                    "a chat request (or a prompt rendered with add_generation_prompt=True)")
        extra[READ_BACK] = read.back
        if read.bare_tail:
            extra[READ_TOKENS] = list(read.bare_tail)
            own_pass = True
    if own_pass:
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
            if has_steering(getattr(self, "vllm_xargs", None)):
                metrics.count_refusal(BEAM_SEARCH)
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
        if has_steering(extra):
            req = registry().parse(extra)
            assert req is not None
            mm = [str(getattr(f, "identifier", "")) for f in (getattr(request, "mm_features", None) or [])]
            if req.mode:
                cast(dict, extra)[DIGEST] = req.prompt_digest(list(request.prompt_token_ids or []), mm)
            if req.mode == "read":  # writes nothing: its cached blocks are plain ones
                return orig(cls, request, block_hasher)
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


def _patch_runner() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    orig_forward = GPUModelRunner._model_forward
    orig_removed = GPUModelRunner._on_request_state_removed
    orig_sample = GPUModelRunner.sample_tokens
    orig_execute = GPUModelRunner.execute_model

    def _model_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        plan = build_plan(_W, step_batch(self), parse_request)
        if plan is not None and plan.early:  # L' > L*, or tokens put in place: read first, in a pass writing nothing
            model = self.get_model() if hasattr(self, "get_model") else self.model
            read_pass(_W, plan, lambda *a, **k: orig_forward(self, *a, **k), args, kwargs,
                      embed=lambda ids: model.embed_input_ids(ids))
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
        _W.forget(req_id)
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


def enable_read_ahead() -> None:
    """``l2s serve`` with chunked prefill: an L2S request at scope ``all`` / ``prompt`` is served as two requests.

    Its prompt may be split over several steps, and the first chunks pass L* before the last prompt token (where
    v is read) has been computed. So the front end first sends the same prompt as a *read* request (one token,
    nothing written: its chunks are plain, and its cached blocks are plain ones), whose worker keeps v under the
    prompt's digest (artifact version, gate, read position, tokens, images); once it has finished, the request
    itself goes in (*ahead*) and every worker takes v from there before its first chunk, so every chunk is
    steered as one Hugging Face pass steers it. Both are pinned to the same registered version. Cost: the
    prompt is computed twice (plain blocks of the read may come from the prefix cache), and the first token
    waits for the read's prefill.
    """
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

    _P.read_ahead = True
    orig = AsyncLLM.generate

    async def generate(self: Any, prompt: Any, sampling_params: Any, request_id: str, *args: Any,
                       **kwargs: Any) -> Any:
        pin = _needs_read_ahead(self, sampling_params)
        if pin is False:
            async for out in orig(self, prompt, sampling_params, request_id, *args, **kwargs):
                yield out
            return
        read = SamplingParams(max_tokens=1, temperature=0.0, extra_args=dict(sampling_params.extra_args))
        real = sampling_params.clone()
        _P.marks[id(read)] = ("read", cast(Any, pin))
        _P.marks[id(real)] = ("ahead", cast(Any, pin))
        try:
            async for _ in orig(self, prompt, read, f"{request_id}-l2s-read", *args, **kwargs):
                pass
            async for out in orig(self, prompt, real, request_id, *args, **kwargs):
                yield out
        finally:
            _P.marks.pop(id(read), None)
            _P.marks.pop(id(real), None)

    AsyncLLM.generate = generate


def _needs_read_ahead(llm: Any, params: Any) -> str | None | bool:
    """False when the request needs no read-ahead; else the registered version both requests use (or None)."""
    extra = getattr(params, "extra_args", None)
    if not (_P.read_ahead and _P.supported and has_steering(extra)
            and llm.vllm_config.scheduler_config.enable_chunked_prefill):
        return False
    try:
        args = {k: v for k, v in cast(dict, extra).items() if k not in (PIN, MODE, DIGEST)}
        registry().pin(args)
        req = registry().parse(args)
    except InvalidInputError:
        return False  # the request's own checks answer with the 400
    if req is None or not req.meta.reads_context or req.scope not in PROMPT_SCOPES or req.alpha == 0.0:
        return False
    return args.get(PIN)


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
    if _P.registered:
        return
    _P.registered = True
    # The plugin patches the V1 model runner (the only one on CPU; on GPU vLLM 0.32 picks V2 when Triton is
    # there). Pin V1 unless the user chose otherwise; a V2 engine refuses steering requests (check_request).
    # Plugins load before the engine config is made and before worker processes start, so this is in time.
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    import vllm

    version = str(getattr(vllm, "__version__", "unknown"))
    _P.supported = version.startswith(SUPPORTED_VLLM)
    _patch_front_end(version)  # first: without the rest, steering requests are refused, never ignored
    if not _P.supported:
        log.error("learn2steer's vLLM plugin supports vLLM %s; found %s: steering requests will be refused",
                  "/".join(SUPPORTED_VLLM), version)
        return
    from torch.library import Library
    from vllm.utils.torch_utils import direct_register_custom_op

    lib = Library("l2s_vllm", "FRAGMENT")
    direct_register_custom_op("steer_", steer_op, mutates_args=["residual"], fake_impl=_steer_fake, target_lib=lib)
    direct_register_custom_op("steer_single_", _steer_single_impl, mutates_args=["x"], fake_impl=_steer_single_fake,
                              target_lib=lib)
    _P.library = lib  # the ops live as long as their Library object
    _patch_runner()
    _patch_engine_core()
    _force_eager_on_cuda()
