# Generated from docs/frontiers/text_to_image.md by `python -m cave.book tangle`.
# Do not edit: edit the chapter, then regenerate. CI fails on drift.


# § Text to image: diffusion (docs/frontiers/text_to_image.md:38)
"""Text to image: a diffusion model that draws digits from captions.

The chapter docs/frontiers/text_to_image.md builds, in order:

    linear_betas, cosine_betas  the noise schedules, equal to diffusers'
    NoiseSchedule     alphas, their products, add_noise (the forward
                      process), equal to DDPMScheduler's
    diffusion_loss    the noise-prediction or velocity objective
    CrossAttention    queries from pixels, keys and values from tokens of
                      another width; equal to nn.MultiheadAttention(kdim,
                      vdim)
    UNet, UNetConfig  a small U-Net: time embedding, residual blocks,
                      cross-attention at the low resolutions
    TextToImage       the CLIP chapter's TextEncoder and the U-Net
    ddpm_step, ddim_step, sample   the samplers, equal to DDPMScheduler's
                      and DDIMScheduler's steps
    guided            classifier-free guidance
    full_run          the classifier, the diffusion model, the evaluation:
                      `cave run text_to_image --full`
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cave.classical.cnn import RECIPE, LeNet5
from cave.frontiers.clip import (NAMES, TRAIN_TEMPLATES, CaptionTokenizer,
                                 TextConfig, TextEncoder, captions_for)
from cave.fundamentals.checkpoints import (load_safetensors,
                                           override_config,
                                           save_safetensors)
from cave.fundamentals.data import RESULTS_DIR, mnist_split
from cave.fundamentals.deep_networks import evaluate, train
from cave.fundamentals.essentials import (attention_weights, eval_mode,
                                          pick_device, seed_everything)


# § The forward process: noise on a schedule (docs/frontiers/text_to_image.md:129)
def linear_betas(steps: int = 1000, start: float = 1e-4,
                 end: float = 0.02) -> Tensor:
    """Ho et al.'s schedule: beta rising linearly, (steps,) float32."""
    return torch.linspace(start, end, steps, dtype=torch.float32)


def cosine_betas(steps: int = 1000, max_beta: float = 0.999,
                 offset: float = 0.008) -> Tensor:
    """Nichol and Dhariwal's: alpha_bar(t) = cos^2((t/T + s)/(1 + s) pi/2),
    and beta_t = 1 - alpha_bar(t) / alpha_bar(t - 1), capped at max_beta."""
    t = torch.arange(steps + 1, dtype=torch.float64) / steps  # (T + 1,)
    alpha_bar = torch.cos((t + offset) / (1 + offset) * math.pi / 2) ** 2
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]  # (T,)
    return betas.clamp(max=max_beta).float()


SCHEDULES = {"linear": linear_betas, "cosine": cosine_betas}


class NoiseSchedule:
    """The fixed quantities of a diffusion process, and its forward step.

    betas (T,); alphas = 1 - betas; alphas_cumprod (T,): alpha_bar_t.
    add_noise(x0, noise, t) = sqrt(alpha_bar_t) x0 + sqrt(1 -
    alpha_bar_t) noise, per image t (B,).
    """

    def __init__(self, betas: Tensor):
        if betas.ndim != 1 or not len(betas):
            raise ValueError(f"betas must be a non-empty (T,) tensor, got "
                             f"shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError(f"every beta must lie in (0, 1), got "
                             f"{betas.min().item()} to {betas.max().item()}")
        self.betas = betas.float()  # (T,)
        self.alphas = 1.0 - self.betas  # (T,)
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # (T,)
        self.steps = len(betas)

    @classmethod
    def make(cls, kind: str = "linear", steps: int = 1000) -> NoiseSchedule:
        if kind not in SCHEDULES:
            raise ValueError(f"kind must be one of {sorted(SCHEDULES)}, "
                             f"got {kind!r}")
        return cls(SCHEDULES[kind](steps))

    def _at(self, t: Tensor, like: Tensor) -> Tensor:
        """alpha_bar at each image's step, shaped to broadcast like x."""
        t = torch.as_tensor(t, device=like.device)
        if t.is_floating_point() or (t.numel() and not (
                0 <= int(t.min()) <= int(t.max()) < self.steps)):
            raise ValueError(f"steps t must be integers in [0, "
                             f"{self.steps}), got {t.tolist()}")
        a = self.alphas_cumprod.to(like.device, like.dtype)[t]  # (B,)
        return a.reshape(-1, *[1] * (like.ndim - 1))  # (B, 1, 1, 1)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise."""
        if noise.shape != x0.shape:
            raise ValueError(f"noise must have x0's shape "
                             f"{tuple(x0.shape)}, got {tuple(noise.shape)}")
        a = self._at(t, x0)  # (B, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise  # (B, C, H, W)

    def velocity(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """v = sqrt(alpha_bar_t) noise - sqrt(1 - alpha_bar_t) x0."""
        a = self._at(t, x0)  # (B, 1, 1, 1)
        return a.sqrt() * noise - (1 - a).sqrt() * x0  # (B, C, H, W)


# § What the network learns: the noise (docs/frontiers/text_to_image.md:291)
PREDICTIONS = ("epsilon", "v_prediction")  # diffusers' names


def check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got "
                         f"{prediction!r}")


