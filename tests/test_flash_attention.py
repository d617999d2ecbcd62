"""The flash attention chapter: the online softmax against torch.softmax
over random splits; the tiled forward and its recomputing backward against
F.scaled_dot_product_attention (causal, boolean and additive masks, odd
lengths, more keys than queries, grouped-query heads, several block sizes,
float32 and float64); gradcheck; the slow-memory counts and the peak
memory counter against what they must find."""

import math

import pytest
import torch
import torch.nn.functional as F

from cave.frontiers.flash_attention import (
    IOCount, PeakMemory, flash_attention, flash_backward, flash_forward,
    merge_stats, naive_attention, online_softmax, peak_memory,
    softmax_stats)

pytestmark = pytest.mark.usefixtures("one_thread")

# float64: sums in another order, nothing else; float32 likewise, at
# float32's epsilon times the few hundred terms of a row.
TOL = {torch.float64: dict(atol=1e-12, rtol=1e-10),
       torch.float32: dict(atol=2e-5, rtol=2e-5)}


def random_split(n, pieces, generator):
    cuts = sorted(torch.randperm(n - 1, generator=generator)[:pieces - 1]
                  .add(1).tolist())
    return [b - a for a, b in zip([0] + cuts, cuts + [n])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_online_softmax_equals_softmax_for_any_split(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 200, generator=g, dtype=dtype) * 20
    x[0, 0, 17] = 500.0  # exp overflows without the maximum
    x[1, 2, :150] = float("-inf")  # masked pieces
    for pieces in (1, 2, 5, 37, 200):
        sizes = random_split(200, pieces, g)
        torch.testing.assert_close(online_softmax(x, sizes),
                                   torch.softmax(x, dim=-1), **TOL[dtype])


def test_merge_of_fully_masked_pieces_is_empty_not_nan():
    inf = torch.tensor([float("-inf")])
    m, l = merge_stats(inf, torch.zeros(1), inf, torch.zeros(1))
    assert m.item() == float("-inf") and l.item() == 0.0
    m, l = merge_stats(inf, torch.zeros(1), *softmax_stats(
        torch.tensor([[0.0, 0.0]])))
    assert m.item() == 0.0 and l.item() == 2.0


def test_online_softmax_rejects_bad_splits():
    x = torch.randn(10)
    with pytest.raises(ValueError, match="add up to the row's length 10"):
        online_softmax(x, [3, 3])
    with pytest.raises(ValueError, match="block size must be >= 1, got 0"):
        online_softmax(x, 0)


CASES = [  # B, H, H_kv, L, S, E, Ev, causal, mask, block_q, block_k
    (2, 3, 3, 33, 33, 8, 8, True, None, 8, 8),
    (1, 2, 2, 50, 50, 16, 16, False, None, 16, 16),
    (2, 4, 2, 37, 37, 8, 12, True, None, 5, 11),  # GQA, Ev != E
    (1, 6, 2, 19, 45, 8, 8, False, "bool", 7, 16),
    (1, 2, 1, 23, 29, 4, 4, False, "float", 4, 64),
    (1, 2, 2, 41, 29, 8, 8, True, None, 16, 16),  # more queries than keys
    (1, 2, 2, 13, 40, 8, 8, True, None, 4, 6),  # more keys than queries
    (1, 1, 1, 3, 3, 8, 8, True, None, 64, 64),  # shorter than a block
    (1, 2, 2, 24, 24, 8, 8, True, "bool", 1, 1),  # a causal mask and more
]


def make(case, dtype, seed=0):
    B, H, H_kv, L, S, E, Ev, causal, kind, bq, bk = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, E, generator=g, dtype=dtype)
    k = torch.randn(B, H_kv, S, E, generator=g, dtype=dtype)
    v = torch.randn(B, H_kv, S, Ev, generator=g, dtype=dtype)
    mask = None
    if kind == "bool":
        mask = torch.rand(B, 1, L, S, generator=g) > 0.4
        mask[..., 0] = True  # every query sees a key
    elif kind == "float":
        mask = torch.randn(L, S, generator=g, dtype=dtype)
    return q, k, v, mask, causal, bq, bk


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES)
def test_forward_and_gradients_equal_scaled_dot_product_attention(case,
                                                                  dtype):
    q, k, v, mask, causal, bq, bk = make(case, dtype)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    ours = flash_attention(q, k, v, attn_mask=mask, is_causal=causal,
                           block_q=bq, block_k=bk)
    theirs = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal,
        enable_gqa=q.shape[1] != k.shape[1])
    torch.testing.assert_close(ours, theirs, **TOL[dtype])
    grad = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, (q, k, v), grad),
                    torch.autograd.grad(theirs, (q, k, v), grad)):
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("scale", [0.3, 1.0])
def test_scale_and_log_sum_exp(scale):
    q, k, v, _, _, _, _ = make(CASES[1], torch.float64)
    out, lse = flash_forward(q, k, v, scale=scale, block_q=16, block_k=7)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(
        q, k, v, scale=scale))
    torch.testing.assert_close(lse, torch.logsumexp(
        q @ k.transpose(-1, -2) * scale, dim=-1))
    assert lse.dtype == torch.float64


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 6, 3, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, 7, 3, generator=g, dtype=torch.float64)
    v = torch.randn(1, 1, 7, 2, generator=g, dtype=torch.float64)
    mask = torch.randn(6, 7, generator=g, dtype=torch.float64)
    for kwargs in (dict(is_causal=True), dict(attn_mask=mask)):
        assert torch.autograd.gradcheck(
            lambda q, k, v: flash_attention(q, k, v, block_q=4, block_k=3,
                                            **kwargs),
            tuple(t.clone().requires_grad_() for t in (q, k, v)))


