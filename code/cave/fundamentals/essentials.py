# Generated from docs/fundamentals/essentials.md by `python -m cave.book tangle`.
# Do not edit: edit the chapter, then regenerate. CI fails on drift.


# § Essentials: twenty ideas that carry PyTorch (docs/fundamentals/essentials.md:30)
"""The essentials of PyTorch, rebuilt from scratch where they can be.

Each function or class here is the from-scratch twin of a PyTorch one, and
tests/test_essentials.py proves they agree:

    softmax, log_softmax          torch.softmax, torch.log_softmax
    cross_entropy                 F.cross_entropy (class-index targets)
    layer_norm                    F.layer_norm
    scaled_dot_product_attention  F.scaled_dot_product_attention
    attention_weights             (the softmax weights, for plots)
    gelu, dropout                 F.gelu, F.dropout
    Linear, FeedForward           nn.Linear, the transformer MLP
    sgd_step, SGD                 torch.optim.SGD

and the small helpers every later chapter imports instead of writing again:

    max_diff        how far apart two tensors are (every proof prints it)
    seed_everything seed Python, NumPy and PyTorch at once
    eval_mode       evaluation mode for a block, the old mode restored after
    smooth          a moving average, for noisy loss curves
    pick_device     the device asked for, or the best one there is
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import sys
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "softmax", "log_softmax", "attention_weights",
    "scaled_dot_product_attention", "Linear", "layer_norm", "gelu",
    "FeedForward", "dropout", "cross_entropy", "sgd_step", "SGD",
    "max_diff", "seed_everything", "eval_mode", "smooth", "pick_device",
]


def max_diff(a, b) -> float:
    """The largest absolute difference between two tensors, as a float.

    Both are compared in float64 on the CPU, so that the comparison adds
    no rounding of its own; their shapes must be equal.
    """
    a, b = torch.as_tensor(a).detach(), torch.as_tensor(b).detach()
    if a.shape != b.shape:
        raise ValueError(f"max_diff compares tensors of one shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if a.numel() == 0:
        return 0.0
    return (a.cpu().double() - b.cpu().double()).abs().max().item()


# § 6. nn.Module and parameters (docs/fundamentals/essentials.md:350)
class Linear(nn.Module):
    """y = x W^T + b on raw Parameters, initialised like nn.Linear.

    W (out, in) and b (out,) are drawn from U(-1/sqrt(in), 1/sqrt(in)),
    weight first, so the same seed gives the same numbers as nn.Linear.
    """

    def __init__(self, in_features: int, out_features: int,
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        kw = {"device": device, "dtype": dtype}
        # kaiming_uniform_(a=sqrt(5)): gain sqrt(2 / (1 + a^2)) = sqrt(1/3),
        # std gain / sqrt(in), bound sqrt(3) * std = 1 / sqrt(in). Computed
        # in nn.init's order, std first, so that every float64 draw matches
        # to the last bit (the bound rounds differently the other way).
        gain = math.sqrt(2.0 / (1 + math.sqrt(5) ** 2))
        std = gain / math.sqrt(max(in_features, 1))
        w_bound = math.sqrt(3.0) * std
        weight = torch.empty(out_features, in_features, **kw)  # (out, in)
        self.weight = nn.Parameter(weight.uniform_(-w_bound, w_bound))
        bound = 1 / math.sqrt(in_features) if in_features > 0 else 0.0
        if bias:
            b = torch.empty(out_features, **kw)  # (out,)
            self.bias = nn.Parameter(b.uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Linear expected last dimension "
                             f"{self.in_features}, got shape {tuple(x.shape)}")
        y = x @ self.weight.T  # (..., in) @ (in, out) -> (..., out)
        return y if self.bias is None else y + self.bias  # (..., out)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, "
                f"out_features={self.out_features}, "
                f"bias={self.bias is not None}")


# § 9. Softmax and masking (docs/fundamentals/essentials.md:528)
def softmax(x: Tensor, dim: int = -1) -> Tensor:
    """exp(x - max) / sum(exp(x - max)) along `dim`; stable for any x.

    The max is detached: softmax is unchanged by a shift, so the shift
    needs no gradient. A row of all -inf gives NaN, as in torch.softmax.
    """
    shifted = x - x.amax(dim=dim, keepdim=True).detach()  # same shape as x
    e = shifted.exp()
    return e / e.sum(dim=dim, keepdim=True)


def log_softmax(x: Tensor, dim: int = -1) -> Tensor:
    """(x - max) - log(sum(exp(x - max))) along `dim`, never exp of a big x."""
    shifted = x - x.amax(dim=dim, keepdim=True).detach()  # same shape as x
    return shifted - shifted.exp().sum(dim=dim, keepdim=True).log()


def _check_attention(q: Tensor, k: Tensor, v: Tensor | None,
                     attn_mask: Tensor | None, is_causal: bool) -> None:
    """Name what was expected and what was got, before any arithmetic."""
    if q.dim() < 2 or k.dim() < 2:
        raise ValueError(f"attention expects (..., L, E) queries and "
                         f"(..., S, E) keys, got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"query and key sizes differ: q {tuple(q.shape)} "
                         f"has E={q.shape[-1]}, k {tuple(k.shape)} has "
                         f"E={k.shape[-1]}")
    if v is not None and (v.dim() < 2 or v.shape[-2] != k.shape[-2]):
        raise ValueError(f"keys and values need the same length S: k "
                         f"{tuple(k.shape)}, v {tuple(v.shape)}")
    if attn_mask is not None and is_causal:
        raise ValueError("pass either attn_mask or is_causal=True, not both")
    if attn_mask is not None:
        L, S = q.shape[-2], k.shape[-2]
        try:
            torch.broadcast_shapes(attn_mask.shape, (L, S))
        except RuntimeError:
            raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} "
                             f"does not broadcast to (..., L={L}, S={S})"
                             ) from None


def attention_weights(q: Tensor, k: Tensor, attn_mask: Tensor | None = None,
                      is_causal: bool = False,
                      scale: float | None = None) -> Tensor:
    """softmax(q k^T * scale + mask): the (..., L, S) weights, for plots too.

    attn_mask: bool (True = may attend) or float (added to the scores),
    broadcastable to (..., L, S). is_causal: query i sees keys 0..i.
    A fully masked row gets all-zero weights, as in PyTorch.
    """
    _check_attention(q, k, None, attn_mask, is_causal)
    L, S = q.shape[-2], k.shape[-2]
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale  # (..., L, S)
    if is_causal:
        attn_mask = torch.ones(L, S, dtype=torch.bool,
                               device=q.device).tril()  # (L, S)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, float("-inf"))  # (..., L, S)
    elif attn_mask is not None:
        scores = scores + attn_mask  # (..., L, S)
    dead = (scores == float("-inf")).all(dim=-1, keepdim=True)  # (..., L, 1)
    weights = softmax(scores.masked_fill(dead, 0.0), dim=-1)  # (..., L, S)
    return weights.masked_fill(dead, 0.0)


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor,
                                 attn_mask: Tensor | None = None,
                                 dropout_p: float = 0.0,
                                 is_causal: bool = False,
                                 scale: float | None = None) -> Tensor:
    """softmax(q k^T / sqrt(E) + mask) v, like F.scaled_dot_product_attention.

    q (..., L, E), k (..., S, E), v (..., S, Ev) -> (..., L, Ev). The
    arguments come in PyTorch's order, so either can stand for the other.
    """
    _check_attention(q, k, v, attn_mask, is_causal)
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    weights = attention_weights(q, k, attn_mask, is_causal, scale)
    if dropout_p > 0:
        weights = torch.dropout(weights, dropout_p, train=True)
    return weights @ v  # (..., L, S) @ (..., S, Ev) -> (..., L, Ev)


# § 11. Normalisation (docs/fundamentals/essentials.md:763)
def layer_norm(x: Tensor, normalized_shape: int | tuple[int, ...],
               weight: Tensor | None = None, bias: Tensor | None = None,
               eps: float = 1e-5) -> Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last dims.

    Equal to F.layer_norm: the variance is biased (divides by n).
    """
    shape = ((normalized_shape,) if isinstance(normalized_shape, int)
             else tuple(normalized_shape))
    if tuple(x.shape[x.dim() - len(shape):]) != shape or x.dim() < len(shape):
        raise ValueError(f"layer_norm over {shape} needs an input ending in "
                         f"{shape}, got {tuple(x.shape)}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != shape:
            raise ValueError(f"layer_norm {name} must have shape {shape}, "
                             f"got {tuple(p.shape)}")
    dims = tuple(range(-len(shape), 0))  # the normalised dimensions
    mean = x.mean(dim=dims, keepdim=True)  # (..., 1, ..., 1)
    var = x.var(dim=dims, keepdim=True, correction=0)  # biased
    y = (x - mean) / torch.sqrt(var + eps)  # same shape as x
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


# § 12. Feed-forward layers (docs/fundamentals/essentials.md:833)
def gelu(x: Tensor) -> Tensor:
    """x * Phi(x), Phi the standard normal CDF (F.gelu's exact form)."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


class FeedForward(nn.Module):
    """Linear(dim, hidden) -> GELU -> dropout -> Linear(hidden, dim).

    hidden defaults to 4 * dim, as in the 2017 transformer and GPT-2.
    """

    def __init__(self, dim: int, hidden: int | None = None,
                 dropout: float = 0.0):
        super().__init__()
        hidden = 4 * dim if hidden is None else hidden
        self.up = Linear(dim, hidden)
        self.down = Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = gelu(self.up(x))  # (..., dim) -> (..., hidden)
        return self.down(self.drop(h))  # (..., hidden) -> (..., dim)


# § 13. Dropout (docs/fundamentals/essentials.md:892)
def dropout(x: Tensor, p: float = 0.5, training: bool = True) -> Tensor:
    """Zero each element with probability p, scale survivors by 1/(1-p).

    Draws its mask like F.dropout (Bernoulli(1-p), divided by 1-p), so the
    same seed zeroes the same elements.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return x * torch.zeros_like(x)
    keep = torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)  # same as x
    return x * keep


