# Generated from docs/frontiers/clip.md by `python -m cave.book tangle`.
# Do not edit: edit the chapter, then regenerate. CI fails on drift.


# § CLIP: images and captions in one space (docs/frontiers/clip.md:37)
"""CLIP: an image encoder and a text encoder trained to agree, on
MNIST digits with captions the book writes itself.

The chapter docs/frontiers/clip.md builds, in order:

    WORDS, CaptionTokenizer   the small vocabulary and its tokenizer
    TRAIN_TEMPLATES, HELD_OUT_TEMPLATES, captions_for
                              captions from templates; the held-out ones
                              are kept for zero-shot testing
    TextConfig, CausalBlock, TextEncoder
                              a causal Transformer from the ViT chapter's
                              blocks, pooled at its end token, equal to
                              transformers.CLIPTextModel
    ImageEncoder              the ViT chapter's ViT (or hybrid) with
                              CLIP's LayerNorm before the blocks, equal to
                              transformers.CLIPVisionModel
    CLIPConfig, CLIP          both encoders, the projections into one
                              space and the temperature, equal to
                              transformers.CLIPModel
    load_trained_clip         the full run's model
    clip_loss                 the symmetric contrastive loss: diagonal
                              targets, or every matching pair
    config_to_hf, export_hf   the Hugging Face CLIPModel layout
    CLIPRecipe, train_clip    training on the captioned digits
    zero_shot, recall_at_1    classification by captions; retrieval
    RECIPE, full_run          the full run's parts are FULL_RUN_PARTS

tests/test_clip.py proves logits, loss and gradients equal to
transformers', and the loss to a cross entropy by hand.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from cave.fundamentals.checkpoints import (load_safetensors,
                                           override_configs,
                                           save_safetensors)
from cave.fundamentals.data import RESULTS_DIR, mnist_split
from cave.fundamentals.deep_networks import random_shift
from cave.fundamentals.essentials import (eval_mode, pick_device,
                                          seed_everything)
from cave.techniques.optimization import Scheduler, warmup_cosine
from cave.transformers.transformer import LayerNorm
from cave.transformers.vit import (HybridConfig, HybridViT, ViT, ViTBlock,
                                   ViTConfig, check_sizes)


# § Captions the book writes itself (docs/frontiers/clip.md:125)
NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven",
         "eight", "nine")  # digit d is NAMES[d] in words, str(d) in figures
WORDS: tuple[str, ...] = (
    "<pad>",  # id 0: fills each caption up to max_len
    *NAMES, *(str(d) for d in range(10)),
    "a", "an", "the", "this", "is", "of", "by", "in", "digit", "number",
    "figure", "handwritten", "written", "drawn", "hand", "picture",
    "photo", "image", "drawing", "scan", "small", "large", "neat", "messy",
    "<start>", "<end>",  # the last two ids, as in OpenAI's CLIP
)

TRAIN_TEMPLATES = (  # what the model sees in training
    "a handwritten {name}", "the digit {number}", "{name}", "{number}",
    "a picture of the number {name}", "a photo of a {number}",
    "this is a {name}", "the number {number} written by hand",
    "a small {name}", "a messy drawing of the digit {name}",
    "a scan of a handwritten {number}", "an image of the figure {number}",
    "a large neat {name}", "a {number} drawn by hand",
    "the figure {name}",
)
HELD_OUT_TEMPLATES = (  # kept for testing: the same words, new phrases
    "a handwritten {number}", "the digit {name}",
    "an image of a {name} written by hand", "this is the number {number}",
)


def fill(template: str, digit: int) -> str:
    """The caption of one digit: "a handwritten {name}" -> "a handwritten
    seven"."""
    return template.format(name=NAMES[digit], number=digit)


