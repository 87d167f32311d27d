"""SteeringVector, P2S extraction (sharded, verified, resumable, one writer) and the baselines."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import examples

from learn2steer.activations import Site, read
from learn2steer.behaviours import load_behaviour
from learn2steer.errors import BusyError, InvalidInputError, MissingFileError
from learn2steer.models.prompts import PromptRow, build_inputs
from learn2steer.vectors import (
    SteeringVector,
    extract,
    group_scales,
    load_extraction,
    mean_vector,
    norm_random,
    rescale_groups,
)


def test_steering_vector_is_one_typed_mapping() -> None:
    v = SteeringVector({3: torch.ones(4), -1: torch.zeros(4)})
    assert list(v) == [-1, 3] and v.hidden_size == 4 and not v.per_row
    assert list(v.on_layers(6)) == [3, 5]
    rows = SteeringVector({2: torch.arange(12.0).reshape(3, 4)})
    assert rows.per_row and rows.num_rows == 3
    assert torch.equal(rows.rows([2, 0])[2], torch.tensor([[8.0, 9, 10, 11], [0, 1, 2, 3]]))
    bad_vectors = ({}, {1: torch.ones(4), 2: torch.ones(5)}, {1: torch.ones(2, 2, 2)},
                   {1: torch.tensor([1.0, float("inf")])})
    for bad in bad_vectors:
        with pytest.raises(InvalidInputError):
            SteeringVector(bad)
    with pytest.raises(InvalidInputError, match="out of range"):
        v.on_layers(3)


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


def test_baselines_and_group_rescaling() -> None:
    z = torch.tensor([[3.0, 4.0], [0.0, 1.0], [6.0, 8.0], [0.0, 0.0]])
    contrasts = ["decline", "legal", "decline", "zero"]
    v = SteeringVector({2: z})
    torch.testing.assert_close(mean_vector(v, contrasts)[2], z[:3].mean(0))
    r1, r2 = norm_random(v, seed=1), norm_random(v, seed=1)
    assert torch.equal(r1[2], r2[2]) and not torch.equal(r1[2], norm_random(v, seed=2)[2])
    torch.testing.assert_close(r1[2].norm(dim=-1), z.norm(dim=-1))
    # one scalar per group: legal (mean norm 1) brought to decline's mean norm 7.5; decline itself unchanged
    assert group_scales(z, contrasts, "decline") == {"decline": 1.0, "legal": 7.5, "zero": 1.0}
    out = rescale_groups(v, contrasts, "decline")[2]
    torch.testing.assert_close(out, torch.tensor([[3.0, 4.0], [0.0, 7.5], [6.0, 8.0], [0.0, 0.0]]))
    # relative magnitudes inside a group are kept (the per-input rescaling of v0.1 flattened them)
    assert out[2].norm() / out[0].norm() == pytest.approx(2.0)
    with pytest.raises(InvalidInputError, match="zero contrast"):
        mean_vector(SteeringVector({1: torch.ones(2, 3)}), ["zero", "zero"])


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

    from learn2steer.vectors import SHARD_KEY, shard_metadata, shard_status

    assert shard_metadata({SHARD_KEY: json.dumps({"ids": ["a"], "rank": 1})}) == {"ids": ["a"], "rank": 1}
    old = tmp_path / "old.safetensors"
    save_file({"z/2": torch.zeros(2, 4)}, str(old), metadata={"ids": json.dumps(["a", "b"])})
    assert shard_status(old, ["a", "b"]) is None
    assert shard_status(old, ["b", "a"]) is not None
