"""Add vectors to the residual stream during forward passes and ``generate``.

Three pieces, each testable alone:

* **Position rules** (pure functions): :func:`scope_selects` says which absolute positions of a sequence
  a :class:`Scope` steers, given where the prompt ends; :func:`step_mask` turns that into the columns
  of one forward call of a left-padded batch (padding excluded, KV-cache offset applied). The vLLM
  engine uses the same :func:`scope_selects` on its flattened tokens, so both engines agree.
* **Providers**: :class:`FixedVectors` (a :class:`~learn2steer.vectors.SteeringVector`) and
  :class:`PredictedVectors` (any callable from a context hidden state to a vector: the L2S predictor,
  but the engine never needs to know that).
* :func:`steer`: a context manager that installs one pre-hook on the model (to learn each call's cache
  offset) and one hook per involved decoder layer, and removes them all on exit, exceptions included.

Where the prompt ends is taken from the :class:`~learn2steer.models.prompts.Batch` being generated,
never guessed from "the first call without cache": that guess is wrong without a KV cache, with chunked
prefill and when generation starts from an existing cache.
"""

from __future__ import annotations

import math
import numbers
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Iterator, Literal, Protocol, Sequence, TypeVar, runtime_checkable

import torch

from learn2steer.activations import layer_output
from learn2steer.errors import InvalidInputError
from learn2steer.models.calls import cached_positions
from learn2steer.models.loading import ModelHandle
from learn2steer.models.prompts import Batch
from learn2steer.vectors import SteeringVector

#: the names of :class:`Scope`, as config fields type them (the CLI's choices)
ScopeName = Literal["all", "prompt", "generated"]
#: the names of :class:`Strength`, as config fields type them (the CLI's choices)
StrengthName = Literal["absolute", "relative"]


_N = TypeVar("_N", bound="_Named")


class _Named(str, Enum):
    """A fixed set of names: ``parse`` turns a name into a member, an unknown name into one sentence that
    lists the valid ones (the enum's own ``ValueError`` names no choice)."""

    @classmethod
    def parse(cls: type[_N], value: Any) -> _N:
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(m.value for m in cls)
            raise InvalidInputError(f"unknown {cls.__name__.lower()} {value!r}; choose one of {names}") from None


class Scope(_Named):
    """Which positions a steering write touches.

    ``all``: every position, prompt and generated (the paper's setting).
    ``prompt``: prompt positions only (no effect on tokens fed back during decoding).
    ``generated``: the positions that produce new tokens: the last prompt token (its output is the first
    generated token) and every generated token after it.
    """

    ALL = "all"
    PROMPT = "prompt"
    GENERATED = "generated"


class Strength(_Named):
    """What alpha measures.

    ``absolute``: the added vector is ``alpha * v`` (the paper's setting, and the default).
    ``relative``: at every steered position t the added vector is ``alpha * |h_t| * v / |v|``: alpha is a
    fraction of that position's own residual-stream norm (vllm-lens' ``norm_match``, hotwire's relative
    dose), so one alpha means the same push at every layer, model and token. A zero vector adds nothing.
    """

    ABSOLUTE = "absolute"
    RELATIVE = "relative"


# ---- the strength alpha ----------------------------------------------------------------------------------