def captions_for(labels: Tensor, templates,
                 generator: torch.Generator | None = None) -> list[str]:
    """One caption per label, each from a template drawn at random."""
    if labels.ndim != 1 or labels.is_floating_point():
        raise ValueError(f"captions_for expected integer labels (B,), got "
                         f"{labels.dtype} of shape {tuple(labels.shape)}")
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < 10:
        raise ValueError(f"expected digits 0 to 9, got labels from "
                         f"{int(labels.min())} to {int(labels.max())}")
    picks = torch.randint(len(templates), (len(labels),),
                          generator=generator)  # (B,)
    return [fill(templates[t], d)
            for t, d in zip(picks.tolist(), labels.tolist())]


class CaptionTokenizer:
    """Captions <-> ids: start, one id per word, end, then padding.

    encode(captions) -> (B, max_len) int64; decode(ids) -> captions.
    """

    def __init__(self, words: tuple[str, ...] = WORDS, max_len: int = 12):
        self.words = tuple(words)
        self.index = {w: i for i, w in enumerate(self.words)}
        if len(self.index) != len(self.words):
            raise ValueError("the vocabulary lists a word twice")
        self.pad_id = self.index["<pad>"]  # 0
        self.bos_id = self.index["<start>"]
        self.eos_id = self.index["<end>"]
        self.vocab_size = len(self.words)
        self.max_len = max_len  # start + up to max_len - 2 words + end

    def encode(self, captions: list[str]) -> Tensor:
        if isinstance(captions, str):
            raise TypeError("encode expected a list of captions, got one "
                            "string; wrap it: encode([caption])")
        ids = torch.full((len(captions), self.max_len), self.pad_id,
                         dtype=torch.long)  # (B, L), all padding
        for row, caption in enumerate(captions):
            words = caption.split()
            unknown = [w for w in words if w not in self.index]
            if unknown:
                raise ValueError(f"unknown word(s) {unknown} in {caption!r}:"
                                 f" expected words of the vocabulary WORDS")
            if len(words) + 2 > self.max_len:
                raise ValueError(f"{caption!r} has {len(words)} words: "
                                 f"expected at most {self.max_len - 2}")
            seq = [self.bos_id, *(self.index[w] for w in words),
                   self.eos_id]
            ids[row, :len(seq)] = torch.tensor(seq)
        return ids  # (B, L)

    def decode(self, ids: Tensor) -> list[str]:
        """The words between start and end of each row."""
        out = []
        for row in ids.tolist():
            words = []
            for i in row:
                if i == self.eos_id:
                    break
                if i not in (self.bos_id, self.pad_id):
                    words.append(self.words[i])
            out.append(" ".join(words))
        return out


# § The text encoder: a causal Transformer, read at the end (docs/frontiers/clip.md:280)
@dataclasses.dataclass
class TextConfig:
    vocab_size: int = len(WORDS)  # the words, padding, start and end
    max_len: int = 12  # the tokenizer's: start, up to 10 words, end
    dim: int = 64  # D, the width of every token
    depth: int = 2  # blocks: the captions are short and simple
    heads: int = 4  # 16 dimensions a head
    mlp_dim: int = 128  # 2D, as the ViT chapter's
    dropout: float = 0.0  # ViTBlock's dropout after attention and MLP
    attention_dropout: float = 0.0  # on the attention weights
    layer_norm_eps: float = 1e-5  # CLIP's (and PyTorch's default)
    eos_id: int = len(WORDS) - 1  # the end token: the pooled position

    def __post_init__(self):
        sizes = {"vocab_size": self.vocab_size, "max_len": self.max_len,
                 "dim": self.dim, "depth": self.depth, "heads": self.heads,
                 "mlp_dim": self.mlp_dim}
        check_sizes(sizes, self.dim, self.heads)
        if not 0 <= self.eos_id < self.vocab_size:
            raise ValueError(f"eos_id must be an id below vocab_size="
                             f"{self.vocab_size}, got {self.eos_id}")