def split_prediction(output: Tensor, x_t: Tensor, alpha_bar: Tensor,
                     prediction: str = "epsilon") -> tuple[Tensor, Tensor]:
    """The network's output as (x0_hat, eps_hat), for either target."""
    check_prediction(prediction)
    a, s = alpha_bar ** 0.5, (1 - alpha_bar) ** 0.5
    if prediction == "epsilon":
        return (x_t - s * output) / a, output
    return a * x_t - s * output, a * output + s * x_t  # from v


def diffusion_loss(model: Callable[..., Tensor], x0: Tensor,
                   schedule: NoiseSchedule, *conditioning,
                   prediction: str = "epsilon",
                   generator: torch.Generator | None = None) -> Tensor:
    """L_simple: a random step and noise per image; the mean squared
    error between the model's output and the noise (or the velocity).

    model(x_t (B, C, H, W), t (B,), *conditioning) -> (B, C, H, W).
    """
    check_prediction(prediction)
    B = x0.shape[0]
    t = torch.randint(0, schedule.steps, (B,), generator=generator
                      ).to(x0.device)  # (B,) a step per image
    noise = torch.randn(x0.shape, generator=generator).to(x0)  # (B,C,H,W)
    x_t = schedule.add_noise(x0, noise, t)  # (B, C, H, W)
    target = (noise if prediction == "epsilon"
              else schedule.velocity(x0, noise, t))  # (B, C, H, W)
    output = model(x_t, t, *conditioning)  # (B, C, H, W)
    return F.mse_loss(output.float(), target)


# § Cross-attention: pixels read the caption (docs/frontiers/text_to_image.md:378)
class CrossAttention(nn.Module):
    """Multi-head attention from queries x (B, N, dim) to a context
    (B, L, context_dim), with context_mask (B, L) True at real tokens.

    Returns (B, N, dim). Same parameters and outputs as
    nn.MultiheadAttention(dim, heads, kdim=context_dim,
    vdim=context_dim, batch_first=True) with key_padding_mask = ~mask.
    """

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads must divide dim: got dim={dim}, "
                             f"heads={heads}")
        self.dim, self.context_dim, self.heads = dim, context_dim, heads
        self.q_proj = nn.Linear(dim, dim)  # (C -> C)
        self.k_proj = nn.Linear(context_dim, dim)  # (D -> C)
        self.v_proj = nn.Linear(context_dim, dim)  # (D -> C)
        self.out_proj = nn.Linear(dim, dim)
        self.record_weights = False
        self.weights: Tensor | None = None  # (B, heads, N, L) when recorded

    def forward(self, x: Tensor, context: Tensor,
                context_mask: Tensor | None = None) -> Tensor:
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be (B, N, dim={self.dim}), got "
                             f"{tuple(x.shape)}")
        B, N, C = x.shape
        if (context.ndim != 3 or context.shape[0] != B
                or context.shape[-1] != self.context_dim):
            raise ValueError(f"context must be (B={B}, L, context_dim="
                             f"{self.context_dim}), got "
                             f"{tuple(context.shape)}")
        L, h = context.shape[1], self.heads
        mask = None
        if context_mask is not None:
            if (context_mask.shape != (B, L)
                    or context_mask.dtype != torch.bool):
                raise ValueError(f"context_mask must be bool (B, L) = "
                                 f"{(B, L)}, True at real tokens; got "
                                 f"{context_mask.dtype} "
                                 f"{tuple(context_mask.shape)}")
            mask = context_mask[:, None, None, :]  # (B, 1, 1, L)
        q = self.q_proj(x).view(B, N, h, -1).transpose(1, 2)  # (B,h,N,d)
        k = self.k_proj(context).view(B, L, h, -1).transpose(1, 2)  # (B,h,L,d)
        v = self.v_proj(context).view(B, L, h, -1).transpose(1, 2)  # (B,h,L,d)
        if self.record_weights:  # the readable path, kept for the maps
            weights = attention_weights(q, k, mask)  # (B, h, N, L)
            self.weights = weights.detach()
            out = weights @ v  # (B, h, N, d)
        else:  # PyTorch's fused kernel, the same arithmetic
            out = F.scaled_dot_product_attention(q, k, v, mask)  # (B,h,N,d)
        out = out.transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        return self.out_proj(out)  # (B, N, C)


