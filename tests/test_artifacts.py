"""Artifacts: Hub layout, schema validation that names the bad field, checksums, model card, Hub round trip."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from helpers import examples

from learn2steer.artifacts import SteeringArtifact, validate_config
from learn2steer.behaviours import load_behaviour
from learn2steer.errors import IncompatibleArtifactError, InvalidInputError, MissingFileError
from learn2steer.extraction import extract
from learn2steer.models.tiny import tiny_model
from learn2steer.predictor import TrainConfig
from learn2steer.training import train_artifacts
from learn2steer.vectors import SteeringVector


@pytest.fixture(scope="module")
def arts(tiny_llama, tmp_path_factory):
    ex = extract(tiny_llama, load_behaviour("safety"), examples(12), tmp_path_factory.mktemp("ex"), steer_layers=[2],
                 context_layers=[1], progress=False)
    out, _ = train_artifacts(ex, steer_layer=2, context_layer=1, cfg=TrainConfig(epochs=3), alpha=2.0, progress=False)
    return out


def test_hub_layout_and_round_trip(arts, tiny_llama, tmp_path) -> None:
    for name, art in arts.items():
        d = art.save(tmp_path / name)
        files = {p.name for p in d.iterdir()}
        tensors = "model.safetensors" if art.reads_context else "vectors.safetensors"
        assert files == {"config.json", "README.md", tensors}
        back = SteeringArtifact.load(d, tiny_llama)
        assert back.config() == art.config()
        if art.vector is not None:
            assert torch.equal(back.vector[2], art.vector[2])
        else:
            for k, v in art.predictor.state_dict().items():
                assert torch.equal(back.predictor.state_dict()[k], v)
    card = (tmp_path / "l2s" / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: learn2steer" in card and "| context layer L' | 1" in card
    assert "training examples | 12" in card
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.pkl"))


def _tamper(tmp_path: Path, arts, name: str, **changes) -> Path:
    d = arts[name].save(tmp_path / "a")
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is ...:
            cfg.pop(k)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("name,changes,match", [
    ("mean", {"kind": "vector"}, r"field 'kind' must be 'fixed' or a predictor kind \(l2s, cast, \.\.\.\)"),
    ("mean", {"hidden_size": ...}, "lacks the required field 'hidden_size'"),
    ("mean", {"alpha": "1.0"}, "field 'alpha' must be a finite number"),
    ("mean", {"steer_layers": []}, "field 'steer_layers' must be a non-empty list"),
    ("mean", {"steer_layers": "2"}, "field 'steer_layers' must be a non-empty list"),
    ("mean", {"steer_layers": [3]}, "has layers \\[2\\] but steer_layers says \\[3\\]"),
    ("l2s", {"hidden_size": 48, "predictor": {"d_in": 48, "d_out": 48, "hidden": 100}}, "does not match the predictor"),
    ("l2s", {"hidden_size": 48}, "maps 32 -> 32 but the model's hidden size is 48"),
    ("mean", {"scope": "everywhere"}, "field 'scope'"),
])
def test_tampered_configs_name_the_bad_field(arts, tmp_path, name, changes, match) -> None:
    with pytest.raises(IncompatibleArtifactError, match=match):
        SteeringArtifact.load(_tamper(tmp_path, arts, name, **changes))


def test_unknown_future_keys_warn_but_load(arts, tmp_path) -> None:
    d = _tamper(tmp_path, arts, "mean", colour="blue")
    with pytest.warns(UserWarning, match="colour"):
        SteeringArtifact.load(d)


def test_checksums_catch_truncated_or_swapped_tensor_files(arts, tmp_path) -> None:
    d = arts["mean"].save(tmp_path / "m")
    data = (d / "vectors.safetensors").read_bytes()
    (d / "vectors.safetensors").write_bytes(data[:-8])
    with pytest.raises(IncompatibleArtifactError, match="does not match the checksum"):
        SteeringArtifact.load(d)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["files"]  # no checksum recorded: the truncated file is still caught, by name
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(IncompatibleArtifactError, match="vectors.safetensors cannot be read"):
        SteeringArtifact.load(d)
    (d / "vectors.safetensors").unlink()
    with pytest.raises(MissingFileError, match="vectors.safetensors is missing"):
        SteeringArtifact.load(d)


def test_refuses_a_model_of_another_shape(arts, tmp_path) -> None:
    d = arts["l2s"].save(tmp_path / "a")
    with pytest.raises(IncompatibleArtifactError, match="hidden size 32"):
        SteeringArtifact.load(d, tiny_model("llama", hidden_size=48))
    with pytest.raises(IncompatibleArtifactError, match="4 layers"):
        SteeringArtifact.load(d, tiny_model("llama", num_layers=5))


def test_non_finite_values_are_refused(arts) -> None:
    with pytest.raises(InvalidInputError, match="finite"):
        SteeringArtifact(**{**_fields(arts["mean"]), "alpha": float("nan")})
    bad = arts["l2s"].predictor
    saved = bad.decoder.weight.detach().clone()
    with torch.no_grad():
        bad.decoder.weight[0, 0] = float("nan")
    try:
        with pytest.raises(InvalidInputError, match="NaN or inf"):
            SteeringArtifact(**_fields(arts["l2s"]))
    finally:
        with torch.no_grad():
            bad.decoder.weight.copy_(saved)


def _fields(a: SteeringArtifact) -> dict:
    return {k: getattr(a, k) for k in a.__dataclass_fields__}


def test_format_1_artifacts_still_load(arts, tmp_path) -> None:
    """v0.1 wrote predictor.safetensors with the gate inside the net and no checksums."""
    from safetensors.torch import save_file

    d = arts["l2s"].save(tmp_path / "old")
    sd = {k: v.contiguous() for k, v in arts["l2s"].predictor.state_dict().items()}
    sd["gate"] = torch.tensor(0.25)
    save_file(sd, str(d / "predictor.safetensors"))
    (d / "model.safetensors").unlink()
    cfg = json.loads((d / "config.json").read_text())
    for k in ("files", "format", "format_version", "gate", "context_read", "figures"):
        cfg.pop(k, None)
    (d / "config.json").write_text(json.dumps(cfg))
    back = SteeringArtifact.load(d)
    assert back.gate == pytest.approx(0.25)


class FakeHub:
    """create_repo / upload_folder / snapshot_download against a local folder: no network."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.calls: list[str] = []

    def create_repo(self, repo_id: str, **kw) -> str:
        self.calls.append(f"create {repo_id} private={kw.get('private')}")
        return repo_id

    def upload_folder(self, *, repo_id: str, folder_path: str, **kw) -> None:
        self.calls.append(f"upload {repo_id}")
        shutil.copytree(folder_path, self.root / repo_id, dirs_exist_ok=True)

    def snapshot_download(self, repo_id: str, **kw) -> str:
        self.calls.append(f"download {repo_id} {sorted(kw.get('allow_patterns') or [])}")
        if not (self.root / repo_id).exists():
            raise FileNotFoundError(f"404 {repo_id}")
        return str(self.root / repo_id)


