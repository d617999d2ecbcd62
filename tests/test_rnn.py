"""The RNN chapter: cells and layers equal PyTorch's in every dtype; BPTT,
clipping, seq2seq, the char LSTM, the full run's interface.

The dates task itself is the data chapter's: tests/test_data.py."""

import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from cave.classical.rnn import (GRU, LSTM, RNN, BahdanauAttention, CharLSTM,
                                CharLSTMConfig, CharTrainConfig, GRUCell,
                                LSTMCell, RNNCell, Seq2Seq, Seq2SeqConfig,
                                Seq2SeqTrainConfig, clip_grad_norm_,
                                full_run, rnn_backward,
                                rnn_forward, seq2seq_loss, train_seq2seq)
from cave.fundamentals.checkpoints import override_configs
from cave.fundamentals.data import DateTask, Vocab, load_results

# float32; the same sums in a different order. Gradients through several
# layers and steps accumulate a little more rounding.
TOL = dict(atol=1e-5, rtol=1e-5)
GRAD_TOL = dict(atol=5e-5, rtol=1e-4)
PAIRS = {"RNN": (RNN, nn.RNN), "LSTM": (LSTM, nn.LSTM), "GRU": (GRU, nn.GRU)}
CELLS = {"RNN": (RNNCell, nn.RNNCell), "LSTM": (LSTMCell, nn.LSTMCell),
         "GRU": (GRUCell, nn.GRUCell)}


def flat(state):
    return torch.cat(state, -1) if isinstance(state, tuple) else state


@pytest.mark.parametrize("kind", CELLS)
@pytest.mark.parametrize("bias", [True, False])
def test_cells_equal_torch_with_same_seed(kind, bias):
    ours_cls, ref_cls = CELLS[kind]
    torch.manual_seed(0)
    ours = ours_cls(7, 5, bias=bias)
    torch.manual_seed(0)
    ref = ref_cls(7, 5, bias=bias)
    assert list(ours.state_dict()) == list(ref.state_dict())
    for a, b in zip(ours.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(a, b)  # same draws, same order
    x = torch.randn(3, 7)
    h = torch.randn(3, 5)
    state = (h, torch.randn(3, 5)) if kind == "LSTM" else h
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = flat(ours(x1, state)), flat(ref(x2, state))
    torch.testing.assert_close(y1, y2, **TOL)
    w = torch.randn_like(y1)
    (y1 * w).sum().backward()
    (y2 * w).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, **GRAD_TOL)
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, **GRAD_TOL)
    # no state means zeros, as in PyTorch
    torch.testing.assert_close(flat(ours(x)), flat(ref(x)), **TOL)


def test_rnn_cell_relu():
    torch.manual_seed(0)
    ours = RNNCell(4, 6, nonlinearity="relu")
    ref = nn.RNNCell(4, 6, nonlinearity="relu")
    ref.load_state_dict(ours.state_dict())
    x, h = torch.randn(2, 4), torch.randn(2, 6)
    torch.testing.assert_close(ours(x, h), ref(x, h), **TOL)


def run_reference(ref, x, lengths, hx, batch_first):
    """PyTorch's layer on a packed batch, unpacked to the full length."""
    if lengths is None:
        return ref(x, hx)
    packed = pack_padded_sequence(x, lengths, batch_first=batch_first,
                                  enforce_sorted=False)
    out, state = ref(packed, hx)
    T = x.shape[1] if batch_first else x.shape[0]
    out, _ = pad_packed_sequence(out, batch_first=batch_first,
                                 total_length=T)
    return out, state


@settings(max_examples=30, deadline=None)
@given(kind=st.sampled_from(sorted(PAIRS)), layers=st.integers(1, 3),
       bidirectional=st.booleans(), bias=st.booleans(),
       batch_first=st.booleans(), with_state=st.booleans(),
       ragged=st.booleans(), B=st.integers(1, 4), T=st.integers(1, 6),
       I=st.integers(1, 5), H=st.integers(1, 6), seed=st.integers(0, 99))
