"""docs/transformers/llama.md against PyTorch and Hugging Face transformers.

Tolerances: float32 comparisons use rtol=atol=1e-5 (values of order 1;
the sums are taken in different orders by different kernels); float64
uses 1e-10. The reference-equivalence tests build tiny random
transformers.LlamaForCausalLM models (eager attention, float32) and
compare logits at 1e-5 in both directions.
"""

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cave.transformers import llama as L

import transformers  # noqa: E402  (a test requirement: never skip)

F32 = {"rtol": 1e-5, "atol": 1e-5}
F64 = {"rtol": 1e-10, "atol": 1e-10}
# bfloat16 keeps 8 significant bits: a step is 2**-7 relative. Two sides
# that compute alike in float32 and round differently differ by a step or
# two; 2**-6 absolute covers results near zero out of larger terms.
BF16 = {"rtol": 2 ** -6, "atol": 2 ** -6}
TOLS = {torch.float32: F32, torch.float64: F64, torch.bfloat16: BF16}
FAST = settings(max_examples=int(os.environ.get("CAVE_EXAMPLES", 20)),
                deadline=None, derandomize=True)


def tiny(**kw) -> L.LlamaConfig:
    base = {"vocab_size": 37, "dim": 32, "n_layers": 2, "n_heads": 4,
            "n_kv_heads": 2, "max_seq_len": 48}
    return L.LlamaConfig(**{**base, **kw})


def ids(B, T, V=37, seed=0):
    return torch.randint(0, V, (B, T),
                         generator=torch.Generator().manual_seed(seed))


def spread(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random norm gains too, so that a swapped norm would be caught."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
    return model.eval()


# --------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------


def test_config_errors_name_expected_and_got():
    with pytest.raises(ValueError, match=r"expected a multiple of 8, "
                                         r"got dim=100"):
        L.LlamaConfig(dim=100, n_heads=8)
    with pytest.raises(ValueError, match=r"multiple of n_kv_heads=4, "
                                         r"got n_heads=6"):
        L.LlamaConfig(dim=96, n_heads=6, n_kv_heads=4)
    with pytest.raises(ValueError, match=r"head_dim .* even, got 3"):
        L.LlamaConfig(dim=12, n_heads=4, n_kv_heads=4)
    with pytest.raises(ValueError, match=r"n_layers must be a positive int"
                                         r", got 0"):
        L.LlamaConfig(n_layers=0)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        L.LlamaConfig(dropout=1.0)


def test_ffn_dim_follows_llamas_rule():
    assert L.LlamaConfig(dim=4096, n_heads=32, n_kv_heads=32,
                         multiple_of=256).ffn_dim == 11008  # LLaMA 7B
    assert L.LlamaConfig(dim=64, n_heads=4, n_kv_heads=4).ffn_dim == 192
    assert tiny(hidden_dim=50).ffn_dim == 50


# --------------------------------------------------------------------------
# RMSNorm
# --------------------------------------------------------------------------


@FAST
@given(shape=st.lists(st.integers(1, 5), min_size=0, max_size=2),
       dim=st.integers(1, 24), eps=st.sampled_from([1e-5, 1e-6, 0.1]),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_rmsnorm_matches_nn_rmsnorm_with_gradients(shape, dim, eps, dtype):
    gen = torch.Generator().manual_seed(dim)
    x = (torch.randn(*shape, dim, generator=gen, dtype=dtype) * 3
         ).requires_grad_()
    ours = L.RMSNorm(dim, eps).to(dtype)
    ref = nn.RMSNorm(dim, eps=eps).to(dtype)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(dim, generator=gen, dtype=dtype))
        ref.weight.copy_(ours.weight)
    got, want = ours(x), ref(x)
    tol = F32 if dtype == torch.float32 else F64
    torch.testing.assert_close(got, want, **tol)
    g = torch.randn(got.shape, generator=gen, dtype=dtype)
    a = torch.autograd.grad(got, (x, ours.weight), g)
    b = torch.autograd.grad(want, (x, ref.weight), g)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, **tol)


