"""The L2S predictor g: context representation h_X -> steering vector z_X, and its training.

g is Linear(D_in, K) -> Tanh -> Linear(K, D, no bias), trained on cached vectors only: no model is
loaded, training takes seconds. :class:`TrainConfig`'s defaults follow the official code's safety run where
the run does not depend on data learn2steer lacks (K=100, Adam at 1e-4 without weight decay, MSE + L1 - 0.1
cosine, 100 epochs, batch 64, raw inputs). Three bare defaults are *not* the paper's, because they suit a
library user with one dataset: a random decoder init (the paper: dictionary learning for safety, SVD for
POPE), the best validation epoch (the paper's safety run keeps the last) and a 10% validation holdout (the
paper's safety run trains on every training row). The shipped configs set the paper's values, including
the POPE run's balanced yes/no loss, its validation loss (cosine weight 0.05, the file's last rows) and its
cosine weight ramp. Two options go beyond the paper and are off by default: input standardisation (stored
in the net) and a norm gate (:class:`Gated`), chosen on validation data.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import trange

from learn2steer.errors import InvalidInputError

DecoderInit = Literal["random", "svd", "dictionary"]
Schedule = Literal["constant", "cosine"]


class L2SNet(nn.Module):
    """Linear(D_in, K) -> Tanh -> Linear(K, D_out, bias=False), with an optional stored input standardisation.

    ``in_mean`` / ``in_std`` are 0 / 1 (identity) unless training standardised the inputs, so the paper's
    predictors (raw hidden states in) load unchanged.
    """

    in_mean: torch.Tensor
    in_std: torch.Tensor

    def __init__(self, d_in: int, d_out: int, hidden: int = 100) -> None:
        super().__init__()
        self.encoder = nn.Linear(d_in, hidden)
        self.decoder = nn.Linear(hidden, d_out, bias=False)
        self.register_buffer("in_mean", torch.zeros(d_in))
        self.register_buffer("in_std", torch.ones(d_in))

    @property
    def d_in(self) -> int:
        """Width of the context features it reads."""
        return self.encoder.in_features

    @property
    def d_out(self) -> int:
        """Width of the vectors it predicts."""
        return self.decoder.out_features

    @property
    def hidden(self) -> int:
        """K, the bottleneck width."""
        return self.encoder.out_features

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """g(h) for ``h`` of shape [rows, d_in] (standardised with the stored statistics)."""
        x = (h.to(self.in_mean.dtype) - self.in_mean) / self.in_std
        return self.decoder(torch.tanh(self.encoder(x)))

    def check_finite(self) -> None:
        """Refuse NaN / inf weights: they would make every steered answer garbage (or empty)."""
        check_finite_weights(self, "L2S predictor")


def check_finite_weights(net: nn.Module, what: str) -> None:
    """Refuse a network with NaN / inf weights or buffers (any predictor kind), naming the tensors."""
    bad = [k for k, v in net.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise InvalidInputError(f"the {what} has NaN or inf values in {bad}; retrain it or restore the file")


class Gated(nn.Module):
    """``net(h)``, with predictions shorter than ``threshold`` set to exactly zero (beyond the paper).

    Trained with zero targets for inputs to leave alone, g maps them near zero; the gate makes "near"
    exact, so those inputs are not steered at all. The threshold is a training output (chosen on
    validation data), stored in the artifact, and switched off by the ``l2s_nogate`` method.
    """

    def __init__(self, net: nn.Module, threshold: float) -> None:
        super().__init__()
        self.net = net
        self.threshold = float(threshold)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """The wrapped net's prediction, zeroed for rows whose norm is under the threshold."""
        v = self.net(h)
        return v * (v.norm(dim=-1, keepdim=True) >= self.threshold)