@torch.no_grad()
def load_multihead_attention(ours: CrossAttention,
                             theirs: nn.MultiheadAttention) -> None:
    """Copy an nn.MultiheadAttention(dim, heads, kdim, vdim) into ours."""
    if theirs._qkv_same_embed_dim:
        raise ValueError("expected separate q, k, v projections: build "
                         "nn.MultiheadAttention with kdim and vdim != dim")
    sizes = (theirs.embed_dim, theirs.kdim, theirs.vdim, theirs.num_heads)
    wanted = (ours.dim, ours.context_dim, ours.context_dim, ours.heads)
    if sizes != wanted:
        raise ValueError(f"expected (embed_dim, kdim, vdim, num_heads) = "
                         f"{wanted}, got {sizes}")
    ours.q_proj.weight.copy_(theirs.q_proj_weight)  # (C, C)
    ours.k_proj.weight.copy_(theirs.k_proj_weight)  # (C, D)
    ours.v_proj.weight.copy_(theirs.v_proj_weight)  # (C, D)
    for lin, b in zip((ours.q_proj, ours.k_proj, ours.v_proj),
                      theirs.in_proj_bias.chunk(3)):
        lin.bias.copy_(b)  # (C,) each
    ours.out_proj.load_state_dict(theirs.out_proj.state_dict())


# § A small U-Net (docs/frontiers/text_to_image.md:506)
@dataclasses.dataclass
class UNetConfig:
    image_size: int = 28  # MNIST
    in_channels: int = 1  # grey
    channels: tuple[int, ...] = (16, 32, 64)  # at 28x28, 14x14, 7x7;
    # (32, 64, 64) took 1.55x the CPU time a step: spent on steps instead
    attention: tuple[bool, ...] = (False, True, True)  # cross-attention
    # where a position sees enough of the digit to decide what to draw
    heads: int = 4  # 8 channels a head at 14x14, 16 at 7x7
    context_dim: int = 64  # the text encoder's width D
    time_dim: int = 128  # the step embedding's width after its MLP
    groups: int = 8  # group norm: 8 groups of 2 to 8 channels

    def __post_init__(self):
        if len(self.channels) != len(self.attention) or not self.channels:
            raise ValueError(f"channels and attention need one entry per "
                             f"level, got {self.channels} and "
                             f"{self.attention}")
        bad = [c for c in self.channels if c % self.groups or c % self.heads]
        if bad:
            raise ValueError(f"groups={self.groups} and heads={self.heads} "
                             f"must divide every width, got {bad}")


