"""The flash attention chapter's tiled forward as a Triton kernel, checked
against F.scaled_dot_product_attention and timed against it on a GPU.

    python benchmarks/flash_attention_triton.py              # on a GPU
    TRITON_INTERPRET=1 python benchmarks/flash_attention_triton.py
                                          # no GPU: check only, on the CPU

The kernel is docs/frontiers/flash_attention.md's `flash_forward`, line for
line: one program per (block of queries, batch and head), the loop over
key blocks inside, the running maximum m, the running sum l and the
unnormalised output in registers, causal blocks past the diagonal
skipped, keys past the end masked, grouped key-value heads read by the
query heads of their group. It returns the output and the log-sum-exp,
which the check compares with the chapter's `flash_forward`.

On a GPU it times, for causal attention over doubling lengths (batch 4,
16 query heads, 4 key-value heads of 64, bfloat16), this kernel against
PyTorch's fused attention, interleaved, with triton.testing.do_bench.
Without a GPU, TRITON_INTERPRET=1 runs the kernel in Triton's interpreter
on the CPU: correct results, no meaningful time, so it only checks. It
lives outside the book because it imports triton, which the book's code
does not use (Triton ships with PyTorch's CUDA builds; on a CPU-only
install, `pip install triton` provides the interpreter).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from cave.frontiers.flash_attention import flash_forward


@triton.jit
def _flash_forward_kernel(
        Q, K, V, O, LSE, scale,
        s_qb, s_qh, s_qm, s_qd, s_kb, s_kh, s_kn, s_kd,
        s_vb, s_vh, s_vn, s_vd, s_ob, s_oh, s_om, s_od, s_lb, s_lh,
        H, GROUP, L, S,
        IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    block = tl.program_id(0)  # which block of queries
    bh = tl.program_id(1)  # which (batch, query head)
    b, h = bh // H, bh % H
    h_kv = h // GROUP  # the key-value head this query head reads
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    cols0 = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    dims = tl.arange(0, HEAD_DIM)  # (HEAD_DIM,)
    q = tl.load(Q + b * s_qb + h * s_qh + rows[:, None] * s_qm
                + dims[None, :] * s_qd, mask=rows[:, None] < L, other=0.0)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running maximum
    l = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp(s - m)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)  # sum of exp(s-m) v
    last_key = S
    if IS_CAUSAL:  # key blocks after this block's last row: skipped
        last_key = tl.minimum(S, (block + 1) * BLOCK_M)
    for start in range(0, last_key, BLOCK_N):
        cols = start + cols0
        k = tl.load(K + b * s_kb + h_kv * s_kh + cols[None, :] * s_kn
                    + dims[:, None] * s_kd, mask=cols[None, :] < S,
                    other=0.0)  # (HEAD_DIM, BLOCK_N)
        s = tl.dot(q, k) * scale  # (BLOCK_M, BLOCK_N), float32
        visible = cols[None, :] < S
        if IS_CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))  # key 0 is in the first
        # block and every row sees it, so m_new is finite
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)  # <= 1
        l = alpha * l + tl.sum(p, 1)
        v = tl.load(V + b * s_vb + h_kv * s_vh + cols[:, None] * s_vn
                    + dims[None, :] * s_vd, mask=cols[:, None] < S,
                    other=0.0)  # (BLOCK_N, HEAD_DIM)
        acc = alpha[:, None] * acc + tl.dot(p.to(v.dtype), v)
        m = m_new
    out = acc / l[:, None]
    tl.store(O + b * s_ob + h * s_oh + rows[:, None] * s_om
             + dims[None, :] * s_od, out.to(O.dtype.element_ty),
             mask=rows[:, None] < L)
    tl.store(LSE + b * s_lb + h * s_lh + rows, m + tl.log(l), mask=rows < L)


def triton_flash_forward(q, k, v, is_causal=False, block_m=64, block_n=64):
    """q (B, H, L, E), k and v (B, H_kv, S, E) -> (out (B, H, L, E), lse
    (B, H, L) float32), as flash_forward. E must be 16, 32, 64 or 128."""
    B, H, L, E = q.shape
    H_kv, S = k.shape[1], k.shape[2]
    if E not in (16, 32, 64, 128) or H % H_kv or v.shape != k.shape:
        raise ValueError(f"expected head size 16, 32, 64 or 128, H a "
                         f"multiple of H_kv and v shaped like k, got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v "
                         f"{tuple(v.shape)}")
    out = torch.empty_like(q)
    lse = torch.empty(B, H, L, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(L, block_m), B * H)
    _flash_forward_kernel[grid](
        q, k, v, out, lse, E ** -0.5, *q.stride(), *k.stride(),
        *v.stride(), *out.stride(), *lse.stride()[:2], H, H // H_kv, L, S,
        IS_CAUSAL=is_causal, BLOCK_M=block_m, BLOCK_N=block_n,
        HEAD_DIM=E)
    return out, lse


def check(device: str) -> None:
    """Our kernel against PyTorch's attention and the chapter's tiles."""
    torch.manual_seed(0)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    for B, H, H_kv, L, S, E, causal in [(1, 2, 2, 100, 100, 16, True),
                                         (2, 4, 2, 77, 130, 32, False),
                                         (1, 4, 1, 5, 5, 16, True),
                                         (1, 2, 2, 64, 64, 64, True)]:
        q = torch.randn(B, H, L, E, device=device, dtype=dtype)
        k, v = torch.randn(2, B, H_kv, S, E, device=device, dtype=dtype)
        out, lse = triton_flash_forward(q, k, v, causal, 32, 32)
        ref = F.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), is_causal=causal,
            enable_gqa=H != H_kv)
        own = F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                             enable_gqa=H != H_kv)
        ours_err = (out.float() - ref).abs().max().item()
        torch_err = (own.float() - ref).abs().max().item()
        tiles, tiles_lse = flash_forward(q.float().cpu(), k.float().cpu(),
                                         v.float().cpu(), is_causal=causal)
        lse_err = (lse.cpu() - tiles_lse).abs().max().item()
        print(f"L={L:3d} S={S:3d} H={H}/{H_kv} E={E:3d} causal={causal!s:5}"
              f" {str(dtype)[6:]}: error {ours_err:.1e} (PyTorch's own "
              f"{torch_err:.1e}), log-sum-exp against flash_forward "
              f"{lse_err:.1e}")
        assert ours_err <= 2 * torch_err + 1e-5, "kernel error too large"
        assert lse_err < 1e-2, "log-sum-exp differs from flash_forward"


def bench() -> None:
    """Causal forward times, ours against PyTorch's, interleaved."""
    from triton.testing import do_bench
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {triton.__version__}; batch 4, 16 query heads, 4 "
          f"key-value heads of 64, bfloat16, causal")
    print(f"{'N':>6s} {'triton ms':>10s} {'PyTorch ms':>11s} "
          f"{'ours TFLOP/s':>13s}")
    for n in (512, 1024, 2048, 4096, 8192, 16384):
        q = torch.randn(4, 16, n, 64, device="cuda", dtype=torch.bfloat16)
        k, v = torch.randn(2, 4, 4, n, 64, device="cuda",
                           dtype=torch.bfloat16)
        ours = do_bench(lambda: triton_flash_forward(q, k, v, True, 128, 64))
        theirs = do_bench(lambda: F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=True))
        flops = 4 * 16 * 2 * 2 * n * n * 64 / 2  # QK^T and PV, causal half
        print(f"{n:6d} {ours:10.3f} {theirs:11.3f} "
              f"{flops / ours / 1e9:13.1f}")


if __name__ == "__main__":
    if torch.cuda.is_available():
        check("cuda")
        bench()
    elif os.environ.get("TRITON_INTERPRET") == "1":
        check("cpu")
        print("interpreter on the CPU: checked, not timed")
    else:
        sys.exit("no GPU: run with TRITON_INTERPRET=1 to check the kernel "
                 "on the CPU (no timing)")
