# Generated from docs/classical/cnn.md by `python -m cave.book tangle`.
# Do not edit: edit the chapter, then regenerate. CI fails on drift.


# § Convolutional networks (docs/classical/cnn.md:24)
"""Convolutional networks: convolution, pooling and batch norm from scratch.

The chapter docs/classical/cnn.md builds, in order:

    im2col, unfold          patches as columns; unfold equals F.unfold
    conv2d, Conv2d          convolution by one matrix product, equal to
                            F.conv2d and nn.Conv2d (stride, padding,
                            dilation, groups)
    max_pool2d, avg_pool2d  pooling, equal to F.max_pool2d, F.avg_pool2d
    MaxPool2d, AvgPool2d    their modules
    BatchNorm2d             batch norm over channels, = nn.BatchNorm2d
    receptive_field         how much of the input one unit can see
    ResidualBlock, ResNet   a small ResNet configured by ResNetConfig
    LeNet5                  LeCun et al.'s network of 1998, rebuilt
    full_run                the recipe on the book's MNIST split, for
                            the ResNet and for LeNet-5: `cave run cnn
                            --full` writes both to _results/cnn.json
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from cave.fundamentals.checkpoints import override_config
from cave.fundamentals.data import mnist_split
from cave.fundamentals.deep_networks import BatchNorm1d, TrainConfig, train
from cave.fundamentals.essentials import pick_device, seed_everything


# § im2col: a convolution is one matrix product (docs/classical/cnn.md:173)
def _pair(value, name: str, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, as the pair (height, width), checked."""
    pair = (value, value) if isinstance(value, int) else value
    if (not isinstance(pair, (tuple, list)) or len(pair) != 2
            or not all(isinstance(v, int) for v in pair)):
        raise TypeError(f"{name} must be an int or a pair of ints, "
                        f"got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return tuple(pair)


def conv_output_size(size: int, kernel: int, stride: int = 1,
                     padding: int = 0, dilation: int = 1) -> int:
    """floor((size + 2 padding - dilation (kernel - 1) - 1) / stride) + 1"""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def im2col(x: torch.Tensor, kernel_size, stride=1, padding=0, dilation=1,
           pad_value: float = 0.0):
    """Every patch of x (N, C, H, W) as a column: (C * kh * kw, N * L).

    Row c * kh * kw + u * kw + v holds channel c at kernel tap (u, v);
    column n * L + i * Wo + j is image n's patch for output (i, j), with
    L = Ho * Wo. Returns the columns and (Ho, Wo).
    """
    if x.ndim != 4:
        raise ValueError(f"expected input of shape (N, C, H, W), got "
                         f"{tuple(x.shape)}")
    kh, kw = _pair(kernel_size, "kernel_size", 1)
    sh, sw = _pair(stride, "stride", 1)
    ph, pw = _pair(padding, "padding", 0)
    dh, dw = _pair(dilation, "dilation", 1)
    N, C, H, W = x.shape
    span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1  # dilated kernel
    if span_h > H + 2 * ph or span_w > W + 2 * pw:
        raise ValueError(
            f"kernel {kh}x{kw} with dilation {(dh, dw)} spans "
            f"{span_h}x{span_w}, larger than the padded input "
            f"{H + 2 * ph}x{W + 2 * pw} (input {H}x{W}, padding "
            f"{(ph, pw)})")
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph), value=pad_value)  # (N, C, H+2p, W+2p)
    windows = x.unfold(2, span_h, sh).unfold(3, span_w, sw)  # a view:
    # (N, C, Ho, Wo, span_h, span_w)
    patches = windows[..., ::dh, ::dw]  # (N, C, Ho, Wo, kh, kw) dilation
    Ho, Wo = patches.shape[2], patches.shape[3]
    columns = patches.permute(1, 4, 5, 0, 2, 3)  # (C, kh, kw, N, Ho, Wo)
    return columns.reshape(C * kh * kw, N * Ho * Wo), (Ho, Wo)  # copies


def unfold(x: torch.Tensor, kernel_size, dilation=1, padding=0,
           stride=1) -> torch.Tensor:
    """im2col in F.unfold's layout and argument order: (N, C*kh*kw, L)."""
    columns, (Ho, Wo) = im2col(x, kernel_size, stride, padding, dilation)
    return columns.view(len(columns), len(x), Ho * Wo).transpose(0, 1)


