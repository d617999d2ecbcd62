# Generated from docs/techniques/optimization.md by `python -m cave.book tangle`.
# Do not edit: edit the chapter, then regenerate. CI fails on drift.


# § Optimisation (docs/techniques/optimization.md:36)
"""Optimisation: optimisers, schedules, accumulation and loss scaling.

The chapter docs/techniques/optimization.md builds, in order:

    SGD             momentum, dampening, Nesterov, weight decay;
                    equal to torch.optim.SGD
    Adam, AdamW     with AMSGrad, L2 or decoupled weight decay; equal to
                    torch.optim.Adam and torch.optim.AdamW
    Lion            the sign of an interpolated momentum; equal to
                    lion_pytorch.Lion 0.2.5
    newton_schulz   the quintic iteration that orthogonalises a matrix
    Muon            orthogonalised momentum for matrices; = torch.optim.Muon
    quadratic, rosenbrock, descend
                    two test valleys and an optimiser's path through them
    constant, step_decay, linear, cosine, one_cycle, sequential,
    warmup_cosine   learning-rate schedules as factors of the base rate;
                    equal to torch.optim.lr_scheduler's
    Scheduler       applies a schedule to an optimiser's groups
    accumulate      gradient accumulation that equals the large batch
    LossScaler      dynamic loss scaling for float16; takes the decisions
                    torch.amp.GradScaler takes
    RaceConfig, full_run
                    a learning-rate sweep per optimiser on MNIST, recorded
                    by `cave run optimization --full`
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cave.fundamentals.checkpoints import override_config
from cave.fundamentals.data import mnist_split
from cave.fundamentals.deep_networks import MLP, MLPConfig, evaluate
from cave.fundamentals.essentials import pick_device, seed_everything


# § SGD: momentum, dampening, Nesterov (docs/techniques/optimization.md:187)
def _check(name: str, value: float, low: float = 0.0,
           high: float | None = None) -> None:
    """A hyperparameter in [low, high) (or >= low), or a clear error."""
    if not (value >= low and (high is None or value < high)):
        bounds = f">= {low}" if high is None else f"in [{low}, {high})"
        raise ValueError(f"{name} must be {bounds}, got {value!r}")


def _evaluate_closure(closure: Callable[[], Tensor] | None) -> Tensor | None:
    """torch.optim's convention: step(closure) re-evaluates the loss."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _with_grads(optimizer: torch.optim.Optimizer):
    """(group, parameter, gradient, state) for every parameter that has a
    gradient: the loop every step() below runs."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                yield group, p, p.grad, optimizer.state[p]


class SGD(torch.optim.Optimizer):
    """Stochastic gradient descent, step for step equal to torch.optim.SGD.

    Momentum mu with dampening tau, Nesterov's look-ahead, and weight
    decay as an L2 term added to the gradient.
    """

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False):
        _check("lr", lr)
        _check("momentum", momentum)
        _check("weight_decay", weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError(f"Nesterov momentum needs momentum > 0 and "
                             f"dampening 0, got momentum={momentum}, "
                             f"dampening={dampening}")
        super().__init__(params, dict(lr=lr, momentum=momentum,
                                      dampening=dampening,
                                      weight_decay=weight_decay,
                                      nesterov=nesterov))

    @torch.no_grad()
    def step(self, closure=None):
        loss = _evaluate_closure(closure)
        for group, p, g, state in _with_grads(self):
            lr, mu = group["lr"], group["momentum"]
            tau, wd = group["dampening"], group["weight_decay"]
            if wd != 0:
                g = g.add(p, alpha=wd)  # g = g + lambda theta
            if mu != 0:
                if "momentum_buffer" not in state:
                    b = state["momentum_buffer"] = g.clone()  # b1 = g1
                else:
                    b = state["momentum_buffer"]
                    b.mul_(mu).add_(g, alpha=1 - tau)
                    # b = mu b + (1 - tau) g
                g = g.add(b, alpha=mu) if group["nesterov"] else b
                # Nesterov: step along g + mu b; else along b
            p.add_(g, alpha=-lr)  # theta = theta - lr g
        return loss


# § Adam, AMSGrad and AdamW (docs/techniques/optimization.md:328)
class Adam(torch.optim.Optimizer):
    """Adam, with AMSGrad; equal to torch.optim.Adam step for step.

    weight_decay adds lambda * theta to the gradient (L2); AdamW below
    decouples it instead.
    """

    decoupled = False  # AdamW: shrink theta directly, not via the gradient

    def __init__(self, params, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0,
                 amsgrad: bool = False):
        _check("lr", lr)
        _check("betas[0]", betas[0], 0.0, 1.0)
        _check("betas[1]", betas[1], 0.0, 1.0)
        _check("eps", eps)
        _check("weight_decay", weight_decay)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay,
                                      amsgrad=amsgrad))

    @torch.no_grad()
    def step(self, closure=None):
        loss = _evaluate_closure(closure)
        for group, p, g, state in _with_grads(self):
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            if not state:  # the moments start at zero
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)  # m
                state["exp_avg_sq"] = torch.zeros_like(p)  # v
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            t = state["step"]
            if wd != 0 and self.decoupled:
                p.mul_(1 - lr * wd)  # theta = theta (1 - lr lambda)
            elif wd != 0:
                g = g.add(p, alpha=wd)  # g = g + lambda theta (L2)
            m, v = state["exp_avg"], state["exp_avg_sq"]
            m.lerp_(g, 1 - beta1)  # m = b1 m + (1 - b1) g
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            # v = b2 v + (1 - b2) g^2
            if group["amsgrad"]:
                v_max = state["max_exp_avg_sq"]
                torch.maximum(v_max, v, out=v_max)  # v_max = max(v_max, v)
                v = v_max
            correction1 = 1 - beta1 ** t  # m_hat = m / correction1
            correction2 = 1 - beta2 ** t  # v_hat = v / correction2
            denom = (v.sqrt() / correction2 ** 0.5).add_(eps)
            # sqrt(v_hat) + eps
            p.addcdiv_(m, denom, value=-lr / correction1)
            # theta = theta - lr m_hat / (sqrt(v_hat) + eps)
        return loss


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov and Hutter, 2019);
    equal to torch.optim.AdamW, including its default decay of 0.01."""

    decoupled = True

    def __init__(self, params, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2,
                 amsgrad: bool = False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad)