def test_rmsnorm_keeps_bfloat16_and_checks_its_input():
    x = torch.randn(3, 8).bfloat16()
    y = L.RMSNorm(8).bfloat16()(x)  # a bfloat16 model, as LLaMA ships
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), nn.RMSNorm(8, eps=1e-5)(x.float()),
                               rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match=r"expected last dimension 8, "
                                         r"got \(3, 7\)"):
        L.RMSNorm(8)(torch.randn(3, 7))


def test_rmsnorm_in_bfloat16_is_one_step_from_nn_rmsnorm():
    # both normalise in float32; ours (like Meta's and Hugging Face's code)
    # rounds to bfloat16 before the gain and after, nn.RMSNorm once: the
    # outputs differ by at most one step of bfloat16, 2**-7 relative
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 7, 16, generator=gen) * 3).bfloat16()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, ref = L.RMSNorm(16).bfloat16(), nn.RMSNorm(16, eps=1e-5).bfloat16()
    with torch.no_grad():
        ours.weight.copy_(torch.randn(16, generator=gen))
        ref.weight.copy_(ours.weight)
    y1, y2 = ours(x1), ref(x2)
    assert y1.dtype == y2.dtype == torch.bfloat16
    torch.testing.assert_close(y1, y2, rtol=2 ** -7, atol=0)
    g = torch.randn(y1.shape, generator=gen).bfloat16()
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, **BF16)
    # the gain's gradient sums 448 products: sqrt(448) steps at most
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad,
                               rtol=2 ** -6, atol=2 ** -6 * 448 ** 0.5)


# --------------------------------------------------------------------------
# RoPE
# --------------------------------------------------------------------------


@FAST
@given(m=st.integers(0, 500), n=st.integers(0, 500),
       shift=st.integers(-200, 2000), half=st.integers(1, 16),
       seed=st.integers(0, 1000))
def test_rope_scores_depend_only_on_relative_position(m, n, shift, half,
                                                       seed):
    d = 2 * half
    m2, n2 = m + shift, n + shift
    if min(m2, n2) < 0:
        m2, n2 = m2 - min(m2, n2), n2 - min(m2, n2)
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 1, d, generator=gen, dtype=torch.float64)
    positions = torch.tensor([m, n, m2, n2])
    cos, sin = L.rope_angles(positions, d)  # float32 angles
    cos, sin = cos.double(), sin.double()
    rq = L.apply_rope(q.expand(4, d), cos, sin)  # (4, d)
    rk = L.apply_rope(k.expand(4, d), cos, sin)
    # float32 angles at positions up to 2500: about 1e-4 rad of rounding
    torch.testing.assert_close(rq[0] @ rk[1], rq[2] @ rk[3],
                               rtol=1e-3, atol=1e-3 * d)


def test_rope_relative_property_exact_in_float64_angles():
    d, T = 16, 40
    theta = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * theta
    cos, sin = angles.cos(), angles.sin()
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, d, generator=gen, dtype=torch.float64)
    table = (L.apply_rope(q.expand(T, d), cos, sin)
             @ L.apply_rope(k.expand(T, d), cos, sin).T)  # (T, T)
    for off in range(-T + 1, T):
        diag = table.diagonal(off)
        torch.testing.assert_close(diag, diag[:1].expand_as(diag), **F64)
    torch.testing.assert_close(table[3, 3], q @ k, **F64)


def test_rope_conventions_complex_form_and_permutation():
    gen = torch.Generator().manual_seed(0)
    d, T = 12, 9
    x = torch.randn(2, 3, T, d, generator=gen)
    cos, sin = L.rope_angles(torch.arange(T), d, theta=500.0)
    z = torch.view_as_complex(x.unflatten(-1, (-1, 2)))
    meta = torch.view_as_real(z * torch.complex(cos, sin)).flatten(-2)
    torch.testing.assert_close(L.apply_rope(x, cos, sin), meta, **F32)
    perm = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])
    torch.testing.assert_close(L.apply_rope_halves(x[..., perm], cos, sin),
                               L.apply_rope(x, cos, sin)[..., perm], **F32)
    w = torch.randn(3 * d, 5, generator=gen)
    torch.testing.assert_close(L.permute_to_halves(w, 3) @ x[0, 0, 0, :5],
                               (w @ x[0, 0, 0, :5]).view(3, d)[:, perm]
                               .reshape(-1), **F32)
    assert torch.equal(L.permute_to_interleaved(L.permute_to_halves(w, 3),
                                                3), w)
    with pytest.raises(ValueError, match=r"needs angles for \(T, d\)"):
        L.apply_rope(x, cos[:4], sin[:4])