def step_embedding(t: Tensor, dim: int) -> Tensor:
    """sin and cos of t at dim / 2 frequencies from 1 to 1/10000: (B, dim),
    the Transformer's positional encoding, of the diffusion step."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(
        half, device=t.device) / half)  # (dim / 2,)
    angles = t.float()[:, None] * freqs[None, :]  # (B, dim / 2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)  # (B, dim)


class ResBlock(nn.Module):
    """norm, SiLU, conv; add the step's embedding; norm, SiLU, conv; plus
    the input (a 1x1 convolution when the width changes)."""

    def __init__(self, c_in: int, c_out: int, time_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(time_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = (nn.Conv2d(c_in, c_out, 1) if c_in != c_out
                     else nn.Identity())

    def forward(self, x: Tensor, time: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, c_out, H, W)
        h = h + self.time(time)[:, :, None, None]  # per channel, per image
        h = self.conv2(F.silu(self.norm2(h)))  # (B, c_out, H, W)
        return self.skip(x) + h  # (B, c_out, H, W)


class CrossAttentionBlock(nn.Module):
    """Positions as tokens: x + CrossAttn(norm x, caption), then + FFN."""

    def __init__(self, channels: int, context_dim: int, heads: int,
                 groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.attn = CrossAttention(channels, context_dim, heads)
        self.norm2 = nn.LayerNorm(channels)
        self.ff = nn.Sequential(nn.Linear(channels, 2 * channels),
                                nn.GELU(), nn.Linear(2 * channels, channels))

    def forward(self, x: Tensor, context: Tensor,
                context_mask: Tensor) -> Tensor:
        B, C, H, W = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        tokens = tokens + self.attn(h, context, context_mask)  # (B, HW, C)
        tokens = tokens + self.ff(self.norm2(tokens))  # (B, HW, C)
        return tokens.transpose(1, 2).reshape(B, C, H, W)


class UNet(nn.Module):
    """eps_theta(x_t, t, context, context_mask): (B, C, H, W) -> same.

    x_t (B, C, H, W); t (B,) integer steps; context (B, L, context_dim)
    token states; context_mask (B, L) True at real tokens.
    """

    def __init__(self, config: UNetConfig = UNetConfig()):
        super().__init__()
        c = self.config = config
        ch, g, td = c.channels, c.groups, c.time_dim
        self.time_mlp = nn.Sequential(nn.Linear(td // 4, td), nn.SiLU(),
                                      nn.Linear(td, td))  # 32 -> 128
        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)

        def attention(level: int, width: int):
            return (CrossAttentionBlock(width, c.context_dim, c.heads, g)
                    if c.attention[level] else None)

        self.down, self.down_attn, self.downsample = (
            nn.ModuleList(), nn.ModuleList(), nn.ModuleList())
        width = ch[0]
        for level, out in enumerate(ch):
            self.down.append(ResBlock(width, out, td, g))
            self.down_attn.append(attention(level, out))
            last = level == len(ch) - 1
            self.downsample.append(None if last else nn.Conv2d(
                out, out, 3, stride=2, padding=1))  # 28 -> 14 -> 7
            width = out
        self.mid = ResBlock(width, width, td, g)
        self.mid_attn = CrossAttentionBlock(width, c.context_dim, c.heads, g)
        self.mid2 = ResBlock(width, width, td, g)
        self.up, self.up_attn = nn.ModuleList(), nn.ModuleList()
        for level in reversed(range(len(ch))):  # input: + the skip's width
            self.up.append(ResBlock(width + ch[level], ch[level], td, g))
            self.up_attn.append(attention(level, ch[level]))
            width = ch[level]
        self.norm_out = nn.GroupNorm(g, width)
        self.conv_out = nn.Conv2d(width, c.in_channels, 3, padding=1)

    def cross_attentions(self) -> list[CrossAttention]:
        """Every CrossAttention, encoder to decoder (for the maps)."""
        return [m for m in self.modules() if isinstance(m, CrossAttention)]

    def forward(self, x: Tensor, t: Tensor, context: Tensor,
                context_mask: Tensor) -> Tensor:
        c = self.config
        if x.ndim != 4 or x.shape[1:] != (c.in_channels, c.image_size,
                                          c.image_size):
            raise ValueError(f"UNet expected x of shape (B, "
                             f"{c.in_channels}, {c.image_size}, "
                             f"{c.image_size}), got {tuple(x.shape)}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must hold one step per image, (B,) = "
                             f"({x.shape[0]},), got {tuple(t.shape)}")
        time = self.time_mlp(step_embedding(t, c.time_dim // 4))  # (B,td)
        h = self.conv_in(x)  # (B, ch0, 28, 28)
        skips = []
        for block, attn, down in zip(self.down, self.down_attn,
                                     self.downsample):
            h = block(h, time)  # (B, ch_i, H_i, W_i)
            if attn is not None:
                h = attn(h, context, context_mask)
            skips.append(h)
            if down is not None:
                h = down(h)  # (B, ch_i, H_i / 2, W_i / 2), rounded up
        h = self.mid(h, time)  # (B, ch_last, 7, 7)
        h = self.mid2(self.mid_attn(h, context, context_mask), time)
        for block, attn in zip(self.up, self.up_attn):
            skip = skips.pop()  # the encoder's map at this resolution
            if h.shape[-2:] != skip.shape[-2:]:
                h = F.interpolate(h, size=skip.shape[-2:],
                                  mode="nearest")  # 7 -> 14 -> 28
            h = block(torch.cat([h, skip], dim=1), time)  # (B, ch_i, H, W)
            if attn is not None:
                h = attn(h, context, context_mask)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, C, 28, 28)


# § The caption encoder, and caption dropout (docs/frontiers/text_to_image.md:712)
def text_config(max_len: int = 12) -> TextConfig:
    """The CLIP chapter's text encoder, every field given explicitly."""
    words = CaptionTokenizer()
    return TextConfig(vocab_size=words.vocab_size, max_len=max_len, dim=64,
                      depth=2, heads=4, mlp_dim=128, dropout=0.0,
                      attention_dropout=0.0, layer_norm_eps=1e-5,
                      eos_id=words.eos_id)


