"""Requests written for vllm-lens (``extra_args`` / ``vllm_xargs`` ``apply_steering_vectors``), read with the same
meaning, so its users can switch servers without rewriting clients.

vllm-lens 1.3.0's wire format (its ``SteeringVector.model_dump()``, sent JSON-encoded as one string by its client)::

    [{"activations": {"data": "<base64>", "dtype": "float32", "shape": [n_layers, hidden],
                      "compression": "zstd", "original_dtype": "torch.float32"},
      "layer_indices": [12], "scale": 4.0, "norm_match": false, "position_indices": null}, ...]

vllm-lens adds ``scale * activations[i]`` to the output of decoder layer ``layer_indices[i]`` at every position
of the request, prompt and generated (learn2steer's scope ``all`` at ``steer_layers``; both add to what Hugging
Face calls the layer's output, which is why the two plugins gave identical tokens in ``benchmarks/peers.py``);
``norm_match`` adds ``scale * |h| * v / |v|`` instead (learn2steer's ``strength: relative``). Several entries add
up. The field-by-field mapping, and what is refused (a 400 naming the field), is in docs/SERVING.md.

Pure numpy (no vLLM, no torch), like :mod:`learn2steer.engines.requests`, which calls :func:`decode`.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from learn2steer.errors import InvalidInputError

KEY = "apply_steering_vectors"
#: vllm-lens request keys learn2steer does not serve (activation capture, hooks): a 400 naming the key
UNSUPPORTED = {
    "apply_hooks": "hooks are Python callables sent with cloudpickle, which this server never unpickles",
    "output_residual_stream": "this server steers but does not return activations",
    "output_qk": "this server steers but does not return attention queries and keys",
    "activations_transport": "this server steers but does not return activations",
}
FIELDS = ("activations", "layer_indices", "scale", "norm_match", "position_indices")
_DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64, "int16": np.int16}
_FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class InlineLimits:
    """How much an inline request may carry (operator settings of ``l2s serve --inline-vectors``)."""

    max_vectors: int = 8             # (layer, vector) rows in one request, over all entries
    max_hidden: int = 16384          # the length of one vector

    @property
    def max_chars(self) -> int:
        """The longest ``apply_steering_vectors`` string accepted (base64 float32 plus JSON overhead)."""
        return self.max_vectors * self.max_hidden * 4 * 4 // 3 + 4096 * self.max_vectors


@dataclass(frozen=True)
class Inline:
    """A vllm-lens request, resolved: one vector per steered layer, added as ``alpha * v`` (or norm-relative)."""

    vectors: tuple[tuple[int, tuple[float, ...]], ...]   # (layer, vector), sorted by layer
    alpha: float
    strength: str                                         # "absolute" | "relative"

    @property
    def hidden_size(self) -> int:
        return len(self.vectors[0][1])


def _fail(field: str, why: str) -> InvalidInputError:
    return InvalidInputError(f"vllm_xargs {field}: {why}")


def _tensor(value: Any, field: str, limits: InlineLimits) -> np.ndarray:
    """vllm-lens's base64 tensor dict (or, beyond vllm-lens, a nested JSON list) as a float64 array."""
    if isinstance(value, list):
        try:
            arr = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError):
            raise _fail(field, "a nested list of numbers must be rectangular") from None
        return arr
    if not isinstance(value, dict) or "data" not in value:
        raise _fail(field, "must be vllm-lens's tensor object {\"data\": base64, \"dtype\", \"shape\"} or a nested "
                           "list of numbers")
    if "handle" in value:
        raise _fail(field, "binary-transport handles are not accepted; send the data inline")
    dtype = value.get("dtype")
    if dtype not in _DTYPES:
        raise _fail(f"{field}.dtype", f"must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    shape = value.get("shape")
    if not isinstance(shape, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                              for x in shape):
        raise _fail(f"{field}.shape", "must be a list of sizes")
    if math.prod(shape) > limits.max_vectors * limits.max_hidden:
        raise _fail(f"{field}.shape", f"{shape} is larger than this server accepts ({limits.max_vectors} vectors "
                                      f"of at most {limits.max_hidden} values)")
    try:
        raw = base64.b64decode(value["data"], validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise _fail(f"{field}.data", "is not base64") from None
    compression = value.get("compression")
    if compression == "zstd":
        try:
            import zstandard
        except ImportError:
            raise _fail(f"{field}.compression", "zstd needs the zstandard package, which this server lacks; send "
                                                "uncompressed data (no 'compression') or install zstandard") from None
        try:
            limit = math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize
            raw = zstandard.ZstdDecompressor().decompress(raw, max_output_size=limit)
        except zstandard.ZstdError:
            raise _fail(f"{field}.data", "is not a zstd frame of the given shape") from None
    elif compression is not None:
        raise _fail(f"{field}.compression", f"must be 'zstd' or absent, got {compression!r}")
    np_dtype = np.dtype(_DTYPES[dtype])
    if len(raw) != math.prod(shape) * np_dtype.itemsize:
        raise _fail(f"{field}.data", f"holds {len(raw)} bytes, not a {dtype} tensor of shape {shape}")
    arr = np.frombuffer(raw, dtype=np_dtype).reshape(shape)
    if value.get("original_dtype") == "torch.bfloat16":
        if dtype != "int16":
            raise _fail(f"{field}.original_dtype", "bfloat16 data must be stored as int16 (vllm-lens's encoding)")
        arr = (arr.astype(np.uint16).astype(np.uint32) << 16).view(np.float32)
    elif dtype == "int16":
        raise _fail(f"{field}.dtype", "int16 data is only accepted as vllm-lens's bfloat16 encoding")
    return arr.astype(np.float64)


def decode(value: Any, limits: InlineLimits, max_alpha: float) -> Inline:
    """``apply_steering_vectors`` (a JSON string or an already-parsed list) as learn2steer's inline steering."""
    if isinstance(value, str):
        if len(value) > limits.max_chars:
            raise _fail(KEY, f"is {len(value)} characters, more than this server accepts ({limits.max_chars})")
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise _fail(KEY, "is not valid JSON") from None
    if not isinstance(value, list) or not value:
        raise _fail(KEY, "must be a non-empty list of steering vectors")
    if len(value) > limits.max_vectors:
        raise _fail(KEY, f"holds {len(value)} vectors; this server accepts at most {limits.max_vectors}")
    rows: list[tuple[int, float, bool, np.ndarray]] = []
    for i, sv in enumerate(value):
        where = f"{KEY}[{i}]"
        if not isinstance(sv, dict):
            raise _fail(where, "must be an object with activations and layer_indices")
        extra = sorted(set(sv) - set(FIELDS))
        if extra:
            raise _fail(f"{where}.{extra[0]}", "is not a vllm-lens SteeringVector field")
        if sv.get("position_indices") is not None:
            raise _fail(f"{where}.position_indices", "position-specific vectors are not supported; send one "
                                                     "vector per layer (added at every position)")
        if "activations" not in sv or "layer_indices" not in sv:
            raise _fail(where, "needs activations and layer_indices")
        arr = _tensor(sv["activations"], f"{where}.activations", limits)
        if arr.ndim != 2:
            raise _fail(f"{where}.activations", f"must be 2-D (layers x hidden size), got {arr.ndim}-D"
                        + ("; position-specific (3-D) vectors are not supported" if arr.ndim == 3 else ""))
        layers = sv["layer_indices"]
        if not isinstance(layers, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                                   for x in layers) or len(set(layers)) != len(layers):
            raise _fail(f"{where}.layer_indices", "must be a list of distinct layer indices >= 0")
        if len(layers) != arr.shape[0]:
            raise _fail(f"{where}.layer_indices", f"names {len(layers)} layers but activations has {arr.shape[0]} "
                                                  "rows")
        if not 0 < arr.shape[1] <= limits.max_hidden:
            raise _fail(f"{where}.activations", f"vectors of size {arr.shape[1]} are not accepted")
        if not np.isfinite(arr).all() or np.abs(arr).max() > _FLOAT32_MAX:
            raise _fail(f"{where}.activations", "must be finite (in float32)")
        scale = sv.get("scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) \
                or abs(scale) > _FLOAT32_MAX:
            raise _fail(f"{where}.scale", f"must be a finite number, got {scale!r}")
        if abs(scale) > max_alpha:
            raise _fail(f"{where}.scale", f"|scale| must be at most {max_alpha:g} on this server (the operator's "
                                          "bound on alpha)")
        norm = sv.get("norm_match", False)
        if not isinstance(norm, bool):
            raise _fail(f"{where}.norm_match", f"must be true or false, got {norm!r}")
        rows += [(layer, float(scale), norm, arr[j]) for j, layer in enumerate(layers)]
    if len(rows) > limits.max_vectors:
        raise _fail(KEY, f"holds {len(rows)} (layer, vector) rows; this server accepts at most {limits.max_vectors}")
    if len({r[3].shape[0] for r in rows}) != 1:
        raise _fail(KEY, "every vector must have the model's hidden size")
    if any(r[2] for r in rows):
        if len(value) != 1:
            raise _fail(f"{KEY}[*].norm_match", "is supported for a request with one steering vector entry")
        return Inline(tuple(sorted((r[0], tuple(float(x) for x in r[3])) for r in rows)), rows[0][1], "relative")
    if len(value) == 1:  # one entry: its scale is alpha, as vllm-lens multiplies it
        return Inline(tuple(sorted((r[0], tuple(float(x) for x in r[3])) for r in rows)), rows[0][1], "absolute")
    summed: dict[int, np.ndarray] = {}
    for layer, scale, _, v in rows:  # several entries add up: one vector per layer, alpha 1
        summed[layer] = summed.get(layer, 0.0) + scale * v
    if any(not np.isfinite(v.astype(np.float32)).all() for v in summed.values()):
        raise _fail(KEY, "the vectors' sum is not finite in float32")
    return Inline(tuple((k, tuple(float(x) for x in summed[k].astype(np.float32))) for k in sorted(summed)), 1.0,
                  "absolute")
