"""The Transformer chapter: attention, layers and the whole model equal
PyTorch's; decoding; errors at the boundaries."""

import itertools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cave.fundamentals.data import DateTask, Vocab, load_results
from cave.transformers.transformer import (
    MultiHeadAttention, Transformer, TransformerConfig,
    TransformerTrainConfig, beam_search, copy_from_torch, copy_mha, full_run,
    greedy, last_attention, length_penalty, merge_masks, noam_lr,
    sinusoidal_encoding, train_transformer)

# float32: the same sums in a different order. A whole two-layer
# encoder-decoder stacks several norms and softmaxes: a little more.
TOL = dict(atol=1e-5, rtol=1e-5)
MODEL_TOL = dict(atol=5e-5, rtol=1e-4)


def pair(C=16, H=4, seed=0, bias=True):
    torch.manual_seed(seed)
    ref = nn.MultiheadAttention(C, H, batch_first=True, bias=bias)
    with torch.no_grad():  # PyTorch zeroes the biases: make them matter
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = MultiHeadAttention(C, H, bias=bias)
    copy_mha(ours, ref)
    return ours, ref


@settings(max_examples=15, deadline=None)
@given(B=st.integers(1, 3), L=st.integers(1, 6), S=st.integers(1, 6),
       H=st.sampled_from([1, 2, 4]), bias=st.booleans())
def test_mha_equals_torch_cross_attention_with_padding(B, L, S, H, bias):
    ours, ref = pair(C=8, H=H, bias=bias)
    q, kv = torch.randn(B, L, 8), torch.randn(B, S, 8)
    pad = torch.rand(B, S) < 0.3
    pad[:, 0] = False  # every query keeps one key (else PyTorch gives NaN)
    for kpm in (None, pad):
        out, w = ours(q, kv, kv, key_padding_mask=kpm, need_weights=True)
        r_out, r_w = ref(q, kv, kv, key_padding_mask=kpm,
                         average_attn_weights=False)
        torch.testing.assert_close(out, r_out, **TOL)
        torch.testing.assert_close(w, r_w, **TOL)
        # the fast path (the essentials' attention) agrees too
        torch.testing.assert_close(ours(q, kv, kv, key_padding_mask=kpm),
                                   r_out, **TOL)


@pytest.mark.filterwarnings("ignore:Support for mismatched")
@pytest.mark.parametrize("kind", ["bool", "float", "3d", "is_causal"])
@pytest.mark.parametrize("with_padding", [False, True])
def test_mha_equals_torch_with_attention_masks(kind, with_padding):
    ours, ref = pair()
    B, T, H = 3, 6, 4
    x = torch.randn(B, T, 16)
    causal_bool = torch.ones(T, T, dtype=torch.bool).triu(1)  # True = out
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[1, 4:] = True
    pad[2, 2:] = True
    kpm = pad if with_padding else None
    ref_mask = causal_bool
    ours_kw = {}
    if kind == "bool":
        ours_kw = dict(attn_mask=causal_bool)
    elif kind == "float":
        ref_mask = torch.randn(T, T).masked_fill(causal_bool, float("-inf"))
        ours_kw = dict(attn_mask=ref_mask)
    elif kind == "3d":
        ref_mask = torch.randn(B * H, T, T).masked_fill(causal_bool,
                                                        float("-inf"))
        ours_kw = dict(attn_mask=ref_mask)
    else:
        ours_kw = dict(is_causal=True)
    out, w = ours(x, x, x, key_padding_mask=kpm, need_weights=True,
                  **ours_kw)
    r_out, r_w = ref(x, x, x, key_padding_mask=kpm, attn_mask=ref_mask,
                     average_attn_weights=False)
    torch.testing.assert_close(out, r_out, **TOL)
    torch.testing.assert_close(w, r_w, **TOL)
    assert w.triu(1).abs().max() == 0  # nothing reads the future


def test_mha_equals_sdpa_per_head():
    ours, _ = pair()
    q, kv = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    Q = ours.q_proj(q).view(2, 5, 4, 4).transpose(1, 2)  # (B, H, L, d)
    K = ours.k_proj(kv).view(2, 7, 4, 4).transpose(1, 2)
    V = ours.v_proj(kv).view(2, 7, 4, 4).transpose(1, 2)
    heads = [F.scaled_dot_product_attention(Q[:, h], K[:, h], V[:, h])
             for h in range(4)]  # each (B, L, d)
    want = ours.out_proj(torch.cat(heads, dim=-1))  # (B, L, C)
    torch.testing.assert_close(ours(q, kv, kv), want, **TOL)


