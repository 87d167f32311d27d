"""The steering request format without any engine: parsing a request's extra arguments, refusals, prefix-cache
salts (engines/requests.py; the vLLM engine's settings and limits: test_vllm_protocol.py)."""

from __future__ import annotations

import math
import re

import pytest
from helpers import request_registry

from learn2steer.engines.requests import Registry
from learn2steer.errors import InvalidInputError

D, N = 16, 6


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Registry:
    return request_registry(tmp_path_factory.mktemp("arts"), D, N)



def test_no_steering_keys_is_no_steering(registry) -> None:
    assert registry.parse(None) is None
    assert registry.parse({"other_plugin": 1}) is None


def test_named_artifact_takes_its_defaults_and_overrides(registry) -> None:
    req = registry.parse({"steer": "mean"})
    assert req is not None and (req.alpha, req.scope, req.meta.kind, req.meta.steer_layers) == (2.0, "all", "fixed",
                                                                                                  (3,))
    req = registry.parse({"steer": "mean", "alpha": 0, "scope": "generated"})
    assert req is not None and (req.alpha, req.scope) == (0.0, "generated")


@pytest.mark.parametrize(("args", "message"), [
    ({"steer": "nope"}, "unknown steering artifact 'nope'; this server has: l2s, late, mean"),
    ({"steer": "mean", "alpha": math.inf}, "alpha must be a finite number"),
    ({"steer": "mean", "alpha": 1e308}, "alpha must be a finite number (in float32)"),
    ({"steer": "mean", "alpha": -1e39}, "alpha must be a finite number (in float32)"),
    ({"steer": "mean", "alpha": 1e6}, "|alpha| must be at most 100 on this engine, got 1000000.0"),
    ({"steer": "mean", "alpha": -100.5}, "|alpha| must be at most 100"),
    ({"steer": "mean", "alpha": "1"}, "alpha must be a finite number"),
    ({"steer": "mean", "alpha": True}, "alpha must be a finite number"),
    ({"steer": "mean", "scope": "everywhere"}, "scope must be one of all, prompt, generated"),
    ({"steer": "mean", "steer_path": "/x"}, "exactly one of"),
    ({"alpha": 1.0}, "exactly one of"),
    ({"steer_path": "/x"}, "only steers with its named artifacts"),
    ({"steer": "mean", "gated": 0.5}, "gated must be true or false"),
])
def test_bad_requests_are_one_clear_sentence(registry, args, message) -> None:
    with pytest.raises(InvalidInputError, match=re.escape(message)):
        registry.parse(args)


def test_prefix_cache_salts(registry) -> None:
    def salt(args, prompt):
        req = registry.parse(args)
        assert req is not None
        return req.salt(prompt)

    a, b = [1, 2, 3, 4], [1, 2, 3, 5]
    # a fixed vector on every position: same settings share whatever the prompt; other settings never do
    assert salt({"steer": "mean"}, a) == salt({"steer": "mean"}, b)
    assert salt({"steer": "mean"}, a) != salt({"steer": "mean", "alpha": 1.5}, a)
    assert salt({"steer": "mean"}, a) != salt({"steer": "mean", "scope": "generated"}, a)
    # a scope that depends on where the prompt ends salts its length in
    assert salt({"steer": "mean", "scope": "prompt"}, a) != salt({"steer": "mean", "scope": "prompt"}, a + [6])
    # L2S: the vector is predicted from the whole prompt, so only identical prompts share
    assert salt({"steer": "l2s"}, a) == salt({"steer": "l2s"}, list(a))
    assert salt({"steer": "l2s"}, a) != salt({"steer": "l2s"}, b)
    assert salt({"steer": "l2s"}, a) != salt({"steer": "l2s", "gated": False}, a)


def test_inline_vectors_must_be_finite_in_float32(tmp_path) -> None:
    reg = Registry({}, allow_paths=True)
    assert reg.parse({"steer_vector": [1.0] * D, "steer_layers": [3]}) is not None
    with pytest.raises(InvalidInputError, match=r"finite numbers \(in float32\)"):
        reg.parse({"steer_vector": [1e39] + [0.0] * (D - 1), "steer_layers": [3]})


def test_l2s_salt_tells_images_apart(registry) -> None:
    """Two images give the same placeholder ids; their content identifiers keep their cached prefixes apart."""
    req = registry.parse({"steer": "l2s"})
    assert req is not None
    ids = [1, 9, 9, 9, 2]
    assert req.salt(ids, ["img-a"]) != req.salt(ids, ["img-b"])
    assert req.salt(ids, ["img-a"]) == req.salt(ids, ["img-a"])
    assert req.salt(ids, ["img-a"]) != req.salt(ids)
    assert req.salt(ids) == req.salt(ids, ()), "text requests keep their salt"


def test_strength_is_a_request_field_with_the_artifacts_default(registry) -> None:
    req = registry.parse({"steer": "mean"})
    assert req is not None and req.strength == "absolute"
    rel = registry.parse({"steer": "mean", "strength": "relative"})
    assert rel is not None and rel.strength == "relative"
    assert rel.salt([1, 2]) != req.salt([1, 2]), "relative and absolute additions never share cached blocks"
    assert req.salt([1, 2]) == registry.parse({"steer": "mean", "strength": "absolute"}).salt([1, 2])
    for bad in ("loud", 1, None):
        with pytest.raises(InvalidInputError, match="strength"):
            registry.parse({"steer": "mean", "strength": bad})


def test_inline_vectors_may_differ_between_layers() -> None:
    """One vector for every layer (the 0.3 format, same source digest), or one per steering layer (what the HF
    engine takes from per-input vectors that differ between layers); a mismatch is a sentence."""
    import hashlib
    import json

    reg = Registry({}, allow_paths=True)
    one = reg.parse({"steer_vector": [1.0] * D, "steer_layers": [1, 3]})
    assert one is not None and one.vector_at(1) == one.vector_at(3) == (1.0,) * D
    assert one.key == "inline:" + hashlib.sha256(json.dumps([[1.0] * D, [1, 3]]).encode()).hexdigest()[:24]
    two = reg.parse({"steer_vector": [[1.0] * D, [2.0] * D], "steer_layers": [1, 3]})
    assert two is not None and two.vector_at(1) == (1.0,) * D and two.vector_at(3) == (2.0,) * D
    assert two.meta.hidden_size == D and two.key != one.key
    for bad, match in [([[1.0] * D], "holds 1 vectors for 2 steer_layers"),
                       ([[1.0] * D, [2.0] * (D - 1)], "hidden size"),
                       ([[1.0] * D, [float("nan")] * D], "finite numbers")]:
        with pytest.raises(InvalidInputError, match=match):
            reg.parse({"steer_vector": bad, "steer_layers": [1, 3]})
    with pytest.raises(InvalidInputError, match="repeats a layer"):
        reg.parse({"steer_vector": [[1.0] * D, [2.0] * D], "steer_layers": [3, 3]})
