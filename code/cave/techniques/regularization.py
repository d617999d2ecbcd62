# Generated from docs/techniques/regularization.md by `python -m cave.book tangle`.
# Do not edit: edit the chapter, then regenerate. CI fails on drift.


# § Regularisation (docs/techniques/regularization.md:34)
"""Regularisation: dropout variants, augmentation written on tensors,
label smoothing, weight decay and early stopping, measured on 1,000 digits.

The chapter docs/techniques/regularization.md builds, in order:

    monte_carlo_mean    the mean of many training-mode outputs: E[layer(x)]
    DropConnectLinear   a Linear whose weights are dropped, not its inputs
    Dropout2d           spatial dropout: whole channels, = nn.Dropout2d
    drop_path           stochastic depth's per-example drop of a branch
    StochasticDepth     the CNN chapter's ResidualBlock, branch dropped;
                        add_stochastic_depth wraps every block of a ResNet
    affine_matrices     shift, rotation and scale as affine_grid's theta
    warp, random_affine resampling by F.grid_sample; integer shifts equal
                        integer rolls exactly
    cutout              a square of every image set to zero
    mixup, cutmix       mixed images with their mixed (soft) targets
    one_hot, smooth_labels, soft_cross_entropy
                        targets as distributions; label smoothing equal
                        to F.cross_entropy(label_smoothing=...)
    decay_weights_      decoupled weight decay: Adam + it = torch's AdamW
    EarlyStopping       stop when the held-out score stops improving
    RegConfig, fit      one small-data training run (1,000 digits)
    METHODS, full_run   each method on and off over seeds:
                        `cave run regularization --full`
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from cave.classical.cnn import ResidualBlock, ResNet
from cave.fundamentals.checkpoints import override_config
from cave.fundamentals.data import mnist_split
from cave.fundamentals.deep_networks import (MLP, Adam, Dropout,
                                             MLPConfig, check_images,
                                             evaluate, one_cycle_lr)
from cave.fundamentals.essentials import (dropout, log_softmax,
                                          pick_device, seed_everything)


# § Dropout: noise whose mean is the network (docs/techniques/regularization.md:126)
@torch.no_grad()
def monte_carlo_mean(layer: nn.Module, x: torch.Tensor,
                     draws: int = 1000) -> torch.Tensor:
    """The mean of `draws` training-mode outputs of layer(x), in float64:
    an estimate of E[layer(x)] over the layer's random masks. The layer's
    mode is restored afterwards."""
    if not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be a positive int, got {draws!r}")
    saved = [(m, m.training) for m in layer.modules()]
    layer.train()
    try:
        total = layer(x).double()  # same shape as layer(x)
        for _ in range(draws - 1):
            total += layer(x).double()
    finally:
        for module, training in saved:
            module.training = training
    return total / draws


# § DropConnect: dropping weights instead of units (docs/techniques/regularization.md:202)
class DropConnectLinear(nn.Linear):
    """nn.Linear whose weight is dropped in training: W * M / (1 - p),
    one mask M per forward call (per batch). Evaluation uses W as is."""

    def __init__(self, in_features: int, out_features: int,
                 bias: bool = True, p: float = 0.5):
        super().__init__(in_features, out_features, bias)
        if not 0.0 <= p < 1.0:
            raise ValueError(f"DropConnect probability must be in [0, 1), "
                             f"got {p}")
        self.p = p

    @classmethod
    def from_linear(cls, linear: nn.Linear, p: float) -> DropConnectLinear:
        """The same layer, weights shared with `linear`, made DropConnect."""
        layer = cls(linear.in_features, linear.out_features,
                    linear.bias is not None, p)
        layer.weight = linear.weight  # the same Parameter objects
        layer.bias = linear.bias
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = dropout(self.weight, self.p, self.training)  # (out, in)
        return F.linear(x, w, self.bias)  # (..., out)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}"


# § Spatial dropout: whole feature maps (docs/techniques/regularization.md:270)
class Dropout2d(Dropout):
    """Spatial dropout of (N, C, H, W): each channel of each image zeroed
    with probability p, the others scaled by 1 / (1 - p). Same masks as
    nn.Dropout2d for the same seed; the identity in evaluation. Its p is
    checked by the deep networks chapter's Dropout, which it extends."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"Dropout2d expected input of shape (N, C, H, "
                             f"W), got {tuple(x.shape)}")
        if not self.training or self.p == 0.0:
            return x
        N, C = x.shape[:2]
        mask = dropout(x.new_ones(N, C, 1, 1), self.p)  # 0 or 1/(1-p)
        return x * mask  # (N, C, H, W): whole channels kept or zeroed

    def extra_repr(self) -> str:
        return f"p={self.p}"


