# Generated from docs/transformers/transformer.md by `python -m cave.book tangle`.
# Do not edit: edit the chapter, then regenerate. CI fails on drift.


# § The Transformer (docs/transformers/transformer.md:31)
"""The Transformer of "Attention Is All You Need" (2017), from scratch.

The chapter docs/transformers/transformer.md builds, in order:

    MultiHeadAttention    equal to nn.MultiheadAttention (batch_first)
    sinusoidal_encoding   the paper's fixed positional encoding
    PositionwiseFFN, LayerNorm
    EncoderLayer, DecoderLayer, Encoder, Decoder
                          post-norm (the paper) or pre-norm (a switch);
                          equal to nn.Transformer's layers
    Transformer           embeddings, encoder, decoder, output projection
    copy_from_torch       loads an nn.Transformer's weights into ours
    noam_lr, train_transformer
                          the paper's warmup schedule, label smoothing
    greedy, beam_search   decoding, beam search with a length penalty
    last_attention        what the last layers' heads attend to
    full_run              the default model trained for real

`cave run transformer --full` trains on the data chapter's dates task
(cave.fundamentals.data.DateTask) and records the result in
cave/_results/transformer.json.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch
import torch.nn as nn
from torch import Tensor

from cave.fundamentals.checkpoints import override_configs
from cave.fundamentals.data import DateTask, Vocab
from cave.fundamentals.deep_networks import Adam
from cave.fundamentals.essentials import (attention_weights, cross_entropy,
                                          eval_mode, layer_norm,
                                          pick_device,
                                          scaled_dot_product_attention,
                                          seed_everything)


# § Multi-head attention (docs/transformers/transformer.md:137)
def _as_additive(mask: Tensor, name: str, dtype: torch.dtype) -> Tensor:
    """A bool (True = masked out) or float mask as one added to scores."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device
                           ).masked_fill(mask, float("-inf"))
    if not mask.is_floating_point():
        raise TypeError(f"{name} must be bool (True = masked out) or "
                        f"floating (added to the scores), got {mask.dtype}")
    return mask.to(dtype)


def merge_masks(B: int, H: int, L: int, S: int,
                key_padding_mask: Tensor | None = None,
                attn_mask: Tensor | None = None, is_causal: bool = False,
                dtype: torch.dtype = torch.float32) -> Tensor | None:
    """Padding, attention and causal masks as one additive mask.

    key_padding_mask (B, S); attn_mask (L, S) or (B * H, L, S), as in
    nn.MultiheadAttention; is_causal adds the causal mask (L, S).
    Returns (B or 1, H or 1, L, S), broadcastable to the scores, or None.
    """
    total = None
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (B, S):
            raise ValueError(f"key_padding_mask must have shape (B, S) = "
                             f"{(B, S)}, got "
                             f"{tuple(key_padding_mask.shape)}")
        pad = _as_additive(key_padding_mask, "key_padding_mask", dtype)
        total = pad[:, None, None, :]  # (B, S) -> (B, 1, 1, S)
    if attn_mask is not None:
        if tuple(attn_mask.shape) == (L, S):
            m = _as_additive(attn_mask, "attn_mask", dtype)  # (L, S)
        elif tuple(attn_mask.shape) == (B * H, L, S):
            m = _as_additive(attn_mask, "attn_mask", dtype
                             ).view(B, H, L, S)  # (B*H, L, S) -> (B, H, L, S)
        else:
            raise ValueError(f"attn_mask must have shape (L, S) = {(L, S)} "
                             f"or (B * H, L, S) = {(B * H, L, S)}, got "
                             f"{tuple(attn_mask.shape)}")
        total = m if total is None else total + m  # broadcast to (B, H, L, S)
    if is_causal:
        device = None if total is None else total.device
        causal = torch.ones(L, S, dtype=torch.bool, device=device
                            ).triu(1)  # (L, S): True above the diagonal
        m = _as_additive(causal, "causal mask", dtype)  # (L, S)
        total = m if total is None else total + m
    return total


