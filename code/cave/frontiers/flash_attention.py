# Generated from docs/frontiers/flash_attention.md by `python -m cave.book tangle`.
# Do not edit: edit the chapter, then regenerate. CI fails on drift.


# § Flash attention (docs/frontiers/flash_attention.md:33)
"""Flash attention in plain PyTorch: the online softmax, a tiled forward
that never holds the attention matrix, a backward that recomputes it, and
the slow-memory traffic of both algorithms, counted.

The chapter docs/frontiers/flash_attention.md builds, in order:

    softmax_stats, merge_stats, online_softmax
                        a row's softmax read block by block (= softmax,
                        for any split of the row)
    flash_forward       tiled attention: the output and the log-sum-exp;
                        causal, masked, any lengths, grouped-query heads
    flash_backward      the gradients from the output and log-sum-exp
    FlashAttention, flash_attention
                        the autograd Function; forward and gradients
                        = F.scaled_dot_product_attention
    IOCount, naive_attention
                        the standard algorithm; reads and writes of slow
                        memory counted for both
    PeakMemory, peak_memory
                        the most bytes of tensors alive at once
"""

from __future__ import annotations

import dataclasses
import math
import weakref

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from cave.transformers.llama import at_least_float32

__all__ = [
    "softmax_stats", "merge_stats", "online_softmax", "flash_forward",
    "flash_backward", "FlashAttention", "flash_attention", "IOCount",
    "naive_attention", "PeakMemory", "peak_memory",
]


# § The online softmax (docs/frontiers/flash_attention.md:123)
def _finite(m: Tensor) -> Tensor:
    """m where finite, 0 where -inf: exp(x - m) stays 0 on masked rows."""
    return torch.where(m == float("-inf"), torch.zeros_like(m), m)


def softmax_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """(m, l) of the last dimension: the max, and sum(exp(x - m))."""
    m = x.amax(dim=-1)  # (...,)
    return m, torch.exp(x - _finite(m)[..., None]).sum(dim=-1)  # (...,)


def merge_stats(m_a: Tensor, l_a: Tensor, m_b: Tensor, l_b: Tensor
                ) -> tuple[Tensor, Tensor]:
    """The (m, l) of two pieces of a row together:
    m = max(m_a, m_b), l = exp(m_a - m) l_a + exp(m_b - m) l_b."""
    m = torch.maximum(m_a, m_b)
    safe = _finite(m)
    return m, torch.exp(m_a - safe) * l_a + torch.exp(m_b - safe) * l_b


def online_softmax(x: Tensor, sizes: int | list[int]) -> Tensor:
    """softmax(x, dim=-1), the statistics gathered one block at a time.

    sizes: a block size, or the list of block sizes that cut the row.
    """
    n = x.shape[-1]
    if isinstance(sizes, int):
        if sizes < 1:
            raise ValueError(f"the block size must be >= 1, got {sizes}")
        sizes = [min(sizes, n - s) for s in range(0, n, sizes)]
    if sum(sizes) != n or min(sizes, default=1) < 1:
        raise ValueError(f"block sizes must be positive and add up to the "
                         f"row's length {n}, got {sizes}")
    m = x.new_full(x.shape[:-1], float("-inf"))  # (...,) nothing read yet
    l = x.new_zeros(x.shape[:-1])  # (...,)
    for piece in x.split(sizes, dim=-1):  # (..., size) each
        m, l = merge_stats(m, l, *softmax_stats(piece))
    return torch.exp(x - _finite(m)[..., None]) / l[..., None]


# § The tiled forward (docs/frontiers/flash_attention.md:231)
@dataclasses.dataclass
class IOCount:
    """Numbers read from and written to slow memory by an algorithm that
    reports them (see naive_attention and flash_forward)."""
    reads: int = 0
    writes: int = 0

    def read(self, *tensors: Tensor) -> None:
        self.reads += sum(t.numel() for t in tensors)

    def write(self, *tensors: Tensor) -> None:
        self.writes += sum(t.numel() for t in tensors)

    @property
    def total(self) -> int:
        return self.reads + self.writes