# § Stochastic depth: dropping whole residual branches (docs/techniques/regularization.md:332)
def drop_path(x: torch.Tensor, p: float, training: bool = True
              ) -> torch.Tensor:
    """Zero each example of x (B, ...) with probability p, scale the kept
    ones by 1 / (1 - p): stochastic depth's drop of a residual branch."""
    if x.ndim < 1:
        raise ValueError("drop_path needs a batch dimension, got a scalar")
    mask = dropout(x.new_ones(x.shape[:1] + (1,) * (x.ndim - 1)), p,
                   training)  # (B, 1, ..., 1): one draw per example
    return x * mask


class StochasticDepth(nn.Module):
    """A residual block whose branch is dropped per example with
    probability p in training; in evaluation, the block unchanged."""

    def __init__(self, block: ResidualBlock, p: float):
        super().__init__()
        if not isinstance(block, ResidualBlock) or not block.residual:
            raise TypeError(f"StochasticDepth wraps a ResidualBlock with "
                            f"residual=True, got {block!r}")
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop probability must be in [0, 1), got {p}")
        self.block, self.p = block, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        h = F.relu(b.bn1(b.conv1(x)))  # (N, out, H / s, W / s)
        h = b.bn2(b.conv2(h))  # the branch F(x)
        h = drop_path(h, self.p, self.training)  # b F(x) / (1 - p)
        return F.relu(h + b.shortcut(x))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def add_stochastic_depth(model: ResNet, p_last: float) -> list[float]:
    """Wrap every block of a ResNet in StochasticDepth, in place, with
    p_l = p_last * l / L for block l of L; return the p_l."""
    if not isinstance(model, ResNet):
        raise TypeError(f"expected the CNN chapter's ResNet, got "
                        f"{type(model).__name__}")
    total = sum(len(stage) for stage in model.stages)
    ps, l = [], 0
    for stage in model.stages:
        for k, block in enumerate(stage):
            l += 1
            stage[k] = StochasticDepth(block, p_last * l / total)
            ps.append(p_last * l / total)
    return ps


# § Data augmentation on tensors (docs/techniques/regularization.md:466)
def affine_matrices(angles: torch.Tensor, scales: torch.Tensor,
                    shifts: torch.Tensor, size: tuple[int, int]
                    ) -> torch.Tensor:
    """affine_grid's theta (B, 2, 3), align_corners=False, that turns each
    image's content by angles (B,) degrees counter-clockwise, scales it by
    scales (B,) and then moves it by shifts (B, 2) pixels (right, down),
    for images of size (H, W)."""
    B = angles.shape[0]
    if scales.shape != (B,) or shifts.shape != (B, 2):
        raise ValueError(f"expected angles (B,), scales (B,), shifts (B, 2)"
                         f", got {tuple(angles.shape)}, {tuple(scales.shape)}"
                         f", {tuple(shifts.shape)}")
    H, W = size
    a = torch.deg2rad(angles.double())  # (B,)
    cos, sin = torch.cos(a), torch.sin(a)
    # u_in = R(-a) (u - d) / s in pixels; y points down the image, so a
    # counter-clockwise turn on screen reads the input at R(-a) as below
    inv = torch.stack([torch.stack([cos, -sin], -1),
                       torch.stack([sin, cos], -1)], -2)  # (B, 2, 2)
    inv = inv / scales.double().view(B, 1, 1)
    unit = torch.tensor([2.0 / W, 2.0 / H], dtype=torch.float64)  # pixel
    # in normalised units: n = unit * u, so theta = D inv D^-1 and the
    # translation is -D inv d
    linear = unit.view(1, 2, 1) * inv / unit.view(1, 1, 2)  # (B, 2, 2)
    offset = -linear @ (unit * shifts.double()).unsqueeze(-1)  # (B, 2, 1)
    return torch.cat([linear, offset], dim=-1).float()  # (B, 2, 3)


