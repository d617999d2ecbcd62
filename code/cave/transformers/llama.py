# Generated from docs/transformers/llama.md by `python -m cave.book tangle`.
# Do not edit: edit the chapter, then regenerate. CI fails on drift.


# § LLaMA: a modern decoder, piece by piece (docs/transformers/llama.md:36)
"""LLaMA from scratch: the model, its KV cache, sampling, beam search, and
conversion to and from the Hugging Face layout.

The chapter docs/transformers/llama.md builds, in order:

    LlamaConfig        every size of the model, with a reason per default
    RMSNorm            root-mean-square normalisation (= torch.nn.RMSNorm)
    rope_angles, apply_rope, apply_rope_halves
                       rotary position embeddings, both pairing conventions
    KVCache            preallocated keys and values for generation
    Attention          grouped-query attention with RoPE and a KV cache
    FeedForward        the SwiGLU feed-forward layer
    Block, Llama       the pre-norm block and the whole model
    top_k_filter, top_p_filter, sample_next, generate
                       sampling with temperature, top-k and top-p
    beam_search        beam search with optional length normalisation
    export_hf, import_hf, config_to_hf, config_from_hf
                       the Hugging Face LlamaForCausalLM layout, both ways

Our model keeps Meta's original layout: Meta's parameter names and RoPE
on interleaved pairs. export_hf/import_hf convert to and from Hugging
Face's names and half-split RoPE; tests/test_llama.py proves that the
logits agree with transformers' own LlamaForCausalLM in both directions.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cave.fundamentals.essentials import (cross_entropy, eval_mode,
                                          log_softmax,
                                          scaled_dot_product_attention,
                                          softmax)

__all__ = [
    "LlamaConfig", "RMSNorm", "rope_angles", "apply_rope",
    "apply_rope_halves", "repeat_kv", "KVCache", "Attention", "FeedForward",
    "Block", "Llama", "kv_cache_bytes", "top_k_filter", "top_p_filter",
    "sample_next", "generate", "beam_search", "permute_to_halves",
    "permute_to_interleaved", "config_to_hf", "config_from_hf", "export_hf",
    "import_hf",
]


# § The configuration (docs/transformers/llama.md:110)
@dataclasses.dataclass
class LlamaConfig:
    vocab_size: int = 65  # Tiny Shakespeare's characters (the data
    # chapter's tokeniser); LLaMA 1 and 2 use 32,000 tokens, Llama 3 128,256
    dim: int = 256  # the width of every token vector; LLaMA 7B uses 4096.
    # 256 is wide enough to write plausible English, small enough for a CPU
    n_layers: int = 6  # blocks; LLaMA 7B stacks 32
    n_heads: int = 8  # query heads, so head_dim = 256 / 8 = 32; LLaMA keeps
    # head_dim at 128 at every size, small models do well with 32 to 64
    n_kv_heads: int = 4  # key-value heads, shared by n_heads / n_kv_heads
    # query heads each: half the KV cache of plain multi-head attention;
    # Llama 3 8B shares each of its 8 key-value heads among 4 query heads
    hidden_dim: int | None = None  # the SwiGLU width; None: LLaMA's rule,
    # 2/3 of 4 * dim rounded up to multiple_of (see ffn_dim), which gives
    # its three matrices the parameters of a 4 * dim two-matrix MLP
    multiple_of: int = 32  # Meta rounds to 256 at 4096 wide; for small
    # widths 32 keeps matrix sides friendly to vector units without waste
    max_seq_len: int = 256  # the longest context: sizes the KV cache and
    # bounds positions; RoPE itself has no limit. LLaMA 2: 4096 tokens
    rope_theta: float = 10000.0  # RoPE's base wavelength, as in the RoPE
    # paper and LLaMA 1 and 2; Llama 3 uses 500,000 for long contexts
    norm_eps: float = 1e-5  # added under RMSNorm's square root; LLaMA 2's
    # and Llama 3's value, small beside the mean square of a trained vector
    tie_embeddings: bool = False  # LLaMA keeps separate input and output
    # matrices; tying saves vocab_size * dim weights, which matters for small
    # models with big vocabularies (Llama 3.2 1B ties)
    dropout: float = 0.0  # LLaMA trains without dropout (its data is never
    # repeated); a small model on 1 MB of text may want 0.1 or 0.2
    init_std: float = 0.02  # the standard deviation of every initial weight
    # matrix (GPT-2's and Hugging Face's initializer_range)
    fast_attention: bool = True  # F.scaled_dot_product_attention's fused
    # kernels; False runs the readable path built in the essentials chapter

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads",
                     "n_kv_heads", "multiple_of", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, "
                                 f"got {value!r}")
        if self.dim % self.n_heads:
            raise ValueError(
                f"dim must be divisible by n_heads: expected a multiple of "
                f"{self.n_heads}, got dim={self.dim}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads must be divisible by n_kv_heads: expected a "
                f"multiple of n_kv_heads={self.n_kv_heads}, got "
                f"n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"RoPE rotates pairs, so head_dim = dim / "
                             f"n_heads must be even, got {self.head_dim}")
        if self.hidden_dim is not None and self.hidden_dim < 1:
            raise ValueError(f"hidden_dim must be positive or None, "
                             f"got {self.hidden_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.rope_theta <= 1 or self.norm_eps <= 0:
            raise ValueError(f"need rope_theta > 1 and norm_eps > 0, got "
                             f"{self.rope_theta} and {self.norm_eps}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        """hidden_dim, or LLaMA's rule: 2/3 * 4 * dim, up to multiple_of."""
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)


