"""cached_positions(): the cache length of a model call, whatever transformers names its arguments."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from learn2steer.errors import InvalidInputError
from learn2steer.models.calls import cached_positions, passes_cache
from learn2steer.models.prompts import PromptRow, build_inputs
from learn2steer.steering import TraceRecord, steer
from learn2steer.vectors import SteeringVector


class _Cache:
    """A stand-in for a transformers Cache (the interface: get_seq_length)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def get_seq_length(self) -> int:
        return self.n


class _Opaque:
    """A cache-like object of a future release that learn2steer does not know how to read."""


IDS = torch.zeros(2, 1, dtype=torch.long)


@pytest.mark.parametrize("name", ["past_key_values", "cache", "kv_cache_v6"])
def test_a_cache_is_read_under_any_argument_name(name: str) -> None:
    # no attention mask: transformers 5.24 drops it when the batch has no padding
    assert cached_positions((), {"input_ids": IDS, name: _Cache(7), "use_cache": True}, 1) == 7
    assert passes_cache({name: _Cache(7)}) and not passes_cache({"max_new_tokens": 3})


def test_the_attention_mask_counts_when_no_cache_is_passed() -> None:
    assert cached_positions((), {"input_ids": IDS, "attention_mask": torch.ones(2, 9)}, 1) == 8
    assert cached_positions((), {"input_ids": IDS, "attention_mask": torch.ones(2, 9), "use_cache": False}, 9) == 0
    # a plain forward: nothing cached, nothing unknown
    assert cached_positions((IDS,), {"position_ids": IDS, "return_dict": True, "logits_to_keep": 0}, 1) == 0


def test_an_unreadable_cache_under_an_unknown_name_is_an_error_not_a_zero() -> None:
    with pytest.raises(InvalidInputError, match="cannot tell how many positions.*kv_cache_v6 \\(_Opaque\\)"):
        cached_positions((), {"input_ids": IDS, "kv_cache_v6": _Opaque(), "use_cache": True}, 1)
    # the legacy layout (a tuple of (key, value) tuples) is not read either
    legacy = ((torch.zeros(2, 1, 5, 4), torch.zeros(2, 1, 5, 4)),)
    with pytest.raises(InvalidInputError, match="cannot tell"):
        cached_positions((), {"input_ids": IDS, "past_key_values": legacy}, 1)


def test_a_cache_and_a_mask_that_disagree_are_an_error() -> None:
    with pytest.raises(InvalidInputError, match="disagree"):
        cached_positions((), {"input_ids": IDS, "cache": _Cache(3), "attention_mask": torch.ones(2, 9)}, 1)


def test_steer_refuses_a_generate_whose_cache_it_cannot_read(tiny_llama) -> None:
    """A simulated future release: generate passes the cache under a new name, wrapped in an unknown type."""
    h = tiny_llama
    batch = build_inputs(h, [PromptRow("how do i make a bomb ?")])  # one row: no padding, no attention mask

    def rename(_m: torch.nn.Module, args: tuple, kwargs: dict) -> tuple:
        kwargs = dict(kwargs)
        for name in ("past_key_values", "cache"):
            if name in kwargs:
                kwargs["kv_cache_v6"] = _Opaque()
                del kwargs[name]
        kwargs.pop("attention_mask", None)
        return args, kwargs

    hook = h.model.register_forward_pre_hook(rename, with_kwargs=True)  # runs before steer()'s own pre-hook
    try:
        with pytest.raises(InvalidInputError, match="kv_cache_v6"):
            with steer(h, SteeringVector({1: torch.ones(h.hidden_size)}), scope="generated", batch=batch):
                h.model.generate(**batch.inputs, max_new_tokens=3, do_sample=False,
                                 pad_token_id=h.tokenizer.pad_token_id)
    finally:
        hook.remove()


def test_steered_columns_of_an_unpadded_row_follow_the_cache(tiny_llama) -> None:
    """The 5.24 regression: a single row has no attention mask in decode calls; columns must still advance."""
    h = tiny_llama
    batch = build_inputs(h, [PromptRow("a cat")])
    trace: list[TraceRecord] = []
    with steer(h, SteeringVector({2: torch.ones(h.hidden_size)}), scope="generated", batch=batch, trace=trace):
        h.model.generate(**batch.inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                         pad_token_id=h.tokenizer.pad_token_id)
    p = batch.seq_len
    assert [(t.past_len, t.columns[0]) for t in trace] == [(0, [p - 1]), (p, [p]), (p + 1, [p + 1])]


def test_a_real_dynamic_cache_is_read(tiny_llama) -> None:
    h = tiny_llama
    cache = DynamicCache(config=h.model.config)
    batch = build_inputs(h, [PromptRow("a cat")])
    with torch.no_grad():
        h.model(**batch.inputs, past_key_values=cache, use_cache=True)
    assert cached_positions((), {"some_new_name": cache}, 1) == batch.seq_len
