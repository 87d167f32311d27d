"""Read the residual stream (decoder block outputs) at chosen layers and positions in one forward pass.

Forward hooks gather only the requested positions the moment a layer finishes, so memory holds
[rows, D] per site instead of every position of every layer (what ``output_hidden_states`` keeps), and
the pass stops right after the deepest layer needed: the LM head and later layers never run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence, get_args

import torch

from learn2steer.errors import InvalidInputError
from learn2steer.models.loading import ModelHandle
from learn2steer.models.prompts import Batch, forward_kwargs

Position = Literal["prompt_last", "input_last", "last", "completion_mean", "completion_last"]
POSITIONS: tuple[str, ...] = get_args(Position)
#: where a predictor's context h_X can be read, in training and on both engines: the last prompt token with
#: the generation prompt, or the last token of the user turn without it (the official safety predictors)
ContextPosition = Literal["prompt_last", "input_last"]
CONTEXT_POSITIONS: tuple[str, ...] = get_args(ContextPosition)


@dataclass(frozen=True)
class Site:
    """Where to read: the output of decoder block ``layer`` at ``position``.

    ``prompt_last``: last prompt token (the context representation h_X of L2S);
    ``input_last``: last token of the user turn before the generation prompt (the official safety predictors);
    ``last``: last token of the row (the answer token for a teacher-forced completion);
    ``completion_mean``: mean over the teacher-forced completion span;
    ``completion_last``: last token of the completion (== ``last`` for teacher-forced rows).
    """

    layer: int
    position: Position = "prompt_last"

    def __post_init__(self) -> None:
        if self.position not in POSITIONS:
            raise InvalidInputError(f"unknown read position {self.position!r}; choose one of {', '.join(POSITIONS)}")


class StopForward(Exception):
    """Raised from a hook to end a forward pass once every needed layer has been read."""


def layer_output(output: object) -> torch.Tensor:
    """The hidden states of a decoder block's output (a tensor in transformers 5, a tuple in older code)."""
    hidden = output[0] if isinstance(output, tuple) else output
    assert isinstance(hidden, torch.Tensor), f"unexpected decoder block output {type(output).__name__}"
    return hidden


def gather(hidden: torch.Tensor, batch: Batch, position: Position) -> torch.Tensor:
    """Select one [B, D] vector per row from [B, L, D] hidden states, in float32."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    if position == "prompt_last":
        return hidden[rows, batch.prompt_last.to(hidden.device)].float()
    if position == "input_last":
        if batch.input_last is None:
            raise InvalidInputError("read position 'input_last' needs build_inputs(..., input_last=True)")
        return hidden[rows, batch.input_last.to(hidden.device)].float()
    if position == "last":
        return hidden[:, -1].float()
    start, end = batch.span_start.to(hidden.device), batch.span_end.to(hidden.device)
    if bool((end <= start).any()):
        raise InvalidInputError(f"read position {position!r} needs a teacher-forced completion on every row "
                         "(PromptRow.completion); some rows have none")
    if position == "completion_last":
        return hidden[rows, end - 1].float()
    cols = torch.arange(hidden.shape[1], device=hidden.device)
    span = ((cols[None] >= start[:, None]) & (cols[None] < end[:, None])).to(torch.float32)
    return torch.einsum("bl,bld->bd", span, hidden.float()) / span.sum(1, keepdim=True)


@torch.no_grad()
def read(handle: ModelHandle, batch: Batch, sites: Sequence[Site], *, stop_early: bool = True
         ) -> dict[Site, torch.Tensor]:
    """Return {site: float32 tensor [rows, D] on CPU} from a single forward pass over ``batch``."""
    if not sites:
        raise InvalidInputError("read() needs at least one Site")
    by_layer: dict[int, list[Site]] = {}
    for s in sites:
        by_layer.setdefault(handle.check_layer(s.layer), []).append(s)
    deepest = max(by_layer)
    out: dict[Site, torch.Tensor] = {}

    def make_hook(layer: int) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, _args: object, output: object) -> None:
            hidden = layer_output(output)
            for site in by_layer[layer]:
                out[site] = gather(hidden, batch, site.position).cpu()
            if stop_early and layer == deepest:
                raise StopForward
        return hook

    handles = [handle.layers[i].register_forward_hook(make_hook(i)) for i in by_layer]
    try:
        handle.model(**forward_kwargs(handle, batch), use_cache=False)
    except StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [s for s in sites if s not in out]
    if missing:
        raise RuntimeError(f"layers of {missing} never ran during the forward pass; is layers_path right?")
    return out
