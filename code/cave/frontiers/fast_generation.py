# Generated from docs/frontiers/fast_generation.md by `python -m cave.book tangle`.
# Do not edit: edit the chapter, then regenerate. CI fails on drift.


# § Fast generation (docs/frontiers/fast_generation.md:35)
"""Fast generation: a rolling KV cache, a decoder without per-token
overhead, batched and beam generation, speculative decoding.

The chapter docs/frontiers/fast_generation.md builds, in order:

    window_forward      the reference: a full forward with a sliding window
    RollingKVCache      the last max_seq_len keys and values, in a ring
    FastDecoder         the LLaMA's weights, fused and laid out for one
                        token at a time; equal to window_forward
    fast_generate       generate with the rolling cache, per-row stopping
    beam_search_batch   beam search over a batch of prompts (= beam_search)
    sampling_probs, accept_drafts, speculative_generate
                        speculative decoding: the target's exact output
    NGramConfig, NGramDraft, shakespeare_draft, NGRAM_DRAFT_TOKENS
                        a draft that is a count table of the training text
    time_generation, full_run, DRAFT
                        what each change buys, measured on the shipped model

tests/test_fast_generation.py compares them with the LLaMA chapter's
generate and beam_search and with transformers' LlamaForCausalLM.generate;
benchmarks/generation.py times them against it on the same weights.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cave.fundamentals.data import RESULTS_DIR, shakespeare_split
from cave.fundamentals.essentials import log_softmax, softmax
from cave.techniques.compression import quantize_groups
from cave.transformers.llama import (Llama, apply_rope, at_least_float32,
                                     generate, rope_angles, sample_next,
                                     top_k_filter, top_p_filter)

__all__ = [
    "window_forward", "RollingKVCache", "int8_linear", "FastDecoder",
    "fast_generate",
    "beam_search_batch", "sampling_probs", "accept_drafts",
    "speculative_generate", "NGramConfig", "NGramState", "NGramDraft",
    "shakespeare_draft", "NGRAM_DRAFT_TOKENS", "time_generation",
    "full_run", "DRAFT",
]

# The draft model for speculative decoding: the quick preset of the LLaMA
# training chapter (`cave train --preset quick --export ...`), trained on
# the same characters as the shipped model.
DRAFT = RESULTS_DIR / "llama_quick"


# § A rolling cache: past the window at constant cost (docs/frontiers/fast_generation.md:137)
@torch.no_grad()
def window_forward(model: Llama, idx: Tensor, window: int | None = None
                   ) -> Tensor:
    """Logits (B, L, V) of a full forward over idx (B, L), positions
    0 .. L - 1 (past max_seq_len too), in which token i attends to
    tokens i - window + 1 .. i (default window: max_seq_len)."""
    window = model.config.max_seq_len if window is None else window
    B, L = idx.shape
    pos = torch.arange(L, device=idx.device)  # (L,)
    cos, sin = rope_angles(pos, model.config.head_dim,
                           model.config.rope_theta)  # (L, hd/2) each
    mask = (pos[None] <= pos[:, None]) & (pos[None] > pos[:, None] - window)
    # mask (L, L): True where query i may see key j
    x = model.tok_embeddings(idx)  # (B, L, C)
    for layer in model.layers:
        a = layer.attention
        h = layer.attention_norm(x)  # (B, L, C)
        q = a.wq(h).view(B, L, a.n_heads, a.head_dim).transpose(1, 2)
        k = a.wk(h).view(B, L, a.n_kv_heads, a.head_dim).transpose(1, 2)
        v = a.wv(h).view(B, L, a.n_kv_heads, a.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=a.n_rep > 1)  # (B, H, L, hd)
        x = x + a.wo(y.transpose(1, 2).reshape(B, L, -1))  # (B, L, C)
        x = x + layer.feed_forward(layer.ffn_norm(x))  # (B, L, C)
    return model.output(model.norm(x))  # (B, L, V)


EMPTY = -(2 ** 62)  # the position of a slot that holds nothing


class RollingKVCache:
    """Keys and values of the last `capacity` positions per layer, in a
    ring: position p in slot p % capacity; attention sees `window` tokens.

    k[layer] and v[layer] are (batch_size, n_kv_heads, capacity, head_dim);
    positions (capacity,) holds each slot's position (EMPTY if none);
    length is the number of tokens seen so far.
    """

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int,
                 head_dim: int, window: int, capacity: int | None = None,
                 dtype: torch.dtype = torch.float32, device=None):
        capacity = window if capacity is None else capacity
        if capacity < window:
            raise ValueError(f"capacity must be at least the window "
                             f"{window}, got {capacity}")
        shape = (batch_size, n_kv_heads, capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device)
                  for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device)
                  for _ in range(n_layers)]
        self.positions = torch.full((capacity,), EMPTY, dtype=torch.long,
                                    device=device)  # (capacity,)
        self.window, self.capacity, self.length = window, capacity, 0

    def mask(self, T: int) -> Tensor | None:
        """Which keys each new token sees. One token: the filled slots
        after its own is written, (1, filled), or None in a ring of the
        window's size, where every filled slot is in the window. T tokens:
        the ring followed by the T new ones, (T, capacity + T)."""
        p, C, W = self.length, self.capacity, self.window
        if T == 1:
            if C == W:
                return None
            key_pos = self.positions.clone()  # (capacity,)
            key_pos[p % C] = p
            return (key_pos[None, :min(p + 1, C)] > p - W)  # (1, filled)
        q_pos = torch.arange(p, p + T, device=self.positions.device)  # (T,)
        key_pos = torch.cat([self.positions, q_pos])  # (capacity + T,)
        return (key_pos <= q_pos[:, None]) & (key_pos > q_pos[:, None] - W)

    def update(self, layer: int, k: Tensor, v: Tensor
               ) -> tuple[Tensor, Tensor]:
        """Store the new k, v (B, H_kv, T, d); return the keys and values
        to attend to, as mask(T) describes them: the filled slots (T = 1),
        else the ring followed by the new ones (B, H_kv, capacity + T, d)."""
        T, start, C = k.shape[2], self.length, self.capacity
        if T == 1:  # write first: the slot's old token has left the window
            slot = start % C
            self.k[layer][:, :, slot] = k[:, :, 0]
            self.v[layer][:, :, slot] = v[:, :, 0]
            n = min(start + 1, C)
            return self.k[layer][:, :, :n], self.v[layer][:, :, :n]
        keys = torch.cat([self.k[layer], k.to(self.k[layer].dtype)], 2)
        values = torch.cat([self.v[layer], v.to(self.v[layer].dtype)], 2)
        keep = min(T, C)  # only the last `capacity` new tokens stay
        slots = torch.arange(start + T - keep, start + T,
                             device=k.device) % C  # (keep,)
        self.k[layer].index_copy_(2, slots, keys[:, :, C + T - keep:])
        self.v[layer].index_copy_(2, slots, values[:, :, C + T - keep:])
        return keys, values

    def advance(self, T: int) -> None:
        """Every layer has stored T new tokens: record their positions."""
        if T == 1:  # the loop's case, without building a range
            self.positions[self.length % self.capacity] = self.length
            self.length += 1
            return
        keep = min(T, self.capacity)
        pos = torch.arange(self.length + T - keep, self.length + T,
                           device=self.positions.device)  # (keep,)
        self.positions[pos % self.capacity] = pos
        self.length += T

    def rollback(self, length: int) -> None:
        """Forget the tokens at positions >= length (rejected drafts)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"rollback to a length in 0..{self.length}, "
                             f"got {length}")
        if length < self.length - (self.capacity - self.window):
            raise ValueError(f"a capacity of {self.capacity} for a window "
                             f"of {self.window} can take back at most "
                             f"{self.capacity - self.window} tokens, asked "
                             f"for {self.length - length}")
        self.positions[self.positions >= length] = EMPTY
        self.length = length

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows `index` (B',), e.g. the parents of new beams."""
        self.k = [k[index] for k in self.k]
        self.v = [v[index] for v in self.v]


# § A decoder without overhead (docs/frontiers/fast_generation.md:324)
def int8_linear(x: Tensor, weight: tuple[Tensor, Tensor]) -> Tensor:
    """F.linear with int8 weights: x (..., in), weight (q (out, in) int8,
    scales (out,) in x's dtype) -> (..., out) = x @ (q * scales[:, None]).T"""
    q, scales = weight
    y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), q, scales)
    return y.view(*x.shape[:-1], q.shape[0])