# --------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------


def test_attention_with_as_many_kv_heads_is_torch_multihead_attention():
    cfg = tiny(n_kv_heads=4)
    attn = L.Attention(cfg)
    ref = nn.MultiheadAttention(32, 4, bias=False, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([attn.wq.weight, attn.wk.weight,
                                            attn.wv.weight]))
        ref.out_proj.weight.copy_(attn.wo.weight)
    x = torch.randn(3, 9, 32, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(9, 9, dtype=torch.bool).triu(1)
    want, _ = ref(x, x, x, attn_mask=mask, need_weights=False)
    identity = torch.ones(9, 4), torch.zeros(9, 4)  # RoPE switched off
    for fast in (True, False):
        attn.fast = fast
        torch.testing.assert_close(attn(x, *identity), want, **F32)


@pytest.mark.parametrize("n_kv", [1, 2, 4])
def test_grouped_query_is_multi_head_with_copied_kv_heads(n_kv):
    H, C, hd = 4, 32, 8
    gqa = L.Attention(tiny(n_kv_heads=n_kv))
    mha = L.Attention(tiny(n_kv_heads=H))
    with torch.no_grad():
        mha.wq.weight.copy_(gqa.wq.weight)
        mha.wo.weight.copy_(gqa.wo.weight)
        for name in ("wk", "wv"):
            w = getattr(gqa, name).weight.view(n_kv, hd, C)
            getattr(mha, name).weight.copy_(
                w.repeat_interleave(H // n_kv, 0).reshape(C, C))
    x = torch.randn(2, 11, C, generator=torch.Generator().manual_seed(2))
    cos, sin = L.rope_angles(torch.arange(11), hd)
    want = mha(x, cos, sin)
    for fast in (True, False):
        gqa.fast = fast
        torch.testing.assert_close(gqa(x, cos, sin), want, **F32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_attention_equals_multihead_attention_in_every_dtype(dtype):
    cfg = tiny(n_kv_heads=4)
    attn = L.Attention(cfg)
    ref = nn.MultiheadAttention(32, 4, bias=False, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([attn.wq.weight, attn.wk.weight,
                                            attn.wv.weight]))
        ref.out_proj.weight.copy_(attn.wo.weight)
    attn, ref = attn.to(dtype), ref.to(dtype)
    x = torch.randn(3, 9, 32, generator=torch.Generator().manual_seed(1))
    x = x.to(dtype)
    mask = torch.ones(9, 9, dtype=torch.bool).triu(1)
    want, _ = ref(x, x, x, attn_mask=mask, need_weights=False)
    identity = torch.ones(9, 4), torch.zeros(9, 4)  # RoPE switched off
    for fast in (True, False):
        attn.fast = fast
        got = attn(x, *identity)
        assert got.dtype == dtype
        torch.testing.assert_close(got, want, **TOLS[dtype])


def test_repeat_kv_is_repeat_interleave():
    x = torch.randn(2, 3, 5, 4)
    assert torch.equal(L.repeat_kv(x, 4), x.repeat_interleave(4, dim=1))
    assert L.repeat_kv(x, 1) is x


# --------------------------------------------------------------------------
# the model, the cache
# --------------------------------------------------------------------------


def test_model_loss_is_cross_entropy_and_causal():
    model = spread(L.Llama(tiny()))
    x = ids(3, 20)
    y = ids(3, 20, seed=1)
    y[0, :4] = -100
    logits, loss = model(x, y)
    assert logits.shape == (3, 20, 37)
    torch.testing.assert_close(
        loss, F.cross_entropy(logits.flatten(0, 1), y.flatten()), **F32)
    assert model(x)[1] is None
    fresh_loss = L.Llama(tiny())(x, y)[1]
    assert abs(fresh_loss.item() - math.log(37)) < 0.1  # near-uniform
    x2 = x.clone()
    x2[:, 12:] = (x2[:, 12:] + 1) % 37
    with torch.no_grad():
        assert torch.equal(model(x)[0][:, :12], model(x2)[0][:, :12])
        assert not torch.allclose(model(x)[0][:, 12:], model(x2)[0][:, 12:])


def test_tied_embeddings_share_one_matrix():
    model = L.Llama(tiny(tie_embeddings=True))
    assert model.output.weight is model.tok_embeddings.weight
    untied = sum(p.numel() for p in L.Llama(tiny()).parameters())
    assert untied - sum(p.numel() for p in model.parameters()) == 37 * 32


def test_model_input_errors():
    model = L.Llama(tiny())
    with pytest.raises(ValueError, match=r"\(B, T\) and dtype torch.int64, "
                                         r"got \(5,\) torch.int64"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"torch.float32"):
        model(torch.zeros(1, 5))
    with pytest.raises(ValueError, match=r"positions 0..48 exceed "
                                         r"max_seq_len=48"):
        model(ids(1, 49))
    with pytest.raises(ValueError, match=r"targets must match idx \(2, 5\)"):
        model(ids(2, 5), ids(2, 4))
    with pytest.raises(ValueError, match=r"start_pos > 0 needs the cache"):
        model(ids(1, 3), start_pos=2)
    cache = model.new_cache(2)
    with pytest.raises(ValueError, match=r"cache holds batch size 2"):
        model(ids(3, 4), cache=cache)


@pytest.mark.parametrize("n_kv, fast", [(2, True), (1, False), (4, True)])
def test_cache_gives_the_same_logits_token_by_token(n_kv, fast):
    model = spread(L.Llama(tiny(n_kv_heads=n_kv, fast_attention=fast)))
    x = ids(2, 30)
    with torch.no_grad():
        full, _ = model(x)
        cache = model.new_cache(2)
        got = [model(x[:, :6], cache=cache)[0]]  # prefill
        pos = 6
        for width in (1, 1, 5, 1, 3, 1):  # single tokens and chunks
            got.append(model(x[:, pos:pos + width], cache=cache,
                             start_pos=pos)[0])
            pos += width
        for p in range(pos, 30):
            got.append(model(x[:, p:p + 1], cache=cache, start_pos=p)[0])
    torch.testing.assert_close(torch.cat(got, 1), full, **F32)


def test_kv_cache_bytes_and_nbytes_agree():
    cfg = tiny()
    cache = L.Llama(cfg).new_cache(3)
    assert cache.nbytes == L.kv_cache_bytes(cfg, 3, dtype=torch.float32)
    seventy_b = L.LlamaConfig(dim=8192, n_layers=80, n_heads=64,
                              n_kv_heads=8)
    assert L.kv_cache_bytes(seventy_b, seq_len=1) == 2 * 80 * 8 * 128 * 2
    with pytest.raises(ValueError, match=r"positions 46..49 do not fit a "
                                         r"cache of max_len 48"):
        cache.update(0, 46, torch.zeros(3, 2, 4, 8), torch.zeros(3, 2, 4, 8))


# --------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------


def test_top_k_edge_cases():
    z = torch.tensor([[1.0, 3.0, 2.0, 3.0, -1.0]])
    assert torch.equal(L.top_k_filter(z, 5), z)
    assert torch.equal(L.top_k_filter(z, 99), z)
    kept = L.top_k_filter(z, 1) > float("-inf")
    assert kept.tolist() == [[False, True, False, True, False]]  # ties kept
    kept = L.top_k_filter(z, 3) > float("-inf")
    assert kept.tolist() == [[False, True, True, True, False]]
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match=r"top_k must be a positive int"):
            L.top_k_filter(z, bad)


def test_top_p_edge_cases():
    z = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.equal(L.top_p_filter(z, 1.0), z)
    kept = lambda p: (L.top_p_filter(z, p) > float("-inf")).sum().item()
    assert kept(1e-6) == 1  # the most likely token always survives
    assert kept(0.5) == 1 and kept(0.51) == 2
    assert kept(0.79) == 2 and kept(0.81) == 3 and kept(0.96) == 4
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
            L.top_p_filter(z, bad)


@pytest.mark.parametrize("k, p, temperature", [(5, None, 1.0),
                                               (None, 0.7, 1.0),
                                               (None, 0.9, 0.6),
                                               (10, 0.8, 1.7)])
def test_sampling_filters_match_transformers_warpers(k, p, temperature):
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    z = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 2
    want = TemperatureLogitsWarper(temperature)(None, z.clone())
    ours = z / temperature
    if k is not None:
        want = TopKLogitsWarper(k)(None, want)
        ours = L.top_k_filter(ours, k)
    if p is not None:
        want = TopPLogitsWarper(p)(None, want)
        ours = L.top_p_filter(ours, p)
    assert torch.equal(ours == float("-inf"), want == float("-inf"))
    torch.testing.assert_close(ours, want, **F32)


def test_sample_next_draws_only_kept_tokens_and_is_seeded():
    z = torch.tensor([[2.0, 1.0, 0.5, 0.0, -3.0]]).expand(4000, 5)
    draw = lambda **kw: L.sample_next(
        z, generator=torch.Generator().manual_seed(0), **kw)
    assert set(draw(top_k=2).tolist()) == {0, 1}
    assert torch.equal(draw(top_k=2), draw(top_k=2))
    assert torch.equal(draw(temperature=0), torch.zeros(4000, dtype=int))
    freq = torch.bincount(draw(), minlength=5) / 4000
    torch.testing.assert_close(freq, torch.softmax(z[0], -1),
                               rtol=0, atol=0.03)
    with pytest.raises(ValueError, match=r"temperature must be >= 0"):
        draw(temperature=-1.0)


def test_generate_with_and_without_cache_agree_past_max_seq_len():
    model = spread(L.Llama(tiny(max_seq_len=16)))
    prompt = ids(2, 5)
    runs = [model.generate(prompt, 30, temperature=0.9, top_p=0.9,
                           generator=torch.Generator().manual_seed(3),
                           use_cache=use) for use in (True, False)]
    assert runs[0].shape == (2, 35)
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(runs[0][:, :5], prompt)
    model.train()
    L.generate(model, prompt, 1)
    assert model.training  # restored


# --------------------------------------------------------------------------
# beam search
# --------------------------------------------------------------------------


def test_beam_width_one_is_greedy():
    model = spread(L.Llama(tiny()))
    prompt = ids(1, 4)
    for use_cache in (True, False):
        beam, _ = L.beam_search(model, prompt, 12, beam_width=1,
                                use_cache=use_cache)
        assert torch.equal(beam, L.generate(model, prompt, 12,
                                            temperature=0))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wide_beam_equals_exhaustive_search(seed):
    torch.manual_seed(seed)
    model = L.Llama(tiny(vocab_size=4))
    with torch.no_grad():
        model.output.weight.mul_(30)  # peaked, so sequences differ
    model.eval()
    prompt, n = torch.tensor([[1, 2, 0]]), 3
    every = torch.cartesian_prod(*[torch.arange(4)] * n)  # (64, 3)
    seqs = torch.cat([prompt.expand(len(every), 3), every], 1)
    with torch.no_grad():
        logp = torch.log_softmax(model(seqs)[0][:, 2:-1], -1)
    totals = logp.gather(-1, every[..., None])[..., 0].sum(-1)
    for use_cache in (True, False):
        beam, score = L.beam_search(model, prompt, n, beam_width=16,
                                    length_penalty=0.0, use_cache=use_cache)
        assert beam[0, 3:].tolist() == every[totals.argmax()].tolist()
        assert abs(score - totals.max().item()) < 1e-4


def test_beam_search_stops_at_eos_and_normalises_length():
    # a bigram table: 0 = eos; from 1, stopping at once (0.4) beats going
    # on through 2 (0.6 * 0.5 = 0.3) in total, but not per token
    probs = torch.full((3, 3), 1e-9)
    probs[1, 0], probs[1, 2] = 0.4, 0.6
    probs[2, 0], probs[2, 1] = 0.5, 0.5
    probs[0, 0] = 1.0

    class Bigram(nn.Module):
        config = L.LlamaConfig(vocab_size=3, dim=8, n_heads=2, n_kv_heads=2)

        def forward(self, idx, targets=None, cache=None, start_pos=0):
            return probs.log()[idx], None

    start = torch.tensor([[1]])
    raw, raw_score = L.beam_search(Bigram(), start, 6, beam_width=3,
                                   eos_id=0, length_penalty=0.0,
                                   use_cache=False)
    assert raw.tolist() == [[1, 0]]
    assert abs(raw_score - math.log(0.4)) < 1e-6
    mean, mean_score = L.beam_search(Bigram(), start, 6, beam_width=3,
                                     eos_id=0, length_penalty=1.0,
                                     use_cache=False)
    assert mean.tolist() == [[1, 2, 0]]
    assert abs(mean_score - math.log(0.3) / 2) < 1e-6


def test_beam_search_errors():
    model = L.Llama(tiny())
    with pytest.raises(ValueError, match=r"one prompt of shape \(1, T\), "
                                         r"got \(2, 3\)"):
        L.beam_search(model, ids(2, 3), 2)
    with pytest.raises(ValueError, match=r"beam_width must be a positive"):
        L.beam_search(model, ids(1, 3), 2, beam_width=0)


# --------------------------------------------------------------------------
# the Hugging Face layout, against transformers itself
# --------------------------------------------------------------------------

SHAPES = [  # dim, layers, heads, kv heads, tied, rope_theta
    pytest.param(32, 2, 4, 4, False, 10000.0, id="mha"),
    pytest.param(32, 2, 4, 2, False, 500000.0, id="gqa"),
    pytest.param(48, 1, 6, 2, True, 10000.0, id="gqa-tied"),
    pytest.param(64, 3, 8, 1, False, 1000.0, id="mqa"),
    pytest.param(64, 2, 2, 1, True, 10000.0, id="mqa-tied-wide-heads"),
]


def hf_model(dim, layers, heads, kv, tied, theta, vocab=53):
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=dim, intermediate_size=2 * dim + 8,
        num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv, max_position_embeddings=64,
        rms_norm_eps=1e-5, tie_word_embeddings=tied,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    config._attn_implementation = "eager"
    torch.manual_seed(dim + layers + heads + kv)
    model = transformers.LlamaForCausalLM(config).float()
    with torch.no_grad():  # transformers initialises norms to 1: spread
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape))
    return model.eval()


@pytest.mark.parametrize("dim, layers, heads, kv, tied, theta", SHAPES)
def test_import_from_transformers_gives_the_same_logits(dim, layers, heads,
                                                         kv, tied, theta):
    ref = hf_model(dim, layers, heads, kv, tied, theta)
    config = json.loads(ref.config.to_json_string())
    ours = L.import_hf(ref.state_dict(), config).eval()
    assert ours.config.n_kv_heads == kv and ours.config.rope_theta == theta
    assert ours.config.tie_embeddings == tied
    x = ids(2, 40, V=53)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], ref(x).logits, **F32)
        ours.layers[0].attention.fast = False  # the readable path too
        torch.testing.assert_close(ours(x)[0], ref(x).logits, **F32)