def _check_attention_inputs(q: Tensor, k: Tensor, v: Tensor,
                            attn_mask: Tensor | None, block_q: int,
                            block_k: int) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"expected q, k, v of shape (B, H, L, E), (B, H_kv,"
                         f" S, E), (B, H_kv, S, Ev), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    (B, H, L, E), (Bk, H_kv, S, Ek) = q.shape, k.shape
    if (Bk, Ek) != (B, E) or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"expected k (B={B}, H_kv, S, E={E}) and v of k's "
                         f"(B, H_kv, S), got k {tuple(k.shape)} and v "
                         f"{tuple(v.shape)}")
    if H % H_kv:
        raise ValueError(f"expected the query heads to be a multiple of the"
                         f" key-value heads, got H={H} and H_kv={H_kv}")
    if not (q.dtype == k.dtype == v.dtype and q.dtype.is_floating_point):
        raise ValueError(f"expected q, k, v of one floating dtype, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    for name, size in (("block_q", block_q), ("block_k", block_k)):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"{name} must be a positive int, got {size!r}")
    if attn_mask is not None:
        try:
            torch.broadcast_shapes(attn_mask.shape, (B, H, L, S))
        except RuntimeError:
            raise ValueError(f"attn_mask must broadcast to (B, H, L, S) = "
                             f"{(B, H, L, S)}, got {tuple(attn_mask.shape)}"
                             ) from None
        if attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
            raise ValueError(f"attn_mask must be bool (True: may attend) or"
                             f" {q.dtype} (added to the scores), got "
                             f"{attn_mask.dtype}")


def _scores(q_i: Tensor, k_j: Tensor, scale: float, rows: range,
            cols: range, attn_mask: Tensor | None, is_causal: bool
            ) -> Tensor:
    """The masked scores of one query block against one key block.

    q_i (B, H_kv, G, bq, E), k_j (B, H_kv, 1, bk, E) -> (B, H_kv, G, bq, bk)
    """
    s = (q_i @ k_j.transpose(-1, -2)) * scale  # (B, H_kv, G, bq, bk)
    if is_causal and cols.stop - 1 > rows.start:  # on the diagonal
        r = torch.arange(rows.start, rows.stop, device=s.device)
        c = torch.arange(cols.start, cols.stop, device=s.device)
        s = s.masked_fill(c[None, :] > r[:, None], float("-inf"))
    if attn_mask is not None:
        m = attn_mask[..., rows.start:rows.stop, cols.start:cols.stop]
        # m (B, H_kv, G, bq, bk), a view of the broadcast mask
        s = (s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool
             else s + m)
    return s


def _grouped_mask(attn_mask: Tensor | None, shape: tuple[int, ...]
                  ) -> Tensor | None:
    """A mask broadcast to (B, H, L, S), viewed as (B, H_kv, G, L, S)."""
    if attn_mask is None:
        return None
    B, H_kv, G, L, S = shape
    return attn_mask.expand(B, H_kv * G, L, S).unflatten(1, (H_kv, G))


def flash_forward(q: Tensor, k: Tensor, v: Tensor,
                  attn_mask: Tensor | None = None, is_causal: bool = False,
                  scale: float | None = None, block_q: int = 64,
                  block_k: int = 64, io: IOCount | None = None
                  ) -> tuple[Tensor, Tensor]:
    """Attention by blocks, never holding more than a (block_q, block_k)
    tile of scores per head.

    q (B, H, L, E), k (B, H_kv, S, E), v (B, H_kv, S, Ev) with H a multiple
    of H_kv -> out (B, H, L, Ev) in q's dtype, and the log-sum-exp of each
    row of scores, lse (B, H, L), in float32 (float64 for float64 input).
    attn_mask (broadcast to (B, H, L, S)): bool, True where a query may
    attend, or float, added to the scores. is_causal: query r sees keys
    c <= r. io, if given, counts the numbers read from and written to the
    inputs and outputs (slow memory).
    """
    _check_attention_inputs(q, k, v, attn_mask, block_q, block_k)
    B, H, L, E = q.shape
    H_kv, S, Ev = k.shape[1], k.shape[2], v.shape[3]
    G = H // H_kv  # query heads per key-value head
    scale = E ** -0.5 if scale is None else scale
    acc_type = at_least_float32(q[..., :0]).dtype  # float32 or float64
    qg = q.unflatten(1, (H_kv, G))  # (B, H_kv, G, L, E)
    mask = _grouped_mask(attn_mask, (B, H_kv, G, L, S))
    out = q.new_empty(B, H_kv, G, L, Ev)
    lse = q.new_empty(B, H_kv, G, L, dtype=acc_type)
    for i in range(0, L, block_q):
        rows = range(i, min(i + block_q, L))
        q_i = qg[..., i:rows.stop, :].to(acc_type)  # (B, H_kv, G, bq, E)
        m = q_i.new_full(q_i.shape[:-1], float("-inf"))  # (B, H_kv, G, bq)
        l = q_i.new_zeros(q_i.shape[:-1])  # (B, H_kv, G, bq)
        acc = q_i.new_zeros(*q_i.shape[:-1], Ev)  # (B, H_kv, G, bq, Ev)
        if io is not None:
            io.read(q_i)
        last_key = min(S, rows.stop) if is_causal else S  # skip the rest
        for j in range(0, last_key, block_k):
            cols = range(j, min(j + block_k, last_key))
            k_j = k[:, :, None, j:cols.stop].to(acc_type)  # (B,H_kv,1,bk,E)
            v_j = v[:, :, None, j:cols.stop].to(acc_type)  # (B,H_kv,1,bk,Ev)
            if io is not None:
                io.read(k_j, v_j)
            s = _scores(q_i, k_j, scale, rows, cols, mask, is_causal)
            m_new = torch.maximum(m, s.amax(dim=-1))  # (B, H_kv, G, bq)
            safe = _finite(m_new)
            p = torch.exp(s - safe[..., None])  # (B, H_kv, G, bq, bk)
            alpha = torch.exp(m - safe)  # (B, H_kv, G, bq), <= 1
            l = alpha * l + p.sum(dim=-1)
            acc = alpha[..., None] * acc + p @ v_j  # (B, H_kv, G, bq, Ev)
            m = m_new
        seen = l > 0  # False: every key was masked for this query
        o_i = acc / torch.where(seen, l, 1.0)[..., None]
        out[..., i:rows.stop, :] = o_i  # (B, H_kv, G, bq, Ev), 0 if unseen
        lse[..., i:rows.stop] = torch.where(
            seen, m + torch.log(torch.where(seen, l, 1.0)), float("-inf"))
        if io is not None:
            io.write(o_i, lse[..., i:rows.stop])
    return out.flatten(1, 2), lse.flatten(1, 2)  # (B, H, L, Ev), (B, H, L)


# § The backward, recomputed (docs/frontiers/flash_attention.md:452)
def flash_backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                   lse: Tensor, grad_out: Tensor,
                   attn_mask: Tensor | None = None, is_causal: bool = False,
                   scale: float | None = None, block_q: int = 64,
                   block_k: int = 64) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of flash_forward's output, from out, lse and grad_out
    (B, H, L, Ev) alone: every tile of P is recomputed as exp(s - lse)."""
    _check_attention_inputs(q, k, v, attn_mask, block_q, block_k)
    B, H, L, E = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    G = H // H_kv
    scale = E ** -0.5 if scale is None else scale
    acc_type = lse.dtype
    qg = q.unflatten(1, (H_kv, G)).to(acc_type)  # (B, H_kv, G, L, E)
    dog = grad_out.unflatten(1, (H_kv, G)).to(acc_type)  # (B,H_kv,G,L,Ev)
    D = (dog * out.unflatten(1, (H_kv, G))).sum(-1)  # (B, H_kv, G, L)
    lse_g = lse.unflatten(1, (H_kv, G))  # (B, H_kv, G, L)
    lse_g = lse_g.masked_fill(lse_g == float("-inf"), float("inf"))
    # a row that saw nothing gets P = exp(s - inf) = 0
    mask = _grouped_mask(attn_mask, (B, H_kv, G, L, S))
    dq = torch.zeros_like(qg)  # (B, H_kv, G, L, E)
    dk = k.new_zeros(k.shape, dtype=acc_type)  # (B, H_kv, S, E)
    dv = v.new_zeros(v.shape, dtype=acc_type)  # (B, H_kv, S, Ev)
    for i in range(0, L, block_q):
        rows = range(i, min(i + block_q, L))
        q_i, do_i = qg[..., i:rows.stop, :], dog[..., i:rows.stop, :]
        last_key = min(S, rows.stop) if is_causal else S
        for j in range(0, last_key, block_k):
            cols = range(j, min(j + block_k, last_key))
            k_j = k[:, :, None, j:cols.stop].to(acc_type)  # (B,H_kv,1,bk,E)
            v_j = v[:, :, None, j:cols.stop].to(acc_type)  # (B,H_kv,1,bk,Ev)
            s = _scores(q_i, k_j, scale, rows, cols, mask, is_causal)
            p = torch.exp(s - lse_g[..., i:rows.stop, None])  # (.., bq, bk)
            dv[:, :, j:cols.stop] += (p.transpose(-1, -2) @ do_i).sum(2)
            dp = do_i @ v_j.transpose(-1, -2)  # (B, H_kv, G, bq, bk)
            ds = p * (dp - D[..., i:rows.stop, None])  # (B,H_kv,G,bq,bk)
            dq[..., i:rows.stop, :] += (ds @ k_j) * scale
            dk[:, :, j:cols.stop] += (ds.transpose(-1, -2) @ q_i).sum(2) \
                * scale  # (B, H_kv, bk, E), summed over the group
    return (dq.flatten(1, 2).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype))


class FlashAttention(torch.autograd.Function):
    """flash_forward with flash_backward: saves q, k, v, the output and
    the log-sum-exp, never the (L, S) attention matrix."""

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, is_causal, scale, block_q,
                block_k):
        out, lse = flash_forward(q, k, v, attn_mask, is_causal, scale,
                                 block_q, block_k)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask = attn_mask  # not differentiated
        ctx.options = (is_causal, scale, block_q, block_k)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = flash_backward(q, k, v, out, lse, grad_out, ctx.mask,
                                    *ctx.options)
        return dq, dk, dv, None, None, None, None, None


def flash_attention(q: Tensor, k: Tensor, v: Tensor,
                    attn_mask: Tensor | None = None, is_causal: bool = False,
                    scale: float | None = None, block_q: int = 64,
                    block_k: int = 64) -> Tensor:
    """F.scaled_dot_product_attention(q, k, v, attn_mask, is_causal=...,
    scale=..., enable_gqa=True), computed by tiles, with a recomputing
    backward. A float attn_mask is added to the scores, and gets no
    gradient."""
    if attn_mask is not None and attn_mask.requires_grad:
        raise ValueError("flash_attention gives no gradient to attn_mask: "
                         "expected a mask with requires_grad=False")
    return FlashAttention.apply(q, k, v, attn_mask, is_causal, scale,
                                block_q, block_k)


# § Slow-memory traffic, counted (docs/frontiers/flash_attention.md:645)
def naive_attention(q: Tensor, k: Tensor, v: Tensor,
                    is_causal: bool = False, io: IOCount | None = None
                    ) -> Tensor:
    """The standard algorithm, materialising S and P, counting its
    slow-memory traffic into io. q, k, v (B, H, N, d) -> (B, H, N, d)."""
    io = IOCount() if io is None else io
    io.read(q, k)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, N, N)
    if is_causal:
        n, m = s.shape[-2:]
        hidden = torch.ones(n, m, dtype=torch.bool, device=s.device).triu(1)
        s = s.masked_fill(hidden, float("-inf"))
    io.write(s)
    io.read(s)
    p = torch.softmax(s, dim=-1)  # (B, H, N, N)
    io.write(p)
    io.read(p, v)
    out = p @ v  # (B, H, N, d)
    io.write(out)
    return out


# § Measured on this CPU: memory and time (docs/frontiers/flash_attention.md:725)
class PeakMemory(TorchDispatchMode):
    """Counts bytes of the tensors operations create while it is active:
    `now` alive, `peak` the most at once."""

    def __init__(self):
        super().__init__()
        self.refs: dict[int, int] = {}  # storage address -> live tensors
        self.sizes: dict[int, int] = {}  # storage address -> bytes
        self.now = self.peak = 0

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.now -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr()
                  for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in self.refs:  # a view of a tensor made in here
                self.refs[key] += 1
            elif key in inputs or storage.nbytes() == 0:
                continue  # a view or in-place result of an outside tensor
            else:
                self.refs[key], self.sizes[key] = 1, storage.nbytes()
                self.now += storage.nbytes()
                self.peak = max(self.peak, self.now)
            weakref.finalize(t, self._release, key)
        return out


def peak_memory(fn, *args, **kwargs) -> int:
    """The peak bytes of tensors fn(*args, **kwargs) creates (no_grad)."""
    with torch.no_grad(), PeakMemory() as counter:
        fn(*args, **kwargs)
    return counter.peak
