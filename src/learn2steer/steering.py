"""Add vectors to the residual stream during forward passes and ``generate``.

One forward pre-hook on the top-level model learns, for every call, how many positions are already in
the KV cache and which current columns are padding; per-layer forward hooks then add ``alpha * v`` only
at the positions the :class:`Scope` selects. Masks are built by pure functions (:func:`scope_mask`), so
they can be tested without a model. Everything lives inside a context manager that removes its hooks
on exit, exceptions included.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from typing import Any, Iterator, Mapping, Protocol

import torch

from learn2steer.activations import layer_output
from learn2steer.models.loading import ModelHandle


class Scope(str, Enum):
    """Which positions a steering write touches.

    ``all``: every non-padding position, prompt and generated.
    ``prompt``: prompt positions only (no effect on tokens fed back during decoding).
    ``generated``: the positions that produce new tokens: the last prompt token (its output is the first
    generated token) and every generated token after it.
    """

    ALL = "all"
    PROMPT = "prompt"
    GENERATED = "generated"


@dataclass
class StepState:
    """What one forward call looks like: filled by the top-level pre-hook, read by the layer hooks."""

    past_len: int = 0
    cur_len: int = 0
    prompt_len: int = 0
    attention: torch.Tensor | None = None  # [B, cur] bool, True = real token
    mask: torch.Tensor | None = None  # [B, cur] scope mask of this step, built once, shared by layers

    @property
    def is_prefill(self) -> bool:
        return self.past_len == 0


def scope_mask(scope: Scope | str, attention: torch.Tensor, past_len: int, prompt_len: int) -> torch.Tensor:
    """Bool [B, cur] mask of the current columns to steer.

    Columns are absolute (``past_len + j``); with left padding every row's prompt ends at column
    ``prompt_len - 1``, so prompt/generated is a column test and padding is excluded by ``attention``.
    """
    scope = Scope(scope)
    cols = past_len + torch.arange(attention.shape[1], device=attention.device)
    if scope is Scope.ALL:
        sel = torch.ones_like(cols, dtype=torch.bool)
    elif scope is Scope.PROMPT:
        sel = cols < prompt_len
    else:
        sel = cols >= prompt_len - 1
    return attention & sel[None, :]


class VectorProvider(Protocol):
    """Supplies the vector to add at a layer; may observe earlier layers of the same pass (L2S)."""

    observe_layers: tuple[int, ...]
    write_layers: tuple[int, ...]

    def observe(self, layer: int, hidden: torch.Tensor, state: StepState) -> None: ...

    def vector(self, layer: int, state: StepState) -> torch.Tensor | None: ...


@dataclass
class FixedVectors:
    """Fixed vectors per layer: [D] shared by every row, or [B, D] one per batch row."""

    vectors: Mapping[int, torch.Tensor]
    observe_layers: tuple[int, ...] = ()

    @property
    def write_layers(self) -> tuple[int, ...]:
        return tuple(self.vectors)

    def observe(self, layer: int, hidden: torch.Tensor, state: StepState) -> None:  # pragma: no cover
        pass

    def vector(self, layer: int, state: StepState) -> torch.Tensor | None:
        return self.vectors.get(layer)


@dataclass
class TraceRecord:
    """One write: the layer, the step's past length, and per row the absolute columns that were steered."""

    layer: int
    past_len: int
    columns: list[list[int]]