class FastDecoder:
    """A Llama's weights laid out for generation; call it on new tokens.

    decoder(idx (B, T), cache) -> logits (B, T, V) of the tokens at
    positions cache.length .., which it then adds to the cache.
    """

    def __init__(self, model: Llama, dtype: torch.dtype | None = None,
                 fused: bool = True, rope_table: bool = True,
                 transposed: bool | None = None, attention: str = "matmul",
                 int8: bool = False):
        if attention not in ("matmul", "sdpa"):
            raise ValueError(f"attention must be 'matmul' or 'sdpa', got "
                             f"{attention!r}")
        c = self.config = model.config
        dtype = dtype or model.tok_embeddings.weight.dtype
        self.dtype, self.fused, self.rope_table = dtype, fused, rope_table
        self.int8 = int8
        self.linear = int8_linear if int8 else F.linear  # the blocks'
        self.transposed = (dtype == torch.float32 if transposed is None
                           else transposed)
        self.attention = attention
        self.cache_dtype = torch.promote_types(dtype, torch.float32)

        def matrix(*weights: Tensor) -> Tensor:  # stacked rows, (out, in)
            w = torch.cat([w.detach() for w in weights]).to(dtype)
            if self.transposed and w.shape[0] > w.shape[1]:  # wide
                return w.t().contiguous().t()  # (out, in), column-major
            return w.contiguous()

        def vector(w: Tensor) -> Tensor:
            return w.detach().to(dtype).contiguous()

        def block_matrix(*weights: Tensor):  # matrix, or (int8, scales)
            if not int8:
                return matrix(*weights)
            w = torch.cat([w.detach() for w in weights]).float()
            q, scale, _ = quantize_groups(w, 8, w.shape[1], symmetric=True)
            return q.to(torch.int8), scale[:, 0].to(dtype)  # (out, in), (out,)

        self.embed = vector(model.tok_embeddings.weight)  # (V, C)
        self.norm, self.out = vector(model.norm.weight), \
            matrix(model.output.weight)
        self.layers = []
        for block in model.layers:
            a, f = block.attention, block.feed_forward
            if fused:
                mats = (block_matrix(a.wq.weight, a.wk.weight, a.wv.weight),
                        block_matrix(f.w1.weight, f.w3.weight))
            else:
                mats = tuple(block_matrix(w.weight) for w in
                             (a.wq, a.wk, a.wv, f.w1, f.w3))
            self.layers.append((vector(block.attention_norm.weight),
                                vector(block.ffn_norm.weight),
                                block_matrix(a.wo.weight),
                                block_matrix(f.w2.weight), mats))
        self.device = self.embed.device
        self.rotary = torch.empty(0, c.head_dim // 2, dtype=torch.complex64,
                                  device=self.device)  # (positions, hd/2)

    def new_cache(self, batch_size: int, capacity: int | None = None
                  ) -> RollingKVCache:
        c = self.config
        return RollingKVCache(c.n_layers, batch_size, c.n_kv_heads,
                              c.head_dim, c.max_seq_len, capacity,
                              self.cache_dtype, self.device)

    def rotations(self, start: int, T: int) -> Tensor:
        """exp(i m theta_j) for positions start .. start + T - 1: (T, hd/2)."""
        end = start + T
        if not self.rope_table:  # what Llama.forward does at every call
            cos, sin = rope_angles(torch.arange(start, end,
                                                device=self.device),
                                   self.config.head_dim,
                                   self.config.rope_theta)
            return torch.complex(cos, sin)
        if end > self.rotary.shape[0]:  # grow the table by doubling
            n = max(end, 2 * self.rotary.shape[0], 1024)
            cos, sin = rope_angles(torch.arange(n, device=self.device),
                                   self.config.head_dim,
                                   self.config.rope_theta)
            self.rotary = torch.complex(cos, sin)  # (n, hd/2)
        return self.rotary[start:end]

    def rms(self, x: Tensor, weight: Tensor) -> Tensor:
        """The LLaMA chapter's RMSNorm (F.rms_norm's kernel in float32)."""
        eps = self.config.norm_eps
        if x.dtype == torch.float32:
            return F.rms_norm(x, weight.shape, weight, eps)
        x32 = at_least_float32(x)
        rms = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return (x32 * rms).type_as(x) * weight

    @torch.no_grad()
    def __call__(self, idx: Tensor, cache: RollingKVCache) -> Tensor:
        c = self.config
        B, T = idx.shape
        H, H_kv, hd = c.n_heads, c.n_kv_heads, c.head_dim
        rot = self.rotations(cache.length, T)[:, None]  # (T, 1, hd/2)
        mask = cache.mask(T)  # None, (1, filled) or (T, capacity + T)
        lin = self.linear  # F.linear, or int8_linear
        x = F.embedding(idx, self.embed)  # (B, T, C)
        for i, (norm1, norm2, wo, w2, mats) in enumerate(self.layers):
            h = self.rms(x, norm1)  # (B, T, C)
            if self.fused:
                qk, v = lin(h, mats[0]).split([(H + H_kv) * hd, H_kv * hd],
                                              dim=-1)
            else:
                qk = torch.cat([lin(h, mats[0]), lin(h, mats[1])], -1)
                v = lin(h, mats[2])
            # qk (B, T, (H + H_kv) * hd): rotate every (even, odd) pair
            pairs = qk.to(self.cache_dtype).view(B, T, H + H_kv, hd // 2, 2)
            qk = torch.view_as_real(torch.view_as_complex(pairs) * rot)
            qk = qk.flatten(-2)  # (B, T, H + H_kv, hd)
            q = qk[:, :, :H].transpose(1, 2)  # (B, H, T, hd)
            k = qk[:, :, H:].transpose(1, 2)  # (B, H_kv, T, hd)
            v = v.view(B, T, H_kv, hd).transpose(1, 2)  # (B, H_kv, T, hd)
            keys, values = cache.update(i, k, v)  # (B, H_kv, S, hd)
            if T == 1 and self.attention == "matmul":
                q = q.reshape(B, H_kv, H // H_kv, hd)  # (B, H_kv, group, hd)
                scores = (q @ keys.transpose(-1, -2)) * hd ** -0.5
                if mask is not None:  # (B, H_kv, group, S)
                    scores = scores.masked_fill(~mask, float("-inf"))
                y = torch.softmax(scores, -1) @ values  # (B, H_kv, group, hd)
            else:
                y = F.scaled_dot_product_attention(
                    q, keys, values, attn_mask=mask,
                    enable_gqa=H_kv != H).transpose(1, 2)  # (B, T, H, hd)
            x = x + lin(y.reshape(B, T, H * hd).to(self.dtype), wo)
            h = self.rms(x, norm2)  # (B, T, C)
            if self.fused:
                gate, up = lin(h, mats[1]).chunk(2, -1)  # (B, T, hidden)
            else:
                gate, up = lin(h, mats[3]), lin(h, mats[4])
            x = x + lin(F.silu(gate) * up, w2)  # (B, T, C)
        cache.advance(T)
        return F.linear(self.rms(x, self.norm), self.out)  # (B, T, V)


def as_decoder(model):
    """A Llama laid out as a FastDecoder; anything already called like
    one (a FastDecoder, the count-table draft at the chapter's end) as is."""
    return FastDecoder(model) if isinstance(model, Llama) else model


@torch.no_grad()
def fast_generate(model: Llama | FastDecoder, idx: Tensor,
                  max_new_tokens: int, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None,
                  generator: torch.Generator | None = None,
                  eos_id: int | None = None, use_cache: bool = True
                  ) -> Tensor:
    """idx (B, T) -> (B, T + n): n = max_new_tokens, or fewer when every
    row has emitted eos_id (after which a row repeats eos_id).
    use_cache=False recomputes window_forward at every step (a Llama
    only): the reference, slow."""
    if idx.dim() != 2 or idx.shape[1] < 1 or idx.dtype != torch.long:
        raise ValueError(f"fast_generate expects prompts of shape (B, T) "
                         f"with T >= 1, dtype torch.int64, got "
                         f"{tuple(idx.shape)} {idx.dtype}")
    if not use_cache and not isinstance(model, Llama):
        raise ValueError(f"use_cache=False recomputes a Llama's forward, "
                         f"got a {type(model).__name__}")
    decoder = as_decoder(model)
    B, T = idx.shape
    out = torch.empty(B, T + max_new_tokens, dtype=torch.long,
                      device=idx.device)  # (B, T + max_new_tokens)
    out[:, :T] = idx
    done = torch.zeros(B, dtype=torch.bool, device=idx.device)  # (B,)
    cache = decoder.new_cache(B)
    logits = (decoder(idx, cache) if use_cache
              else window_forward(model, idx))[:, -1]  # (B, V)
    n = T
    for step in range(max_new_tokens):
        next_id = sample_next(logits, temperature, top_k, top_p,
                              generator)  # (B,)
        if eos_id is not None:
            next_id = next_id.masked_fill(done, eos_id)
            done |= next_id == eos_id
        out[:, n] = next_id
        n += 1
        if eos_id is not None and bool(done.all()):
            break
        if step + 1 < max_new_tokens and use_cache:
            logits = decoder(next_id[:, None], cache)[:, -1]  # (B, V)
        elif step + 1 < max_new_tokens:
            logits = window_forward(model, out[:, :n])[:, -1]  # (B, V)
    return out[:, :n]


def time_generation(fn, tokens: int, clock=time.perf_counter) -> float:
    """Tokens per second of fn(tokens), one call, timed by clock
    (time.process_time: this process's CPU time, which other processes'
    load does not inflate when torch runs one thread)."""
    start = clock()
    fn(tokens)
    return tokens / (clock() - start)


# § Many prompts at once (docs/frontiers/fast_generation.md:621)
@torch.no_grad()
def beam_search_batch(model: Llama | FastDecoder, idx: Tensor,
                      max_new_tokens: int, beam_width: int = 4,
                      eos_id: int | None = None, length_penalty: float = 1.0
                      ) -> list[tuple[Tensor, float]]:
    """beam_search for each prompt of idx (B, T), in one batch of B * W
    rows: a list of B (tokens (T + n,), score), as beam_search returns."""
    if idx.dim() != 2 or not isinstance(beam_width, int) or beam_width < 1:
        raise ValueError(f"beam_search_batch expects prompts (B, T) and a "
                         f"positive int beam_width, got {tuple(idx.shape)} "
                         f"and {beam_width!r}")
    decoder = as_decoder(model)
    (B, T0), W = idx.shape, beam_width
    beams = idx.repeat_interleave(W, dim=0)  # (B * W, T)
    scores = torch.full((B, W), float("-inf"), device=idx.device)  # (B, W)
    scores[:, 0] = 0.0  # one live beam per prompt at first
    finished: list[list] = [[] for _ in range(B)]  # (score, ids) per prompt
    stopped = [False] * B
    first_row = torch.arange(B, device=idx.device)[:, None] * W  # (B, 1)
    cache = decoder.new_cache(B * W)
    logits = decoder(beams, cache)[:, -1]  # (B * W, V)
    for step in range(1, max_new_tokens + 1):
        V = logits.shape[-1]
        total = scores[..., None] + log_softmax(
            at_least_float32(logits), -1).view(B, W, V)  # (B, W, V)
        if eos_id is not None:
            best = total.view(B, W * V).topk(W)  # (B, W)
            for b in range(B):
                if stopped[b]:
                    continue
                for s, flat in zip(best.values[b].tolist(),
                                   best.indices[b].tolist()):
                    if flat % V == eos_id and s > float("-inf"):
                        ended = torch.cat([beams[b * W + flat // V],
                                           idx.new_tensor([eos_id])])
                        finished[b].append((s / step ** length_penalty,
                                            ended))
                stopped[b] = len(finished[b]) >= W
            total[..., eos_id] = float("-inf")  # live beams go on
            if all(stopped):
                break
        top = total.view(B, W * V).topk(W)  # (B, W) over W * V each
        parent = (first_row + top.indices // V).flatten()  # (B * W,)
        token = (top.indices % V).flatten()  # (B * W,)
        beams = torch.cat([beams[parent], token[:, None]], 1)  # (B * W, T+1)
        scores = top.values
        if step < max_new_tokens:
            cache.reorder(parent)
            logits = decoder(token[:, None], cache)[:, -1]  # (B * W, V)
    results = []
    for b in range(B):
        if not stopped[b]:  # out of tokens: the live beams compete too
            n = max(beams.shape[1] - T0, 1)
            finished[b] += [(s / n ** length_penalty, beams[b * W + j])
                            for j, s in enumerate(scores[b].tolist())
                            if s > float("-inf")]
        score, tokens = max(finished[b], key=lambda pair: pair[0])
        results.append((tokens, score))
    return results


# § Speculative decoding (docs/frontiers/fast_generation.md:743)
def sampling_probs(logits: Tensor, temperature: float = 1.0,
                   top_k: int | None = None, top_p: float | None = None
                   ) -> Tensor:
    """The distribution sample_next draws from: (..., V) probabilities;
    temperature 0 puts all the mass on the argmax."""
    logits = at_least_float32(logits)
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits)
    logits = logits / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return softmax(logits, dim=-1)


def accept_drafts(p: Tensor, q: Tensor, drafts: Tensor,
                  generator: torch.Generator | None = None,
                  greedy: bool = False) -> Tensor:
    """The tokens a round emits: the accepted drafts and one more.

    p (k + 1, V) the target's distributions, q (k, V) the draft's, drafts
    (k,) the proposed tokens -> (n + 1,) with n the accepted drafts.
    """
    k = drafts.shape[0]
    for i in range(k):
        x = drafts[i]
        if greedy:
            accepted = bool(p[i].argmax() == x)
        else:  # accept with probability min(1, p(x) / q(x))
            u = torch.rand((), generator=generator, device=p.device,
                           dtype=p.dtype)
            accepted = bool(u * q[i, x] < p[i, x])
        if not accepted:
            if greedy:
                t = p[i].argmax()
            else:  # the residual max(0, p - q), normalised
                residual = (p[i] - q[i]).clamp_min(0)
                t = torch.multinomial(residual / residual.sum(), 1,
                                      generator=generator)[0]
            return torch.cat([drafts[:i], t[None]])
    t = p[k].argmax() if greedy else torch.multinomial(
        p[k], 1, generator=generator)[0]
    return torch.cat([drafts, t[None]])


@torch.no_grad()
def speculative_generate(target: Llama | FastDecoder,
                         draft, idx: Tensor,
                         max_new_tokens: int, draft_tokens: int = 4,
                         temperature: float = 1.0, top_k: int | None = None,
                         top_p: float | None = None,
                         generator: torch.Generator | None = None
                         ) -> tuple[Tensor, dict]:
    """idx (1, T) -> ((1, T + max_new_tokens), {"rounds", "accepted"}):
    the target's own distribution (greedy: its own output), drafted
    draft_tokens at a time by the draft: a Llama, a FastDecoder, or
    anything called like one (NGramDraft below)."""
    if idx.dim() != 2 or idx.shape[0] != 1 or idx.shape[1] < 1:
        raise ValueError(f"speculative_generate takes one prompt of shape "
                         f"(1, T), got {tuple(idx.shape)}")
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"the draft's vocabulary must be the target's "
                         f"{target.config.vocab_size} tokens, got "
                         f"{draft.config.vocab_size}")
    target, draft = as_decoder(target), as_decoder(draft)
    K, greedy, device = draft_tokens, temperature == 0, idx.device
    tokens, T0 = idx[0].tolist(), idx.shape[1]
    t_cache = target.new_cache(1, target.config.max_seq_len + K + 1)
    d_cache = draft.new_cache(1, draft.config.max_seq_len + K + 1)
    stats = {"rounds": 0, "accepted": 0}

    def probs(logits):
        return sampling_probs(logits, temperature, top_k, top_p)

    while len(tokens) - T0 < max_new_tokens:
        k = min(K, max_new_tokens - (len(tokens) - T0) - 1)
        drafts, qs = [], []
        if k > 0:
            new = torch.tensor([tokens[d_cache.length:]], device=device)
            logits = draft(new, d_cache)[0, -1]  # (V,)
            for i in range(k):
                q = probs(logits)  # (V,)
                x = q.argmax() if greedy else torch.multinomial(
                    q, 1, generator=generator)[0]
                drafts.append(x)
                qs.append(q)
                if i + 1 < k:
                    logits = draft(x.view(1, 1), d_cache)[0, -1]
        pending = torch.tensor(tokens[t_cache.length:], device=device)
        feed = torch.cat([pending, *[x[None] for x in drafts]])  # (P + k,)
        p = probs(target(feed[None], t_cache)[0, len(pending) - 1:])
        # p (k + 1, V): the target after the last token and each draft
        drafted = feed[len(pending):]  # (k,)
        q = torch.stack(qs) if qs else p[:0]  # (k, V)
        emitted = accept_drafts(p, q, drafted, generator, greedy).tolist()
        stats["rounds"] += 1
        stats["accepted"] += len(emitted) - 1
        tokens += emitted
        t_cache.rollback(len(tokens) - 1)  # keep what the target saw
        d_cache.rollback(min(d_cache.length, len(tokens) - 1))
    return torch.tensor([tokens], device=device), stats


# § A draft that costs nothing: the training text's n-grams (docs/frontiers/fast_generation.md:938)
@dataclasses.dataclass
class NGramConfig:
    vocab_size: int  # the target's tokens: the draft must share them
    order: int = 6  # the longest n-gram: a context of order - 1 tokens
    min_count: int = 3  # back off from a context seen fewer times

    def __post_init__(self):
        if self.vocab_size < 1 or self.order < 1 or self.min_count < 1:
            raise ValueError(f"expected vocab_size, order and min_count "
                             f">= 1, got {self.vocab_size}, {self.order} "
                             f"and {self.min_count}")
        if self.vocab_size ** (self.order + 1) >= 2 ** 63:
            raise ValueError(f"an n-gram of {self.order} tokens of a "
                             f"{self.vocab_size}-token vocabulary does not "
                             f"fit one int64 key: lower the order")

    @property
    def max_seq_len(self) -> int:
        """The tokens the draft reads: its longest context."""
        return self.order - 1


class NGramState:
    """The tokens an NGramDraft has been fed: its cache."""

    def __init__(self):
        self.tokens: list[int] = []

    @property
    def length(self) -> int:
        return len(self.tokens)

    def rollback(self, length: int) -> None:
        """Forget the tokens at positions >= length (rejected drafts)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"rollback to a length in 0..{self.length}, "
                             f"got {length}")
        del self.tokens[length:]


class NGramDraft:
    """Next-token counts of a text, called like a FastDecoder:
    draft(idx (1, T), state) -> logits (1, T, V), the log counts of each
    token after the longest context seen min_count times (-inf: never)."""

    def __init__(self, ids: Tensor, config: NGramConfig):
        V = config.vocab_size
        if ids.dim() != 1 or ids.dtype != torch.long or \
                len(ids) < config.order:
            raise ValueError(f"expected the text as token ids of shape (N,)"
                             f", N >= order {config.order}, dtype "
                             f"torch.int64, got {tuple(ids.shape)} "
                             f"{ids.dtype}")
        if int(ids.min()) < 0 or int(ids.max()) >= V:
            raise ValueError(f"expected token ids in 0..{V - 1}, got "
                             f"{int(ids.min())}..{int(ids.max())}")
        self.config = config
        self.keys, self.counts = [], []  # per n: sorted keys, how often
        for n in range(1, config.order + 1):
            N = len(ids) - n + 1  # the n-grams of the text
            key = torch.zeros(N, dtype=torch.long, device=ids.device)
            for j in range(n):  # base-V digits, the first token highest
                key = key * V + ids[j:j + N]
            keys, counts = torch.unique(key, return_counts=True)  # sorted
            self.keys.append(keys)
            self.counts.append(counts)

    def new_cache(self, batch_size: int = 1, capacity: int | None = None
                  ) -> NGramState:
        """A fresh state (a count table needs no capacity: the argument
        is there so that a draft is made like a FastDecoder's cache)."""
        if batch_size != 1:
            raise ValueError(f"an NGramDraft drafts for one prompt, got "
                             f"batch_size {batch_size}")
        return NGramState()

    def next_logits(self, context: list[int]) -> Tensor:
        """Log counts (V,) of the token after context, backing off."""
        c, V = self.config, self.config.vocab_size
        for n in range(min(c.order, len(context) + 1), 0, -1):
            h = 0  # the last n - 1 tokens as one number
            for t in context[len(context) - n + 1:]:
                h = h * V + t
            keys = self.keys[n - 1]
            lo, hi = torch.searchsorted(keys, torch.tensor(
                [h * V, (h + 1) * V], device=keys.device)).tolist()
            counts = self.counts[n - 1][lo:hi]  # the tokens seen after it
            if n == 1 or int(counts.sum()) >= c.min_count:
                break
        logits = torch.full((V,), -math.inf, device=keys.device)
        logits[keys[lo:hi] % V] = counts.float().log()
        return logits

    @torch.no_grad()
    def __call__(self, idx: Tensor, state: NGramState) -> Tensor:
        T = idx.shape[1]
        state.tokens += idx[0].tolist()
        L = state.length
        return torch.stack([self.next_logits(state.tokens[:L - T + i + 1])
                            for i in range(T)])[None].to(idx.device)


def shakespeare_draft(tokenizer, order: int = 6, min_count: int = 3
                      ) -> NGramDraft:
    """An NGramDraft of the book's Shakespeare training split (never the
    validation text), for a model that reads the same characters."""
    chars, train, _ = shakespeare_split()
    if tokenizer.chars != chars.chars:
        raise ValueError(f"the n-gram draft counts Shakespeare's "
                         f"{len(chars.chars)} characters; the model reads "
                         f"{len(tokenizer.chars)} others")
    return NGramDraft(train.long(), NGramConfig(len(chars.chars), order,
                                                min_count))


NGRAM_DRAFT_TOKENS = 8  # drafts a round with the count table: a draft
# costs a lookup, not a forward pass, so longer rounds pay; on the shipped
# model 8 ran clearly faster than 4 and about level with 6 and 10


# § The full run (docs/frontiers/fast_generation.md:1183)
def full_run(device: str | None = None, tokens: int = 250, rounds: int = 3,
             threads: int = 1, draft_tokens: int = 4,
             ngram_draft_tokens: int = NGRAM_DRAFT_TOKENS,
             clock: str = "cpu") -> dict:
    """Tokens per second of each change on the shipped model, batch 1,
    top-k 50, interleaved round by round (the best round kept), of CPU
    time (clock="cpu") or wall time ("wall"); and speculative decoding
    with the quick preset's model (draft_tokens a round), then the n-gram
    counts (ngram_draft_tokens), as the draft."""
    if clock not in ("cpu", "wall"):
        raise ValueError(f"clock must be 'cpu' or 'wall', got {clock!r}")
    timer = time.process_time if clock == "cpu" else time.perf_counter
    from cave.transformers.llama_training import SHIPPED, load_model

    torch.set_num_threads(threads)
    model, tokenizer, _ = load_model(SHIPPED, device or "cpu")
    small, _, _ = load_model(DRAFT, device or "cpu")
    prompt = torch.zeros(1, 1, dtype=torch.long, device=model.output.weight
                         .device)  # "\n", as cave sample starts
    steps = {
        "generate": None,
        "rolling cache, no checks in the loop": dict(
            fused=False, rope_table=False, transposed=False,
            attention="sdpa"),
        "+ rotary tables": dict(fused=False, transposed=False,
                                attention="sdpa"),
        "+ fused projections": dict(transposed=False, attention="sdpa"),
        "+ grouped attention as matmuls": dict(transposed=False),
        "+ wide matrices column by column": dict(transposed=True),
        "bfloat16": dict(dtype=torch.bfloat16),
        "float16 kernels on the bfloat16 weights": dict(dtype=torch.float16),
        "int8 weights, bfloat16 activations": dict(dtype=torch.bfloat16,
                                                   int8=True),
    }
    runs = {name: (lambda n, kw=kw: generate(
                model, prompt, n, top_k=50,
                generator=torch.Generator().manual_seed(0)))
            if kw is None else (lambda n, d=FastDecoder(model, **kw):
                                fast_generate(d, prompt, n, top_k=50,
                                              generator=torch.Generator()
                                              .manual_seed(0)))
            for name, kw in steps.items()}
    spec = {}
    drafts = {"quick draft": (FastDecoder(small), draft_tokens),  # float32
              "n-gram draft": (shakespeare_draft(tokenizer),
                               ngram_draft_tokens)}
    targets = {"float32": dict(dtype=torch.float32),
               "bfloat16": dict(dtype=torch.bfloat16),
               "float16": dict(dtype=torch.float16),
               "int8": dict(dtype=torch.bfloat16, int8=True)}
    for (label, (helper, k)), (kind, kw) in itertools.product(
            drafts.items(), targets.items()):
        name = f"{label}, {kind}"
        if label == "quick draft" and kind in ("float16", "int8"):
            continue  # the fastest targets: shown with the counts only
        target = FastDecoder(model, **kw)

        def run(n, target=target, helper=helper, name=name, k=k):
            _, spec[name] = speculative_generate(
                target, helper, prompt, n, k, top_k=50,
                generator=torch.Generator().manual_seed(0))
            spec[name]["draft_tokens"] = k

        runs[f"speculative, {name}"] = run
    best = {name: 0.0 for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            best[name] = max(best[name], time_generation(fn, tokens,
                                                         timer))
    return {  # the recorder adds the threads, the CPU and the load
        "tokens": tokens, "rounds": rounds, "clock": clock, "rates": best,
        "speculative": {
            name: {"draft_tokens": s["draft_tokens"],
                   "accepted_per_round": s["accepted"] / s["rounds"],
                   "rate": best[f"speculative, {name}"]}
            for name, s in spec.items()},
    }