# § 14. Losses (docs/fundamentals/essentials.md:955)
def cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = -100,
                  label_smoothing: float = 0.0) -> Tensor:
    """Mean of -log softmax(logits)[target] over targets != ignore_index.

    logits (N, C) or (N, C, d1, ...) with int64 targets (N,) or
    (N, d1, ...), like F.cross_entropy; a single (C,) with a () target too.
    With label_smoothing e, each loss is (1 - e) * nll + e * mean_c(-logp).
    """
    if targets.dtype != torch.int64:
        raise TypeError(f"cross_entropy targets must be class indices of "
                        f"dtype torch.int64, got {targets.dtype} "
                        "(use targets.long())")
    if logits.dim() == 1 and targets.dim() == 0:  # one example, (C,)
        logits, targets = logits[None], targets[None]  # (1, C), (1,)
    if logits.dim() < 2:
        raise ValueError(f"logits must be (N, C, ...) or (C,), "
                         f"got {tuple(logits.shape)}")
    want = logits.shape[:1] + logits.shape[2:]
    if targets.shape != want:
        raise ValueError(f"logits {tuple(logits.shape)} need targets of shape "
                         f"{tuple(want)}, got {tuple(targets.shape)}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], "
                         f"got {label_smoothing}")
    C = logits.shape[1]
    z = logits.movedim(1, -1).reshape(-1, C)  # (M, C), M = N * d1 * ...
    t = targets.reshape(-1)  # (M,)
    valid = t != ignore_index  # (M,)
    bad = valid & ((t < 0) | (t >= C))
    if bad.any():
        raise IndexError(f"target {t[bad][0].item()} is out of range for "
                         f"{C} classes (expected 0..{C - 1} or "
                         f"ignore_index={ignore_index})")
    logp = log_softmax(z, dim=-1)  # (M, C)
    picked = logp.gather(1, t.where(valid, 0)[:, None])[:, 0]  # (M,)
    loss = -picked  # (M,)
    if label_smoothing > 0:
        uniform = -logp.mean(dim=-1)  # (M,), cross-entropy to uniform
        loss = (1 - label_smoothing) * loss + label_smoothing * uniform
    loss = loss.where(valid, 0.0)  # ignored targets add nothing
    return loss.sum() / valid.sum()