def test_fully_masked_rows_give_zero_output_and_no_nan_gradients():
    q, k, v = (torch.randn(1, 1, 6, 4, dtype=torch.float64,
                           requires_grad=True) for _ in range(3))
    mask = torch.ones(6, 6, dtype=torch.bool)
    mask[2] = False  # query 2 sees nothing
    out = flash_attention(q, k, v, attn_mask=mask, block_q=4, block_k=4)
    assert torch.equal(out[0, 0, 2], torch.zeros(4, dtype=torch.float64))
    _, lse = flash_forward(q, k, v, mask)
    assert lse[0, 0, 2].item() == float("-inf")
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(grads[0][0, 0, 2], torch.zeros(4, dtype=torch.float64))
    keep = [0, 1, 3, 4, 5]
    torch.testing.assert_close(out[:, :, keep], F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask)[:, :, keep])


def test_backward_alone_matches_autograd_of_the_formula():
    q, k, v, mask, causal, bq, bk = make(CASES[3], torch.float64)
    out, lse = flash_forward(q, k, v, mask, causal, block_q=bq, block_k=bk)
    grad = torch.randn_like(out)
    ours = flash_backward(q, k, v, out, lse, grad, mask, causal, None, 9, 4)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                         enable_gqa=True)
    for a, b in zip(ours, torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(a, b, **TOL[torch.float64])


def test_half_precision_error_within_twice_pytorchs():
    """flash-attention's own criterion: against float32 attention, our
    bfloat16 error is at most twice PyTorch's bfloat16 error (plus a
    little)."""
    q, k, v, _, _, _, _ = make(CASES[2], torch.float32)
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           enable_gqa=True)
    half = [t.bfloat16() for t in (q, k, v)]
    ours = flash_attention(*half, is_causal=True, block_q=8, block_k=8)
    theirs = F.scaled_dot_product_attention(*half, is_causal=True,
                                            enable_gqa=True)
    assert ours.dtype == torch.bfloat16
    err_ours = (ours.float() - exact).abs().max().item()
    err_theirs = (theirs.float() - exact).abs().max().item()
    assert err_ours <= 2 * err_theirs + 1e-3, (err_ours, err_theirs)


def test_bad_inputs_get_clear_errors():
    q = torch.randn(1, 4, 8, 16)
    k = torch.randn(1, 3, 8, 16)
    with pytest.raises(ValueError, match="multiple of the key-value heads"):
        flash_forward(q, k, k)
    with pytest.raises(ValueError, match=r"expected q, k, v of shape"):
        flash_forward(q[0], q[0], q[0])
    with pytest.raises(ValueError, match=r"E=16"):
        flash_forward(q, q[..., :8], q)
    with pytest.raises(ValueError, match="one floating dtype"):
        flash_forward(q, q.double(), q)
    with pytest.raises(ValueError, match="block_q must be a positive int"):
        flash_forward(q, q, q, block_q=0)
    with pytest.raises(ValueError, match=r"broadcast to \(B, H, L, S\)"):
        flash_forward(q, q, q, attn_mask=torch.ones(8, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="must be bool .* or torch.float32"):
        flash_forward(q, q, q, attn_mask=torch.ones(8, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="no gradient to attn_mask"):
        flash_attention(q, q, q, attn_mask=torch.zeros(8, 8,
                                                        requires_grad=True))


def test_io_counts_follow_the_algorithms():
    n, d, b = 256, 16, 64
    standard, flash, causal = IOCount(), IOCount(), IOCount()
    naive_attention(*torch.empty(3, 1, 1, n, d, device="meta"), io=standard)
    assert standard.reads == 2 * n * d + n * n + n * n + n * d
    assert standard.writes == 2 * n * n + n * d
    x = torch.zeros(1, 1, n, d)
    flash_forward(x, x, x, block_q=b, block_k=b, io=flash)
    assert flash.reads == n * d + (n // b) * 2 * n * d
    assert flash.writes == n * d + n
    flash_forward(x, x, x, is_causal=True, block_q=b, block_k=b, io=causal)
    blocks = n // b
    assert causal.reads == n * d + blocks * (blocks + 1) // 2 * 2 * b * d


def test_peak_memory_counts_what_is_alive_at_once():
    x = torch.randn(256, 256)
    assert peak_memory(lambda: x @ x) == 256 * 256 * 4
    # two products alive together, then one freed before the third
    def two_then_one():
        a = x @ x
        b = x @ x
        del a
        c = b + 1  # noqa: F841
    assert peak_memory(two_then_one) == 2 * 256 * 256 * 4
    assert peak_memory(lambda: x.view(-1).add_(0)) == 0  # in place, a view
    with PeakMemory() as counter:
        y = x * 2
    assert counter.now == counter.peak == y.numel() * 4
    n, d = 512, 32
    q = torch.randn(1, 1, n, d)
    naive = peak_memory(naive_attention, q, q, q)
    tiles = peak_memory(flash_forward, q, q, q, block_q=64, block_k=64)
    assert naive >= 2 * n * n * 4  # S and P
    assert tiles < naive / 8
    assert math.isclose(peak_memory(naive_attention, q[:, :, :n // 2],
                                    q[:, :, :n // 2], q[:, :, :n // 2]),
                        naive / 4, rel_tol=0.1)