# § The convolution (docs/classical/cnn.md:266)
def conv2d(x: torch.Tensor, weight: torch.Tensor,
           bias: torch.Tensor | None = None, stride=1, padding=0,
           dilation=1, groups: int = 1) -> torch.Tensor:
    """2-D convolution by im2col and one (batched) matrix product.

    x (N, C, H, W), weight (O, C / groups, kh, kw), bias (O,) or None;
    stride, padding and dilation are ints or (height, width) pairs.
    Returns (N, O, Ho, Wo). Equal to F.conv2d in values and gradients.
    """
    if x.ndim != 4:
        raise ValueError(f"conv2d expected input of shape (N, C, H, W), "
                         f"got {tuple(x.shape)}")
    if weight.ndim != 4:
        raise ValueError(f"conv2d expected weight of shape (out_channels, "
                         f"in_channels / groups, kh, kw), got "
                         f"{tuple(weight.shape)}")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    N, C, H, W = x.shape
    O, Cg, kh, kw = weight.shape
    if Cg * groups != C:
        raise ValueError(
            f"conv2d expected input with {Cg * groups} channels (weight "
            f"{tuple(weight.shape)}, groups={groups}), got {C} channels "
            f"in input of shape {tuple(x.shape)}")
    if O % groups:
        raise ValueError(f"groups={groups} must divide out_channels={O} "
                         f"(weight {tuple(weight.shape)})")
    if bias is not None and tuple(bias.shape) != (O,):
        raise ValueError(f"conv2d expected bias of shape ({O},), got "
                         f"{tuple(bias.shape)}")
    columns, (Ho, Wo) = im2col(x, (kh, kw), stride, padding, dilation)
    G, K = groups, Cg * kh * kw  # K: the length of one patch per group
    y = weight.reshape(G, O // G, K) @ columns.view(G, K, N * Ho * Wo)
    # (G, O / G, N * L): group k's filters times group k's rows
    y = y.view(O, N, Ho, Wo).transpose(0, 1).contiguous()  # (N, O, Ho, Wo)
    if bias is not None:
        y = y + bias.view(1, O, 1, 1)  # one bias per output channel
    return y


# § The layer (docs/classical/cnn.md:353)
class Conv2d(nn.Module):
    """A convolutional layer on conv2d; interchangeable with nn.Conv2d."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size,
                 stride=1, padding=0, dilation=1, groups: int = 1,
                 bias: bool = True):
        super().__init__()
        if min(in_channels, out_channels, groups) < 1:
            raise ValueError(f"in_channels, out_channels and groups must be"
                             f" >= 1, got {in_channels}, {out_channels} "
                             f"and {groups}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"groups={groups} must divide in_channels={in_channels} "
                f"and out_channels={out_channels}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size, "kernel_size", 1)
        self.stride = _pair(stride, "stride", 1)
        self.padding = _pair(padding, "padding", 0)
        self.dilation = _pair(dilation, "dilation", 1)
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(  # (O, C / groups, kh, kw)
            out_channels, in_channels // groups, *self.kernel_size))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels))  # (O,)
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """nn.Conv2d's default: U(-1/sqrt(n), 1/sqrt(n)), n = fan-in."""
        bound = 1.0 / math.sqrt(self.weight[0].numel())
        self.weight.uniform_(-bound, bound)
        if self.bias is not None:
            self.bias.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv2d(x, self.weight, self.bias, self.stride, self.padding,
                      self.dilation, self.groups)  # (N, O, Ho, Wo)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, bias={self.bias is not None}")


# § Pooling (docs/classical/cnn.md:458)
def _pool_windows(x: torch.Tensor, kernel_size, stride, padding,
                  dilation, pad_value: float, name: str):
    """Each channel's windows as columns: (kh * kw, N * C * L), (Ho, Wo)."""
    if x.ndim != 4:
        raise ValueError(f"{name} expected input of shape (N, C, H, W), "
                         f"got {tuple(x.shape)}")
    kh, kw = _pair(kernel_size, "kernel_size", 1)
    stride = (kh, kw) if stride is None else stride  # default: the kernel
    ph, pw = _pair(padding, "padding", 0)
    dh, dw = _pair(dilation, "dilation", 1)
    if ph > kh // 2 or pw > kw // 2:  # PyTorch's rule, dilation or not
        raise ValueError(
            f"{name}: padding {(ph, pw)} must be at most half the kernel "
            f"{(kh, kw)}, or a window could hold only padding")
    N, C, H, W = x.shape
    channels = x.reshape(N * C, 1, H, W)  # every channel on its own
    return im2col(channels, (kh, kw), stride, (ph, pw), (dh, dw), pad_value)


def max_pool2d(x: torch.Tensor, kernel_size, stride=None, padding=0,
               dilation=1) -> torch.Tensor:
    """The largest value of each window; equal to F.max_pool2d."""
    windows, (Ho, Wo) = _pool_windows(x, kernel_size, stride, padding,
                                      dilation, -math.inf, "max_pool2d")
    N, C = x.shape[:2]
    return windows.amax(dim=0).view(N, C, Ho, Wo)  # (N, C, Ho, Wo)


def avg_pool2d(x: torch.Tensor, kernel_size, stride=None, padding=0,
               count_include_pad: bool = True) -> torch.Tensor:
    """The mean of each window; equal to F.avg_pool2d."""
    windows, (Ho, Wo) = _pool_windows(x, kernel_size, stride, padding, 1,
                                      0.0, "avg_pool2d")
    N, C, H, W = x.shape
    total = windows.sum(dim=0).view(N, C, Ho, Wo)  # (N, C, Ho, Wo)
    if count_include_pad:
        return total / windows.shape[0]  # divide by kh * kw
    ones = torch.ones(1, 1, H, W, dtype=x.dtype, device=x.device)
    real = _pool_windows(ones, kernel_size, stride, padding, 1, 0.0,
                         "avg_pool2d")[0].sum(dim=0)  # (Ho * Wo,)
    return total / real.view(1, 1, Ho, Wo)  # pixels that are not padding


class MaxPool2d(nn.Module):
    def __init__(self, kernel_size, stride=None, padding=0, dilation=1):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride
        self.padding, self.dilation = padding, dilation
        _pair(kernel_size, "kernel_size", 1)  # fail here, not on first use

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return max_pool2d(x, self.kernel_size, self.stride, self.padding,
                          self.dilation)

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}")