def warp(x: torch.Tensor, theta: torch.Tensor,
         levels: int | None = 255) -> torch.Tensor:
    """Resample images x (B, H, W) or (B, C, H, W), values in [0, 1],
    through theta (B, 2, 3): bilinear, zeros outside. With `levels`, the
    result is rounded to that many grey levels (MNIST has 255), which makes
    whole-pixel shifts exact."""
    if x.ndim not in (3, 4) or not x.is_floating_point():
        raise ValueError(f"warp expected float images (B, H, W) or (B, C, "
                         f"H, W), got {x.dtype} {tuple(x.shape)}")
    if theta.shape != (x.shape[0], 2, 3):
        raise ValueError(f"warp expected theta of shape ({x.shape[0]}, 2, "
                         f"3), got {tuple(theta.shape)}")
    images = x.unsqueeze(1) if x.ndim == 3 else x  # (B, C, H, W)
    grid = F.affine_grid(theta.to(images), list(images.shape),
                         align_corners=False)  # (B, H, W, 2): (x, y)
    y = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros",
                      align_corners=False)  # (B, C, H, W)
    if levels is not None:
        y = (y * levels).round() / levels
    return y.view_as(x)


def random_affine(x: torch.Tensor, max_shift: float = 0.0,
                  max_rotation: float = 0.0, max_scale: float = 0.0,
                  generator: torch.Generator | None = None,
                  levels: int | None = 255) -> torch.Tensor:
    """Each image of x (B, H, W) or (B, C, H, W) moved by up to max_shift
    pixels each way, turned by up to max_rotation degrees, scaled within
    1 +- max_scale; uniform draws from `generator`."""
    if min(max_shift, max_rotation, max_scale) < 0 or max_scale >= 1:
        raise ValueError(f"expected max_shift, max_rotation >= 0 and "
                         f"max_scale in [0, 1), got {max_shift}, "
                         f"{max_rotation}, {max_scale}")
    B, (H, W) = x.shape[0], x.shape[-2:]
    u = torch.rand(B, 4, generator=generator) * 2 - 1  # (B, 4) in [-1, 1)
    theta = affine_matrices(u[:, 0] * max_rotation, 1 + u[:, 1] * max_scale,
                            u[:, 2:] * max_shift, (H, W))  # (B, 2, 3)
    return warp(x, theta.to(x.device), levels)