class CausalBlock(ViTBlock):
    """The ViT chapter's block, each token attending only backwards."""

    def forward(self, z: Tensor) -> Tensor:
        h = self.norm1(z)  # (B, T, D)
        z = z + self.dropout(self.attn(h, h, h, is_causal=True))  # (B,T,D)
        return z + self.dropout(self.mlp(self.norm2(z)))  # (B, T, D)


class TextEncoder(nn.Module):
    """ids (B, L) -> (token states (B, L, D) after the final LayerNorm,
    pooled (B, D): the state at each caption's first end token)."""

    def __init__(self, config: TextConfig = TextConfig()):
        super().__init__()
        c = self.config = config
        self.token_embedding = nn.Embedding(c.vocab_size, c.dim)
        self.positions = nn.Parameter(torch.zeros(1, c.max_len, c.dim))
        self.blocks = nn.ModuleList(CausalBlock(c) for _ in range(c.depth))
        self.norm = LayerNorm(c.dim, c.layer_norm_eps)
        nn.init.normal_(self.token_embedding.weight, std=0.02)  # as CLIP
        nn.init.normal_(self.positions, std=0.01)

    def check_ids(self, ids: Tensor) -> None:
        c = self.config
        if ids.ndim != 2 or ids.is_floating_point():
            raise ValueError(f"TextEncoder expected integer ids (B, L), got"
                             f" {ids.dtype} of shape {tuple(ids.shape)}")
        if ids.shape[1] > c.max_len:
            raise ValueError(f"captions of {ids.shape[1]} tokens: expected "
                             f"at most max_len={c.max_len}")
        if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) \
                < c.vocab_size:
            raise ValueError(f"ids must lie in [0, {c.vocab_size}), got "
                             f"{int(ids.min())} to {int(ids.max())}")
        missing = (~(ids == c.eos_id).any(dim=1)).nonzero().flatten()
        if len(missing):
            raise ValueError(f"rows {missing.tolist()[:5]} have no end token"
                             f" (id {c.eos_id}): encode captions with "
                             f"CaptionTokenizer")

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        self.check_ids(ids)
        B, L = ids.shape
        z = self.token_embedding(ids) + self.positions[:, :L]  # (B, L, D)
        for block in self.blocks:
            z = block(z)  # (B, L, D)
        states = self.norm(z)  # (B, L, D)
        end = (ids == self.config.eos_id).int().argmax(dim=1)  # (B,) first
        pooled = states[torch.arange(B), end]  # (B, D)
        return states, pooled


# § The image encoder: the ViT, with one more LayerNorm (docs/frontiers/clip.md:417)
class ImageEncoder(nn.Module):
    """images (B, 28, 28) -> (states (B, 1 + N, D) after the final
    LayerNorm, pooled (B, D): the class token's)."""

    def __init__(self, config: ViTConfig | HybridConfig):
        super().__init__()
        self.config = config
        if isinstance(config, HybridConfig):
            self.hybrid = HybridViT(config)  # a ResNet, then a ViT
            self.vit = self.hybrid.vit
        elif isinstance(config, ViTConfig):
            self.hybrid = None
            self.vit = ViT(config)
        else:
            raise TypeError(f"ImageEncoder expected a ViTConfig or a "
                            f"HybridConfig, got {type(config).__name__}")
        self.vit.head = nn.Identity()  # no classifier: CLIP projects
        c = self.vit.config
        self.pre_norm = LayerNorm(c.dim, c.layer_norm_eps)  # CLIP's one
        # addition to the ViT: a LayerNorm on the embeddings

    @property
    def dim(self) -> int:
        return self.vit.config.dim

    def embed(self, images: Tensor) -> Tensor:
        """The ViT's input tokens, before CLIP's LayerNorm: (B, 1+N, D)."""
        if self.hybrid is not None:
            images = self.hybrid.feature_map(images)  # (B, C, h, w)
        return self.vit.embed(images)  # (B, 1 + N, D)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        z = self.pre_norm(self.embed(images))  # (B, 1 + N, D)
        for block in self.vit.blocks:
            z = block(z)  # (B, 1 + N, D)
        states = self.vit.norm(z)  # (B, 1 + N, D)
        return states, states[:, 0]  # the class token's: (B, D)