# § RMSNorm (docs/transformers/llama.md:228)
def at_least_float32(x: Tensor) -> Tensor:
    """x in float32, or in float64 if it is already: never less precise."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension.

    Equal to torch.nn.RMSNorm(dim, eps); computed in float32 and cast back,
    as LLaMA does, so that bfloat16 inputs keep their precision.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))  # (dim,), the gain g

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.weight.shape[0]:
            raise ValueError(f"RMSNorm expected last dimension "
                             f"{self.weight.shape[0]}, got {tuple(x.shape)}")
        x32 = at_least_float32(x)
        rms = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * rms).type_as(x) * self.weight  # same shape as x

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


# § Rotary position embeddings (docs/transformers/llama.md:340)
def rope_angles(positions: Tensor, head_dim: int, theta: float = 10000.0
                ) -> tuple[Tensor, Tensor]:
    """cos and sin of m * theta_i for each position m and pair i.

    positions (T,) integers -> cos, sin, each (T, head_dim / 2) float32.
    theta_i = theta ** (-2i / head_dim), computed as Hugging Face does.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    pairs = torch.arange(0, head_dim, 2, device=positions.device)  # (d/2,)
    inv_freq = 1.0 / (theta ** (pairs.float() / head_dim))  # (d/2,)
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, d/2)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... (Meta's layout).

    x (..., T, d); cos, sin (T, d/2) from rope_angles. Computed in float32
    (float64 stays float64) and cast back to x's dtype.
    """
    if x.shape[-2:] != (cos.shape[0], 2 * cos.shape[1]):
        raise ValueError(f"apply_rope: x {tuple(x.shape)} needs angles for "
                         f"(T, d) = {tuple(x.shape[-2:])}, got cos "
                         f"{tuple(cos.shape)}")
    pairs = at_least_float32(x).unflatten(-1, (-1, 2))  # (..., T, d/2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]  # (..., T, d/2) each
    out = torch.stack([x0 * cos - x1 * sin,
                       x0 * sin + x1 * cos], dim=-1)  # (..., T, d/2, 2)
    return out.flatten(-2).type_as(x)  # (..., T, d)


def apply_rope_halves(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x_i, x_{i + d/2}) (Hugging Face's and GPT-NeoX's).

    x (..., T, d); cos, sin (T, d/2). Same rotation as apply_rope, on the
    features permuted by permute_to_halves.
    """
    if x.shape[-2:] != (cos.shape[0], 2 * cos.shape[1]):
        raise ValueError(f"apply_rope_halves: x {tuple(x.shape)} needs "
                         f"angles for (T, d) = {tuple(x.shape[-2:])}, got "
                         f"cos {tuple(cos.shape)}")
    x32 = at_least_float32(x)
    first, second = x32.chunk(2, dim=-1)  # (..., T, d/2) each
    cos2, sin2 = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    rotated = torch.cat([-second, first], dim=-1)  # rotate_half(x)
    return (x32 * cos2 + rotated * sin2).type_as(x)  # (..., T, d)


# § Grouped-query attention (docs/transformers/llama.md:521)
def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """(B, H_kv, S, d) -> (B, H_kv * n_rep, S, d): kv head j serves query
    heads j * n_rep ... (j + 1) * n_rep - 1, as repeat_interleave does."""
    if n_rep == 1:
        return x
    B, H_kv, S, d = x.shape
    x = x[:, :, None].expand(B, H_kv, n_rep, S, d)  # (B, H_kv, n_rep, S, d)
    return x.reshape(B, H_kv * n_rep, S, d)  # (B, H, S, d)


# § The KV cache (docs/transformers/llama.md:548)
class KVCache:
    """Keys and values of past positions, per layer, preallocated.

    k[layer] and v[layer] are (batch_size, n_kv_heads, max_len, head_dim).
    """

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int,
                 max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device=None):
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device)
                  for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device)
                  for _ in range(n_layers)]
        self.batch_size, self.max_len = batch_size, max_len

    def update(self, layer: int, start_pos: int, k: Tensor, v: Tensor
               ) -> tuple[Tensor, Tensor]:
        """Store k, v (B, H_kv, T, d) at start_pos; return positions
        0 .. start_pos + T of this layer, each (B, H_kv, start_pos + T, d)."""
        end = start_pos + k.shape[2]
        if k.shape[0] != self.batch_size:
            raise ValueError(f"the cache holds batch size {self.batch_size}"
                             f", got keys of shape {tuple(k.shape)}")
        if start_pos < 0 or end > self.max_len:
            raise ValueError(f"positions {start_pos}..{end - 1} do not fit "
                             f"a cache of max_len {self.max_len}")
        self.k[layer][:, :, start_pos:end] = k
        self.v[layer][:, :, start_pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows `index` (B',), e.g. the parents of new beams."""
        self.k = [k[index] for k in self.k]
        self.v = [v[index] for v in self.v]
        self.batch_size = len(index)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


# § The attention layer (docs/transformers/llama.md:615)
class Attention(nn.Module):
    """Grouped-query self-attention with RoPE and an optional KV cache."""

    def __init__(self, config: LlamaConfig, layer_idx: int = 0):
        super().__init__()
        self.n_heads, self.n_kv_heads = config.n_heads, config.n_kv_heads
        self.head_dim, self.layer_idx = config.head_dim, layer_idx
        self.n_rep = config.n_heads // config.n_kv_heads  # group size
        kv_dim = config.n_kv_heads * config.head_dim
        self.wq = nn.Linear(config.dim, config.dim, bias=False)
        self.wk = nn.Linear(config.dim, kv_dim, bias=False)
        self.wv = nn.Linear(config.dim, kv_dim, bias=False)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)
        self.dropout = config.dropout
        self.fast = config.fast_attention

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor,
                cache: KVCache | None = None, start_pos: int = 0) -> Tensor:
        B, T, C = x.shape
        hd = self.head_dim
        q = self.wq(x).view(B, T, self.n_heads, hd).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, hd).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, hd).transpose(1, 2)
        # q (B, H, T, hd); k, v (B, H_kv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, start_pos, k, v)
            # k, v (B, H_kv, S, hd) with S = start_pos + T
        S = k.shape[2]
        mask, causal = None, S == T  # square: the top-left triangle is right
        if S != T and T > 1:  # new queries after cached keys: offset mask
            query_pos = torch.arange(S - T, S, device=x.device)  # (T,)
            mask = torch.arange(S, device=x.device) <= query_pos[:, None]
            # mask (T, S): True where query i may see key j
        p = self.dropout if self.training else 0.0
        if self.fast:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal,
                enable_gqa=self.n_rep > 1)  # (B, H, T, hd)
        else:
            k, v = repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep)
            # k, v (B, H, S, hd)
            y = scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=p,
                is_causal=causal)  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.wo(y)  # (B, T, C)