def test_merge_masks_combines_padding_and_causal():
    pad = torch.tensor([[False, False, True]])
    m = merge_masks(1, 2, 3, 3, key_padding_mask=pad, is_causal=True)
    allowed = torch.isfinite(m)[0, 0]  # (L, S)
    want = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    assert torch.equal(allowed, want)
    assert merge_masks(1, 2, 3, 3) is None


def test_mha_errors_name_expected_and_got():
    with pytest.raises(ValueError, match=r"d_model=16, n_heads=5"):
        MultiHeadAttention(16, 5)
    ours, _ = pair()
    x = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match=r"\(L, S\) = \(5, 5\).*\(4, 4\)"):
        ours(x, x, x, attn_mask=torch.zeros(4, 4))
    with pytest.raises(ValueError, match=r"\(B, S\) = \(2, 5\).*\(2, 4\)"):
        ours(x, x, x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="torch.int64"):
        ours(x, x, x, key_padding_mask=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.int32"):
        ours(x, x, x, attn_mask=torch.zeros(5, 5, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"C=16.*\(2, 5, 8\)"):
        ours(torch.randn(2, 5, 8), x, x)
    with pytest.raises(ValueError, match=r"key and value"):
        ours(x, x, torch.randn(2, 4, 16))


def test_sinusoidal_encoding_values_and_relative_offsets():
    pe = sinusoidal_encoding(50, 16)
    p, i = 7, 3
    assert math.isclose(pe[p, 2 * i].item(),
                        math.sin(p / 10000 ** (2 * i / 16)), abs_tol=1e-6)
    assert math.isclose(pe[p, 2 * i + 1].item(),
                        math.cos(p / 10000 ** (2 * i / 16)), abs_tol=1e-6)
    # one rotation R_k, the same for every position, moves p to p + k
    k = 4
    omega = 10000 ** (-torch.arange(0, 16, 2) / 16)  # (C/2,)
    c, s = torch.cos(omega * k), torch.sin(omega * k)
    R = torch.zeros(16, 16)
    R[0::2, 0::2], R[0::2, 1::2] = torch.diag(c), torch.diag(s)
    R[1::2, 0::2], R[1::2, 1::2] = torch.diag(-s), torch.diag(c)
    torch.testing.assert_close(pe[:46] @ R.T, pe[k:46 + k],
                               atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="even"):
        sinusoidal_encoding(4, 5)


def masks_for(B=2, S=9, T=6):
    src_pad = torch.zeros(B, S, dtype=torch.bool)
    src_pad[0, 6:] = True
    tgt_pad = torch.zeros(B, T, dtype=torch.bool)
    tgt_pad[1, 5:] = True
    return dict(tgt_mask=nn.Transformer.generate_square_subsequent_mask(T),
                src_key_padding_mask=src_pad, tgt_key_padding_mask=tgt_pad,
                memory_key_padding_mask=src_pad)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("with_masks", [False, True])
def test_model_equals_nn_transformer(norm_first, with_masks):
    torch.manual_seed(0)
    cfg = TransformerConfig(d_model=32, n_heads=4, d_ff=64, dropout=0.0,
                            n_encoder_layers=2, n_decoder_layers=3,
                            norm_first=norm_first)
    ours = Transformer(cfg)
    ref = nn.Transformer(32, 4, 2, 3, 64, dropout=0.0, batch_first=True,
                         norm_first=norm_first)
    with torch.no_grad():  # non-trivial norms and biases
        for name, p in ref.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    if not norm_first:
        ref.encoder.norm = ref.decoder.norm = None
    copy_from_torch(ours, ref)
    src, tgt = torch.randn(2, 9, 32), torch.randn(2, 6, 32)
    masks = masks_for() if with_masks else {}
    torch.testing.assert_close(ours.transform(src, tgt, **masks),
                               ref(src, tgt, **masks), **MODEL_TOL)


def test_copy_from_torch_refuses_a_different_model():
    ours = Transformer(TransformerConfig(d_model=32, n_heads=4, d_ff=64))
    ref = nn.Transformer(32, 4, 2, 2, 64, batch_first=True)
    with pytest.raises(ValueError, match="final norm"):
        copy_from_torch(ours, ref)  # post-norm but ref keeps its norms
    ref3 = nn.Transformer(32, 4, 3, 2, 64, batch_first=True)
    ref3.encoder.norm = ref3.decoder.norm = None
    with pytest.raises(ValueError, match="expected 2 layers, got 3"):
        copy_from_torch(ours, ref3)


def test_forward_is_causal_and_ignores_source_padding():
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(dropout=0.0)).eval()
    src = torch.randint(3, 70, (2, 8))
    src[1, 6:] = Vocab.PAD
    tgt = torch.randint(3, 14, (2, 5))
    logits = model(src, tgt)
    tgt2 = tgt.clone()
    tgt2[:, -1] = (tgt[:, -1] + 1 - 3) % 11 + 3  # change the last token
    torch.testing.assert_close(model(src, tgt2)[:, :-1], logits[:, :-1],
                               **TOL)
    longer = torch.cat([src, torch.full((2, 3), Vocab.PAD)], 1)
    torch.testing.assert_close(model(longer, tgt)[1], logits[1], **TOL)


def test_shared_and_tied_embeddings():
    m = Transformer(TransformerConfig(src_vocab=20, tgt_vocab=20,
                                      share_embeddings=True))
    assert m.src_embed is m.tgt_embed and m.out.weight is m.tgt_embed.weight
    with pytest.raises(ValueError, match="src_vocab=70, tgt_vocab=14"):
        Transformer(TransformerConfig(share_embeddings=True))
    untied = Transformer(TransformerConfig(tie_output=False))
    assert untied.out.weight is not untied.tgt_embed.weight


def tiny(seed=0, V=5):
    """A tiny random model; V=5: <pad>, <bos>, <eos> and two tokens."""
    torch.manual_seed(seed)
    cfg = TransformerConfig(src_vocab=6, tgt_vocab=V, d_model=16,
                            n_heads=2, d_ff=32, n_encoder_layers=1,
                            n_decoder_layers=1, dropout=0.0)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # sharper distributions than the init's
        model.out.weight.mul_(8.0)
    return model


@pytest.mark.parametrize("seed", range(4))
def test_beam_width_one_is_greedy(seed):
    model = tiny(seed)
    src = torch.randint(3, 6, (1, 5))
    g = greedy(model, src, max_len=6)[0].tolist()
    g = g[:g.index(Vocab.EOS) + 1] if Vocab.EOS in g else g
    ids, _ = beam_search(model, src, beam_width=1, max_len=6)
    assert ids == g


def sequence_score(model, src, ids, alpha):
    """log p(ids | src) / length_penalty, teacher forced."""
    tgt_in = torch.tensor([[Vocab.BOS, *ids[:-1]]])
    logp = torch.log_softmax(model(src, tgt_in)[0], -1)  # (n, V)
    total = logp[torch.arange(len(ids)), torch.tensor(ids)].sum().item()
    return total / length_penalty(len(ids), alpha)


@pytest.mark.parametrize("seed,alpha", [(0, 0.0), (1, 0.6), (2, 2.0),
                                        (3, 1.0)])
def test_wide_beam_finds_the_best_enumerated_sequence(seed, alpha):
    model, max_len = tiny(seed), 4
    src = torch.randint(3, 6, (1, 4))
    words = (3, 4)
    candidates = [list(w) + [Vocab.EOS] for n in range(max_len)
                  for w in itertools.product(words, repeat=n)]
    candidates += [list(w) for w in itertools.product(words,
                                                      repeat=max_len)]
    scores = {tuple(c): sequence_score(model, src, c, alpha)
              for c in candidates}
    best = max(scores, key=scores.get)
    ids, score = beam_search(model, src, beam_width=64, max_len=max_len,
                             alpha=alpha)
    assert tuple(ids) == best
    assert math.isclose(score, scores[best], rel_tol=1e-4, abs_tol=1e-5)


def test_beam_search_checks_its_arguments():
    model = tiny()
    with pytest.raises(ValueError, match=r"\(1, S\), got \(2, 3\)"):
        beam_search(model, torch.ones(2, 3, dtype=torch.long) * 3)
    with pytest.raises(ValueError, match="beam_width"):
        beam_search(model, torch.ones(1, 3, dtype=torch.long) * 3,
                    beam_width=0)


def test_noam_schedule_peaks_at_warmup():
    lrs = [noam_lr(s, 64, 100) for s in range(1, 400)]
    assert max(range(len(lrs)), key=lrs.__getitem__) + 1 == 100
    assert math.isclose(lrs[99], 64 ** -0.5 * 100 ** -0.5)


def test_training_lowers_the_loss():
    task = DateTask(n_train=512, n_val=10, n_test=10, seed=1)
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(d_model=32, n_heads=2, d_ff=64,
                                          n_encoder_layers=1,
                                          n_decoder_layers=1))
    losses = train_transformer(model, task, TransformerTrainConfig(
        epochs=5, batch_size=64, warmup=20), max_steps=40)
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5