# § 15. Optimiser steps (docs/fundamentals/essentials.md:1060)
@torch.no_grad()
def sgd_step(params: Iterable[Tensor], lr: float, momentum: float = 0.0,
             weight_decay: float = 0.0,
             buffers: list[Tensor | None] | None = None
             ) -> list[Tensor | None]:
    """One torch.optim.SGD update in place; returns the momentum buffers.

    g = grad + weight_decay * p; b = momentum * b + g (b = g the first
    time); p -= lr * b. Parameters without a gradient are skipped.
    Pass the returned buffers to the next call.
    """
    params = list(params)
    buffers = [None] * len(params) if buffers is None else list(buffers)
    if len(buffers) != len(params):
        raise ValueError(f"got {len(buffers)} momentum buffers for "
                         f"{len(params)} parameters")
    for i, p in enumerate(params):
        if p.grad is None:
            continue
        g = p.grad if weight_decay == 0 else p.grad + weight_decay * p
        if momentum != 0:
            if buffers[i] is None:
                buffers[i] = g.clone()  # first step: b_1 = g_1
            else:
                buffers[i].mul_(momentum).add_(g)  # b = mu * b + g
            g = buffers[i]
        p.add_(g, alpha=-lr)  # p = p - lr * g
    return buffers


class SGD:
    """A minimal optimiser around sgd_step: step(), zero_grad(), state."""

    def __init__(self, params: Iterable[Tensor], lr: float,
                 momentum: float = 0.0, weight_decay: float = 0.0):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"lr, momentum and weight_decay must be >= 0, "
                             f"got {lr}, {momentum}, {weight_decay}")
        self.params = list(params)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.buffers: list[Tensor | None] = [None] * len(self.params)

    def step(self) -> None:
        self.buffers = sgd_step(self.params, self.lr, self.momentum,
                                self.weight_decay, self.buffers)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict:
        return {"lr": self.lr, "momentum": self.momentum,
                "weight_decay": self.weight_decay, "buffers": self.buffers}

    def load_state_dict(self, state: dict) -> None:
        if len(state["buffers"]) != len(self.params):
            raise ValueError(f"state has {len(state['buffers'])} buffers, "
                             f"optimiser has {len(self.params)} parameters")
        self.lr, self.momentum = state["lr"], state["momentum"]
        self.weight_decay = state["weight_decay"]
        self.buffers = list(state["buffers"])