# § What grouping saves (docs/transformers/llama.md:725)
def kv_cache_bytes(config: LlamaConfig, batch_size: int = 1,
                   seq_len: int | None = None,
                   dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of keys and values for batch_size sequences of seq_len tokens
    (default max_seq_len): 2 * layers * kv heads * head_dim * tokens."""
    seq_len = config.max_seq_len if seq_len is None else seq_len
    per_token = 2 * config.n_layers * config.n_kv_heads * config.head_dim
    itemsize = torch.empty((), dtype=dtype).element_size()
    return per_token * seq_len * batch_size * itemsize


# § SwiGLU feed-forward (docs/transformers/llama.md:781)
class FeedForward(nn.Module):
    """w2(silu(w1 x) * w3 x): SwiGLU, with no biases."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # the gate
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # the value
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # back to dim
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        gate = F.silu(self.w1(x))  # (..., dim) -> (..., hidden)
        return self.drop(self.w2(gate * self.w3(x)))  # (..., dim)


# § The block and the model (docs/transformers/llama.md:846)
class Block(nn.Module):
    """x + attn(norm(x)), then + ffn(norm(.)): a pre-norm LLaMA block."""

    def __init__(self, config: LlamaConfig, layer_idx: int = 0):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config, layer_idx)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config.dim, config.ffn_dim,
                                        config.dropout)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor,
                cache: KVCache | None = None, start_pos: int = 0) -> Tensor:
        a = self.attention(self.attention_norm(x), cos, sin, cache,
                           start_pos)  # (B, T, C)
        h = x + self.drop(a)  # (B, T, C)
        return h + self.feed_forward(self.ffn_norm(h))  # (B, T, C)


