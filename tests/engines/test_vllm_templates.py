"""The official ``input_last`` read on the releases' own chat templates: vLLM == HF, offline and over HTTP.

LLaVA-1.5's template with a Llama-style sentencepiece tokenizer ends the bare prompt (user turn, no generation
prompt) in a lone "▁" that the full prompt merges into "▁ASSISTANT:"; the official code and the HF engine read
that "▁" in a pass over the bare prompt. The plugin reads it in a read-only pass of the full prompt with the
"▁" put in place (``models.prompts.InputRead``); 0.3 read the question's last token instead. Qwen2-VL's own
template (default system prompt, ChatML) reads the "\\n" after ``<|im_end|>``. Tiny random checkpoints
(``save_tiny(..., real_template=True)``), float32, greedy, a strong random predictor, so a read of another
hidden state gives other tokens. Runs in the serving environment (marker ``serve``).
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.serve
vllm = pytest.importorskip("vllm")

from helpers import l2s_server, post_json  # noqa: E402

from learn2steer import MethodConfig, SteeringArtifact  # noqa: E402
from learn2steer.behaviours import Example  # noqa: E402
from learn2steer.engines.hf import HFEngine  # noqa: E402
from learn2steer.predictor import L2SNet  # noqa: E402

N_NEW = 10
STEER = 2
QUESTIONS = ["is there a dog in the image ?", "describe this image in detail ."]


def _artifacts(d: int, n: int) -> dict[str, SteeringArtifact]:
    """input_last at L'=1 < L*=2 (Qwen2-VL's safety predictor: L' = L*) and at L'=3 > L*=2 (LLaVA's: 30 > 15)."""
    torch.manual_seed(0)
    net = L2SNet(d, d)
    with torch.no_grad():
        net.decoder.weight.mul_(20.0)
    return {name: SteeringArtifact(kind="l2s", method="l2s", model="tiny", hidden_size=d, num_layers=n,
                                   steer_layers=[STEER], context_layer=ctx, context_read="input_last", predictor=net)
            for name, ctx in (("input_last", 1), ("deep_input_last", n - 1))}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    from learn2steer.models.tiny import save_tiny

    tmp = tmp_path_factory.mktemp("real-templates")
    return {arch: save_tiny(arch, tmp / arch, seed=1, real_template=True) for arch in ("llava", "qwen2_vl")}


@pytest.fixture(scope="module")
def artifact_dirs(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("arts")
    return {k: str(a.save(tmp / k)) for k, a in _artifacts(128, 4).items()}


def _strip(ids, eos: int) -> list[int]:
    ids = list(ids)
    return ids[:-1] if ids and ids[-1] == eos else ids


def _cfgs(artifact_dirs: dict[str, str]) -> dict[str, MethodConfig]:
    arts = {k: SteeringArtifact.load(v) for k, v in artifact_dirs.items()}
    return {"none": MethodConfig(), **{k: MethodConfig.from_artifact(a, alpha=1.0) for k, a in arts.items()}}


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_input_last_on_the_real_templates_equals_hf_offline(arch, folders, artifact_dirs, coco_images) -> None:
    from learn2steer.engines.vllm.offline import VLLMEngine
    from learn2steer.models.loading import load_model

    folder = folders[arch]
    handle = load_model(folder)
    examples = [Example("img", QUESTIONS[0], coco_images[0]), Example("text", QUESTIONS[1])]
    cfgs = _cfgs(artifact_dirs)
    eos = handle.tokenizer.eos_token_id
    engine = VLLMEngine.create(str(folder), enforce_eager=True, max_model_len=512)
    try:
        reqs = [r for cfg in cfgs.values() for r in engine.requests(cfg, examples, max_new_tokens=N_NEW)]
        outs = engine.generate(reqs)
    finally:
        engine.close()
    got = {name: [_strip(o.outputs[0].token_ids, eos) for o in outs[k * 2:k * 2 + 2]]
           for k, name in enumerate(cfgs)}
    for name, cfg in cfgs.items():
        want = [_strip(x[0], eos) for x in HFEngine(handle).answer_tokens(cfg, examples, max_new_tokens=N_NEW,
                                                                          batch_size=8, progress=False)]
        assert got[name] == want, (arch, name)
    for name in ("input_last", "deep_input_last"):
        assert all(got[name][i] != got["none"][i] for i in range(2)), (arch, name, "steering changed every answer")


def _data_uri(path: Path) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_input_last_on_the_real_templates_equals_hf_over_http(arch, folders, artifact_dirs, coco_images,
                                                              tmp_path) -> None:
    """`l2s serve`, OpenAI chat requests (an image_url data URI, and text only): the server renders the template
    itself, and its answers are the HF engine's for both input_last reads."""
    from learn2steer.models.loading import load_model

    folder = folders[arch]
    served = [x for k in ("input_last", "deep_input_last") for x in ("--artifact", f"{k}={artifact_dirs[k]}")]
    args = ["--model", str(folder), *served, "--served-model-name", "tiny", "--enforce-eager", "--max-model-len", "512"]
    handle = load_model(folder)
    cfgs = _cfgs(artifact_dirs)
    eos = handle.tokenizer.eos_token_id
    with l2s_server(args, tmp_path / "server.log") as base:
        for image, question in ((coco_images[0], QUESTIONS[0]), (None, QUESTIONS[1])):
            content: list[dict] = [{"type": "text", "text": question}]
            if image is not None:
                content.insert(0, {"type": "image_url", "image_url": {"url": _data_uri(image)}})
            ex = [Example("e", question, image)]
            for name in ("input_last", "deep_input_last"):
                body = {"model": "tiny", "max_tokens": N_NEW, "temperature": 0, "return_token_ids": True,
                        "messages": [{"role": "user", "content": content}], "vllm_xargs": {"steer": name}}
                status, out = post_json(base + "/v1/chat/completions", body)
                assert status == 200, out
                want = _strip(HFEngine(handle).answer_tokens(cfgs[name], ex, max_new_tokens=N_NEW, batch_size=1,
                                                             progress=False)[0][0], eos)
                assert _strip(out["choices"][0]["token_ids"], eos) == want, (arch, name, image is not None)
