"""The L2S network and its training: paper settings reachable, seeded, no global side effects, inputs checked."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from learn2steer.errors import InvalidInputError
from learn2steer.predictor import Gated, L2SNet, TrainConfig, choose_gate, fit, loss_terms


def _data(n: int = 300, d_in: int = 24, d_out: int = 40):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d_in, generator=g)
    return x, x @ (torch.randn(d_in, d_out, generator=g) * 0.3)


def test_paper_defaults() -> None:
    c = TrainConfig()
    assert (c.hidden, c.epochs, c.lr, c.batch_size, c.weight_decay) == (100, 100, 1e-4, 64, 0.0)
    assert (c.mse, c.l1, c.cosine, c.schedule, c.standardize) == (1.0, 1.0, 0.1, "constant", False)


def test_loss_is_the_official_objective() -> None:
    p, t = torch.tensor([[1.0, 2.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    want = F.mse_loss(p, t) + F.l1_loss(p, t) - 0.1 * F.cosine_similarity(p, t, dim=-1).mean()
    torch.testing.assert_close(loss_terms(p, t, TrainConfig()), want)


def test_fits_a_linear_map_and_is_seeded() -> None:
    x, y = _data()
    cfg = TrainConfig(epochs=150, lr=3e-3, l1=0.0, cosine=0.0, standardize=True)
    res = fit(x, y, cfg, progress=False)
    pred = res.net(x[res.val_idx])
    cos = F.cosine_similarity(pred, y[res.val_idx], dim=-1).mean()
    assert cos > 0.98, cos
    assert torch.equal(fit(x, y, cfg, progress=False).net.decoder.weight, res.net.decoder.weight)


@pytest.mark.parametrize("init", ["svd", "random"])
def test_decoder_init_and_schedules_run(init: str) -> None:
    x, y = _data(80)
    cfg = TrainConfig(epochs=4, decoder_init=init, schedule="cosine", warmup_epochs=2, keep="last")  # type: ignore[arg-type]
    res = fit(x, y, cfg, progress=False)
    assert res.best_epoch == 3 and len(res.history) == 4


def test_svd_init_starts_at_the_targets_principal_directions() -> None:
    x, y = _data(80)
    res = fit(x, y, TrainConfig(epochs=1, lr=1e-12, decoder_init="svd", hidden=5), progress=False)
    _, _, vh = torch.linalg.svd(y[res.train_idx] - y[res.train_idx].mean(0), full_matrices=False)
    torch.testing.assert_close(res.net.decoder.weight.T, vh[:5], atol=1e-5, rtol=1e-4)


def test_fit_leaves_no_global_side_effects() -> None:
    x, y = _data(50)
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    fit(x, y, TrainConfig(epochs=2, threads=1, seed=7), progress=False)
    assert torch.equal(torch.rand(3), expected), "the global RNG stream is untouched"
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("bad,match", [
    (dict(epochs=0), "epochs"), (dict(val_fraction=1.0), "val_fraction"), (dict(lr=float("nan")), "lr"),
    (dict(lr=0.0), "learning rate"), (dict(schedule="linear"), "schedule"), (dict(decoder_init="magic"), "decoder"),
    (dict(hidden=True), "hidden")])
def test_bad_settings_are_refused(bad: dict, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        TrainConfig(**bad)


def test_bad_training_data_is_refused() -> None:
    x, y = _data(10)
    y[3, 2] = float("nan")
    with pytest.raises(InvalidInputError, match="targets contain NaN"):
        fit(x, y, progress=False)
    with pytest.raises(InvalidInputError, match="at least 2"):
        fit(x[:1], x[:1], progress=False)
    with pytest.raises(InvalidInputError, match="rows"):
        fit(x, x[:5], progress=False)


def test_gate_zeroes_short_predictions_only() -> None:
    net = L2SNet(2, 2, 2)
    with torch.no_grad():
        net.encoder.weight.copy_(torch.eye(2))
        net.encoder.bias.zero_()
        net.decoder.weight.copy_(torch.eye(2))
    h = torch.tensor([[0.1, 0.0], [2.0, 0.0]])
    out = Gated(net, threshold=0.5)(h)
    assert out[0].abs().sum() == 0 and torch.allclose(out[1], net(h)[1])
    assert choose_gate(torch.tensor([0.1, 0.2, 0.9, 1.0]), torch.tensor([False, False, True, True])) == pytest.approx(
        0.55)
    assert choose_gate(torch.tensor([0.1, 0.9]), torch.tensor([True, True])) == 0.0
    bad = L2SNet(2, 2, 2)
    with torch.no_grad():
        bad.decoder.weight[0, 0] = float("inf")
    with pytest.raises(InvalidInputError, match="NaN or inf"):
        bad.check_finite()