class MultiHeadAttention(nn.Module):
    """h attentions in C/h-dimensional subspaces, like nn.MultiheadAttention.

    forward(query (B, L, C), key (B, S, C), value (B, S, C), masks) ->
    (B, L, C), and the weights (B, h, L, S) when need_weights=True.
    Masks follow nn.MultiheadAttention: bool True = masked out, float =
    added to the scores. With record_weights set, the last weights are kept
    in .weights (for plots).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0,
                 bias: bool = True):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"n_heads must divide d_model: got d_model="
                             f"{d_model}, n_heads={n_heads} (expected a "
                             f"divisor of {d_model})")
        self.d_model, self.n_heads = d_model, n_heads
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        self.record_weights = False
        self.weights: Tensor | None = None

    def _split(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        x = x.view(B, T, self.n_heads, self.head_dim)  # (B, T, h, d)
        return x.transpose(1, 2)  # (B, h, T, d)

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Tensor | None = None,
                attn_mask: Tensor | None = None, is_causal: bool = False,
                need_weights: bool = False):
        if query.dim() != 3 or query.shape[-1] != self.d_model:
            raise ValueError(f"query must be (B, L, C={self.d_model}), got "
                             f"{tuple(query.shape)}")
        B, L, C = query.shape
        if (key.dim() != 3 or key.shape[0] != B or key.shape[-1] != C
                or value.shape != key.shape):
            raise ValueError(f"key and value must both be (B={B}, S, "
                             f"C={C}), got {tuple(key.shape)} and "
                             f"{tuple(value.shape)}")
        S = key.shape[1]
        q = self._split(self.q_proj(query))  # (B, L, C) -> (B, h, L, d)
        k = self._split(self.k_proj(key))  # (B, S, C) -> (B, h, S, d)
        v = self._split(self.v_proj(value))  # (B, S, C) -> (B, h, S, d)
        mask = merge_masks(B, self.n_heads, L, S, key_padding_mask,
                           attn_mask, is_causal, q.dtype)  # (B|1, h|1, L, S)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights or self.record_weights:  # the readable path
            weights = attention_weights(q, k, mask)  # (B, h, L, S)
            if self.record_weights:
                self.weights = weights.detach()
            out = nn.functional.dropout(weights, p, self.training
                                        ) @ v  # (B, h, L, d)
        else:  # the same arithmetic in one call
            out = scaled_dot_product_attention(q, k, v, mask,
                                               dropout_p=p)  # (B, h, L, d)
        out = out.transpose(1, 2).reshape(B, L, C)  # merge: (B, L, C)
        out = self.out_proj(out)  # (B, L, C)
        return (out, weights) if need_weights else out


@torch.no_grad()
def copy_mha(ours: MultiHeadAttention, theirs: nn.MultiheadAttention
             ) -> None:
    """Copy an nn.MultiheadAttention's weights into ours (same sizes)."""
    C = ours.d_model
    if (theirs.embed_dim, theirs.num_heads) != (C, ours.n_heads):
        raise ValueError(f"expected embed_dim={C}, num_heads="
                         f"{ours.n_heads}, got {theirs.embed_dim}, "
                         f"{theirs.num_heads}")
    if theirs.in_proj_weight is None:
        raise ValueError("expected packed in_proj_weight (kdim == vdim "
                         "== embed_dim)")
    projections = (ours.q_proj, ours.k_proj, ours.v_proj)
    for lin, w in zip(projections, theirs.in_proj_weight.chunk(3)):
        lin.weight.copy_(w)  # (C, C) each
    if theirs.in_proj_bias is not None:
        for lin, b in zip(projections, theirs.in_proj_bias.chunk(3)):
            lin.bias.copy_(b)  # (C,) each
    ours.out_proj.load_state_dict(theirs.out_proj.state_dict())


# § Where is each token? The positional encoding (docs/transformers/transformer.md:341)
def sinusoidal_encoding(n_positions: int, d_model: int) -> Tensor:
    """The paper's positional encoding, (n_positions, d_model)."""
    if d_model % 2 != 0:
        raise ValueError(f"d_model must be even (sin and cos pairs), got "
                         f"{d_model}")
    p = torch.arange(n_positions, dtype=torch.float32)[:, None]  # (P, 1)
    i = torch.arange(0, d_model, 2, dtype=torch.float32)  # (C/2,): 2i
    omega = torch.exp(-math.log(10000.0) * i / d_model)  # (C/2,)
    pe = torch.empty(n_positions, d_model)  # (P, C)
    pe[:, 0::2] = torch.sin(p * omega)  # (P, C/2)
    pe[:, 1::2] = torch.cos(p * omega)  # (P, C/2)
    return pe