class Llama(nn.Module):
    """A LLaMA decoder: embedding, n_layers blocks, RMSNorm, output."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i)
                                    for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:  # one (vocab, dim) matrix, used twice
            self.output.weight = self.tok_embeddings.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("attention.wo.weight", "feed_forward.w2"
                                ".weight")):  # they write into the stream
                p.normal_(0.0, std / math.sqrt(2 * self.config.n_layers))
            else:
                p.normal_(0.0, std)

    def new_cache(self, batch_size: int, max_len: int | None = None,
                  dtype: torch.dtype | None = None, device=None) -> KVCache:
        """An empty KVCache for this model (default: max_seq_len tokens,
        the parameters' dtype and device)."""
        weight = self.tok_embeddings.weight
        c = self.config
        return KVCache(c.n_layers, batch_size, c.n_kv_heads,
                       c.max_seq_len if max_len is None else max_len,
                       c.head_dim, dtype or weight.dtype,
                       device or weight.device)

    def forward(self, idx: Tensor, targets: Tensor | None = None,
                cache: KVCache | None = None, start_pos: int = 0
                ) -> tuple[Tensor, Tensor | None]:
        """idx (B, T) token ids at positions start_pos .. start_pos + T - 1
        -> logits (B, T, vocab_size), and the loss if targets (B, T)."""
        if idx.dtype != torch.long or idx.dim() != 2:
            raise ValueError(f"Llama expects token ids of shape (B, T) and "
                             f"dtype torch.int64, got {tuple(idx.shape)} "
                             f"{idx.dtype}")
        B, T = idx.shape
        if start_pos < 0 or start_pos + T > self.config.max_seq_len:
            raise ValueError(
                f"positions {start_pos}..{start_pos + T - 1} exceed "
                f"max_seq_len={self.config.max_seq_len}")
        if cache is None and start_pos != 0:
            raise ValueError("start_pos > 0 needs the cache that holds the "
                             "earlier positions")
        positions = torch.arange(start_pos, start_pos + T, device=idx.device)
        cos, sin = rope_angles(positions, self.config.head_dim,
                               self.config.rope_theta)  # (T, hd/2) each
        x = self.tok_embeddings(idx)  # (B, T, C)
        for layer in self.layers:
            x = layer(x, cos, sin, cache, start_pos)  # (B, T, C)
        logits = self.output(self.norm(x))  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            if targets.shape != idx.shape:
                raise ValueError(f"targets must match idx {(B, T)}, "
                                 f"got {tuple(targets.shape)}")
            loss = cross_entropy(at_least_float32(logits.flatten(0, 1)),
                                 targets.flatten())  # mean over B * T
        return logits, loss

    def generate(self, idx: Tensor, max_new_tokens: int, **kwargs) -> Tensor:
        """generate(self, idx, max_new_tokens, ...): see `generate`."""
        return generate(self, idx, max_new_tokens, **kwargs)


# § Sampling: temperature, top-k, top-p (docs/transformers/llama.md:1052)
def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Logits below the k-th largest along the last dim set to -inf."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"top_k must be a positive int, got {k!r}")
    if k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]  # (..., 1)
    return logits.masked_fill(logits < kth, float("-inf"))  # (..., V)


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Keep the fewest most-likely tokens whose probability sums to >= p.

    A token survives when the tokens strictly more likely than it hold
    less than p of the probability, so the most likely one always does.
    """
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    if p == 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (..., V)
    probs = softmax(at_least_float32(sorted_logits), dim=-1)  # (..., V)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of better tokens
    drop_sorted = mass_before >= p  # (..., V), in sorted order
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def sample_next(logits: Tensor, temperature: float = 1.0,
                top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """One token id per row of logits (B, V) -> (B,).

    temperature 0 is greedy (argmax); otherwise divide by the temperature,
    filter by top_k then top_p, and draw from the softmax.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)  # (B,)
    logits = at_least_float32(logits) / temperature  # (B, V)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = softmax(logits, dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]  # (B,)