# § One space and a temperature (docs/frontiers/clip.md:486)
def _default_image() -> ViTConfig:
    """The image tower of the full run (every field named: the ViT
    chapter may change its defaults). Patches of 7x7: 16 tokens, a third
    of the ViT chapter's 49, so that 40 epochs fit a full run's budget."""
    return ViTConfig(image_size=28, patch_size=7, in_channels=1,
                     classes=10, dim=64, depth=4, heads=4, mlp_dim=128,
                     dropout=0.0, attention_dropout=0.0,
                     layer_norm_eps=1e-5, position_embeddings=True,
                     input_mean=0.1307, input_std=0.3081)


@dataclasses.dataclass
class CLIPConfig:
    image: ViTConfig | HybridConfig = dataclasses.field(
        default_factory=_default_image)  # the image encoder's
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    embed_dim: int = 64  # the joint space's width
    init_temperature: float = 0.07  # the paper's: scale 1 / 0.07 = 14.3
    max_scale: float = 100.0  # the paper's clip on exp(logit_scale)

    def __post_init__(self):
        if not isinstance(self.image, (ViTConfig, HybridConfig)):
            raise TypeError(f"image must be a ViTConfig or HybridConfig, "
                            f"got {type(self.image).__name__}")
        if self.embed_dim < 1 or not 0 < self.init_temperature:
            raise ValueError(f"expected embed_dim >= 1 and a positive "
                             f"temperature, got {self.embed_dim} and "
                             f"{self.init_temperature}")
        if not 1 / self.init_temperature <= self.max_scale:
            raise ValueError(f"the initial scale 1/{self.init_temperature}"
                             f" exceeds max_scale={self.max_scale}")


class CLIP(nn.Module):
    """forward(images, ids) -> (logits_per_image (B_i, B_t),
    logits_per_text (B_t, B_i)), scaled cosines."""

    def __init__(self, config: CLIPConfig = CLIPConfig()):
        super().__init__()
        c = self.config = config
        self.image_encoder = ImageEncoder(c.image)
        self.text_encoder = TextEncoder(c.text)
        self.image_projection = nn.Linear(self.image_encoder.dim,
                                          c.embed_dim, bias=False)
        self.text_projection = nn.Linear(c.text.dim, c.embed_dim,
                                         bias=False)
        self.logit_scale = nn.Parameter(
            torch.tensor(math.log(1 / c.init_temperature)))  # t = log s

    def encode_image(self, images: Tensor) -> Tensor:
        """(B, 28, 28) -> unit vectors (B, embed_dim)."""
        pooled = self.image_encoder(images)[1]  # (B, D_image)
        return F.normalize(self.image_projection(pooled), dim=-1)

    def encode_text(self, ids: Tensor) -> Tensor:
        """(B, L) ids -> unit vectors (B, embed_dim)."""
        pooled = self.text_encoder(ids)[1]  # (B, D_text)
        return F.normalize(self.text_projection(pooled), dim=-1)

    def scale(self) -> Tensor:
        """s = exp(t), clipped at max_scale."""
        return self.logit_scale.exp().clamp(max=self.config.max_scale)

    def forward(self, images: Tensor, ids: Tensor
                ) -> tuple[Tensor, Tensor]:
        u = self.encode_image(images)  # (B_i, E)
        v = self.encode_text(ids)  # (B_t, E)
        logits_per_image = self.scale() * u @ v.T  # (B_i, B_t)
        return logits_per_image, logits_per_image.T


WEIGHTS = RESULTS_DIR / "clip_mnist.safetensors"  # the full run's model
TRAINED = CLIPConfig()  # the configuration the full run trains