@dataclass
class TrainConfig:
    """L2S training settings (see the module doc for which defaults are the paper's and which are not).

    ``val_rows``: ``random`` (a seeded draw) or ``last`` (the last rows in the order given, as the official
    POPE run: ``int(n * (1 - val_fraction))`` rows train). ``val_cosine``: the cosine weight of the validation
    loss (None: the training weight; the official POPE run: 0.05). ``cosine_ramp_epochs``: the training
    cosine weight is ``cosine * min(1, epoch / cosine_ramp_epochs)``, epochs counted from 0 (official POPE:
    100). ``balance_labels``: each batch's loss is the mean of its "yes" rows' loss and its "no" rows' loss
    (official POPE; a batch without one of them counts that half as 0, as the official code does).
    """

    hidden: int = 100
    epochs: int = 100
    lr: float = 1e-4
    batch_size: int = 64
    weight_decay: float = 0.0
    val_fraction: float = 0.1
    seed: int = 0
    mse: float = 1.0
    l1: float = 1.0
    cosine: float = 0.1
    schedule: Schedule = "constant"
    warmup_epochs: int = 0
    decoder_init: DecoderInit = "random"
    standardize: bool = False
    keep: Literal["best", "last"] = "best"
    threads: int | None = None
    val_rows: Literal["random", "last"] = "random"
    val_cosine: float | None = None
    cosine_ramp_epochs: int = 0
    balance_labels: bool = False

    def __post_init__(self) -> None:
        for name in ("hidden", "epochs", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InvalidInputError(f"training setting {name} must be a whole number >= 1, got {v!r}")
        for name in ("lr", "weight_decay", "mse", "l1", "cosine"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise InvalidInputError(f"training setting {name} must be a finite number >= 0, got {v!r}")
        if self.lr <= 0:
            raise InvalidInputError(f"learning rate must be > 0, got {self.lr!r}")
        if not 0 <= self.val_fraction < 1:
            raise InvalidInputError(f"val_fraction must be in [0, 1) so that some examples are left to train on, "
                                    f"got {self.val_fraction!r}")
        if self.schedule not in ("constant", "cosine"):
            raise InvalidInputError(f"schedule must be constant or cosine, got {self.schedule!r}")
        if self.decoder_init not in ("random", "svd", "dictionary"):
            raise InvalidInputError(f"decoder_init must be random, svd or dictionary, got {self.decoder_init!r}")
        if self.keep not in ("best", "last"):
            raise InvalidInputError(f"keep must be best or last, got {self.keep!r}")
        if self.val_rows not in ("random", "last"):
            raise InvalidInputError(f"val_rows must be random or last, got {self.val_rows!r}")
        v = self.val_cosine
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0):
            raise InvalidInputError(f"training setting val_cosine must be a finite number >= 0, got {v!r}")
        r = self.cosine_ramp_epochs
        if not isinstance(r, int) or isinstance(r, bool) or r < 0:
            raise InvalidInputError(f"training setting cosine_ramp_epochs must be a whole number >= 0, got {r!r}")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise InvalidInputError(f"warmup_epochs must be between 0 and epochs, got {self.warmup_epochs!r}")

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain data (stored in artifacts)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Build from a dict, ignoring keys this version does not know (older / newer artifacts)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class TrainResult:
    """The trained net, where its validation loss was best, the loss history and the split used."""

    net: L2SNet
    best_epoch: int
    best_val_loss: float
    history: list[dict[str, float]] = field(default_factory=list)
    train_idx: list[int] = field(default_factory=list)
    val_idx: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Best epoch and its losses, as stored in the artifact's ``training`` record."""
        last = self.history[self.best_epoch] if self.history else {}
        return {"best_epoch": self.best_epoch, "best_val_loss": self.best_val_loss,
                **{f"best_{k}": v for k, v in last.items() if k != "epoch"}}


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


def row_losses(pred: torch.Tensor, target: torch.Tensor, cfg: TrainConfig, cosine: float | None = None
               ) -> torch.Tensor:
    """Per row: mse * MSE + l1 * L1 - cosine * cos(pred, target), the official objective before averaging."""
    w = cfg.cosine if cosine is None else cosine
    loss = cfg.mse * (pred - target).pow(2).mean(-1)
    if cfg.l1:
        loss = loss + cfg.l1 * (pred - target).abs().mean(-1)
    if w:
        loss = loss - w * F.cosine_similarity(pred, target, dim=-1)
    return loss


def loss_terms(pred: torch.Tensor, target: torch.Tensor, cfg: TrainConfig, cosine: float | None = None
               ) -> torch.Tensor:
    """The official objective averaged over rows (``cosine``: a weight other than ``cfg.cosine``)."""
    return row_losses(pred, target, cfg, cosine).mean()


def balanced_loss(losses: torch.Tensor, yes: torch.Tensor) -> torch.Tensor:
    """The official POPE batch loss: (mean loss of the yes rows + mean loss of the no rows) / 2, a missing half 0."""
    zero = losses.new_zeros(())
    yes_loss = losses[yes].mean() if bool(yes.any()) else zero
    no_loss = losses[~yes].mean() if bool((~yes).any()) else zero
    return (yes_loss + no_loss) / 2


def cosine_weight(cfg: TrainConfig, epoch: int) -> float:
    """The training cosine weight at ``epoch`` (from 0): constant, or ramped over ``cosine_ramp_epochs``."""
    if cfg.cosine_ramp_epochs:
        return min(1.0, epoch / cfg.cosine_ramp_epochs) * cfg.cosine
    return cfg.cosine


def _init_decoder(net: L2SNet, targets: torch.Tensor, cfg: TrainConfig) -> None:
    """Start the decoder's columns at the targets' principal directions (SVD) or dictionary atoms."""
    k = cfg.hidden
    if cfg.decoder_init == "svd":
        centred = targets - targets.mean(0)
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        atoms = torch.zeros(k, targets.shape[1])
        n = min(k, vh.shape[0])
        atoms[:n] = vh[:n]
    elif cfg.decoder_init == "dictionary":
        try:
            from sklearn.decomposition import DictionaryLearning
        except ImportError:
            raise InvalidInputError("decoder_init='dictionary' (the paper's safety setting) needs scikit-learn: "
                                    "pip install 'learn2steer[paper]'") from None
        dl = DictionaryLearning(n_components=k, positive_code=True, fit_algorithm="cd",
                                transform_algorithm="lasso_cd", max_iter=5000, random_state=cfg.seed)
        dl.fit(targets.double().numpy())
        atoms = torch.as_tensor(dl.components_, dtype=torch.float32)
    else:
        return
    with torch.no_grad():
        net.decoder.weight.copy_(atoms.T)


def fit(features: torch.Tensor, targets: torch.Tensor, cfg: TrainConfig | None = None, *,
        progress: bool = True, labels: Sequence[str | None] | None = None) -> TrainResult:
    """Train g on (h_X, z_X) pairs with a seeded train/validation split.

    Keeps the best-validation weights (``keep="best"``) or the last epoch's (``keep="last"``, as the
    official safety run). ``labels`` (yes / no per row) are needed by ``balance_labels``. Leaves no trace
    outside: the global RNG state and the thread count are restored, whatever happens.
    """
    cfg = cfg or TrainConfig()
    if features.dim() != 2 or targets.dim() != 2:
        raise InvalidInputError(f"features and targets must be [N, D], got {tuple(features.shape)} and "
                                f"{tuple(targets.shape)}")
    if features.shape[0] != targets.shape[0]:
        raise InvalidInputError(f"features have {features.shape[0]} rows but targets {targets.shape[0]}")
    n = features.shape[0]
    if n < 2:
        raise InvalidInputError(f"L2S training needs at least 2 examples, got {n}")
    for name, t in (("features", features), ("targets", targets)):
        if not bool(torch.isfinite(t).all()):
            raise InvalidInputError(f"the training {name} contain NaN or inf values; re-extract them (a float16 "
                                    "model can overflow: try dtype float32 or bfloat16)")
    yes: torch.Tensor | None = None
    if cfg.balance_labels:
        if labels is None or len(labels) != n or any(y not in ("yes", "no") for y in labels):
            raise InvalidInputError("balance_labels needs a yes / no label for every training row (POPE data)")
        yes = torch.tensor([y == "yes" for y in labels], dtype=torch.bool)
    if cfg.val_fraction <= 0:
        n_val = 0
    elif cfg.val_rows == "last":
        n_val = n - int(n * (1 - cfg.val_fraction))
    else:
        n_val = max(1, int(round(n * cfg.val_fraction)))
    if n - n_val < 1:
        raise InvalidInputError(f"val_fraction {cfg.val_fraction} leaves no training examples out of {n}")
    old_threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        try:
            if cfg.threads:
                torch.set_num_threads(cfg.threads)
            return _fit(features.float(), targets.float(), cfg, n_val, progress, yes)
        finally:
            torch.set_num_threads(old_threads)


def _fit(x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, n_val: int, progress: bool,
         yes: torch.Tensor | None = None) -> TrainResult:
    torch.manual_seed(cfg.seed)  # inside fork_rng: the caller's global RNG is restored afterwards
    g = torch.Generator().manual_seed(cfg.seed)
    n = x.shape[0]
    if cfg.val_rows == "last":
        val_idx, tr_idx = torch.arange(n - n_val, n), torch.arange(n - n_val)
    else:
        perm = torch.randperm(n, generator=g)
        val_idx, tr_idx = perm[:n_val], perm[n_val:]
    xt, yt = x[tr_idx], y[tr_idx]
    yes_t = yes[tr_idx] if yes is not None else None
    xv, yv = (x[val_idx], y[val_idx]) if n_val else (xt, yt)
    net = L2SNet(x.shape[1], y.shape[1], cfg.hidden)
    if cfg.standardize:
        net.in_mean.copy_(xt.mean(0))
        net.in_std.copy_(xt.std(0).clamp_min(1e-6) if len(xt) > 1 else torch.ones(x.shape[1]))
    _init_decoder(net, yt, cfg)
    try:  # the fused kernel halves the optimiser's share of a step on CPU as well as GPU
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(xt) / cfg.batch_size))
    total, warm = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch

    def lr_factor(step: int) -> float:  # transformers' get_cosine_schedule_with_warmup (the official POPE run's)
        if step < warm:
            return step / warm
        if cfg.schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    best: tuple[float, int, dict[str, torch.Tensor]] = (float("inf"), -1, {})
    history: list[dict[str, float]] = []
    for epoch in trange(cfg.epochs, desc="L2S training", disable=not progress, leave=False):
        net.train()
        order = torch.randperm(len(xt), generator=g)
        running = torch.zeros(())
        weight = cosine_weight(cfg, epoch)
        for i in range(0, len(xt), cfg.batch_size):
            b = order[i:i + cfg.batch_size]
            losses = row_losses(net(xt[b]), yt[b], cfg, weight)
            loss = balanced_loss(losses, yes_t[b]) if yes_t is not None else losses.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.detach() * len(b)
        net.eval()
        with torch.no_grad():
            val = loss_terms(net(xv), yv, cfg, cfg.val_cosine).item()
        train_loss = running.item() / len(xt)
        if not math.isfinite(train_loss):
            raise InvalidInputError(f"L2S training diverged at epoch {epoch} (loss {train_loss}); lower the "
                                    f"learning rate (now {cfg.lr})")
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val})
        if cfg.keep == "last" or val < best[0]:
            best = (val, epoch, {k: v.detach().clone() for k, v in net.state_dict().items()})
    net.load_state_dict(best[2])
    net.eval()
    return TrainResult(net, best[1], best[0], history, tr_idx.tolist(), val_idx.tolist())
