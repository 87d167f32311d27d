"""llama.cpp / repeng control vectors, steering-vectors vectors, and the paper's released predictors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import data_path

from learn2steer.artifacts import SteeringArtifact
from learn2steer.errors import IncompatibleArtifactError, InvalidInputError
from learn2steer.interop import (
    OFFICIAL,
    export_gguf,
    fixed_artifact,
    import_official,
    load_vector_file,
    read_gguf,
    vector_from_peer,
)
from learn2steer.vectors import SteeringVector


def _fixed(layers=(3, 7), d=8, alpha=2.0) -> SteeringArtifact:
    g = torch.Generator().manual_seed(0)
    vec = SteeringVector({k: torch.randn(d, generator=g) for k in layers})
    return fixed_artifact(vec, model="SmolLM2-135M-Instruct", hidden_size=d, num_layers=30, alpha=alpha)


def test_gguf_export_reads_back_with_the_same_numbers(tmp_path) -> None:
    import gguf

    art = _fixed()
    path = export_gguf(art, tmp_path / "v.gguf")
    reader = gguf.GGUFReader(str(path))
    names = sorted(t.name for t in reader.tensors)
    assert names == ["direction.3", "direction.7"], "llama.cpp rejects files with any other tensor"
    for t in reader.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32 and t.data.ndim == 1
        layer = int(t.name.split(".")[1])
        np.testing.assert_allclose(t.data, (2.0 * art.vector[layer]).numpy(), rtol=0, atol=0)
    f = reader.get_field("controlvector.model_hint")
    assert bytes(f.parts[f.data[0]]).decode() == "llama"
    f = reader.get_field("controlvector.layer_count")
    assert int(f.parts[f.data[0]][0]) == 2
    back = read_gguf(path)
    assert back.model_hint == "llama" and torch.equal(back.vector[7], 2.0 * art.vector[7])
    assert torch.equal(read_gguf(export_gguf(art, tmp_path / "raw.gguf", scale=1.0)).vector[3], art.vector[3])


def test_gguf_export_refuses_what_llama_cpp_cannot_express(tmp_path) -> None:
    with pytest.raises(InvalidInputError, match="block 0"):
        export_gguf(_fixed(layers=(0, 2)), tmp_path / "v.gguf")
    with pytest.raises(InvalidInputError, match="model_hint|model type"):
        export_gguf(fixed_artifact(SteeringVector({1: torch.ones(4)}), model="/nowhere", hidden_size=4,
                                   num_layers=3), tmp_path / "v.gguf")
    from learn2steer.predictor import L2SNet

    l2s = SteeringArtifact(kind="l2s", method="l2s", model="m", hidden_size=4, num_layers=3, steer_layers=[1],
                           predictor=L2SNet(4, 4, 2), context_layer=1)
    with pytest.raises(InvalidInputError, match="static control vector cannot express"):
        export_gguf(l2s, tmp_path / "v.gguf", hint="llama")


def test_reads_a_control_vector_written_the_way_repeng_writes_it(tmp_path) -> None:
    """repeng 0.4.0's ControlVector.export_gguf, step for step (its layout, not learn2steer's writer)."""
    import gguf

    dirs = {5: np.arange(6, dtype=np.float32), 9: -np.ones(6, dtype=np.float32)}
    w = gguf.GGUFWriter(str(tmp_path / "r.gguf"), "controlvector")
    w.add_string("controlvector.model_hint", "qwen2")
    w.add_uint32("controlvector.layer_count", len(dirs))
    for layer, d in dirs.items():
        w.add_tensor(f"direction.{layer}", d)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    vec, hint = load_vector_file(tmp_path / "r.gguf")
    assert hint == "qwen2" and list(vec) == [5, 9] and torch.equal(vec[5], torch.arange(6.0))


@dataclass
class _SVLike:  # the fields of steering_vectors.SteeringVector (0.12.2)
    layer_activations: dict
    layer_type: str = "decoder_block"


@dataclass
class _CVLike:  # the fields of repeng.ControlVector (0.4.0)
    model_type: str
    directions: dict


def test_peer_objects_and_saved_forms(tmp_path) -> None:
    sv = _SVLike({2: torch.ones(4), -1: torch.zeros(4)})
    assert list(vector_from_peer(sv)) == [-1, 2]
    assert torch.equal(vector_from_peer(_CVLike("llama", {1: np.full(4, 0.5, np.float32)}))[1], torch.full((4,), 0.5))
    with pytest.raises(InvalidInputError, match="layer_type 'mlp'"):
        vector_from_peer(_SVLike({1: torch.ones(2)}, layer_type="mlp"))
    torch.save(sv.layer_activations, tmp_path / "sv.pt")
    vec, _ = load_vector_file(tmp_path / "sv.pt")
    assert torch.equal(vec[2], torch.ones(4))
    torch.save(sv, tmp_path / "obj.pt")  # a pickled object: refused, never unpickled
    with pytest.raises(InvalidInputError, match="never unpickles"):
        load_vector_file(tmp_path / "obj.pt")
    from safetensors.torch import save_file

    save_file({"layer.4": torch.ones(3)}, str(tmp_path / "v.safetensors"))
    assert list(load_vector_file(tmp_path / "v.safetensors")[0]) == [4]
    with pytest.raises(IncompatibleArtifactError, match="hidden size"):
        fixed_artifact(vec, model="m", hidden_size=8, num_layers=4)


@pytest.mark.parametrize("key,file", [
    (("llava-1.5-7b", "safety"), "llava_mmsb_steering_net_v3_multi_nobias_K100.pt"),
    (("llava-1.5-7b", "pope"), "llava_14_average_all_pope_train_-1.pt"),
    (("qwen2-vl-7b", "safety"), "qwen_14_last_input_multi_mmsb_train_-1_v2.pt"),
])
def test_official_predictors_match_an_independent_linear_tanh_linear(key, file, tmp_path) -> None:
    path = data_path("official_l2s", file)
    art = import_official(path, model=key[0], task=key[1])
    s = OFFICIAL[key]
    assert (art.steer_layers, art.context_layer, art.alpha, art.context_read) == (
        [s.steer_layer], s.context_layer, s.alpha, s.context_read)
    raw = torch.load(path, weights_only=True, map_location="cpu")
    raw = raw.get("steering_model", raw)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, s.hidden_size, generator=g) * 3
    enc_w, enc_b, dec_w = (raw[k].float() for k in ("encoder.weight", "encoder.bias", "decoder.weight"))
    want = torch.tanh(h @ enc_w.T + enc_b) @ dec_w.T
    torch.testing.assert_close(art.predictor(h), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(art.predictor.in_mean, torch.zeros(s.hidden_size)), "no input standardisation"
    back = SteeringArtifact.load(art.save(tmp_path / "a"))
    torch.testing.assert_close(back.predictor(h), want, rtol=1e-5, atol=1e-5)


def test_official_import_refuses_unknown_layouts(tmp_path) -> None:
    torch.save({"weight": torch.ones(2, 2)}, tmp_path / "x.pt")
    with pytest.raises(InvalidInputError, match="official layout"):
        import_official(tmp_path / "x.pt", model="llava-1.5-7b", task="pope")
    with pytest.raises(InvalidInputError, match=r"qwen2vlinstruct_17_average_all_pope_train_-1\.pt in github\.com/"
                                                 r"jayneelparekh/learn-to-steer\) is not in this project's copy"):
        import_official(tmp_path / "x.pt", model="qwen2-vl-7b", task="pope")
    with pytest.raises(InvalidInputError, match="no released predictor is known"):
        import_official(tmp_path / "x.pt", model="qwen2-vl-7b", task="chair")
    small = {"encoder.weight": torch.ones(4, 8), "encoder.bias": torch.ones(4), "decoder.weight": torch.ones(8, 4)}
    torch.save(small, tmp_path / "small.pt")
    with pytest.raises(IncompatibleArtifactError, match="another model"):
        import_official(tmp_path / "small.pt", model="llava-1.5-7b", task="pope")


@pytest.mark.parametrize("key,file", [
    (("llava-1.5-7b", "safety"), "llava_mmsb_steering_net_v3_multi_nobias_K100.pt"),
    (("llava-1.5-7b", "pope"), "llava_14_average_all_pope_train_-1.pt"),
    (("qwen2-vl-7b", "safety"), "qwen_14_last_input_multi_mmsb_train_-1_v2.pt"),
])
def test_official_predictors_are_accepted_by_the_vllm_protocol(key, file, tmp_path) -> None:
    """`l2s serve --artifact NAME=DIR` after `l2s import-official`: the request checks accept the paper's settings
    (L'=30 > L*=15, input_last) on the model they were made for and refuse another model's shape."""
    from learn2steer.engines.requests import Registry
    from learn2steer.engines.vllm.protocol import EngineLimits, check_request

    art = import_official(data_path("official_l2s", file), model=key[0], task=key[1])
    s = OFFICIAL[key]
    req = Registry({"paper": str(art.save(tmp_path / "a"))}, allow_paths=False).parse({"steer": "paper"})
    assert req is not None and req.meta.context_read == s.context_read
    assert req.reads_after_writing == (s.context_layer > s.steer_layer)
    check_request(req, EngineLimits(hidden_size=s.hidden_size, num_layers=s.num_layers, chunked_prefill=False))
    with pytest.raises(InvalidInputError, match="was made for a model of hidden size"):
        check_request(req, EngineLimits(hidden_size=576, num_layers=30, chunked_prefill=False))


@pytest.mark.parametrize("model,task,width,want", [("llava-1.5-7b", "safety", 4096, "turn_end"),
                                                   ("qwen2-vl-7b", "safety", 3584, "turn_end"),
                                                   ("llava-1.5-7b", "pope", 4096, "completion_mean")])
def test_official_predictors_are_labelled_with_where_their_targets_were_read(model, task, width, want,
                                                                             tmp_path) -> None:
    """The official safety targets are read at the last token of the complete assistant turn (T+/T- forced as
    whole turns: our "turn_end"), POPE's as the mean over the forced answer; 0.3 labelled safety "last"."""
    g = torch.Generator().manual_seed(0)
    raw = {"encoder.weight": torch.randn(100, width, generator=g), "encoder.bias": torch.randn(100, generator=g),
           "decoder.weight": torch.randn(width, 100, generator=g)}
    torch.save(raw, tmp_path / "net.pt")
    art = import_official(tmp_path / "net.pt", model=model, task=task)
    assert art.read_position == want
    assert SteeringArtifact.load(art.save(tmp_path / "a")).read_position == want
