"""Steering vectors: the one vector type, and the baselines computed from extracted vectors.

:class:`SteeringVector` is what every stage passes around, from extraction to the hook that adds it:
a mapping decoder layer -> tensor, ``[D]`` (the same vector for every input) or ``[N, D]`` (one vector
per input row, as P2S produces). Keeping the layer key all the way down means a multi-layer vector
can never lose a layer or apply one layer's vector at another.

The baselines (Mean-S, Norm-Rnd, the per-group rescaling) are plain functions of vectors, so they live
beside the type; producing the per-input vectors from a model is :mod:`learn2steer.extraction`'s job,
which keeps this module free of models, prompts and files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import torch

from learn2steer.behaviours import ZERO
from learn2steer.errors import InvalidInputError

# ---- the vector type ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SteeringVector:
    """Vectors to add to the residual stream, keyed by decoder layer (the output of block ``layer``).

    Each tensor is ``[D]`` (shared by every input) or ``[N, D]`` (one row per input, in a known order).
    All layers have the same shape. Values must be finite: a NaN or inf vector would silently turn every
    answer into garbage, so it is refused here, where vectors are made.

    >>> v = SteeringVector({12: torch.ones(576)})
    >>> v.hidden_size, v.per_row
    (576, False)
    """

    layers: Mapping[int, torch.Tensor]

    def __post_init__(self) -> None:
        if not self.layers:
            raise InvalidInputError("a steering vector needs at least one layer")
        shapes = {tuple(t.shape) for t in self.layers.values()}
        if len(shapes) != 1:
            raise InvalidInputError(f"all layers of a steering vector must have one shape, got {sorted(shapes)}")
        shape = shapes.pop()
        if len(shape) not in (1, 2) or shape[-1] == 0:
            raise InvalidInputError(f"steering vectors are [D] or [rows, D], got shape {shape}")
        for layer, t in self.layers.items():
            if not isinstance(layer, int):
                raise InvalidInputError(f"steering vector layers must be integers, got {layer!r}")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise InvalidInputError(f"the steering vector for layer {layer} contains NaN or inf values; "
                                        "recompute it (check the extraction or the artifact file)")
        object.__setattr__(self, "layers", dict(sorted(self.layers.items())))

    @property
    def hidden_size(self) -> int:
        """D, the width of every vector."""
        return int(next(iter(self.layers.values())).shape[-1])

    @property
    def per_row(self) -> bool:
        """True when every input row has its own vector (``[N, D]``)."""
        return next(iter(self.layers.values())).dim() == 2

    @property
    def num_rows(self) -> int | None:
        """N for per-row vectors, None for shared ones."""
        return int(next(iter(self.layers.values())).shape[0]) if self.per_row else None

    def __iter__(self) -> Iterator[int]:
        return iter(self.layers)

    def __getitem__(self, layer: int) -> torch.Tensor:
        return self.layers[layer]

    def items(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(layer, tensor) pairs in layer order."""
        return iter(self.layers.items())

    def rows(self, index: torch.Tensor | Sequence[int]) -> "SteeringVector":
        """The per-row vectors of the rows in ``index`` (in that order)."""
        if not self.per_row:
            raise InvalidInputError("rows() needs a per-row steering vector ([N, D] per layer)")
        idx = torch.as_tensor(index, dtype=torch.long)
        return SteeringVector({k: v[idx] for k, v in self.layers.items()})

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "SteeringVector":
        """Apply ``fn`` to every layer's tensor (device moves, scaling, baselines)."""
        return SteeringVector({k: fn(v) for k, v in self.layers.items()})

    def on_layers(self, num_layers: int) -> "SteeringVector":
        """The same vector with negative layer indices resolved against a model of ``num_layers`` blocks."""
        out: dict[int, torch.Tensor] = {}
        for k, v in self.layers.items():
            if not -num_layers <= k < num_layers:
                raise InvalidInputError(f"steering vector layer {k} is out of range for a model with {num_layers} "
                                        f"decoder layers (valid: 0..{num_layers - 1}, or negative from the end)")
            out[k % num_layers] = v
        return SteeringVector(out)


# ---- baselines: plain functions over extracted vectors ------------------------------------------------

def mean_vector(z: SteeringVector, contrasts: Sequence[str] | None = None) -> SteeringVector:
    """Mean-S: the mean of the per-input vectors at every layer (inputs of the zero contrast left out)."""
    if not z.per_row:
        raise InvalidInputError("mean_vector needs per-input vectors ([N, D] per layer)")
    keep = torch.ones(z.num_rows or 0, dtype=torch.bool)
    if contrasts is not None:
        keep = torch.tensor([c != ZERO for c in contrasts], dtype=torch.bool)
    if not bool(keep.any()):
        raise InvalidInputError("no training vectors to average (every input maps to the zero contrast)")
    return z.map(lambda v: v[keep].mean(0))


def norm_random(z: SteeringVector, seed: int = 0) -> SteeringVector:
    """Norm-Rnd: per input and layer, a random direction (seeded) with the norm of that input's vector."""
    g = torch.Generator().manual_seed(seed)

    def one(v: torch.Tensor) -> torch.Tensor:
        d = torch.randn(v.shape, generator=g)
        return d / d.norm(dim=-1, keepdim=True) * v.norm(dim=-1, keepdim=True)

    return z.map(one)


def group_scales(z: torch.Tensor, contrasts: Sequence[str], reference: str) -> dict[str, float]:
    """One scalar per contrast group: mean norm of the ``reference`` group / mean norm of the group.

    This is the official code's per-group rescaling (e.g. consultation vectors brought to the norm of
    the decline vectors). Each group is multiplied by one number, so inputs keep their relative
    magnitudes. Groups with zero vectors (the zero contrast) are left at 1.
    """
    norms = z.norm(dim=-1)
    ref = [i for i, c in enumerate(contrasts) if c == reference]
    if not ref:
        return {}
    target = float(norms[ref].mean())
    scales: dict[str, float] = {}
    for c in sorted(set(contrasts)):
        idx = [i for i, x in enumerate(contrasts) if x == c]
        mean = float(norms[idx].mean())
        scales[c] = target / mean if mean > 0 and math.isfinite(mean) else 1.0
    return scales


def rescale_groups(z: SteeringVector, contrasts: Sequence[str], reference: str,
                   scales: Mapping[int, Mapping[str, float]] | None = None) -> SteeringVector:
    """Multiply every contrast group of ``z`` by its :func:`group_scales` scalar, per layer.

    ``scales`` (layer -> group -> scalar) applies scalars computed elsewhere (on the training split) to
    other inputs, so P2S at test time uses the very targets L2S was trained on.
    """
    out: dict[int, torch.Tensor] = {}
    for layer, v in z.items():
        s = scales[layer] if scales is not None else group_scales(v, contrasts, reference)
        factor = torch.tensor([s.get(c, 1.0) for c in contrasts], dtype=v.dtype)
        out[layer] = v * factor[:, None]
    return SteeringVector(out)
