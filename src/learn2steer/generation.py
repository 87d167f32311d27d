"""Greedy-by-default generation that returns only the new text of each row."""

from __future__ import annotations

from typing import Any

import torch

from learn2steer.models.loading import ModelHandle
from learn2steer.models.prompts import Batch


@torch.no_grad()
def generate(handle: ModelHandle, batch: Batch, *, max_new_tokens: int = 64, do_sample: bool = False,
             **kwargs: Any) -> list[str]:
    """Generate for a left-padded batch; decode the new tokens of each row (special tokens dropped)."""
    tok = handle.tokenizer
    gen_kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample,
                                  "pad_token_id": tok.pad_token_id}
    if not do_sample:  # silence "temperature is set but do_sample=False" from models' generation configs
        gen_kwargs.update(temperature=None, top_p=None, top_k=None)
    gen_kwargs.update(kwargs)
    out = handle.model.generate(**batch.inputs, **gen_kwargs)
    new = out[:, batch.seq_len:]
    return [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
