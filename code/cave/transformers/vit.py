# Generated from docs/transformers/vit.md by `python -m cave.book tangle`.
# Do not edit: edit the chapter, then regenerate. CI fails on drift.


# § Vision Transformers (docs/transformers/vit.md:35)
"""Vision Transformers: patches, a class token, learned positions, and
the hybrid whose tokens a convolutional stem makes.

The chapter docs/transformers/vit.md builds, in order:

    patchify, PatchEmbedding  an image as a sequence of flattened patches,
                              and their linear projection: the same map as
                              the CNN chapter's Conv2d with stride = kernel
    interpolate_positions     learned position embeddings resized to a new
                              grid, as Hugging Face's interpolate_pos_encoding
    ViTConfig, ViTBlock, ViT  the pre-norm encoder and the class-token head,
                              equal to transformers.ViTForImageClassification
    config_to_hf, config_from_hf, export_hf, import_hf
                              the Hugging Face ViT layout, both ways
    HybridConfig, HybridViT   a ResNet's feature map as the tokens
    VIT_MODEL, VIT_RECIPE, HYBRID_RECIPE, full_run
                              training on the book's MNIST split; the full
                              run's parts are FULL_RUN_PARTS, and
                              step_seconds times float32 against bf16
    attention_maps, attention_rollout, position_similarity
                              what a trained ViT looks at, and where it
                              thinks each patch is

The ViT reuses the Transformer chapter's MultiHeadAttention and
LayerNorm, the essentials' FeedForward (exact GELU), the CNN chapter's
Conv2d and ResNet, and the deep networks chapter's training loop.
tests/test_vit.py proves logits and gradients equal to transformers'.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from cave.classical.cnn import RECIPE as RESNET_RECIPE
from cave.classical.cnn import Conv2d, ResNet, ResNetConfig
from cave.fundamentals.checkpoints import (load_safetensors,
                                           override_configs,
                                           save_safetensors)
from cave.fundamentals.data import RESULTS_DIR, mnist_split
from cave.fundamentals.deep_networks import MLP, MLPConfig, TrainConfig, train
from cave.fundamentals.essentials import (FeedForward, eval_mode,
                                          pick_device, seed_everything)
from cave.transformers.transformer import LayerNorm, MultiHeadAttention


# § An image is a sequence of patches (docs/transformers/vit.md:125)
def check_patches(height: int, width: int, patch_size: int) -> None:
    """Refuse an image whose sides the patch size does not divide."""
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"image size {height}x{width} is not divisible by the patch "
            f"size {patch_size}: expected both sides multiples of "
            f"{patch_size}, got remainders {height % patch_size} and "
            f"{width % patch_size}")


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) images -> (B, h * w, C * P * P) flattened patches.

    Patch k is grid row k // w, column k % w; inside it the numbers run
    channel, then row, then column (the order of a Conv2d weight).
    """
    if images.ndim != 4:
        raise ValueError(f"patchify expected images (B, C, H, W), got "
                         f"{tuple(images.shape)}")
    B, C, H, W = images.shape
    P = patch_size
    check_patches(H, W, P)
    h, w = H // P, W // P
    x = images.view(B, C, h, P, w, P)  # split: (B, C, h, P, w, P)
    x = x.permute(0, 2, 4, 1, 3, 5)  # grid first: (B, h, w, C, P, P)
    return x.reshape(B, h * w, C * P * P)  # (B, N, C P^2), one copy