def test_layers_equal_torch(kind, layers, bidirectional, bias, batch_first,
                            with_state, ragged, B, T, I, H, seed):
    """Outputs, final states and every gradient, for every option."""
    ours_cls, ref_cls = PAIRS[kind]
    kw = dict(num_layers=layers, bias=bias, batch_first=batch_first,
              bidirectional=bidirectional)
    torch.manual_seed(seed)
    ours = ours_cls(I, H, **kw)
    torch.manual_seed(seed)
    ref = ref_cls(I, H, **kw)
    for a, b in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert a[0] == b[0] and torch.equal(a[1], b[1])  # same seed
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((B, T, I) if batch_first else (T, B, I), generator=g)
    lengths = (torch.randint(1, T + 1, (B,), generator=g) if ragged
               else None)
    hx = None
    if with_state:
        LD = layers * (1 + bidirectional)
        h0 = torch.randn(LD, B, H, generator=g)
        hx = (h0, torch.randn(LD, B, H, generator=g)) if kind == "LSTM" \
            else h0
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out1, s1 = ours(x1, hx, lengths=lengths)
    out2, s2 = run_reference(ref, x2, lengths, hx, batch_first)
    torch.testing.assert_close(out1, out2, **TOL)
    s1 = s1 if isinstance(s1, tuple) else (s1,)
    s2 = s2 if isinstance(s2, tuple) else (s2,)
    for a, b in zip(s1, s2):
        torch.testing.assert_close(a, b, **TOL)
    w = torch.randn(out1.shape, generator=g)
    loss1 = (out1 * w).sum() + sum(s.square().sum() for s in s1)
    loss2 = (out2 * w).sum() + sum(s.square().sum() for s in s2)
    loss1.backward()
    loss2.backward()
    torch.testing.assert_close(x1.grad, x2.grad, **GRAD_TOL)
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, **GRAD_TOL, msg=name)


def test_padding_gives_zero_outputs_and_last_real_state():
    torch.manual_seed(0)
    lstm = LSTM(3, 4, num_layers=2)
    x = torch.randn(2, 6, 3)
    lengths = torch.tensor([6, 2])
    out, (h, c) = lstm(x, lengths=lengths)
    assert (out[1, 2:] == 0).all() and (out[1, :2] != 0).any()
    short_out, (short_h, short_c) = lstm(x[1:, :2])  # the same, unpadded
    torch.testing.assert_close(out[1, :2], short_out[0], **TOL)
    torch.testing.assert_close(h[:, 1], short_h[:, 0], **TOL)
    torch.testing.assert_close(c[:, 1], short_c[:, 0], **TOL)
    # garbage in the padding changes nothing
    x2 = x.clone()
    x2[1, 2:] = 1e3
    out2, (h2, _) = lstm(x2, lengths=lengths)
    torch.testing.assert_close(out2, out)
    torch.testing.assert_close(h2, h)


@pytest.mark.parametrize("kind", PAIRS)
def test_state_dicts_load_both_ways(kind):
    ours_cls, ref_cls = PAIRS[kind]
    torch.manual_seed(0)
    ref = ref_cls(3, 5, num_layers=2, bidirectional=True, batch_first=True)
    ours = ours_cls(3, 5, num_layers=2, bidirectional=True)
    ours.load_state_dict(ref.state_dict())  # strict: same keys and shapes
    x = torch.randn(2, 4, 3)
    torch.testing.assert_close(ours(x)[0], ref(x)[0], **TOL)
    torch.manual_seed(1)
    ours2 = ours_cls(3, 5, num_layers=2, bidirectional=True)
    ref.load_state_dict(ours2.state_dict())
    torch.testing.assert_close(ours2(x)[0], ref(x)[0], **TOL)


def test_dropout_between_layers_only_in_training():
    torch.manual_seed(0)
    gru = GRU(4, 8, num_layers=2, dropout=0.5)
    x = torch.randn(3, 5, 4)
    gru.eval()
    first, _ = gru(x)
    torch.testing.assert_close(gru(x)[0], first)  # deterministic in eval
    gru.train()
    assert not torch.allclose(gru(x)[0], first)  # random in training
    single = GRU(4, 8, num_layers=1, dropout=0.5).train()
    torch.testing.assert_close(single(x)[0], single(x)[0])  # none after last