# § 16. The training loop (docs/fundamentals/essentials.md:1168)
def seed_everything(seed: int, deterministic: bool = False
                    ) -> torch.Generator:
    """Seed Python, NumPy (if imported) and PyTorch; return a generator.

    The returned generator, seeded with `seed`, is for a DataLoader's
    shuffling. With `deterministic=True`, PyTorch also refuses operations
    that have no deterministic implementation.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed(seed % 2**32)
    torch.manual_seed(seed)  # the CPU generator and every GPU's
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    return torch.Generator().manual_seed(seed)


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Evaluation mode inside the block; every submodule's own mode after.

    with eval_mode(model): ...   (any number of modules). The modes are
    restored even when the block raises.
    """
    for m in modules:
        if not isinstance(m, nn.Module):
            raise TypeError(f"eval_mode expects nn.Module arguments, got "
                            f"{type(m).__name__}")
    saved = [(sub, sub.training) for m in modules for sub in m.modules()]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for sub, training in saved:
            sub.training = training


def smooth(values: Sequence[float], window: int = 20) -> list[float]:
    """Moving average over the last `window` values (fewer at the start)."""
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)  # (N,)
    sums = torch.cat([v.new_zeros(1), v.cumsum(0)])  # (N + 1,) prefix sums
    end = torch.arange(1, len(v) + 1)  # (N,): each window ends here
    start = (end - window).clamp(min=0)  # (N,)
    return ((sums[end] - sums[start]) / (end - start)).tolist()


# § 20. Device management (docs/fundamentals/essentials.md:1577)
def pick_device(name: str | torch.device | None = None) -> torch.device:
    """The device named ("cpu", "cuda", "cuda:1", ...), checked; with no
    name, the first CUDA GPU if PyTorch can see one, else the CPU."""
    if name is None or name == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {name!r}: expected 'cpu', "
                         f"'cuda' or 'cuda:N'") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() \
            else 0
        if count == 0:
            raise ValueError(f"device {name!r} asked for, but this PyTorch "
                             f"sees no CUDA GPU; use 'cpu'")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {name!r} asked for, but this PyTorch "
                             f"sees {count} GPU(s): cuda:0 to "
                             f"cuda:{count - 1}")
    return device