class AvgPool2d(nn.Module):
    def __init__(self, kernel_size, stride=None, padding=0,
                 count_include_pad: bool = True):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride
        self.padding, self.count_include_pad = padding, count_include_pad
        _pair(kernel_size, "kernel_size", 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return avg_pool2d(x, self.kernel_size, self.stride, self.padding,
                          self.count_include_pad)

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, "
                f"count_include_pad={self.count_include_pad}")


# § Batch normalisation for images (docs/classical/cnn.md:596)
class BatchNorm2d(BatchNorm1d):
    """Batch norm of (N, C, H, W): statistics per channel over N, H, W.

    Same parameters, buffers and results as torch.nn.BatchNorm2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.num_features:
            raise ValueError(
                f"BatchNorm2d expected input of shape (N, "
                f"{self.num_features}, H, W), got {tuple(x.shape)}")
        N, C, H, W = x.shape
        y = super().forward(x.reshape(N, C, H * W))  # (N, C, H * W)
        return y.view(N, C, H, W)


# § Receptive fields (docs/classical/cnn.md:666)
def receptive_field(layers) -> list[tuple[int, int]]:
    """(size, jump) after each layer of a chain of (kernel, stride,
    dilation) triples, the input's side first: r += (k - 1) d j; j *= s."""
    size, jump, fields = 1, 1, []
    for kernel, stride, dilation in layers:
        size += (kernel - 1) * dilation * jump
        jump *= stride
        fields.append((size, jump))
    return fields


