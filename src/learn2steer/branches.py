"""Teacher-force several continuations of one prompt while computing the prompt only once.

P2S needs, per input X, the hidden states of X + T+ and X + T- at the answer. Run as two full sequences,
the shared X (for a vision-language model, hundreds of image tokens) is computed twice, and the L2S
context (the last prompt token of X) a third time. Here X runs once, with a KV cache, reading the context
layers on the way; the cache is repeated for each continuation and only the short continuations run
after it. Both passes stop after the deepest layer they need. The results equal the full-sequence reads
up to float rounding (``tests/test_branches.py``).

Positions are explicit: the prompt batch is left padded (positions from its mask, as ``forward_kwargs``
does), the continuations are right padded and continue each row's own count, so padding never shifts a
position. Models that derive multi-dimensional positions themselves (Qwen2-VL's M-RoPE) are not
branched: :func:`can_branch` says so and callers fall back to full sequences.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch

from learn2steer.activations import StopForward, layer_output
from learn2steer.errors import InvalidInputError
from learn2steer.models.calls import cache_argument
from learn2steer.models.loading import ModelHandle
from learn2steer.models.prompts import PromptRow, collate, encode_row, uses_own_position_ids

BranchRead = Literal["last", "completion_last", "completion_mean"]


@dataclass
class Branched:
    """What :func:`read_branches` returns (float32, CPU)."""

    targets: dict[int, torch.Tensor]   # layer -> [N, K, D]: each prompt's K continuations
    context: dict[int, torch.Tensor]   # layer -> [N, D]: the prompt's last token


def can_branch(handle: ModelHandle) -> bool:
    """Whether :func:`read_branches` supports this model (positions it can set explicitly)."""
    return not uses_own_position_ids(handle)


def _prompt_of(group: Sequence[PromptRow]) -> PromptRow:
    first = group[0]
    for row in group:
        if (row.text, row.image, row.system) != (first.text, first.image, first.system) or row.completion is None:
            raise InvalidInputError("read_branches needs, per group, rows that share one prompt and each have a "
                                    "completion")
        if row.close_turn != first.close_turn:
            raise InvalidInputError("read_branches needs the rows of a group to close (or leave open) the turn alike")
    return PromptRow(first.text, first.image, first.system)


def _continuation(handle: ModelHandle, row: PromptRow, *, check: bool) -> torch.Tensor:
    """The tokens a row adds after its prompt. Rendered without the image: image preprocessing is the
    dearest part of encoding, and the tokens after the prompt do not depend on it (the image placeholder
    is a special token that ends every merge before it). ``check``: compare with the rendering with the
    image once, so a template for which that does not hold fails loudly instead of reading wrong tokens."""
    bare = dataclasses.replace(row, image=None)
    full, n_prompt, _ = encode_row(handle, bare)  # checks that the prompt is a token prefix of the full row
    cont = full["input_ids"][0, n_prompt:]
    if check and row.image is not None:
        with_image, n_img, _ = encode_row(handle, row)
        if not torch.equal(with_image["input_ids"][0, n_img:], cont):
            raise InvalidInputError(f"the chat template of {handle.name or 'the model'} renders the answer "
                                    "differently with and without an image; read these rows as full sequences")
    return cont


def _hooks(handle: ModelHandle, layers: Sequence[int], take: Callable[[int, torch.Tensor], None]) -> list:
    deepest = max(layers)

    def make(layer: int) -> Callable[..., None]:
        def hook(_m: torch.nn.Module, _a: object, output: object) -> None:
            take(layer, layer_output(output))
            if layer == deepest:
                raise StopForward
        return hook
    return [handle.layers[i].register_forward_hook(make(i)) for i in sorted(set(layers))]


def _run(handle: ModelHandle, layers: Sequence[int], take: Callable[[int, torch.Tensor], None],
         **kwargs: object) -> None:
    hooks = _hooks(handle, layers, take)
    try:
        handle.model(**kwargs)
    except StopForward:
        pass
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def read_branches(handle: ModelHandle, groups: Sequence[Sequence[PromptRow]], layers: Sequence[int], *,
                  position: BranchRead = "last", offsets: Sequence[Sequence[int]] | None = None,
                  context_layers: Sequence[int] = ()) -> Branched:
    """Hidden states of every row of every group, each group's prompt computed once.

    ``groups[i]`` holds K rows with the same prompt (text, image, system) and different completions (K is
    the same for every group). ``position``: ``last`` / ``completion_last``, the row's last token, or
    ``offsets[i][k]`` tokens before it; ``completion_mean``, the mean over the completion's tokens.
    ``context_layers``: also read each prompt's last token (generation prompt included) in the same pass.
    """
    if not can_branch(handle):
        raise InvalidInputError(f"{handle.name or 'this model'} computes its own (multi-dimensional) positions; "
                                "read its continuations as full sequences")
    if not groups or len({len(g) for g in groups}) != 1 or not groups[0]:
        raise InvalidInputError("read_branches needs groups of the same, non-zero number of rows")
    k = len(groups[0])
    layers = [handle.check_layer(x) for x in layers]
    context_layers = [handle.check_layer(x) for x in context_layers]
    prompts, conts = [], []
    for i, g in enumerate(groups):
        prompts.append(encode_row(handle, _prompt_of(g))[0])
        for j, row in enumerate(g):
            conts.append(_continuation(handle, row, check=i == j == 0))
    device = handle.device
    inputs, pads = collate(handle, prompts)
    inputs = {key: v.to(device) for key, v in inputs.items()}
    mask = inputs["attention_mask"].long()
    width = int(mask.shape[1])
    config = getattr(handle.model, "config", None)
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    cache_kw = cache_argument(handle.model)
    context: dict[int, torch.Tensor] = {}

    def take_context(layer: int, hidden: torch.Tensor) -> None:
        if layer in context_layers:
            context[layer] = hidden[:, -1].float().cpu()

    _run(handle, list(set(layers) | set(context_layers)), take_context, **inputs,
         position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True, **{cache_kw: cache})
    cache.batch_repeat_interleave(k)

    n_rows = len(conts)
    lengths = torch.tensor([len(c) for c in conts])
    c_width = int(lengths.max())
    pad_id = handle.tokenizer.pad_token_id
    ids = torch.full((n_rows, c_width), pad_id if pad_id is not None else 0, dtype=torch.long)
    c_mask = torch.zeros(n_rows, c_width, dtype=torch.long)
    for r, c in enumerate(conts):
        ids[r, :len(c)] = c
        c_mask[r, :len(c)] = 1
    prompt_len = (width - torch.tensor(pads)).repeat_interleave(k)          # each row's real prompt tokens
    positions = prompt_len[:, None] + torch.arange(c_width)[None, :]
    flat_offsets = torch.tensor([o for per in (offsets or [[0] * k] * len(groups)) for o in per])
    if bool(((lengths - 1 - flat_offsets) < 0).any()):
        raise InvalidInputError("an end offset reaches back before the continuation")
    targets: dict[int, torch.Tensor] = {}

    def take_target(layer: int, hidden: torch.Tensor) -> None:
        if layer not in layers:
            return
        h = hidden.float()
        if position == "completion_mean":
            w = c_mask.to(h.device, torch.float32)
            got = torch.einsum("bl,bld->bd", w, h) / w.sum(1, keepdim=True)
        else:
            idx = (lengths - 1 - flat_offsets).to(h.device)
            got = h[torch.arange(n_rows, device=h.device), idx]
        targets[layer] = got.cpu().view(len(groups), k, -1)

    full_mask = torch.cat([mask.repeat_interleave(k, dim=0), c_mask.to(device)], dim=1)
    _run(handle, layers, take_target, input_ids=ids.to(device), attention_mask=full_mask,
         position_ids=positions.to(device), use_cache=True, **{cache_kw: cache})
    missing = [x for x in layers if x not in targets] + [x for x in context_layers if x not in context]
    if missing:
        raise RuntimeError(f"layers {missing} never ran during the forward pass; is layers_path right?")
    return Branched(targets=targets, context=context)
