"""The runtime artifact registry's folder, vllm-lens's request format and the registry's refusals, without vLLM
(engines/store.py, engines/lens.py, engines/requests.py; over HTTP: test_vllm_registry.py)."""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import request_registry, write_nan

from learn2steer.engines import lens, store
from learn2steer.engines.requests import PIN, Registry
from learn2steer.engines.store import ArtifactStore
from learn2steer.engines.vllm.admin import authenticate, load_keys
from learn2steer.engines.vllm.metrics import reason_of
from learn2steer.engines.vllm.protocol import EngineLimits, check_artifact
from learn2steer.errors import InvalidInputError

D, N = 16, 6


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name in store.FILES}


@pytest.fixture(scope="module")
def arts(tmp_path_factory) -> Registry:
    return request_registry(tmp_path_factory.mktemp("arts"), D, N)


def test_store_versions_pins_and_survives_a_failed_upload(arts, tmp_path) -> None:
    st = ArtifactStore(tmp_path / "reg")
    limits = EngineLimits(hidden_size=D, num_layers=N, chunked_prefill=False)
    ok = lambda folder: check_artifact(folder, limits)  # noqa: E731
    v1, prev = st.put("safety", _files(Path(arts.names["mean"])), ok)
    assert prev is None and st.names() == {"safety": v1}
    reg = Registry({}, store=ArtifactStore(tmp_path / "reg"))  # another process: same folder
    extra = {"steer": "safety", PIN: "0" * 16}
    reg.pin(extra)
    assert extra[PIN] == v1, "the front end overwrites a client's pin with the current version"
    old = reg.parse(extra)
    assert old is not None and old.meta.kind == "fixed" and old.key == f"reg:safety@{v1}"
    v2, prev = st.put("safety", _files(Path(arts.names["l2s"])), ok)
    assert prev == v1 and v2 != v1 and st.current("safety") == v2
    assert reg.parse(extra) == old, "a request pinned to v1 keeps v1 after a replace"
    fresh = {"steer": "safety"}
    reg.pin(fresh)
    assert reg.parse(fresh).meta.kind == "l2s"  # type: ignore[union-attr]

    def bad(folder: Path) -> None:
        raise InvalidInputError("no")

    with pytest.raises(InvalidInputError):
        st.put("safety", _files(Path(arts.names["mean"])), bad)
    assert st.current("safety") == v2 and not list((tmp_path / "reg").glob(".incoming-*"))
    assert st.remove("safety") == v2 and st.names() == {}
    with pytest.raises(InvalidInputError, match="unknown steering artifact 'safety' \\(not registered, or not ready"):
        reg.parse({"steer": "safety"})
    assert reg.parse(extra) == old, "a running request still finds its version after a remove"
    # a retired version goes only after the grace period, counted from when it stopped being current
    st.put("other", _files(Path(arts.names["mean"])), ok)
    old_time = time.time() - store.GRACE_S - 10
    os.utime(tmp_path / "reg" / "safety" / v1, (old_time, old_time))
    st._collect("safety")
    assert not (tmp_path / "reg" / "safety" / v1).exists() and (tmp_path / "reg" / "safety" / v2).exists()


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden", "x" * 65, "a..b", "CURRENT/.."])
def test_names_with_paths_are_refused(name, tmp_path) -> None:
    with pytest.raises(InvalidInputError, match="is not allowed"):
        ArtifactStore(tmp_path).put(name, {"config.json": b"{}"}, lambda f: None)
    assert not any(tmp_path.iterdir())


def test_upload_checks_refuse_wrong_shape_non_finite_and_pickle(arts, tmp_path) -> None:
    from learn2steer import SteeringArtifact
    from learn2steer.vectors import SteeringVector

    limits = EngineLimits(hidden_size=D, num_layers=N, chunked_prefill=False)
    with pytest.raises(InvalidInputError, match="hidden size 16 and 6 layers; this model has 32 and 6"):
        check_artifact(arts.names["mean"], EngineLimits(hidden_size=32, num_layers=N, chunked_prefill=False))
    nan = SteeringArtifact(kind="fixed", method="mean", model="t", hidden_size=D, num_layers=N, steer_layers=[1],
                           vector=SteeringVector({1: torch.ones(D)})).save(tmp_path / "nan")
    write_nan(nan)
    with pytest.raises(InvalidInputError, match="NaN or inf"):
        check_artifact(nan, limits)
    (tmp_path / "nan" / "vectors.safetensors").write_bytes(b"\x80\x04\x95" + b"pickle" * 10)
    with pytest.raises(InvalidInputError):
        check_artifact(nan, limits)
    with pytest.raises(InvalidInputError, match="chunked prefill"):
        check_artifact(arts.names["l2s"], EngineLimits(hidden_size=D, num_layers=N, chunked_prefill=True))