# § Lion (docs/techniques/optimization.md:445)
class Lion(torch.optim.Optimizer):
    """Lion (Chen et al., 2023): the sign of an interpolated momentum.

    Equal to lion_pytorch.Lion 0.2.5 (its tests prove it); weight decay
    is decoupled, lr * weight_decay per step.
    """

    def __init__(self, params, lr: float = 1e-4,
                 betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0):
        _check("lr", lr)
        _check("betas[0]", betas[0], 0.0, 1.0)
        _check("betas[1]", betas[1], 0.0, 1.0)
        _check("weight_decay", weight_decay)
        super().__init__(params, dict(lr=lr, betas=tuple(betas),
                                      weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = _evaluate_closure(closure)
        for group, p, g, state in _with_grads(self):
            lr, wd = group["lr"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            if not state:
                state["exp_avg"] = torch.zeros_like(p)  # m
            m = state["exp_avg"]
            p.mul_(1 - lr * wd)  # theta = theta (1 - lr lambda)
            c = m.mul(beta1).add_(g, alpha=1 - beta1)
            # c = b1 m + (1 - b1) g
            p.add_(c.sign_(), alpha=-lr)  # theta = theta - lr sign(c)
            m.mul_(beta2).add_(g, alpha=1 - beta2)
            # m = b2 m + (1 - b2) g
        return loss


# § Muon: orthogonalised momentum for matrices (docs/techniques/optimization.md:534)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic


def newton_schulz(matrix: Tensor, steps: int = 5,
                  coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                  eps: float = 1e-7) -> Tensor:
    """U S' V^T for matrix = U S V^T, with S' near 1: an approximately
    orthogonal matrix with matrix's singular vectors, in bfloat16."""
    if matrix.ndim != 2:
        raise ValueError(f"newton_schulz expects a matrix (2 dimensions), "
                         f"got shape {tuple(matrix.shape)}")
    a, b, c = coefficients
    X = matrix.bfloat16()
    tall = X.size(0) > X.size(1)
    if tall:  # iterate on the wide side: X X^T is the smaller Gram matrix
        X = X.T
    X = X / X.norm().clamp(min=eps)  # ||X||_F >= every singular value
    for _ in range(steps):
        A = X @ X.T  # (r, r): X X^T = U S^2 U^T
        B = torch.addmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        X = torch.addmm(X, B, X, beta=a)  # a X + B X: s -> a s+b s^3+c s^5
    return X.T if tall else X


class Muon(torch.optim.Optimizer):
    """Muon: momentum, orthogonalised by Newton-Schulz, for 2-D weights;
    equal to torch.optim.Muon step for step.

    Only for hidden matrices: give embeddings, the output layer, biases
    and norms to AdamW. adjust_lr "original" scales the step by
    sqrt(max(1, rows / cols)); "match_rms_adamw" by 0.2 sqrt(max(rows,
    cols)), so that AdamW's learning rate and decay carry over.
    """

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1,
                 momentum: float = 0.95, nesterov: bool = True,
                 ns_coefficients: tuple[float, float, float] =
                 NS_COEFFICIENTS, eps: float = 1e-7, ns_steps: int = 5,
                 adjust_lr_fn: str | None = None):
        _check("lr", lr)
        _check("momentum", momentum, 0.0, 1.0)
        _check("weight_decay", weight_decay)
        if adjust_lr_fn not in (None, "original", "match_rms_adamw"):
            raise ValueError(f"adjust_lr_fn must be None, 'original' or "
                             f"'match_rms_adamw', got {adjust_lr_fn!r}")
        super().__init__(params, dict(
            lr=lr, weight_decay=weight_decay, momentum=momentum,
            nesterov=nesterov, ns_coefficients=tuple(ns_coefficients),
            eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn))
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(
                        f"Muon updates matrices only, got a parameter of "
                        f"shape {tuple(p.shape)}: give it to AdamW")

    @staticmethod
    def lr_scale(shape: Sequence[int], adjust_lr_fn: str | None) -> float:
        """The factor on the learning rate for a (rows, cols) matrix."""
        rows, cols = shape[:2]
        if adjust_lr_fn == "match_rms_adamw":
            return 0.2 * math.sqrt(max(rows, cols))
        return math.sqrt(max(1, rows / cols))

    @torch.no_grad()
    def step(self, closure=None):
        loss = _evaluate_closure(closure)
        for group, p, g, state in _with_grads(self):
            lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(g)  # B
            buf = state["momentum_buffer"]
            buf.lerp_(g, 1 - mu)  # B = mu B + (1 - mu) g
            update = g.lerp(buf, mu) if group["nesterov"] else buf
            # Nesterov: (1 - mu) g + mu B
            O = newton_schulz(update, group["ns_steps"],
                              group["ns_coefficients"], group["eps"])
            scale = self.lr_scale(p.shape, group["adjust_lr_fn"])
            p.mul_(1 - lr * wd)  # theta = theta (1 - lr lambda)
            p.add_(O, alpha=-lr * scale)  # theta = theta - lr' O
        return loss


# § Two valleys (docs/techniques/optimization.md:675)
def quadratic(p: Tensor, condition: float = 25.0) -> Tensor:
    """1/2 (x^2 + condition y^2): a valley `condition` times steeper
    across than along; minimum 0 at (0, 0). p: (..., 2)."""
    return 0.5 * (p[..., 0] ** 2 + condition * p[..., 1] ** 2)


def rosenbrock(p: Tensor) -> Tensor:
    """(1 - x)^2 + 100 (y - x^2)^2: minimum 0 at (1, 1). p: (..., 2)."""
    x, y = p[..., 0], p[..., 1]
    return (1 - x) ** 2 + 100 * (y - x ** 2) ** 2


def descend(make_optimizer: Callable[[list[Tensor]], torch.optim.Optimizer],
            f: Callable[[Tensor], Tensor], start: Sequence[float],
            steps: int) -> Tensor:
    """The path (steps + 1, 2) of an optimiser minimising f from start.

    The point is one (1, 2) matrix, so that matrix optimisers (Muon)
    apply too.
    """
    point = nn.Parameter(torch.tensor([list(start)], dtype=torch.float32))
    optimizer = make_optimizer([point])
    path = [point.detach().clone()]
    for _ in range(steps):
        optimizer.zero_grad()
        f(point).sum().backward()
        optimizer.step()
        path.append(point.detach().clone())
    return torch.cat(path)  # (steps + 1, 2)


# § Learning-rate schedules (docs/techniques/optimization.md:795)
Schedule = Callable[[int], float]  # step t (from 0) -> factor on base lr


def constant(factor: float = 1.0) -> Schedule:
    return lambda t: factor


def step_decay(step_size: int, gamma: float = 0.1) -> Schedule:
    """gamma ** (t // step_size): StepLR."""
    if step_size < 1:
        raise ValueError(f"step_size must be >= 1, got {step_size}")
    return lambda t: gamma ** (t // step_size)


def linear(start: float, end: float, total: int) -> Schedule:
    """From start to end in `total` steps, then end: LinearLR."""
    if total < 1:
        raise ValueError(f"total must be >= 1 step, got {total}")
    return lambda t: start + (end - start) * min(t, total) / total


def cosine(total: int, final: float = 0.0) -> Schedule:
    """Half a cosine from 1 down to `final` in `total` steps, then final:
    CosineAnnealingLR with eta_min = final * base lr."""
    if total < 1:
        raise ValueError(f"total must be >= 1 step, got {total}")
    return lambda t: final + (1 - final) * 0.5 * (
        1 + math.cos(math.pi * min(t, total) / total))


def one_cycle(total: int, pct_start: float = 0.3, div_factor: float = 25.0,
              final_div_factor: float = 1e4) -> Schedule:
    """OneCycleLR's learning rate, as a factor of the peak (max_lr):
    a cosine from 1/div_factor up to 1 until step pct_start * total - 1,
    then a cosine down to 1 / (div_factor * final_div_factor) at the
    last step, total - 1."""
    if total < 2 or not 0 < pct_start < 1:
        raise ValueError(f"expected total >= 2 and pct_start in (0, 1), "
                         f"got total={total}, pct_start={pct_start}")
    start, low = 1 / div_factor, 1 / (div_factor * final_div_factor)
    peak_at, last = pct_start * total - 1, total - 1

    def anneal(high_from: float, to: float, fraction: float) -> float:
        return to + (high_from - to) / 2 * (math.cos(math.pi * fraction) + 1)

    def factor(t: int) -> float:
        if t > total:  # OneCycleLR allows one step past the last, too
            raise ValueError(f"one_cycle covers steps 0..{total}, got {t}")
        if t <= peak_at:  # t / peak_at of the way up
            return anneal(start, 1.0, t / peak_at)
        return anneal(1.0, low, (t - peak_at) / (last - peak_at))

    return factor


def sequential(schedules: Sequence[Schedule],
               milestones: Sequence[int]) -> Schedule:
    """Schedule i from milestone i - 1 on, restarted at 0 there:
    SequentialLR."""
    if len(milestones) != len(schedules) - 1 or list(milestones) != sorted(
            milestones):
        raise ValueError(f"expected {len(schedules) - 1} increasing "
                         f"milestones for {len(schedules)} schedules, "
                         f"got {list(milestones)}")

    def factor(t: int) -> float:
        i = sum(t >= m for m in milestones)  # the schedule in charge
        begin = milestones[i - 1] if i else 0
        return schedules[i](t - begin)

    return factor


def warmup_cosine(warmup: int, total: int, final: float = 0.0) -> Schedule:
    """Linear warm-up from 1/warmup to 1 over `warmup` steps, then a
    cosine to `final` at step `total`: the LLaMA recipe's schedule."""
    if not 1 <= warmup < total:
        raise ValueError(f"expected 1 <= warmup < total, got warmup="
                         f"{warmup}, total={total}")
    ramp = (linear(1 / warmup, 1.0, warmup - 1) if warmup > 1
            else constant(1.0))
    return sequential([ramp, cosine(total - warmup, final)], [warmup])


class Scheduler:
    """Sets each group's lr to its base lr times schedule(t); step()
    advances t, like a torch.optim.lr_scheduler."""

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: Schedule):
        self.optimizer, self.schedule, self.t = optimizer, schedule, 0
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self._apply()

    def _apply(self) -> None:
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * self.schedule(self.t)

    def step(self) -> None:
        self.t += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"t": self.t, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict) -> None:
        self.t, self.base_lrs = state["t"], list(state["base_lrs"])
        self._apply()


# § Gradient accumulation (docs/techniques/optimization.md:1028)
def accumulate(model: nn.Module,
               micro_batches: Sequence[tuple[Tensor, Tensor]],
               ignore_index: int = -100) -> float:
    """Backward over micro-batches so that .grad gains exactly the
    gradient of the whole batch's mean cross-entropy, over every target
    that is not ignore_index. Returns that mean loss.

    Each (x, y): model(x) gives logits (..., C) for targets y (...).
    """
    if not micro_batches:
        raise ValueError("accumulate needs at least one micro-batch")
    count = sum(int((y != ignore_index).sum()) for _, y in micro_batches)
    if count == 0:
        raise ValueError(f"every target is ignore_index={ignore_index}: "
                         f"there is nothing to average")
    total = 0.0
    for x, y in micro_batches:
        logits = model(x)  # (..., C)
        loss = F.cross_entropy(logits.flatten(0, -2), y.flatten(),
                               ignore_index=ignore_index,
                               reduction="sum") / count  # sum_j / n
        loss.backward()  # adds this micro-batch's share to .grad
        total += loss.item()
    return total


# § Dynamic loss scaling (docs/techniques/optimization.md:1200)
class LossScaler:
    """Dynamic loss scaling for float16 training, by hand.

    scale(loss) -> loss * S; step(optimizer) unscales the gradients,
    skips the step if any is inf or nan, else steps; update() backs off
    (S *= backoff_factor) after an overflow and grows (S *=
    growth_factor) after growth_interval clean steps in a row. Takes the
    same decisions as torch.amp.GradScaler.
    """

    def __init__(self, init_scale: float = 2.0 ** 16,
                 growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000):
        if not (init_scale > 0 and growth_factor > 1
                and 0 < backoff_factor < 1 and growth_interval >= 1):
            raise ValueError(
                f"expected init_scale > 0, growth_factor > 1, backoff_"
                f"factor in (0, 1), growth_interval >= 1; got {init_scale}, "
                f"{growth_factor}, {backoff_factor}, {growth_interval}")
        self.scale_value = float(init_scale)  # S
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval = growth_interval
        self.clean_steps = 0  # steps without overflow since the last change
        self.found_inf: bool | None = None  # this step's check, once run

    def scale(self, loss: Tensor) -> Tensor:
        return loss * self.scale_value  # S L: every gradient times S

    @torch.no_grad()
    def unscale_(self, optimizer: torch.optim.Optimizer) -> bool:
        """Divide the gradients by S in place; True if any is not finite."""
        if self.found_inf is not None:
            raise RuntimeError("unscale_() was already called since the "
                               "last update()")
        inverse = 1.0 / self.scale_value  # exact for a power of two
        found = False
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.dtype == torch.float16:
                    raise ValueError("gradients must be float32 (master "
                                     "weights), got float16")
                found |= not bool(torch.isfinite(p.grad).all())
                p.grad.mul_(inverse)  # g = (S g) / S
        self.found_inf = found
        return found

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Unscale if not done yet, then step unless a gradient overflowed.
        Returns whether the optimiser stepped."""
        if self.found_inf is None:
            self.unscale_(optimizer)
        if self.found_inf:
            return False  # skip: the weights keep their values
        optimizer.step()
        return True

    def update(self) -> None:
        """Back off after an overflow; grow after growth_interval clean
        steps in a row."""
        if self.found_inf is None:
            raise RuntimeError("update() needs a step() or unscale_() first")
        if self.found_inf:
            self.scale_value *= self.backoff_factor  # S = S / 2
            self.clean_steps = 0
        else:
            self.clean_steps += 1
            if self.clean_steps == self.growth_interval:
                grown = self.scale_value * self.growth_factor  # S = 2 S
                if math.isfinite(grown):
                    self.scale_value = grown
                self.clean_steps = 0
        self.found_inf = None

    def state_dict(self) -> dict:
        return {"scale": self.scale_value, "clean_steps": self.clean_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale_value = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])


# § A fair race on MNIST (docs/techniques/optimization.md:1352)
RACE = {  # name: (learning rates swept, fixed settings)
    "SGD": ((0.01, 0.03, 0.1, 0.3), dict(momentum=0.9, nesterov=True)),
    "Adam": ((3e-4, 1e-3, 3e-3, 1e-2), dict()),
    "AdamW": ((3e-4, 1e-3, 3e-3, 1e-2), dict(weight_decay=0.1)),
    "Lion": ((1e-4, 3e-4, 1e-3, 3e-3), dict(weight_decay=1.0)),
    "Muon": ((0.01, 0.03, 0.1, 0.3), dict()),
}
RACERS = {"SGD": SGD, "Adam": Adam, "AdamW": AdamW, "Lion": Lion,
          "Muon": Muon}


@dataclasses.dataclass
class RaceConfig:
    epochs: int = 4  # passes over the digits: enough to rank the rules
    batch_size: int = 128  # 63 steps an epoch, as in deep_networks
    hidden: int = 256  # two hidden layers this wide, no batch norm and no
    # dropout: both would hide differences between the optimisers
    warmup: float = 0.1  # fraction of the steps warming up, then cosine
    train_size: int = 8000  # digits trained on (all of the book's split)
    muon_adamw_lr: float = 1e-3  # AdamW's rate for what Muon cannot take
    seed: int = 0  # initial weights and batch order, the same for all
    device: str | None = None  # None: "cuda" when available, else "cpu"

    def __post_init__(self):
        for name in ("epochs", "batch_size", "hidden", "train_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got "
                                 f"{getattr(self, name)}")
        if not 0 < self.warmup < 1:
            raise ValueError(f"warmup must be in (0, 1), got {self.warmup}")


def race_optimizers(name: str, model: nn.Module, lr: float,
                    config: RaceConfig) -> list[torch.optim.Optimizer]:
    """The optimisers for one racer: Muon pairs with AdamW."""
    if name not in RACE:
        raise ValueError(f"unknown optimiser {name!r}: expected one of "
                         f"{sorted(RACE)}")
    settings = RACE[name][1]
    if name != "Muon":
        return [RACERS[name](model.parameters(), lr=lr, **settings)]
    hidden = [m.weight for m in model.layers[:-1]  # not the output layer
              if isinstance(m, nn.Linear)]
    others = [p for p in model.parameters()
              if all(p is not h for h in hidden)]
    return [Muon(hidden, lr=lr, **settings),
            AdamW(others, lr=config.muon_adamw_lr)]


def race_one(name: str, lr: float, config: RaceConfig, train_data,
             val_data) -> dict:
    """Train one (optimiser, learning rate); its losses, as a record."""
    device = pick_device(config.device)
    generator = seed_everything(config.seed)
    model = MLP(MLPConfig(hidden=(config.hidden, config.hidden),
                          batch_norm=False, dropout=0.0)).to(device)
    optimizers = race_optimizers(name, model, lr, config)
    images, labels = train_data
    x_all = images.to(device).float() / 255  # (N, 28, 28)
    y_all = labels.to(device)  # (N,)
    per_epoch = math.ceil(len(x_all) / config.batch_size)
    total = config.epochs * per_epoch
    schedule = warmup_cosine(max(1, int(config.warmup * total)), total)
    schedulers = [Scheduler(opt, schedule) for opt in optimizers]
    step_loss = []
    for _ in range(config.epochs):
        order = torch.randperm(len(x_all), generator=generator).to(device)
        for index in order.split(config.batch_size):  # (B,) each
            loss = F.cross_entropy(model(x_all[index]), y_all[index])
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt, scheduler in zip(optimizers, schedulers):
                opt.step()
                scheduler.step()
            step_loss.append(round(loss.item(), 4))
    val_loss, val_acc, _ = evaluate(model, *val_data)
    return {"lr": lr, "step_loss": step_loss, "val_loss": val_loss,
            "val_acc": val_acc}


FULL_RUN_PARTS = tuple(RACE)  # one entry per optimiser in the record


def full_run(device: str | None = None, part: str = "Adam",
             **overrides) -> dict:
    """One optimiser's learning-rate sweep (part: a name in RACE), as a
    record. `cave run optimization --full` runs every part and records
    each as its own entry; part=Lion re-runs one alone.

    overrides: fields of RaceConfig (epochs=2, hidden=128, seed=1).
    """
    if part not in RACE:
        raise ValueError(f"unknown part {part!r}: expected one of "
                         f"{', '.join(RACE)}")
    config = override_config(RaceConfig(device=device), overrides)
    (images, labels), val_data = mnist_split(seed=0)
    train_data = (images[:config.train_size], labels[:config.train_size])
    start = time.perf_counter()
    runs = [race_one(part, lr, config, train_data, val_data)
            for lr in RACE[part][0]]
    best = min(runs, key=lambda run: (math.isnan(run["val_loss"]),
                                      run["val_loss"]))  # NaN: diverged
    return {
        "settings": RACE[part][1],
        "runs": runs,
        "best_lr": best["lr"],
        "seconds": time.perf_counter() - start,
        "device": str(pick_device(config.device)),
        "train": dataclasses.asdict(config),
    }
