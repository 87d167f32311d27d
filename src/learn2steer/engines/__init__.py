"""Generation engines: the one place answers come from, and the one place engines are named.

An :class:`Engine` answers a batch of examples under one :class:`~learn2steer.methods.MethodConfig`.
``hf`` runs transformers' ``generate`` in this process; ``vllm`` (``learn2steer.engines.vllm``, needs
the serving extra) runs the same methods inside vLLM through learn2steer's plugin. Everything above
(the CLI, the evaluation grid) starts one with :func:`make_engine` and calls :func:`generate_with`, so a
new engine plugs in here only: its name in :data:`EngineName` and its starter in ``_STARTERS``.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Protocol, Sequence, get_args, overload

from learn2steer.behaviours import Example
from learn2steer.errors import InvalidInputError
from learn2steer.methods import MethodConfig
from learn2steer.models.loading import ModelHandle, ModelOptions
from learn2steer.options import check_choice

#: the engines a config may name (``--engine``; the CLI's choices)
EngineName = Literal["hf", "vllm"]
ENGINES: tuple[str, ...] = get_args(EngineName)


class Engine(Protocol):
    """Answers examples under a method; greedy unless the engine was configured otherwise."""

    name: str

    @property
    def model_name(self) -> str:
        """The model's name, stored with results so answers of different models never mix."""
        ...

    def answer(self, cfg: MethodConfig, examples: Sequence[Example], *, max_new_tokens: int, batch_size: int,
               num_return_sequences: int = 1, progress: bool = True) -> list[list[str]]:
        """Answers per example (a list of ``num_return_sequences`` strings each), in order."""
        ...


def as_engine(target: ModelHandle | Engine, **kwargs: Any) -> Engine:
    """A handle becomes the HF engine; an engine is returned as is."""
    if isinstance(target, ModelHandle):
        from learn2steer.engines.hf import HFEngine

        return HFEngine(target, gen_kwargs=kwargs)
    if kwargs:
        raise InvalidInputError(f"generation options {sorted(kwargs)} apply to the HF engine only; configure "
                                "the engine itself instead")
    return target


class LazyEngine:
    """Starts the real engine on the first request: a resumed run with nothing left to generate never pays for
    starting a vLLM engine."""

    def __init__(self, name: str, model_name: str, start: Callable[[], Engine]) -> None:
        self.name, self._model_name, self._start = name, model_name, start
        self._engine: Engine | None = None

    @property
    def model_name(self) -> str:
        """The model's name (known without starting the engine)."""
        return self._model_name

    def answer(self, cfg: MethodConfig, examples: Sequence[Example], *, max_new_tokens: int, batch_size: int,
               num_return_sequences: int = 1, progress: bool = True) -> list[list[str]]:
        """The real engine's answers (started now if needed)."""
        if self._engine is None:
            self._engine = self._start()
        return self._engine.answer(cfg, examples, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   num_return_sequences=num_return_sequences, progress=progress)


def _start_hf(model: ModelOptions, handle: ModelHandle | None) -> Engine:
    from learn2steer.engines.hf import HFEngine

    return HFEngine(handle if handle is not None else model.load_model())


def _start_vllm(model: ModelOptions, handle: ModelHandle | None) -> Engine:
    # vLLM is an optional extra: imported only when this engine starts (its absence is one sentence there)
    from learn2steer.engines.vllm.offline import VLLMEngine

    if handle is not None:
        return VLLMEngine.for_handle(handle, model=model.model, dtype=model.dtype)
    return VLLMEngine.create(model.model, dtype=model.dtype)


#: how each engine starts on a model (loading it here when it needs the weights in this process)
_STARTERS: dict[EngineName, Callable[[ModelOptions, ModelHandle | None], Engine]] = {
    "hf": _start_hf, "vllm": _start_vllm}


def make_engine(name: str, model: ModelOptions, *, handle: ModelHandle | None = None, lazy: bool = False) -> Engine:
    """The engine ``name`` on the model ``model`` names: the one place an engine is chosen by name.

    ``handle``: that model, already loaded in this process (the HF engine answers with it; vLLM starts on the
    same checkpoint); without it the HF engine loads the model. ``lazy`` (with ``handle``, which names the
    model meanwhile): start on the first request, so a resumed run with nothing left to generate never
    starts vLLM.
    """
    start = _STARTERS[check_choice(EngineName, name, "engine")]
    if lazy and handle is not None:
        return LazyEngine(name, handle.name, lambda: start(model, handle))
    return start(model, handle)


@overload
def generate_with(target: ModelHandle | Engine, cfg: MethodConfig, examples: Sequence[Example], *,
                  batch_size: int = ..., max_new_tokens: int = ..., num_return_sequences: None = ...,
                  progress: bool = ..., **gen_kwargs: Any) -> list[str]: ...


@overload
def generate_with(target: ModelHandle | Engine, cfg: MethodConfig, examples: Sequence[Example], *,
                  batch_size: int = ..., max_new_tokens: int = ..., num_return_sequences: int,
                  progress: bool = ..., **gen_kwargs: Any) -> list[list[str]]: ...


def generate_with(target: ModelHandle | Engine, cfg: MethodConfig, examples: Sequence[Example], *,
                  batch_size: int = 8, max_new_tokens: int = 64, num_return_sequences: int | None = None,
                  progress: bool = True, **gen_kwargs: Any) -> list[str] | list[list[str]]:
    """Answer ``examples`` under one method, in batches, in order.

    Returns one string per example; with ``num_return_sequences=n`` (any n >= 1), one list of n strings
    per example. ``target`` is a :class:`ModelHandle` (the HF engine; extra keyword arguments go to
    ``generate``, e.g. ``do_sample=True``) or an :class:`Engine`.
    """
    if not examples:
        return []
    n = 1 if num_return_sequences is None else num_return_sequences
    if n < 1:
        raise InvalidInputError(f"num_return_sequences must be >= 1, got {n}")
    if batch_size < 1 or max_new_tokens < 1:
        raise InvalidInputError("batch_size and max_new_tokens must be >= 1")
    engine = as_engine(target, **gen_kwargs)
    out = engine.answer(cfg, examples, max_new_tokens=max_new_tokens, batch_size=batch_size,
                        num_return_sequences=n, progress=progress)
    return out if num_return_sequences is not None else [a[0] for a in out]