def cutout(x: torch.Tensor, size: int,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """x (B, H, W) or (B, C, H, W) with a size x size square, centred at a
    uniform random pixel and clipped at the border, set to zero."""
    if not isinstance(size, int) or size < 0:
        raise ValueError(f"cutout size must be an int >= 0, got {size!r}")
    B, (H, W) = x.shape[0], x.shape[-2:]
    cy = torch.randint(0, H, (B, 1, 1), generator=generator).to(x.device)
    cx = torch.randint(0, W, (B, 1, 1), generator=generator).to(x.device)
    rows = torch.arange(H, device=x.device).view(1, H, 1) - cy  # (B, H, 1)
    cols = torch.arange(W, device=x.device).view(1, 1, W) - cx  # (B, 1, W)
    low, high = -(size // 2), size - size // 2  # [low, high) about centre
    hole = ((rows >= low) & (rows < high) & (cols >= low)
            & (cols < high))  # (B, H, W)
    if x.ndim == 4:
        hole = hole.unsqueeze(1)  # (B, 1, H, W): every channel
    return x.masked_fill(hole, 0.0)


# § Mixed images, mixed labels (docs/techniques/regularization.md:675)
class Mixed(NamedTuple):
    """A mixed batch: images, soft targets, the weight lam of the batch's
    own images, and the permutation that chose each partner."""
    x: torch.Tensor  # (B, ...) images
    targets: torch.Tensor  # (B, K) = lam t + (1 - lam) t[index]
    lam: float
    index: torch.Tensor  # (B,)


def _check_batch(x: torch.Tensor, targets: torch.Tensor) -> None:
    if targets.ndim != 2 or targets.shape[0] != x.shape[0]:
        raise ValueError(f"expected soft targets (B, K) for {x.shape[0]} "
                         f"images, got {tuple(targets.shape)}; make them "
                         f"with one_hot or smooth_labels")


def _beta(alpha: float, lam: float | None) -> float:
    if lam is not None:
        return float(lam)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    return torch.distributions.Beta(alpha, alpha).sample().item()


def mixup(x: torch.Tensor, targets: torch.Tensor, alpha: float = 0.4,
          generator: torch.Generator | None = None,
          lam: float | None = None) -> Mixed:
    """Blend each image and target with a partner's: lam x + (1 - lam)
    x[index]. lam ~ Beta(alpha, alpha) (global generator) unless given."""
    _check_batch(x, targets)
    lam = _beta(alpha, lam)
    index = torch.randperm(len(x), generator=generator).to(x.device)
    mixed = lam * x + (1 - lam) * x[index]  # (B, ...)
    return Mixed(mixed, lam * targets + (1 - lam) * targets[index], lam,
                 index)


def cutmix(x: torch.Tensor, targets: torch.Tensor, alpha: float = 1.0,
           generator: torch.Generator | None = None,
           lam: float | None = None) -> Mixed:
    """Paste a box of each partner image into the image; lam is the
    fraction of pixels the image keeps, after clipping the box."""
    _check_batch(x, targets)
    lam = _beta(alpha, lam)
    H, W = x.shape[-2:]
    cut = math.sqrt(1.0 - lam)  # box sides: area (1 - lam) H W
    h, w = round(H * cut), round(W * cut)
    cy, cx = torch.randint(0, H, (1,), generator=generator).item(), \
        torch.randint(0, W, (1,), generator=generator).item()
    top, bottom = max(cy - h // 2, 0), min(cy + h - h // 2, H)
    left, right = max(cx - w // 2, 0), min(cx + w - w // 2, W)
    index = torch.randperm(len(x), generator=generator).to(x.device)
    mixed = x.clone()
    mixed[..., top:bottom, left:right] = x[index][..., top:bottom,
                                                  left:right]
    lam = 1.0 - (bottom - top) * (right - left) / (H * W)  # what is left
    return Mixed(mixed, lam * targets + (1 - lam) * targets[index], lam,
                 index)


# § Label smoothing (docs/techniques/regularization.md:755)
def one_hot(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """Class indices (B,) as float rows (B, classes) with a single 1."""
    if labels.dtype != torch.int64 or labels.ndim != 1:
        raise TypeError(f"expected int64 labels (B,), got {labels.dtype} "
                        f"{tuple(labels.shape)}")
    return F.one_hot(labels, classes).float()  # (B, classes)


def smooth_labels(labels: torch.Tensor, classes: int,
                  smoothing: float = 0.1) -> torch.Tensor:
    """(1 - smoothing) on the true class plus smoothing / classes on all:
    (B, classes), each row summing to one."""
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"smoothing must be in [0, 1], got {smoothing}")
    return one_hot(labels, classes) * (1 - smoothing) + smoothing / classes


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor
                       ) -> torch.Tensor:
    """Mean over the batch of -sum_k t_k log softmax(z)_k; logits and
    targets (B, K)."""
    if logits.shape != targets.shape or logits.ndim != 2:
        raise ValueError(f"expected logits and targets of one shape (B, K),"
                         f" got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    logp = log_softmax(logits.float(), dim=-1)  # (B, K)
    return -(targets * logp).sum(dim=-1).mean()


# § Weight decay: an L2 penalty, or decoupled (docs/techniques/regularization.md:873)
@torch.no_grad()
def decay_weights_(params, lr: float, weight_decay: float) -> None:
    """Decoupled weight decay, in place: w <- w (1 - lr * weight_decay).
    Call it before the optimiser's step; Adam + it is AdamW."""
    if weight_decay < 0 or lr < 0:
        raise ValueError(f"expected lr >= 0 and weight_decay >= 0, got "
                         f"{lr} and {weight_decay}")
    if weight_decay == 0:
        return
    for p in params:
        p.mul_(1.0 - lr * weight_decay)


# § Early stopping (docs/techniques/regularization.md:991)
class EarlyStopping:
    """Track a score to maximise; step(score, model) returns True once the
    score has not beaten its best by min_delta for `patience` steps. The
    best model's weights are kept (on the CPU); restore() loads them."""

    def __init__(self, patience: int = 5, min_delta: float = 0.0):
        if not isinstance(patience, int) or patience < 1 or min_delta < 0:
            raise ValueError(f"expected patience >= 1 and min_delta >= 0, "
                             f"got {patience!r} and {min_delta!r}")
        self.patience, self.min_delta = patience, min_delta
        self.best, self.best_step, self.steps = -math.inf, -1, 0
        self.best_state: dict | None = None

    def step(self, score: float, model: nn.Module | None = None) -> bool:
        if score > self.best + self.min_delta:
            self.best, self.best_step = score, self.steps
            if model is not None:
                self.best_state = {k: v.detach().cpu().clone()
                                   for k, v in model.state_dict().items()}
        self.steps += 1
        return self.steps - 1 - self.best_step >= self.patience

    def restore(self, model: nn.Module) -> None:
        if self.best_state is None:
            raise RuntimeError("no weights kept: call step(score, model)")
        model.load_state_dict(self.best_state)


# § Measured: which methods help on 1,000 digits (docs/techniques/regularization.md:1089)
@dataclasses.dataclass
class RegConfig:
    train_size: int = 1000  # the small-data regime: 100 digits a class
    holdout_size: int = 500  # more training digits, for early stopping
    epochs: int = 30  # long enough for the plain network to overfit
    batch_size: int = 100  # 10 steps an epoch
    lr: float = 3e-3  # Adam's peak, one-cycle, as in deep networks
    hidden: tuple[int, ...] = (256, 256)  # 270k weights: 270 per digit
    dropout: float = 0.0  # after each hidden layer
    dropconnect: float = 0.0  # on each hidden layer's weights
    weight_decay: float = 0.0  # decoupled (AdamW), matrices only
    label_smoothing: float = 0.0
    max_shift: float = 0.0  # pixels, each way
    max_rotation: float = 0.0  # degrees, each way
    max_scale: float = 0.0  # fraction, each way
    cutout: int = 0  # side of the square, pixels
    mixup: float = 0.0  # alpha of Beta(alpha, alpha); 0: off
    cutmix: float = 0.0  # alpha; 0: off (one of mixup, cutmix at most)
    patience: int = 0  # early stopping on held-out accuracy; 0: off
    seed: int = 0
    device: str | None = None  # None: "cuda" when available, else "cpu"

    def __post_init__(self):
        if min(self.train_size, self.epochs, self.batch_size) < 1:
            raise ValueError(f"train_size, epochs and batch_size must be "
                             f">= 1, got {self.train_size}, {self.epochs},"
                             f" {self.batch_size}")
        if self.mixup > 0 and self.cutmix > 0:
            raise ValueError(f"mixup and cutmix are exclusive, got "
                             f"mixup={self.mixup}, cutmix={self.cutmix}")
        if self.patience > 0 and self.holdout_size < 1:
            raise ValueError("early stopping needs holdout_size >= 1")
        for name in ("dropout", "dropconnect", "label_smoothing"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got "
                                 f"{getattr(self, name)}")


def small_data(config: RegConfig):
    """(train, holdout, test) pairs of uint8 digits and labels: the first
    train_size training digits of the book's split, the next holdout_size,
    and the 2,000 validation digits as the test set."""
    (train_x, train_y), test = mnist_split(seed=0)
    n, h = config.train_size, config.holdout_size
    if n + h > len(train_x):
        raise ValueError(f"train_size + holdout_size must be at most "
                         f"{len(train_x)}, got {n} + {h}")
    return ((train_x[:n], train_y[:n]),
            (train_x[n:n + h], train_y[n:n + h]), test)


def build_model(config: RegConfig) -> MLP:
    model = MLP(MLPConfig(hidden=config.hidden, dropout=config.dropout))
    if config.dropconnect > 0:
        layers = model.layers  # swap every hidden Linear, not the head
        for i, layer in enumerate(list(layers)[:-1]):
            if isinstance(layer, nn.Linear):
                layers[i] = DropConnectLinear.from_linear(
                    layer, config.dropconnect)
    return model


def augment_batch(x: torch.Tensor, targets: torch.Tensor,
                  config: RegConfig, generator: torch.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The configured augmentations of a batch (B, H, W) with soft targets
    (B, K): label-keeping ones first, then mixup or CutMix."""
    if config.max_shift or config.max_rotation or config.max_scale:
        x = random_affine(x, config.max_shift, config.max_rotation,
                          config.max_scale, generator)
    if config.cutout:
        x = cutout(x, config.cutout, generator)
    if config.mixup:
        x, targets, _, _ = mixup(x, targets, config.mixup, generator)
    elif config.cutmix:
        x, targets, _, _ = cutmix(x, targets, config.cutmix, generator)
    return x, targets


def fit(config: RegConfig, data=None) -> dict:
    """Train build_model(config) on small_data(config) (or `data`); return
    per-epoch curves and the final train and test accuracy."""
    train, holdout, test = data if data is not None else small_data(config)
    check_images(*train)
    device = pick_device(config.device)
    generator = seed_everything(config.seed)  # batch order, augmentations
    model = build_model(config).to(device)
    optimiser = Adam(model.parameters(), lr=config.lr)
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    x_all = train[0].to(device).float() / 255  # (N, H, W) in [0, 1]
    t_all = smooth_labels(train[1], 10, config.label_smoothing).to(device)
    n, B = len(x_all), config.batch_size
    steps = math.ceil(n / B)
    stopper = EarlyStopping(config.patience) if config.patience else None
    curves = {k: [] for k in ("train_loss", "holdout_acc", "test_acc",
                              "test_loss")}
    start = time.perf_counter()
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(n, generator=generator).to(device)
        losses = []
        for i in range(steps):
            index = order[i * B:(i + 1) * B]  # (B,)
            x, t = augment_batch(x_all[index], t_all[index], config,
                                 generator)  # (B, H, W), (B, 10)
            lr = one_cycle_lr(epoch * steps + i, config.epochs * steps,
                              config.lr)
            for group in optimiser.param_groups:
                group["lr"] = lr
            loss = soft_cross_entropy(model(x), t)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            decay_weights_(matrices, lr, config.weight_decay)  # AdamW
            optimiser.step()
            losses.append(loss.item())
        curves["train_loss"].append(sum(losses) / len(losses))
        test_loss, test_acc, _ = evaluate(model, *test)
        curves["test_loss"].append(test_loss)
        curves["test_acc"].append(test_acc)
        if len(holdout[0]):
            curves["holdout_acc"].append(evaluate(model, *holdout)[1])
        if stopper is not None and stopper.step(curves["holdout_acc"][-1],
                                                model):
            break
    if stopper is not None:
        stopper.restore(model)
    return {**curves,
            "epochs_run": len(curves["test_acc"]),
            "train_acc": evaluate(model, *train)[1],  # clean digits
            "final_test_acc": evaluate(model, *test)[1],
            "seconds": time.perf_counter() - start}


METHODS = {  # each on its own, over the unregularised network
    "none": {},
    "dropout 0.3": {"dropout": 0.3},
    "DropConnect 0.3": {"dropconnect": 0.3},
    "weight decay 0.1": {"weight_decay": 0.1},
    "label smoothing 0.1": {"label_smoothing": 0.1},
    "shifts ±2 px": {"max_shift": 2.0},
    "shift, rotate 15°, scale 10%": {"max_shift": 2.0,
                                     "max_rotation": 15.0,
                                     "max_scale": 0.1},
    "cutout 10 px": {"cutout": 10},
    "mixup α 0.4": {"mixup": 0.4},
    "CutMix α 1": {"cutmix": 1.0},
    "early stopping, patience 5": {"patience": 5},
    "affine + dropout + smoothing": {"max_shift": 2.0, "max_rotation": 15.0,
                                     "max_scale": 0.1, "dropout": 0.3,
                                     "label_smoothing": 0.1},
}
SEEDS = (0, 1, 2, 3, 4)


def full_run(device: str | None = None, seeds: int = len(SEEDS),
             methods: str = "", **overrides) -> dict:
    """Every entry of METHODS (or the comma-separated `methods`) with the
    first `seeds` seeds; overrides are RegConfig fields (epochs=10). The
    record holds every run's curves and accuracies; the caller writes it."""
    base = override_config(RegConfig(device=device), overrides)
    chosen = [m.strip() for m in methods.split(",") if m.strip()] or \
        list(METHODS)
    unknown = sorted(set(chosen) - set(METHODS))
    if unknown or not 1 <= seeds <= len(SEEDS):
        raise ValueError(f"expected methods among {sorted(METHODS)} and "
                         f"seeds in 1..{len(SEEDS)}, got {unknown} and "
                         f"{seeds}")
    data = small_data(base)
    runs = {name: [] for name in chosen}
    for name in chosen:
        for seed in SEEDS[:seeds]:
            run = fit(dataclasses.replace(base, seed=seed, **METHODS[name]),
                      data)
            runs[name].append(run)
            print(f"{name:30s} seed {seed}: test accuracy "
                  f"{run['final_test_acc']:.2%}, {run['seconds']:.0f} s",
                  flush=True)  # progress: a full run takes many minutes
    return {"config": dataclasses.asdict(base), "methods": {
        name: METHODS[name] for name in chosen}, "seeds": list(
        SEEDS[:seeds]), "device": str(pick_device(base.device)),
        "runs": runs}
