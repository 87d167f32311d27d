"""The L2S predictor g: context representation h_X -> steering vector z_X.

g is Linear(D_in, K) -> Tanh -> Linear(K, D, no bias), trained with MSE (plus optional L1 and cosine
terms, as in the official code) on cached vectors only: no model is loaded, training takes seconds.
Inputs are standardised with training-set statistics stored in the network, because raw residual
streams have large, layer-dependent norms that saturate tanh.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import trange


class L2SNet(nn.Module):
    """Linear(D_in, K) -> Tanh -> Linear(K, D_out, bias=False), with stored input standardisation."""

    def __init__(self, d_in: int, d_out: int, hidden: int = 100) -> None:
        super().__init__()
        self.encoder = nn.Linear(d_in, hidden)
        self.decoder = nn.Linear(hidden, d_out, bias=False)
        self.register_buffer("in_mean", torch.zeros(d_in))
        self.register_buffer("in_std", torch.ones(d_in))
        # Optional norm gate (beyond the paper): predictions shorter than ``gate`` become exactly zero, so
        # inputs the net maps near zero (benign ones, when trained with zero targets) are left untouched.
        self.register_buffer("gate", torch.zeros(()))

    @property
    def d_in(self) -> int:
        return self.encoder.in_features

    @property
    def d_out(self) -> int:
        return self.decoder.out_features

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = (h.to(self.in_mean.dtype) - self.in_mean) / self.in_std
        v = self.decoder(torch.tanh(self.encoder(x)))
        if self.gate > 0:
            v = v * (v.norm(dim=-1, keepdim=True) >= self.gate)
        return v


@dataclass
class TrainConfig:
    """L2S training settings; defaults follow the paper (K=100, Adam, cosine schedule, 100 epochs)."""

    hidden: int = 100
    epochs: int = 100
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 0.0
    val_fraction: float = 0.1
    seed: int = 0
    l1: float = 0.0
    cosine: float = 0.0
    svd_init: bool = False
    standardize: bool = True
    threads: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    net: L2SNet
    best_epoch: int
    best_val_loss: float
    history: list[dict[str, float]] = field(default_factory=list)
    train_ids: list[int] = field(default_factory=list)
    val_ids: list[int] = field(default_factory=list)

    def summary(self) -> dict:
        last = self.history[self.best_epoch] if self.history else {}
        return {"best_epoch": self.best_epoch, "best_val_loss": self.best_val_loss, **{f"best_{k}": v for k, v in
                                                                                      last.items() if k != "epoch"}}


def choose_gate(pred_norms: torch.Tensor, steer: torch.Tensor) -> float:
    """The norm threshold that best separates inputs to steer (``steer`` True) from inputs to leave alone,
    by balanced accuracy on held-out predictions; 0 (no gate) when there is nothing to separate."""
    steer = steer.bool()
    if bool(steer.all()) or not bool(steer.any()):
        return 0.0
    best, best_t = -1.0, 0.0
    for t in sorted(pred_norms.tolist()):
        on = pred_norms >= t
        acc = 0.5 * ((on & steer).sum() / steer.sum() + (~on & ~steer).sum() / (~steer).sum()).item()
        if acc > best:
            best, best_t = acc, t
    lower = pred_norms[pred_norms < best_t]
    # put the threshold halfway between the last "leave alone" norm and the first "steer" norm
    return float((best_t + lower.max().item()) / 2) if len(lower) else float(best_t)


def _loss(pred: torch.Tensor, target: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    loss = F.mse_loss(pred, target)
    if cfg.l1:
        loss = loss + cfg.l1 * F.l1_loss(pred, target)
    if cfg.cosine:
        loss = loss + cfg.cosine * (1 - F.cosine_similarity(pred, target, dim=-1, eps=1e-8)).mean()
    return loss


@torch.no_grad()
def evaluate(net: L2SNet, features: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """MSE, mean cosine similarity and relative error of predictions (on any held-out set)."""
    pred = net(features.float())
    t = targets.float()
    nonzero = t.norm(dim=-1) > 0
    cos = F.cosine_similarity(pred[nonzero], t[nonzero], dim=-1).mean().item() if bool(nonzero.any()) else float("nan")
    rel = ((pred - t).norm() / t.norm().clamp_min(1e-12)).item()
    return {"mse": F.mse_loss(pred, t).item(), "cosine": cos, "rel_error": rel}


def fit(features: torch.Tensor, targets: torch.Tensor, cfg: TrainConfig | None = None, *,
        progress: bool = True) -> TrainResult:
    """Train g on (h_X, z_X) pairs with a seeded train/validation split; keep the best-validation weights."""
    cfg = cfg or TrainConfig()
    if features.shape[0] != targets.shape[0]:
        raise ValueError(f"features have {features.shape[0]} rows but targets {targets.shape[0]}")
    n = features.shape[0]
    if n < 2:
        raise ValueError("L2S training needs at least 2 examples")
    old_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        g = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        perm = torch.randperm(n, generator=g)
        n_val = max(1, int(round(n * cfg.val_fraction))) if cfg.val_fraction > 0 else 0
        val_idx, tr_idx = perm[:n_val], perm[n_val:]
        x, y = features.float(), targets.float()
        xt, yt = x[tr_idx], y[tr_idx]
        xv, yv = (x[val_idx], y[val_idx]) if n_val else (xt, yt)
        net = L2SNet(x.shape[1], y.shape[1], cfg.hidden)
        if cfg.standardize:
            net.in_mean.copy_(xt.mean(0))
            net.in_std.copy_(xt.std(0).clamp_min(1e-6) if len(xt) > 1 else torch.ones(x.shape[1]))
        if cfg.svd_init:
            # decoder columns start as the top principal directions of the targets (scaled by their spread)
            k = min(cfg.hidden, min(yt.shape))
            _, s, vh = torch.linalg.svd(yt, full_matrices=False)
            with torch.no_grad():
                net.decoder.weight.zero_()
                net.decoder.weight[:, :k] = (vh[:k].T * (s[:k] / math.sqrt(len(yt))))
        try:  # the fused kernel halves the optimiser's share of a step on CPU as well as GPU
            opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        except (RuntimeError, TypeError):
            opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps_per_epoch = max(1, math.ceil(len(xt) / cfg.batch_size))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
        best = (float("inf"), -1, None)
        history: list[dict[str, float]] = []
        for epoch in trange(cfg.epochs, desc="L2S training", disable=not progress, leave=False):
            net.train()
            order = torch.randperm(len(xt), generator=g)
            total = torch.zeros(())
            for i in range(0, len(xt), cfg.batch_size):
                b = order[i:i + cfg.batch_size]
                loss = _loss(net(xt[b]), yt[b], cfg)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.detach() * len(b)
            net.eval()
            with torch.no_grad():
                val = _loss(net(xv), yv, cfg).item()
            history.append({"epoch": epoch, "train_loss": total.item() / len(xt), "val_loss": val})
            if val < best[0]:
                best = (val, epoch, {k: v.detach().clone() for k, v in net.state_dict().items()})
        net.load_state_dict(best[2])  # type: ignore[arg-type]
        net.eval()
        return TrainResult(net, best[1], best[0], history, tr_idx.tolist(), val_idx.tolist())
    finally:
        torch.set_num_threads(old_threads)