@pytest.mark.parametrize("make, pattern", [
    (lambda m: m(torch.randn(2, 5, 3)), r"expected input size 4, got input "
     r"of shape \(2, 5, 3\)"),
    (lambda m: m(torch.randn(5, 4)), r"expected a 3-D input \(B, T, I\), "
     r"got shape \(5, 4\)"),
    (lambda m: m(torch.randn(2, 5, 4), (torch.zeros(1, 2, 6),) * 2),
     r"expected a state of shape .* = \(2, 2, 6\), got \(1, 2, 6\)"),
    (lambda m: m(torch.randn(2, 5, 4), torch.zeros(2, 2, 6)),
     r"expected a state of 2 tensor\(s\), got 1"),
    (lambda m: m(torch.randn(2, 5, 4), lengths=[5, 6]),
     r"expected lengths in \[1, T=5\], got min 5, max 6"),
    (lambda m: m(torch.randn(2, 5, 4), lengths=[0, 5]),
     r"expected lengths in \[1, T=5\], got min 0, max 5"),
    (lambda m: m(torch.randn(2, 5, 4), lengths=[5, 4, 3]),
     r"expected lengths: B=2 integers, got .* shape \(3,\)"),
    (lambda m: m(torch.randn(2, 5, 4), lengths=[5.0, 4.0]),
     r"expected lengths: B=2 integers, got torch.float32"),
])
def test_layer_errors_name_expected_and_actual(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make(LSTM(4, 6, num_layers=2))


def test_cell_errors_name_expected_and_actual():
    with pytest.raises(ValueError, match=r"\(B, 4\), got \(3, 5\)"):
        GRUCell(4, 6)(torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"state of shape \(3, 6\), got "
                       r"\(3, 7\)"):
        RNNCell(4, 6)(torch.randn(3, 4), torch.randn(3, 7))
    with pytest.raises(ValueError, match="nonlinearity"):
        RNN(4, 6, nonlinearity="sigmoid")
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\]"):
        LSTM(4, 6, dropout=1.5)


@settings(max_examples=15, deadline=None)
@given(B=st.integers(1, 4), T=st.integers(1, 10), I=st.integers(1, 5),
       H=st.integers(1, 6), seed=st.integers(0, 99))
def test_bptt_by_hand_equals_autograd(B, T, I, H, seed):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(s, generator=g, dtype=torch.float64) for s in
               [(B, T, I), (B, H), (H, I), (H, H), (H,)]]
    leaves = [t.clone().requires_grad_() for t in tensors]
    hs = rnn_forward(*leaves)
    grad_hs = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    (hs * grad_hs).sum().backward()
    x, h0, w_ih, w_hh, _ = tensors
    by_hand = rnn_backward(x, h0, hs.detach(), w_ih, w_hh, grad_hs)
    for name, leaf in zip(["x", "h0", "w_ih", "w_hh", "b"], leaves):
        torch.testing.assert_close(by_hand[name], leaf.grad, atol=1e-10,
                                   rtol=1e-10)  # float64: exact up to order


def test_rnn_forward_equals_rnn_layer():
    torch.manual_seed(0)
    layer = RNN(3, 4)
    x, h0 = torch.randn(2, 5, 3), torch.randn(1, 2, 4)
    b = layer.bias_ih_l0 + layer.bias_hh_l0
    hs = rnn_forward(x, h0[0], layer.weight_ih_l0, layer.weight_hh_l0, b)
    torch.testing.assert_close(hs, layer(x, h0)[0], **TOL)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e4])
@pytest.mark.parametrize("max_norm", [0.5, 5.0])
def test_clip_grad_norm_equals_torch(scale, max_norm):
    torch.manual_seed(0)
    a = [torch.randn(3, 4, requires_grad=True),
         torch.randn(5, requires_grad=True)]
    b = [t.detach().clone().requires_grad_() for t in a]
    c = torch.randn(3, 4, requires_grad=True)  # no gradient: skipped
    for params in (a, b):
        (params[0].sum() * scale + params[1].square().sum() * scale
         ).backward()
    norm_a = clip_grad_norm_(a + [c], max_norm)
    norm_b = torch.nn.utils.clip_grad_norm_(b + [c], max_norm)
    torch.testing.assert_close(norm_a, norm_b)
    for p, q in zip(a, b):
        torch.testing.assert_close(p.grad, q.grad)
    after = torch.cat([p.grad.flatten() for p in a]).norm()
    assert after <= max_norm * (1 + 1e-5)
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        clip_grad_norm_(a, 0.0)