@dataclasses.dataclass
class TextToImageConfig:
    unet: UNetConfig = dataclasses.field(default_factory=UNetConfig)
    text: TextConfig = dataclasses.field(default_factory=text_config)
    schedule: str = "linear"  # Ho et al.'s; "cosine" is the alternative
    steps: int = 1000  # T: the diffusion steps of training
    prediction: str = "epsilon"  # Ho et al.'s target; or "v_prediction"
    caption_dropout: float = 0.1  # the empty caption, one time in ten:
    # what classifier-free guidance needs (Ho & Salimans used 0.1 - 0.2)

    def __post_init__(self):
        check_prediction(self.prediction)
        if self.unet.context_dim != self.text.dim:
            raise ValueError(f"the U-Net's context_dim must equal the text "
                             f"encoder's dim: got {self.unet.context_dim} "
                             f"and {self.text.dim}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got "
                             f"{self.caption_dropout}")


class TextToImage(nn.Module):
    """The text encoder and the U-Net: forward(x_t, t, ids) -> eps or v.

    ids (B, L) from CaptionTokenizer.encode; padding is masked out.
    """

    def __init__(self, config: TextToImageConfig = TextToImageConfig()):
        super().__init__()
        self.config = config
        self.tokenizer = CaptionTokenizer(max_len=config.text.max_len)
        self.text = TextEncoder(config.text)
        self.unet = UNet(config.unet)
        self.schedule = NoiseSchedule.make(config.schedule, config.steps)

    def encode(self, captions: list[str]) -> Tensor:
        """Captions -> ids (B, L) on the model's device."""
        device = self.unet.conv_in.weight.device
        return self.tokenizer.encode(captions).to(device)

    def context(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        states, _ = self.text(ids)  # (B, L, D), pooled unused
        return states, ids != self.tokenizer.pad_id  # (B, L, D), (B, L)

    def forward(self, x_t: Tensor, t: Tensor, ids: Tensor) -> Tensor:
        context, mask = self.context(ids)
        return self.unet(x_t, t, context, mask)  # (B, C, H, W)

    def drop_captions(self, ids: Tensor,
                      generator: torch.Generator | None = None) -> Tensor:
        """A random caption_dropout of the rows become the empty caption."""
        empty = self.encode([""]).expand_as(ids)  # (B, L)
        drop = torch.rand(len(ids), generator=generator
                          ).to(ids.device) < self.config.caption_dropout
        return torch.where(drop[:, None], empty, ids)  # (B, L)

    def loss(self, images: Tensor, ids: Tensor,
             generator: torch.Generator | None = None) -> Tensor:
        """uint8 digits (B, 28, 28) and their captions' ids: L_simple."""
        x0 = images.float().unsqueeze(1) / 127.5 - 1  # (B, 1, 28, 28)
        return diffusion_loss(self, x0, self.schedule,
                              self.drop_captions(ids, generator),
                              prediction=self.config.prediction,
                              generator=generator)


# § Sampling: DDPM, and DDIM with fewer steps (docs/frontiers/text_to_image.md:871)
def sampling_steps(schedule: NoiseSchedule, n: int | None = None
                   ) -> list[int]:
    """n steps, 'leading' spacing: (n-1)k, ..., k, 0 with k = T // n."""
    n = schedule.steps if n is None else n
    if not 1 <= n <= schedule.steps:
        raise ValueError(f"n must be in [1, {schedule.steps}], got {n}")
    k = schedule.steps // n
    return [i * k for i in reversed(range(n))]


def _alpha_bars(schedule: NoiseSchedule, t: int, prev_t: int
                ) -> tuple[Tensor, Tensor]:
    a = schedule.alphas_cumprod[t]
    a_prev = (schedule.alphas_cumprod[prev_t] if prev_t >= 0
              else torch.tensor(1.0))  # before step 0: the clean image
    return a, a_prev


def ddpm_step(schedule: NoiseSchedule, output: Tensor, t: int,
              x_t: Tensor, prev_t: int | None = None,
              generator: torch.Generator | None = None,
              prediction: str = "epsilon", clip: bool = True) -> Tensor:
    """x_{t'}: the posterior mean at x0_hat, plus sqrt(beta_tilde) z.

    prev_t defaults to t - 1; z is drawn from generator only for t > 0.
    """
    prev_t = t - 1 if prev_t is None else prev_t
    a, a_prev = _alpha_bars(schedule, t, prev_t)
    beta = 1 - a / a_prev  # the jump's beta: beta_t when prev_t = t - 1
    x0, _ = split_prediction(output, x_t, a, prediction)
    if clip:
        x0 = x0.clamp(-1, 1)
    mean = ((a_prev ** 0.5 * beta / (1 - a)) * x0
            + ((1 - beta) ** 0.5 * (1 - a_prev) / (1 - a)) * x_t)
    if t == 0:
        return mean
    variance = ((1 - a_prev) / (1 - a) * beta).clamp(min=1e-20)
    z = torch.randn(x_t.shape, generator=generator, device=x_t.device,
                    dtype=x_t.dtype)
    return mean + variance ** 0.5 * z


def ddim_step(schedule: NoiseSchedule, output: Tensor, t: int,
              prev_t: int, x_t: Tensor, eta: float = 0.0,
              noise: Tensor | None = None, prediction: str = "epsilon",
              clip: bool = True, clipped_eps: bool = True) -> Tensor:
    """x_{t'} = sqrt(a') x0_hat + sqrt(1 - a' - sigma^2) eps_hat + sigma z.

    eta = 0: deterministic; eta > 0 needs the noise z (like x_t).
    clipped_eps: eps_hat re-derived from the clipped x0_hat, so that both
    describe the same x_t (diffusers' use_clipped_model_output=True).
    """
    a, a_prev = _alpha_bars(schedule, t, prev_t)
    x0, eps = split_prediction(output, x_t, a, prediction)
    if clip:
        x0 = x0.clamp(-1, 1)
        if clipped_eps:
            eps = (x_t - a ** 0.5 * x0) / (1 - a) ** 0.5
    sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5
    x = a_prev ** 0.5 * x0 + (1 - a_prev - sigma ** 2) ** 0.5 * eps
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs noise of x_t's "
                             f"shape {tuple(x_t.shape)}")
        x = x + sigma * noise
    return x


