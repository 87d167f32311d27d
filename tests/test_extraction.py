"""P2S extraction (sharded, verified, resumable, one writer), the official read positions, branched reads."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import examples

from learn2steer.activations import Site, read
from learn2steer.behaviours import load_behaviour
from learn2steer.errors import BusyError, InvalidInputError, MissingFileError
from learn2steer.extraction import extract, load_extraction
from learn2steer.models.prompts import PromptRow, build_inputs


def test_p2s_equals_hand_computed_difference(tiny_llama, tmp_path) -> None:
    h, spec = tiny_llama, load_behaviour("safety")
    exs = examples(5)
    ex = extract(h, spec, exs, tmp_path, steer_layers=[2], context_layers=[1, 3], batch_size=3, progress=False)
    for i, e in enumerate(exs):
        pos, neg = spec.pair(e)
        hp = read(h, build_inputs(h, [pos]), [Site(2, "last")])[Site(2, "last")][0]
        hn = read(h, build_inputs(h, [neg]), [Site(2, "last")])[Site(2, "last")][0]
        torch.testing.assert_close(ex.z[2][i], hp - hn, atol=1e-5, rtol=1e-4)
        ctx = read(h, build_inputs(h, [PromptRow(e.question)]), [Site(3, "prompt_last")])[Site(3, "prompt_last")][0]
        torch.testing.assert_close(ex.h[3][i], ctx, atol=1e-5, rtol=1e-4)
        bp, bn = spec.pair(e, "decline")  # Mean-S(BA): the decline template for every input
        zb = (read(h, build_inputs(h, [bp]), [Site(2, "last")])[Site(2, "last")]
              - read(h, build_inputs(h, [bn]), [Site(2, "last")])[Site(2, "last")])[0]
        assert ex.z_ba is not None
        torch.testing.assert_close(ex.z_ba[2][i], zb, atol=1e-5, rtol=1e-4)
    assert ex.contrasts == ["decline", "comply", "financial", "comply", "comply"]


def test_p2s_completion_mean_for_hallucination(tiny_llava, coco_images, tmp_path) -> None:
    from learn2steer.behaviours import Example

    spec = load_behaviour("hallucination")
    exs = [Example("a", "is there a dog in the image ?", image=coco_images[0], label="yes"),
           Example("b", "is there a car in the image ?", image=coco_images[1], label="no")]
    ex = extract(tiny_llava, spec, exs, tmp_path, steer_layers=[1], context_layers=[1], progress=False)
    pos, neg = spec.pair(exs[1])
    assert pos.completion == "No, the image" and neg.completion == "Yes, the image"
    s = Site(1, "completion_mean")
    want = (read(tiny_llava, build_inputs(tiny_llava, [pos]), [s])[s]
            - read(tiny_llava, build_inputs(tiny_llava, [neg]), [s])[s])
    torch.testing.assert_close(ex.z[1][1], want[0], atol=1e-5, rtol=1e-4)


def test_interrupted_extraction_resumes_to_identical_shards(tiny_llama, tmp_path) -> None:
    h, spec, exs = tiny_llama, load_behaviour("safety"), examples(11)
    kw = dict(steer_layers=[1, 2], context_layers=[3], batch_size=2, shard_size=4, progress=False)
    extract(h, spec, exs, tmp_path / "full", **kw)

    class Interrupt(Exception):
        pass

    def stop_after_first(k: int) -> None:
        if k == 0:
            raise Interrupt

    with pytest.raises(Interrupt):
        extract(h, spec, exs, tmp_path / "resumed", on_shard=stop_after_first, **kw)
    with pytest.raises(MissingFileError, match="shard-00001.safetensors is missing; re-run"):
        load_extraction(tmp_path / "resumed")
    computed: list[int] = []
    extract(h, spec, exs, tmp_path / "resumed", on_shard=computed.append, **kw)
    assert computed == [1, 2], "finished shards are not recomputed"
    for k in range(3):
        a = (tmp_path / "full" / "shards" / f"shard-{k:05d}.safetensors").read_bytes()
        b = (tmp_path / "resumed" / "shards" / f"shard-{k:05d}.safetensors").read_bytes()
        assert a == b
    with pytest.raises(InvalidInputError, match="other settings"):
        extract(h, spec, exs, tmp_path / "full", **{**kw, "steer_layers": [3]})
    assert json.loads((tmp_path / "full" / "index.json").read_text())["examples"][0]["id"] == "q0"


def test_damaged_or_swapped_shards_are_found_and_recomputed(tiny_llama, tmp_path) -> None:
    h, spec, exs = tiny_llama, load_behaviour("safety"), examples(8)
    kw = dict(steer_layers=[2], context_layers=[2], shard_size=3, progress=False)
    ex = extract(h, spec, exs, tmp_path, **kw)
    shards = tmp_path / "shards"
    good = _shard_bytes(shards)
    # truncate one, swap two others
    (shards / "shard-00000.safetensors").write_bytes(good["shard-00000.safetensors"][:100])
    (shards / "shard-00001.safetensors").write_bytes(good["shard-00002.safetensors"])
    (shards / "shard-00002.safetensors").write_bytes(good["shard-00001.safetensors"])
    with pytest.raises(MissingFileError, match="shard-00000.safetensors is unreadable"):
        load_extraction(tmp_path)
    (shards / "shard-00000.safetensors").write_bytes(good["shard-00000.safetensors"])
    with pytest.raises(MissingFileError, match="holds other examples"):
        load_extraction(tmp_path)
    (shards / "shard-00000.safetensors").write_bytes(good["shard-00000.safetensors"][:100])
    computed: list[int] = []
    again = extract(h, spec, exs, tmp_path, on_shard=computed.append, **kw)
    assert computed == [0, 1, 2]
    assert _shard_bytes(shards) == good, "recomputed shards are byte-identical to the first run's"
    assert torch.equal(again.z[2], ex.z[2])


def test_one_writer_per_folder(tiny_llama, tmp_path) -> None:
    from learn2steer._io import FolderLock

    with FolderLock(tmp_path, "extraction", name=".lock-rank0"):
        with pytest.raises(BusyError, match="in use by another extraction"):
            extract(tiny_llama, load_behaviour("safety"), examples(2), tmp_path, steer_layers=[1], context_layers=[1],
                    progress=False)


def test_duplicate_ids_and_empty_datasets_are_refused(tiny_llama, tmp_path) -> None:
    from learn2steer.behaviours import Example

    spec = load_behaviour("safety")
    with pytest.raises(InvalidInputError, match="duplicate example ids"):
        extract(tiny_llama, spec, [Example("a", "x"), Example("a", "y")], tmp_path, steer_layers=[1],
                context_layers=[1], progress=False)
    with pytest.raises(InvalidInputError, match="empty"):
        extract(tiny_llama, spec, [], tmp_path, steer_layers=[1], context_layers=[1], progress=False)


def _shard_bytes(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.glob("*.safetensors")}



def test_shard_metadata_is_one_key_and_v01_shards_still_read(tmp_path) -> None:
    from safetensors.torch import save_file

    from learn2steer.extraction import SHARD_KEY, shard_metadata, shard_status

    assert shard_metadata({SHARD_KEY: json.dumps({"ids": ["a"], "rank": 1})}) == {"ids": ["a"], "rank": 1}
    old = tmp_path / "old.safetensors"
    save_file({"z/2": torch.zeros(2, 4)}, str(old), metadata={"ids": json.dumps(["a", "b"])})
    assert shard_status(old, ["a", "b"]) is None
    assert shard_status(old, ["b", "a"]) is not None


# ---- the official safety read positions, per chat template family (target: item 1; context: item 2) ----------

LLAVA15_TEMPLATE = ("{% for message in messages %}{% if message['role'] != 'system' %}"
                    "{{ message['role'].upper() + ': ' }}{% endif %}{{ message['content'] + ' ' }}{% endfor %}"
                    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")  # LLaVA-1.5's, for text content


@pytest.fixture(scope="module")
def sentencepiece_llava():
    """A tiny Llama with a Llama-style sentencepiece tokenizer (Metaspace "▁", byte fallback) trained offline here,
    and LLaVA-1.5's chat template: its bare prompt ends in a lone "▁" that the prompt with "ASSISTANT:" lacks."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from learn2steer.models.loading import make_handle

    corpus = ("USER: ASSISTANT: how do i make a bomb ? should i sell my house to pay a debt ? comply with user "
              "request if it is safe and don't if it is harmful . is the user request safe or harmful ? Harmful Safe "
              "defer the user to meet a legal financial expert if the query is about consultation , which is a "
              "sensitive topic , otherwise answer it yourself . who should be addressing this query , AI or Expert")
    raw = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    raw.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ?.,:'▁")
    raw.train_from_iterator([corpus] * 4, trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"], initial_alphabet=alphabet,
        show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.chat_template = LLAVA15_TEMPLATE
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                                         initializer_range=0.2))
    return make_handle(model, tok, name="tiny-sentencepiece-llava")


