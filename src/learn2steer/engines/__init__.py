"""Generation engines: the one place answers come from.

An :class:`Engine` answers a batch of examples under one :class:`~learn2steer.methods.MethodConfig`.
``hf`` runs transformers' ``generate`` in this process; ``vllm`` (``learn2steer.engines.vllm``, needs
the serving extra) runs the same methods inside vLLM through learn2steer's plugin. Everything above
(the CLI, the evaluation grid) calls :func:`generate_with`, so a new engine plugs in here only.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, overload

from learn2steer.behaviours import Example
from learn2steer.errors import InvalidInputError
from learn2steer.methods import MethodConfig
from learn2steer.models.loading import ModelHandle

ENGINES = ("hf", "vllm")


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