# § The other pieces: feed-forward, layer norm, residuals (docs/transformers/transformer.md:435)
class LayerNorm(nn.Module):
    """The essentials' layer_norm with a learned gain and bias."""

    def __init__(self, d_model: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))
        self.bias = nn.Parameter(torch.zeros(d_model))

    def forward(self, x: Tensor) -> Tensor:
        return layer_norm(x, self.weight.shape[0], self.weight, self.bias,
                          self.eps)  # (..., C)


class PositionwiseFFN(nn.Module):
    """W2 relu(W1 x + b1) + b2 at every position: (..., C) -> (..., C)."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.linear1(x))  # (..., C) -> (..., d_ff)
        return self.linear2(self.dropout(h))  # (..., d_ff) -> (..., C)


# § Post-norm or pre-norm (docs/transformers/transformer.md:496)
@dataclasses.dataclass
class TransformerConfig:
    src_vocab: int = len(DateTask.SRC_CHARS) + 3  # characters + specials
    tgt_vocab: int = len(DateTask.TGT_CHARS) + 3
    d_model: int = 64  # the paper's 512 serves 37,000 words; dates need less
    n_heads: int = 4  # 16 dimensions a head
    d_ff: int = 256  # 4 * d_model, the paper's ratio
    n_encoder_layers: int = 2  # the paper has 6; two solve the dates
    n_decoder_layers: int = 2
    dropout: float = 0.1  # the paper's base model
    norm_first: bool = False  # False: the paper's post-norm; True: pre-norm
    share_embeddings: bool = False  # one table for both sides (one vocab)
    tie_output: bool = True  # output projection = target embedding (paper)
    max_len: int = 128  # positions the encoding table covers
    layer_norm_eps: float = 1e-5  # nn.Transformer's default


class EncoderLayer(nn.Module):
    """Self-attention, then the feed-forward network; post- or pre-norm."""

    def __init__(self, c: TransformerConfig):
        super().__init__()
        self.norm_first = c.norm_first
        self.self_attn = MultiHeadAttention(c.d_model, c.n_heads, c.dropout)
        self.ff = PositionwiseFFN(c.d_model, c.d_ff, c.dropout)
        self.norm1 = LayerNorm(c.d_model, c.layer_norm_eps)
        self.norm2 = LayerNorm(c.d_model, c.layer_norm_eps)
        self.dropout1 = nn.Dropout(c.dropout)
        self.dropout2 = nn.Dropout(c.dropout)

    def _sa(self, x, key_padding_mask, attn_mask):
        return self.dropout1(self.self_attn(
            x, x, x, key_padding_mask, attn_mask))  # (B, S, C)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None,
                attn_mask: Tensor | None = None) -> Tensor:
        """x (B, S, C) -> (B, S, C)."""
        if self.norm_first:
            x = x + self._sa(self.norm1(x), key_padding_mask, attn_mask)
            return x + self.dropout2(self.ff(self.norm2(x)))
        x = self.norm1(x + self._sa(x, key_padding_mask, attn_mask))
        return self.norm2(x + self.dropout2(self.ff(x)))


class DecoderLayer(nn.Module):
    """Causal self-attention, cross-attention to the memory, feed-forward."""

    def __init__(self, c: TransformerConfig):
        super().__init__()
        self.norm_first = c.norm_first
        self.self_attn = MultiHeadAttention(c.d_model, c.n_heads, c.dropout)
        self.cross_attn = MultiHeadAttention(c.d_model, c.n_heads,
                                             c.dropout)
        self.ff = PositionwiseFFN(c.d_model, c.d_ff, c.dropout)
        self.norm1 = LayerNorm(c.d_model, c.layer_norm_eps)
        self.norm2 = LayerNorm(c.d_model, c.layer_norm_eps)
        self.norm3 = LayerNorm(c.d_model, c.layer_norm_eps)
        self.dropout1 = nn.Dropout(c.dropout)
        self.dropout2 = nn.Dropout(c.dropout)
        self.dropout3 = nn.Dropout(c.dropout)

    def forward(self, x: Tensor, memory: Tensor,
                tgt_mask: Tensor | None = None,
                tgt_key_padding_mask: Tensor | None = None,
                memory_mask: Tensor | None = None,
                memory_key_padding_mask: Tensor | None = None,
                causal: bool = True) -> Tensor:
        """x (B, T, C), memory (B, S, C) -> (B, T, C)."""
        def sa(h):
            return self.dropout1(self.self_attn(
                h, h, h, tgt_key_padding_mask, tgt_mask, causal))
        def ca(h):
            return self.dropout2(self.cross_attn(
                h, memory, memory, memory_key_padding_mask, memory_mask))
        def ff(h):
            return self.dropout3(self.ff(h))
        if self.norm_first:
            x = x + sa(self.norm1(x))
            x = x + ca(self.norm2(x))
            return x + ff(self.norm3(x))
        x = self.norm1(x + sa(x))
        x = self.norm2(x + ca(x))
        return self.norm3(x + ff(x))


class Encoder(nn.Module):
    """n_encoder_layers EncoderLayers (+ a final norm when pre-norm)."""

    def __init__(self, c: TransformerConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(c)
                                    for _ in range(c.n_encoder_layers))
        self.norm = (LayerNorm(c.d_model, c.layer_norm_eps)
                     if c.norm_first else None)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None,
                attn_mask: Tensor | None = None) -> Tensor:
        for layer in self.layers:
            x = layer(x, key_padding_mask, attn_mask)  # (B, S, C)
        return x if self.norm is None else self.norm(x)


class Decoder(nn.Module):
    """n_decoder_layers DecoderLayers (+ a final norm when pre-norm)."""

    def __init__(self, c: TransformerConfig):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(c)
                                    for _ in range(c.n_decoder_layers))
        self.norm = (LayerNorm(c.d_model, c.layer_norm_eps)
                     if c.norm_first else None)

    def forward(self, x: Tensor, memory: Tensor, **masks) -> Tensor:
        for layer in self.layers:
            x = layer(x, memory, **masks)  # (B, T, C)
        return x if self.norm is None else self.norm(x)


# § The whole model (docs/transformers/transformer.md:646)
class Transformer(nn.Module):
    """The encoder-decoder of Vaswani et al. (2017).

    forward(src (B, S), tgt_in (B, T)) -> logits (B, T, tgt_vocab), with
    <pad> in the source masked out and the decoder causal.
    transform(src_x, tgt_x, masks...) is nn.Transformer.forward on
    already-embedded inputs (B, S, C), (B, T, C).
    """

    def __init__(self, config: TransformerConfig = TransformerConfig()):
        super().__init__()
        self.config = c = config
        if c.share_embeddings and c.src_vocab != c.tgt_vocab:
            raise ValueError(f"share_embeddings needs one vocabulary, got "
                             f"src_vocab={c.src_vocab}, "
                             f"tgt_vocab={c.tgt_vocab}")
        self.src_embed = nn.Embedding(c.src_vocab, c.d_model)
        self.tgt_embed = (self.src_embed if c.share_embeddings
                          else nn.Embedding(c.tgt_vocab, c.d_model))
        self.register_buffer("pe", sinusoidal_encoding(c.max_len, c.d_model),
                             persistent=False)  # (max_len, C)
        self.dropout = nn.Dropout(c.dropout)
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        self.out = nn.Linear(c.d_model, c.tgt_vocab, bias=False)
        for p in self.parameters():  # nn.Transformer's initialisation
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for table in {self.src_embed, self.tgt_embed}:  # times sqrt(C): ~1
            nn.init.normal_(table.weight, 0.0, c.d_model ** -0.5)
        if c.tie_output:
            self.out.weight = self.tgt_embed.weight  # (V, C), one tensor

    def embed(self, ids: Tensor, table: nn.Embedding) -> Tensor:
        """ids (B, T) -> embedding * sqrt(C) + PE, (B, T, C)."""
        if ids.dim() != 2 or ids.shape[1] > self.config.max_len:
            raise ValueError(f"expected ids (B, T <= {self.config.max_len})"
                             f", got {tuple(ids.shape)}")
        x = table(ids) * math.sqrt(self.config.d_model)  # (B, T, C)
        return self.dropout(x + self.pe[:ids.shape[1]])  # (B, T, C)

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """src (B, S) -> memory (B, S, C) and its padding mask (B, S)."""
        src_pad = src == Vocab.PAD  # (B, S), True = padding
        x = self.embed(src, self.src_embed)  # (B, S, C)
        return self.encoder(x, key_padding_mask=src_pad), src_pad

    def decode(self, tgt_in: Tensor, memory: Tensor, src_pad: Tensor
               ) -> Tensor:
        """tgt_in (B, T), memory (B, S, C) -> logits (B, T, tgt_vocab)."""
        y = self.embed(tgt_in, self.tgt_embed)  # (B, T, C)
        y = self.decoder(y, memory, memory_key_padding_mask=src_pad)
        return self.out(y)  # (B, T, C) -> (B, T, V)

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        memory, src_pad = self.encode(src)  # (B, S, C), (B, S)
        return self.decode(tgt_in, memory, src_pad)  # (B, T, V)

    def transform(self, src_x: Tensor, tgt_x: Tensor,
                  src_mask: Tensor | None = None,
                  tgt_mask: Tensor | None = None,
                  memory_mask: Tensor | None = None,
                  src_key_padding_mask: Tensor | None = None,
                  tgt_key_padding_mask: Tensor | None = None,
                  memory_key_padding_mask: Tensor | None = None) -> Tensor:
        """nn.Transformer.forward: (B, S, C), (B, T, C) -> (B, T, C)."""
        memory = self.encoder(src_x, src_key_padding_mask, src_mask)
        return self.decoder(tgt_x, memory, tgt_mask=tgt_mask,
                            tgt_key_padding_mask=tgt_key_padding_mask,
                            memory_mask=memory_mask,
                            memory_key_padding_mask=memory_key_padding_mask,
                            causal=False)  # (B, T, C)


@torch.no_grad()
def copy_from_torch(ours: Transformer, ref: nn.Transformer) -> None:
    """Copy nn.Transformer's (batch_first) stacks into ours, checked."""
    pairs = [(ours.encoder, ref.encoder), (ours.decoder, ref.decoder)]
    for mine, theirs in pairs:
        if len(mine.layers) != len(theirs.layers):
            raise ValueError(f"expected {len(mine.layers)} layers, got "
                             f"{len(theirs.layers)}")
        if (mine.norm is None) != (theirs.norm is None):
            raise ValueError(f"final norm: ours {mine.norm is not None}, "
                             f"theirs {theirs.norm is not None} (set "
                             f"ref.encoder.norm = ref.decoder.norm = None "
                             f"for post-norm)")
        if mine.norm is not None:
            mine.norm.load_state_dict(theirs.norm.state_dict())
        for a, b in zip(mine.layers, theirs.layers):
            if a.norm_first != b.norm_first:
                raise ValueError(f"norm_first: ours {a.norm_first}, "
                                 f"theirs {b.norm_first}")
            copy_mha(a.self_attn, b.self_attn)
            if isinstance(a, DecoderLayer):
                copy_mha(a.cross_attn, b.multihead_attn)
                a.norm3.load_state_dict(b.norm3.state_dict())
            a.ff.linear1.load_state_dict(b.linear1.state_dict())
            a.ff.linear2.load_state_dict(b.linear2.state_dict())
            a.norm1.load_state_dict(b.norm1.state_dict())
            a.norm2.load_state_dict(b.norm2.state_dict())


