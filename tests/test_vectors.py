"""SteeringVector and the baselines (extraction: tests/test_extraction.py)."""

from __future__ import annotations

import pytest
import torch

from learn2steer.errors import InvalidInputError
from learn2steer.vectors import SteeringVector, group_scales, mean_vector, norm_random, rescale_groups


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