def test_recorded_full_run_meets_the_target():
    record = load_results("transformer")
    assert record["test_exact_match"] >= 0.99
    assert record["command"].startswith(
        ("python -m cave.transformers.transformer --full",
         "cave run transformer --full"))
    assert record["task"] == repr(DateTask(seed=0))


def test_decoders_restore_every_submodule_mode():
    model = tiny()
    model.train()
    model.encoder.layers[0].eval()  # a mixed state must come back as it was
    modes = [m.training for m in model.modules()]
    src = torch.randint(3, 6, (1, 4))
    greedy(model, src, max_len=3)
    beam_search(model, src, beam_width=2, max_len=3)
    last_attention(model, src, torch.tensor([[Vocab.BOS, 3]]))
    assert [m.training for m in model.modules()] == modes
    assert not model.encoder.layers[-1].self_attn.record_weights


def test_greedy_scores_with_the_data_chapters_exact_match():
    task = DateTask(n_train=64, n_val=12, n_test=12, seed=2)
    model = Transformer(TransformerConfig(d_model=16, n_heads=2, d_ff=32,
                                          n_encoder_layers=1,
                                          n_decoder_layers=1))
    score, outputs = task.exact_match(lambda s, n: greedy(model, s), "val",
                                      batch_size=5)
    assert 0.0 <= score <= 1.0 and len(outputs) == 12
    # batching and padding do not change what greedy writes
    one = [task.tgt_vocab.decode(greedy(model, task.src_vocab.encode(s)[None]
                                        )[0]) for s, _ in task.val]
    assert outputs == one