# § Training on the dates (docs/transformers/transformer.md:819)
def noam_lr(step: int, d_model: int, warmup: int, scale: float = 1.0
            ) -> float:
    """The paper's schedule: linear warmup, then 1/sqrt(step) decay."""
    step = max(step, 1)
    return scale * d_model ** -0.5 * min(step ** -0.5,
                                         step * warmup ** -1.5)


@dataclasses.dataclass
class TransformerTrainConfig:
    epochs: int = 6  # two passes reach ~94 % in our runs; six for 99 %
    batch_size: int = 128  # 235 steps an epoch on 30,000 pairs
    warmup: int = 200  # the paper's 4,000 was 4 % of its 100,000 steps
    lr_scale: float = 1.0  # the paper's schedule as it is
    label_smoothing: float = 0.1  # the paper's
    betas: tuple[float, float] = (0.9, 0.98)  # the paper's
    eps: float = 1e-9  # the paper's
    seed: int = 0  # batch order (the weights: torch.manual_seed)


def transformer_loss(model: Transformer, src: Tensor, tgt: Tensor,
                     label_smoothing: float = 0.0) -> Tensor:
    """Teacher forcing: read tgt[:, :-1], predict tgt[:, 1:]."""
    logits = model(src, tgt[:, :-1])  # (B, T, V)
    return cross_entropy(logits.reshape(-1, logits.shape[-1]),
                         tgt[:, 1:].reshape(-1), ignore_index=Vocab.PAD,
                         label_smoothing=label_smoothing)  # (B*T, V)