# § Residual blocks (docs/classical/cnn.md:767)
class ResidualBlock(nn.Module):
    """Two 3x3 convolutions, each with batch norm, and a shortcut.

    y = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)). The shortcut
    is the identity when shapes agree, else a strided 1x1 convolution with
    batch norm. residual=False drops it: the plain block of equal depth.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1,
                 residual: bool = True, batch_norm: bool = True):
        super().__init__()
        norm = BatchNorm2d if batch_norm else (lambda channels: nn.Identity())
        # a convolution followed by batch norm needs no bias: beta is one
        self.conv1 = Conv2d(in_channels, out_channels, 3, stride, 1,
                            bias=not batch_norm)
        self.bn1 = norm(out_channels)
        self.conv2 = Conv2d(out_channels, out_channels, 3, 1, 1,
                            bias=not batch_norm)
        self.bn2 = norm(out_channels)
        self.residual = residual
        if residual and (stride != 1 or in_channels != out_channels):
            self.shortcut = nn.Sequential(  # projection: match the shape
                Conv2d(in_channels, out_channels, 1, stride,
                       bias=not batch_norm),
                norm(out_channels))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))  # (N, out, H / s, W / s)
        h = self.bn2(self.conv2(h))  # (N, out, H / s, W / s)
        if self.residual:
            h = h + self.shortcut(x)  # the skip: y = F(x) + x
        return F.relu(h)


# § A small ResNet (docs/classical/cnn.md:823)
@dataclasses.dataclass
class ResNetConfig:
    in_channels: int = 1  # MNIST digits are grey
    classes: int = 10  # the digits 0 to 9
    stem_channels: int = 32  # 32 edge-and-stroke detectors to start with
    stem_kernel: int = 5  # one input channel makes a large kernel cheap,
    # and 5x5 filters are large enough to look at afterwards
    stem_pool: bool = True  # 2x2 max pool, 28x28 -> 14x14: every later
    # layer costs a quarter as much; without it training took 3x longer
    widths: tuple[int, ...] = (32, 64, 128)  # channels of each stage; each
    # stage after the first halves the resolution: 14x14, 7x7, 4x4
    blocks: tuple[int, ...] = (1, 1, 1)  # residual blocks per stage: 7
    # convolutions deep; (2, 2, 2) gained about 0.1 % for twice the work
    residual: bool = True  # False: the plain network of the same depth
    batch_norm: bool = True  # False: convolutions with biases, no norm
    dropout: float = 0.0  # before the head; 0.2 scored the same as none
    # over three seeds: shifts and label smoothing regularise enough
    input_mean: float = 0.1307  # MNIST's pixel mean and standard deviation
    input_std: float = 0.3081  # (recomputed in the deep networks chapter)


class ResNet(nn.Module):
    """Stem, stages of ResidualBlocks, global average pool, linear head.

    Takes float pixels in [0, 1], (B, H, W) or (B, C, H, W); returns class
    logits (B, classes).
    """

    def __init__(self, config: ResNetConfig = ResNetConfig()):
        super().__init__()
        if len(config.widths) != len(config.blocks) or not config.widths:
            raise ValueError(f"widths and blocks must have one entry per "
                             f"stage, got {config.widths} and "
                             f"{config.blocks}")
        self.config = config
        norm = BatchNorm2d if config.batch_norm else (lambda c: nn.Identity())
        stem = [Conv2d(config.in_channels, config.stem_channels,
                       config.stem_kernel, padding=config.stem_kernel // 2,
                       bias=not config.batch_norm),
                norm(config.stem_channels), nn.ReLU()]
        if config.stem_pool:
            stem.append(MaxPool2d(2))
        self.stem = nn.Sequential(*stem)
        stages, width = [], config.stem_channels
        for i, (out, count) in enumerate(zip(config.widths, config.blocks)):
            blocks = []
            for k in range(count):
                stride = 2 if (i > 0 and k == 0) else 1  # halve at entry
                blocks.append(ResidualBlock(width, out, stride,
                                            config.residual,
                                            config.batch_norm))
                width = out
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(width, config.classes)
        self.reset_parameters()

    @property
    def depth(self) -> int:
        """Convolutions on the longest path: the stem and two per block."""
        return 1 + 2 * sum(self.config.blocks)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Kaiming-normal convolutions, matched to the ReLUs after them."""
        for module in self.modules():
            if isinstance(module, Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                if module.bias is not None:
                    module.bias.zero_()

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The stem's output and each stage's, (B, C_i, H_i, W_i)."""
        if not x.is_floating_point():
            raise TypeError(f"ResNet expected float pixels in [0, 1], got "
                            f"{x.dtype}; convert with x.float() / 255")
        if x.ndim == 3:
            x = x.unsqueeze(1)  # (B, 1, H, W)
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"ResNet expected input of shape (B, "
                f"{self.config.in_channels}, H, W) or (B, H, W), got "
                f"{tuple(x.shape)}")
        x = (x - self.config.input_mean) / self.config.input_std
        maps = [self.stem(x)]  # (B, stem_channels, H / 2, W / 2)
        for stage in self.stages:
            maps.append(stage(maps[-1]))  # (B, width, H_i, W_i)
        return maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.feature_maps(x)[-1]  # (B, C, h, w)
        h = h.mean(dim=(2, 3))  # (B, C) global average pooling
        return self.head(self.dropout(h))  # (B, classes)


# § Training on MNIST (docs/classical/cnn.md:1066)
RECIPE = TrainConfig(
    epochs=15,  # 20 gained about 0.1 % (2 digits) for a third more time
    batch_size=128,  # 63 steps an epoch; batch norm wants >= 32
    lr=3e-3,  # peak; 1e-2 also worked, but its early epochs were erratic
    label_smoothing=0.1,  # the largest gain we found, on every seed
    max_shift=2,  # random shifts: the cheapest cure for 8,000 digits
    bf16=True,  # matrix products in bfloat16: faster where the hardware
    # has bf16 units; the essentials chapter (section 19) times it
)


# § The full run (docs/classical/cnn.md:1125)
FULL_RUN_PARTS = ("resnet", "lenet")


def full_run(device: str | None = None, part: str = "resnet",
             **overrides) -> dict:
    """Train the recipe on the book's MNIST split; return its record.

    part "resnet" trains ResNet(), part "lenet" LeNet5(). overrides:
    fields of TrainConfig (epochs=1, seed=1). The record holds the
    history, the configurations, the device, the parameter count and (for
    the ResNet) the trained stem's filters; the caller writes it.
    """
    if part not in FULL_RUN_PARTS:
        raise ValueError(f"part must be one of {FULL_RUN_PARTS}, "
                         f"got {part!r}")
    config = override_config(dataclasses.replace(RECIPE, device=device),
                             overrides)
    train_data, val_data = mnist_split(seed=0)
    seed_everything(config.seed)
    model = ResNet() if part == "resnet" else LeNet5()
    history = train(model, train_data, val_data, config)
    record = {
        "best_val_acc": history.best_val_acc,
        "best_epoch": history.best_epoch + 1,  # 1-based, as printed
        "seconds": history.seconds[-1],
        "device": str(pick_device(config.device)),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train": dataclasses.asdict(config),
        "history": dataclasses.asdict(history),
    }
    if part == "resnet":
        filters = model.stem[0].weight.detach().float().cpu()  # (C,1,k,k)
        record["model"] = dataclasses.asdict(model.config)
        record["stem_filters"] = [[round(v, 5) for v in f.flatten().tolist()]
                                  for f in filters]  # the chapter's figure
    return record


# § Then and now: the perceptron, LeNet-5 and the ResNet (docs/classical/cnn.md:1235)
class ScaledTanh(nn.Module):
    """LeCun's squashing function, 1.7159 tanh(2x / 3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1.7159 * torch.tanh(2.0 / 3.0 * x)


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al., 1998) with full C3 connections, average
    pooling and a linear output. Takes float pixels in [0, 1], (B, 28, 28)
    or (B, 1, 28, 28); returns class logits (B, classes)."""

    def __init__(self, classes: int = 10, input_mean: float = 0.1307,
                 input_std: float = 0.3081):
        super().__init__()
        self.input_mean, self.input_std = input_mean, input_std
        self.features = nn.Sequential(
            Conv2d(1, 6, 5, padding=2), ScaledTanh(),  # C1 (B, 6, 28, 28)
            AvgPool2d(2),  # S2 (B, 6, 14, 14)
            Conv2d(6, 16, 5), ScaledTanh(),  # C3 (B, 16, 10, 10)
            AvgPool2d(2),  # S4 (B, 16, 5, 5)
            Conv2d(16, 120, 5), ScaledTanh())  # C5 (B, 120, 1, 1)
        self.classifier = nn.Sequential(
            nn.Linear(120, 84), ScaledTanh(),  # F6 (B, 84)
            nn.Linear(84, classes))  # (B, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            raise TypeError(f"LeNet5 expected float pixels in [0, 1], got "
                            f"{x.dtype}; convert with x.float() / 255")
        if x.ndim == 3:
            x = x.unsqueeze(1)  # (B, 1, H, W)
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, 28, 28):
            raise ValueError(f"LeNet5 expected input of shape (B, 1, 28, 28)"
                             f" or (B, 28, 28), got {tuple(x.shape)}")
        x = (x - self.input_mean) / self.input_std
        return self.classifier(self.features(x).flatten(1))  # (B, classes)
