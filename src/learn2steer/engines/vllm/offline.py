"""``--engine vllm``: answer examples with vLLM's ``LLM`` and learn2steer's plugin, in one call per method.

Prompts are rendered by learn2steer's own chat templating (the token ids the HF engine uses), so both
engines see the same inputs. Steering travels in each request's ``extra_args``, in the request format of
:mod:`learn2steer.engines.requests`: the method's tensors as an artifact folder (``steer_path``) or, for
per-input methods (P2S, Norm-Rnd), the request's own vectors inline (one per steering layer when they differ
between layers, as the HF engine takes them). An in-memory method reaches the engine's processes (API
front end, engine core, workers: each reads the folder's ``config.json`` once and caches it; the workers
load the tensors once) as a work folder of tensors + ``config.json`` written once per distinct artifact, no
model card; alpha, scope, strength and the gate switch travel in every request, so one folder serves every
cell of a grid.

A request with an image (LLaVA, Qwen2-VL families) goes to vLLM *unexpanded*: the HF engine's ids with the
run of image tokens the processor expanded collapsed back to the one placeholder, plus the image itself as
``multi_modal_data``. vLLM expands the placeholder again with its own processor (sending the expanded ids
would expand them twice). The prompt vLLM then runs, and the length the plugin sees as the prompt, are the
HF engine's.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

from learn2steer.artifacts import SteeringArtifact
from learn2steer.behaviours import Example
from learn2steer.engines.vllm.protocol import ENV_ALLOW_PATHS, ENV_ARTIFACTS, check_plugin_installed
from learn2steer.errors import InvalidInputError
from learn2steer.methods import MethodConfig, prompt_rows
from learn2steer.models.loading import model_shape, resolve_model_path, template_handle
from learn2steer.models.prompts import PromptRow, collapse_image_tokens, encode_row, image_token_id
from learn2steer.models.prompts import _load_image as load_image  # the HF engine's image loading (RGB)
from learn2steer.rules import Scope, Strength
from learn2steer.steering import FixedVectors


def engine_env(*, allow_paths: bool, artifacts: dict[str, str] | None = None, eager: bool = True) -> dict[str, str]:
    """Environment for a vLLM engine with the plugin (set before the engine starts its processes)."""
    import json

    import torch

    env = {"VLLM_USE_V2_MODEL_RUNNER": "0", ENV_ALLOW_PATHS: "1" if allow_paths else "0",
           ENV_ARTIFACTS: json.dumps(artifacts or {})}
    if not eager:
        env["VLLM_DISABLE_COMPILE_CACHE"] = "1"  # a graph compiled without the plugin must never be reused
    if not torch.cuda.is_available():
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    return env


class VLLMEngine:
    """vLLM's offline ``LLM`` with learn2steer's plugin; greedy; text prompts, and one image per prompt on VLMs."""

    name = "vllm"

    def __init__(self, llm: Any, templates: Any, model_name: str, hidden_size: int, num_layers: int) -> None:
        self.llm, self.templates = llm, templates
        self._model_name, self.hidden_size, self.num_layers = model_name, hidden_size, num_layers
        self.workdir = Path(tempfile.mkdtemp(prefix="l2s-vllm-"))
        self.last_outputs: list[Any] = []

    @property
    def model_name(self) -> str:
        """The served model's name (artifacts made for another name of the same shape warn)."""
        return self._model_name

    def close(self) -> None:
        """Stop the engine's processes now (otherwise they stop when the engine is garbage collected)."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()

    def __enter__(self) -> "VLLMEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def create(cls, model: str = "default", *, dtype: str = "auto", enforce_eager: bool = True,
               enable_chunked_prefill: bool = False, max_model_len: int = 2048, **engine_kwargs: Any) -> "VLLMEngine":
        """Start an engine on a local model folder ('default': the embedded SmolLM2-135M-Instruct).

        Chunked prefill is off by default so that L2S at scope ``all`` sees each prompt whole (turn it on
        and L2S works at scope ``generated``; prompt scopes are then refused). ``dtype="auto"`` is float32
        on CPU, as the HF engine loads models there.
        """
        import torch

        try:
            from vllm import LLM
        except ImportError:
            raise InvalidInputError("the vLLM engine needs the serving environment: bash scripts/setup.sh --serve, "
                                    "then use .venv-serve/bin/l2s") from None
        check_plugin_installed()
        path = resolve_model_path(model)
        name, hidden, layers = model_shape(model)
        os.environ.update(engine_env(allow_paths=True, eager=enforce_eager))
        from learn2steer.engines.vllm import plugin

        plugin.reload_registry()  # re-read the environment in this process
        if dtype == "auto" and not torch.cuda.is_available():
            dtype = "float32"
        kw: dict[str, Any] = dict(dtype=dtype, enforce_eager=enforce_eager, max_model_len=max_model_len, seed=0,
                                  enable_chunked_prefill=enable_chunked_prefill)
        if not enable_chunked_prefill:
            kw["max_num_batched_tokens"] = max(max_model_len, engine_kwargs.pop("max_num_batched_tokens", 0))
        kw.update(engine_kwargs)
        llm = LLM(model=str(path), served_model_name=name, **kw)
        return cls(llm, template_handle(model), name, hidden, layers)

    @classmethod
    def for_handle(cls, handle: Any, *, model: str, dtype: str = "auto", **kw: Any) -> "VLLMEngine":
        """An engine on the same checkpoint as an HF handle (the eval grid after HF extraction)."""
        return cls.create(model, dtype=dtype, **kw)

    # -- requests ---------------------------------------------------------------------------------------------

    def token_ids(self, cfg: MethodConfig, examples: Sequence[Example]) -> list[list[int]]:
        """Prompt token ids rendered by learn2steer's chat templating: the ids the HF engine uses (with images:
        expanded, as the model runs them)."""
        return [encode_row(self.templates, r)[0]["input_ids"][0].tolist() for r in prompt_rows(cfg, examples)]

    def prompts(self, cfg: MethodConfig, examples: Sequence[Example]) -> list[dict[str, Any]]:
        """vLLM prompts (``TokensPrompt`` dicts) of ``examples`` under ``cfg``: see :meth:`prompt_of`."""
        return [self.prompt_of(r) for r in prompt_rows(cfg, examples)]

    def prompt_of(self, row: PromptRow) -> dict[str, Any]:
        """One row as a vLLM prompt: the HF engine's token ids; with an image, unexpanded plus the image."""
        ids = encode_row(self.templates, row)[0]["input_ids"][0].tolist()
        if row.image is None:
            return {"prompt_token_ids": ids}
        return {"prompt_token_ids": collapse_image_tokens(ids, image_token_id(self.templates)),
                "multi_modal_data": {"image": load_image(row.image)}}

    def extra_args(self, cfg: MethodConfig, examples: Sequence[Example]) -> list[dict[str, Any] | None]:
        """Each request's steering, as the plugin reads it (every setting explicit: a folder's stored alpha,
        scope and strength never stand in for the method's)."""
        if not cfg.steers:
            return [None] * len(examples)
        common: dict[str, Any] = {"alpha": float(cfg.alpha), "scope": Scope.parse(cfg.scope).value,
                                  "strength": Strength.parse(cfg.strength).value}
        if cfg.artifact is not None and cfg.artifact.reads_context:
            path = str(cfg.artifact.save_once(self.workdir))
            return [{"steer_path": path, "gated": cfg.gated, **common} for _ in examples]
        vec = cfg.vector
        assert vec is not None
        if not vec.per_row:
            art = SteeringArtifact(kind="fixed", method=cfg.method, model=self.model_name, hidden_size=vec.hidden_size,
                                   num_layers=self.num_layers, steer_layers=list(vec), vector=vec)
            path = str(art.save_once(self.workdir))
            return [{"steer_path": path, **common} for _ in examples]
        provider = cfg.provider_for([e.id for e in examples])
        assert isinstance(provider, FixedVectors)
        rows = provider.vectors
        layers = list(rows)
        first = rows[layers[0]]
        if all(bool((rows[x] == first).all()) for x in layers[1:]):  # one vector for every layer: sent once
            return [{"steer_vector": first[i].tolist(), "steer_layers": layers, **common} for i in range(len(examples))]
        return [{"steer_vector": [rows[x][i].tolist() for x in layers], "steer_layers": layers, **common}
                for i in range(len(examples))]

    def requests(self, cfg: MethodConfig, examples: Sequence[Example], *, max_new_tokens: int,
                 num_return_sequences: int = 1, **sampling: Any) -> list[tuple[Any, Any]]:
        """(prompt, sampling params) of each example under ``cfg``; requests of several methods can be mixed in
        one :meth:`generate` call (vLLM batches them together). ``sampling`` adds SamplingParams fields."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = self.prompts(cfg, examples)
        extras = self.extra_args(cfg, examples)
        return [(TokensPrompt(**p), SamplingParams(temperature=0.0, max_tokens=max_new_tokens, n=num_return_sequences,
                                                   extra_args=x, **sampling))
                for p, x in zip(prompts, extras)]

    def generate(self, requests: Sequence[tuple[Any, Any]], *, progress: bool = False) -> list[Any]:
        """Run prepared requests in one engine call; vLLM's RequestOutputs in order."""
        self.last_outputs = list(self.llm.generate([r[0] for r in requests], [r[1] for r in requests],
                                                   use_tqdm=progress))
        return self.last_outputs

    def run(self, cfg: MethodConfig, examples: Sequence[Example], *, max_new_tokens: int,
            num_return_sequences: int = 1, progress: bool = True) -> list[Any]:
        """vLLM's RequestOutputs of ``examples`` under ``cfg`` (greedy), in order.

        A request the plugin had to fail (its addition would not have been finite: a NaN prediction, an
        overflowing alpha * v) is an error here, not a silently truncated answer."""
        outs = self.generate(self.requests(cfg, examples, max_new_tokens=max_new_tokens,
                                           num_return_sequences=num_return_sequences), progress=progress)
        failed = [e.id for e, o in zip(examples, outs) if any(c.finish_reason == "error" for c in o.outputs)]
        if failed:
            raise InvalidInputError(f"the engine failed {len(failed)} steered request(s) ({', '.join(failed[:3])}): "
                                    "the steering addition was not finite (see the engine log); use a smaller "
                                    "alpha or check the artifact")
        return outs

    def answer(self, cfg: MethodConfig, examples: Sequence[Example], *, max_new_tokens: int, batch_size: int,
               num_return_sequences: int = 1, progress: bool = True) -> list[list[str]]:
        """All examples go to vLLM at once (it batches continuously); ``batch_size`` does not apply.

        The answers are the token ids decoded as the HF engine decodes them (vLLM's streaming detokenizer
        holds back a trailing incomplete UTF-8 sequence that a whole-sequence decode shows as U+FFFD), so
        equal tokens are equal text."""
        outs = self.run(cfg, examples, max_new_tokens=max_new_tokens, num_return_sequences=num_return_sequences,
                        progress=progress)
        tok = self.templates.tokenizer
        return [[tok.decode(list(o.token_ids), skip_special_tokens=True).strip() for o in out.outputs] for out in outs]