# § The same map is a convolution (docs/transformers/vit.md:181)
class PatchEmbedding(nn.Module):
    """Patches of P x P pixels -> D-dimensional tokens, (B, N, D).

    The weight is a Conv2d's, (D, C, P, P); forward uses patchify and one
    matrix product, forward_conv the strided convolution: the same map.
    """

    def __init__(self, in_channels: int, dim: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.projection = Conv2d(in_channels, dim, patch_size,
                                 stride=patch_size)  # (D, C, P, P)

    def forward(self, images: Tensor) -> Tensor:
        w = self.projection.weight  # (D, C, P, P)
        E = w.view(w.shape[0], -1)  # (D, C P^2): one row per output
        patches = patchify(images, self.patch_size)  # (B, N, C P^2)
        return patches @ E.T + self.projection.bias  # (B, N, D)

    def forward_conv(self, images: Tensor) -> Tensor:
        maps = self.projection(images)  # (B, D, h, w)
        return maps.flatten(2).transpose(1, 2)  # (B, h w, D): row by row


# § The class token and learned positions (docs/transformers/vit.md:267)
def interpolate_positions(positions: Tensor, grid: tuple[int, int]
                          ) -> Tensor:
    """A (1, 1 + n * n, D) table learned on an n x n grid, resized to
    grid = (h, w) bicubically: (1, 1 + h * w, D). The class token's row
    is kept; an unchanged grid returns the table itself."""
    cls, table = positions[:, :1], positions[:, 1:]  # (1, 1, D), (1, N, D)
    n = math.isqrt(table.shape[1])
    if n * n != table.shape[1]:
        raise ValueError(f"expected a square grid of positions, got "
                         f"{table.shape[1]} (plus the class token's)")
    if tuple(grid) == (n, n):
        return positions
    D = positions.shape[-1]
    table = table.reshape(1, n, n, D).permute(0, 3, 1, 2)  # (1, D, n, n)
    table = F.interpolate(table, size=tuple(grid), mode="bicubic",
                          align_corners=False)  # (1, D, h, w)
    table = table.permute(0, 2, 3, 1).reshape(1, -1, D)  # (1, h w, D)
    return torch.cat([cls, table], dim=1)  # (1, 1 + h w, D)


# § The encoder: the Transformer chapter's, pre-norm (docs/transformers/vit.md:337)
def check_sizes(sizes: dict[str, int], dim: int, heads: int) -> None:
    """Refuse sizes that are not positive ints, and heads that do not
    divide the width (a config's check; the CLIP chapter's text encoder
    uses it too)."""
    small = {k: v for k, v in sizes.items()
             if not isinstance(v, int) or v < 1}
    if small:
        raise ValueError(f"expected positive ints, got {small}")
    if dim % heads:
        raise ValueError(f"heads must divide dim: got dim={dim}, "
                         f"heads={heads}")


@dataclasses.dataclass
class ViTConfig:
    image_size: int = 28  # MNIST digits are 28x28 (a square image)
    patch_size: int = 4  # 7x7 = 49 patches of 16 pixels; the lab tries 14
    in_channels: int = 1  # grey digits; 3 for colour images
    classes: int = 10  # the digits 0 to 9
    dim: int = 64  # D, the width of every token
    depth: int = 6  # encoder layers, about 33,000 weights each
    heads: int = 4  # 16 dimensions a head
    mlp_dim: int = 128  # the MLP's hidden width, 2D (the paper uses 4D)
    dropout: float = 0.0  # after embeddings, attention and MLP; off:
    # shifts and label smoothing are the recipe's regularisers
    attention_dropout: float = 0.0  # on the attention weights
    layer_norm_eps: float = 1e-12  # Hugging Face's ViT (PyTorch's: 1e-5)
    position_embeddings: bool = True  # False: the lab's ViT, blind to
    # where each patch came from
    input_mean: float = 0.1307  # MNIST's pixel mean and standard deviation
    input_std: float = 0.3081  # (0 and 1: the pixels are used as given)

    def __post_init__(self):
        sizes = {"image_size": self.image_size,
                 "patch_size": self.patch_size,
                 "in_channels": self.in_channels, "classes": self.classes,
                 "dim": self.dim, "depth": self.depth, "heads": self.heads,
                 "mlp_dim": self.mlp_dim}
        check_sizes(sizes, self.dim, self.heads)
        check_patches(self.image_size, self.image_size, self.patch_size)
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got "
                                 f"{getattr(self, name)}")
        if not self.input_std > 0:
            raise ValueError(f"input_std must be > 0, got {self.input_std}")

    @property
    def grid(self) -> int:
        """Patches along each side of a training image."""
        return self.image_size // self.patch_size