def gradients(seed, dtype=torch.float32):
    """Three tensors with gradients of very different sizes, and one
    without a gradient; twice, as independent copies."""
    g = torch.Generator().manual_seed(seed)
    shapes, scales = [(3, 4), (5,), (2, 2, 2)], [30.0, 0.1, 4.0]
    ours = [torch.zeros(s, dtype=dtype, requires_grad=True) for s in shapes]
    for p, scale in zip(ours, scales):
        p.grad = (torch.randn(p.shape, generator=g) * scale).to(dtype)
    ours.append(torch.zeros(3, dtype=dtype, requires_grad=True))  # no grad
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    for p, q in zip(ours, theirs):
        q.grad = None if p.grad is None else p.grad.clone()
    return ours, theirs


@pytest.mark.parametrize("form", ["list", "generator", "one tensor"])
@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.5, math.inf])
@pytest.mark.parametrize("foreach", [None, False, True])
@pytest.mark.parametrize("max_norm", [0.5, 1e4])
def test_clip_grad_norm_every_form_equals_torch(form, norm_type, foreach,
                                                max_norm):
    ours, theirs = gradients(0)
    if form == "one tensor":  # a tensor is iterable too: over its rows
        ours, theirs = ours[0], theirs[0]
        arg_ours, arg_theirs = ours, theirs
    elif form == "generator":  # read once: model.parameters() is one
        arg_ours, arg_theirs = (p for p in ours), (p for p in theirs)
    else:
        arg_ours, arg_theirs = ours, theirs
    norm_a = clip_grad_norm_(arg_ours, max_norm, norm_type, foreach=foreach)
    norm_b = torch.nn.utils.clip_grad_norm_(arg_theirs, max_norm, norm_type,
                                            foreach=foreach)
    torch.testing.assert_close(norm_a, norm_b)
    pairs = [(ours, theirs)] if form == "one tensor" else zip(ours, theirs)
    for p, q in pairs:
        if q.grad is None:
            assert p.grad is None  # no gradient appears from nowhere
        else:
            torch.testing.assert_close(p.grad, q.grad)
    if max_norm < 1:  # something was clipped, in every form
        assert norm_a > max_norm


def test_clip_grad_norm_one_tensor_really_clips():
    """The bug: one tensor was read as its rows, none has a .grad, and
    nothing was clipped (the norm came back 0)."""
    w = torch.zeros(4, 3, requires_grad=True)
    w.grad = torch.full((4, 3), 10.0)
    norm = clip_grad_norm_(w, 1.0)
    assert math.isclose(norm.item(), math.sqrt(12) * 10, rel_tol=1e-6)
    assert math.isclose(w.grad.norm().item(), 1.0, rel_tol=1e-5)


def test_clip_grad_norm_empty_and_without_gradients():
    for params in ([], [torch.zeros(3, requires_grad=True)],
                   torch.zeros(3, requires_grad=True)):
        ours = clip_grad_norm_(params, 1.0)
        ref = torch.nn.utils.clip_grad_norm_(params, 1.0)
        torch.testing.assert_close(ours, ref)  # tensor(0.)
        assert ours.item() == 0.0


def test_clip_grad_norm_in_float64_and_bfloat16():
    for dtype in (torch.float64, torch.bfloat16):
        ours, theirs = gradients(1, dtype)
        norm_a = clip_grad_norm_(ours, 1.0)
        norm_b = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
        assert norm_a.dtype == norm_b.dtype == dtype
        torch.testing.assert_close(norm_a, norm_b)
        for p, q in zip(ours[:3], theirs[:3]):
            assert p.grad.dtype == dtype
            torch.testing.assert_close(p.grad, q.grad)