@torch.no_grad()
def sample(denoise: Callable[[Tensor, Tensor], Tensor],
           schedule: NoiseSchedule, shape: tuple[int, ...],
           steps: int | None = None, method: str = "ddim",
           generator: torch.Generator | None = None,
           prediction: str = "epsilon", trajectory: list | None = None,
           clipped_eps: bool = True) -> Tensor:
    """Draw x_T ~ N(0, I) and walk it back to x_0.

    denoise(x_t (B, C, H, W), t (B,)) -> the model's output. method
    "ddpm" (every step by default) or "ddim" (eta = 0, 50 steps by
    default). trajectory: a list to which (t, x_t, x0_hat) is appended
    before each step. clipped_eps: passed to ddim_step.
    """
    if method not in ("ddpm", "ddim"):
        raise ValueError(f"method must be 'ddpm' or 'ddim', got {method!r}")
    if steps is None:
        steps = schedule.steps if method == "ddpm" else 50
    x = torch.randn(shape, generator=generator)  # (B, C, H, W)
    times = sampling_steps(schedule, steps)
    for i, t in enumerate(times):
        prev_t = times[i + 1] if i + 1 < len(times) else -1
        output = denoise(x, torch.full((shape[0],), t, dtype=torch.long))
        output = output.float()
        if trajectory is not None:
            x0, _ = split_prediction(output, x, schedule.alphas_cumprod[t],
                                     prediction)
            trajectory.append((t, x.clone(), x0.clamp(-1, 1)))
        if method == "ddpm":
            x = ddpm_step(schedule, output, t, x, prev_t, generator,
                          prediction)
        else:
            x = ddim_step(schedule, output, t, prev_t, x,
                          prediction=prediction, clipped_eps=clipped_eps)
    return x


# § Classifier-free guidance (docs/frontiers/text_to_image.md:1035)
def guide(eps_cond: Tensor, eps_uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: eps_u + scale * (eps_c - eps_u)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def guided(model: TextToImage, ids: Tensor, scale: float
           ) -> Callable[[Tensor, Tensor], Tensor]:
    """denoise(x_t, t) for sample(): the captions ids (B, L), guided.

    scale 1: the conditional model alone (one call a step); otherwise
    one call on the batch doubled, captions then empty captions.
    """
    context, mask = model.context(ids)  # (B, L, D), (B, L)
    if scale == 1.0:
        return lambda x, t: model.unet(x, t, context, mask)
    empty, empty_mask = model.context(model.encode([""]).expand_as(ids))
    context2 = torch.cat([context, empty])  # (2B, L, D)
    mask2 = torch.cat([mask, empty_mask])  # (2B, L)

    def denoise(x: Tensor, t: Tensor) -> Tensor:
        out = model.unet(torch.cat([x, x]), torch.cat([t, t]), context2,
                         mask2)  # (2B, C, H, W)
        cond, uncond = out.chunk(2)  # (B, C, H, W) each
        return guide(cond, uncond, scale)

    return denoise


# § Training and measuring (docs/frontiers/text_to_image.md:1079)
@dataclasses.dataclass
class DiffusionTrainConfig:
    steps: int = 2400  # about 20 CPU-minutes on one thread (the record)
    batch_size: int = 64  # images per step
    lr: float = 2e-3  # peak; small models take large steps
    warmup: int = 200  # linear warm-up steps, then cosine to zero
    weight_decay: float = 0.0  # no gain seen in trials
    grad_clip: float = 1.0  # the loss is noisy: a few large batches
    ema: float = 0.998  # weights averaged over about 500 steps
    bf16: bool = True  # faster on a CPU with bf16 units; the loss and
    # the EMA stay in float32
    seed: int = 0
    device: str | None = None

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got "
                             f"{self.steps} and {self.batch_size}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {self.ema}")


