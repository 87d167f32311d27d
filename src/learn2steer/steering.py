"""Add vectors to the residual stream during forward passes and ``generate``: the HF engine's hook machinery.

The rules a write obeys (scopes, strengths, alpha, the vector added, the refusals) are the engines' shared ones in
:mod:`learn2steer.rules`; this module applies them with hooks. Three pieces, each testable alone:

* :func:`step_mask`: the columns of one forward call of a left-padded batch that a :class:`Scope` steers
  (padding excluded, KV-cache offset applied), from :func:`~learn2steer.rules.scope_selects`, the rule the
  vLLM engine applies to its flattened tokens, so both engines agree.
* **Providers**: :class:`FixedVectors` (a :class:`~learn2steer.vectors.SteeringVector`) and
  :class:`PredictedVectors` (any callable from a context hidden state to a vector: the L2S predictor,
  but the engine never needs to know that).
* :func:`steer`: a context manager that installs one pre-hook on the model (to learn each call's cache
  offset) and one hook per involved decoder layer, and removes them all on exit, exceptions included.

Where the prompt ends is taken from the :class:`~learn2steer.models.prompts.Batch` being generated (a required
argument), never guessed from "the first call without cache": that guess is wrong without a KV cache, with
chunked prefill and when generation starts from an existing cache.

What runs per decoding step is only what must: the pre-hook reads the call's cache offset, a write adds a delta
computed and checked once per vector (finite in the model's dtype, bounded against the residual norm of the
first steered call), and a read only compares integers until the call that holds its column.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import torch

from learn2steer.activations import layer_output
from learn2steer.errors import InvalidInputError
from learn2steer.models.calls import cached_positions
from learn2steer.models.loading import ModelHandle
from learn2steer.models.prompts import Batch
from learn2steer.rules import (
    MAX_RELATIVE_STRENGTH,
    Scope,
    ScopeName,
    Strength,
    StrengthName,
    addition,
    check_alpha,
    check_alphas,
    check_strength,
    finite_in,
    predict_checked,
    reads_after_writing,
    residual_norm,
    scope_selects,
)
from learn2steer.vectors import SteeringVector

__all__ = [  # the rules are re-exported: ``from learn2steer.steering import Scope`` keeps working
    "MAX_RELATIVE_STRENGTH", "FixedVectors", "Layout", "PredictedVectors", "Scope", "ScopeName", "Step", "Strength",
    "StrengthName", "TraceRecord", "VectorProvider", "addition", "check_alpha", "check_alphas", "check_strength",
    "finite_in", "scope_selects", "steer", "step_mask",
]

def step_mask(scope: Scope | str, real: torch.Tensor, past_len: int, cur_len: int, rows: int | None = None
              ) -> torch.Tensor:
    """Bool ``[rows, cur_len]``: the columns of one forward call to steer.

    ``real`` is the prompt's ``[B, P]`` attention mask (True = token, False = left padding); columns are
    absolute (``past_len + j``). Under left padding, column ``c`` of a row is its token ``c - pad`` and
    the row's prompt has ``P - pad`` tokens, so the scope test on columns equals the test on each row's
    own positions; columns at or past ``P`` are generated tokens and always real. ``rows`` larger than
    ``B`` (beam search, several return sequences) repeats each row's mask ``rows // B`` times, as
    ``generate`` repeats the inputs.
    """
    b, p = real.shape
    rows = rows or b
    if rows % b:
        raise InvalidInputError(f"the model batch has {rows} rows but the prompt batch {b}; steering cannot "
                                "align them")
    cols = past_len + torch.arange(cur_len, device=real.device)
    in_prompt = cols < p
    pad_ok = torch.where(in_prompt[None, :], real[:, cols.clamp(max=p - 1)], torch.ones((), dtype=torch.bool,
                                                                                      device=real.device))
    mask = pad_ok & scope_selects(scope, cols, p)[None, :]
    return mask.repeat_interleave(rows // b, dim=0) if rows != b else mask


# ---- what steer knows about the running sequences ------------------------------------------------------

@dataclass
class Layout:
    """The prompt batch being generated: its length (the boundary column), padding and read columns."""

    prompt_len: int
    real: torch.Tensor                  # [B, P] bool
    read_columns: dict[str, torch.Tensor] = field(default_factory=dict)  # position name -> [B] columns
    _on: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _spans: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False)

    def real_on(self, device: torch.device) -> torch.Tensor:
        """The padding mask on ``device`` (copied once per device, not at every step)."""
        key = str(device)
        if key not in self._on:
            self._on[key] = self.real.to(device)
        return self._on[key]

    def read_span(self, position: str) -> tuple[int, int]:
        """The first and last column read at ``position`` (integers, taken from the tensor once, not per step)."""
        if position not in self._spans:
            cols = self.read_columns[position]
            self._spans[position] = (int(cols.min()), int(cols.max()))
        return self._spans[position]

    @classmethod
    def of(cls, batch: Batch) -> "Layout":
        """The layout of a generation batch (a batch with completions is refused)."""
        if bool((batch.span_end > batch.span_start).any()):
            raise InvalidInputError("steering a generation needs a batch of prompts without teacher-forced "
                                    "completions")
        cols = {"prompt_last": batch.prompt_last.cpu()}
        if batch.input_last is not None:
            cols["input_last"] = batch.input_last.cpu()
        return cls(prompt_len=batch.seq_len, real=batch.inputs["attention_mask"].bool().cpu(), read_columns=cols)


@dataclass
class Step:
    """One forward call: how many positions are already cached, how many are new, how many rows."""

    past_len: int
    cur_len: int
    rows: int
    layout: Layout
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # per device, built once per call

    def contains(self, column: int) -> bool:
        """Whether absolute column ``column`` is among this call's columns."""
        return self.past_len <= column < self.past_len + self.cur_len