def test_clip_grad_norm_non_finite():
    ours, theirs = gradients(2)
    ours[1].grad[0] = theirs[1].grad[0] = float("inf")
    with pytest.raises(RuntimeError, match="expected a finite number"):
        clip_grad_norm_(ours, 1.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError):
        torch.nn.utils.clip_grad_norm_(theirs, 1.0, error_if_nonfinite=True)
    norm_a = clip_grad_norm_(ours, 1.0)  # scales by max_norm / inf = 0
    norm_b = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    assert norm_a.item() == norm_b.item() == math.inf
    for p, q in zip(ours[:3], theirs[:3]):
        torch.testing.assert_close(p.grad, q.grad, equal_nan=True)


# ---- dtypes: every layer with a PyTorch twin works in every dtype it does --

def twin(kind: str, cell: bool, dtype, **kw):
    """Ours and PyTorch's, same seed, then converted with .to(dtype)."""
    ours_cls, ref_cls = (CELLS if cell else PAIRS)[kind]
    torch.manual_seed(0)
    ours = ours_cls(4, 6, **kw).to(dtype)
    torch.manual_seed(0)
    ref = ref_cls(4, 6, **({} if cell else {"batch_first": True}), **kw)
    return ours, ref.to(dtype)


@pytest.mark.parametrize("kind", CELLS)
def test_cells_equal_torch_in_float64(kind):
    """float64 end to end: agreement to ~1e-12, not float32's 1e-5."""
    ours, ref = twin(kind, cell=True, dtype=torch.float64)
    x = torch.randn(3, 4, dtype=torch.float64)
    h = torch.randn(3, 6, dtype=torch.float64)
    state = (h, h.flip(0)) if kind == "LSTM" else h
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = flat(ours(x1, state)), flat(ref(x2, state))
    assert y1.dtype == torch.float64
    torch.testing.assert_close(y1, y2, atol=1e-12, rtol=1e-12)
    (y1.square().sum()).backward()
    (y2.square().sum()).backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-12, rtol=1e-12)
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("kind", PAIRS)
@pytest.mark.parametrize("ragged", [False, True])
def test_layers_equal_torch_in_float64(kind, ragged):
    ours, ref = twin(kind, cell=False, dtype=torch.float64, num_layers=2,
                     bidirectional=True)
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    lengths = torch.tensor([5, 2, 4]) if ragged else None
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out1, s1 = ours(x1, lengths=lengths)
    out2, s2 = run_reference(ref, x2, lengths, None, batch_first=True)
    assert out1.dtype == torch.float64
    torch.testing.assert_close(out1, out2, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(flat(s1), flat(s2), atol=1e-12, rtol=1e-12)
    out1.square().sum().backward()
    out2.square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-12, rtol=1e-12)
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-12, rtol=1e-12,
                                   msg=name)


@pytest.mark.parametrize("kind", PAIRS)
def test_float64_built_directly_matches_torch_draws(kind):
    """dtype=torch.float64 at construction draws the same numbers as
    PyTorch's layer built the same way."""
    ours_cls, ref_cls = PAIRS[kind]
    torch.manual_seed(3)
    ours = ours_cls(4, 6, num_layers=2, dtype=torch.float64)
    torch.manual_seed(3)
    ref = ref_cls(4, 6, num_layers=2, batch_first=True, dtype=torch.float64)
    for a, b in zip(ours.state_dict().values(), ref.state_dict().values()):
        assert a.dtype == torch.float64 and torch.equal(a, b)