# § `generate` (docs/transformers/llama.md:1173)
def _next_logits(model: nn.Module, idx: Tensor, cache: KVCache | None,
                 n_cached: int) -> Tensor:
    """Logits (B, V) after idx (B, T), reusing the n_cached cached tokens;
    past max_seq_len, the last max_seq_len tokens without a cache."""
    limit = model.config.max_seq_len
    if cache is not None and idx.shape[1] <= limit:
        logits, _ = model(idx[:, n_cached:], cache=cache, start_pos=n_cached)
    else:
        logits, _ = model(idx[:, -limit:])
    return logits[:, -1]  # (B, V)


@torch.no_grad()
def generate(model: nn.Module, idx: Tensor, max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None,
             generator: torch.Generator | None = None,
             use_cache: bool = True) -> Tensor:
    """idx (B, T) -> (B, T + max_new_tokens), sampled by sample_next.

    temperature=0 is greedy. The model is in eval mode while it runs, and
    every layer back in its own mode after.
    """
    if idx.dim() != 2 or idx.shape[1] < 1:
        raise ValueError(f"generate expects prompts of shape (B, T) with "
                         f"T >= 1, got {tuple(idx.shape)}")
    cache = model.new_cache(idx.shape[0]) if use_cache else None
    n_cached = 0  # tokens whose keys and values the cache holds
    with eval_mode(model):
        for _ in range(max_new_tokens):
            logits = _next_logits(model, idx, cache, n_cached)  # (B, V)
            n_cached = idx.shape[1]
            next_id = sample_next(logits, temperature, top_k, top_p,
                                  generator)  # (B,)
            idx = torch.cat([idx, next_id[:, None]], dim=1)  # (B, T + 1)
    return idx