class VectorProvider(Protocol):
    """Supplies the vector to add at a layer; may read an earlier (or the same) layer of the pass first."""

    @property
    def read_layers(self) -> tuple[int, ...]:
        """Layers whose outputs the provider reads before writing (L' for L2S)."""
        ...

    @property
    def write_layers(self) -> tuple[int, ...]:
        """Layers it adds vectors to (L*)."""
        ...

    def observe(self, layer: int, hidden: torch.Tensor, step: Step) -> None:
        """Called with a read layer's output in every forward call."""
        ...

    def vector(self, layer: int, step: Step) -> torch.Tensor | None:
        """The vector(s) to add at ``layer`` in this call ([D] or [rows, D]); None: not known yet.

        The same tensor object for as long as the vector stays the same: steer() computes and checks the
        addition once per returned object."""
        ...


@dataclass
class FixedVectors:
    """Fixed vectors: a :class:`SteeringVector` (``[D]`` shared, or ``[B, D]`` one per prompt row)."""

    vectors: SteeringVector

    @property
    def read_layers(self) -> tuple[int, ...]:
        """None: fixed vectors read nothing."""
        return ()

    @property
    def write_layers(self) -> tuple[int, ...]:
        """The vector's layers."""
        return tuple(self.vectors)

    def observe(self, layer: int, hidden: torch.Tensor, step: Step) -> None:
        """Nothing to read."""
        return None

    def vector(self, layer: int, step: Step) -> torch.Tensor | None:
        """The stored vector of ``layer``."""
        return self.vectors.layers.get(layer)