def train_diffusion(model: TextToImage, images: Tensor, labels: Tensor,
                    config: DiffusionTrainConfig,
                    log: Callable[[int, float], None] | None = None
                    ) -> tuple[TextToImage, list[float]]:
    """Train model in place; return its EMA copy and the step losses."""
    device = pick_device(config.device)
    model.to(device)
    ema = TextToImage(model.config).to(device)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay)
    g = torch.Generator().manual_seed(config.seed)
    losses = []
    for step in range(1, config.steps + 1):
        warm = min(1.0, step / config.warmup)
        decay = 0.5 * (1 + math.cos(math.pi * step / config.steps))
        for group in optimizer.param_groups:
            group["lr"] = config.lr * warm * decay
        batch = torch.randint(0, len(images), (config.batch_size,),
                              generator=g)
        ids = model.encode(captions_for(labels[batch], TRAIN_TEMPLATES, g))
        with torch.autocast(device.type, torch.bfloat16,
                            enabled=config.bf16):
            loss = model.loss(images[batch].to(device), ids, generator=g)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        with torch.no_grad():  # EMA; a short memory while it warms up
            keep = min(config.ema, (1 + step) / (10 + step))
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - keep)
        losses.append(loss.item())
        if log is not None:
            log(step, loss.item())
    return ema, losses


WEIGHTS = RESULTS_DIR / "text_to_image.safetensors"  # the diffusion model
CLASSIFIER = RESULTS_DIR / "text_to_image_classifier.safetensors"
FULL_RUN_PARTS = ("classifier", "diffusion", "evaluate", "ddim")
EVAL_TEMPLATE = "a handwritten {name}"
GRID_SCALES = (0.0, 1.0, 2.0, 4.0)  # the figure's guidance scales


@dataclasses.dataclass
class EvalConfig:
    per_digit: int = 100  # images per digit and scale: 1,000 per scale
    scales: tuple[float, ...] = (1.0, 2.0)  # without, then with guidance
    samplers: tuple[str, ...] = ("ddpm",)  # DDIM: the part "ddim"
    ddpm_steps: int = 50  # 'leading' spacing: every 20th step
    ddim_steps: int = 25  # eta = 0: every 40th step
    batch_size: int = 250  # images per sampling batch
    bf16: bool = True  # the network's products in bfloat16, as trained
    seed: int = 1  # not the training seed


def _save(path, model: nn.Module) -> None:
    save_safetensors(path, {k: v.detach().float().cpu().contiguous()
                            for k, v in model.state_dict().items()})


def load_trained_t2i(path=WEIGHTS,
                     config: TextToImageConfig | None = None
                     ) -> TextToImage:
    """The diffusion model (EMA weights) the full run trained."""
    model = TextToImage(config or TextToImageConfig())
    tensors, _ = load_safetensors(path)
    model.load_state_dict(tensors)
    return model.eval()


def load_classifier(path=CLASSIFIER) -> LeNet5:
    model = LeNet5()
    tensors, _ = load_safetensors(path)
    model.load_state_dict(tensors)
    return model.eval()