# § Beam search (docs/transformers/llama.md:1287)
@torch.no_grad()
def beam_search(model: nn.Module, idx: Tensor, max_new_tokens: int,
                beam_width: int = 4, eos_id: int | None = None,
                length_penalty: float = 1.0, use_cache: bool = True
                ) -> tuple[Tensor, float]:
    """The best continuation of one prompt idx (1, T) under beam search.

    Returns (tokens (1, T + n), score): score is the sum of the n new
    tokens' log-probabilities (an eos token included) / n ** length_penalty.
    """
    if idx.dim() != 2 or idx.shape[0] != 1:
        raise ValueError(f"beam_search takes one prompt of shape (1, T), "
                         f"got {tuple(idx.shape)}")
    if not isinstance(beam_width, int) or beam_width < 1:
        raise ValueError(f"beam_width must be a positive int, "
                         f"got {beam_width!r}")
    W, T0 = beam_width, idx.shape[1]
    beams = idx.expand(W, T0).clone()  # (W, T)
    scores = torch.full((W,), float("-inf"), device=idx.device)  # (W,)
    scores[0] = 0.0  # one live beam at first, so no duplicates
    finished: list[tuple[float, Tensor]] = []  # (normalised score, ids)
    cache = model.new_cache(W) if use_cache else None
    n_cached, stopped = 0, False
    with eval_mode(model):  # every layer back in its own mode after
        for step in range(1, max_new_tokens + 1):
            logits = _next_logits(model, beams, cache, n_cached)  # (W, V)
            n_cached = beams.shape[1]
            V = logits.shape[-1]
            total = scores[:, None] + log_softmax(at_least_float32(logits), -1)
            if eos_id is not None:
                best = total.flatten().topk(W)  # the W best extensions
                for s, flat in zip(best.values.tolist(),
                                   best.indices.tolist()):
                    if flat % V == eos_id and s > float("-inf"):
                        ended = torch.cat([beams[flat // V],
                                           idx.new_tensor([eos_id])])
                        finished.append((s / step ** length_penalty, ended))
                total[:, eos_id] = float("-inf")  # live beams go on
                if len(finished) >= W:
                    stopped = True
                    break
            top = total.flatten().topk(W)  # (W,) over W * V extensions
            parent, token = top.indices // V, top.indices % V  # (W,) each
            beams = torch.cat([beams[parent], token[:, None]], 1)  # (W, T + 1)
            scores = top.values
            if cache is not None:
                cache.reorder(parent)
        if not stopped:  # out of tokens: the live beams compete too
            n = max(beams.shape[1] - T0, 1)
            finished += [(s / n ** length_penalty, b) for s, b in
                         zip(scores.tolist(), beams) if s > float("-inf")]
    score, tokens = max(finished, key=lambda pair: pair[0])
    return tokens[None], score


# § The Hugging Face layout (docs/transformers/llama.md:1475)
def permute_to_halves(w: Tensor, n_heads: int) -> Tensor:
    """Rows of a q or k projection (n_heads * d, in) from interleaved RoPE
    pairs to halves: in each head, rows 0, 2, 4, ... then 1, 3, 5, ..."""
    out_features, in_features = w.shape
    d = out_features // n_heads
    w = w.reshape(n_heads, d // 2, 2, in_features)  # row 2i + j -> [i, j]
    return w.transpose(1, 2).reshape(out_features, in_features)


def permute_to_interleaved(w: Tensor, n_heads: int) -> Tensor:
    """The inverse of permute_to_halves."""
    out_features, in_features = w.shape
    d = out_features // n_heads
    w = w.reshape(n_heads, 2, d // 2, in_features)  # row j * d/2 + i
    return w.transpose(1, 2).reshape(out_features, in_features)


def config_to_hf(config: LlamaConfig) -> dict:
    """Our config as the fields of transformers' LlamaConfig (JSON-ready)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_parameters": {"rope_type": "default",
                            "rope_theta": config.rope_theta},
        "rope_theta": config.rope_theta,  # for transformers before 5
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": config.init_std,
        "bos_token_id": None,  # no special tokens: generate must not stop
        "eos_token_id": None,  # at ids 1 or 2, transformers' defaults
    }


def config_from_hf(hf: dict) -> LlamaConfig:
    """A LlamaConfig from the fields of a transformers LlamaConfig dict."""
    def refuse(field, want):
        raise ValueError(f"{field}: this model supports {want}, "
                         f"got {hf.get(field)!r}")

    if hf.get("model_type", "llama") != "llama":
        refuse("model_type", "'llama'")
    if hf.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "'silu'")
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field, False):
            refuse(field, "False (no biases)")
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        refuse("rope_parameters", "rope_type 'default'")
    if hf.get("rope_scaling"):
        refuse("rope_scaling", "None")
    dim, heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, dim // heads):
        refuse("head_dim", f"hidden_size / num_attention_heads = "
                           f"{dim // heads}")
    return LlamaConfig(
        vocab_size=hf["vocab_size"], dim=dim,
        n_layers=hf["num_hidden_layers"], n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        hidden_dim=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=float(rope.get("rope_theta",
                                  hf.get("rope_theta", 10000.0))),
        norm_eps=hf.get("rms_norm_eps", 1e-6),  # transformers' default
        tie_embeddings=hf.get("tie_word_embeddings", False),
        init_std=hf.get("initializer_range", 0.02))


def _hf_names(n_layers: int) -> dict[str, str]:
    """Our parameter names -> Hugging Face's."""
    names = {"tok_embeddings.weight": "model.embed_tokens.weight",
             "norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    per_layer = {"attention.wq": "self_attn.q_proj",
                 "attention.wk": "self_attn.k_proj",
                 "attention.wv": "self_attn.v_proj",
                 "attention.wo": "self_attn.o_proj",
                 "feed_forward.w1": "mlp.gate_proj",
                 "feed_forward.w3": "mlp.up_proj",
                 "feed_forward.w2": "mlp.down_proj",
                 "attention_norm": "input_layernorm",
                 "ffn_norm": "post_attention_layernorm"}
    for i in range(n_layers):
        for ours, theirs in per_layer.items():
            names[f"layers.{i}.{ours}.weight"] = \
                f"model.layers.{i}.{theirs}.weight"
    return names


def export_hf(model: Llama) -> tuple[dict[str, Tensor], dict]:
    """(state_dict, config) in the layout of transformers' LlamaForCausalLM.

    The q and k projections are permuted from interleaved RoPE pairs to
    halves; the tensors are copies, in the model's dtype.
    """
    c = model.config
    names = _hf_names(c.n_layers)
    state = {}
    for name, tensor in model.state_dict().items():
        w = tensor.detach()
        if name.endswith("attention.wq.weight"):
            w = permute_to_halves(w, c.n_heads)
        elif name.endswith("attention.wk.weight"):
            w = permute_to_halves(w, c.n_kv_heads)
        state[names[name]] = w.clone()
    hf = config_to_hf(c)
    hf["dtype"] = str(model.tok_embeddings.weight.dtype).removeprefix(
        "torch.")
    return state, hf


def import_hf(state: dict[str, Tensor], hf_config: dict) -> Llama:
    """A Llama (float32) from a LlamaForCausalLM state dict and config."""
    config = config_from_hf(hf_config)
    model = Llama(config)
    names = _hf_names(config.n_layers)
    given = {k for k in state if not k.endswith("rotary_emb.inv_freq")}
    expected = set(names.values())
    optional = {"lm_head.weight"} if config.tie_embeddings else set()
    missing = sorted(expected - given - optional)
    unexpected = sorted(given - expected)
    if missing or unexpected:
        raise ValueError(f"state dict does not fit {config}: missing "
                         f"{missing[:5]} ({len(missing)}), unexpected "
                         f"{unexpected[:5]} ({len(unexpected)})")
    ours = model.state_dict()
    for name, theirs in names.items():
        if theirs in state and state[theirs].shape != ours[name].shape:
            raise ValueError(f"{theirs}: expected shape "
                             f"{tuple(ours[name].shape)}, got "
                             f"{tuple(state[theirs].shape)}")
    if config.tie_embeddings and "lm_head.weight" in state and not \
            torch.equal(state["lm_head.weight"],
                        state["model.embed_tokens.weight"]):
        raise ValueError("tie_word_embeddings is true, but lm_head.weight "
                         "differs from model.embed_tokens.weight")
    loaded = {}
    for name, theirs in names.items():
        w = state.get(theirs, state["model.embed_tokens.weight"])
        if name.endswith("attention.wq.weight"):
            w = permute_to_interleaved(w, config.n_heads)
        elif name.endswith("attention.wk.weight"):
            w = permute_to_interleaved(w, config.n_kv_heads)
        loaded[name] = w
    model.load_state_dict(loaded)
    return model