def load_trained_clip(path=WEIGHTS, config: CLIPConfig = TRAINED) -> CLIP:
    """The CLIP the full run trained and saved, in eval mode."""
    model = CLIP(config)
    tensors, _ = load_safetensors(path)  # (tensors, metadata)
    model.load_state_dict(tensors)
    return model.eval()


# § The symmetric contrastive loss (docs/frontiers/clip.md:619)
def clip_loss(logits_per_image: Tensor, labels: Tensor | None = None
              ) -> Tensor:
    """Mean of the cross entropies over rows (image -> captions) and
    columns (caption -> images). Without labels, pair i is image i with
    caption i; with labels (B,), every pair of one digit is a match and
    each row's and column's target is uniform over its matches."""
    if logits_per_image.ndim != 2 or \
            logits_per_image.shape[0] != logits_per_image.shape[1]:
        raise ValueError(f"expected square logits (B, B), got "
                         f"{tuple(logits_per_image.shape)}")
    B = logits_per_image.shape[0]
    if labels is None:
        targets = torch.arange(B, device=logits_per_image.device)  # (B,)
        return (F.cross_entropy(logits_per_image, targets)
                + F.cross_entropy(logits_per_image.T, targets)) / 2
    if labels.shape != (B,):
        raise ValueError(f"expected labels ({B},), got "
                         f"{tuple(labels.shape)}")
    match = (labels[:, None] == labels[None, :]).to(
        logits_per_image.dtype)  # (B, B), symmetric, 1 on the diagonal
    targets = match / match.sum(dim=1, keepdim=True)  # rows sum to 1
    return (F.cross_entropy(logits_per_image, targets)
            + F.cross_entropy(logits_per_image.T, targets)) / 2


# § The Hugging Face layout (docs/frontiers/clip.md:697)
def config_to_hf(config: CLIPConfig) -> dict:
    """Our config as the fields of transformers' CLIPConfig (JSON-ready).
    The vision fields describe the ViT tower; the hybrid has no
    counterpart there."""
    if not isinstance(config.image, ViTConfig):
        raise ValueError("Hugging Face's CLIP has no convolutional stem: "
                         "expected a ViTConfig image tower, got "
                         f"{type(config.image).__name__}")
    v, t = config.image, config.text
    if not v.position_embeddings:
        raise ValueError("Hugging Face's CLIP always has position "
                         "embeddings; got position_embeddings=False")
    text = {"vocab_size": t.vocab_size, "hidden_size": t.dim,
            "intermediate_size": t.mlp_dim,
            "num_hidden_layers": t.depth, "num_attention_heads": t.heads,
            "max_position_embeddings": t.max_len,
            "hidden_act": "gelu",  # exact, not CLIP's quick_gelu
            "layer_norm_eps": t.layer_norm_eps,
            "attention_dropout": t.attention_dropout,
            "projection_dim": config.embed_dim,
            "pad_token_id": WORDS.index("<pad>"),
            "bos_token_id": WORDS.index("<start>"),
            "eos_token_id": t.eos_id}  # not 2: pooled at the first end
    vision = {"hidden_size": v.dim, "intermediate_size": v.mlp_dim,
              "num_hidden_layers": v.depth, "num_attention_heads": v.heads,
              "num_channels": v.in_channels, "image_size": v.image_size,
              "patch_size": v.patch_size, "hidden_act": "gelu",
              "layer_norm_eps": v.layer_norm_eps,
              "attention_dropout": v.attention_dropout,
              "projection_dim": config.embed_dim}
    return {"model_type": "clip", "text_config": text,
            "vision_config": vision, "projection_dim": config.embed_dim,
            "logit_scale_init_value": math.log(1 / config.init_temperature)}