@pytest.mark.parametrize("dim, layers, heads, kv, tied, theta", SHAPES)
def test_export_to_transformers_gives_the_same_logits(dim, layers, heads,
                                                       kv, tied, theta):
    torch.manual_seed(1)
    ours = spread(L.Llama(L.LlamaConfig(
        vocab_size=41, dim=dim, n_layers=layers, n_heads=heads,
        n_kv_heads=kv, tie_embeddings=tied, rope_theta=theta,
        max_seq_len=64, norm_eps=1e-6)))
    state, config = export_hf(ours)
    config = json.loads(json.dumps(config))  # what config.json would hold
    hf_config = transformers.LlamaConfig(**config)
    assert hf_config.rope_parameters["rope_theta"] == theta
    assert hf_config.num_key_value_heads == kv
    hf_config._attn_implementation = "eager"
    ref = transformers.LlamaForCausalLM(hf_config).float().eval()
    ref.load_state_dict(state, strict=True)
    if tied:
        assert ref.lm_head.weight.data_ptr() == \
            ref.model.embed_tokens.weight.data_ptr()
    x = ids(3, 33, V=41)
    with torch.no_grad():
        torch.testing.assert_close(ref(x).logits, ours(x)[0], **F32)


def export_hf(model):
    state, config = L.export_hf(model)
    assert set(state) == set(L._hf_names(model.config.n_layers).values())
    return state, config


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_import_from_transformers_same_logits_in_every_dtype(dtype):
    ref = hf_model(32, 2, 4, 2, False, 10000.0)
    ours = L.import_hf(ref.state_dict(),
                       json.loads(ref.config.to_json_string()))
    ref, ours = ref.to(dtype), ours.to(dtype).eval()
    x = ids(2, 40, V=53)
    with torch.no_grad():
        want = ref(x).logits
        got = ours(x)[0]
        assert got.dtype == dtype
        # float64: Hugging Face's RMSNorm computes in float32 even for a
        # float64 model (ours keeps float64), so the two agree to float32
        # rounding, not float64's; bfloat16: as BF16 says
        tol = F32 if dtype == torch.float64 else BF16
        torch.testing.assert_close(got, want, **tol)
        ours.layers[0].attention.fast = False  # the readable path too
        torch.testing.assert_close(ours(x)[0], want, **tol)
        cache = ours.new_cache(2)
        assert cache.k[0].dtype == dtype
        logits, _ = ours(x[:, :5], cache=cache)
        torch.testing.assert_close(logits, ours(x[:, :5])[0],
                                   **TOLS[dtype])