def train_transformer(model: Transformer, task: DateTask,
                      config: TransformerTrainConfig =
                      TransformerTrainConfig(),
                      max_steps: int | None = None) -> list[float]:
    """Adam with the warmup schedule; returns every step's loss."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(config.seed)
    steps = config.epochs * math.ceil(len(task.train) / config.batch_size)
    steps = steps if max_steps is None else min(steps, max_steps)
    optimiser = Adam(model.parameters(), lr=0.0, betas=config.betas,
                     eps=config.eps)
    losses: list[float] = []
    model.train()
    while len(losses) < steps:
        for src, _, tgt in task.batches("train", config.batch_size,
                                        generator):
            for group in optimiser.param_groups:
                group["lr"] = noam_lr(len(losses) + 1, model.config.d_model,
                                      config.warmup, config.lr_scale)
            loss = transformer_loss(model, src.to(device), tgt.to(device),
                                    config.label_smoothing)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
            if len(losses) == steps:
                break
    return losses


# § Decoding: greedy and beam search (docs/transformers/transformer.md:894)
def next_log_probs(model: Transformer, ys: Tensor, memory: Tensor,
                   src_pad: Tensor) -> Tensor:
    """log p(next | ys (B, t), source) over the vocabulary, (B, V);
    <pad> and <bos> get -inf: they are never generated."""
    logits = model.decode(ys, memory, src_pad)[:, -1]  # (B, V)
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
    logp[:, [Vocab.PAD, Vocab.BOS]] = float("-inf")
    return logp


@torch.no_grad()
def greedy(model: Transformer, src: Tensor, max_len: int = 11) -> Tensor:
    """src (B, S) -> ids (B, max_len): the argmax each step, <pad> after
    <eos>."""
    ys = torch.full((src.shape[0], 1), Vocab.BOS,
                    device=src.device)  # (B, 1)
    done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
    with eval_mode(model):
        memory, src_pad = model.encode(src)  # (B, S, C), (B, S)
        for _ in range(max_len):
            nxt = next_log_probs(model, ys, memory, src_pad
                                 ).argmax(-1)  # (B,)
            nxt = nxt.masked_fill(done, Vocab.PAD)
            done |= nxt == Vocab.EOS
            ys = torch.cat([ys, nxt[:, None]], dim=1)  # (B, t + 1)
    return ys[:, 1:]  # (B, max_len)


def length_penalty(n: int, alpha: float) -> float:
    """Wu et al. (2016): ((5 + n) / 6) ** alpha."""
    return ((5 + n) / 6) ** alpha


@torch.no_grad()
def beam_search(model: Transformer, src: Tensor, beam_width: int = 4,
                max_len: int = 11, alpha: float = 0.6
                ) -> tuple[list[int], float]:
    """The best hypothesis for one source src (1, S): (ids, with <eos> if
    it ended, and score = log p / length_penalty(len(ids), alpha))."""
    if src.dim() != 2 or src.shape[0] != 1:
        raise ValueError(f"beam_search takes one source (1, S), got "
                         f"{tuple(src.shape)}")
    if not isinstance(beam_width, int) or beam_width < 1:
        raise ValueError(f"beam_width must be a positive int, got "
                         f"{beam_width!r}")
    beams = torch.full((1, 1), Vocab.BOS, device=src.device)  # (W, 1)
    scores = torch.zeros(1, device=src.device)  # (W,): sum of log p
    finished: list[tuple[float, list[int]]] = []
    with eval_mode(model):
        memory, src_pad = model.encode(src)  # (1, S, C), (1, S)
        for t in range(1, max_len + 1):
            W = beams.shape[0]
            logp = next_log_probs(model, beams, memory.expand(W, -1, -1),
                                  src_pad.expand(W, -1))  # (W, V)
            V = logp.shape[1]
            total = (scores[:, None] + logp).flatten()  # (W * V,)
            k = min(beam_width, int(torch.isfinite(total).sum()))
            top, index = total.topk(k)  # (k,) best extensions
            rows, tokens = index // V, index % V  # (k,), (k,)
            seqs = torch.cat([beams[rows], tokens[:, None]],
                             dim=1)  # (k, t + 1)
            ended = (tokens == Vocab.EOS) | (t == max_len)  # (k,)
            for s, seq in zip(top[ended].tolist(), seqs[ended]):
                finished.append((s / length_penalty(t, alpha),
                                 seq[1:].tolist()))
            beams, scores = seqs[~ended], top[~ended]  # the beam shrinks
            if len(beams) == 0:
                break
    score, ids = max(finished, key=lambda f: f[0])
    return ids, score


# § What the heads look at (docs/transformers/transformer.md:1068)
@torch.no_grad()
def last_attention(model: Transformer, src: Tensor, tgt_in: Tensor
                   ) -> tuple[Tensor, Tensor]:
    """src (1, S), tgt_in (1, T) -> the weights of the last encoder
    self-attention (H, S, S) and of the last cross-attention (H, T, S)."""
    enc = model.encoder.layers[-1].self_attn
    cross = model.decoder.layers[-1].cross_attn
    enc.record_weights = cross.record_weights = True
    try:
        with eval_mode(model):
            model(src, tgt_in)  # (1, T, V); the weights are what we want
    finally:
        enc.record_weights = cross.record_weights = False
    return enc.weights[0], cross.weights[0]  # (H, S, S), (H, T, S)


# § The full run (docs/transformers/transformer.md:1155)
def full_run(device: str | None = None, **overrides) -> dict:
    """Train the default model for real; return the record
    transformer.json keeps. overrides: TransformerTrainConfig fields."""
    (config,) = override_configs({"": TransformerTrainConfig()}, overrides)
    device = pick_device(device)
    task = DateTask(seed=0)
    seed_everything(0)  # the weights; config.seed orders the batches
    model = Transformer().to(device)
    start = time.perf_counter()
    losses = train_transformer(model, task, config)
    seconds = time.perf_counter() - start

    def decode(src: Tensor, lengths: Tensor) -> Tensor:
        return greedy(model, src)  # ids (B, 11); padding marks the lengths

    val, _ = task.exact_match(decode, "val", device=device)
    test, outputs = task.exact_match(decode, "test", device=device)
    src, lengths, _ = task.tensors("test")
    n_beam = 200  # beam search decodes one source at a time: a sample
    beam_right = 0
    for i in range(n_beam):
        ids, _ = beam_search(model, src[i:i + 1, :lengths[i]].to(device))
        beam_right += task.tgt_vocab.decode(ids) == task.test[i][1]
    source = task.test[0][0]
    src0 = task.src_vocab.encode(source)[None].to(device)  # (1, S)
    output = task.tgt_vocab.decode(greedy(model, src0)[0])
    encoder_self, cross = last_attention(
        model, src0, task.tgt_vocab.encode(output, bos=True)[None].to(device))
    return {
        "device": str(device),
        "task": repr(task), "model": dataclasses.asdict(model.config),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train": dataclasses.asdict(config), "steps": len(losses),
        "final_train_loss": losses[-1], "seconds": seconds,
        "loss_every_5_steps": losses[::5],
        "val_exact_match": val, "test_exact_match": test,
        "beam_test_exact_match": beam_right / n_beam, "beam_examples": n_beam,
        "test_errors": [(s, t, o) for (s, t), o in zip(task.test, outputs)
                        if o != t][:20],
        "attention_example": {
            "source": source, "output": output,
            "encoder_self": encoder_self.cpu().tolist(),
            "cross": cross.cpu().tolist()}}
