# Generated from docs/fundamentals/deep_networks.md by `python -m cave.book tangle`.
# Do not edit: edit the chapter, then regenerate. CI fails on drift.


# § Deep networks (docs/fundamentals/deep_networks.md:17)
"""Deep networks: an MLP with batch norm, dropout and Adam, from scratch.

The chapter docs/fundamentals/deep_networks.md builds, in order:

    BatchNorm1d   batch normalisation, equal to torch.nn.BatchNorm1d
    Dropout       inverted dropout, equal in law to torch.nn.Dropout
    Adam          the Adam optimiser, equal to torch.optim.Adam
    MLP           a multi-layer perceptron configured by MLPConfig
    train         a training loop with validation and best-model keeping
    ERAS          the 1990s recipe, then each modern ingredient in turn
    full_run      the recipe, and the eras, on the book's MNIST split

`cave run deep_networks --full` runs both and records them.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from cave.fundamentals.checkpoints import override_config
from cave.fundamentals.data import mnist_split
from cave.fundamentals.essentials import (eval_mode, pick_device,
                                          seed_everything)


# § Batch normalisation (docs/fundamentals/deep_networks.md:136)
class BatchNorm1d(nn.Module):
    """Batch normalisation over (N, C) or (N, C, L) inputs.

    Training: normalise with the batch's mean and biased variance, and
    update running estimates (unbiased variance). Evaluation: normalise
    with the running estimates. Same parameters, buffers and results as
    torch.nn.BatchNorm1d.
    """

    def __init__(self, num_features: int, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True):
        super().__init__()
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        if affine:  # gamma starts at 1 and beta at 0: the identity
            self.weight = nn.Parameter(torch.ones(num_features))  # (C,)
            self.bias = nn.Parameter(torch.zeros(num_features))  # (C,)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_var", torch.ones(num_features))
            self.register_buffer("num_batches_tracked",
                                 torch.tensor(0, dtype=torch.long))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim not in (2, 3) or x.shape[1] != self.num_features:
            raise ValueError(
                f"BatchNorm1d expected input of shape (N, {self.num_features})"
                f" or (N, {self.num_features}, L), got {tuple(x.shape)}")
        dims = (0,) if x.ndim == 2 else (0, 2)  # all but the feature dim
        count = x.numel() // self.num_features  # values per feature
        use_batch = self.training or not self.track_running_stats
        if use_batch and count < 2:
            raise ValueError(
                "BatchNorm1d needs more than 1 value per feature to "
                f"compute a batch variance, got input {tuple(x.shape)}")
        # statistics in float32 for bfloat16 and float16 inputs (autocast
        # included), in float64 for float64 ones: never less than float32
        z = x.to(torch.promote_types(x.dtype, torch.float32))
        if use_batch:
            mean = z.mean(dim=dims)  # (C,)
            var = z.var(dim=dims, unbiased=False)  # (C,) biased
        else:  # the buffers, in whatever dtype the module was given
            mean = self.running_mean.to(z.dtype)  # (C,)
            var = self.running_var.to(z.dtype)  # (C,)
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = (1.0 / float(self.num_batches_tracked)
                     if self.momentum is None else self.momentum)
                unbiased = var * (count / (count - 1))  # (C,) Bessel
                for buffer, batch in [(self.running_mean, mean),
                                      (self.running_var, unbiased)]:
                    # (1 - m) buffer + m batch at z's precision, rounded
                    # once into the buffer's own dtype
                    buffer.copy_(buffer.to(z.dtype).lerp(batch, m))
        shape = (1, -1) if x.ndim == 2 else (1, -1, 1)  # broadcast over C
        y = (z - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:  # gamma and beta at z's precision too
            y = (y * self.weight.view(shape).to(z.dtype)
                 + self.bias.view(shape).to(z.dtype))
        return y.to(x.dtype)  # same shape and dtype as x

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}")


# § Dropout (docs/fundamentals/deep_networks.md:337)
class Dropout(nn.Module):
    """Inverted dropout: zero with probability p, scale the rest by 1/(1-p).

    The identity in evaluation mode; same law as torch.nn.Dropout.
    """

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], "
                             f"got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p == 1.0:  # everything dropped; avoid dividing by zero
            return torch.zeros_like(x)
        keep = torch.rand_like(x, dtype=torch.float32) >= self.p  # like x
        mask = keep.to(x.dtype) / (1.0 - self.p)  # 0 or 1/(1-p), x's dtype
        return x * mask  # same shape and dtype as x

    def extra_repr(self) -> str:
        return f"p={self.p}"


# § Adam (docs/fundamentals/deep_networks.md:421)
class Adam(torch.optim.Optimizer):
    """Adam (Kingma and Ba, 2015), step for step equal to torch.optim.Adam.

    weight_decay adds weight_decay * param to the gradient (L2), as
    torch.optim.Adam does.
    """

    def __init__(self, params, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        if lr < 0.0:
            raise ValueError(f"learning rate must be >= 0, got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if eps < 0.0 or weight_decay < 0.0:
            raise ValueError(f"eps and weight_decay must be >= 0, got "
                             f"{eps} and {weight_decay}")
        defaults = dict(lr=lr, betas=betas, eps=eps,
                        weight_decay=weight_decay)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["weight_decay"] != 0.0:
                    # L2: g + lambda * theta, rounded once (as torch does)
                    g = g.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if not state:  # first step: moments start at zero
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)  # m, like p
                    state["exp_avg_sq"] = torch.zeros_like(p)  # v, like p
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(g, 1 - beta1)  # m = b1 m + (1 - b1) g
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)  # v += g^2
                correction1 = 1 - beta1 ** t  # m_hat = m / correction1
                correction2 = 1 - beta2 ** t  # v_hat = v / correction2
                denom = v.sqrt() / math.sqrt(correction2) + group["eps"]
                p.addcdiv_(m, denom, value=-group["lr"] / correction1)
        return loss


# § The multi-layer perceptron (docs/fundamentals/deep_networks.md:514)
@dataclasses.dataclass
class MLPConfig:
    in_features: int = 28 * 28  # an MNIST image, flattened
    hidden: tuple[int, ...] = (1024, 1024)  # in our runs a third layer
    # cost time and gained nothing; width 512, or one layer, scored less
    classes: int = 10  # the digits 0 to 9
    batch_norm: bool = True  # allows a large learning rate; forgives init
    dropout: float = 0.3  # strong enough to stop 8,000 digits being
    # memorised by two million weights, mild enough to still fit them
    init: str = "kaiming"  # matched to ReLU; "xavier" suits tanh, and
    # "naive" (every weight N(0, 1)) is there to be broken in the lab
    activation: str = "relu"  # cheap, and gradient 1 where active
    input_mean: float = 0.1307  # pixel mean and standard deviation of
    input_std: float = 0.3081  # MNIST's training images, so inputs are
    # standardised; the chapter recomputes them on its own split


ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh,
               "sigmoid": nn.Sigmoid, "identity": nn.Identity}
INITS = ("kaiming", "xavier", "naive")


class MLP(nn.Module):
    """Linear -> [BatchNorm] -> activation -> Dropout, per hidden layer.

    Takes float pixels in [0, 1], shaped (B, 28, 28) or (B, 784), and
    returns class logits (B, classes).
    """

    def __init__(self, config: MLPConfig = MLPConfig()):
        super().__init__()
        if config.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, "
                             f"got {config.init!r}")
        if config.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of "
                             f"{tuple(ACTIVATIONS)}, "
                             f"got {config.activation!r}")
        self.config = config
        layers, width = [], config.in_features
        for size in config.hidden:
            # batch norm's beta replaces the bias, so the Linear drops it
            layers.append(nn.Linear(width, size, bias=not config.batch_norm))
            if config.batch_norm:
                layers.append(BatchNorm1d(size))
            layers.append(ACTIVATIONS[config.activation]())
            if config.dropout > 0:
                layers.append(Dropout(config.dropout))
            width = size
        layers.append(nn.Linear(width, config.classes))  # the logits
        self.layers = nn.Sequential(*layers)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Draw every Linear weight from the configured scheme."""
        linears = [m for m in self.layers if isinstance(m, nn.Linear)]
        for i, linear in enumerate(linears):
            w = linear.weight  # (out, in)
            if self.config.init == "naive":
                w.normal_(0.0, 1.0)
            elif self.config.init == "xavier":
                nn.init.xavier_normal_(w)
            elif i == len(linears) - 1:  # logits: no ReLU follows
                nn.init.kaiming_normal_(w, nonlinearity="linear")
            else:
                nn.init.kaiming_normal_(w, nonlinearity="relu")
            if linear.bias is not None:
                linear.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            raise TypeError(f"MLP expected float pixels in [0, 1], got "
                            f"{x.dtype}; convert with x.float() / 255")
        if x.ndim < 2 or x[0].numel() != self.config.in_features:
            raise ValueError(
                f"MLP expected input of shape (B, {self.config.in_features})"
                f" or (B, 28, 28), got {tuple(x.shape)}")
        x = x.reshape(x.shape[0], -1)  # (B, 784)
        x = (x - self.config.input_mean) / self.config.input_std  # (B, 784)
        return self.layers(x)  # (B, classes)