class ViTBlock(nn.Module):
    """z + MSA(LN(z)), then z + MLP(LN(z)): one pre-norm encoder layer."""

    def __init__(self, c: ViTConfig):
        super().__init__()
        self.norm1 = LayerNorm(c.dim, c.layer_norm_eps)
        self.attn = MultiHeadAttention(c.dim, c.heads, c.attention_dropout)
        self.norm2 = LayerNorm(c.dim, c.layer_norm_eps)
        self.mlp = FeedForward(c.dim, c.mlp_dim)  # Linear, GELU, Linear
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, z: Tensor) -> Tensor:
        h = self.norm1(z)  # (B, T, D)
        z = z + self.dropout(self.attn(h, h, h))  # (B, T, D)
        return z + self.dropout(self.mlp(self.norm2(z)))  # (B, T, D)


class ViT(nn.Module):
    """Patch embedding, class token, positions, pre-norm encoder, head.

    forward(images (B, C, H, W) or (B, H, W) floats) -> logits (B, classes);
    interpolate_pos_encoding=True accepts other image sizes.
    """

    def __init__(self, config: ViTConfig = ViTConfig()):
        super().__init__()
        c = self.config = config
        self.patch_embed = PatchEmbedding(c.in_channels, c.dim, c.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim))
        if c.position_embeddings:
            self.positions = nn.Parameter(
                torch.zeros(1, 1 + c.grid ** 2, c.dim))  # (1, 1 + N, D)
        else:
            self.register_parameter("positions", None)
        self.dropout = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(ViTBlock(c) for _ in range(c.depth))
        self.norm = LayerNorm(c.dim, c.layer_norm_eps)
        self.head = nn.Linear(c.dim, c.classes)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Class token and positions ~ N(0, 0.02^2), cut at 2 deviations."""
        nn.init.trunc_normal_(self.cls_token, std=0.02, a=-0.04, b=0.04)
        if self.positions is not None:
            nn.init.trunc_normal_(self.positions, std=0.02, a=-0.04, b=0.04)

    def check_images(self, images: Tensor,
                     interpolate_pos_encoding: bool = False) -> Tensor:
        """The images as (B, C, H, W), or an error naming what was
        expected and what came."""
        c = self.config
        if not images.is_floating_point():
            raise TypeError(f"ViT expected float pixels, got {images.dtype};"
                            f" convert with x.float() / 255")
        if images.ndim == 3 and c.in_channels == 1:
            images = images.unsqueeze(1)  # (B, 1, H, W)
        if images.ndim != 4 or images.shape[1] != c.in_channels:
            raise ValueError(
                f"ViT expected images of shape (B, {c.in_channels}, H, W)"
                + (" or (B, H, W)" if c.in_channels == 1 else "")
                + f" with {c.in_channels} channel(s), got "
                f"{tuple(images.shape)}")
        H, W = images.shape[-2:]
        check_patches(H, W, c.patch_size)
        if not interpolate_pos_encoding and (H, W) != (c.image_size,) * 2:
            raise ValueError(
                f"ViT expected {c.image_size}x{c.image_size} images, got "
                f"{H}x{W}; pass interpolate_pos_encoding=True to resize "
                f"the positions")
        return images

    def embed(self, images: Tensor, interpolate_pos_encoding: bool = False
              ) -> Tensor:
        """The encoder's input z^0: (B, 1 + N, D)."""
        c = self.config
        x = self.check_images(images, interpolate_pos_encoding)
        x = (x - c.input_mean) / c.input_std  # (B, C, H, W) standardised
        tokens = self.patch_embed(x)  # (B, N, D)
        cls = self.cls_token.expand(len(tokens), -1, -1)  # (B, 1, D)
        z = torch.cat([cls, tokens], dim=1)  # (B, 1 + N, D)
        if self.positions is not None:
            grid = (x.shape[-2] // c.patch_size, x.shape[-1] // c.patch_size)
            z = z + interpolate_positions(self.positions, grid)  # (B,1+N,D)
        return self.dropout(z)

    def forward(self, images: Tensor, interpolate_pos_encoding: bool = False
                ) -> Tensor:
        z = self.embed(images, interpolate_pos_encoding)  # (B, 1 + N, D)
        for block in self.blocks:
            z = block(z)  # (B, 1 + N, D)
        z = self.norm(z)  # (B, 1 + N, D)
        return self.head(z[:, 0])  # the class token's: (B, classes)


# § The Hugging Face layout (docs/transformers/vit.md:556)
def config_to_hf(config: ViTConfig) -> dict:
    """Our config as the fields of transformers' ViTConfig (JSON-ready)."""
    if not config.position_embeddings:
        raise ValueError("Hugging Face's ViT always has position "
                         "embeddings; got position_embeddings=False")
    return {
        "architectures": ["ViTForImageClassification"],
        "model_type": "vit",
        "image_size": config.image_size,
        "patch_size": config.patch_size,
        "num_channels": config.in_channels,
        "hidden_size": config.dim,
        "num_hidden_layers": config.depth,
        "num_attention_heads": config.heads,
        "intermediate_size": config.mlp_dim,
        "hidden_act": "gelu",  # exact: x Phi(x)
        "hidden_dropout_prob": config.dropout,
        "attention_probs_dropout_prob": config.attention_dropout,
        "layer_norm_eps": config.layer_norm_eps,
        "qkv_bias": True,
        "id2label": {str(k): str(k) for k in range(config.classes)},
        "label2id": {str(k): k for k in range(config.classes)},
    }


def config_from_hf(hf: dict, input_mean: float = 0.0,
                   input_std: float = 1.0) -> ViTConfig:
    """A ViTConfig from the fields of a transformers ViTConfig dict."""
    def refuse(field, want):
        raise ValueError(f"{field}: this model supports {want}, "
                         f"got {hf.get(field)!r}")

    if hf.get("model_type", "vit") != "vit":
        refuse("model_type", "'vit'")
    if hf.get("hidden_act", "gelu") != "gelu":
        refuse("hidden_act", "'gelu' (exact)")
    if not hf.get("qkv_bias", True):
        refuse("qkv_bias", "True (biases in the q, k, v projections)")
    for field in ("image_size", "patch_size"):
        if not isinstance(hf.get(field, 1), int):
            refuse(field, "one int (square images and patches)")
    classes = len(hf["id2label"]) if hf.get("id2label") else \
        hf.get("num_labels", 2)  # transformers' default: two labels
    return ViTConfig(
        image_size=hf.get("image_size", 224),
        patch_size=hf.get("patch_size", 16),
        in_channels=hf.get("num_channels", 3), classes=classes,
        dim=hf["hidden_size"], depth=hf["num_hidden_layers"],
        heads=hf["num_attention_heads"], mlp_dim=hf["intermediate_size"],
        dropout=hf.get("hidden_dropout_prob", 0.0),
        attention_dropout=hf.get("attention_probs_dropout_prob", 0.0),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        input_mean=input_mean, input_std=input_std)


def _hf_names(depth: int) -> dict[str, str]:
    """Our parameter names -> Hugging Face's."""
    e = "vit.embeddings."
    names = {"cls_token": e + "cls_token",
             "positions": e + "position_embeddings",
             "patch_embed.projection.weight":
                 e + "patch_embeddings.projection.weight",
             "patch_embed.projection.bias":
                 e + "patch_embeddings.projection.bias",
             "norm.weight": "vit.layernorm.weight",
             "norm.bias": "vit.layernorm.bias",
             "head.weight": "classifier.weight",
             "head.bias": "classifier.bias"}
    per_layer = {"norm1": "layernorm_before", "norm2": "layernorm_after",
                 "attn.q_proj": "attention.q_proj",
                 "attn.k_proj": "attention.k_proj",
                 "attn.v_proj": "attention.v_proj",
                 "attn.out_proj": "attention.o_proj",
                 "mlp.up": "mlp.fc1", "mlp.down": "mlp.fc2"}
    for i in range(depth):
        for ours, theirs in per_layer.items():
            for kind in ("weight", "bias"):
                names[f"blocks.{i}.{ours}.{kind}"] = \
                    f"vit.layers.{i}.{theirs}.{kind}"
    return names


def export_hf(model: ViT) -> tuple[dict[str, Tensor], dict]:
    """(state_dict, config) in the layout of ViTForImageClassification.

    Hugging Face's model takes standardised pixels: feed it
    (x - config.input_mean) / config.input_std.
    """
    hf = config_to_hf(model.config)
    names = _hf_names(model.config.depth)
    state = {names[k]: v.detach().clone()
             for k, v in model.state_dict().items()}
    return state, hf


def import_hf(state: dict[str, Tensor], hf_config: dict,
              input_mean: float = 0.0, input_std: float = 1.0) -> ViT:
    """A ViT from a ViTForImageClassification state dict and config."""
    config = config_from_hf(hf_config, input_mean, input_std)
    model = ViT(config)
    names = _hf_names(config.depth)
    missing = sorted(set(names.values()) - set(state))
    unexpected = sorted(set(state) - set(names.values()))
    if missing or unexpected:
        raise ValueError(f"state dict does not fit {config}: missing "
                         f"{missing[:5]} ({len(missing)}), unexpected "
                         f"{unexpected[:5]} ({len(unexpected)})")
    ours = model.state_dict()
    for name, theirs in names.items():
        if state[theirs].shape != ours[name].shape:
            raise ValueError(f"{theirs}: expected shape "
                             f"{tuple(ours[name].shape)}, got "
                             f"{tuple(state[theirs].shape)}")
    model.load_state_dict({name: state[theirs]
                           for name, theirs in names.items()})
    return model


# § The hybrid: a convolutional stem makes the tokens (docs/transformers/vit.md:719)
@dataclasses.dataclass
class HybridConfig:
    image_size: int = 28  # the digits
    cnn: ResNetConfig = dataclasses.field(default_factory=ResNetConfig)
    # the CNN chapter's ResNet: 28 -> 14 (pool) -> 7 -> 4, 128 maps
    dim: int = 64  # token width
    depth: int = 2  # encoder layers: the CNN does the local work
    heads: int = 4  # 16 dimensions a head
    mlp_dim: int = 128  # 2 * dim, as in ViTConfig
    dropout: float = 0.0  # shifts and label smoothing regularise enough

    def __post_init__(self):
        if self.feature_size < 1:
            raise ValueError(f"image_size {self.image_size} leaves no "
                             f"feature map after the CNN's stages")

    @property
    def feature_size(self) -> int:
        """Side of the CNN's last feature map: pooled, then halved by the
        stride-2 entry of every stage after the first."""
        size = self.image_size // 2 if self.cnn.stem_pool else \
            self.image_size
        for _ in self.cnn.widths[1:]:
            size = (size - 1) // 2 + 1  # 3x3, stride 2, padding 1
        return size

    def vit_config(self) -> ViTConfig:
        """The ViT that reads the feature map: patches of one position."""
        return ViTConfig(image_size=self.feature_size, patch_size=1,
                         in_channels=self.cnn.widths[-1],
                         classes=self.cnn.classes, dim=self.dim,
                         depth=self.depth, heads=self.heads,
                         mlp_dim=self.mlp_dim, dropout=self.dropout,
                         input_mean=0.0, input_std=1.0)


class HybridViT(nn.Module):
    """A ResNet's feature map (B, C, h, w) as h * w tokens for a ViT."""

    def __init__(self, config: HybridConfig = HybridConfig()):
        super().__init__()
        self.config = config
        self.cnn = ResNet(config.cnn)  # standardises the pixels itself
        self.cnn.head = nn.Identity()  # its classifier is the ViT's job
        self.vit = ViT(config.vit_config())

    def feature_map(self, images: Tensor) -> Tensor:
        """The CNN's last feature map, (B, C, h, w)."""
        return self.cnn.feature_maps(images)[-1]

    def tokens(self, images: Tensor) -> Tensor:
        """The feature map as a sequence: (B, h * w, C), row by row."""
        return patchify(self.feature_map(images), 1)  # (B, h w, C)

    def forward(self, images: Tensor) -> Tensor:
        return self.vit(self.feature_map(images))  # (B, classes)


# § Training on 8,000 digits (docs/transformers/vit.md:827)
VIT_MODEL = ViTConfig(
    patch_size=7,  # a 4x4 grid of 7x7-pixel patches: several times
    # cheaper an epoch than the 7x7 grid of 4x4 patches, with the same
    # weights, so many more epochs fit; every other field as built
)
VIT_RECIPE = TrainConfig(
    epochs=40,  # a ViT learns slowly from 8,000 digits: it must find out
    # from data what a CNN is built to know; its curve still climbs at
    # 30 epochs, and 40 epochs of 16 tokens fit ten two-core minutes
    batch_size=128,  # 63 steps an epoch
    lr=2e-3,  # peak; 1e-3 learned too slowly for the budget, and no
    # batch norm steadies a Transformer's early steps: the warm-up does
    warmup=0.1,  # 4 epochs of linear warm-up, then cosine
    label_smoothing=0.1,  # as for the ResNet
    max_shift=2,  # random shifts: the only augmentation (rotations and
    # rescaling on top gained nothing measurable in our runs)
    bf16=False,  # float32: on the CPUs of our runs bfloat16 autocast
    # bought little or nothing (each run records a step timed both ways,
    # below), and float32 leaves no rounding to reason about
)
HYBRID_RECIPE = dataclasses.replace(
    RESNET_RECIPE,  # the ResNet's recipe: 3e-3 peak, 20 % warm-up, label
    # smoothing, shifts (with the ViT's 1e-3 the first, two-stage hybrid
    # stopped at 98.8 %)
    epochs=20,  # 15 stopped at 99.35 %, short of the mark; 20 fit ten
    # minutes at two threads
    bf16=False,  # as for the ViT
)


# § The full run, in parts (docs/transformers/vit.md:923)
EFFICIENCY_PARTS = {"efficiency_mlp": "MLP", "efficiency_resnet": "ResNet",
                    "efficiency_vit": "ViT", "efficiency_hybrid": "hybrid"}
FULL_RUN_PARTS = ("vit", "hybrid", *EFFICIENCY_PARTS)
WEIGHTS = RESULTS_DIR / "vit_mnist.safetensors"  # the vit part's model


@dataclasses.dataclass
class EfficiencyConfig:
    sizes: tuple[int, ...] = (1000, 2000, 4000, 8000)  # training digits
    share: float = 1 / 3  # of the steps each model's recipe takes on
    # 8,000 digits: 315 for the MLP and the ResNet (15 epochs of 63), as
    # many as 16 runs can afford on a 2-core CPU with the ViT's and
    # hybrid's longer recipes
    steps: int = 0  # > 0: this many steps for every model instead
    seed: int = 0  # one seed for every model and size

    def __post_init__(self):
        if self.steps < 0 or not 0 < self.share <= 1 or not self.sizes \
                or min(self.sizes) < 1:
            raise ValueError(f"expected steps >= 0, share in (0, 1] and "
                             f"positive sizes, got steps={self.steps}, "
                             f"share={self.share}, sizes={self.sizes}")

    def steps_for(self, recipe: TrainConfig, full: int = 8000) -> int:
        """The steps of one run: `steps`, or `share` of the recipe's
        steps on `full` digits."""
        if self.steps:
            return self.steps
        per_epoch = math.ceil(full / recipe.batch_size)
        return max(1, round(self.share * recipe.epochs * per_epoch))


def era_models() -> dict:
    """name -> (a function making the model, its chapter's recipe)."""
    return {"MLP": (lambda: MLP(MLPConfig()), TrainConfig()),
            "ResNet": (lambda: ResNet(ResNetConfig()), RESNET_RECIPE),
            "ViT": (lambda: ViT(VIT_MODEL), VIT_RECIPE),
            "hybrid": (lambda: HybridViT(HybridConfig()), HYBRID_RECIPE)}


def step_seconds(make, images: Tensor, labels: Tensor, device: str,
                 repeats: int = 5) -> dict[str, float]:
    """Median seconds of one training step (forward, backward, Adam) of
    make()'s model on one batch, in float32 and under bfloat16 autocast,
    measured in turns so that whatever else the machine runs slows both
    alike."""
    seed_everything(0)
    model = make().to(device)
    optimiser = torch.optim.Adam(model.parameters())
    x = images.to(device).float() / 255  # (B, H, W)
    y = labels.to(device)  # (B,)
    times = {"float32": [], "bfloat16": []}
    for _ in range(repeats + 1):  # the first round warms up
        for name, seconds in times.items():
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.autocast(torch.device(device).type, torch.bfloat16,
                                enabled=name == "bfloat16"):
                loss = F.cross_entropy(model(x).float(), y)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
    return {name: sorted(t[1:])[repeats // 2] for name, t in times.items()}


def train_record(make, config: TrainConfig, train_data, val_data):
    """Seed, build, train: (the numbers the chapter shows, the model)."""
    seed_everything(config.seed)
    model = make()
    history = train(model, train_data, val_data, config)
    return {"best_val_acc": history.best_val_acc,
            "best_epoch": history.best_epoch + 1,  # 1-based, as printed
            "seconds": history.seconds[-1],
            "parameters": sum(p.numel() for p in model.parameters()),
            "train": dataclasses.asdict(config),
            "history": dataclasses.asdict(history)}, model


def full_run(device: str | None = None, part: str = "vit",
             **overrides) -> dict:
    """One part of the full run on the book's MNIST split; its record.

    part "vit" or "hybrid": that recipe, with overrides of TrainConfig
    fields (epochs=1) and of the model's config with a model_ prefix
    (model_dim=96); "vit" also saves the trained weights to WEIGHTS.
    part "efficiency_vit" (or _mlp, _resnet, _hybrid): that model with
    its recipe on the first 1,000 to 8,000 training digits, with
    overrides of EfficiencyConfig (steps=100).
    """
    if part not in FULL_RUN_PARTS:
        raise ValueError(f"part must be one of {FULL_RUN_PARTS}, got "
                         f"{part!r}")
    train_data, val_data = mnist_split(seed=0)
    device = str(pick_device(device))
    models = era_models()
    if part in ("vit", "hybrid"):
        recipe = VIT_RECIPE if part == "vit" else HYBRID_RECIPE
        model_config = VIT_MODEL if part == "vit" else HybridConfig()
        config, model_config = override_configs(
            {"": dataclasses.replace(recipe, device=device),
             "model": model_config}, overrides)

        def make():
            return (ViT if part == "vit" else HybridViT)(model_config)

        batch = [t[:config.batch_size] for t in train_data]
        timed = {"recipe's model": make}
        if part == "vit":
            timed["ViT with 4x4 patches"] = lambda: ViT(ViTConfig())
        speed = {name: step_seconds(f, *batch, device)
                 for name, f in timed.items()}
        record, model = train_record(make, config, train_data, val_data)
        record["model"] = dataclasses.asdict(model.config)
        record["step_seconds"] = speed  # name -> {float32, bfloat16}
        if part == "vit":
            save_safetensors(WEIGHTS, {k: v.detach().float().cpu()
                                       for k, v in
                                       model.state_dict().items()})
        return {"device": device, **record}
    config, = override_configs({"": EfficiencyConfig()}, overrides)
    name = EFFICIENCY_PARTS[part]
    make, recipe = models[name]
    steps = config.steps_for(recipe)
    table = {}
    for n in config.sizes:
        per_epoch = math.ceil(n / recipe.batch_size)
        epochs = max(1, round(steps / per_epoch))
        run = dataclasses.replace(recipe, epochs=epochs, device=device,
                                  seed=config.seed)
        subset = (train_data[0][:n], train_data[1][:n])
        record, _ = train_record(make, run, subset, val_data)
        table[str(n)] = {"epochs": epochs, **{k: record[k] for k in (
            "best_val_acc", "best_epoch", "seconds", "parameters")}}
    return {"device": device, "model": name, "steps": steps,
            "config": dataclasses.asdict(config), "accuracy": table}


# § Inside the trained ViT (docs/transformers/vit.md:1160)
def load_trained_vit(path=WEIGHTS, config: ViTConfig = VIT_MODEL) -> ViT:
    """The ViT the full run's vit part trained and saved."""
    model = ViT(config)
    tensors, _ = load_safetensors(path)  # (tensors, metadata)
    model.load_state_dict(tensors)
    return model.eval()


# § Where does the ViT think each patch is? (docs/transformers/vit.md:1186)
@torch.no_grad()
def position_similarity(model: ViT) -> Tensor:
    """Cosine similarity of every patch's position vector with every
    other's, as (g, g, g, g): [i, j] is patch (i, j)'s map on the grid."""
    if model.positions is None:
        raise ValueError("this ViT has no position embeddings")
    table = model.positions[0, 1:].float()  # (N, D): the patches' rows
    unit = F.normalize(table, dim=-1)  # (N, D), each of length 1
    g = model.config.grid
    return (unit @ unit.T).view(g, g, g, g)  # (N, N) -> (g, g, g, g)


# § Where the class token looks: attention rollout (docs/transformers/vit.md:1296)
@torch.no_grad()
def attention_maps(model: ViT, images: Tensor) -> list[Tensor]:
    """Every layer's attention weights, (B, heads, T, T) each."""
    layers = [block.attn for block in model.blocks]
    saved = [attn.record_weights for attn in layers]
    try:
        for attn in layers:
            attn.record_weights = True
        with eval_mode(model):
            model(images)
        return [attn.weights for attn in layers]
    finally:
        for attn, flag in zip(layers, saved):
            attn.record_weights = flag


@torch.no_grad()
def attention_rollout(model: ViT, images: Tensor) -> Tensor:
    """How much of each patch reaches the class token through all
    layers (Abnar and Zuidema, 2020): (B, g, g), each map summing to
    at most 1 (the rest stays with the class token itself)."""
    weights = attention_maps(model, images)
    B, _, T, _ = weights[0].shape
    eye = torch.eye(T, device=weights[0].device)  # (T, T)
    rollout = eye.expand(B, T, T)  # (B, T, T)
    for w in weights:
        a = 0.5 * w.float().mean(dim=1) + 0.5 * eye  # heads, residual
        a = a / a.sum(dim=-1, keepdim=True)  # rows sum to 1: (B, T, T)
        rollout = a @ rollout  # (B, T, T)
    g = model.config.grid
    return rollout[:, 0, 1:].reshape(B, g, g)  # the class token's row