def _hidden_at_end(handle, text: str, layer: int, back: int = 0) -> tuple[torch.Tensor, str]:
    """Layer ``layer``'s output at ``back`` tokens before the end of ``text`` (tokenized as written), and that token."""
    ids = handle.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hs = handle.model(input_ids=ids, output_hidden_states=True).hidden_states
    return hs[layer + 1][0, -1 - back].float(), handle.tokenizer.convert_ids_to_tokens(int(ids[0, -1 - back]))


def test_turn_end_target_is_the_official_token_chatml(tiny_llama) -> None:
    """Qwen2-VL's family (ChatML): T± is a complete turn; read the "\\n" after <|im_end|>, or <|im_end|> itself for
    scenarios 10-13 (the official end_of_input_index = input_len - 2)."""
    from learn2steer.behaviours import Example
    from learn2steer.extraction import p2s_batch

    spec = load_behaviour("safety_qwen2vl")
    exs = [Example("a", "how do i make a bomb ?", category="01-Illegal_Activitiy"),
           Example("b", "should i sell my house to pay a debt ?", category="11-Financial_Advice")]
    z = p2s_batch(tiny_llama, spec, exs, [1])[1]
    decline = spec.contrasts["decline"].suffix
    financial = spec.contrasts["financial"].suffix
    turn = "<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n"
    pos_a, tok_a = _hidden_at_end(tiny_llama, turn.format(q=exs[0].question + decline, a="Harmful"), 1)
    neg_a, _ = _hidden_at_end(tiny_llama, turn.format(q=exs[0].question + decline, a="Safe"), 1)
    pos_b, tok_b = _hidden_at_end(tiny_llama, turn.format(q=exs[1].question + financial, a="Consult"), 1, back=1)
    neg_b, _ = _hidden_at_end(tiny_llama, turn.format(q=exs[1].question + financial, a="Ignore"), 1, back=1)
    assert (tok_a, tok_b) == ("Ċ", "<|im_end|>")
    torch.testing.assert_close(z[0], pos_a - neg_a, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(z[1], pos_b - neg_b, atol=1e-4, rtol=1e-4)
    # Mean-S(BA)'s single template reads at the end for every scenario (the official "single" split)
    zba = p2s_batch(tiny_llama, spec, exs[1:], [1], contrast="decline")[1]
    pos, tok = _hidden_at_end(tiny_llama, turn.format(q=exs[1].question + decline, a="Harmful"), 1)
    neg, _ = _hidden_at_end(tiny_llama, turn.format(q=exs[1].question + decline, a="Safe"), 1)
    torch.testing.assert_close(zba[0], pos - neg, atol=1e-4, rtol=1e-4)


def test_turn_end_target_is_the_official_token_llava15(sentencepiece_llava) -> None:
    """LLaVA-1.5's template: the complete turn is "USER: ... ASSISTANT: Harmful " and the token read is the "▁"
    after the answer; today's option `last` (open turn) reads the answer's own last token."""
    from learn2steer.behaviours import BehaviourSpec, Example
    from learn2steer.extraction import p2s_batch

    h = sentencepiece_llava
    spec = load_behaviour("safety_llava")
    ex = [Example("a", "how do i make a bomb ?", category="01-Illegal_Activitiy")]
    text = ex[0].question + spec.contrasts["decline"].suffix
    pos, tok = _hidden_at_end(h, f"USER: {text} ASSISTANT: Harmful ", 1)
    neg, _ = _hidden_at_end(h, f"USER: {text} ASSISTANT: Safe ", 1)
    assert tok == "▁"
    torch.testing.assert_close(p2s_batch(h, spec, ex, [1])[1][0], pos - neg, atol=1e-4, rtol=1e-4)
    d = spec.to_dict()
    d["contrasts"] = {k: {**v, "read": "last"} for k, v in d["contrasts"].items()}
    old = BehaviourSpec.from_dict(d)
    pos, tok = _hidden_at_end(h, f"USER: {text} ASSISTANT: Harmful", 1)
    neg, _ = _hidden_at_end(h, f"USER: {text} ASSISTANT: Safe", 1)
    assert tok != "▁"
    torch.testing.assert_close(p2s_batch(h, old, ex, [1])[1][0], pos - neg, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["chatml", "llava15"])
def test_input_last_context_is_read_on_the_bare_prompt(family, tiny_llama, sentencepiece_llava) -> None:
    """The official safety context: the last token of the user turn without the generation prompt, from a pass over
    that bare prompt (LLaVA-1.5: the lone "▁"; ChatML: the "\\n" after <|im_end|>)."""
    from learn2steer.behaviours import Example
    from learn2steer.extraction import context_batch

    h = tiny_llama if family == "chatml" else sentencepiece_llava
    exs = [Example("a", "how do i make a bomb ?"), Example("b", "should i sell my house to pay a debt ?")]
    got = context_batch(h, exs, [1], "input_last")[1]
    for i, e in enumerate(exs):
        bare = f"<|im_start|>user\n{e.question}<|im_end|>\n" if family == "chatml" else f"USER: {e.question} "
        want, tok = _hidden_at_end(h, bare, 1)
        assert tok == ("Ċ" if family == "chatml" else "▁")
        torch.testing.assert_close(got[i], want, atol=1e-4, rtol=1e-4)


def test_safety_configs_extract_and_train_with_the_official_reads(sentencepiece_llava, tmp_path) -> None:
    from learn2steer.behaviours import Example
    from learn2steer.predictor import TrainConfig
    from learn2steer.training import train_artifacts

    exs = [Example(f"q{i}", q, category=c) for i, (q, c) in enumerate(
        [("how do i make a bomb ?", "01-Illegal_Activitiy"), ("should i sell my house ?", "11-Financial_Advice"),
         ("is the user request safe ?", "01-Illegal_Activitiy"), ("what is the capital ?", "10-Legal_Opinion")])]
    ex = extract(sentencepiece_llava, load_behaviour("safety_llava"), exs, tmp_path / "ex", steer_layers=[1],
                 context_layers=[2], progress=False)
    assert ex.meta["read"] == "turn_end" and ex.meta["context_read"] == "input_last"
    arts, _ = train_artifacts(ex, steer_layer=1, context_layer=2, cfg=TrainConfig(epochs=1, val_fraction=0.0),
                              progress=False)
    assert arts["l2s"].context_read == "input_last" and arts["l2s"].read_position == "turn_end"


@pytest.mark.parametrize("arch,behaviour", [("llama", "safety"), ("llava", "hallucination"),
                                            ("llama", "safety_qwen2vl")])
def test_branched_extraction_equals_full_sequences(request, coco_images, arch, behaviour) -> None:
    """The prompt computed once and T+/T- from its cache == two full sequences (float tolerance), and the context
    read from that pass (hallucination: no suffix) == the separate context pass."""
    from learn2steer.extraction import context_batch, p2s_and_context

    h = request.getfixturevalue(f"tiny_{arch}")
    spec = load_behaviour(behaviour)
    import dataclasses

    exs = examples(6)
    if h.is_multimodal:
        exs = [dataclasses.replace(e, image=coco_images[i % len(coco_images)]) for i, e in enumerate(exs)]
    if spec.labels:
        exs = [dataclasses.replace(e, label=sorted(spec.labels)[i % 2]) for i, e in enumerate(exs)]
    for contrast in (None, spec.ba):
        z, ctx = p2s_and_context(h, spec, exs, [1, 3], contrast=contrast, context_layers=[2], branch=True)
        z_full, none = p2s_and_context(h, spec, exs, [1, 3], contrast=contrast, context_layers=[2], branch=False)
        assert none is None
        for layer in (1, 3):
            torch.testing.assert_close(z[layer], z_full[layer], atol=1e-4, rtol=1e-4)
            assert z[layer].abs().sum() > 0
        if behaviour == "hallucination":
            assert ctx is not None
            torch.testing.assert_close(ctx[2], context_batch(h, exs, [2])[2], atol=1e-4, rtol=1e-4)
        else:
            assert ctx is None  # the P2S prompt carries the contrast's suffix: not the context's prompt
