"""Turn rows (image?, user text, optional teacher-forced completion) into left-padded model inputs.

Every row is rendered through the model's own chat template (processor for VLMs, tokenizer for text
models), so image placeholder tokens are expanded exactly as the model expects. Rows are encoded one at
a time and collated by hand: that keeps mixed image / no-image batches and models whose number of image
tokens varies with the image size (Qwen2-VL) on one code path, and lets us report exact positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from learn2steer.errors import InvalidInputError, MissingFileError
from learn2steer.models.loading import ModelHandle

ImageLike = Image.Image | str | Path


@dataclass(frozen=True)
class PromptRow:
    """One conversation turn: the user's text (and image), plus an optional assistant completion.

    ``completion`` is teacher-forced text appended after the generation prompt (the T+/T- answers of P2S).
    ``close_turn``: render the completion as a finished assistant message, followed by whatever the chat
    template puts after one (``<|im_end|>\n`` in ChatML, a space in LLaVA-1.5's): the official L2S code
    teacher-forces T+/T- this way and reads the last token of that whole sequence. Without it the
    assistant turn stays open and the sequence ends with the completion's last token.
    ``system`` is an optional system message (not every chat template supports one).
    """

    text: str
    image: ImageLike | None = None
    system: str | None = None
    completion: str | None = None
    close_turn: bool = False


@dataclass
class Batch:
    """Model inputs plus, per row, the positions that matter (indices into the padded sequence).

    ``prompt_last``: last token of the prompt (the generation prompt included). Under left padding this
    is column ``seq_len - 1`` for every row of a generation batch, and :attr:`seq_len` is where the prompt
    ends: the one definition of the prompt boundary that reading, steering and generation share.
    ``input_last``: last token of the user turn *before* the generation prompt (the official L2S safety
    predictors read there); only filled when requested (``build_inputs(..., input_last=True)``).
    ``span_start``/``span_end``: the teacher-forced completion, end exclusive (empty when none).
    """

    inputs: dict[str, torch.Tensor]
    prompt_last: torch.Tensor
    span_start: torch.Tensor
    span_end: torch.Tensor
    rows: list[PromptRow] = field(default_factory=list)
    input_last: torch.Tensor | None = None

    @property
    def size(self) -> int:
        """Number of rows."""
        return int(self.inputs["input_ids"].shape[0])

    @property
    def seq_len(self) -> int:
        """Padded length: where the prompt ends in a generation batch (the boundary column)."""
        return int(self.inputs["input_ids"].shape[1])

    @classmethod
    def of_prompts(cls, inputs: dict[str, torch.Tensor]) -> "Batch":
        """A batch of already-collated inputs in which every row is a whole prompt (no completion)."""
        last = torch.full((int(inputs["input_ids"].shape[0]),), int(inputs["input_ids"].shape[1]) - 1,
                          dtype=torch.long)
        return cls(inputs=inputs, prompt_last=last, span_start=last + 1, span_end=last + 1)

    def to(self, device: torch.device | str) -> "Batch":
        """Move the input tensors to ``device`` (in place; returns the batch)."""
        self.inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.inputs.items()}
        return self


def _load_image(image: ImageLike) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    p = Path(image)
    if not p.exists():
        raise MissingFileError(f"image {str(p)!r} does not exist (check the dataset's image folder)")
    try:
        with Image.open(p) as im:
            return im.convert("RGB")
    except (OSError, SyntaxError) as e:  # PIL raises OSError for truncated files, SyntaxError for some headers
        raise InvalidInputError(f"image {str(p)!r} cannot be read ({e}); replace or remove it") from None


def _messages(handle: ModelHandle, row: PromptRow, with_completion: bool) -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = []
    if handle.is_multimodal:
        if row.system:
            msgs.append({"role": "system", "content": [{"type": "text", "text": row.system}]})
        content: list[dict[str, Any]] = []
        if row.image is not None:
            content.append({"type": "image", "image": _load_image(row.image)})
        content.append({"type": "text", "text": row.text})
        msgs.append({"role": "user", "content": content})
        if with_completion:
            msgs.append({"role": "assistant", "content": [{"type": "text", "text": row.completion}]})
    else:
        if row.image is not None:
            raise InvalidInputError(f"a row has an image but {handle.name or 'the model'} is a text-only model; "
                                    "drop the images (e.g. --mmsb-images none) or load a vision-language model")
        if row.system:
            msgs.append({"role": "system", "content": row.system})
        msgs.append({"role": "user", "content": row.text})
        if with_completion:
            msgs.append({"role": "assistant", "content": row.completion})
    return msgs


def _encode(handle: ModelHandle, row: PromptRow, *, completion: bool, add_generation_prompt: bool
            ) -> dict[str, torch.Tensor]:
    templater = handle.processor if handle.is_multimodal else handle.tokenizer
    if getattr(templater, "chat_template", None) is None:
        raise InvalidInputError(f"{handle.name or 'the model'} has no chat template; learn2steer renders prompts with "
                                "the model's chat template: set tokenizer.chat_template (for a base model, "
                                "learn2steer.models.loading.PLAIN_TEMPLATE, which gemma3-270m uses) and save it")
    kwargs: dict[str, Any] = {"tokenize": True, "return_dict": True, "return_tensors": "pt"}
    if completion and row.close_turn:
        kwargs["add_generation_prompt"] = False
    elif completion:
        kwargs["continue_final_message"] = True
    else:
        kwargs["add_generation_prompt"] = add_generation_prompt
    out = templater.apply_chat_template(_messages(handle, row, completion), **kwargs)
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def encode_row(handle: ModelHandle, row: PromptRow, *, add_generation_prompt: bool = True
               ) -> tuple[dict[str, torch.Tensor], int, int]:
    """Encode one row; return its tensors, the prompt length and the full length (in tokens)."""
    prompt = _encode(handle, row, completion=False, add_generation_prompt=add_generation_prompt)
    n_prompt = int(prompt["input_ids"].shape[1])
    if row.completion is None:
        return prompt, n_prompt, n_prompt
    if not add_generation_prompt:
        raise InvalidInputError("a completion is always teacher-forced after the generation prompt; "
                         "add_generation_prompt=False cannot be combined with completion")
    full = _encode(handle, row, completion=True, add_generation_prompt=True)
    ids_p, ids_f = prompt["input_ids"][0], full["input_ids"][0]
    if len(ids_f) <= n_prompt or not torch.equal(ids_f[:n_prompt], ids_p):
        raise InvalidInputError(
            f"the chat template of {handle.name or 'the model'} does not render the prompt as a prefix of "
            f"prompt+completion for completion {row.completion!r}; cannot locate the completion span. "
            "Start the completion with a word (no leading whitespace) or fix the template.")
    return full, n_prompt, int(ids_f.shape[0])


def collate(handle: ModelHandle, encoded: Sequence[dict[str, torch.Tensor]]
            ) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Left-pad token-aligned tensors; concatenate the rest (pixel values, image grids) along dim 0."""
    lengths = [int(e["input_ids"].shape[1]) for e in encoded]
    width = max(lengths)
    pad_id = handle.tokenizer.pad_token_id
    out: dict[str, list[torch.Tensor]] = {}
    for e, n in zip(encoded, lengths):
        for key, t in e.items():
            if t.dim() == 2 and t.shape == (1, n) and key != "image_grid_thw":
                fill = pad_id if key == "input_ids" else 0
                t = torch.cat([torch.full((1, width - n), fill, dtype=t.dtype), t], dim=1)
            out.setdefault(key, []).append(t)
    inputs = {k: torch.cat(v, dim=0) for k, v in out.items()}
    return inputs, [width - n for n in lengths]


def input_length(handle: ModelHandle, row: PromptRow, prompt_ids: torch.Tensor) -> int:
    """Tokens of ``row``'s bare prompt (user turn, no generation prompt) when they are a prefix of ``prompt_ids``.

    Causal attention then makes the hidden state at the bare prompt's last token the same inside the full
    prompt, so ``input_last`` can be read in the prompt's own pass. On a template whose bare prompt ends in
    tokens the full prompt does not contain (LLaVA-1.5's sentencepiece template: a lone "▁" that "ASSISTANT:"
    merges away, see :class:`InputRead`) no position of that pass holds it: that is a sentence naming the read
    that always works, :func:`bare_prompts` in a pass of its own (what extraction and the HF engine do).
    """
    bare = _encode(handle, row, completion=False, add_generation_prompt=False)["input_ids"][0]
    n = int(bare.shape[0])
    if n <= int(prompt_ids.shape[0]) and torch.equal(prompt_ids[:n], bare):
        return n
    full = prompt_ids.tolist()
    common = next((i for i, (a, b) in enumerate(zip(bare.tolist(), full)) if a != b), min(n, len(full)))
    tail = handle.tokenizer.convert_ids_to_tokens(bare.tolist()[common:])
    raise InvalidInputError(f"on the chat template of {handle.name or 'the model'} the prompt without generation "
                            f"prompt ends in {tail} where the prompt with it goes on differently, so no position of "
                            "the prompt's own pass holds the 'input_last' state; read it from bare_prompts() in a pass "
                            "of its own (as extraction and the engines do)")


def build_inputs(handle: ModelHandle, rows: Sequence[PromptRow], *, add_generation_prompt: bool = True,
                 device: torch.device | str | None = None, input_last: bool = False) -> Batch:
    """Encode rows into one left-padded batch with per-row positions (see :class:`Batch`)."""
    if not rows:
        raise InvalidInputError("build_inputs needs at least one row")
    enc = [encode_row(handle, r, add_generation_prompt=add_generation_prompt) for r in rows]
    inputs, pads = collate(handle, [e for e, _, _ in enc])
    prompt_last = torch.tensor([p + n_prompt - 1 for p, (_, n_prompt, _) in zip(pads, enc)], dtype=torch.long)
    span_start = torch.tensor([p + n_prompt for p, (_, n_prompt, _) in zip(pads, enc)], dtype=torch.long)
    span_end = torch.tensor([p + n_full for p, (_, _, n_full) in zip(pads, enc)], dtype=torch.long)
    batch = Batch(inputs=inputs, prompt_last=prompt_last, span_start=span_start, span_end=span_end, rows=list(rows))
    if input_last:
        batch.input_last = torch.tensor(
            [p + input_length(handle, r, e["input_ids"][0]) - 1 for p, r, (e, _, _) in zip(pads, rows, enc)],
            dtype=torch.long)
    return batch.to(device if device is not None else handle.device)


def bare_prompts(handle: ModelHandle, rows: Sequence[PromptRow], *, device: torch.device | str | None = None
                 ) -> Batch:
    """The rows' user turns *without* the generation prompt, as a batch of their own (``prompt_last`` is
    each row's last input token).

    This is how the official L2S safety code reads its context representation (``save_features.py``: the
    prompt rendered with ``add_generation_prompt=False`` in a separate forward pass), and it needs no
    token-prefix match between the bare and the full prompt, which sentencepiece tokenizers break.
    Completions are dropped: the context is the input alone.
    """
    plain = [PromptRow(r.text, r.image, r.system) for r in rows]
    return build_inputs(handle, plain, add_generation_prompt=False, device=device)


def uses_own_position_ids(handle: ModelHandle) -> bool:
    """Models with multimodal RoPE (Qwen2-VL family) derive 3-D position ids from the mask themselves."""
    m = handle.model
    return hasattr(m, "get_rope_index") or hasattr(getattr(m, "model", None), "get_rope_index")


def forward_kwargs(handle: ModelHandle, batch: Batch) -> dict[str, torch.Tensor]:
    """Inputs for a plain forward pass, with position ids that ignore left padding.

    ``generate`` derives position ids from the attention mask; a plain forward does not, so without
    this a left-padded row would see shifted positions and differ from its batch-size-1 run.
    """
    kw = dict(batch.inputs)
    if "position_ids" not in kw and not uses_own_position_ids(handle):
        mask = kw["attention_mask"].long()
        kw["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    return kw


def batch_from_texts(handle: ModelHandle, texts: Sequence[str], *, device: torch.device | str | None = None
                     ) -> Batch:
    """A left-padded batch of raw strings, no chat template (base models, peer comparisons).

    Every row is its own prompt: ``prompt_last`` is the row's final token.
    """
    if not texts:
        raise InvalidInputError("batch_from_texts needs at least one text")
    enc = [{k: v for k, v in handle.tokenizer(t, return_tensors="pt").items() if isinstance(v, torch.Tensor)}
           for t in texts]
    batch = Batch.of_prompts(collate(handle, enc)[0])
    batch.rows = [PromptRow(t) for t in texts]
    return batch.to(device if device is not None else handle.device)


# ---- prompts for engines that take them unexpanded or check their ending (vLLM) --------------------------

def image_token_id(handle: Any) -> int:
    """The token an image placeholder expands into (``<image>`` for LLaVA, ``<|image_pad|>`` for Qwen2-VL)."""
    proc = handle.processor
    if proc is None or not hasattr(proc, "image_processor"):
        raise InvalidInputError(f"{handle.name or 'the model'} is a text-only model; it takes no images")
    tid = getattr(proc, "image_token_id", None)
    if tid is None and getattr(proc, "image_token", None) is not None:
        tid = handle.tokenizer.convert_tokens_to_ids(proc.image_token)
    if not isinstance(tid, int) or tid == handle.tokenizer.unk_token_id:
        raise InvalidInputError(f"the processor of {handle.name or 'the model'} names no image token; the vLLM engine "
                                "cannot send its image prompts (use --engine hf)")
    return tid


def collapse_image_tokens(ids: Sequence[int], image_token: int, images: int = 1) -> list[int]:
    """``ids`` with each run of ``image_token`` (one expanded image) reduced to a single placeholder token."""
    out: list[int] = []
    runs = 0
    for t in ids:
        if t == image_token and out and out[-1] == image_token:
            continue
        runs += t == image_token
        out.append(t)
    if runs != images:
        raise InvalidInputError(f"expected {images} image in the rendered prompt, found {runs} runs of image tokens "
                                "(does the text itself contain the image placeholder?)")
    return out


@dataclass(frozen=True)
class InputRead:
    """Where the official ``input_last`` state is, seen from a prompt rendered with the generation prompt.

    The official code reads the last token of the bare prompt (the user turn without generation prompt) in a
    pass of its own. A full prompt is that bare prompt without its last ``bare_tail`` tokens, followed by the
    ``generation`` tokens. On ChatML templates ``bare_tail`` is empty and the read is the token before the
    generation prompt. On LLaVA-1.5's sentencepiece template the bare prompt ends in a lone "▁" (its user turn
    ends in a space) that the full prompt merges into "▁ASSISTANT": ``bare_tail`` is that "▁", and the state to
    read is that of ``bare_tail`` placed where the generation prompt starts. An engine that sees only the full
    prompt (vLLM) reads it in a pass of its own with those tokens put in place (causal attention: every earlier
    position is the same, so that state is the bare pass's).
    """

    generation: tuple[int, ...]
    bare_tail: tuple[int, ...] = ()

    @property
    def back(self) -> int:
        """How many tokens before the full prompt's last token the read sits."""
        return len(self.generation) - len(self.bare_tail)

    def matches(self, prompt_ids: Sequence[int]) -> bool:
        """Whether ``prompt_ids`` end with this template's generation prompt."""
        n = len(self.generation)
        return len(prompt_ids) > n and list(prompt_ids[-n:]) == list(self.generation)


_PROBE = "Hello"


def input_read(tokenizer: Any) -> InputRead:
    """The template's :class:`InputRead`, found by rendering one user turn with and without the generation
    prompt and comparing their tokens (string content first; a template that drops it gets typed content,
    LLaVA-1.5's)."""
    bare = full = ""
    try:
        for content in (_PROBE, [{"type": "text", "text": _PROBE}]):
            msgs = [{"role": "user", "content": content}]
            bare = tokenizer.apply_chat_template(msgs, add_generation_prompt=False, tokenize=False)
            full = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            if isinstance(bare, str) and _PROBE in bare:
                break
    except Exception as e:  # no chat template, or one that refuses a lone user turn
        raise InvalidInputError(f"the 'input_last' read needs the model's chat template, which failed: {e}") from None
    if not isinstance(bare, str) or not isinstance(full, str) or not full.startswith(bare) or full == bare:
        raise InvalidInputError("the model's chat template does not append a generation prompt to the user turn; "
                                "the 'input_last' read position cannot be located (use the HF engine)")
    ids_b = list(tokenizer.encode(bare, add_special_tokens=False))
    ids_f = list(tokenizer.encode(full, add_special_tokens=False))
    common = next((i for i, (a, b) in enumerate(zip(ids_b, ids_f)) if a != b), min(len(ids_b), len(ids_f)))
    read = InputRead(tuple(ids_f[common:]), tuple(ids_b[common:]))
    if not read.generation or read.back < 0:
        raise InvalidInputError("the model's chat template ends the user turn in more tokens than its generation "
                                "prompt has; the 'input_last' read cannot be placed in the prompt (use the HF engine)")
    return read
