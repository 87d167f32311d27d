"""Image requests on the vLLM engine: tiny random LLaVA-1.5 and Qwen2-VL, real COCO images, vLLM == HF.

Runs in the serving environment (marker ``serve``; its torchvision: ``scripts/vllm_cpu_torchvision.py``).
The models come from ``save_tiny`` (width 128: 4 heads of 32, which vLLM's CPU attention needs), float32,
greedy, so both engines run the same weights and must agree token for token. The offline engine sends
each image prompt unexpanded (one placeholder) with the image as ``multi_modal_data``; vLLM expands it
to the HF engine's length. One engine per architecture, shared by its tests; one HTTP server (LLaVA).
Skips cleanly without the shared COCO images.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.serve
vllm = pytest.importorskip("vllm")

from conftest import data_path  # noqa: E402
from helpers import l2s_server, post_json  # noqa: E402

from learn2steer import MethodConfig, SteeringArtifact  # noqa: E402
from learn2steer.behaviours import Example  # noqa: E402
from learn2steer.engines.hf import HFEngine, generate_tokens, steering_for  # noqa: E402
from learn2steer.models.prompts import PromptRow, build_inputs  # noqa: E402
from learn2steer.predictor import L2SNet  # noqa: E402
from learn2steer.vectors import SteeringVector  # noqa: E402

N_NEW = 12
STEER, CONTEXT = 2, 1
BLOCK = 32
QUESTIONS = ["describe this image in detail .", "is there a dog in the image ?", "is there a person in the image ?"]
SYSTEM = "you are a helpful assistant . " * 8  # more than one KV block of text before the image


def _artifacts(d: int, n: int) -> dict[str, SteeringArtifact]:
    """A random fixed vector and a random L2S predictor (L'=1 < L*=2), strong enough to change the answers."""
    g = torch.Generator().manual_seed(0)
    fixed = SteeringArtifact(kind="fixed", method="mean", model="tiny", hidden_size=d, num_layers=n,
                             steer_layers=[STEER], vector=SteeringVector({STEER: 4.0 * torch.randn(d, generator=g)}))
    torch.manual_seed(0)
    net = L2SNet(d, d)
    with torch.no_grad():
        net.decoder.weight.mul_(20.0)
    l2s = SteeringArtifact(kind="l2s", method="l2s", model="tiny", hidden_size=d, num_layers=n, steer_layers=[STEER],
                           context_layer=CONTEXT, predictor=net)
    # the paper's configuration: L' after L* (the LLaVA safety predictor: 30 > 15), and the last input token
    # before the generation prompt (its `input_last`), alone and together
    deep = SteeringArtifact(kind="l2s", method="l2s", model="tiny", hidden_size=d, num_layers=n, steer_layers=[STEER],
                            context_layer=n - 1, predictor=net)
    last = SteeringArtifact(kind="l2s", method="l2s", model="tiny", hidden_size=d, num_layers=n, steer_layers=[STEER],
                            context_layer=CONTEXT, context_read="input_last", predictor=net)
    deep_last = SteeringArtifact(kind="l2s", method="l2s", model="tiny", hidden_size=d, num_layers=n,
                                 steer_layers=[STEER], context_layer=n - 1, context_read="input_last", predictor=net)
    return {"fixed": fixed, "l2s": l2s, "deep": deep, "input_last": last, "deep_input_last": deep_last}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    from learn2steer.models.tiny import save_tiny

    tmp = tmp_path_factory.mktemp("tiny-vlm")
    return {arch: save_tiny(arch, tmp / arch, seed=1) for arch in ("llava", "qwen2_vl")}


@pytest.fixture(scope="module")
def artifact_dirs(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("arts")
    return {k: str(a.save(tmp / k)) for k, a in _artifacts(128, 4).items()}


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def tiny(request, folders, artifact_dirs, coco_images):
    """(arch, folder, HF handle, vLLM engine, method configs) for one architecture."""
    from learn2steer.engines.vllm.offline import VLLMEngine
    from learn2steer.models.loading import load_model

    folder = folders[request.param]
    handle = load_model(folder)
    arts = {k: SteeringArtifact.load(v) for k, v in artifact_dirs.items()}
    cfgs = {"none": MethodConfig(), **{k: MethodConfig.from_artifact(a, alpha=1.0) for k, a in arts.items()}}
    engine = VLLMEngine.create(str(folder), enforce_eager=True, max_model_len=512, block_size=BLOCK)
    yield request.param, folder, handle, engine, cfgs
    engine.close()


def _examples(images: list[Path]) -> list[Example]:
    """Three COCO images (two 256x256, one full size) and one text-only request, in one batch."""
    return [Example(f"img{i}", q, im) for i, (q, im) in enumerate(zip(QUESTIONS, images))] + [
        Example("text", "what is the capital of france ?")]


def _strip(ids, eos: int) -> list[int]:
    ids = list(ids)
    return ids[:-1] if ids and ids[-1] == eos else ids


def _hf(handle, cfg, examples) -> list[list[int]]:
    eos = handle.tokenizer.eos_token_id
    out = HFEngine(handle).answer_tokens(cfg, examples, max_new_tokens=N_NEW, batch_size=8, progress=False)
    return [_strip(x[0], eos) for x in out]


def _hf_row(handle, cfg, row: PromptRow) -> list[int]:
    """HF tokens of one row (a system message included), alone."""
    batch, steering = steering_for(handle, cfg, [Example("row", row.text, row.image)], rows=[row])
    with steering:
        out = generate_tokens(handle, batch, max_new_tokens=N_NEW)
    return _strip(out[0], handle.tokenizer.eos_token_id)


def test_mixed_batch_with_images_equals_hf(tiny, coco_images) -> None:
    arch, _, handle, engine, cfgs = tiny
    examples = _examples(coco_images)
    order, reqs = [], []
    for i, e in enumerate(examples):  # every method's requests interleaved in one vLLM call
        names = list(cfgs)
        for name in names[i % len(names):] + names[:i % len(names)]:
            order.append((name, i))
            reqs += engine.requests(cfgs[name], [e], max_new_tokens=N_NEW)
    outs = engine.generate(reqs)
    eos = handle.tokenizer.eos_token_id
    got: dict[str, list] = {n: [None] * len(examples) for n in cfgs}
    expanded = engine.token_ids(MethodConfig(), examples)
    for (name, i), out in zip(order, outs):
        got[name][i] = _strip(out.outputs[0].token_ids, eos)
        assert len(out.prompt_token_ids) == len(expanded[i]), (arch, "vLLM expanded the image as HF does")
        assert list(out.prompt_token_ids) == expanded[i], (arch, i)
    assert len(expanded[0]) > len(engine.prompts(MethodConfig(), examples)[0]["prompt_token_ids"]) + 8
    for name, cfg in cfgs.items():
        assert got[name] == _hf(handle, cfg, examples), (arch, name)
    for name in ("fixed", "l2s"):
        assert all(got[name][i] != got["none"][i] for i in range(4)), (arch, name, "steering changed every answer")
    for name in ("deep", "input_last", "deep_input_last"):  # the paper's reads: steered, and read elsewhere
        assert got[name] != got["none"] and got[name] != got["l2s"], (arch, name)
    assert got["l2s"][0] != got["fixed"][0]


def test_image_salt_never_shares_steered_blocks_across_images(tiny, coco_images) -> None:
    """Same text, two images, L2S: a full block of text precedes the image, so only the cache salt can tell
    the two prompts' steered blocks apart (L2S's vector, and so every steered position, depends on the image)."""
    from learn2steer.models.prompts import image_token_id

    arch, _, handle, engine, cfgs = tiny
    l2s = cfgs["l2s"]
    text = "is there a cat in the image ?"  # a question no other test sends
    rows = [PromptRow(text, coco_images[0], system=SYSTEM), PromptRow(text, coco_images[1], system=SYSTEM)]
    prompts = [engine.prompt_of(r) for r in rows]
    assert prompts[0]["prompt_token_ids"].index(image_token_id(handle)) >= BLOCK, "a whole text block first"
    assert prompts[0]["prompt_token_ids"] == prompts[1]["prompt_token_ids"], "identical tokens, other image"
    want = [_hf_row(handle, l2s, r) for r in rows]
    assert want[0] != want[1], "the two images give different L2S answers on HF"

    def run(i: int):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        extra = engine.extra_args(l2s, [Example("x", text)])[0]
        sp = SamplingParams(temperature=0.0, max_tokens=N_NEW, extra_args=extra)
        return engine.generate([(TokensPrompt(**prompts[i]), sp)])[0]

    first, other, again = run(0), run(1), run(0)
    eos = handle.tokenizer.eos_token_id
    assert _strip(first.outputs[0].token_ids, eos) == want[0], arch
    assert _strip(other.outputs[0].token_ids, eos) == want[1], (arch, "the other image's request reused no blocks "
                                                                      "steered for the first image")
    assert not other.num_cached_tokens, (arch, other.num_cached_tokens)
    assert _strip(again.outputs[0].token_ids, eos) == want[0]
    assert again.num_cached_tokens >= BLOCK, (arch, "the same text and image share the cached prefix",
                                              again.num_cached_tokens)


def test_generate_job_with_images_on_vllm_equals_hf(tiny, coco_images, artifact_dirs, monkeypatch) -> None:
    """`l2s generate --engine vllm --image ...`: the job's path, on the module's engine (no second start)."""
    from learn2steer.engines.vllm.offline import VLLMEngine
    from learn2steer.jobs import GenerateJob

    arch, folder, _, engine, _ = tiny
    monkeypatch.setattr(VLLMEngine, "create", classmethod(lambda cls, *a, **k: engine))
    common = dict(model=str(folder), prompt=QUESTIONS[:2], image=[str(p) for p in coco_images[:2]],
                  artifact=artifact_dirs["l2s"], max_new_tokens=N_NEW)
    vl = GenerateJob(engine="vllm", **common).run(progress=False)
    hf = GenerateJob(engine="hf", **common).run(progress=False)
    assert [r["response"] for r in vl] == [r["response"] for r in hf], arch
    assert any(r["response"] for r in vl)


def _data_uri(path: Path) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode()


def test_http_image_url_equals_hf(folders, artifact_dirs, coco_images, tmp_path) -> None:
    """`l2s serve` on tiny LLaVA: OpenAI chat with an ``image_url`` data URI, none / fixed / L2S / L' > L* /
    input_last == HF."""
    from learn2steer.models.loading import load_model

    folder = folders["llava"]
    served = [x for k in ("fixed", "l2s", "deep", "input_last", "deep_input_last")
              for x in ("--artifact", f"{k}={artifact_dirs[k]}")]
    args = ["--model", str(folder), *served, "--served-model-name", "tiny", "--enforce-eager", "--max-model-len", "512"]
    with l2s_server(args, tmp_path / "server.log") as base:
        handle = load_model(folder)
        arts = {k: SteeringArtifact.load(v) for k, v in artifact_dirs.items()}
        image, question = coco_images[2], QUESTIONS[0]  # the full-size image
        ex = [Example("e", question, image)]
        expanded = len(build_inputs(handle, [PromptRow(question, image)]).inputs["input_ids"][0])
        got = {}
        for name, xargs, cfg in [("none", None, MethodConfig()),
                                 ("fixed", {"steer": "fixed"}, MethodConfig.from_artifact(arts["fixed"])),
                                 ("l2s", {"steer": "l2s", "alpha": 1.0}, MethodConfig.from_artifact(arts["l2s"])),
                                 # the paper's configuration over HTTP: L' > L*, input_last, both
                                 *[(k, {"steer": k}, MethodConfig.from_artifact(arts[k]))
                                   for k in ("deep", "input_last", "deep_input_last")]]:
            body = {"model": "tiny", "max_tokens": N_NEW, "temperature": 0, "return_token_ids": True,
                    "messages": [{"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": _data_uri(image)}},
                        {"type": "text", "text": question}]}]}
            if xargs is not None:
                body["vllm_xargs"] = xargs
            status, out = post_json(base + "/v1/chat/completions", body)
            assert status == 200, out
            got[name] = _strip(out["choices"][0]["token_ids"], handle.tokenizer.eos_token_id)
            assert len(out["prompt_token_ids"]) == expanded, (name, "the server's prompt is the HF engine's")
            assert got[name] == _hf(handle, cfg, ex)[0], name
        assert all(got[k] != got["none"] for k in got if k != "none"), got


