"""learn2steer's vLLM plugin: per-request fixed and input-dependent (L2S) steering inside vLLM.

Registered through the ``vllm.general_plugins`` entry point, so vLLM calls :func:`register` in every
process (API server, engine core, workers) before the model is built; no fork. It patches, at class
level:

* the decoder layers (Llama and Qwen2 families): after each layer, an opaque custom op
  ``l2s_vllm::steer_`` receives the layer's outputs ``(hidden_states, residual)``, whose sum is the
  residual stream (what Hugging Face calls the layer's output). The op reads that sum at L' for
  requests whose last prompt token is in this step (L2S: ``v = g(h)``, stored per request) and adds
  ``alpha * v`` to the residual at L* for exactly the positions each request's scope selects. Because
  the op is opaque, it runs under ``torch.compile`` as well as eagerly (a Python hook would be traced
  once and then silently skipped);
* ``GPUModelRunner._model_forward`` (the CPU runner inherits it): before each forward, the per-token
  plan is built from the runner's input batch (request order, tokens already computed, prompt
  lengths, each request's ``extra_args``). Positions are absolute, so chunked prefill, preemption
  (recomputed positions) and decode steps all steer the same positions as one Hugging Face pass;
* ``_on_request_state_removed``: a finished request's stored vector is freed;
* ``Request.from_engine_core_request`` (engine core): the prefix-cache salt of steered requests;
* ``InputProcessor._validate_params`` (API process): a bad request is an HTTP 400, never an engine crash.

If a steered step ever finishes without the op having run (a graph compiled without the plugin, a
replayed CUDA graph), the step fails loudly instead of returning unsteered text. On CUDA the plugin
forces eager mode: CUDA graphs would replay the op's kernels without its Python plan (not testable on
the machines this was built on).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from learn2steer.engines.vllm.protocol import KEYS, EngineLimits, Registry, SteerRequest, check_request
from learn2steer.errors import InvalidInputError
from learn2steer.steering import scope_selects

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


# ---- the per-step plan (worker) --------------------------------------------------------------------------

@dataclass
class _Write:
    rows: Any                   # flat token rows of this step (np.ndarray, or a tuple in decode steps)
    positions: Any              # their absolute positions (for the trace)
    rid: str
    req: SteerRequest


@dataclass
class _Plan:
    captures: dict[int, list[tuple[int, str, SteerRequest]]] = field(default_factory=lambda: defaultdict(list))
    writes: dict[int, list[_Write]] = field(default_factory=lambda: defaultdict(list))
    ran: int = 0


_PLAN: dict[str, _Plan | None] = {"current": None}
_VECTORS: dict[str, torch.Tensor] = {}                  # request id -> its L2S vector (float32)
_REQUESTS: dict[str, SteerRequest | None] = {}           # request id -> parsed steering (None: unsteered)
_CACHE: dict[tuple[str, Any], Any] = {}                   # loaded vectors / predictors per (source, device)


def stored_vectors() -> int:
    """How many requests' L2S vectors this worker holds (freed when requests finish)."""
    return len(_VECTORS)


def _fixed(req: SteerRequest, layer: int, device: torch.device) -> torch.Tensor:
    key = (f"{req.key}@{layer}", str(device))
    if key not in _CACHE:
        if req.vector is not None:
            v = torch.tensor(req.vector, dtype=torch.float32)
        else:
            from learn2steer.artifacts import SteeringArtifact

            art = SteeringArtifact.load(str(req.meta.folder))
            assert art.vector is not None
            v = art.vector[layer].float()
        _CACHE[key] = v.to(device)
    out: torch.Tensor = _CACHE[key]
    return out