def test_admin_keys_are_labelled_and_compared_whole(tmp_path) -> None:
    f = tmp_path / "keys"
    f.write_text("# operators\nalice 0123456789abcdef0123\nfedcba9876543210fedc\n")
    keys = load_keys({"L2S_ADMIN_KEY": "k" * 20, "L2S_ADMIN_KEY_FILE": str(f)})
    assert keys == {"env": "k" * 20, "alice": "0123456789abcdef0123", "file:3": "fedcba9876543210fedc"}
    assert authenticate("0123456789abcdef0123", keys) == "alice"
    assert authenticate("0123456789abcdef012", keys) is None and authenticate(None, keys) is None
    with pytest.raises(InvalidInputError, match="shorter than 16"):
        load_keys({"L2S_ADMIN_KEY": "short"})


# ---- vllm-lens's apply_steering_vectors -----------------------------------------------------------------------

def _lens_tensor(arr: np.ndarray) -> dict:
    """vllm-lens's uncompressed tensor dict (its legacy format; zstd needs the zstandard package)."""
    a = np.ascontiguousarray(arr, dtype=np.float32)
    return {"data": base64.b64encode(a.tobytes()).decode(), "dtype": "float32", "shape": list(a.shape)}


def test_lens_vectors_map_to_inline_steering(arts) -> None:
    reg = Registry({}, inline=lens.InlineLimits(max_vectors=4))
    rng = np.random.default_rng(0)
    a = rng.standard_normal((2, D)).astype(np.float32)
    one = json.dumps([{"activations": _lens_tensor(a), "layer_indices": [1, 3], "scale": 2.5}])
    req = reg.parse({"apply_steering_vectors": one})
    assert req is not None and (req.alpha, req.scope, req.strength, req.meta.steer_layers) == (2.5, "all",
                                                                                               "absolute", (1, 3))
    assert req.layer_vectors is not None and np.allclose(dict(req.layer_vectors)[3], a[1])
    norm = json.dumps([{"activations": a[:1].tolist(), "layer_indices": [2], "scale": 0.5, "norm_match": True}])
    req = reg.parse({"apply_steering_vectors": norm})
    assert req is not None and (req.alpha, req.strength) == (0.5, "relative")
    two = [{"activations": _lens_tensor(a[:1]), "layer_indices": [2], "scale": 2.0},
           {"activations": _lens_tensor(a[1:]), "layer_indices": [2], "scale": -1.0}]
    req = reg.parse({"apply_steering_vectors": json.dumps(two), "scope": "generated"})
    assert req is not None and req.alpha == 1.0 and req.scope == "generated"
    assert np.allclose(dict(req.layer_vectors or ())[2], 2.0 * a[0] - a[1], atol=1e-6)


@pytest.mark.parametrize(("value", "field"), [
    ([{"activations": [[1.0] * D], "layer_indices": [1], "position_indices": [0]}], "position_indices"),
    ([{"activations": [[[1.0] * D]], "layer_indices": [1]}], "activations"),
    ([{"activations": [[1.0] * D], "layer_indices": [1, 2]}], "layer_indices"),
    ([{"activations": [[float("nan")] * D], "layer_indices": [1]}], "activations"),
    ([{"activations": [[1.0] * D], "layer_indices": [1], "scale": 1e9}], "scale"),
    ([{"activations": [[1.0] * D], "layer_indices": [1], "hook": 1}], "hook"),
    ([{"activations": {"data": "AAAA", "dtype": "float32", "shape": [1, D], "compression": "lz4"},
       "layer_indices": [1]}], "compression"),
    ([{"activations": [[1.0] * D], "layer_indices": [i]} for i in range(5)], "apply_steering_vectors"),
])
def test_lens_requests_we_cannot_honour_name_the_field(value, field) -> None:
    reg = Registry({}, inline=lens.InlineLimits(max_vectors=4))
    with pytest.raises(InvalidInputError, match=field) as e:
        reg.parse({"apply_steering_vectors": json.dumps(value)})
    assert "\n" not in str(e.value)


def test_inline_vectors_are_off_by_default_and_lens_only_keys_are_refused(arts) -> None:
    value = json.dumps([{"activations": [[1.0] * D], "layer_indices": [1]}])
    with pytest.raises(InvalidInputError, match="--inline-vectors"):
        arts.parse({"apply_steering_vectors": value})
    with pytest.raises(InvalidInputError, match="apply_hooks is not supported: .*cloudpickle"):
        arts.parse({"apply_hooks": "[]"})
    with pytest.raises(InvalidInputError, match="alpha does not go with apply_steering_vectors"):
        Registry({}, inline=lens.InlineLimits()).parse({"apply_steering_vectors": value, "alpha": 2})


def test_refusal_reasons() -> None:
    assert reason_of("unknown steering artifact 'x'; this server has: none") == "unknown_artifact"
    assert reason_of("|alpha| must be at most 100 on this engine, got 1000") == "alpha"
    assert reason_of("vllm_xargs apply_steering_vectors: is not valid JSON") == "inline"
    assert reason_of("something new") == "other"