def test_generate_and_beam_search_restore_each_layers_mode():
    model = L.Llama(tiny())
    model.train()
    model.layers[0].eval()  # one block already in evaluation mode
    modes = [m.training for m in model.modules()]
    L.generate(model, ids(1, 3), 2)
    L.beam_search(model, ids(1, 3), 2, beam_width=2)
    assert [m.training for m in model.modules()] == modes


def test_greedy_generation_matches_transformers():
    ref = hf_model(32, 2, 4, 2, False, 10000.0)
    ours = L.import_hf(ref.state_dict(), ref.config.to_dict())
    prompt = ids(2, 6, V=53)
    want = ref.generate(prompt, max_new_tokens=10, do_sample=False,
                        pad_token_id=0)
    assert want.shape == (2, 16)
    assert torch.equal(L.generate(ours, prompt, 10, temperature=0), want)


def test_import_checks_before_copying():
    ref = hf_model(32, 1, 4, 2, False, 10000.0)
    state, config = ref.state_dict(), ref.config.to_dict()
    bad = dict(state)
    bad["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(32, 32)
    with pytest.raises(ValueError, match=r"k_proj.weight: expected shape "
                                         r"\(16, 32\), got \(32, 32\)"):
        L.import_hf(bad, config)
    bad = {k: v for k, v in state.items() if k != "model.norm.weight"}
    bad["model.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing \['model.norm.weight'\]"
                                         r".*unexpected \['model.extra'\]"):
        L.import_hf(bad, config)
    for field, value, message in [
            ("hidden_act", "gelu", r"hidden_act: this model supports 'silu'"),
            ("attention_bias", True, r"attention_bias: .*no biases"),
            ("head_dim", 16, r"head_dim: .* = 8, got 16"),
            ("rope_parameters", {"rope_type": "linear", "factor": 2.0},
             r"rope_type 'default'")]:
        with pytest.raises(ValueError, match=message):
            L.import_hf(state, {**config, field: value})


def test_tied_import_may_omit_lm_head_but_not_contradict_it():
    ref = hf_model(32, 1, 4, 2, True, 10000.0)
    state = {k: v for k, v in ref.state_dict().items()
             if k != "lm_head.weight"}  # what save_pretrained writes
    ours = L.import_hf(state, ref.config.to_dict()).eval()
    x = ids(1, 8, V=53)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], ref(x).logits, **F32)
    state["lm_head.weight"] = torch.zeros(53, 32)
    with pytest.raises(ValueError, match=r"lm_head.weight differs"):
        L.import_hf(state, ref.config.to_dict())


def test_config_round_trip_and_legacy_rope_theta():
    cfg = tiny(rope_theta=1234.0, tie_embeddings=True, norm_eps=1e-6)
    back = L.config_from_hf(json.loads(json.dumps(L.config_to_hf(cfg))))
    assert dataclasses_equal(back, cfg)
    legacy = L.config_to_hf(cfg)
    del legacy["rope_parameters"]  # a transformers 4 config.json
    assert L.config_from_hf(legacy).rope_theta == 1234.0


def dataclasses_equal(a, b):
    import dataclasses

    skip = {"hidden_dim"}  # None on one side, resolved on the other
    same = all(getattr(a, f.name) == getattr(b, f.name)
               for f in dataclasses.fields(a) if f.name not in skip)
    return same and a.ffn_dim == b.ffn_dim