# § Training, validation, and keeping the best model (docs/fundamentals/deep_networks.md:703)
def one_cycle_lr(step: int, total: int, max_lr: float,
                 warmup: float = 0.2) -> float:
    """Linear warm-up over the first `warmup` of the steps, then cosine."""
    w = max(1, int(warmup * total))
    if step < w:
        return max_lr * (step + 1) / w
    progress = (step - w) / max(1, total - w)
    return 0.5 * max_lr * (1.0 + math.cos(math.pi * progress))


def random_shift(x: torch.Tensor, max_shift: int,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Move each image (B, H, W) by up to max_shift pixels, filling with 0."""
    if max_shift == 0:
        return x
    B, H, W = x.shape
    k = max_shift
    padded = F.pad(x, (k, k, k, k))  # (B, H + 2k, W + 2k), zeros: paper
    dy = torch.randint(0, 2 * k + 1, (B, 1, 1), generator=generator)
    dx = torch.randint(0, 2 * k + 1, (B, 1, 1), generator=generator)
    rows = dy.to(x.device) + torch.arange(H, device=x.device).view(1, H, 1)
    cols = dx.to(x.device) + torch.arange(W, device=x.device).view(1, 1, W)
    batch = torch.arange(B, device=x.device).view(B, 1, 1)
    return padded[batch, rows, cols]  # (B, H, W) a window per image


@dataclasses.dataclass
class TrainConfig:
    epochs: int = 15  # passes over the 8,000 digits; more gain little
    batch_size: int = 128  # 63 steps an epoch; batch norm wants >= 32
    lr: float = 3e-3  # peak learning rate; batch norm makes it safe
    warmup: float = 0.2  # fraction of the steps spent warming up
    weight_decay: float = 0.0  # dropout and shifts already regularise
    label_smoothing: float = 0.0  # did not help this recipe measurably
    max_shift: int = 2  # augmentation: pixels of random shift
    bf16: bool = True  # autocast matrix products to bfloat16: faster
    optimizer: str = "adam"  # or "sgd": plain SGD, no momentum (1990s)
    schedule: str = "one_cycle"  # or "constant": lr at every step
    seed: int = 0  # initial weights, batch order, dropout and shifts
    device: str | None = None  # None: "cuda" when available, else "cpu"

    def __post_init__(self):
        if self.optimizer not in ("adam", "sgd") or \
                self.schedule not in ("one_cycle", "constant"):
            raise ValueError(f"expected optimizer 'adam' or 'sgd' and "
                             f"schedule 'one_cycle' or 'constant', got "
                             f"{self.optimizer!r} and {self.schedule!r}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got "
                                 f"{getattr(self, name)}")
        if not self.lr > 0 or not 0 <= self.warmup <= 1:
            raise ValueError(f"expected lr > 0 and warmup in [0, 1], got "
                             f"lr={self.lr}, warmup={self.warmup}")
        if not 0 <= self.label_smoothing < 1 or self.max_shift < 0:
            raise ValueError(f"expected label_smoothing in [0, 1) and "
                             f"max_shift >= 0, got {self.label_smoothing} "
                             f"and {self.max_shift}")


@dataclasses.dataclass
class History:
    step_loss: list[float] = dataclasses.field(default_factory=list)
    lr: list[float] = dataclasses.field(default_factory=list)
    train_loss: list[float] = dataclasses.field(default_factory=list)
    val_loss: list[float] = dataclasses.field(default_factory=list)
    val_acc: list[float] = dataclasses.field(default_factory=list)
    seconds: list[float] = dataclasses.field(default_factory=list)
    best_epoch: int = -1  # 0-based epoch whose weights were kept
    best_val_acc: float = 0.0


def check_images(images: torch.Tensor, labels: torch.Tensor) -> None:
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"expected images (N, H, W) and labels (N,), got "
                         f"{tuple(images.shape)} and {tuple(labels.shape)}")


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
             bf16: bool = False, batch_size: int = 1000):
    """(mean loss, accuracy, predictions) on uint8 images (N, H, W)."""
    check_images(images, labels)
    device = next(model.parameters()).device
    total, predictions = 0.0, []
    with eval_mode(model):  # each layer's own mode restored after
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].to(device).float() / 255
            # x (b, H, W)
            y = labels[i:i + batch_size].to(device)  # (b,)
            with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                logits = model(x).float()  # (b, classes)
            total += F.cross_entropy(logits, y, reduction="sum").item()
            predictions.append(logits.argmax(dim=1).cpu())  # (b,)
    predictions = torch.cat(predictions)  # (N,)
    accuracy = (predictions == labels.cpu()).float().mean().item()
    return total / len(images), accuracy, predictions


def train(model: nn.Module, train_data, val_data,
          config: TrainConfig = TrainConfig()) -> History:
    """Train (Adam and one-cycle by default), validating every epoch.

    train_data and val_data are (uint8 images (N, H, W), labels (N,)).
    At the end the model holds the weights of its best validation epoch.
    """
    images, labels = train_data
    check_images(images, labels)
    device = pick_device(config.device)
    generator = seed_everything(config.seed)  # dropout masks; the generator
    # draws the batch order and the shifts
    model.to(device)
    x_all = images.to(device).float() / 255  # (N, H, W) in [0, 1]
    y_all = labels.to(device)  # (N,)
    n, B = len(x_all), config.batch_size
    steps_per_epoch = math.ceil(n / B)
    total_steps = config.epochs * steps_per_epoch
    if config.optimizer == "adam":
        optimiser = Adam(model.parameters(), lr=config.lr,
                         weight_decay=config.weight_decay)
    else:  # torch's SGD: the essentials chapter proved it equal to ours
        optimiser = torch.optim.SGD(model.parameters(), lr=config.lr,
                                    weight_decay=config.weight_decay)
    history, best_state = History(), None
    start = time.perf_counter()
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(n, generator=generator).to(device)  # (N,)
        epoch_losses = []
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            index = order[i * B:(i + 1) * B]  # (B,)
            x = random_shift(x_all[index], config.max_shift, generator)
            lr = one_cycle_lr(step, total_steps, config.lr, config.warmup) \
                if config.schedule == "one_cycle" else config.lr
            for group in optimiser.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, torch.bfloat16,
                                enabled=config.bf16):
                logits = model(x).float()  # (B, classes)
            loss = F.cross_entropy(logits, y_all[index],
                                   label_smoothing=config.label_smoothing)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            epoch_losses.append(loss.item())
            history.lr.append(lr)
        history.step_loss += epoch_losses
        history.train_loss.append(sum(epoch_losses) / len(epoch_losses))
        val_loss, val_acc, _ = evaluate(model, *val_data, bf16=config.bf16)
        history.val_loss.append(val_loss)
        history.val_acc.append(val_acc)
        history.seconds.append(time.perf_counter() - start)
        if val_acc > history.best_val_acc:  # keep a copy, not a reference
            history.best_val_acc, history.best_epoch = val_acc, epoch
            best_state = {k: v.detach().clone()
                          for k, v in model.state_dict().items()}
    if best_state is not None:
        model.load_state_dict(best_state)
    return history


# § Then and now: the 1990s recipe against today's (docs/fundamentals/deep_networks.md:1023)
# Each rung: (name, MLPConfig changes, TrainConfig changes), the ones
# before it included. SGD's learning rate is tuned by the full run.
ERAS = [
    ("1990s: sigmoid, SGD at a constant rate",
     {"activation": "sigmoid", "init": "xavier", "batch_norm": False,
      "dropout": 0.0},
     {"optimizer": "sgd", "schedule": "constant", "max_shift": 0}),
    ("+ ReLU and Kaiming init (2010, 2015)",
     {"activation": "relu", "init": "kaiming"}, {}),
    ("+ Adam and a one-cycle schedule (2015, 2018)",
     {}, {"optimizer": "adam", "schedule": "one_cycle", "lr": 3e-3}),
    ("+ batch norm (2015)", {"batch_norm": True}, {}),
    ("+ dropout and shifts: the recipe", {"dropout": 0.3},
     {"max_shift": 2}),
]
SGD_RATES = (0.1, 0.3, 1.0, 3.0, 10.0)  # tried for each plain-SGD rung


def era_configs(base: TrainConfig) -> list[tuple[str, MLPConfig,
                                                 TrainConfig]]:
    """The ladder of ERAS as configurations, each rung on top of the last."""
    model_fields, train_fields, rungs = {}, {}, []
    for name, model_changes, train_changes in ERAS:
        model_fields.update(model_changes)
        train_fields.update(train_changes)
        rungs.append((name, MLPConfig(**model_fields),
                      dataclasses.replace(base, **train_fields)))
    return rungs


# § From the command line (docs/fundamentals/deep_networks.md:1133)
FULL_RUN_PARTS = ("recipe", "eras")


def full_run(device: str | None = None, part: str = "recipe",
             **overrides) -> dict:
    """Train one part on the book's MNIST split; return its record.

    part "recipe": the chapter's recipe, its history and the validation
    digits it gets wrong; part "eras": every rung of ERAS. overrides:
    fields of TrainConfig (epochs=30, seed=1, bf16=False). The record is
    written by the caller, not here.
    """
    if part not in FULL_RUN_PARTS:
        raise ValueError(f"part must be one of {FULL_RUN_PARTS}, "
                         f"got {part!r}")
    config = override_config(TrainConfig(device=device), overrides)
    device = pick_device(config.device)
    train_data, val_data = mnist_split(seed=0)
    if part == "recipe":
        seed_everything(config.seed)
        model = MLP(MLPConfig())
        history = train(model, train_data, val_data, config)
        _, _, predictions = evaluate(model, *val_data, bf16=config.bf16)
        wrong = (predictions != val_data[1]).nonzero().flatten().tolist()
        return {
            "best_val_acc": history.best_val_acc,
            "best_epoch": history.best_epoch + 1,  # 1-based, as printed
            "seconds": history.seconds[-1],
            "device": str(device),
            "model": dataclasses.asdict(model.config),
            "train": dataclasses.asdict(config),
            "history": dataclasses.asdict(history),
            "mistakes": [[k, int(predictions[k])] for k in wrong],
        }
    rungs = []
    for name, model_config, train_config in era_configs(config):
        rates = SGD_RATES if train_config.optimizer == "sgd" \
            else (train_config.lr,)
        tried = []
        for lr in rates:
            seed_everything(train_config.seed)
            model = MLP(model_config)
            history = train(model, train_data, val_data,
                            dataclasses.replace(train_config, lr=lr))
            tried.append((history.best_val_acc, lr, history))
        best_acc, lr, history = max(tried, key=lambda t: t[0])
        rungs.append({
            "name": name, "lr": lr, "best_val_acc": best_acc,
            "tried": {str(r): a for a, r, _ in tried},
            "parameters": sum(p.numel() for p in model.parameters()),
            "seconds": history.seconds[-1],
            "model": dataclasses.asdict(model_config),
            "train": dataclasses.asdict(train_config),
            "history": {"val_acc": history.val_acc,
                        "train_loss": history.train_loss}})
    return {"device": str(device), "rungs": rungs}