def _block_names(ours: str, theirs: str, depth: int) -> dict[str, str]:
    """One tower's blocks: our parameter names -> Hugging Face's."""
    per_layer = {"norm1": "layer_norm1", "norm2": "layer_norm2",
                 "attn.q_proj": "self_attn.q_proj",
                 "attn.k_proj": "self_attn.k_proj",
                 "attn.v_proj": "self_attn.v_proj",
                 "attn.out_proj": "self_attn.out_proj",
                 "mlp.up": "mlp.fc1", "mlp.down": "mlp.fc2"}
    return {f"{ours}.{i}.{a}.{kind}": f"{theirs}.{i}.{b}.{kind}"
            for i in range(depth) for a, b in per_layer.items()
            for kind in ("weight", "bias")}


def export_hf(model: CLIP) -> tuple[dict[str, Tensor], dict]:
    """(state_dict, config) in the layout of transformers' CLIPModel.

    Hugging Face's model takes standardised pixels (B, C, H, W): feed it
    (x - mean) / std with the image config's input_mean and input_std.
    """
    hf = config_to_hf(model.config)
    ours = {k: v.detach().clone() for k, v in model.state_dict().items()}
    T, V = "text_model.", "vision_model."
    vit = "image_encoder.vit."
    positions = ours[vit + "positions"][0]  # (1 + N, D)
    positions[1:] += ours[vit + "patch_embed.projection.bias"]  # fold b
    state = {
        T + "embeddings.token_embedding.weight":
            ours["text_encoder.token_embedding.weight"],
        T + "embeddings.position_embedding.weight":
            ours["text_encoder.positions"][0],  # (L, D)
        T + "final_layer_norm.weight": ours["text_encoder.norm.weight"],
        T + "final_layer_norm.bias": ours["text_encoder.norm.bias"],
        V + "embeddings.class_embedding": ours[vit + "cls_token"].flatten(),
        V + "embeddings.patch_embedding.weight":
            ours[vit + "patch_embed.projection.weight"],
        V + "embeddings.position_embedding.weight": positions,
        V + "pre_layrnorm.weight": ours["image_encoder.pre_norm.weight"],
        V + "pre_layrnorm.bias": ours["image_encoder.pre_norm.bias"],
        V + "post_layernorm.weight": ours[vit + "norm.weight"],
        V + "post_layernorm.bias": ours[vit + "norm.bias"],
        "visual_projection.weight": ours["image_projection.weight"],
        "text_projection.weight": ours["text_projection.weight"],
        "logit_scale": ours["logit_scale"],
    }
    blocks = {**_block_names("text_encoder.blocks", T + "encoder.layers",
                             model.config.text.depth),
              **_block_names(vit + "blocks", V + "encoder.layers",
                             model.config.image.depth)}
    state.update({theirs: ours[name] for name, theirs in blocks.items()})
    return state, hf


