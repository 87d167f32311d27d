"""The Hugging Face engine: transformers ``generate`` with learn2steer's hooks, in this process.

Steering is installed per batch with the batch itself, so the prompt boundary and padding are known
in every generation mode. L2S reads its context in the same forward pass when it can (L' <= L* and
the whole prompt in one call); otherwise (L' > L*, chunked prefill, an existing cache) a read pass
that stops at L' runs first and the predicted vectors are applied as per-row fixed vectors: the same
answers, one short extra pass.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Sequence, cast

import torch
from tqdm.auto import tqdm

from learn2steer.activations import Position, Site, read
from learn2steer.behaviours import Example
from learn2steer.methods import MethodConfig, prompt_rows
from learn2steer.models.calls import passes_cache
from learn2steer.models.loading import ModelHandle
from learn2steer.models.prompts import Batch, PromptRow, bare_prompts, build_inputs
from learn2steer.rules import predict_checked, reads_after_writing
from learn2steer.steering import FixedVectors, PredictedVectors, steer
from learn2steer.vectors import SteeringVector


@torch.no_grad()
def generate_tokens(handle: ModelHandle, batch: Batch, *, max_new_tokens: int = 64, do_sample: bool = False,
                    num_return_sequences: int = 1, **kwargs: Any) -> list[list[int]]:
    """The new token ids of each output row, up to and including the first end-of-sequence token.

    Returns ``batch.size * num_return_sequences`` lists, the n answers of each input row contiguous.
    """
    tok = handle.tokenizer
    gen_kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample,
                                  "pad_token_id": tok.pad_token_id, "num_return_sequences": num_return_sequences}
    if not do_sample:  # silence "temperature is set but do_sample=False" from models' generation configs
        gen_kwargs.update(temperature=None, top_p=None, top_k=None)
    gen_kwargs.update(kwargs)
    model: Any = handle.model  # a transformers GenerationMixin
    out = model.generate(**batch.inputs, **gen_kwargs)
    eos = model.generation_config.eos_token_id
    stops = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    rows = []
    for row in out[:, batch.seq_len:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        rows.append(row[:cut])
    return rows


def generate(handle: ModelHandle, batch: Batch, *, max_new_tokens: int = 64, do_sample: bool = False,
             num_return_sequences: int = 1, **kwargs: Any) -> list[str]:
    """Generate for a left-padded batch; decode the new tokens of each output row (special tokens dropped).

    Returns ``batch.size * num_return_sequences`` strings, the n answers of each input row contiguous.
    """
    ids = generate_tokens(handle, batch, max_new_tokens=max_new_tokens, do_sample=do_sample,
                          num_return_sequences=num_return_sequences, **kwargs)
    return [t.strip() for t in handle.tokenizer.batch_decode(ids, skip_special_tokens=True)]


def _prompt_in_pieces(gen_kwargs: dict[str, Any]) -> bool:
    """Will ``generate`` process the prompt in more than one forward call?"""
    return gen_kwargs.get("prefill_chunk_size") is not None or passes_cache(gen_kwargs)


def steering_for(handle: ModelHandle, cfg: MethodConfig, examples: Sequence[Example],
                 gen_kwargs: dict[str, Any] | None = None, *, rows: Sequence[PromptRow] | None = None
                 ) -> tuple[Batch, AbstractContextManager[None]]:
    """The batch of ``examples`` under ``cfg`` and the steering context to generate it in (a no-op for unsteered
    methods): everything one batch needs, in the order it is needed. ``rows``: prompt rows built by the caller
    (e.g. with a system message) instead of ``cfg``'s rows of the examples; ``examples`` still name the rows."""
    rows = prompt_rows(cfg, examples) if rows is None else list(rows)
    provider = cfg.provider_for([e.id for e in examples])
    batch = build_inputs(handle, rows)
    if provider is None:
        return batch, nullcontext()
    if isinstance(provider, PredictedVectors):
        ctx = handle.check_layer(provider.context_layer)
        writes = [handle.check_layer(x) for x in provider.steer_layers]
        if provider.position == "input_last" or reads_after_writing(ctx, writes) or _prompt_in_pieces(gen_kwargs or {}):
            # read h at L' first (a pass that stops there), then steer with the predicted per-row vectors.
            # input_last is read the official way: the bare prompt (no generation prompt) in a pass of its own,
            # which needs no token-prefix match between bare and full prompt (sentencepiece breaks that)
            if provider.position == "input_last":
                site = Site(ctx, "prompt_last")
                h = read(handle, bare_prompts(handle, batch.rows), [site])[site]
            else:
                site = Site(ctx, cast(Position, provider.position))
                h = read(handle, batch, [site])[site]
            v = predict_checked(provider.predict, h).float().cpu()
            provider = FixedVectors(SteeringVector({layer: v for layer in writes}))
    return batch, steer(handle, provider, alpha=cfg.alpha, scope=cfg.scope, batch=batch, strength=cfg.strength)


@dataclass
class HFEngine:
    """transformers ``generate`` in this process; ``gen_kwargs`` go to every ``generate`` call."""

    handle: ModelHandle
    gen_kwargs: dict[str, Any] = field(default_factory=dict)
    name: str = "hf"

    @property
    def model_name(self) -> str:
        """The handle's model name."""
        return self.handle.name

    def answer(self, cfg: MethodConfig, examples: Sequence[Example], *, max_new_tokens: int, batch_size: int,
               num_return_sequences: int = 1, progress: bool = True) -> list[list[str]]:
        """Answer ``examples`` under ``cfg`` in batches of ``batch_size`` (one list of n answers each)."""
        tok = self.handle.tokenizer
        ids = self.answer_tokens(cfg, examples, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 num_return_sequences=num_return_sequences, progress=progress)
        return [[t.strip() for t in tok.batch_decode(per_example, skip_special_tokens=True)] for per_example in ids]

    def answer_tokens(self, cfg: MethodConfig, examples: Sequence[Example], *, max_new_tokens: int, batch_size: int,
                      num_return_sequences: int = 1, progress: bool = True) -> list[list[list[int]]]:
        """Like :meth:`answer`, as token ids (through the first end-of-sequence token): engine conformance."""
        n = num_return_sequences
        out: list[list[list[int]]] = []
        for i in tqdm(range(0, len(examples), batch_size), desc=f"generate [{cfg.method}]", disable=not progress,
                      leave=False):
            chunk = examples[i:i + batch_size]
            batch, steering = steering_for(self.handle, cfg, chunk, self.gen_kwargs)
            with steering:
                flat = generate_tokens(self.handle, batch, max_new_tokens=max_new_tokens, num_return_sequences=n,
                                       **self.gen_kwargs)
            out.extend(flat[k * n:(k + 1) * n] for k in range(len(chunk)))
        return out
