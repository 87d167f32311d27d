"""How many positions a model call has already cached, read from the call itself whatever its argument names.

Steering writes at absolute positions, so every forward call must say where its new tokens start. The KV
cache knows (its length), but transformers has passed it under different names (``past_key_values`` up to
5.23, ``cache`` from 5.24) and drops the attention mask from a call when the batch has no padding. A rule
that looks up one argument name therefore breaks silently on the next release. This module finds the
cache by *what it is* (any argument with a ``get_seq_length`` method, the transformers ``Cache``
interface), cross-checks it with the 2D attention mask when the call has one, and refuses a call that
carries an object it cannot read instead of guessing that nothing is cached.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from learn2steer.errors import InvalidInputError

_PLAIN = (bool, int, float, str, bytes, torch.dtype, torch.device)


def _is_plain(value: Any) -> bool:
    """Tensors, numbers, strings, and (nested) lists of them: arguments that never hold a KV cache."""
    if value is None or isinstance(value, (torch.Tensor, *_PLAIN)):
        return True
    if isinstance(value, list):  # image sizes, grid shapes, ...; a legacy cache is a tuple of tuples
        return all(_is_plain(v) for v in value)
    return False


def _is_cache(value: Any) -> bool:
    return callable(getattr(value, "get_seq_length", None))


def _named(args: Sequence[Any], kwargs: Mapping[str, Any]) -> list[tuple[str, Any]]:
    return [(f"positional argument {i}", v) for i, v in enumerate(args)] + list(kwargs.items())


def cached_positions(args: Sequence[Any], kwargs: Mapping[str, Any], new_tokens: int) -> int:
    """The number of positions cached before this call's ``new_tokens`` (0 for a call without cache).

    Sources, independent of the cache argument's name: (1) every argument that is a cache (has
    ``get_seq_length``), (2) a 2D ``attention_mask``, which covers cached and new columns. Sources that
    disagree, or an argument that is neither a cache nor plain data (tensors, numbers, strings, lists of
    them) while no source answers, raise :class:`InvalidInputError`: a silent 0 would steer the wrong
    positions.
    """
    named = _named(args, kwargs)
    lengths = {name: int(v.get_seq_length()) for name, v in named if _is_cache(v)}
    mask = kwargs.get("attention_mask")
    from_mask = None
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] >= new_tokens:
        from_mask = int(mask.shape[1]) - new_tokens
    found = set(lengths.values()) | ({from_mask} if from_mask is not None else set())
    if len(found) > 1:
        seen = ", ".join(f"{k} says {v}" for k, v in lengths.items())
        raise InvalidInputError(
            f"this model call's cache and attention mask disagree on how many positions are cached ({seen}, "
            f"the attention mask says {from_mask}); steering cannot place its writes; report this with your "
            "transformers version")
    if found:
        return found.pop()
    if kwargs.get("use_cache") is not False:
        unknown = [f"{name} ({type(v).__name__})" for name, v in named if not _is_plain(v)]
        if unknown:
            import transformers

            raise InvalidInputError(
                f"cannot tell how many positions this model call has cached: it passes {', '.join(unknown)}, "
                f"which is not a KV cache learn2steer can read (transformers {transformers.__version__}); "
                "install the tested versions with bash scripts/setup.sh, or report it")
    return 0


def passes_cache(kwargs: Mapping[str, Any]) -> bool:
    """Whether ``generate`` keyword arguments hand over an existing KV cache (under any name)."""
    return any(_is_cache(v) for v in kwargs.values())


def cache_argument(model: Any) -> str:
    """The keyword under which ``model``'s forward takes a KV cache, read from its signature.

    ``cache`` from transformers 5.24, ``past_key_values`` before; a model whose forward names neither is
    refused (passing the cache under the wrong name would silently recompute everything without it).
    """
    import inspect

    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise InvalidInputError(f"{type(model).__name__}.forward takes no KV cache argument learn2steer knows "
                            f"(its parameters: {', '.join(params)}); install the tested versions with "
                            "bash scripts/setup.sh, or report it")
