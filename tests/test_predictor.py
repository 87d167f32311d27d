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


# ---- the official training details the paper configs use ------------------------------------------------------

def test_balanced_loss_is_the_mean_of_the_yes_and_no_means() -> None:
    from learn2steer.predictor import balanced_loss

    losses = torch.tensor([1.0, 2.0, 3.0, 10.0])
    assert balanced_loss(losses, torch.tensor([True, True, True, False])).item() == pytest.approx((2 + 10) / 2)
    # a batch with no "no" row: the official code counts that half as 0
    assert balanced_loss(torch.tensor([1.0, 3.0]), torch.tensor([True, True])).item() == pytest.approx(1.0)


def test_cosine_weight_ramps_like_the_official_pope_run() -> None:
    from learn2steer.predictor import cosine_weight

    cfg = TrainConfig(cosine=0.1, cosine_ramp_epochs=100)
    assert [cosine_weight(cfg, e) for e in (0, 50, 99, 150)] == pytest.approx([0.0, 0.05, 0.099, 0.1])
    assert cosine_weight(TrainConfig(cosine=0.1), 0) == 0.1


def test_one_balanced_step_equals_the_official_update() -> None:
    """One full batch: official loss (rec + l1 - w cos per row, yes mean + no mean over 2, w = 0 at epoch 0), one Adam
    step from the same initial weights; the validation loss on the last 1/12 of the rows uses cosine weight 0.05."""
    from torch.nn import functional as F

    from learn2steer.predictor import L2SNet, fit

    g = torch.Generator().manual_seed(5)
    n, d = 24, 6
    x, y = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    labels = ["yes" if i % 3 else "no" for i in range(n)]
    cfg = TrainConfig(hidden=4, epochs=1, batch_size=64, lr=1e-2, val_fraction=1 / 12, val_rows="last",
                      val_cosine=0.05, cosine_ramp_epochs=100, balance_labels=True, keep="last")
    res = fit(x, y, cfg, progress=False, labels=labels)
    assert res.train_idx == list(range(22)) and res.val_idx == [22, 23]
    torch.manual_seed(cfg.seed)
    ref = L2SNet(d, d, 4)
    opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    xt, yt = x[:22], y[:22]
    pred = ref(xt)
    rows = (pred - yt).pow(2).mean(1) + (pred - yt).abs().mean(1) - 0.0 * F.cosine_similarity(pred, yt)
    yes = torch.tensor([lab == "yes" for lab in labels[:22]])
    ((rows[yes].mean() + rows[~yes].mean()) / 2).backward()
    opt.step()
    for (k, a), (_, b) in zip(sorted(res.net.state_dict().items()), sorted(ref.state_dict().items())):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=k)
    with torch.no_grad():
        pv = ref(x[22:])
        want = ((pv - y[22:]).pow(2).mean(1) + (pv - y[22:]).abs().mean(1) - 0.05 * F.cosine_similarity(pv, y[22:]))
    assert res.history[0]["val_loss"] == pytest.approx(want.mean().item(), rel=1e-5)
    with pytest.raises(InvalidInputError, match="yes / no label"):
        fit(x, y, cfg, progress=False)


def test_warmup_starts_at_zero_like_transformers_cosine_schedule() -> None:
    """get_cosine_schedule_with_warmup: lr factor step / warmup_steps; the first step has lr 0 (weights unchanged)."""
    from learn2steer.predictor import L2SNet, fit

    x, y = torch.randn(8, 4), torch.randn(8, 4)
    cfg = TrainConfig(hidden=3, epochs=2, warmup_epochs=1, schedule="cosine", batch_size=8, val_fraction=0.0,
                      keep="last")
    torch.manual_seed(cfg.seed)
    init = L2SNet(4, 4, 3).state_dict()
    first = fit(x, y, TrainConfig(**{**cfg.to_dict(), "epochs": 1, "warmup_epochs": 1}), progress=False)
    for k, v in first.net.state_dict().items():
        torch.testing.assert_close(v, init[k])


@pytest.mark.parametrize("name,rows", [("llava15_7b_safety.yaml", 1344), ("qwen2vl_7b_safety.yaml", 1344),
                                       ("llava15_7b_pope.yaml", 1100), ("qwen2vl_7b_pope.yaml", 1100)])
def test_paper_configs_train_on_the_official_rows(name, rows) -> None:
    """Safety: all 1344 training rows, last epoch (no holdout); POPE: the first 1100 of 1200, the last 100 validate."""
    from learn2steer.evaluation.pipeline import EvalConfig
    from learn2steer.options import build, read_config
    from learn2steer.predictor import fit

    cfg = build(EvalConfig, read_config(name)).train
    n = 1344 if "safety" in name else 1200
    small = TrainConfig(**{**cfg.to_dict(), "epochs": 1, "warmup_epochs": 0, "hidden": 2,
                           "decoder_init": "random"})
    labels = ["yes", "no"] * (n // 2)
    res = fit(torch.randn(n, 3), torch.randn(n, 3), small, progress=False, labels=labels)
    assert len(res.train_idx) == rows
    if "pope" in name:
        assert res.val_idx == list(range(1100, 1200)) and cfg.balance_labels and cfg.val_cosine == 0.05
        assert cfg.cosine_ramp_epochs == 100 and cfg.keep == "best"
    else:
        assert cfg.keep == "last" and res.val_idx == []