def _predictor(req: SteerRequest, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    key = (f"{req.key}#{req.gated}", str(device))
    if key not in _CACHE:
        from learn2steer.artifacts import SteeringArtifact

        art = SteeringArtifact.load(str(req.meta.folder))
        _CACHE[key] = art.predict_fn(gated=req.gated).to(device).eval()
    fn: Callable[[torch.Tensor], torch.Tensor] = _CACHE[key]
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
        if rid not in _REQUESTS:
            state = runner.requests.get(rid)
            sp = getattr(state, "sampling_params", None)
            extra = getattr(sp, "extra_args", None) if sp is not None else None
            _REQUESTS[rid] = registry().parse(extra) if _has_steering(extra) else None
        req = _REQUESTS[rid]
        if req is None or req.alpha == 0.0:
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
        if req.meta.kind == "l2s":
            assert req.meta.context_layer is not None
            if rid not in _VECTORS and computed <= prompt_len - 1 < computed + count:
                plan.captures[req.meta.context_layer].append((start + prompt_len - 1 - computed, rid, req))
            elif rid not in _VECTORS and any_sel:
                raise RuntimeError(f"request {rid}: steering positions before its last prompt token was read "
                                   "(a prompt split across steps with a prompt scope); the request checks should "
                                   "have refused this")
        if any_sel:
            for layer in req.meta.steer_layers:
                plan.writes[layer].append(write)
    return plan


def _trace(record: dict[str, Any]) -> None:
    path = os.environ.get(ENV_TRACE)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _steer_impl(hidden: torch.Tensor, residual: torch.Tensor, layer: int) -> None:
    """The op: read h = hidden + residual for L2S captures at this layer, then add alpha * v to the residual."""
    plan = _PLAN["current"]
    if plan is None or layer < 0:
        return
    caps = plan.captures.get(layer)
    if caps:
        rows = torch.tensor([c[0] for c in caps], device=residual.device)
        h = (hidden.index_select(0, rows) + residual.index_select(0, rows)).float()
        groups: dict[tuple[str, bool], list[int]] = defaultdict(list)  # one predictor call per artifact
        for j, (_, _, req) in enumerate(caps):
            groups[(req.key, req.gated)].append(j)
        for idx in groups.values():
            pred = _predictor(caps[idx[0]][2], residual.device)(h[idx]).detach()
            if not bool(torch.isfinite(pred).all()):
                raise InvalidInputError(f"requests {[caps[j][1] for j in idx]}: the predictor produced NaN or inf")
            for k, j in enumerate(idx):
                _VECTORS[caps[j][1]] = pred[k]
    writes = plan.writes.get(layer)
    if not writes:
        return
    vectors = []
    for w in writes:
        v: torch.Tensor | None = (_VECTORS.get(w.rid) if w.req.meta.kind == "l2s"
                                  else _fixed(w.req, layer, residual.device))
        if v is None:
            raise RuntimeError(f"request {w.rid}: its L2S vector is unknown at layer {layer}")
        vectors.append(v)
        if _TRACING:
            _trace({"request": w.rid, "layer": layer, "positions": [int(x) for x in w.positions],
                    "alpha": w.req.alpha, "source": w.req.key})
    # one addition for the whole step: each write's alpha * v, repeated over its rows
    alphas = torch.tensor([w.req.alpha for w in writes], device=residual.device)
    counts = torch.tensor([len(w.rows) for w in writes], device=residual.device)
    delta = (alphas[:, None] * torch.stack(vectors)).repeat_interleave(counts, dim=0)
    rows = torch.from_numpy(np.concatenate([np.asarray(w.rows, dtype=np.int64) for w in writes])).to(residual.device)
    residual.index_add_(0, rows, delta.to(residual.dtype))
    plan.ran += 1


def _steer_fake(hidden: torch.Tensor, residual: torch.Tensor, layer: int) -> None:
    return None


# ---- registration ------------------------------------------------------------------------------------------

_LAYER = re.compile(r"layers\.(\d+)\.")


def _layer_index(module: Any) -> int:
    idx = getattr(module, "_l2s_layer", None)
    if idx is None:
        attn = getattr(getattr(module, "self_attn", None), "attn", None)
        m = _LAYER.search(str(getattr(attn, "layer_name", "")) + ".")
        idx = int(m.group(1)) if m else -1
        module._l2s_layer = idx
    return int(idx)


def _patch_decoder(cls: Any) -> None:
    if getattr(cls, "_l2s_patched", False):
        return
    orig = cls.forward

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = orig(self, *args, **kwargs)
        hidden, residual = out
        torch.ops.l2s_vllm.steer_(hidden, residual, _layer_index(self))
        return out

    cls.forward = forward
    cls._l2s_patched = True


def _limits(vllm_config: Any) -> EngineLimits:
    mc = vllm_config.model_config
    text = getattr(mc, "hf_text_config", None) or mc.hf_config
    return EngineLimits(hidden_size=int(text.hidden_size), num_layers=int(text.num_hidden_layers),
                        chunked_prefill=bool(vllm_config.scheduler_config.enable_chunked_prefill),
                        pipeline_parallel=int(vllm_config.parallel_config.pipeline_parallel_size),
                        model_runner_v2=bool(getattr(vllm_config, "use_v2_model_runner", False)))


SUPPORTED_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


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
                archs = set(getattr(self.vllm_config.model_config.hf_config, "architectures", None) or [])
                if not archs & set(SUPPORTED_ARCHS):
                    raise InvalidInputError(f"learn2steer steers {', '.join(SUPPORTED_ARCHS)} in vLLM; this model is "
                                            f"{sorted(archs)}")
                req = registry().parse(extra)
                assert req is not None
                check_request(req, _limits(self.vllm_config))
            except InvalidInputError as e:
                raise VLLMValidationError(str(e), parameter="vllm_xargs") from None
        return out

    InputProcessor._validate_params = _validate_params


def _patch_engine_core() -> None:
    from vllm.v1.request import Request

    orig = Request.from_engine_core_request.__func__

    def from_engine_core_request(cls: Any, request: Any, block_hasher: Any) -> Any:
        sp = request.sampling_params
        extra = getattr(sp, "extra_args", None) if sp is not None else None
        if _has_steering(extra):
            req = registry().parse(extra)
            assert req is not None
            salt = req.salt(list(request.prompt_token_ids or []))
            request.cache_salt = salt if request.cache_salt is None else f"{request.cache_salt}|{salt}"
        return orig(cls, request, block_hasher)

    Request.from_engine_core_request = classmethod(from_engine_core_request)


def _patch_runner() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    orig_forward = GPUModelRunner._model_forward
    orig_removed = GPUModelRunner._on_request_state_removed

    def _model_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        plan = build_plan(self)
        _PLAN["current"] = plan
        try:
            out = orig_forward(self, *args, **kwargs)
        finally:
            _PLAN["current"] = None
        if plan is not None and plan.writes and plan.ran == 0:
            raise RuntimeError("learn2steer: this step had steered requests but the steering op never ran (a "
                               "compiled graph without the plugin, e.g. a stale compile cache: set "
                               "VLLM_DISABLE_COMPILE_CACHE=1, or run with enforce_eager)")
        return out

    def _on_request_state_removed(self: Any, req_id: str, req_state: Any) -> None:
        had = _VECTORS.pop(req_id, None) is not None
        if _REQUESTS.pop(req_id, None) is not None:
            _trace({"freed": req_id, "had_vector": had, "stored_now": len(_VECTORS)})
        orig_removed(self, req_id, req_state)

    GPUModelRunner._model_forward = _model_forward
    GPUModelRunner._on_request_state_removed = _on_request_state_removed


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
    _STATE["library"] = lib  # the op lives as long as its Library object
    from vllm.model_executor.models.llama import LlamaDecoderLayer
    from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer

    for cls in (LlamaDecoderLayer, Qwen2DecoderLayer):
        _patch_decoder(cls)
    _patch_runner()
    _patch_engine_core()
    _force_eager_on_cuda()