@pytest.mark.parametrize("kind", PAIRS)
@pytest.mark.parametrize("cell", [False, True])
def test_bfloat16_runs_and_stays_near_float64(kind, cell):
    """bfloat16 has 8 bits of mantissa: ours and PyTorch's each stay
    within a few bf16 steps of the float64 answer, forward and backward."""
    kw = {} if cell else {"num_layers": 2}
    ours, ref = twin(kind, cell, torch.bfloat16, **kw)
    exact, _ = twin(kind, cell, torch.float64, **kw)
    exact.load_state_dict({k: v.double() for k, v in
                           ours.state_dict().items()})
    x = torch.randn((3, 4) if cell else (3, 5, 4)).bfloat16()
    results = []
    for model in (ours, ref, exact):
        dtype = next(model.parameters()).dtype
        xi = x.clone().to(dtype).requires_grad_()  # a leaf of its own
        y = flat(model(xi)) if cell else model(xi)[0]
        y.float().square().sum().backward()
        results.append((y.double(), xi.grad.double()))
    (y_ours, g_ours), (y_ref, g_ref), (y_exact, g_exact) = results
    assert y_ours.shape == y_exact.shape
    for y, g in ((y_ours, g_ours), (y_ref, g_ref)):
        torch.testing.assert_close(y, y_exact, atol=0.05, rtol=0.05)
        torch.testing.assert_close(g, g_exact, atol=0.1, rtol=0.1)
    assert all(p.grad.dtype == torch.bfloat16 for p in ours.parameters())


def test_rnn_relu_and_dtype_of_default_state():
    layer = RNN(4, 6, nonlinearity="relu").double()
    out, h = layer(torch.randn(2, 3, 4, dtype=torch.float64))
    assert out.dtype == h.dtype == torch.float64  # zeros made like x


def test_bahdanau_attention_masks_padding_and_sums_to_one():
    torch.manual_seed(0)
    att = BahdanauAttention(6, 8, 5)
    values = torch.randn(3, 7, 8)
    mask = torch.arange(7) < torch.tensor([7, 4, 1])[:, None]  # (3, 7)
    context, w = att(torch.randn(3, 6), att.keys(values), values, mask)
    assert context.shape == (3, 8) and w.shape == (3, 7)
    torch.testing.assert_close(w.sum(-1), torch.ones(3))
    assert (w[~mask] == 0).all()
    torch.testing.assert_close(context, (w[..., None] * values).sum(1))
    # the formula, written out: v^T tanh(W_q s + W_k h_j)
    s = torch.randn(1, 6)
    scores = torch.tanh(s @ att.w_q.weight.T + values[:1] @ att.w_k.weight.T
                        + att.w_k.bias) @ att.v.weight.T  # (1, 7, 1)
    everything = torch.ones(1, 7, dtype=torch.bool)
    _, w1 = att(s, att.keys(values[:1]), values[:1], everything)
    torch.testing.assert_close(w1, scores.squeeze(-1).softmax(-1))


def test_seq2seq_shapes_and_greedy_consistent_with_forward():
    torch.manual_seed(0)
    task = DateTask(64, 8, 8, seed=0)
    model = Seq2Seq().eval()
    src, lengths, tgt = task.tensors("train")
    logits = model(src[:4], lengths[:4], tgt[:4, :-1])
    assert logits.shape == (4, 11, len(task.tgt_vocab))
    ids, weights = model.greedy(src[:4], lengths[:4])
    assert ids.shape == (4, 11) and weights.shape == (4, 11, src.shape[1])
    # teacher forcing on the greedy output reproduces the greedy choices
    bos = torch.full((4, 1), Vocab.BOS)
    forced = model(src[:4], lengths[:4], torch.cat([bos, ids[:, :-1]], 1))
    assert torch.equal(forced.argmax(-1), ids)
    with pytest.raises(ValueError, match=r"src \(B, S\) and src_lengths"):
        model(src[:4], lengths[:3], tgt[:4, :-1])


def test_seq2seq_learns_the_dates_task_a_little():
    """A few seconds of training must beat the untrained loss clearly."""
    torch.manual_seed(0)
    task = DateTask(2000, 100, 100, seed=0)
    model = Seq2Seq(Seq2SeqConfig(embed=16, hidden=32, attention=16))
    config = Seq2SeqTrainConfig(batch_size=32, lr=1e-2)
    losses = train_seq2seq(model, task, config, max_steps=40)
    assert losses[-1] < 0.6 * losses[0]
    src, lengths, tgt = task.tensors("val")
    assert seq2seq_loss(model, src, lengths, tgt).item() < losses[0]
    model.train()
    accuracy, outputs = task.exact_match(
        lambda s, n: model.greedy(s, n)[0], "val")
    assert 0.0 <= accuracy <= 1.0 and len(outputs) == 100
    assert model.training  # greedy's eval mode did not leak out


