"""The steering rules both engines obey, in one module that knows no engine and installs no hook.

What a steering write means is decided here once: the names of a :class:`Scope` and a :class:`Strength`, what a
valid alpha is (:func:`check_alpha`), the vector added at each position (:func:`addition`), which positions a
scope steers (:func:`scope_selects`), when an addition is refused (:func:`check_strength`), whether a method reads
its context (:func:`reads_context`) and whether that read sits after its first write (:func:`reads_after_writing`,
L' > L*), and how a predictor is run on a context hidden state (:func:`predict_checked`). The HF engine's hooks
(:mod:`learn2steer.steering`), the vLLM plan (:mod:`learn2steer.engines.vllm.plan`), the request format
(:mod:`learn2steer.engines.requests`), the artifacts and the configs import these, so the engines cannot drift
apart; this module imports nothing of learn2steer but its errors.
"""

from __future__ import annotations

import math
import numbers
from enum import Enum
from typing import Any, Callable, Iterable, Iterator, Literal, Protocol, Sequence, TypeVar, runtime_checkable

import torch

from learn2steer.errors import InvalidInputError

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



# ---- refusing an addition ------------------------------------------------------------------------------

MAX_RELATIVE_STRENGTH = 1e4
"""Default bound on ``|alpha * v| / |h|`` at the steered layer. Useful strengths are around 0.1-20 (the
paper's alphas with vectors of the residual's own scale); past about 1e4 the next layer norm's squares
overflow float32/bfloat16 and the answer is empty or NaN, so such a strength is a mistake, not a setting."""


def residual_norm(hidden: torch.Tensor) -> float:
    """The residual stream's typical norm in ``hidden`` ([..., D]): the median over its positions, in float32.

    Taken once per steered generation (at the first steered call, the prompt), not per decoding step: one
    device sync."""
    return float(hidden.float().norm(dim=-1).median())


def check_strength(delta: torch.Tensor, residual: float, alpha: float, max_relative: float | None,
                   dtype: torch.dtype) -> None:
    """Refuse an addition that is not finite in the model's dtype, or far larger than the residual stream.

    ``delta`` is ``alpha * v`` ([D] or [rows, D] or [rows, 1, D]) in the model's ``dtype``, ``residual`` the
    stream's norm where it is added (:func:`residual_norm`). Either problem would write inf/NaN (now or a few
    layers later) into the residual stream and the KV cache: an empty or garbage answer with no error. Both
    are known once the vector and the read are, so the engines call this once per vector, not per step.
    """
    if not bool(torch.isfinite(delta).all()):
        raise InvalidInputError(f"alpha={alpha:g} times the steering vector overflows {dtype} (inf or NaN); "
                                "use a smaller alpha")
    if max_relative is None:
        return
    added = float(delta.float().norm(dim=-1).max())
    if residual > 0 and added > max_relative * residual:
        raise InvalidInputError(
            f"alpha={alpha:g} adds a vector of norm {added:.3g}, {added / residual:.3g} times the residual stream's "
            f"norm ({residual:.3g}); more than {max_relative:g} times only produces overflow. Use a smaller alpha "
            "(or raise max_relative)")


# ---- methods that read their context ------------------------------------------------------------------

def reads_context(kind: str) -> bool:
    """Whether an artifact of ``kind`` predicts its vector from the input's own hidden state at its context layer
    (any predictor kind: L2S, CAST, ...) rather than storing a fixed one: the capability engines ask for."""
    return kind != "fixed"


def reads_after_writing(context_layer: int | None, steer_layers: Iterable[int]) -> bool:
    """L' > L*: the context is read at a layer after the first one written, so a read in the steered pass would
    see its own write; the read needs a pass of its own first (both engines do that). Layers non-negative."""
    return context_layer is not None and context_layer > min(steer_layers)


@runtime_checkable
class _HasParameters(Protocol):
    def parameters(self) -> Iterator[torch.nn.Parameter]: ...


def predictor_device(predict: Callable[[torch.Tensor], torch.Tensor]) -> torch.device | None:
    """Where a predictor's weights live (None: a plain callable, run wherever its input is)."""
    if isinstance(predict, _HasParameters):
        for p in predict.parameters():
            return p.device
    return None


def predict_checked(predict: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """``predict(h)`` for context hidden states ``h`` [rows, D], run on the predictor's own device (the input is
    moved there, so a predictor is never moved in place), refused when not finite: a NaN vector would be added
    to every steered position with no error. The result stays on the predictor's device."""
    dev = predictor_device(predict)
    with torch.no_grad():
        v = predict(h.to(dev) if dev is not None else h)
    if not bool(torch.isfinite(v).all()):
        raise InvalidInputError("the predictor produced NaN or inf steering vectors; check its weights "
                                "(and the model's dtype: float16 activations can overflow)")
    return v
