# Generated from docs/techniques/compression.md by `python -m cave.book tangle`.
# Do not edit: edit the chapter, then regenerate. CI fails on drift.


# § Compression (docs/techniques/compression.md:32)
"""Compression: quantisation, pruning, distillation and LoRA, measured on
the book's own models.

The chapter docs/techniques/compression.md builds, in order:

    int_range, quant_params, quantize, dequantize
                        affine (scale, zero point) quantisation, per
                        tensor or per channel; equal to torch's
                        quantize_per_tensor / quantize_per_channel
    quantize_groups, dequantize_groups
                        one scale and zero point per group of weights
    pack_int4, unpack_int4
                        two 4-bit values in one byte
    QuantLinear, model_bytes
                        a Linear stored as integers, dequantised on the
                        fly; the bytes a model's file takes
    input_hessians, layer_error, gptq_quantize, quantize_llama
                        GPTQ: rounding error corrected with calibration
                        data, below round-to-nearest's on every layer
    magnitude_mask, channel_mask, two_four_mask, prune_model, sparsity,
    keep_pruned         pruning masks equal to torch.nn.utils.prune's,
                        the 2:4 pattern, fine-tuning that keeps zeros zero
    distillation_loss, DistillConfig, fit_student
                        knowledge distillation into a small MLP
    LoRALinear, add_lora, trainable_parameters, character_text,
    lora_finetune       low-rank adapters, equal to peft's LoRA layer
    CompressionConfig, FULL_RUN_PARTS, full_run
                        the measurements: `cave run compression --full`
"""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from cave.classical.cnn import RECIPE, Conv2d, LeNet5
from cave.fundamentals.checkpoints import override_config, safetensors_bytes
from cave.fundamentals.data import (Batches, load_shakespeare, mnist_split,
                                    shakespeare_split)
from cave.fundamentals.deep_networks import (MLP, Adam, MLPConfig, evaluate,
                                             one_cycle_lr, train)
from cave.fundamentals.essentials import (eval_mode, log_softmax,
                                          pick_device, seed_everything)
from cave.transformers.llama import Llama
from cave.transformers.llama_training import (evaluate as lm_loss,
                                              generation_speed, load_model)


# § Integers in place of floats: affine quantisation (docs/techniques/compression.md:131)
def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """(q_min, q_max): signed for symmetric grids, unsigned otherwise."""
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int from 2 to 8, got {bits!r}")
    if symmetric:
        return -2 ** (bits - 1), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def quant_params(x: Tensor, bits: int = 8, symmetric: bool = True,
                 dim: int | None = None) -> tuple[Tensor, Tensor]:
    """(scale, zero_point) mapping x's range, widened to hold zero, onto
    `bits`-bit integers: one pair for the tensor (dim=None), or one per
    index along `dim` (per channel). scale is float32, zero_point int64."""
    q_min, q_max = int_range(bits, symmetric)
    x = x.detach().float()
    if dim is None:
        lo, hi = x.min(), x.max()  # () each
    else:
        others = [d for d in range(x.ndim) if d != dim % x.ndim]
        lo, hi = x.amin(dim=others), x.amax(dim=others)  # (x.shape[dim],)
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)  # zero on the grid
    if symmetric:
        scale = torch.maximum(-lo, hi) / q_max  # the largest |x| -> q_max
    else:
        scale = (hi - lo) / (q_max - q_min)
    scale = scale.clamp(min=1e-12)  # an all-zero slice: any step will do
    zero = torch.zeros_like(scale, dtype=torch.int64)
    if not symmetric:  # the integer that min x rounds to is q_min
        zero = (q_min - torch.round(lo / scale)).clamp(q_min, q_max).long()
    return scale, zero


def _along(t: Tensor, x: Tensor, dim: int | None) -> Tensor:
    """A per-channel parameter t, shaped to broadcast along x's dim."""
    if dim is None:
        return t
    shape = [1] * x.ndim
    shape[dim] = -1
    return t.reshape(shape)