def _step_pre_hook(state: StepState):  # noqa: ANN202
    def hook(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        if ref is None:
            raise RuntimeError("steering needs input_ids or inputs_embeds in the model call")
        bsz, cur = int(ref.shape[0]), int(ref.shape[1])
        pkv = kwargs.get("past_key_values")
        mask = kwargs.get("attention_mask")
        past = 0
        if pkv is not None and hasattr(pkv, "get_seq_length"):
            past = int(pkv.get_seq_length())
        elif isinstance(mask, torch.Tensor) and mask.dim() == 2:
            past = int(mask.shape[1]) - cur
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            attention = mask[:, -cur:].bool()
        else:
            attention = torch.ones(bsz, cur, dtype=torch.bool, device=ref.device)
        state.past_len, state.cur_len, state.attention = past, cur, attention
        if past == 0:
            state.prompt_len = cur
        state.mask = None
    return hook


def _expand_rows(v: torch.Tensor, rows: int) -> torch.Tensor:
    """Match per-row vectors to a batch grown by beam search / num_return_sequences (rows contiguous)."""
    if v.dim() == 1 or v.shape[0] == rows:
        return v
    if rows % v.shape[0]:
        raise ValueError(f"per-row steering vectors have {v.shape[0]} rows but the model batch has {rows}; "
                         "pass one vector per input row (or a single [D] vector)")
    return v.repeat_interleave(rows // v.shape[0], dim=0)


@contextmanager
def steer(handle: ModelHandle, vectors: Mapping[int, torch.Tensor] | VectorProvider, *, alpha: float = 1.0,
          scope: Scope | str = Scope.ALL, trace: list[TraceRecord] | None = None) -> Iterator[StepState]:
    """Add ``alpha * v`` to the output of decoder block(s) while the context is open.

    ``vectors`` maps layer -> [D] (shared) or [B, D] (one per batch row), or is a :class:`VectorProvider`
    (e.g. the L2S predictor). Works for plain forward passes and ``generate`` (KV cache, left padding,
    beam search). A zero vector leaves outputs bit-for-bit unchanged.
    """
    scope = Scope(scope)
    provider: VectorProvider = vectors if hasattr(vectors, "vector") else FixedVectors(dict(vectors))  # type: ignore[arg-type, assignment]
    if isinstance(provider, FixedVectors):
        provider = FixedVectors({handle.check_layer(k): v for k, v in provider.vectors.items()})
        for layer, v in provider.vectors.items():
            if v.shape[-1] != handle.hidden_size or v.dim() > 2:
                raise ValueError(f"steering vector for layer {layer} has shape {tuple(v.shape)}, but the model "
                                 f"needs [{handle.hidden_size}] or [rows, {handle.hidden_size}]; was it made for "
                                 "another model?")
    write_layers = [handle.check_layer(layer) for layer in provider.write_layers]
    observe_layers = [handle.check_layer(layer) for layer in provider.observe_layers]
    state = StepState()

    def make_hook(layer: int):  # noqa: ANN202
        observes, writes = layer in observe_layers, layer in write_layers

        def hook(_module: torch.nn.Module, _args: object, output: object) -> object:
            hidden = layer_output(output)
            if observes:
                provider.observe(layer, hidden, state)
            if not writes:
                return None
            v = provider.vector(layer, state)
            if v is None:
                return None
            mask = state.mask
            if mask is None:
                mask = state.mask = scope_mask(scope, state.attention.to(hidden.device), state.past_len,
                                               state.prompt_len)
            if trace is not None:
                trace.append(TraceRecord(layer, state.past_len,
                                         [(torch.nonzero(r).flatten() + state.past_len).tolist() for r in mask.cpu()]))
            delta = (alpha * _expand_rows(v.to(hidden.device, hidden.dtype), hidden.shape[0]))
            delta = delta.unsqueeze(-2) if delta.dim() == 2 else delta
            steered = torch.where(mask.unsqueeze(-1), hidden + delta, hidden)
            if isinstance(output, tuple):
                return (steered, *output[1:])
            return steered
        return hook

    hooks = [handle.model.register_forward_pre_hook(_step_pre_hook(state), with_kwargs=True)]
    try:
        for layer in sorted(set(observe_layers) | set(write_layers)):
            hooks.append(handle.layers[layer].register_forward_hook(make_hook(layer)))
        yield state
    finally:
        for h in hooks:
            h.remove()
