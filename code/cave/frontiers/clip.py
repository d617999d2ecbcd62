# Generated from docs/frontiers/clip.md by `python -m cave.book tangle`.
# Do not edit: edit the chapter, then regenerate. CI fails on drift.


# § CLIP: images and captions in one space (docs/frontiers/clip.md:32)
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

tests/test_clip.py proves logits and loss equal to transformers'.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from cave.fundamentals.checkpoints import load_safetensors
from cave.fundamentals.data import RESULTS_DIR
from cave.transformers.transformer import LayerNorm
from cave.transformers.vit import (HybridConfig, HybridViT, ViT, ViTBlock,
                                   ViTConfig)


# § Captions the book writes itself (docs/frontiers/clip.md:106)
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


# § The text encoder: a causal Transformer, read at the end (docs/frontiers/clip.md:261)
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
        small = {k: v for k, v in sizes.items()
                 if not isinstance(v, int) or v < 1}
        if small:
            raise ValueError(f"expected positive ints, got {small}")
        if self.dim % self.heads:
            raise ValueError(f"heads must divide dim: got dim={self.dim}, "
                             f"heads={self.heads}")
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


# § The image encoder: the ViT, with one more LayerNorm (docs/frontiers/clip.md:404)
class ImageEncoder(nn.Module):
    """images (B, 28, 28) -> (states (B, 1 + N, D) after the final
    LayerNorm, pooled (B, D): the class token's)."""

    def __init__(self, config: ViTConfig | HybridConfig):
        super().__init__()
        self.config = config
        if isinstance(config, HybridConfig):
            self.hybrid = HybridViT(config)  # a ResNet stem, then a ViT
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


# § One space and a temperature (docs/frontiers/clip.md:473)
def _default_image() -> ViTConfig:
    """The image tower of the full run (every field named: the ViT
    chapter may change its defaults)."""
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
            torch.tensor(math.log(1 / c.init_temperature)))  # tau

    def encode_image(self, images: Tensor) -> Tensor:
        """(B, 28, 28) -> unit vectors (B, embed_dim)."""
        pooled = self.image_encoder(images)[1]  # (B, D_image)
        return F.normalize(self.image_projection(pooled), dim=-1)

    def encode_text(self, ids: Tensor) -> Tensor:
        """(B, L) ids -> unit vectors (B, embed_dim)."""
        pooled = self.text_encoder(ids)[1]  # (B, D_text)
        return F.normalize(self.text_projection(pooled), dim=-1)

    def scale(self) -> Tensor:
        """s = exp(tau), clipped at max_scale."""
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


# § The symmetric contrastive loss (docs/frontiers/clip.md:604)
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


# § The Hugging Face layout (docs/frontiers/clip.md:653)
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