def test_char_lstm_generate():
    torch.manual_seed(0)
    lm = CharLSTM(CharLSTMConfig(vocab_size=11, embed=4, hidden=8))
    logits, (h, c) = lm(torch.randint(0, 11, (2, 5)))
    assert logits.shape == (2, 5, 11) and h.shape == (2, 2, 8)
    a = lm.generate(torch.tensor([1, 2]), 20, 0.8,
                    torch.Generator().manual_seed(0))
    b = lm.generate(torch.tensor([1, 2]), 20, 0.8,
                    torch.Generator().manual_seed(0))
    assert a.shape == (20,) and torch.equal(a, b)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        lm.generate(torch.tensor([1]), 3, 0.0)


def test_recorded_full_run():
    record = load_results("rnn")
    assert sorted(record) == ["cells", "char_lstm", "seq2seq"]
    for part in record.values():
        assert part["command"].startswith(("python -m cave.classical.rnn",
                                           "cave run rnn"))
    assert record["seq2seq"]["test_exact_match"] >= 0.95
    assert record["char_lstm"]["val_loss"] < 2.0
    assert set(record["char_lstm"]["samples"]) == {"0.5", "0.8", "1.2"}
    cells = record["cells"]
    assert set(cells["runs"]) == {"rnn", "lstm", "gru"}
    sizes = {c: r["parameters"] for c, r in cells["runs"].items()}
    assert sizes["rnn"] < sizes["gru"] < sizes["lstm"]
    for run in cells["runs"].values():  # every cell learned something
        assert run["val_loss"] < 0.8 * math.log(65)
    # what the chapter's prose says of the table
    loss = {c: r["val_loss"] for c, r in cells["runs"].items()}
    assert loss["gru"] < min(loss["rnn"], loss["lstm"])
    assert abs(loss["rnn"] - loss["lstm"]) < 0.05


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_char_model_takes_each_cell(cell):
    lm = CharLSTM(CharLSTMConfig(vocab_size=11, embed=4, hidden=8,
                                 layers=2, cell=cell))
    logits, state = lm(torch.randint(0, 11, (3, 5)))
    assert logits.shape == (3, 5, 11)
    h = state[0] if cell == "lstm" else state
    assert h.shape == (2, 3, 8)
    assert lm.generate(torch.tensor([1, 2]), 4).shape == (4,)


def test_char_model_refuses_an_unknown_cell():
    with pytest.raises(ValueError, match=r"cell must be one of "
                       r"\('rnn', 'lstm', 'gru'\), got 'transformer'"):
        CharLSTM(CharLSTMConfig(cell="transformer"))


def test_char_lstm_generate_and_loss_restore_the_mode():
    from cave.classical.rnn import char_loss
    lm = CharLSTM(CharLSTMConfig(vocab_size=11, embed=4, hidden=8)).train()
    lm.generate(torch.tensor([1, 2]), 3)
    assert lm.training and all(m.training for m in lm.modules())
    char_loss(lm, torch.randint(0, 11, (200,)), windows=4, block_size=8)
    assert lm.training and all(m.training for m in lm.modules())


def test_full_run_checks_its_overrides_before_training():
    with pytest.raises(ValueError, match=r"unknown override\(s\) "
                       r"\['char_stpes'\]: expected some of .*'char_steps'"):
        full_run("cpu", char_stpes=3)
    with pytest.raises(ValueError, match="seq2seq_epochs"):
        full_run("cpu", epochs=1)  # which model's epochs? say which


def test_override_configs():
    s2s, char = override_configs({"seq2seq": Seq2SeqTrainConfig(),
                                  "char": CharTrainConfig()},
                                 {"char_steps": 7, "seq2seq_lr": 0.1})
    assert (char.steps, s2s.lr) == (7, 0.1)
    assert s2s.epochs == Seq2SeqTrainConfig().epochs  # the rest untouched
    (plain,) = override_configs({"": CharTrainConfig()}, {"steps": 3})
    assert plain.steps == 3