@dataclass
class PredictedVectors:
    """Input-dependent vectors: ``predict(h)`` of each row's context hidden state, added at the steering layers.

    ``h`` is the output of block ``context_layer`` at ``position`` (``prompt_last``: the last prompt token,
    generation prompt included; ``input_last``: the last token of the user turn before the generation
    prompt). It is read in whichever forward call contains that column, before any write of this pass at
    the same layer, so a steering layer at or after the context layer sees the unsteered state; the
    vector is then reused for every later step. ``predict`` runs on its own device
    (:func:`~learn2steer.rules.predict_checked`: the input is moved there and the output back), so a
    predictor is never moved in place.
    """

    predict: Callable[[torch.Tensor], torch.Tensor]
    context_layer: int
    steer_layers: tuple[int, ...]
    position: str = "prompt_last"
    current: torch.Tensor | None = None

    @property
    def read_layers(self) -> tuple[int, ...]:
        """The context layer L'."""
        return (self.context_layer,)

    @property
    def write_layers(self) -> tuple[int, ...]:
        """The steering layers L*."""
        return self.steer_layers

    def observe(self, layer: int, hidden: torch.Tensor, step: Step) -> None:
        """Predict each row's vector when this call holds the read column (else keep the last one)."""
        if self.position not in step.layout.read_columns:
            raise InvalidInputError(f"this predictor reads position {self.position!r}, which the batch does not "
                                    "provide; build the batch with build_inputs(..., input_last=True)")
        first, last = step.layout.read_span(self.position)
        if not (step.contains(first) and step.contains(last)):  # the decode steps: two integer comparisons
            return
        cols = step.layout.read_columns[self.position]
        rows = hidden.shape[0]
        cols = cols.repeat_interleave(rows // cols.shape[0]) if rows != cols.shape[0] else cols
        local = (cols - step.past_len).to(hidden.device)
        h = hidden[torch.arange(rows, device=hidden.device), local].float()
        self.current = predict_checked(self.predict, h).to(hidden.device)

    def vector(self, layer: int, step: Step) -> torch.Tensor | None:
        """The predicted vectors ([rows, D]), or None before the read column was seen."""
        return self.current


@dataclass
class TraceRecord:
    """One write: the layer, the call's cache offset, and per row the absolute columns that were steered."""

    layer: int
    past_len: int
    columns: list[list[int]]


def _expand_rows(v: torch.Tensor, rows: int) -> torch.Tensor:
    """Match per-row vectors to a batch grown by beam search / num_return_sequences (rows contiguous)."""
    if v.dim() == 1 or v.shape[0] == rows:
        return v
    if rows % v.shape[0]:
        raise InvalidInputError(f"per-row steering vectors have {v.shape[0]} rows but the model batch has {rows}; "
                                "pass one vector per input row (or a single [D] vector)")
    return v.repeat_interleave(rows // v.shape[0], dim=0)


def _provider(handle: ModelHandle, vectors: SteeringVector | VectorProvider) -> VectorProvider:
    if isinstance(vectors, SteeringVector):
        if vectors.hidden_size != handle.hidden_size:
            raise InvalidInputError(f"steering vector has hidden size {vectors.hidden_size}, but the model needs "
                                    f"{handle.hidden_size}; was it made for another model?")
        return FixedVectors(vectors.on_layers(handle.num_layers))
    if isinstance(vectors, dict):
        raise InvalidInputError("steer() takes a SteeringVector (learn2steer.SteeringVector({layer: tensor})) "
                                "or a vector provider, not a plain dict")
    return vectors


@dataclass
class _Write:
    """One layer's addition for one vector: computed and checked when the vector first appears, reused after."""

    source: torch.Tensor      # the provider's tensor it was made from (compared by identity)
    key: tuple[Any, ...]      # rows, device, dtype of the calls it fits
    delta: torch.Tensor | None  # alpha * v ready to add (absolute strength); None: per position (relative)
    v: torch.Tensor           # the vector, rows expanded, on the calls' device and dtype


class _Hooks:
    """The state of one steer(): everything checked at entry; per call, only what must be per call."""

    def __init__(self, handle: ModelHandle, vectors: SteeringVector | VectorProvider, batch: Batch, alpha: float,
                 scope: Scope | str, strength: Strength | str, trace: list[TraceRecord] | None,
                 max_relative: float | None) -> None:
        dtype = handle.dtype if handle.dtype.is_floating_point else torch.float32  # alpha * v is taken in this dtype
        self.alpha = check_alpha(alpha, dtype=dtype, what="steering strength alpha")
        self.scope, self.strength = Scope.parse(scope), Strength.parse(strength)
        self.provider = _provider(handle, vectors)
        self.write_layers = [handle.check_layer(layer) for layer in self.provider.write_layers]
        self.read_layers = [handle.check_layer(layer) for layer in self.provider.read_layers]
        if self.read_layers and reads_after_writing(min(self.read_layers), self.write_layers):
            raise InvalidInputError(
                f"this provider reads layer {min(self.read_layers)} but writes layer {min(self.write_layers)} earlier "
                "in the same pass, so the write would change what it reads; read the context first (read() up to "
                "the context layer) and steer with the resulting vectors, as the HF engine does for L' > L*")
        self.layout = Layout.of(batch)
        self.trace, self.max_relative = trace, max_relative
        self.step = Step(0, 0, 0, self.layout)
        self.made: dict[int, _Write] = {}

    def pre_hook(self, _module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Every model call: how many positions it has cached (read from the call), how many are new."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        ref = ids if ids is not None else kwargs.get("inputs_embeds")
        if ref is None:
            raise RuntimeError("steering needs input_ids or inputs_embeds in the model call")
        rows, cur = int(ref.shape[0]), int(ref.shape[1])
        self.step = Step(cached_positions(args, kwargs, cur), cur, rows, self.layout)

    def layer_hook(self, layer: int) -> Callable[..., object]:
        """The forward hook of decoder block ``layer``: read (the provider observes), then write."""
        reads, writes = layer in self.read_layers, layer in self.write_layers

        def hook(_module: torch.nn.Module, _args: object, output: object) -> object:
            hidden = layer_output(output)
            if reads:
                self.provider.observe(layer, hidden, self.step)
            if not writes:
                return None
            steered = self.write(layer, hidden, self.step)
            if steered is None:
                return None
            return (steered, *output[1:]) if isinstance(output, tuple) else steered
        return hook

    def write(self, layer: int, hidden: torch.Tensor, step: Step) -> torch.Tensor | None:
        """``hidden`` with this call's steered columns written (None: nothing to write in this call)."""
        decoding = step.past_len >= self.layout.prompt_len  # only generated (hence real) columns
        if decoding and self.scope is Scope.PROMPT:
            if self.trace is not None:
                self.trace.append(TraceRecord(layer, step.past_len, [[] for _ in range(hidden.shape[0])]))
            return None
        mask = None  # None: every column of this call (the decode fast path)
        if not decoding:
            key = str(hidden.device)
            mask = step.masks.get(key)
            if mask is None:
                mask = step.masks[key] = step_mask(self.scope, self.layout.real_on(hidden.device), step.past_len,
                                                   step.cur_len, step.rows)
        v = self.provider.vector(layer, step)
        if v is None:
            if mask is None or bool(mask.any()):
                raise InvalidInputError(
                    "the predicted steering vector is not known yet: this call steers prompt positions "
                    "before the last prompt token was read (chunked prefill or an existing cache with "
                    f"scope {self.scope.value!r}); use scope='generated' or let the engine read first")
            return None
        if self.trace is not None:
            cols = (torch.ones(hidden.shape[0], step.cur_len, dtype=torch.bool) if mask is None else mask.cpu())
            self.trace.append(TraceRecord(layer, step.past_len,
                                          [(torch.nonzero(r).flatten() + step.past_len).tolist() for r in cols]))
        w = self.prepared(layer, v, hidden)
        delta = w.delta if w.delta is not None else addition(w.v, hidden, self.alpha, self.strength)
        return hidden + delta if mask is None else torch.where(mask.unsqueeze(-1), hidden + delta, hidden)

    def prepared(self, layer: int, v: torch.Tensor, hidden: torch.Tensor) -> _Write:
        """The layer's write for vector ``v`` in calls shaped like ``hidden``; a new vector is checked here, once
        (finite in the model's dtype, bounded against the residual norm of this call: check_strength)."""
        key = (hidden.shape[0], hidden.device, hidden.dtype)
        w = self.made.get(layer)
        if w is not None and w.source is v and w.key == key:
            return w
        ready = _expand_rows(v.to(hidden.device, hidden.dtype), hidden.shape[0])
        delta = addition(ready, hidden, self.alpha, self.strength)
        if w is None or w.source is not v:
            check_strength(delta, residual_norm(hidden), self.alpha, self.max_relative, hidden.dtype)
        self.made[layer] = w = _Write(v, key, delta if self.strength is Strength.ABSOLUTE else None, ready)
        return w


@contextmanager
def steer(handle: ModelHandle, vectors: SteeringVector | VectorProvider, *, batch: Batch, alpha: float = 1.0,
          scope: Scope | str = Scope.ALL, trace: list[TraceRecord] | None = None,
          max_relative: float | None = MAX_RELATIVE_STRENGTH, strength: Strength | str = Strength.ABSOLUTE
          ) -> Iterator[None]:
    """Add ``alpha * v`` to the output of decoder block(s) while the context is open.

    ``vectors`` is a :class:`SteeringVector` (``[D]`` shared or ``[B, D]`` per row, per layer) or a
    provider such as :class:`PredictedVectors`. ``batch`` is the batch you generate from (or run forward): it
    tells where the prompt ends, which columns are padding and where a predictor reads, in every generation
    mode (with or without KV cache, chunked prefill, an existing cache, beam search). A zero vector leaves
    outputs bit-for-bit unchanged. ``max_relative`` bounds ``|alpha * v|`` against the residual stream's norm
    (see :func:`~learn2steer.rules.check_strength`; None: no bound). ``strength="relative"`` makes alpha a
    fraction of each position's residual norm (:class:`Strength`). Everything is checked before a hook is
    installed, except what depends on the vector and the residual (checked once per vector, at its first write).

    >>> with steer(h, SteeringVector({12: v}), alpha=0.5, batch=batch):   # doctest: +SKIP
    ...     out = h.model.generate(**batch.inputs, max_new_tokens=20)
    """
    hooks = _Hooks(handle, vectors, batch, alpha, scope, strength, trace, max_relative)
    installed = [handle.model.register_forward_pre_hook(hooks.pre_hook, with_kwargs=True)]
    try:
        for layer in sorted(set(hooks.read_layers) | set(hooks.write_layers)):
            installed.append(handle.layers[layer].register_forward_hook(hooks.layer_hook(layer)))
        yield
    finally:
        for h in installed:
            h.remove()