def quantize(x: Tensor, scale: Tensor, zero_point: Tensor, bits: int = 8,
             symmetric: bool = True, dim: int | None = None) -> Tensor:
    """clamp(round(x / scale) + zero_point): int8 for a symmetric grid,
    uint8 otherwise. torch.round rounds halves to even, as torch's
    quantize_per_tensor does."""
    q_min, q_max = int_range(bits, symmetric)
    scale, zero = _along(scale, x, dim), _along(zero_point, x, dim)
    q = torch.round(x.float() / scale) + zero  # same shape as x
    return q.clamp(q_min, q_max).to(torch.int8 if symmetric
                                     else torch.uint8)


def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor,
               dim: int | None = None) -> Tensor:
    """scale * (q - zero_point), in float32."""
    scale, zero = _along(scale, q, dim), _along(zero_point, q, dim)
    return (q.float() - zero) * scale


# § Four bits, in groups, two to a byte (docs/techniques/compression.md:251)
def quantize_groups(w: Tensor, bits: int = 4, group_size: int = 32,
                    symmetric: bool = False
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """w (out, in) -> (q (out, in), scale (out, G), zero (out, G)), one
    grid per run of group_size weights of a row: G = in / group_size.
    group_size = in is per-channel quantisation."""
    if w.ndim != 2 or w.shape[1] % group_size:
        raise ValueError(f"expected a (out, in) matrix whose in is a "
                         f"multiple of group_size={group_size}, got "
                         f"{tuple(w.shape)}")
    out, n = w.shape
    groups = w.reshape(out * (n // group_size), group_size)  # (out G, g)
    scale, zero = quant_params(groups, bits, symmetric, dim=0)  # (out G,)
    q = quantize(groups, scale, zero, bits, symmetric, dim=0)  # (out G, g)
    return (q.reshape(out, n), scale.reshape(out, -1),
            zero.reshape(out, -1))


def dequantize_groups(q: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """q (out, in), scale and zero (out, G) -> float32 (out, in)."""
    out, n = q.shape
    g = q.reshape(out, scale.shape[1], -1).float()  # (out, G, group)
    return ((g - zero[..., None]) * scale[..., None]).reshape(out, n)


def pack_int4(q: Tensor) -> Tensor:
    """uint8 values 0..15, (..., 2n) -> (..., n) bytes: low nibble first."""
    if q.dtype != torch.uint8 or q.shape[-1] % 2 or (q > 15).any():
        raise ValueError(f"pack_int4 expects uint8 values 0..15 with an "
                         f"even last dimension, got {q.dtype} "
                         f"{tuple(q.shape)}, max {q.max().item()}")
    return q[..., 0::2] | (q[..., 1::2] << 4)  # (..., n)


def unpack_int4(packed: Tensor) -> Tensor:
    """(..., n) bytes -> (..., 2n) uint8 values 0..15."""
    low, high = packed & 0x0F, packed >> 4  # (..., n) each
    return torch.stack([low, high], dim=-1).flatten(-2)  # (..., 2n)


# § Dequantising on the fly (docs/techniques/compression.md:347)
class QuantLinear(nn.Module):
    """A bias-optional Linear whose weight is stored as `bits`-bit
    integers in groups (4 bits: packed two to a byte), and dequantised to
    float at every call."""

    def __init__(self, q: Tensor, scale: Tensor, zero: Tensor, bits: int,
                 symmetric: bool, bias: Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.bits, self.symmetric = bits, symmetric
        self.group_size = self.in_features // scale.shape[1]
        self.register_buffer("qweight", pack_int4(q) if bits == 4 else q)
        self.register_buffer("scale", scale.float())  # (out, G)
        self.register_buffer("zero", zero.to(torch.uint8))  # (out, G)
        self.bias = None if bias is None else nn.Parameter(bias.detach())

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4,
                    group_size: int | None = 32,
                    symmetric: bool | None = None) -> "QuantLinear":
        """Round to nearest. group_size None: one grid per row (channel);
        symmetric None: symmetric at 8 bits, asymmetric below."""
        symmetric = bits == 8 if symmetric is None else symmetric
        size = group_size or linear.in_features
        q, s, z = quantize_groups(linear.weight.detach(), bits, size,
                                  symmetric)
        return cls(q, s, z, bits, symmetric, linear.bias)

    def dequantized_weight(self) -> Tensor:
        q = unpack_int4(self.qweight) if self.bits == 4 else self.qweight
        return dequantize_groups(q, self.scale, self.zero)  # (out, in)

    def forward(self, x: Tensor) -> Tensor:
        w = self.dequantized_weight().to(x.dtype)  # rebuilt at every call
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w, bias)  # (..., out)

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, "
                f"bits={self.bits}, group_size={self.group_size}")


def model_bytes(model: nn.Module) -> int:
    """The size of the safetensors file of the model's state_dict."""
    return len(safetensors_bytes({k: v.contiguous() for k, v
                                  in model.state_dict().items()}))


# § Correcting the rounding: GPTQ (docs/techniques/compression.md:443)
@torch.no_grad()
def input_hessians(model: nn.Module, layers: dict[str, nn.Module],
                   *inputs) -> dict[str, Tensor]:
    """H = mean of x x^T over every input row each layer sees while
    model(*inputs) runs: {name: (in, in)} in float64 sums, float32 out."""
    sums, counts, hooks = {}, {}, []

    def hook(name):
        def record(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x  # (in, in)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    for name, layer in layers.items():
        hooks.append(layer.register_forward_pre_hook(hook(name)))
    try:
        with eval_mode(model):
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return {name: (sums[name] / counts[name]).float() for name in sums}


def layer_error(w: Tensor, w_hat: Tensor, hessian: Tensor) -> Tensor:
    """tr(dW H dW^T) / tr(W H W^T): the output's squared error relative
    to the output's energy, over the calibration inputs."""
    d, w = (w_hat - w).double(), w.double()
    h = hessian.double()
    return ((d @ h) * d).sum() / ((w @ h) * w).sum()


@torch.no_grad()
def gptq_quantize(w: Tensor, hessian: Tensor, bits: int = 4,
                  group_size: int = 32, symmetric: bool = False,
                  damp: float = 0.01) -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ: w (out, in) and its input Hessian (in, in) -> (q, scale,
    zero) in quantize_groups' layout, columns rounded left to right, each
    error spread over the columns not yet rounded."""
    if hessian.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"expected a ({w.shape[1]}, {w.shape[1]}) "
                         f"Hessian for a weight {tuple(w.shape)}, got "
                         f"{tuple(hessian.shape)}")
    W = w.detach().float().clone()  # (out, in), corrected as we go
    out, n = W.shape
    H = hessian.float().clone()  # (in, in)
    dead = H.diagonal() == 0  # inputs that were always zero
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(damp * H.diagonal().mean())
    U = torch.linalg.cholesky(torch.cholesky_inverse(
        torch.linalg.cholesky(H)), upper=True)  # H^-1 = U^T U
    q = torch.empty(out, n, dtype=torch.int8 if symmetric else torch.uint8)
    scales, zeros = [], []
    for j in range(n):
        if j % group_size == 0:  # the group's grid, from corrected weights
            s, z = quant_params(W[:, j:j + group_size], bits, symmetric,
                                dim=0)  # (out,) each
            scales.append(s)
            zeros.append(z)
        q[:, j] = quantize(W[:, j], s, z, bits, symmetric)  # (out,)
        err = (W[:, j] - dequantize(q[:, j], s, z)) / U[j, j]  # (out,)
        W[:, j + 1:] -= err[:, None] * U[j, j + 1:][None, :]  # (out, rest)
    return q, torch.stack(scales, dim=1), torch.stack(zeros, dim=1)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantize_llama(model: Llama, method: str = "rtn", bits: int = 4,
                   group_size: int | None = 32,
                   calibration: Tensor | None = None,
                   damp: float = 0.01) -> tuple[Llama, dict]:
    """A copy of model with every block's linear layers a QuantLinear,
    rounded to nearest ("rtn") or by GPTQ ("gptq", which needs
    calibration token ids (B, T)). With calibration, also
    {layer: {"rtn": error, "gptq": error}} by layer_error."""
    if method not in ("rtn", "gptq"):
        raise ValueError(f"method must be 'rtn' or 'gptq', got {method!r}")
    if method == "gptq" and calibration is None:
        raise ValueError("GPTQ needs calibration token ids (B, T)")
    model = copy.deepcopy(model).float().eval()
    symmetric = bits == 8
    errors = {}
    for i, block in enumerate(model.layers):
        layers = {name: m for name, m in block.named_modules()
                  if isinstance(m, nn.Linear)}
        hessians = {} if calibration is None else \
            input_hessians(model, layers, calibration)
        for name, linear in layers.items():
            w = linear.weight.detach()
            size = group_size or w.shape[1]
            q, s, z = quantize_groups(w, bits, size, symmetric)
            if hessians:
                e_rtn = layer_error(w, dequantize_groups(q, s, z),
                                    hessians[name])
                errors[f"layers.{i}.{name}"] = {"rtn": e_rtn.item()}
            if method == "gptq":
                q, s, z = gptq_quantize(w, hessians[name], bits, size,
                                        symmetric, damp)
                errors[f"layers.{i}.{name}"]["gptq"] = layer_error(
                    w, dequantize_groups(q, s, z), hessians[name]).item()
            _replace(block, name, QuantLinear(q, s, z, bits, symmetric))
    return model, errors


# § Pruning: magnitude, channels, and 2:4 (docs/techniques/compression.md:655)
def _count(amount: float, size: int) -> int:
    if not 0 <= amount <= 1:
        raise ValueError(f"amount must be a fraction in [0, 1], got "
                         f"{amount!r}")
    return round(amount * size)  # torch.nn.utils.prune's count


def magnitude_mask(w: Tensor, amount: float) -> Tensor:
    """1 where a weight survives, 0 for the round(amount * numel) weights
    of smallest magnitude."""
    mask = torch.ones_like(w)
    k = _count(amount, w.numel())
    if k:
        smallest = torch.topk(w.detach().abs().flatten(), k,
                              largest=False).indices  # (k,)
        mask.view(-1)[smallest] = 0
    return mask


def channel_mask(w: Tensor, amount: float, n: float = 2,
                 dim: int = 0) -> Tensor:
    """1 on the channels (slices along dim) that survive, 0 on the
    round(amount * channels) of smallest l_n norm."""
    others = [d for d in range(w.ndim) if d != dim % w.ndim]
    norms = w.detach().norm(p=n, dim=others)  # (channels,)
    k = _count(amount, len(norms))
    if k == 0:
        return torch.ones_like(w)
    keep = torch.topk(norms, len(norms) - k).indices  # (channels - k,)
    return torch.zeros_like(w).index_fill_(dim, keep, 1.0)


def two_four_mask(w: Tensor) -> Tensor:
    """Two of every four consecutive weights along the input (the largest
    in magnitude) survive: w (out, ...) with ... a multiple of 4."""
    flat = w.detach().reshape(w.shape[0], -1)  # (out, in)
    if flat.shape[1] % 4:
        raise ValueError(f"2:4 needs inputs in fours, got {flat.shape[1]} "
                         f"per output (weight {tuple(w.shape)})")
    quads = flat.abs().reshape(flat.shape[0], -1, 4)  # (out, in / 4, 4)
    keep = quads.topk(2, dim=-1).indices  # (out, in / 4, 2)
    mask = torch.zeros_like(quads).scatter_(-1, keep, 1.0)
    return mask.reshape(w.shape)


PRUNABLE = (nn.Linear, nn.Conv2d, Conv2d)  # layers with a weight to prune


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, PRUNABLE)]


@torch.no_grad()
def prune_model(model: nn.Module, kind: str, amount: float = 0.5
                ) -> dict[str, Tensor]:
    """Zero weights in place by kind: "magnitude" (each layer's smallest
    amount), "channels" (each layer's weakest channels by l2 norm, not
    the last layer) or "2:4". Returns {parameter name: mask}."""
    if kind not in ("magnitude", "channels", "2:4"):
        raise ValueError(f"kind must be 'magnitude', 'channels' or '2:4', "
                         f"got {kind!r}")
    layers = prunable_layers(model)
    if kind == "channels":
        layers = layers[:-1]  # the last layer's channels are the classes
    masks = {}
    for name, layer in layers:
        w = layer.weight
        if kind == "2:4" and w[0].numel() % 4:
            continue  # its inputs do not come in fours: left dense
        mask = {"magnitude": lambda: magnitude_mask(w, amount),
                "channels": lambda: channel_mask(w, amount),
                "2:4": lambda: two_four_mask(w)}[kind]()
        w.mul_(mask)
        masks[f"{name}.weight"] = mask
        if kind == "channels" and layer.bias is not None:
            alive = mask.flatten(1).amax(dim=1)  # (out,) 1 if kept
            layer.bias.mul_(alive)
            masks[f"{name}.bias"] = alive
    return masks


def sparsity(model: nn.Module) -> float:
    """The fraction of zeros among the prunable layers' weights."""
    weights = [m.weight for _, m in prunable_layers(model)]
    zeros = sum((w == 0).sum().item() for w in weights)
    return zeros / sum(w.numel() for w in weights)


def keep_pruned(model: nn.Module, masks: dict[str, Tensor]) -> list:
    """Hooks that multiply each masked parameter's gradient by its mask:
    pruned weights stay zero under Adam or SGD without weight decay.
    Returns the handles (call .remove() on each to stop)."""
    params = dict(model.named_parameters())
    return [params[name].register_hook(lambda g, m=mask: g * m)
            for name, mask in masks.items()]


# § Knowledge distillation (docs/techniques/compression.md:847)
def distillation_loss(student_logits: Tensor, teacher_logits: Tensor,
                      labels: Tensor, temperature: float = 4.0,
                      alpha: float = 0.9) -> Tensor:
    """alpha T^2 KL(teacher || student at T) + (1 - alpha) CE, both means
    over the batch."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student and teacher logits must match, got "
                         f"{tuple(student_logits.shape)} and "
                         f"{tuple(teacher_logits.shape)}")
    T = temperature
    log_s = log_softmax(student_logits / T, dim=-1)  # (B, classes)
    log_t = log_softmax(teacher_logits / T, dim=-1)  # (B, classes)
    kl = (log_t.exp() * (log_t - log_s)).sum(dim=-1).mean()  # ()
    hard = F.cross_entropy(student_logits, labels)  # ()
    return alpha * T ** 2 * kl + (1 - alpha) * hard


@dataclasses.dataclass
class DistillConfig:
    hidden: int = 32  # units of the one hidden layer: a student far
    # cheaper to run than LeNet-5, which reuses its filters everywhere
    epochs: int = 20  # the student alone stops improving well before
    batch_size: int = 128  # the CNN chapter's batch
    lr: float = 3e-3  # peak of the one-cycle schedule, as the recipe's
    temperature: float = 4.0  # soft enough that the teacher's second
    # and third choices carry weight, a common choice for 10 classes
    alpha: float = 0.9  # weight of the soft targets; 0 trains alone
    seed: int = 0  # initial weights and batch order

    def __post_init__(self):
        if self.hidden < 1 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"hidden, epochs and batch_size must be >= 1, "
                             f"got {self.hidden}, {self.epochs}, "
                             f"{self.batch_size}")
        if not self.temperature > 0 or not 0 <= self.alpha <= 1:
            raise ValueError(f"expected temperature > 0 and alpha in "
                             f"[0, 1], got {self.temperature}, "
                             f"{self.alpha}")


def fit_student(config: DistillConfig, train_data, val_data,
                teacher_logits: Tensor | None = None) -> tuple[MLP, float]:
    """Train an MLP student on (uint8 images, labels): from the teacher's
    logits (N, classes) on the same images with config.alpha, or alone.
    Returns (student, final validation accuracy)."""
    images, labels = train_data
    seed_everything(config.seed)
    student = MLP(MLPConfig(hidden=(config.hidden,), batch_norm=False,
                            dropout=0.0))
    x_all = images.float() / 255  # (N, 28, 28)
    optimiser = Adam(student.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    n, B = len(x_all), config.batch_size
    steps = config.epochs * math.ceil(n / B)
    step = 0
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=generator)  # (N,)
        for i in range(0, n, B):
            index = order[i:i + B]  # (B,)
            for group in optimiser.param_groups:
                group["lr"] = one_cycle_lr(step, steps, config.lr, 0.2)
            logits = student(x_all[index])  # (B, classes)
            if teacher_logits is None:
                loss = F.cross_entropy(logits, labels[index])
            else:
                loss = distillation_loss(logits, teacher_logits[index],
                                         labels[index], config.temperature,
                                         config.alpha)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            step += 1
    return student, evaluate(student, *val_data)[1]


# § LoRA: low-rank adapters (docs/techniques/compression.md:995)
class LoRALinear(nn.Module):
    """base(x) + (alpha / rank) B A x, base frozen, A and B trained."""

    def __init__(self, base: nn.Module, rank: int = 8, alpha: float = 16.0,
                 dropout: float = 0.0):
        super().__init__()
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        self.base = base.requires_grad_(False)
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.rank, self.scaling = rank, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as peft
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank))
        self.drop = nn.Dropout(dropout)
        self.merged = False

    def delta_weight(self) -> Tensor:
        return self.scaling * self.lora_B @ self.lora_A  # (out, in)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)  # (..., out)
        if self.merged:
            return y
        a = self.drop(x) @ self.lora_A.to(x.dtype).T  # (..., rank)
        return y + self.scaling * (a @ self.lora_B.to(x.dtype).T)

    @torch.no_grad()
    def merge(self) -> None:
        """W += (alpha / r) B A: one matrix again, as fast as the base."""
        if not isinstance(self.base, nn.Linear) or self.merged:
            raise RuntimeError(f"merge needs an unmerged nn.Linear base, "
                               f"got {type(self.base).__name__} with "
                               f"merged={self.merged}")
        w = self.base.weight
        w += self.delta_weight().to(w.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("unmerge needs a merged layer")
        w = self.base.weight
        w -= self.delta_weight().to(w.dtype)
        self.merged = False


LLAMA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # every
# projection of attention and of the feed-forward network


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0,
             targets=LLAMA_TARGETS, dropout: float = 0.0) -> list[str]:
    """Freeze model and wrap every Linear or QuantLinear whose own name
    is in targets in a LoRALinear. Returns the wrapped layers' names."""
    model.requires_grad_(False)
    names = [name for name, m in model.named_modules()
             if isinstance(m, (nn.Linear, QuantLinear))
             and name.rpartition(".")[2] in targets]
    if not names:
        raise ValueError(f"no Linear layer named one of {tuple(targets)}")
    for name in names:
        _replace(model, name, LoRALinear(model.get_submodule(name), rank,
                                         alpha, dropout))
    return names


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# § Teaching the model a new character (docs/techniques/compression.md:1135)
def character_text(text: str, name: str) -> str:
    """Every speech of one character (paragraphs that begin 'NAME:'),
    joined by blank lines."""
    speeches = [p for p in text.split("\n\n")
                if p.startswith(f"{name}:\n")]
    if not speeches:
        raise ValueError(f"no speech begins with {name + ':'!r}")
    return "\n\n".join(speeches)


def lora_finetune(model: nn.Module, ids: Tensor, steps: int,
                  batch_size: int = 8, block_size: int = 128,
                  lr: float = 1e-3, seed: int = 0) -> list[float]:
    """AdamW on the parameters that require grad (the adapters), random
    windows of ids; returns the training losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires grad")
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    batches = Batches(ids, batch_size, block_size, seed=seed)
    losses = []
    model.train()
    for _ in range(steps):
        x, y = batches.next()  # (B, T) each
        _, loss = model(x, targets=y)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    model.eval()
    return losses


# § The full run (docs/techniques/compression.md:1214)
@dataclasses.dataclass
class CompressionConfig:
    group_size: int = 32  # weights per 4-bit grid: 64 left a larger
    # error in the chapter's demonstration; 32 adds 1.25 bits a weight
    calibration_windows: int = 32  # GPTQ's calibration: 32 windows of
    # 256 training characters, 8,192 inputs to every layer
    eval_windows: int = 64  # validation windows per model: 16,384
    # characters spread over the validation text, the same for each model
    speed_tokens: int = 100  # characters generated per timing
    speed_rounds: int = 3  # the models take turns; the median is kept
    teacher_epochs: int = 8  # LeNet-5 with the CNN chapter's recipe
    # (it trains 15): a teacher, not a record, and half the time
    sparsities: tuple[float, ...] = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95)
    finetune_epochs: int = 1  # of the recipe, after pruning, mask fixed
    seeds: int = 5  # students per arm of the distillation comparison
    student_epochs: int = 20  # DistillConfig's
    student_hidden: tuple[int, ...] = (32, 128)  # two students, both
    # cheaper to run than the teacher: one multiply-add per weight
    lora_rank: int = 8  # 2 r (in + out) numbers per adapted layer
    lora_alpha: float = 16.0  # scaling alpha / r = 2, peft's examples'
    lora_steps: int = 100  # about five passes over Prospero's training
    # characters at 4 x 128 a step: a fine-tune sized for a CPU
    lora_batch: int = 4  # windows per step
    lora_block: int = 128  # characters per window
    lora_lr: float = 2e-3  # adapters start at zero and need a push
    character: str = "PROSPERO"  # speaks only in the validation text
    other_chars: int = 80_000  # the validation text before Prospero's
    # first line: other plays, to see what the adapters cost elsewhere
    seed: int = 0  # calibration windows, teacher, batches

    def __post_init__(self):
        if self.group_size < 2 or self.group_size % 2:
            raise ValueError(f"group_size must be even and >= 2, got "
                             f"{self.group_size}")
        if not all(0 <= s < 1 for s in self.sparsities):
            raise ValueError(f"sparsities must lie in [0, 1), got "
                             f"{self.sparsities}")
        for name in ("calibration_windows", "eval_windows", "speed_tokens",
                     "speed_rounds", "teacher_epochs", "seeds",
                     "student_epochs", "lora_rank", "lora_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got "
                                 f"{getattr(self, name)}")


FULL_RUN_PARTS = ("llama", "cnn", "lora")


def _windows(ids: Tensor, count: int, length: int, seed: int) -> Tensor:
    """count random windows of ids: (count, length)."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - length, (count,), generator=g)
    return ids[starts[:, None] + torch.arange(length)]


def _run_llama(config: CompressionConfig) -> dict:
    model, _, _ = load_model()
    _, train_ids, val_ids = shakespeare_split()
    calibration = _windows(train_ids, config.calibration_windows, 256,
                           config.seed)  # (N, 256)
    g = config.group_size
    models = {"float32": model,
              "bfloat16": copy.deepcopy(model).to(torch.bfloat16),
              "int8 per channel": quantize_llama(model, "rtn", 8, None)[0],
              f"4-bit g{g} nearest": quantize_llama(model, "rtn", 4, g)[0]}
    t0 = time.perf_counter()
    models[f"4-bit g{g} GPTQ"], errors = quantize_llama(
        model, "gptq", 4, g, calibration)
    gptq_seconds = time.perf_counter() - t0
    table = {name: {"val_loss": lm_loss(m, val_ids, 256,
                                        config.eval_windows, bf16=False),
                    "bytes": model_bytes(m)} for name, m in models.items()}
    speeds = {name: [] for name in models}
    for _ in range(config.speed_rounds):  # interleaved: same conditions
        for name, m in models.items():
            speeds[name].append(generation_speed(m, config.speed_tokens))
    for name in models:
        table[name]["chars_per_s"] = statistics.median(speeds[name])
    return {"table": table, "errors": errors,
            "gptq_seconds": gptq_seconds,
            "eval_windows": config.eval_windows,
            "calibration_windows": config.calibration_windows}
    # (the recorder adds the threads and the CPU's capability itself)


def _run_cnn(config: CompressionConfig, device) -> dict:
    train_data, val_data = mnist_split(seed=0)
    recipe = dataclasses.replace(RECIPE, epochs=config.teacher_epochs,
                                 seed=config.seed, device=str(device))
    teacher = LeNet5()
    train(teacher, train_data, val_data, recipe)
    teacher = teacher.cpu()
    teacher_acc = evaluate(teacher, *val_data)[1]
    finetune = dataclasses.replace(recipe, epochs=config.finetune_epochs)
    rows = []
    for kind in ("magnitude", "channels", "2:4"):
        for amount in config.sparsities if kind != "2:4" else (0.5,):
            model = copy.deepcopy(teacher)
            masks = prune_model(model, kind, amount)
            row = {"kind": kind, "amount": amount,
                   "sparsity": sparsity(model),
                   "acc": evaluate(model, *val_data)[1]}
            handles = keep_pruned(model, masks)
            train(model, train_data, val_data, finetune)
            for h in handles:
                h.remove()
            model = model.cpu()
            row["acc_finetuned"] = evaluate(model, *val_data)[1]
            row["sparsity_finetuned"] = sparsity(model)
            rows.append(row)
    with torch.no_grad(), eval_mode(teacher):
        logits = teacher(train_data[0].float() / 255)  # (N, 10)
    students = {}
    for hidden in config.student_hidden:
        student = DistillConfig(hidden=hidden, epochs=config.student_epochs)
        alone, distilled = [], []
        for seed in range(config.seeds):
            cfg = dataclasses.replace(student, seed=seed)
            alone.append(fit_student(cfg, train_data, val_data)[1])
            net, acc = fit_student(cfg, train_data, val_data, logits)
            distilled.append(acc)
        students[str(hidden)] = {
            "alone": alone, "distilled": distilled,
            "config": dataclasses.asdict(student),
            "parameters": sum(p.numel() for p in net.parameters())}
    return {"teacher_val_acc": teacher_acc,
            "teacher_epochs": config.teacher_epochs,
            "teacher_parameters": sum(p.numel()
                                      for p in teacher.parameters()),
            "pruning": rows, "students": students}


def _run_lora(config: CompressionConfig) -> dict:
    base, tokenizer, _ = load_model()
    _, train_ids, val_ids = shakespeare_split()
    voice = tokenizer.encode(character_text(load_shakespeare(),
                                            config.character))
    cut = int(0.8 * len(voice))
    voice_train, voice_held = voice[:cut], voice[cut:]
    other = val_ids[:config.other_chars]
    T = config.lora_block

    def losses(m):
        return (lm_loss(m, voice_held, T, bf16=False),
                lm_loss(m, other, T, 64, bf16=False))

    calibration = _windows(train_ids, config.calibration_windows, 256,
                           config.seed)
    bases = {"lora": copy.deepcopy(base),
             "qlora (4-bit)": quantize_llama(base, "gptq", 4,
                                             config.group_size,
                                             calibration)[0]}
    runs = {}
    for name, model in bases.items():
        add_lora(model, config.lora_rank, config.lora_alpha)
        run = {"trainable": trainable_parameters(model),
               "parameters": sum(p.numel() for p in model.parameters()),
               "base_bytes": model_bytes(model)}
        run["prospero_before"], run["other_before"] = losses(model)
        t0 = time.perf_counter()
        run["train_loss"] = lora_finetune(
            model, voice_train, config.lora_steps, config.lora_batch, T,
            config.lora_lr, config.seed)
        run["seconds"] = time.perf_counter() - t0
        run["prospero_after"], run["other_after"] = losses(model)
        if name == "lora":
            for m in model.modules():
                if isinstance(m, LoRALinear):
                    m.merge()
            run["prospero_merged"] = losses(model)[0]
        runs[name] = run
    return {"rank": config.lora_rank, "alpha": config.lora_alpha,
            "steps": config.lora_steps, "batch": config.lora_batch,
            "block": T, "lr": config.lora_lr,
            "character": config.character,
            "train_chars": len(voice_train), "held_chars": len(voice_held),
            "runs": runs}


def full_run(device: str | None = None, part: str = "llama",
             **overrides) -> dict:
    """One part of the chapter's measurements, as a JSON-able record.
    overrides: fields of CompressionConfig (lora_steps=20, seeds=2).
    The LLaMA parts measure CPU speed and run on the CPU; the CNN part
    trains on `device`."""
    if part not in FULL_RUN_PARTS:
        raise ValueError(f"part must be one of {FULL_RUN_PARTS}, "
                         f"got {part!r}")
    config = override_config(CompressionConfig(), overrides)
    t0 = time.perf_counter()
    if part == "llama":
        record = _run_llama(config)
    elif part == "cnn":
        record = _run_cnn(config, pick_device(device))
    else:
        record = _run_lora(config)
    record["config"] = dataclasses.asdict(config)
    record["seconds"] = time.perf_counter() - t0
    return record