def test_full_run_checks_its_overrides_before_training():
    with pytest.raises(ValueError, match=r"unknown override\(s\) "
                       r"\['epoch'\]: expected some of .*'epochs'"):
        full_run("cpu", epoch=1)


# ---- dtypes: MultiHeadAttention works in every dtype its twin does -------

@pytest.mark.parametrize("masks", ["none", "padding", "causal"])
def test_mha_equals_torch_in_float64(masks):
    ours, ref = pair(C=16, H=4)
    ours, ref = ours.double(), ref.double()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)
    kw = {"none": {}, "padding": dict(key_padding_mask=pad),
          "causal": dict(attn_mask=causal)}[masks]
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    for need_weights in (True, False):  # the readable and the fast path
        out = ours(x1, x1, x1, need_weights=need_weights, **kw)
        out = out[0] if need_weights else out
        r_out, r_w = ref(x2, x2, x2, average_attn_weights=False, **kw)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, r_out, atol=1e-12, rtol=1e-12)
        if need_weights:
            w = ours(x1, x1, x1, need_weights=True, **kw)[1]
            torch.testing.assert_close(w, r_w, atol=1e-12, rtol=1e-12)
    out.square().sum().backward()
    r_out.square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-12, rtol=1e-12)


def test_mha_bfloat16_runs_and_stays_near_float64():
    ours, ref = pair(C=16, H=4)
    exact = MultiHeadAttention(16, 4)
    exact.load_state_dict(ours.state_dict())
    ours, ref, exact = ours.bfloat16(), ref.bfloat16(), exact.double()
    x = torch.randn(2, 6, 16).bfloat16()
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    results = []
    for model, fast in ((ours, True), (ours, False), (exact, True)):
        dtype = next(model.parameters()).dtype
        xi = x.clone().to(dtype).requires_grad_()
        out = model(xi, xi, xi, key_padding_mask=pad, is_causal=True,
                    need_weights=not fast)
        out = out if fast else out[0]
        assert out.dtype == dtype
        out.float().square().sum().backward()
        results.append((out.double(), xi.grad.double()))
    xr = x.clone().requires_grad_()
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)
    r_out, _ = ref(xr, xr, xr, key_padding_mask=pad, attn_mask=causal)
    r_out.float().square().sum().backward()
    results.append((r_out.double(), xr.grad.double()))
    y_exact, g_exact = results[2]
    for y, g in results[:2] + results[3:]:
        torch.testing.assert_close(y, y_exact, atol=0.05, rtol=0.05)
        torch.testing.assert_close(g, g_exact, atol=0.1, rtol=0.1)
