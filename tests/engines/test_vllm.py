"""The vLLM engine against the HF engine, token for token, on the real SmolLM2 (CPU, float32, greedy).

Runs in the serving environment (``bash scripts/setup.sh --serve``; marker ``serve``). Every engine here
is vLLM's default multiprocess engine (API process, engine core, worker), so the plugin is exercised
as users get it. The plugin's position trace (``$L2S_VLLM_TRACE``) shows exactly which absolute positions
each request had written, and is compared with the HF engine's trace of the same request.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.serve
vllm = pytest.importorskip("vllm")

from helpers import l2s_server, post_json  # noqa: E402

from learn2steer import MethodConfig, SteeringArtifact, TrainConfig, extract, load_behaviour  # noqa: E402
from learn2steer.engines.hf import HFEngine, generate_tokens  # noqa: E402
from learn2steer.evaluation.datasets import demo_requests  # noqa: E402
from learn2steer.methods import prompt_rows  # noqa: E402
from learn2steer.models.prompts import build_inputs  # noqa: E402
from learn2steer.steering import TraceRecord, steer  # noqa: E402
from learn2steer.training import train_artifacts  # noqa: E402

N_NEW = 24
EXAMPLES = demo_requests()[2::11][:5] + [e for e in demo_requests() if e.category == "benign"][:1]


@pytest.fixture(scope="module")
def smol():
    from learn2steer.models.loading import load_default_model

    return load_default_model()


@pytest.fixture(scope="module")
def arts(smol, tmp_path_factory):
    """Mean-S and L2S (L'=10 <= L*=12) trained on the demo data; an L2S with L'=14 > L*=12 (the paper's order)."""
    tmp = tmp_path_factory.mktemp("arts")
    ex = extract(smol, load_behaviour("safety_refusal"), demo_requests()[::5][:40], tmp / "ext", steer_layers=[12],
                 context_layers=[10, 14], progress=False)
    cfg = TrainConfig(epochs=50, lr=3e-3, standardize=True, l1=0, cosine=0)
    a, _ = train_artifacts(ex, steer_layer=12, context_layer=10, cfg=cfg, rescale_group="decline", progress=False)
    deep, _ = train_artifacts(ex, steer_layer=12, context_layer=14, cfg=cfg, progress=False)
    return {"mean": a["mean"], "l2s": a["l2s"], "l2s_deep": deep["l2s"],
            "dirs": {k: str(v.save(tmp / k)) for k, v in (("mean", a["mean"]), ("l2s", a["l2s"]),
                                                            ("l2s_deep", deep["l2s"]))}}


def _strip_eos(ids, eos):
    ids = list(ids)
    return ids[:-1] if ids and ids[-1] == eos else ids


_HF: dict = {}  # HF reference outputs, computed once per (method config, examples)


def _key(cfg, examples) -> tuple:
    from learn2steer.methods import fingerprint

    return fingerprint(cfg), tuple(e.id for e in examples)


def hf_tokens(smol, cfg, examples):
    key = ("tokens", *_key(cfg, examples))
    if key not in _HF:
        out = HFEngine(smol).answer_tokens(cfg, examples, max_new_tokens=N_NEW, batch_size=8, progress=False)
        _HF[key] = [_strip_eos(x[0], smol.tokenizer.eos_token_id) for x in out]
    return _HF[key]


def hf_positions(smol, cfg, example) -> set[int]:
    """Absolute positions the HF engine writes for one example (alone: no padding, stops at its own EOS)."""
    key = ("positions", *_key(cfg, [example]))
    if key not in _HF:
        _HF[key] = _hf_positions(smol, cfg, example)
    return _HF[key]


def _hf_positions(smol, cfg, example) -> set[int]:
    batch = build_inputs(smol, prompt_rows(cfg, [example]))
    trace: list[TraceRecord] = []
    with steer(smol, cfg.provider_for([example.id]), alpha=cfg.alpha, scope=cfg.scope, batch=batch, trace=trace):
        generate_tokens(smol, batch, max_new_tokens=N_NEW)
    return set().union(*(set(t.columns[0]) for t in trace))


def _external(rid: str) -> str:
    return rid.rsplit("-", 1)[0]  # the engine's request id is the caller's id plus a random suffix


def vllm_trace(path: Path) -> tuple[dict[str, list[int]], list[dict]]:
    """Positions written per request (by the id RequestOutput reports), and the 'freed' records."""
    writes: dict[str, list[int]] = defaultdict(list)
    freed = []
    for line in path.read_text().splitlines() if path.exists() else []:
        r = json.loads(line)
        if "freed" in r:
            freed.append({**r, "freed": _external(r["freed"])})
        elif "request" in r:
            writes[_external(r["request"])] += r["positions"]
    return writes, freed


def vllm_reads(path: Path) -> dict[str, list[tuple[int, int]]]:
    """(layer, absolute position) of each L2S read, per request."""
    reads: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for line in path.read_text().splitlines() if path.exists() else []:
        r = json.loads(line)
        if "read" in r:
            reads[_external(r["read"])].append((r["layer"], r["position"]))
    return reads


def make_engine(trace: Path, **kw):
    from learn2steer.engines.vllm.offline import VLLMEngine

    os.environ["L2S_VLLM_TRACE"] = str(trace)  # read by the worker process, which inherits the environment
    return VLLMEngine.create("default", **kw)


def _configs(arts):
    return {"none": MethodConfig(), "mean": MethodConfig.from_artifact(arts["mean"], alpha=1.0),
            "l2s": MethodConfig.from_artifact(arts["l2s"], alpha=1.0),
            "l2s_zero": MethodConfig.from_artifact(arts["l2s"], alpha=0.0)}


def _mixed(engine, cfgs, examples):
    """One vLLM call with requests of every method interleaved; returns {method: [tokens per example]}."""
    order, reqs = [], []
    for i, e in enumerate(examples):
        names = list(cfgs)
        for name in names[i % len(names):] + names[:i % len(names)]:
            order.append((name, i))
            reqs += engine.requests(cfgs[name], [e], max_new_tokens=N_NEW)
    outs = engine.generate(reqs)
    got: dict[str, list] = {n: [None] * len(examples) for n in cfgs}
    for (name, i), out in zip(order, outs):
        got[name][i] = _strip_eos(out.outputs[0].token_ids, engine.templates.tokenizer.eos_token_id)
    return got, [o.request_id for o in outs], order


@pytest.fixture(scope="module")
def eager(tmp_path_factory):
    trace = tmp_path_factory.mktemp("trace") / "eager.jsonl"
    engine = make_engine(trace, enforce_eager=True, block_size=32)
    yield engine, trace
    engine.close()


def test_mixed_batch_equals_hf_token_for_token(smol, arts, eager) -> None:
    engine, trace = eager
    cfgs = _configs(arts)
    got, ids, order = _mixed(engine, cfgs, EXAMPLES)
    want = {n: hf_tokens(smol, c, EXAMPLES) for n, c in cfgs.items()}
    for n in cfgs:
        assert got[n] == want[n], n
    assert got["l2s_zero"] == got["none"], "alpha 0 equals no steering"
    assert got["l2s"] != got["none"] and got["mean"] != got["none"], "steering changed the answers"
    # exactly the positions the HF engine writes, per request
    writes, _ = vllm_trace(trace)
    for rid, (name, i) in zip(ids, order):
        if name in ("none", "l2s_zero"):
            assert rid not in writes, "unsteered requests are never written, also in a mixed batch"
        else:
            assert sorted(set(writes[rid])) == sorted(hf_positions(smol, cfgs[name], EXAMPLES[i])), (name, i)
            assert len(writes[rid]) == len(set(writes[rid])), "each position written once (no preemption here)"


@pytest.mark.parametrize("scope", ["prompt", "generated"])
def test_scopes_match_hf(smol, arts, eager, scope) -> None:
    engine, trace = eager
    cfgs = {"mean": MethodConfig.from_artifact(arts["mean"], scope=scope),
            "l2s": MethodConfig.from_artifact(arts["l2s"], scope=scope)}
    got, ids, order = _mixed(engine, cfgs, EXAMPLES[:3])
    writes, _ = vllm_trace(trace)
    for n, c in cfgs.items():
        assert got[n] == hf_tokens(smol, c, EXAMPLES[:3]), n
    for rid, (name, i) in zip(ids, order):
        assert sorted(set(writes[rid])) == sorted(hf_positions(smol, cfgs[name], EXAMPLES[i])), (name, scope)


def test_prefix_cache_never_mixes_steering_and_still_shares(smol, arts, eager) -> None:
    engine, trace = eager
    mean = MethodConfig.from_artifact(arts["mean"])
    ex = [demo_requests()[101]]  # a prompt no other test sent
    engine.run(MethodConfig(), ex, max_new_tokens=N_NEW, progress=False)  # fills the cache, unsteered
    first = engine.run(mean, ex, max_new_tokens=N_NEW, progress=False)[0]
    again = engine.run(mean, ex, max_new_tokens=N_NEW, progress=False)[0]
    eos = smol.tokenizer.eos_token_id
    assert _strip_eos(first.outputs[0].token_ids, eos) == hf_tokens(smol, mean, ex)[0], "no unsteered KV reused"
    assert _strip_eos(again.outputs[0].token_ids, eos) == hf_tokens(smol, mean, ex)[0]
    writes, _ = vllm_trace(trace)
    n_prompt = len(first.prompt_token_ids)
    assert min(writes[first.request_id]) == 0, "the first steered request computed its whole prompt"
    assert min(writes[again.request_id]) >= 32 and again.num_cached_tokens >= 32, (
        "an identical steering configuration reuses the cached blocks", n_prompt, again.num_cached_tokens)


def test_finished_requests_free_their_vectors(arts, eager) -> None:
    engine, trace = eager
    l2s = MethodConfig.from_artifact(arts["l2s"])
    outs = engine.run(l2s, EXAMPLES[:3], max_new_tokens=4, progress=False)
    engine.run(MethodConfig(), EXAMPLES[:1], max_new_tokens=2, progress=False)  # a step that reports them finished
    _, freed = vllm_trace(trace)
    by_id = {r["freed"]: r for r in freed}
    assert all(o.request_id in by_id and by_id[o.request_id]["had_vector"] for o in outs)
    assert freed[-1]["stored_now"] == 0


def test_l2s_reading_after_writing_and_at_input_last_equals_hf(smol, arts, eager) -> None:
    """The paper's configuration: L'=14 > L*=12 (a read-only pass first) and the input_last read position."""
    engine, trace = eager
    cfgs = {"none": MethodConfig(), "deep": MethodConfig.from_artifact(arts["l2s_deep"]),
            "input_last": MethodConfig.from_artifact(replace(arts["l2s"], context_read="input_last")),
            "deep_input_last": MethodConfig.from_artifact(replace(arts["l2s_deep"], context_read="input_last"))}
    got, ids, order = _mixed(engine, cfgs, EXAMPLES[:3])
    for n, c in cfgs.items():
        assert got[n] == hf_tokens(smol, c, EXAMPLES[:3]), n
    assert got["deep"] != got["none"], "steering changed the answers"
    # each request read once, at L' and at the position its artifact names
    reads, writes = vllm_reads(trace), vllm_trace(trace)[0]
    for rid, (name, i) in zip(ids, order):
        if name == "none":
            continue
        batch = build_inputs(smol, prompt_rows(cfgs[name], [EXAMPLES[i]]), input_last=True)  # one row: no padding
        assert batch.input_last is not None
        position = int((batch.input_last if name.endswith("input_last") else batch.prompt_last)[0])
        layer = 14 if name.startswith("deep") else 10
        assert reads[rid] == [(layer, position)], (name, reads[rid], position)
        # scope all: every position the model was fed (the prompt and each generated token but the last)
        out = next(o for o in engine.last_outputs if o.request_id == rid)
        fed = len(out.prompt_token_ids) + len(out.outputs[0].token_ids) - 1
        assert sorted(writes[rid]) == list(range(fed)), name
    # an L' > L* request never reads the prefix cache (cached blocks of an identical request hold steered KV)
    again = engine.run(cfgs["deep"], EXAMPLES[:1], max_new_tokens=N_NEW, progress=False)[0]
    assert again.num_cached_tokens == 0
    assert _strip_eos(again.outputs[0].token_ids, smol.tokenizer.eos_token_id) == got["deep"][0]


def test_input_last_needs_a_prompt_that_ends_with_the_generation_prompt(arts, eager) -> None:
    engine, _ = eager
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    bare = engine.templates.tokenizer.encode("Hello there, how are you?", add_special_tokens=False)
    folder = str(replace(arts["l2s"], context_read="input_last").save(engine.workdir / "input_last"))
    with pytest.raises(Exception, match="does not end with the chat template's generation prompt"):
        engine.llm.generate([TokensPrompt(prompt_token_ids=bare)],
                            SamplingParams(max_tokens=2, extra_args={"steer_path": folder}), use_tqdm=False)


def test_what_vllm_cannot_apply_is_refused(arts, eager) -> None:
    engine, _ = eager
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompt = TokensPrompt(prompt_token_ids=engine.token_ids(MethodConfig(), EXAMPLES[:1])[0])
    for extra, match in [({"steer_path": "/nowhere"}, "not an artifact folder"),
                         ({"steer_path": arts["dirs"]["mean"], "alpha": float("nan")}, "finite"),
                         ({"steer_path": arts["dirs"]["mean"], "alpha": 1e308}, "finite"),
                         ({"steer_path": arts["dirs"]["mean"], "alpha": 101.0}, "at most 100"),
                         ({"steer_path": arts["dirs"]["mean"], "scope": "everything"}, "scope"),
                         ({"steer": "nothing"}, "unknown steering artifact")]:
        with pytest.raises(Exception, match=match):
            engine.llm.generate([prompt], SamplingParams(max_tokens=2, extra_args=extra), use_tqdm=False)
    # the engine survived every refusal
    assert engine.run(MethodConfig(), EXAMPLES[:1], max_new_tokens=2, progress=False)[0].outputs[0].token_ids


def test_chunked_prefill(smol, arts, tmp_path) -> None:
    """The last prompt token arrives in a later chunk: L2S (scope generated) and Mean-S still equal HF."""
    with make_engine(tmp_path / "t.jsonl", enforce_eager=True, enable_chunked_prefill=True,
                     max_num_batched_tokens=16, max_num_seqs=4) as engine:
        _check_chunked(smol, arts, engine, tmp_path)


def _check_chunked(smol, arts, engine, tmp_path) -> None:
    cfgs = {"none": MethodConfig(), "mean": MethodConfig.from_artifact(arts["mean"]),
            "l2s": MethodConfig.from_artifact(arts["l2s"], scope="generated")}
    got, ids, order = _mixed(engine, cfgs, EXAMPLES[:3])
    for n, c in cfgs.items():
        assert got[n] == hf_tokens(smol, c, EXAMPLES[:3]), n
    writes, _ = vllm_trace(tmp_path / "t.jsonl")
    for rid, (name, i) in zip(ids, order):
        if name != "none":
            assert sorted(set(writes[rid])) == sorted(hf_positions(smol, cfgs[name], EXAMPLES[i]))
    assert all(len(t) > 32 for t in engine.token_ids(MethodConfig(), EXAMPLES[:3])), "prompts span 3+ chunks of 16"
    with pytest.raises(Exception, match="chunked prefill"):
        engine.run(MethodConfig.from_artifact(arts["l2s"], scope="all"), EXAMPLES[:1], max_new_tokens=2,
                   progress=False)


def test_preemption_recomputes_the_same_steered_positions(smol, arts, tmp_path) -> None:
    """A KV cache of a few blocks forces preemption; recomputed positions are steered as before."""
    with make_engine(tmp_path / "t.jsonl", enforce_eager=True, block_size=32, num_gpu_blocks_override=8,
                     max_model_len=160, max_num_seqs=4, enable_prefix_caching=False) as engine:
        _check_preemption(smol, arts, engine, tmp_path)


def _check_preemption(smol, arts, engine, tmp_path) -> None:
    cfgs = {"none": MethodConfig(), "mean": MethodConfig.from_artifact(arts["mean"]),
            "l2s": MethodConfig.from_artifact(arts["l2s"])}
    examples = EXAMPLES[:4]
    got, ids, order = _mixed(engine, cfgs, examples)
    for n, c in cfgs.items():
        assert got[n] == hf_tokens(smol, c, examples), n
    writes, _ = vllm_trace(tmp_path / "t.jsonl")
    recomputed = [rid for rid in writes if len(writes[rid]) > len(set(writes[rid]))]
    assert recomputed, "the tiny cache forced at least one steered request to be preempted and recomputed"
    for rid, (name, i) in zip(ids, order):
        if name != "none":
            assert sorted(set(writes[rid])) == sorted(hf_positions(smol, cfgs[name], examples[i]))


def test_compiled_mode_steers_too(smol, arts, tmp_path) -> None:
    """torch.compile (vLLM's default on CPU) silently drops Python hooks; the plugin's op runs compiled, and the
    read pass of L' > L* (stopped by an exception from the op) works through the compiled graph too."""
    cfgs = {"none": MethodConfig(), "mean": MethodConfig.from_artifact(arts["mean"]),
            "l2s": MethodConfig.from_artifact(arts["l2s"]), "deep": MethodConfig.from_artifact(arts["l2s_deep"])}
    with make_engine(tmp_path / "t.jsonl", enforce_eager=False) as engine:
        got, _, _ = _mixed(engine, cfgs, EXAMPLES[:3])
    for n, c in cfgs.items():
        assert got[n] == hf_tokens(smol, c, EXAMPLES[:3]), n


def test_http_server(smol, arts, tmp_path) -> None:
    args = ["--model", "default", "--artifact", f"safety={arts['dirs']['l2s']}", "--artifact",
            f"mean={arts['dirs']['mean']}", "--enforce-eager"]
    with l2s_server(args, tmp_path / "server.log") as base:
        ex = EXAMPLES[1]

        def chat(xargs: dict | None, **more) -> tuple[int, dict]:
            body = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": ex.question}],
                    "max_tokens": N_NEW, "temperature": 0, **more}
            if xargs is not None:
                body["vllm_xargs"] = xargs
            return post_json(base + "/v1/chat/completions", body)

        tok = smol.tokenizer
        answers = {}
        for name, xargs, cfg in [("none", None, MethodConfig()), ("l2s", {"steer": "safety", "alpha": 1.0},
                                 MethodConfig.from_artifact(arts["l2s"])),
                                 ("mean", {"steer": "mean"}, MethodConfig.from_artifact(arts["mean"]))]:
            status, body = chat(xargs)
            assert status == 200, body
            want = tok.decode(hf_tokens(smol, cfg, [ex])[0], skip_special_tokens=True).strip()
            answers[name] = body["choices"][0]["message"]["content"].strip()
            assert answers[name] == want, xargs
        for xargs, match in [({"steer": "nope"}, "unknown steering artifact"), ({"steer": "safety", "scope": "x"},
                             "scope"), ({"steer": "safety", "alpha": "high"}, "finite"),
                             ({"steer": "mean", "alpha": 1e308}, "finite number (in float32)"),
                             ({"steer": "mean", "alpha": 1e30}, "at most 100"),
                             ({"steer_path": arts["dirs"]["l2s"]}, "only steers with its named")]:
            status, body = chat(xargs)
            assert status == 400 and match in json.dumps(body), (xargs, body)
        status, body = chat({"steer": "mean"}, use_beam_search=True, n=2)
        assert status == 400 and "beam search" in json.dumps(body), body
        assert chat(None, use_beam_search=True, n=2)[0] == 200, "unsteered beam search is vLLM's own"
        # the server survived every bad request, and nothing of them stayed in shared state (KV blocks)
        for name, xargs in (("none", None), ("mean", {"steer": "mean"}), ("none", None)):
            status, body = chat(xargs)
            assert status == 200 and body["choices"][0]["message"]["content"].strip() == answers[name], name
        try:
            from openai import OpenAI
        except ImportError:
            return
        client = OpenAI(base_url=base + "/v1", api_key="none")
        r = client.chat.completions.create(model="SmolLM2-135M-Instruct", max_tokens=N_NEW, temperature=0,
                                           messages=[{"role": "user", "content": ex.question}],
                                           extra_body={"vllm_xargs": {"steer": "safety"}})
        want = tok.decode(hf_tokens(smol, MethodConfig.from_artifact(arts["l2s"]), [ex])[0], skip_special_tokens=True)
        assert r.choices[0].message.content.strip() == want.strip()


def test_serve_refuses_artifacts_it_cannot_apply(arts, capsys) -> None:
    from learn2steer.engines.vllm.server import ServeJob
    from learn2steer.errors import InvalidInputError

    argv, env = ServeJob(artifact=[f"deep={arts['dirs']['l2s_deep']}"], max_alpha=5).command()  # L' > L*: served
    assert env["L2S_VLLM_MAX_ALPHA"] == "5.0"
    with pytest.raises(InvalidInputError, match="maximum alpha"):
        ServeJob(artifact=[f"deep={arts['dirs']['l2s_deep']}"], max_alpha=float("inf")).command()
    with pytest.raises(InvalidInputError, match="NAME=DIR"):
        ServeJob(artifact=["oops"]).command()
    argv, _ = ServeJob(artifact=[f"s={arts['dirs']['l2s']}"], chunked_prefill=True).command()  # read ahead
    assert "--enable-chunked-prefill" in argv
    argv, env = ServeJob(artifact=[f"s={arts['dirs']['l2s']}"]).command()
    assert "--no-enable-chunked-prefill" in argv and json.loads(env["L2S_VLLM_ARTIFACTS"]) == {
        "s": str(Path(arts["dirs"]["l2s"]).resolve())}
    assert torch.cuda.is_available() or "float32" in argv
    assert SteeringArtifact.load(arts["dirs"]["l2s"]).kind == "l2s"


def test_plugin_pins_the_v1_model_runner_unless_told_otherwise() -> None:
    """The plugin patches the V1 model runner; on GPU vLLM would pick V2 (a V2 engine refuses steering)."""
    code = ("import os; from learn2steer.engines.vllm.plugin import register; register(); "
            "print(os.environ['VLLM_USE_V2_MODEL_RUNNER'])")
    for given, expected in ((None, "0"), ("1", "1")):
        env = {k: v for k, v in os.environ.items() if k != "VLLM_USE_V2_MODEL_RUNNER"}
        if given is not None:
            env["VLLM_USE_V2_MODEL_RUNNER"] = given
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip().splitlines()[-1] == expected


def test_eval_grid_on_vllm_equals_hf_and_resumes(smol, tmp_path, monkeypatch) -> None:
    """`l2s eval --engine vllm`: the same cells and answers as `--engine hf`; a finished run resumes without vLLM."""
    import shutil

    from learn2steer.evaluation.pipeline import EvalConfig, run_eval

    data = tmp_path / "mixed.jsonl"  # every 13th demo request: decline, defer and benign categories
    data.write_text("".join(json.dumps({"id": e.id, "question": e.question, "category": e.category}) + "\n"
                            for e in demo_requests()[::13]))
    common = dict(dataset=f"jsonl:{data}", behaviour="safety_refusal", layers=[12], context_layer=10, alphas=[1.0],
                  methods=["no_steering", "prompt", "mean", "l2s", "p2s"], max_new_tokens=16, batch_size=8,
                  train=TrainConfig(epochs=20, lr=3e-3, standardize=True, l1=0, cosine=0))
    hf = run_eval(EvalConfig(out=tmp_path / "hf", **common), handle=smol, progress=False)
    shutil.copytree(tmp_path / "hf" / "extraction", tmp_path / "vllm" / "extraction")  # same vectors, less time
    vl = run_eval(EvalConfig(out=tmp_path / "vllm", engine="vllm", **common), handle=smol, progress=False)
    assert [r.cell.name for r in vl.results] == [r.cell.name for r in hf.results]
    for a, b in zip(hf.results, vl.results):
        assert a.responses == b.responses, a.cell.name
    from learn2steer.engines.vllm.offline import VLLMEngine

    monkeypatch.setattr(VLLMEngine, "for_handle", classmethod(lambda *a, **k: pytest.fail("vLLM was started")))
    again = run_eval(EvalConfig(out=tmp_path / "vllm", engine="vllm", **common), handle=smol, progress=False)
    from learn2steer._io import dumps

    assert dumps([r.metrics for r in again.results]) == dumps([r.metrics for r in vl.results])