def finite_in(value: Any, dtype: torch.dtype = torch.float32) -> bool:
    """True for a real number (not a bool) that stays finite in ``dtype``: the one test of "alpha is finite".

    1e308 is a finite Python float but inf in float32, and 1e5 is inf in float16: the engines multiply
    vectors of the model's dtype by alpha, so the bound is that dtype's largest value.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        x = float(value)
    except OverflowError:  # an int beyond every float
        return False
    return math.isfinite(x) and abs(x) <= torch.finfo(dtype).max


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_alpha(value: Any, *, dtype: torch.dtype = torch.float32, what: str = "alpha") -> float:
    """``value`` as a float when :func:`finite_in` ``dtype``; else one sentence naming it (every entry point of a
    strength calls this, so an overflowing alpha is refused before any model is loaded or any token written)."""
    if not finite_in(value, dtype):
        raise InvalidInputError(f"{what} must be a finite number (in {_dtype_name(dtype)}), got {value!r}; give a "
                                f"number of at most {torch.finfo(dtype).max:.3g} in size")
    return float(value)


def check_alphas(values: Sequence[Any], *, dtype: torch.dtype = torch.float32, what: str = "alphas") -> list[float]:
    """Every value of a sweep checked as :func:`check_alpha` does, the bad ones named in one sentence."""
    bad = [v for v in values if not finite_in(v, dtype)]
    if bad:
        raise InvalidInputError(f"{what} must be finite numbers (in {_dtype_name(dtype)}), got {bad}")
    return [float(v) for v in values]


def addition(v: torch.Tensor, residual: torch.Tensor, alpha: float, strength: "Strength | str") -> torch.Tensor:
    """The vector added at each position, broadcastable against ``residual``.

    ``v``: ``[D]`` or ``[rows, D]``; ``residual``: ``[rows, cols, D]`` (the HF engine) or ``[tokens, D]``
    with ``v`` already one row per token (the vLLM engine). Both engines call this one function, so they
    add the same numbers. The relative norm is taken in float32 whatever the model's dtype.
    """
    if Strength.parse(strength) is Strength.ABSOLUTE:
        delta = alpha * v
        return delta.unsqueeze(-2) if delta.dim() == 2 and residual.dim() == 3 else delta
    vf = v.float()
    unit = vf / vf.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    if unit.dim() == 2 and residual.dim() == 3:
        unit = unit.unsqueeze(-2)
    return (alpha * residual.float().norm(dim=-1, keepdim=True) * unit).to(residual.dtype)


# ---- position rules (pure) ------------------------------------------------------------------------------

def scope_selects(scope: Scope | str, positions: Any, prompt_len: Any) -> Any:
    """Bool mask: which ``positions`` (absolute, 0-based, in one sequence) ``scope`` steers.

    ``prompt_len`` is the number of prompt tokens (broadcast against ``positions``). This is the one
    definition of the prompt boundary that both engines use; it works on torch tensors, numpy arrays and
    plain integers alike (the vLLM plugin runs it on numpy, once per request and step).

    >>> scope_selects("generated", torch.arange(5), 3).tolist()
    [False, False, True, True, True]
    """
    scope = Scope.parse(scope)
    if scope is Scope.ALL:
        return positions >= 0  # every position (positions are never negative)
    if scope is Scope.PROMPT:
        return positions < prompt_len
    return positions >= prompt_len - 1


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

    def real_on(self, device: torch.device) -> torch.Tensor:
        """The padding mask on ``device`` (copied once per device, not at every step)."""
        key = str(device)
        if key not in self._on:
            self._on[key] = self.real.to(device)
        return self._on[key]

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
        """The vector(s) to add at ``layer`` in this call ([D] or [rows, D]); None: not known yet."""
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


@runtime_checkable
class _HasParameters(Protocol):
    def parameters(self) -> Iterator[torch.nn.Parameter]: ...


@dataclass
class PredictedVectors:
    """Input-dependent vectors: ``predict(h)`` of each row's context hidden state, added at the steering layers.

    ``h`` is the output of block ``context_layer`` at ``position`` (``prompt_last``: the last prompt token,
    generation prompt included; ``input_last``: the last token of the user turn before the generation
    prompt). It is read in whichever forward call contains that column, before any write of this pass at
    the same layer, so a steering layer at or after the context layer sees the unsteered state; the
    vector is then reused for every later step. ``predict`` runs on its own device (the input is moved
    there and the output back), so a predictor is never moved in place.
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

    def _device(self) -> torch.device | None:
        if isinstance(self.predict, _HasParameters):
            for p in self.predict.parameters():
                return p.device
        return None

    def observe(self, layer: int, hidden: torch.Tensor, step: Step) -> None:
        """Predict each row's vector when this call holds the read column (else keep the last one)."""
        cols = step.layout.read_columns.get(self.position)
        if cols is None:
            raise InvalidInputError(f"this predictor reads position {self.position!r}, which the batch does not "
                                    "provide; build the batch with build_inputs(..., input_last=True)")
        rows = hidden.shape[0]
        cols = cols.repeat_interleave(rows // cols.shape[0]) if rows != cols.shape[0] else cols
        if not all(step.contains(int(c)) for c in cols):
            return
        local = (cols - step.past_len).to(hidden.device)
        h = hidden[torch.arange(rows, device=hidden.device), local].float()
        dev = self._device()
        with torch.no_grad():
            v = self.predict(h.to(dev) if dev is not None else h)
        if not bool(torch.isfinite(v).all()):
            raise InvalidInputError("the predictor produced NaN or inf steering vectors; check its weights "
                                    "(and the model's dtype: float16 activations can overflow)")
        self.current = v.to(hidden.device)

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


MAX_RELATIVE_STRENGTH = 1e4
"""Default bound on ``|alpha * v| / |h|`` at the steered layer. Useful strengths are around 0.1-20 (the
paper's alphas with vectors of the residual's own scale); past about 1e4 the next layer norm's squares
overflow float32/bfloat16 and the answer is empty or NaN, so such a strength is a mistake, not a setting."""


def check_strength(delta: torch.Tensor, hidden: torch.Tensor, alpha: float, max_relative: float | None) -> None:
    """Refuse an addition that is not finite in the model's dtype, or far larger than the residual stream.

    ``delta`` is ``alpha * v`` ([D] or [rows, D] or [rows, 1, D]) in the hidden states' dtype, ``hidden`` the
    layer's output of this call. Either problem would write inf/NaN (now or a few layers later) into the
    residual stream and the KV cache: an empty or garbage answer with no error.
    """
    if not bool(torch.isfinite(delta).all()):
        raise InvalidInputError(f"alpha={alpha:g} times the steering vector overflows {hidden.dtype} (inf or NaN); "
                                "use a smaller alpha")
    if max_relative is None:
        return
    added = float(delta.float().norm(dim=-1).max())
    residual = float(hidden.float().norm(dim=-1).median())
    if residual > 0 and added > max_relative * residual:
        raise InvalidInputError(
            f"alpha={alpha:g} adds a vector of norm {added:.3g}, {added / residual:.3g} times the residual stream's "
            f"norm ({residual:.3g}); more than {max_relative:g} times only produces overflow. Use a smaller alpha "
            "(or raise max_relative)")


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


@contextmanager
def steer(handle: ModelHandle, vectors: SteeringVector | VectorProvider, *, alpha: float = 1.0,
          scope: Scope | str = Scope.ALL, batch: Batch | None = None, trace: list[TraceRecord] | None = None,
          max_relative: float | None = MAX_RELATIVE_STRENGTH, strength: Strength | str = Strength.ABSOLUTE
          ) -> Iterator[None]:
    """Add ``alpha * v`` to the output of decoder block(s) while the context is open.

    ``vectors`` is a :class:`SteeringVector` (``[D]`` shared or ``[B, D]`` per row, per layer) or a
    provider such as :class:`PredictedVectors`. Pass the ``batch`` you generate from: it tells where the
    prompt ends, which columns are padding and where a predictor reads, in every generation mode (with or
    without KV cache, chunked prefill, an existing cache, beam search). Without ``batch`` each call
    without cache starts a new sequence whose prompt is that call's input (right for plain forwards and
    ordinary cached ``generate``); modes where that guess would be wrong raise an error instead. A zero
    vector leaves outputs bit-for-bit unchanged. ``max_relative`` bounds ``|alpha * v|`` against the
    residual stream's norm (see :func:`check_strength`; None: no bound). ``strength="relative"`` makes
    alpha a fraction of each position's residual norm (:class:`Strength`).

    >>> with steer(h, SteeringVector({12: v}), alpha=0.5, batch=batch):   # doctest: +SKIP
    ...     out = h.model.generate(**batch.inputs, max_new_tokens=20)
    """
    dtype = handle.dtype if handle.dtype.is_floating_point else torch.float32  # alpha * v is taken in this dtype
    check_alpha(alpha, dtype=dtype, what="steering strength alpha")
    scope = Scope.parse(scope)
    strength = Strength.parse(strength)
    provider = _provider(handle, vectors)
    write_layers = [handle.check_layer(layer) for layer in provider.write_layers]
    read_layers = [handle.check_layer(layer) for layer in provider.read_layers]
    predicted = bool(read_layers)
    if predicted and min(read_layers) > min(write_layers):
        raise InvalidInputError(
            f"this provider reads layer {min(read_layers)} but writes layer {min(write_layers)} earlier in the same "
            "pass, so the write would change what it reads; read the context first (read() up to the context "
            "layer) and steer with the resulting vectors, as the HF engine does for L' > L*")
    boundary_matters = predicted or scope is not Scope.ALL
    fixed_layout = Layout.of(batch) if batch is not None else None
    state: dict[str, Step] = {}
    checked: dict[int, torch.Tensor] = {}  # layer -> the last vector whose strength was checked

    def pre_hook(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        ref = ids if ids is not None else kwargs.get("inputs_embeds")
        if ref is None:
            raise RuntimeError("steering needs input_ids or inputs_embeds in the model call")
        rows, cur = int(ref.shape[0]), int(ref.shape[1])
        mask = kwargs.get("attention_mask")
        mask2d = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        past = cached_positions(args, kwargs, cur)
        layout = fixed_layout
        if layout is None:
            problem = None
            if kwargs.get("use_cache") is False:
                problem = "generation without KV cache (use_cache=False)"
            elif past > 0 and cur > 1:
                problem = "a prompt processed in pieces (chunked prefill, or generation from an existing cache)"
            if problem is not None and boundary_matters:
                raise InvalidInputError(f"steer() cannot tell where the prompt ends in {problem}; pass the "
                                        "batch being generated: steer(..., batch=batch)")
            prev = state.get("step")
            if past == 0 or prev is None:
                real = (mask2d[:, -cur:].bool() if mask2d is not None
                        else torch.ones(rows, cur, dtype=torch.bool, device=ref.device)).cpu()
                layout = Layout(prompt_len=past + cur, real=real,
                                read_columns={"prompt_last": torch.full((rows,), past + cur - 1)})
                if predicted and past > 0:
                    raise InvalidInputError("steer() without batch= needs the prompt in the first call; pass "
                                            "the batch being generated")
            else:
                layout = prev.layout
        state["step"] = Step(past, cur, rows, layout)

    def make_hook(layer: int) -> Callable[..., object]:
        reads, writes = layer in read_layers, layer in write_layers

        def hook(_module: torch.nn.Module, _args: object, output: object) -> object:
            hidden = layer_output(output)
            step = state["step"]
            if reads:
                provider.observe(layer, hidden, step)
            if not writes:
                return None
            decoding = step.past_len >= step.layout.prompt_len  # only generated (hence real) columns
            if decoding and scope is Scope.PROMPT:
                if trace is not None:
                    trace.append(TraceRecord(layer, step.past_len, [[] for _ in range(hidden.shape[0])]))
                return None
            mask = None  # None: every column of this call (the decode fast path)
            if not decoding:
                key = str(hidden.device)
                mask = step.masks.get(key)
                if mask is None:
                    mask = step.masks[key] = step_mask(scope, step.layout.real_on(hidden.device), step.past_len,
                                                       step.cur_len, step.rows)
            v = provider.vector(layer, step)
            if v is None:
                if mask is None or bool(mask.any()):
                    raise InvalidInputError(
                        "the predicted steering vector is not known yet: this call steers prompt positions "
                        "before the last prompt token was read (chunked prefill or an existing cache with "
                        f"scope {scope.value!r}); use scope='generated' or let the engine read first")
                return None
            if trace is not None:
                cols = (torch.ones(hidden.shape[0], step.cur_len, dtype=torch.bool) if mask is None else mask.cpu())
                trace.append(TraceRecord(layer, step.past_len,
                                         [(torch.nonzero(r).flatten() + step.past_len).tolist() for r in cols]))
            delta = addition(_expand_rows(v.to(hidden.device, hidden.dtype), hidden.shape[0]), hidden, alpha, strength)
            if checked.get(layer) is not v:  # once per vector and layer: one device sync, not one per step
                check_strength(delta, hidden, alpha, max_relative)
                checked[layer] = v
            steered = hidden + delta if mask is None else torch.where(mask.unsqueeze(-1), hidden + delta, hidden)
            if isinstance(output, tuple):
                return (steered, *output[1:])
            return steered
        return hook

    hooks = [handle.model.register_forward_pre_hook(pre_hook, with_kwargs=True)]
    try:
        for layer in sorted(set(read_layers) | set(write_layers)):
            hooks.append(handle.layers[layer].register_forward_hook(make_hook(layer)))
        yield
    finally:
        for h in hooks:
            h.remove()