def test_push_to_hub_and_load_by_repo_id(arts, tiny_llama, tmp_path) -> None:
    hub = FakeHub(tmp_path / "hub")
    assert arts["l2s"].push_to_hub("me/smol-l2s", private=True, api=hub) == "me/smol-l2s"
    back = SteeringArtifact.load("me/smol-l2s", tiny_llama, api=hub)
    assert back.config() == arts["l2s"].config()
    assert hub.calls[:2] == ["create me/smol-l2s private=True", "upload me/smol-l2s"]
    with pytest.raises(MissingFileError, match="could not be fetched from the Hub"):
        SteeringArtifact.load("me/nothing", api=hub)
    with pytest.raises(MissingFileError, match="local folder or a Hub repo id"):
        SteeringArtifact.load(str(tmp_path / "nope" / "deeper"))


def test_validate_config_tolerates_optional_keys(arts, tmp_path) -> None:
    """A config.json holding only the required keys (and, for a predictor, its shape and L') validates without a
    warning and loads with the defaults of everything it lacks."""
    from learn2steer.artifacts import _SCHEMA

    optional = {k for k, (_, _, required) in _SCHEMA.items() if not required}
    for name, needed in (("mean", set()), ("l2s", {"predictor", "context_layer"})):
        full = arts[name].config()
        cfg = {k: v for k, v in full.items() if k not in optional - needed}
        assert len(set(full) - set(cfg)) >= 10 and set(cfg) <= {k for k in _SCHEMA if k not in optional} | needed
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert validate_config(cfg, "x") == cfg
            folder = arts[name].save(tmp_path / name)
            (folder / "config.json").write_text(json.dumps(cfg))
            back = SteeringArtifact.load(folder)
        assert (back.alpha, back.scope, back.strength, back.gate, back.behaviour) == (1.0, "all", "absolute", 0.0, {})
        assert back.context_read == "prompt_last" and arts[name].alpha == 2.0


def test_fixed_artifact_needs_one_vector_per_layer(arts) -> None:
    with pytest.raises(InvalidInputError, match="one \\[D\\] vector per layer"):
        SteeringArtifact(**{**_fields(arts["mean"]), "vector": SteeringVector({2: torch.ones(3, 32)})})
