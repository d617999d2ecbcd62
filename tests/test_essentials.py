"""The from-scratch pieces of docs/fundamentals/essentials.md against PyTorch.

Every comparison states its tolerance. float32 results may differ from
PyTorch's fused kernels by a few units in the last place, so float32 uses
rtol=atol=1e-5 (relative to values of order 1); float64 uses 1e-10.
Gradients are compared through torch.autograd.grad with a random upstream
gradient, so every element of the Jacobian-vector product is checked.
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cave.fundamentals import essentials as E

TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5},
       torch.float64: {"rtol": 1e-10, "atol": 1e-10}}
DTYPES = st.sampled_from([torch.float32, torch.float64])
FAST = settings(max_examples=int(os.environ.get("CAVE_EXAMPLES", 25)),
               deadline=None, derandomize=True)  # the same cases every run


def vjp(out, inputs, seed=0):
    """Gradients of <out, g> for a fixed random g: a vector-Jacobian
    product."""
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed),
                    dtype=out.dtype)
    return torch.autograd.grad(out, inputs, g, allow_unused=True)


def leaf(*shape, dtype=torch.float32, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen, dtype=dtype) * scale
    return x.requires_grad_()


# --------------------------------------------------------------------------
# softmax, log_softmax
# --------------------------------------------------------------------------


@FAST
@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=4),
       dtype=DTYPES, scale=st.sampled_from([1.0, 30.0, 1000.0]),
       data=st.data())
def test_softmax_and_log_softmax_match_torch(shape, dtype, scale, data):
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = leaf(*shape, dtype=dtype, scale=scale)
    for ours, ref in ((E.softmax, torch.softmax),
                      (E.log_softmax, torch.log_softmax)):
        got, want = ours(x, dim=dim), ref(x, dim=dim)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, **TOL[dtype])
        for a, b in zip(vjp(got, x), vjp(want, x)):
            torch.testing.assert_close(a, b, **TOL[dtype])


def test_softmax_is_stable_where_the_naive_formula_overflows():
    x = torch.tensor([1000.0, 1001.0, 1002.0])
    assert torch.isnan(x.exp() / x.exp().sum()).all()  # the naive one fails
    torch.testing.assert_close(E.softmax(x), torch.softmax(x, -1),
                               rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(E.log_softmax(-x), torch.log_softmax(-x, -1),
                               rtol=1e-6, atol=1e-5)


def test_softmax_handles_minus_infinity_like_torch():
    x = torch.tensor([[0.0, float("-inf"), 1.0], [float("-inf")] * 3])
    got, want = E.softmax(x), torch.softmax(x, -1)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-7)
    assert got[0, 1] == 0
    assert torch.isnan(got[1]).all() and torch.isnan(want[1]).all()


# --------------------------------------------------------------------------
# cross_entropy
# --------------------------------------------------------------------------


@FAST
@given(n=st.integers(1, 6), c=st.integers(2, 7),
       extra=st.lists(st.integers(1, 4), max_size=2), dtype=DTYPES,
       smoothing=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
       ignore=st.sampled_from([-100, 0, 3]), seed=st.integers(0, 10**6))
def test_cross_entropy_matches_torch(n, c, extra, dtype, smoothing, ignore,
                                     seed):
    gen = torch.Generator().manual_seed(seed)
    logits = leaf(n, c, *extra, dtype=dtype, scale=3.0, seed=seed)
    targets = torch.randint(0, c, (n, *extra), generator=gen)
    drop = torch.rand(targets.shape, generator=gen) < 0.3
    targets = targets.masked_fill(drop, ignore)
    targets.view(-1)[0] = 1  # at least one target is counted
    kw = {"ignore_index": ignore, "label_smoothing": smoothing}
    got = E.cross_entropy(logits, targets, **kw)
    want = F.cross_entropy(logits, targets, **kw)
    torch.testing.assert_close(got, want, **TOL[dtype])
    (g_got,), (g_want,) = vjp(got, logits), vjp(want, logits)
    torch.testing.assert_close(g_got, g_want, **TOL[dtype])


@pytest.mark.parametrize("kw", [{}, {"label_smoothing": 0.2},
                                {"ignore_index": 2}])
def test_cross_entropy_language_model_layout_with_gradients(kw):
    logits = leaf(3, 11, 7, dtype=torch.float64)  # (B, C, T)
    targets = torch.randint(0, 11, (3, 7), generator=torch.Generator()
                            .manual_seed(1))  # (B, T)
    targets[0, :3] = -100 if "ignore_index" not in kw else 2
    got, want = (E.cross_entropy(logits, targets, **kw),
                 F.cross_entropy(logits, targets, **kw))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(vjp(got, logits)[0], vjp(want, logits)[0],
                               rtol=1e-12, atol=1e-12)


def test_cross_entropy_single_example_and_all_ignored():
    logits = leaf(5)
    target = torch.tensor(3)
    torch.testing.assert_close(E.cross_entropy(logits, target),
                               F.cross_entropy(logits, target),
                               rtol=1e-6, atol=1e-6)
    everything_ignored = torch.full((4,), -100)
    got = E.cross_entropy(leaf(4, 5), everything_ignored)
    want = F.cross_entropy(leaf(4, 5), everything_ignored)
    assert torch.isnan(got) and torch.isnan(want)  # 0 / 0, like PyTorch


def test_cross_entropy_of_uniform_logits_is_log_c():
    got = E.cross_entropy(torch.zeros(6, 13), torch.arange(6))
    torch.testing.assert_close(got, torch.tensor(math.log(13)),
                               rtol=1e-6, atol=1e-6)


def test_cross_entropy_errors_name_what_was_wrong():
    logits = torch.randn(4, 5)
    with pytest.raises(TypeError, match=r"int64, got torch.float32"):
        E.cross_entropy(logits, torch.zeros(4))
    with pytest.raises(TypeError, match=r"int64, got torch.int32"):
        E.cross_entropy(logits, torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"need targets of shape \(4,\), "
                                         r"got \(4, 1\)"):
        E.cross_entropy(logits, torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(IndexError, match=r"target 5 is out of range for 5"):
        E.cross_entropy(logits, torch.tensor([0, 1, 5, 2]))
    with pytest.raises(IndexError, match=r"target -1 is out of range"):
        E.cross_entropy(logits, torch.tensor([0, -1, 2, 2]))
    with pytest.raises(ValueError, match=r"label_smoothing must be in"):
        E.cross_entropy(logits, torch.tensor([0, 1, 2, 3]),
                        label_smoothing=1.5)
    with pytest.raises(ValueError, match=r"logits must be \(N, C, \.\.\.\)"):
        E.cross_entropy(torch.tensor(1.0), torch.tensor(0))


# --------------------------------------------------------------------------
# layer_norm
# --------------------------------------------------------------------------


# Normalised sizes 1 and 2 are left out: there the output is constant
# (0, or +-1) and its true gradient is about 0, so both implementations
# return rounding noise amplified by 1/sqrt(var + eps), which cannot agree.
@FAST
@given(lead=st.lists(st.integers(1, 4), max_size=2),
       norm=st.lists(st.integers(3, 8), min_size=1, max_size=2),
       affine=st.booleans(), as_int=st.booleans(), dtype=DTYPES,
       eps=st.sampled_from([1e-5, 1e-2]))
def test_layer_norm_matches_torch(lead, norm, affine, as_int, dtype, eps):
    x = leaf(*lead, *norm, dtype=dtype, scale=5.0)
    weight = leaf(*norm, dtype=dtype, seed=1) if affine else None
    bias = leaf(*norm, dtype=dtype, seed=2) if affine else None
    shape = norm[0] if as_int and len(norm) == 1 else tuple(norm)
    got = E.layer_norm(x, shape, weight, bias, eps=eps)
    want = F.layer_norm(x, tuple(norm), weight, bias, eps=eps)
    torch.testing.assert_close(got, want, **TOL[dtype])
    inputs = [t for t in (x, weight, bias) if t is not None]
    for a, b in zip(vjp(got, inputs), vjp(want, inputs)):
        torch.testing.assert_close(a, b, **TOL[dtype])


def test_layer_norm_errors():
    with pytest.raises(ValueError, match=r"needs an input ending in \(8,\)"):
        E.layer_norm(torch.randn(2, 7), 8)
    with pytest.raises(ValueError, match=r"needs an input ending"):
        E.layer_norm(torch.randn(3), (2, 3))
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        E.layer_norm(torch.randn(2, 8), 8, weight=torch.ones(7))
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        E.layer_norm(torch.randn(2, 8), 8, bias=torch.ones(8, 1))


# --------------------------------------------------------------------------
# scaled_dot_product_attention, attention_weights
# --------------------------------------------------------------------------


def qkv(lead, L, S, E_, Ev, dtype, seed=0):
    return (leaf(*lead, L, E_, dtype=dtype, seed=seed),
            leaf(*lead, S, E_, dtype=dtype, seed=seed + 1),
            leaf(*lead, S, Ev, dtype=dtype, seed=seed + 2))


def check_attention(q, k, v, tol, **kw):
    got = E.scaled_dot_product_attention(q, k, v, **kw)
    want = F.scaled_dot_product_attention(q, k, v, **kw)
    torch.testing.assert_close(got, want, **tol)
    for a, b in zip(vjp(got, (q, k, v)), vjp(want, (q, k, v))):
        torch.testing.assert_close(a, b, **tol)


@FAST
@given(lead=st.lists(st.integers(1, 3), max_size=2), L=st.integers(1, 6),
       S=st.integers(1, 6), E_=st.integers(1, 8), Ev=st.integers(1, 5),
       dtype=DTYPES, kind=st.sampled_from(["none", "bool", "float", "causal"]),
       seed=st.integers(0, 10**6))
def test_attention_matches_torch(lead, L, S, E_, Ev, dtype, kind, seed):
    q, k, v = qkv(lead, L, S, E_, Ev, dtype, seed)
    gen = torch.Generator().manual_seed(seed)
    kw = {}
    if kind == "bool":
        mask = torch.rand(L, S, generator=gen) < 0.7
        mask[:, 0] = True  # no row fully masked: gradients stay defined
        kw["attn_mask"] = mask
    elif kind == "float":
        kw["attn_mask"] = torch.randn(L, S, generator=gen, dtype=dtype)
    elif kind == "causal":
        kw["is_causal"] = True
    check_attention(q, k, v, TOL[dtype], **kw)


@pytest.mark.parametrize("mask_shape", [(2, 1, 1, 5), (1, 3, 4, 5), (4, 5)])
def test_attention_bool_mask_broadcasts_over_batch_and_heads(mask_shape):
    q, k, v = qkv((2, 3), 4, 5, 8, 6, torch.float64)  # (B, H, L/S, E)
    mask = torch.rand(mask_shape, generator=torch.Generator()
                      .manual_seed(3)) < 0.6
    mask[..., 0] = True
    check_attention(q, k, v, TOL[torch.float64], attn_mask=mask)


def test_attention_float_mask_with_minus_infinity_and_causal_heads():
    q, k, v = qkv((2, 3), 6, 6, 8, 8, torch.float32)  # (B, H, T, E)
    pad = torch.zeros(2, 1, 1, 6)
    pad[1, ..., 4:] = float("-inf")  # padding of the second sequence
    check_attention(q, k, v, TOL[torch.float32], attn_mask=pad)
    check_attention(q, k, v, TOL[torch.float32], is_causal=True)


def test_attention_scale_argument():
    q, k, v = qkv((2,), 3, 4, 5, 2, torch.float64)
    check_attention(q, k, v, TOL[torch.float64], scale=0.37)


def test_attention_weights_equal_torch_weights():
    """F.sdpa with v = identity returns its weights: compare ours to those."""
    q, k, _ = qkv((2, 3), 5, 5, 4, 1, torch.float64)
    eye = torch.eye(5, dtype=torch.float64)  # (S, S)
    want = F.scaled_dot_product_attention(q, k, eye, is_causal=True)
    got = E.attention_weights(q, k, is_causal=True)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.sum(-1), torch.ones(2, 3, 5,
                               dtype=torch.float64), rtol=0, atol=1e-12)
    assert got.triu(1).abs().max() == 0


def test_fully_masked_rows_give_zeros_like_torch():
    q, k, v = qkv((2,), 3, 4, 4, 3, torch.float32)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1] = False  # query 1 may attend to nothing
    got = E.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    assert (got[:, 1] == 0).all()
    grads = vjp(got, (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)


def test_attention_dropout():
    q, k, v = qkv((2,), 4, 4, 8, 3, torch.float32)
    zeros = E.scaled_dot_product_attention(q, k, v, dropout_p=1.0)
    assert (zeros == 0).all()
    torch.manual_seed(0)
    got = E.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(0)
    dropped = torch.dropout(E.attention_weights(q, k), 0.5, train=True)
    torch.testing.assert_close(got, dropped @ v, rtol=1e-6, atol=1e-6)
    clean = E.scaled_dot_product_attention(q, k, v)
    assert not torch.allclose(got, clean)


def test_attention_errors_name_the_shapes():
    q, k, v = qkv((2,), 3, 4, 8, 5, torch.float32)
    with pytest.raises(ValueError, match=r"q \(2, 3, 8\) has E=8, "
                                         r"k \(2, 4, 7\) has E=7"):
        E.scaled_dot_product_attention(q, k[..., :7], v)
    with pytest.raises(ValueError, match=r"same length S: k \(2, 4, 8\), "
                                         r"v \(2, 3, 5\)"):
        E.scaled_dot_product_attention(q, k, v[:, :3])
    with pytest.raises(ValueError, match=r"attn_mask of shape \(3, 3\) does "
                                         r"not broadcast to \(\.\.\., L=3, "
                                         r"S=4\)"):
        E.scaled_dot_product_attention(
            q, k, v, attn_mask=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"either attn_mask or is_causal"):
        E.scaled_dot_product_attention(
            q, k, v, attn_mask=torch.ones(3, 4, dtype=torch.bool),
            is_causal=True)
    with pytest.raises(ValueError, match=r"expects \(\.\.\., L, E\)"):
        E.scaled_dot_product_attention(torch.randn(8), k, v)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\]"):
        E.scaled_dot_product_attention(q, k, v, dropout_p=1.5)


# --------------------------------------------------------------------------
# Linear, gelu, FeedForward, dropout
# --------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_initialises_and_computes_like_nn_linear(bias, dtype):
    torch.manual_seed(7)
    ours = E.Linear(13, 4, bias=bias, dtype=dtype)
    torch.manual_seed(7)
    ref = nn.Linear(13, 4, bias=bias, dtype=dtype)
    assert [n for n, _ in ours.named_parameters()] == \
        [n for n, _ in ref.named_parameters()]
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # same draws
    x = leaf(2, 3, 13, dtype=dtype)
    got, want = ours(x), ref(x)
    torch.testing.assert_close(got, want, **TOL[dtype])
    inputs = [x, *ours.parameters()]
    ref_inputs = [x, *ref.parameters()]
    for a, b in zip(vjp(got, inputs), vjp(want, ref_inputs)):
        torch.testing.assert_close(a, b, **TOL[dtype])
    ref.load_state_dict(ours.state_dict())  # same state_dict layout


def test_linear_rejects_wrong_input_size():
    with pytest.raises(ValueError, match=r"expected last dimension 5, "
                                         r"got shape \(2, 4\)"):
        E.Linear(5, 3)(torch.randn(2, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gelu_matches_torch(dtype):
    x = leaf(1000, dtype=dtype, scale=4.0)
    got, want = E.gelu(x), F.gelu(x)
    torch.testing.assert_close(got, want, **TOL[dtype])
    torch.testing.assert_close(vjp(got, x)[0], vjp(want, x)[0], **TOL[dtype])


def test_feed_forward_is_the_composition_it_claims():
    torch.manual_seed(0)
    ff = E.FeedForward(8)
    assert ff.up.weight.shape == (32, 8) and ff.down.weight.shape == (8, 32)
    x = torch.randn(2, 5, 8)  # (B, T, C)
    want = F.linear(F.gelu(F.linear(x, ff.up.weight, ff.up.bias)),
                    ff.down.weight, ff.down.bias)
    torch.testing.assert_close(ff(x), want, **TOL[torch.float32])
    assert sum(p.numel() for p in E.FeedForward(8, hidden=3).parameters()) \
        == 8 * 3 + 3 + 3 * 8 + 8


def test_feed_forward_dropout_only_in_training():
    torch.manual_seed(0)
    ff = E.FeedForward(8, dropout=0.5)
    x = torch.randn(4, 8)
    ff.eval()
    torch.testing.assert_close(ff(x), ff(x), rtol=0, atol=0)
    ff.train()
    assert not torch.allclose(ff(x), ff(x))


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9])
def test_dropout_draws_the_same_mask_as_torch(p):
    x = leaf(64, 32)
    torch.manual_seed(3)
    got = E.dropout(x, p)
    torch.manual_seed(3)
    want = F.dropout(x, p)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(vjp(got, x)[0], vjp(want, x)[0],
                               rtol=1e-6, atol=1e-6)


def test_dropout_edges_and_errors():
    x = torch.randn(100)
    assert E.dropout(x, 0.7, training=False) is x
    assert (E.dropout(x, 1.0) == 0).all()
    with pytest.raises(ValueError, match=r"must be in \[0, 1\], got 1.2"):
        E.dropout(x, 1.2)


# --------------------------------------------------------------------------
# sgd_step, SGD
# --------------------------------------------------------------------------


def two_models(seed):
    torch.manual_seed(seed)
    a = nn.Sequential(E.Linear(3, 5), nn.Tanh(), E.Linear(5, 2))
    b = nn.Sequential(E.Linear(3, 5), nn.Tanh(), E.Linear(5, 2))
    b.load_state_dict(a.state_dict())
    return a, b


def loss_of(model, seed):
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(8, 3, generator=gen), torch.randn(8, 2, generator=gen)
    return F.mse_loss(model(x), y)


@FAST
@given(lr=st.sampled_from([0.01, 0.1, 0.5]),
       momentum=st.sampled_from([0.0, 0.5, 0.9]),
       weight_decay=st.sampled_from([0.0, 1e-3, 0.1]),
       steps=st.integers(1, 5), use_class=st.booleans())
def test_sgd_matches_torch_optim_sgd(lr, momentum, weight_decay, steps,
                                     use_class):
    ref_model, model = two_models(0)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=lr,
                              momentum=momentum, weight_decay=weight_decay)
    opt = E.SGD(model.parameters(), lr, momentum, weight_decay)
    buffers = None
    for step in range(steps):
        ref_opt.zero_grad()
        loss_of(ref_model, step).backward()
        ref_opt.step()
        if use_class:
            opt.zero_grad()
            loss_of(model, step).backward()
            opt.step()
        else:
            model.zero_grad()
            loss_of(model, step).backward()
            buffers = E.sgd_step(model.parameters(), lr, momentum,
                                 weight_decay, buffers)
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_sgd_step_skips_parameters_without_gradients():
    p, q = torch.ones(3, requires_grad=True), torch.ones(3,
                                                         requires_grad=True)
    p.grad = torch.full((3,), 2.0)
    buffers = E.sgd_step([p, q], lr=0.5, momentum=0.9)
    torch.testing.assert_close(p.detach(), torch.zeros(3), rtol=0, atol=0)
    torch.testing.assert_close(q.detach(), torch.ones(3), rtol=0, atol=0)
    assert buffers[1] is None and buffers[0] is not None
    with pytest.raises(ValueError, match=r"got 1 momentum buffers for 2"):
        E.sgd_step([p, q], lr=0.5, momentum=0.9, buffers=[None])


def test_sgd_resumes_exactly_from_its_state_dict():
    straight, resumed = two_models(1)
    opt_a = E.SGD(straight.parameters(), 0.1, momentum=0.9)
    opt_b = E.SGD(resumed.parameters(), 0.1, momentum=0.9)
    for step in range(6):
        for model, opt in ((straight, opt_a), (resumed, opt_b)):
            opt.zero_grad()
            loss_of(model, step).backward()
            opt.step()
        if step == 2:  # rebuild resumed's optimiser from a checkpoint
            state = opt_b.state_dict()
            opt_b = E.SGD(resumed.parameters(), 0.0)
            opt_b.load_state_dict(state)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"state has 4 buffers, optimiser "
                                         r"has 1 parameters"):
        E.SGD([torch.ones(1, requires_grad=True)], 0.1).load_state_dict(state)
    with pytest.raises(ValueError, match=r"must be >= 0"):
        E.SGD(straight.parameters(), lr=-1.0)


# --------------------------------------------------------------------------
# The shared helpers: pick_device, max_diff, seed_everything, eval_mode,
# smooth; the public names
# --------------------------------------------------------------------------


def test_pick_device_defaults_to_the_best_device_and_checks_names():
    device = E.pick_device()
    assert isinstance(device, torch.device)
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert E.pick_device("cpu") == torch.device("cpu")
    assert E.pick_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match=r"unknown device 'gpu'.*'cpu', "
                                         r"'cuda' or 'cuda:N'"):
        E.pick_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"'cuda' asked for, but this "
                                             r"PyTorch sees no CUDA GPU"):
            E.pick_device("cuda")
    else:
        n = torch.cuda.device_count()
        with pytest.raises(ValueError, match=rf"sees {n} GPU"):
            E.pick_device(f"cuda:{n}")


def test_max_diff_is_exact_and_refuses_mismatched_shapes():
    a = torch.tensor([1.0, 2.0, 3.0])
    assert E.max_diff(a, a) == 0.0
    assert E.max_diff(a, torch.tensor([1.0, 2.5, 3.0])) == 0.5
    assert E.max_diff(torch.zeros(0), torch.zeros(0)) == 0.0
    # compared in float64: a bfloat16 and its float32 twin differ by the
    # rounding, which the comparison must not hide
    x = torch.tensor([1.0 + 2**-10])
    assert E.max_diff(x, x.bfloat16()) == 2**-10
    assert E.max_diff(torch.ones(2, requires_grad=True), [1.0, 1.0]) == 0.0
    with pytest.raises(ValueError, match=r"one shape, got \(3,\) and "
                                         r"\(3, 1\)"):
        E.max_diff(a, a[:, None])


def test_seed_everything_repeats_every_generator():
    import random

    import numpy as np

    def draws():
        return random.random(), np.random.rand(), torch.rand(3)

    gen = E.seed_everything(5)
    first, g1 = draws(), torch.rand(2, generator=gen)
    gen = E.seed_everything(5)
    again, g2 = draws(), torch.rand(2, generator=gen)
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])
    assert torch.equal(g1, g2)
    for bad in (-1, 1.5, "0", True):
        with pytest.raises(ValueError, match="non-negative int"):
            E.seed_everything(bad)


def test_eval_mode_restores_every_submodules_own_mode_even_on_errors():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5),
                          nn.BatchNorm1d(2))
    model.train()
    model[2].eval()  # a frozen batch norm inside a training model
    before = [m.training for m in model.modules()]
    with E.eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == before
    with pytest.raises(RuntimeError, match="boom"):
        with E.eval_mode(model):
            raise RuntimeError("boom")
    assert [m.training for m in model.modules()] == before
    model.eval()
    with E.eval_mode(model):
        pass
    assert not model.training  # an evaluating model stays evaluating
    with pytest.raises(TypeError, match="nn.Module arguments, got Tensor"):
        with E.eval_mode(torch.zeros(1)):
            pass


def test_smooth_is_a_trailing_moving_average():
    values = [float(v) for v in torch.randn(50, generator=torch.Generator()
                                            .manual_seed(0))]
    for window in (1, 3, 20, 100):
        want = [sum(values[max(0, i + 1 - window):i + 1])
                / len(values[max(0, i + 1 - window):i + 1])
                for i in range(len(values))]
        assert E.smooth(values, window) == pytest.approx(want, abs=1e-12)
    assert E.smooth([], 5) == []
    with pytest.raises(ValueError, match="positive int"):
        E.smooth(values, 0)


def test_linear_initialisation_equals_nn_linear_to_the_last_bit():
    for dtype in (torch.float32, torch.float64):
        for fan_in in [1, 2, 3, 5, 7, 10, 33, 100, 129, 257, 784, 1000]:
            torch.manual_seed(fan_in)
            ours = E.Linear(fan_in, 3, dtype=dtype)
            torch.manual_seed(fan_in)
            ref = nn.Linear(fan_in, 3, dtype=dtype)
            assert torch.equal(ours.weight, ref.weight), (dtype, fan_in)
            assert torch.equal(ours.bias, ref.bias), (dtype, fan_in)


def test_every_exported_name_exists():
    for name in E.__all__:
        assert hasattr(E, name), name
    assert {"softmax", "log_softmax", "cross_entropy", "layer_norm",
            "scaled_dot_product_attention", "attention_weights", "sgd_step",
            "SGD", "Linear", "FeedForward", "pick_device", "max_diff",
            "seed_everything", "eval_mode", "smooth"} <= set(E.__all__)


def test_attention_takes_arguments_in_pytorchs_order():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 5, 8).unbind(0)
    mask = torch.rand(5, 5) > 0.3
    mask[:, 0] = True
    for args in [(None, 0.0, True), (mask, 0.0, False)]:
        torch.testing.assert_close(
            E.scaled_dot_product_attention(q, k, v, *args),
            F.scaled_dot_product_attention(q, k, v, *args),
            rtol=1e-5, atol=1e-6)
