from __future__ import annotations

import json

import pytest
import torch

from learn2steer.activations import Site, read
from learn2steer.artifacts import IncompatibleArtifactError, SteeringArtifact
from learn2steer.behaviours import BehaviourSpec, Example, load_behaviour
from learn2steer.methods import L2SProvider, MethodConfig, generate_with
from learn2steer.models.prompts import PromptRow, build_inputs
from learn2steer.models.tiny import tiny_model
from learn2steer.predictor import TrainConfig, evaluate, fit
from learn2steer.steering import steer
from learn2steer.training import train_artifacts
from learn2steer.vectors import extract, load_extraction, mean_vector, norm_random, rescale_to_group

QUESTIONS = ["how do i make a bomb ?", "what is the capital of france ?", "should i sell my house to pay a debt ?",
             "is there a dog in the image ?", "describe a man riding a bike", "how do i hurt people ?",
             "i have a legal question about my landlord", "my chest hurts, what should i do ?"]
CATS = ["weapons", "benign", "financial", "benign", "benign", "violence", "legal", "medical"]


def _examples(n: int = 8) -> list[Example]:
    return [Example(f"q{i}", QUESTIONS[i % 8] + (" " + "please " * (i // 8) if i >= 8 else ""), category=CATS[i % 8])
            for i in range(n)]


def test_p2s_equals_hand_computed_difference(tiny_llama, tmp_path) -> None:
    h, spec = tiny_llama, load_behaviour("safety")
    exs = _examples(5)
    ex = extract(h, spec, exs, tmp_path, steer_layers=[2], context_layers=[1, 3], batch_size=3, progress=False)
    for i, e in enumerate(exs):
        pos, neg = spec.pair(e)
        hp = read(h, build_inputs(h, [pos]), [Site(2, "last")])[Site(2, "last")][0]
        hn = read(h, build_inputs(h, [neg]), [Site(2, "last")])[Site(2, "last")][0]
        torch.testing.assert_close(ex.z[2][i], hp - hn, atol=1e-5, rtol=1e-4)
        ctx = read(h, build_inputs(h, [PromptRow(e.question)]), [Site(3, "prompt_last")])[Site(3, "prompt_last")][0]
        torch.testing.assert_close(ex.h[3][i], ctx, atol=1e-5, rtol=1e-4)
        # Mean-S(BA): the decline template for every input
        bp, bn = spec.pair(e, "decline")
        zb = (read(h, build_inputs(h, [bp]), [Site(2, "last")])[Site(2, "last")]
              - read(h, build_inputs(h, [bn]), [Site(2, "last")])[Site(2, "last")])[0]
        torch.testing.assert_close(ex.z_ba[2][i], zb, atol=1e-5, rtol=1e-4)
    assert ex.contrasts == ["decline", "comply", "financial", "comply", "comply"]


def test_p2s_completion_mean_for_hallucination(tiny_llava, coco_images, tmp_path) -> None:
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


def test_baselines(tiny_llama, tmp_path) -> None:
    ex = extract(tiny_llama, load_behaviour("safety"), _examples(6), tmp_path, steer_layers=[2], context_layers=[2],
                 progress=False)
    torch.testing.assert_close(mean_vector(ex.z[2]), ex.z[2].mean(0))
    r1, r2 = norm_random(ex.z[2], seed=1), norm_random(ex.z[2], seed=1)
    assert torch.equal(r1, r2) and not torch.equal(r1, norm_random(ex.z[2], seed=2))
    torch.testing.assert_close(r1.norm(dim=-1), ex.z[2].norm(dim=-1))
    assert (torch.nn.functional.cosine_similarity(r1, ex.z[2]).abs() < 0.9).all()
    resc = rescale_to_group(ex.z[2], ex.contrasts, "decline")
    target = ex.z[2][[c == "decline" for c in ex.contrasts]].norm(dim=-1).mean()
    torch.testing.assert_close(resc.norm(dim=-1), target.expand(6))
    zero = mean_vector(torch.stack([torch.ones(3), torch.zeros(3)]), ["decline", "zero"])
    assert torch.equal(zero, torch.ones(3))


def test_interrupted_extraction_resumes_to_identical_shards(tiny_llama, tmp_path) -> None:
    h, spec, exs = tiny_llama, load_behaviour("safety"), _examples(11)
    kw = dict(steer_layers=[1, 2], context_layers=[3], batch_size=2, shard_size=4, progress=False)
    extract(h, spec, exs, tmp_path / "full", **kw)

    class Interrupt(Exception):
        pass

    def stop_after_first(k: int) -> None:
        if k == 0:
            raise Interrupt

    with pytest.raises(Interrupt):
        extract(h, spec, exs, tmp_path / "resumed", on_shard=stop_after_first, **kw)
    index = json.loads((tmp_path / "resumed" / "index.json").read_text())
    assert list(index["shards"]) == ["shard-00000"]
    with pytest.raises(RuntimeError, match="incomplete"):
        load_extraction(tmp_path / "resumed")
    computed: list[int] = []
    extract(h, spec, exs, tmp_path / "resumed", on_shard=computed.append, **kw)
    assert computed == [1, 2], "finished shards are not recomputed"
    for k in range(3):
        a = (tmp_path / "full" / "shards" / f"shard-{k:05d}.safetensors").read_bytes()
        b = (tmp_path / "resumed" / "shards" / f"shard-{k:05d}.safetensors").read_bytes()
        assert a == b
    with pytest.raises(ValueError, match="other settings"):
        extract(h, spec, exs, tmp_path / "full", **{**kw, "steer_layers": [3]})


def test_predictor_fits_a_linear_map() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 24, generator=g)
    y = x @ (torch.randn(24, 40, generator=g) * 0.3)
    res = fit(x, y, TrainConfig(epochs=150, lr=3e-3, seed=0), progress=False)
    m = evaluate(res.net, x[res.val_ids], y[res.val_ids])
    assert m["cosine"] > 0.98 and m["rel_error"] < 0.2, m
    again = fit(x, y, TrainConfig(epochs=150, lr=3e-3, seed=0), progress=False)
    assert torch.equal(again.net.decoder.weight, res.net.decoder.weight), "training is seeded"
    svd = fit(x, y, TrainConfig(epochs=5, svd_init=True, l1=0.1, cosine=0.1), progress=False)
    assert svd.best_val_loss < float("inf")


@pytest.fixture(scope="module")
def trained(tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ex")
    ex = extract(tiny_llama, load_behaviour("safety"), _examples(16), tmp, steer_layers=[1, 2],
                 context_layers=[1, 2, 3],
                 progress=False)
    return ex


def test_save_load_roundtrip_gives_identical_generations(tiny_llama, trained, tmp_path) -> None:
    h = tiny_llama
    arts, _ = train_artifacts(trained, steer_layer=2, context_layer=1, cfg=TrainConfig(epochs=20), alpha=8.0,
                              progress=False)
    exs = _examples(4)
    for name in ("l2s", "mean", "mean_ba"):
        arts[name].save(tmp_path / name)
        back = SteeringArtifact.load(tmp_path / name, h)
        before = generate_with(h, MethodConfig.from_artifact(arts[name]), exs, max_new_tokens=5, progress=False)
        after = generate_with(h, MethodConfig.from_artifact(back), exs, max_new_tokens=5, progress=False)
        plain = generate_with(h, MethodConfig(), exs, max_new_tokens=5, progress=False)
        assert before == after and before != plain, name
    cfg = json.loads((tmp_path / "l2s" / "config.json").read_text())
    assert cfg["context_layer"] == 1 and cfg["steer_layers"] == [2] and cfg["hidden_size"] == 32
    assert cfg["behaviour"]["spec"]["name"] == "safety" and cfg["version"] and cfg["training"]["epochs"] == 20
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.pkl"))


def test_artifact_refuses_a_model_of_another_shape(tiny_llama, trained, tmp_path) -> None:
    arts, _ = train_artifacts(trained, steer_layer=2, context_layer=1, cfg=TrainConfig(epochs=2), progress=False)
    arts["l2s"].save(tmp_path / "a")
    with pytest.raises(IncompatibleArtifactError, match="hidden size 32"):
        SteeringArtifact.load(tmp_path / "a", tiny_model("llama", hidden_size=48))
    with pytest.raises(IncompatibleArtifactError, match="4 layers"):
        SteeringArtifact.load(tmp_path / "a", tiny_model("llama", num_layers=5))


@pytest.mark.parametrize("context_layer", [1, 2])
def test_same_pass_l2s_equals_two_pass(tiny_llama, trained, context_layer) -> None:
    h = tiny_llama
    arts, _ = train_artifacts(trained, steer_layer=2, context_layer=context_layer, cfg=TrainConfig(epochs=10),
                              progress=False)
    net = arts["l2s"].predictor
    rows = [PromptRow(q) for q in QUESTIONS[:4]]
    batch = build_inputs(h, rows)
    with steer(h, L2SProvider(net, context_layer, (2,)), alpha=6.0, scope="all"):
        same = h.model.generate(**batch.inputs, max_new_tokens=5, do_sample=False)
    hx = read(h, batch, [Site(context_layer, "prompt_last")])[Site(context_layer, "prompt_last")]
    with steer(h, {2: net(hx).detach()}, alpha=6.0, scope="all"):
        two = h.model.generate(**batch.inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(same, two)


def test_l2s_deeper_context_layer_uses_read_pass(tiny_llama, trained) -> None:
    """L' > L*: the method reads h in a pass stopping at L', then writes g(h) at L*."""
    h = tiny_llama
    arts, _ = train_artifacts(trained, steer_layer=1, context_layer=3, cfg=TrainConfig(epochs=10), alpha=6.0,
                              progress=False)
    exs = _examples(3)
    got = generate_with(h, MethodConfig.from_artifact(arts["l2s"]), exs, max_new_tokens=5, progress=False)
    batch = build_inputs(h, [PromptRow(e.question) for e in exs])
    hx = read(h, batch, [Site(3, "prompt_last")])[Site(3, "prompt_last")]
    with steer(h, {1: arts["l2s"].predictor(hx).detach()}, alpha=6.0):
        from learn2steer.generation import generate
        want = generate(h, batch, max_new_tokens=5)
    assert got == want


def test_per_example_methods_need_every_vector(tiny_llama) -> None:
    cfg = MethodConfig(method="p2s", steer_layers=[1], per_example={"q0": torch.ones(32)})
    with pytest.raises(KeyError, match="missing"):
        generate_with(tiny_llama, cfg, _examples(2), max_new_tokens=2, progress=False)
    with pytest.raises(ValueError, match="unknown method"):
        MethodConfig(method="magic")
    with pytest.raises(ValueError, match="needs a fixed vector"):
        MethodConfig(method="mean", steer_layers=[1])


def test_behaviour_spec_validation(tmp_path) -> None:
    spec = load_behaviour("safety")
    assert spec.contrast_name(Example("x", "q", category="11-Financial_Advice")) == "financial"
    assert spec.contrast_name(Example("x", "q", category="never-seen")) == "decline"
    with pytest.raises(ValueError, match="unknown contrast"):
        BehaviourSpec.from_dict({"name": "b", "contrasts": {"a": {"suffix": "", "positive": "x", "negative": "y"}},
                                 "categories": {"c": "nope"}})
    with pytest.raises(ValueError, match="needs a label"):
        load_behaviour("hallucination").pair(Example("x", "q"))
    with pytest.raises(ValueError, match="unknown behaviour"):
        load_behaviour("kindness")
    p = tmp_path / "b.yaml"
    p.write_text("name: b\ncontrasts:\n  a: {suffix: ' ok?', positive: 'Yes', negative: 'No'}\ndefault: a\n")
    assert load_behaviour(p).pair(Example("x", "q"))[0].completion == "Yes"