def to_pixels(x: Tensor) -> Tensor:
    """Samples in [-1, 1], (B, 1, H, W) -> uint8 digits (B, H, W)."""
    return ((x.squeeze(1).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@torch.no_grad()
def draw(model: TextToImage, captions: list[str], scale: float,
         steps: int = 50, generator: torch.Generator | None = None,
         trajectory: list | None = None, bf16: bool = False,
         method: str = "ddpm", clipped_eps: bool = True) -> Tensor:
    """uint8 digits (B, 28, 28), one per caption, guided."""
    device = model.unet.conv_in.weight.device
    with eval_mode(model), torch.autocast(device.type, torch.bfloat16,
                                          enabled=bf16):
        ids = model.encode(captions)
        denoise = guided(model, ids, scale)
        x = sample(denoise, model.schedule, (len(captions), 1, 28, 28),
                   steps, method, generator, model.config.prediction,
                   trajectory, clipped_eps)
    return to_pixels(x)


def recognition(model: TextToImage, classifier: nn.Module,
                config: EvalConfig, scale: float, method: str,
                clipped_eps: bool = True) -> dict:
    """Draw per_digit images of each digit; the share recognised."""
    steps = config.ddpm_steps if method == "ddpm" else config.ddim_steps
    g = torch.Generator().manual_seed(config.seed)
    labels = torch.arange(10).repeat_interleave(config.per_digit)
    start, cpu, predicted = time.perf_counter(), time.process_time(), []
    for chunk in labels.split(config.batch_size):
        captions = [EVAL_TEMPLATE.format(name=NAMES[d]) for d in chunk]
        images = draw(model, captions, scale, steps, g, bf16=config.bf16,
                      method=method, clipped_eps=clipped_eps)
        with eval_mode(classifier):
            predicted.append(classifier(images.float() / 255).argmax(-1))
    hits = (torch.cat(predicted) == labels).float()
    return {"method": method, "steps": steps, "scale": scale,
            "clipped_eps": clipped_eps,
            "recognised": hits.mean().item(),
            "per_digit": [h.mean().item() for h in hits.view(10, -1)],
            "seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu}


def _progress(step: int, loss: float) -> None:
    if step % 250 == 0:
        print(f"step {step}: loss {loss:.4f}", flush=True)


def full_run(device: str | None = None, part: str = "diffusion",
             **overrides) -> dict:
    """One part of the full run on the book's MNIST split; its record.

    "classifier": LeNet-5 with the CNN chapter's RECIPE, saved to
    CLASSIFIER. "diffusion": TextToImage trained by train_diffusion
    (overrides: DiffusionTrainConfig fields), EMA weights saved to
    WEIGHTS. "evaluate": the recognition rates and the figures' samples
    (overrides: EvalConfig fields). "ddim": DDIM's rates, with eps_hat
    kept raw and re-derived from the clipped x0_hat (clipped_eps).
    """
    if part not in FULL_RUN_PARTS:
        raise ValueError(f"part must be one of {FULL_RUN_PARTS}, got "
                         f"{part!r}")
    (train_x, train_y), val_data = mnist_split(seed=0)
    if part == "classifier":
        config = override_config(dataclasses.replace(RECIPE, device=device),
                                 overrides)
        seed_everything(config.seed)
        classifier, cpu = LeNet5(), time.process_time()
        history = train(classifier, (train_x, train_y), val_data, config)
        _save(CLASSIFIER, classifier.cpu())
        return {"model": "LeNet5", "device": str(pick_device(device)),
                "best_val_acc": history.best_val_acc,
                "seconds": history.seconds[-1],
                "cpu_seconds": time.process_time() - cpu,
                "train": dataclasses.asdict(config)}
    if part == "diffusion":
        config = override_config(DiffusionTrainConfig(device=device),
                                 overrides)
        seed_everything(config.seed)
        model = TextToImage()
        start, cpu = time.perf_counter(), time.process_time()
        ema, losses = train_diffusion(model, train_x, train_y, config,
                                      log=_progress)
        seconds = time.perf_counter() - start
        _save(WEIGHTS, ema.cpu())
        return {"device": str(pick_device(device)), "seconds": seconds,
                "cpu_seconds": time.process_time() - cpu,
                "losses": [round(v, 4) for v in losses],
                "parameters": sum(p.numel() for p in model.parameters()),
                "train": dataclasses.asdict(config),
                "model": dataclasses.asdict(model.config)}
    config = override_config(EvalConfig(), overrides)
    model, classifier = load_trained_t2i(), load_classifier()
    if part == "ddim":
        rates = [recognition(model, classifier, config, s, "ddim", clipped)
                 for clipped in (False, True) for s in config.scales]
        return {"device": "cpu", "rates": rates,
                "eval": dataclasses.asdict(config)}
    rates = [recognition(model, classifier, config, s, method)
             for method in config.samplers for s in config.scales]
    _, real_acc, _ = evaluate(classifier, *val_data)
    g = torch.Generator().manual_seed(config.seed)
    captions = [EVAL_TEMPLATE.format(name=n) for n in NAMES for _ in "ab"]
    grid = {str(s): draw(model, captions, s, config.ddpm_steps, g,
                         bf16=config.bf16).numpy().tobytes().hex()
            for s in GRID_SCALES}  # 20 uint8 digits per scale, as hex
    return {"device": "cpu", "classifier_val_acc": real_acc,
            "rates": rates, "grid": grid,
            "eval": dataclasses.asdict(config)}
