"""P2S extraction at its physical limit: the prompt computed once, T+ / T- branched from its KV cache.

Three variants over the same examples, interleaved, medians of paired ratios:

* ``branched``: what ``extract`` runs now (``extraction.p2s_and_context``: the prompt once, the two short
  continuations from its cache, the L2S context from the same pass when the contrast adds no suffix,
  else one more pass over the bare question);
* ``full``: what ``extract`` ran before (two full sequences per example, then a separate context pass);
* ``input_forward``: one forward over the inputs X alone (prompt with its image), stopped after the same
  deepest layer: the limit (ratio 1) that extraction can approach but not beat.

``extraction_vs_input_forward`` = branched / input_forward (target <= 1.3); ``speedup_vs_full`` =
full / branched. Cases: the embedded SmolLM2 with the ``safety`` behaviour (its contrasts add an
instruction suffix, so the context is another sequence and needs its own pass: about 2 is the floor
there) and a tiny random LLaVA-1.5 with real COCO images at 336 px (576 image tokens) with the
``hallucination`` behaviour (no suffix: the context comes from the same pass).
"""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import ratio, timings
from learn2steer.activations import Site, read
from learn2steer.behaviours import BehaviourSpec, Example, load_behaviour
from learn2steer.extraction import context_batch, p2s_and_context
from learn2steer.models.loading import ModelHandle, make_handle
from learn2steer.models.prompts import PromptRow, build_inputs


def tiny_llava_576(hidden_size: int = 64, num_layers: int = 4) -> ModelHandle:
    """A tiny random LLaVA-1.5 whose CLIP tower sees 336 px images in 14 px patches: 576 image tokens, as the
    real LLaVA-1.5. Its outputs mean nothing; its sequence lengths are the real model's."""
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from learn2steer.models.tiny import chat_template, tiny_tokenizer

    tok = tiny_tokenizer("llava")
    text = LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                       num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=2048, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                       bos_token_id=tok.bos_token_id, tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=336, patch_size=14)
    cfg = LlavaConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                      image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
                      vision_feature_layer=-1, projector_hidden_act="gelu", pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model: Any = LlavaForConditionalGeneration(cfg)
    improc = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    proc = LlavaProcessor(image_processor=improc, tokenizer=tok, patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=chat_template("llava"))
    return make_handle(model.eval(), tok, proc, name="tiny-llava-576")


def bench_case(h: ModelHandle, spec: BehaviourSpec, exs: list[Example], steer_layer: int, context_layer: int,
               reps: int, batch_size: int = 8) -> dict:
    """The three variants on ``exs`` (see the module docstring), in batches of ``batch_size`` examples."""
    chunks = [exs[i:i + batch_size] for i in range(0, len(exs), batch_size)]
    deepest = max(steer_layer, context_layer)

    def extraction(branch: bool) -> Any:
        def go() -> object:
            for c in chunks:
                _, ctx = p2s_and_context(h, spec, c, [steer_layer], context_layers=[context_layer], branch=branch)
                if ctx is None:
                    context_batch(h, c, [context_layer], spec.context_read)
            return None
        return go

    def input_forward() -> object:  # X alone: the P2S prompt (question + the contrast's suffix, image) once
        for c in chunks:
            rows = [PromptRow(p[0].text, p[0].image) for e in c if (p := spec.pair(e)) is not None]
            read(h, build_inputs(h, rows), [Site(deepest, "prompt_last")])
        return None

    fns = {"branched": extraction(True), "full": extraction(False), "input_forward": input_forward}
    for f in fns.values():  # warm-up (and a first check that every variant runs)
        f()
    t = timings(fns, reps)
    tokens = build_inputs(h, [PromptRow(e.question, e.image) for e in exs[:1]]).seq_len
    return {"examples": len(exs), "reps": reps, "batch_size": batch_size, "first_prompt_tokens": tokens,
            "seconds": {k: statistics.median(v) for k, v in t.items()},
            "extraction_vs_input_forward": ratio(t, "branched", "input_forward"),
            "full_vs_input_forward": ratio(t, "full", "input_forward"),
            "speedup_vs_full": ratio(t, "full", "branched")}


def coco_images(k: int = 4) -> list[Path]:
    """Real COCO val2014 images from the shared benchmark data ($L2S_DATA), or none when it is absent."""
    import os

    root = Path(os.environ.get("L2S_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    return sorted((root / "coco" / "tsbir_val2014").glob("*.jpg"))[:k]


def bench_extraction_limit(text: ModelHandle, images: list[Path], *, n: int, reps: int, text_layer: int) -> dict:
    """Both cases: the text model with ``safety``; the 576-token LLaVA when COCO images are given."""
    from learn2steer.evaluation.datasets import demo_requests

    exs = [Example(e.id, e.question, None, e.category) for e in demo_requests()[:n]]
    out: dict = {"text_safety": {"model": text.name,
                                 **bench_case(text, load_behaviour("safety"), exs, text_layer, text_layer, reps)}}
    if images:
        h = tiny_llava_576()
        spec = load_behaviour("hallucination")
        labels = sorted(spec.labels)
        exs = [Example(f"p{i}", "is there a dog in the image ?", images[i % len(images)], label=labels[i % 2])
               for i in range(n)]
        out["tiny_llava_576_hallucination"] = bench_case(h, spec, [dataclasses.replace(e) for e in exs], 2, 2, reps)
    return out
