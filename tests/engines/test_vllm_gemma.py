"""Gemma-3-270M base on vLLM equals the HF engine token for token: offline and over `l2s serve`'s HTTP API.

The second real model: a base model rendered with learn2steer's plain template (saved with the converted model, so
vLLM renders the same prompt) and stopping at the newline that ends an answer. Text-form POPE questions (two solved
examples each, as the hallucination demo asks them), no steering, Mean-S and L2S trained here.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.serve
vllm = pytest.importorskip("vllm")

from conftest import data_path  # noqa: E402
from helpers import l2s_server, post_json  # noqa: E402

from learn2steer import MethodConfig, TrainConfig, extract, load_behaviour  # noqa: E402
from learn2steer.engines.hf import HFEngine  # noqa: E402
from learn2steer.errors import MissingFileError  # noqa: E402
from learn2steer.evaluation.scenes import SceneOptions, load_textpope  # noqa: E402
from learn2steer.training import train_artifacts  # noqa: E402

N_NEW = 4
LAYER = 9


@pytest.fixture(scope="module")
def gemma():
    from learn2steer.models.loading import load_model

    try:
        return load_model("gemma3-270m")
    except MissingFileError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def questions():
    gt = str(data_path("chair", "coco2014_chair_gt_objects.json.gz"))
    exs = load_textpope(data_path("pope", "coco_pope_adversarial.json"), SceneOptions(gt=gt, few_shot=2))
    return exs[:36]  # six images; the first 30 questions train, the last 6 are asked


@pytest.fixture(scope="module")
def arts(gemma, questions, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gemma-arts")
    ex = extract(gemma, load_behaviour("hallucination_text"), questions[:30], tmp / "ext", steer_layers=[LAYER],
                 context_layers=[LAYER], progress=False)
    a, _ = train_artifacts(ex, steer_layer=LAYER, context_layer=LAYER, progress=False,
                           cfg=TrainConfig(epochs=30, lr=3e-3, standardize=True, l1=0, cosine=0))
    return {k: (a[k], str(a[k].save(tmp / k))) for k in ("mean", "l2s")}


def _configs(arts):
    return {"none": MethodConfig(), "mean": MethodConfig.from_artifact(arts["mean"][0], alpha=1.0),
            "l2s": MethodConfig.from_artifact(arts["l2s"][0], alpha=1.0)}


def test_offline_vllm_equals_hf_on_gemma(gemma, questions, arts) -> None:
    from learn2steer.engines.vllm.offline import VLLMEngine

    asked = questions[30:]
    hf = HFEngine(gemma)
    with VLLMEngine.create("gemma3-270m", enforce_eager=True) as engine:
        assert engine.model_name == "gemma-3-270m"
        for name, cfg in _configs(arts).items():
            want = hf.answer(cfg, asked, max_new_tokens=N_NEW, batch_size=8, progress=False)
            got = engine.answer(cfg, asked, max_new_tokens=N_NEW, batch_size=8, progress=False)
            assert got == want, name
            assert all("\n" not in a[0] for a in got), "an answer ends at the template's newline"


@pytest.mark.slow  # a third engine start on the 2-core CI; the HTTP path itself is in CI with the default model
def test_served_gemma_equals_hf(gemma, questions, arts, tmp_path) -> None:
    """`l2s serve --model gemma3-270m`: a completion request with the plain template's prompt, steered by name."""
    asked = questions[30:33]
    want = HFEngine(gemma).answer(_configs(arts)["mean"], asked, max_new_tokens=N_NEW, batch_size=8, progress=False)
    args = ["--model", "gemma3-270m", "--artifact", f"mean={arts['mean'][1]}", "--enforce-eager"]
    with l2s_server(args, tmp_path / "serve.log") as url:
        for e, w in zip(asked, want):
            body = {"model": "gemma-3-270m", "temperature": 0, "max_tokens": N_NEW,
                    "messages": [{"role": "user", "content": e.question}],
                    "vllm_xargs": {"steer": "mean", "alpha": 1.0}}
            status, out = post_json(url + "/v1/chat/completions", body)
            assert status == 200, out
            assert out["choices"][0]["message"]["content"].strip() == w[0]