# § Training on captioned digits (docs/frontiers/clip.md:803)
@dataclasses.dataclass
class CLIPRecipe:
    epochs: int = 20  # passes over the 8,000 digits
    batch_size: int = 128  # 63 steps an epoch; about 13 of each digit
    lr: float = 1e-3  # peak, the ViT chapter's
    warmup: float = 0.1  # fraction of the steps warming up, then cosine
    weight_decay: float = 0.1  # AdamW's, on the matrices only (the
    # paper: 0.2)
    max_shift: int = 2  # random shifts, as the ViT chapter's recipe
    targets: str = "matching"  # or "diagonal": see the loss's section
    bf16: bool = False  # autocast matrix products to bfloat16
    seed: int = 0  # initial weights, batch order, shifts and captions
    device: str | None = None  # None: "cuda" when available, else "cpu"

    def __post_init__(self):
        if self.targets not in ("matching", "diagonal"):
            raise ValueError(f"targets must be 'matching' or 'diagonal', "
                             f"got {self.targets!r}")
        if self.epochs < 1 or self.batch_size < 2:
            raise ValueError(f"expected epochs >= 1 and batch_size >= 2, "
                             f"got {self.epochs} and {self.batch_size}")
        if not self.lr > 0 or not 0 < self.warmup < 1:
            raise ValueError(f"expected lr > 0 and warmup in (0, 1), got "
                             f"lr={self.lr}, warmup={self.warmup}")


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's parameter groups: decay the matrices (linear and
    convolution weights, embeddings), not gains, biases, the class token,
    positions or the temperature."""
    decay, keep = [], []
    for name, p in model.named_parameters():
        matrix = p.ndim >= 2 and "positions" not in name and \
            "cls_token" not in name
        (decay if matrix else keep).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": keep, "weight_decay": 0.0}]


def train_clip(model: CLIP, train_data, val_data,
               recipe: CLIPRecipe = CLIPRecipe(), log=None) -> dict:
    """Train on (uint8 images (N, 28, 28), labels (N,)) with captions
    from TRAIN_TEMPLATES; after each epoch, zero-shot accuracy on
    val_data with HELD_OUT_TEMPLATES, and log(history) if given.
    Returns the history."""
    images, labels = train_data
    device = pick_device(recipe.device)
    generator = seed_everything(recipe.seed)  # batches, shifts, captions
    model.to(device)
    tokenizer = CaptionTokenizer(max_len=model.config.text.max_len)
    x_all = images.to(device).float() / 255  # (N, 28, 28) in [0, 1]
    n, B = len(x_all), recipe.batch_size
    per_epoch = math.ceil(n / B)
    total = recipe.epochs * per_epoch
    optimiser = torch.optim.AdamW(decay_groups(model, recipe.weight_decay),
                                  lr=recipe.lr, betas=(0.9, 0.98),
                                  eps=1e-6)  # the paper's betas and eps
    scheduler = Scheduler(optimiser, warmup_cosine(
        max(1, round(recipe.warmup * total)), total))
    history = {"step_loss": [], "zero_shot": [], "scale": [],
               "seconds": []}
    start = time.perf_counter()
    for epoch in range(recipe.epochs):
        model.train()
        order = torch.randperm(n, generator=generator)  # (N,)
        for i in range(per_epoch):
            index = order[i * B:(i + 1) * B]  # (B,)
            x = random_shift(x_all[index.to(device)], recipe.max_shift,
                             generator)  # (B, 28, 28)
            y = labels[index]  # (B,)
            ids = tokenizer.encode(captions_for(y, TRAIN_TEMPLATES,
                                                generator))  # (B, L)
            with torch.autocast(device.type, torch.bfloat16,
                                enabled=recipe.bf16):
                logits, _ = model(x, ids.to(device))  # (B, B)
            loss = clip_loss(logits.float(), y.to(device)
                             if recipe.targets == "matching" else None)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            scheduler.step()
            history["step_loss"].append(loss.item())
        history["zero_shot"].append(zero_shot(model, *val_data)["mean"])
        history["scale"].append(model.scale().item())
        history["seconds"].append(time.perf_counter() - start)
        if log is not None:
            log(history)
    return history


# § Zero-shot classification and retrieval (docs/frontiers/clip.md:938)
@torch.no_grad()
def embed_images(model: CLIP, images: Tensor, batch_size: int = 1000
                 ) -> Tensor:
    """uint8 images (N, 28, 28) -> unit vectors (N, E)."""
    device = next(model.parameters()).device
    with eval_mode(model):
        return torch.cat([model.encode_image(
            images[i:i + batch_size].to(device).float() / 255)
            for i in range(0, len(images), batch_size)])  # (N, E)


@torch.no_grad()
def embed_captions(model: CLIP, captions: list[str]) -> Tensor:
    """Captions -> unit vectors (len(captions), E)."""
    device = next(model.parameters()).device
    ids = CaptionTokenizer(max_len=model.config.text.max_len).encode(
        captions)  # (n, L)
    with eval_mode(model):
        return model.encode_text(ids.to(device))  # (n, E)


def zero_shot(model: CLIP, images: Tensor, labels: Tensor,
              templates=HELD_OUT_TEMPLATES) -> dict:
    """Accuracy of picking, for each image, the nearest of the ten
    captions of a template; per template, and their mean."""
    u = embed_images(model, images)  # (N, E)
    scores = {}
    for template in templates:
        v = embed_captions(model, [fill(template, d) for d in range(10)])
        predictions = (u @ v.T).argmax(dim=1).cpu()  # (N,)
        scores[template] = (predictions == labels).float().mean().item()
    scores["mean"] = sum(scores.values()) / len(templates)
    return scores


def recall_at_1(model: CLIP, images: Tensor, labels: Tensor,
                templates=HELD_OUT_TEMPLATES, seed: int = 0) -> dict:
    """Retrieval among N images and N captions (one each, from random
    templates): the fraction of queries whose nearest item shows or says
    the same digit, image -> text and text -> image."""
    generator = torch.Generator().manual_seed(seed)
    u = embed_images(model, images)  # (N, E)
    v = embed_captions(model, captions_for(labels, templates, generator))
    similarity = (u @ v.T).cpu()  # (N images, N captions)
    image_to_text = labels[similarity.argmax(dim=1)] == labels  # (N,)
    text_to_image = labels[similarity.argmax(dim=0)] == labels  # (N,)
    return {"image_to_text": image_to_text.float().mean().item(),
            "text_to_image": text_to_image.float().mean().item()}


# § The full run (docs/frontiers/clip.md:1046)
RECIPE = CLIPRecipe(
    epochs=40,  # what the CPU budget of a full run affords (the record
    # says how long they took)
    bf16=True,  # matrix products in bfloat16 under autocast, as recorded
)
FULL_RUN_PARTS = ("clip", "targets")


def full_run(device: str | None = None, part: str = "clip",
             **overrides) -> dict:
    """One part of the full run on the book's MNIST split; its record.

    part "clip": TRAINED with RECIPE (overrides of CLIPRecipe fields,
    e.g. epochs=1), saving the weights to WEIGHTS. part "targets": the
    same model trained for TARGETS_EPOCHS with matching and with
    diagonal targets.
    """
    if part not in FULL_RUN_PARTS:
        raise ValueError(f"part must be one of {FULL_RUN_PARTS}, got "
                         f"{part!r}")
    train_data, val_data = mnist_split(seed=0)
    device = str(pick_device(device))
    if part == "clip":
        recipe, = override_configs(
            {"": dataclasses.replace(RECIPE, device=device)}, overrides)
        record, model = train_record(recipe, train_data, val_data)
        save_safetensors(WEIGHTS, {k: v.detach().float().cpu()
                                   for k, v in model.state_dict().items()})
        return {"device": device, **record}
    runs = {}
    for targets in ("matching", "diagonal"):
        recipe, = override_configs({"": dataclasses.replace(
            RECIPE, epochs=TARGETS_EPOCHS, targets=targets,
            device=device)}, overrides)
        runs[targets], _ = train_record(recipe, train_data, val_data)
    return {"device": device, "runs": runs}


TARGETS_EPOCHS = 8  # each of the targets part's two runs


def train_record(recipe: CLIPRecipe, train_data, val_data):
    """Seed, build TRAINED, train: (the numbers the chapter shows, the
    model)."""
    seed_everything(recipe.seed)
    model = CLIP(TRAINED)
    history = train_clip(model, train_data, val_data, recipe)
    model.cpu()
    record = {"zero_shot": zero_shot(model, *val_data),
              "recall_at_1": recall_at_1(model, *val_data),
              "seconds": history["seconds"][-1],
              "parameters": sum(p.numel() for p in model.parameters()),
              "recipe": dataclasses.asdict(recipe),
              "model": dataclasses.asdict(model.config),
              "history": history}
    return record, model