def test_eval_grid_with_images_on_vllm_equals_hf(tiny, tmp_path, monkeypatch) -> None:
    """`l2s eval --engine vllm` on a POPE-style image dataset: the same answers as `--engine hf`, every cell."""
    import shutil

    from learn2steer.engines.vllm.offline import VLLMEngine
    from learn2steer.evaluation.pipeline import EvalConfig, run_eval
    from learn2steer.predictor import TrainConfig

    arch, folder, handle, engine, _ = tiny
    pope = data_path("pope_style", "resized256", "coco_pope_style_random.json")
    monkeypatch.setattr(VLLMEngine, "for_handle", classmethod(lambda cls, *a, **k: engine))
    common = dict(model=str(folder), task="pope", dataset=f"pope:{pope}", image_dir=str(pope.parents[2] / "coco" /
                  "codewithminer_resized"), layers=[STEER], context_layer=CONTEXT, alphas=[1.0],
                  methods=["no_steering", "mean", "l2s"], train_limit=12, test_limit=6, max_new_tokens=6,
                  batch_size=8, train=TrainConfig(epochs=5))
    hf = run_eval(EvalConfig(out=tmp_path / "hf", **common), handle=handle, progress=False)
    shutil.copytree(tmp_path / "hf" / "extraction", tmp_path / "vllm" / "extraction")  # same vectors, less time
    vl = run_eval(EvalConfig(out=tmp_path / "vllm", engine="vllm", **common), handle=handle, progress=False)
    assert [r.cell.name for r in vl.results] == [r.cell.name for r in hf.results] and len(hf.results) >= 3
    for a, b in zip(hf.results, vl.results):
        assert a.responses == b.responses, (arch, a.cell.name)
