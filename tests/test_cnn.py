"""The CNN chapter: convolution, pooling and batch norm equal PyTorch's,
in float32, float64 and bfloat16."""

import json
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import cave.classical.cnn as cnn
from cave.classical.cnn import (RECIPE, AvgPool2d, BatchNorm2d, Conv2d,
                                MaxPool2d, ResidualBlock, ResNet,
                                ResNetConfig, avg_pool2d, conv2d,
                                conv_output_size, full_run, im2col,
                                max_pool2d, receptive_field, unfold)
from cave.fundamentals.data import load_results
from cave.fundamentals.deep_networks import TrainConfig, evaluate, train

# float32 sums of up to a few hundred products, taken in another order
TOL = dict(atol=1e-4, rtol=1e-4)
EXACT = dict(atol=0, rtol=0)  # im2col and max pooling move numbers only
# Per dtype, for layers converted with .to(dtype). float64: the float32
# reasoning, 2**29 times finer. bfloat16 (8 significant bits): both sides
# accumulate in float32 and round the result, ours once more where it adds
# the bias or divides a pooled sum: up to two steps of 2**-7 relative, and
# 2**-6 absolute for results near zero out of sums of larger terms.
TOLS = {torch.float32: TOL,
        torch.float64: dict(atol=1e-12, rtol=1e-12),
        torch.bfloat16: dict(atol=2 ** -6, rtol=2 ** -6)}
DTYPES = list(TOLS)


def pair(draw, low, high):
    """An int, or a (height, width) pair of ints, drawn from [low, high]."""
    if draw(st.booleans()):
        return draw(st.integers(low, high))
    return (draw(st.integers(low, high)), draw(st.integers(low, high)))


def both(value):
    return (value, value) if isinstance(value, int) else value


@st.composite
def conv_cases(draw):
    groups = draw(st.integers(1, 3))
    c = groups * draw(st.integers(1, 3))
    o = groups * draw(st.integers(1, 3))
    kernel = pair(draw, 1, 4)
    stride, padding = pair(draw, 1, 3), pair(draw, 0, 2)
    dilation = pair(draw, 1, 3)
    kh, kw = both(kernel)
    (ph, pw), (dh, dw) = both(padding), both(dilation)
    # an input at least as large as the dilated kernel, after padding
    h = max(1, dh * (kh - 1) + 1 - 2 * ph) + draw(st.integers(0, 5))
    w = max(1, dw * (kw - 1) + 1 - 2 * pw) + draw(st.integers(0, 5))
    n = draw(st.integers(1, 3))
    bias = draw(st.booleans())
    return dict(x=(n, c, h, w), weight=(o, c // groups, kh, kw), bias=bias,
                options=dict(stride=stride, padding=padding,
                             dilation=dilation, groups=groups))


@settings(max_examples=150, deadline=None)
@given(case=conv_cases(), seed=st.integers(0, 2**16))
def test_conv2d_equals_torch_in_values_and_gradients(case, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(case["x"], generator=g, dtype=torch.float64)
    w = torch.randn(case["weight"], generator=g, dtype=torch.float64)
    b = (torch.randn(case["weight"][0], generator=g, dtype=torch.float64)
         if case["bias"] else None)
    inputs = [t.requires_grad_() for t in (x, w, b) if t is not None]
    ours = conv2d(x, w, b, **case["options"])
    theirs = F.conv2d(x, w, b, **case["options"])
    # float64: the two orders of summation agree to ~1e-15
    torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=1e-10)
    upstream = torch.randn(ours.shape, generator=g, dtype=torch.float64)
    for a, b_ in zip(torch.autograd.grad(ours, inputs, upstream),
                     torch.autograd.grad(theirs, inputs, upstream)):
        torch.testing.assert_close(a, b_, atol=1e-10, rtol=1e-10)


@settings(max_examples=60, deadline=None)
@given(case=conv_cases(), seed=st.integers(0, 2**16))
def test_unfold_equals_torch_exactly(case, seed):
    x = torch.randn(case["x"], generator=torch.Generator().manual_seed(seed))
    o = case["options"]
    kernel = case["weight"][2:]
    ours = unfold(x, kernel, o["dilation"], o["padding"], o["stride"])
    theirs = F.unfold(x, kernel, o["dilation"], o["padding"], o["stride"])
    torch.testing.assert_close(ours, theirs, **EXACT)
    columns, (ho, wo) = im2col(x, kernel, o["stride"], o["padding"],
                               o["dilation"])
    (kh, kw), (s, p, d) = kernel, (both(o[k]) for k in
                                   ("stride", "padding", "dilation"))
    assert ho == conv_output_size(x.shape[2], kh, s[0], p[0], d[0])
    assert wo == conv_output_size(x.shape[3], kw, s[1], p[1], d[1])
    assert columns.shape == (x.shape[1] * kh * kw, x.shape[0] * ho * wo)


def test_conv2d_float32_tolerance_and_bf16_autocast():
    torch.manual_seed(0)
    x, w = torch.randn(8, 16, 14, 14), torch.randn(32, 16, 3, 3)
    torch.testing.assert_close(conv2d(x, w, padding=1),
                               F.conv2d(x, w, padding=1), **TOL)
    with torch.autocast("cpu", torch.bfloat16):
        y = conv2d(x, w, padding=1)
    assert y.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa: about 2 decimal digits of each sum
    torch.testing.assert_close(y.float(), F.conv2d(x, w, padding=1),
                               atol=0.5, rtol=0.02)


def test_conv2d_module_is_interchangeable_with_nn_conv2d():
    for kwargs in [dict(), dict(stride=2, padding=1, bias=False),
                   dict(groups=2, dilation=2, padding=(2, 1))]:
        torch.manual_seed(0)
        ours = Conv2d(4, 6, 3, **kwargs)
        torch.manual_seed(0)
        theirs = nn.Conv2d(4, 6, 3, **kwargs)
        # same initial distribution, drawn in the same order
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        for key, value in ours.state_dict().items():
            torch.testing.assert_close(value, theirs.state_dict()[key],
                                       **EXACT)
        with torch.no_grad():
            for p in theirs.parameters():
                p.normal_()
        ours.load_state_dict(theirs.state_dict())  # strict: same keys
        x = torch.randn(2, 4, 9, 9, requires_grad=True)
        torch.testing.assert_close(ours(x), theirs(x), **TOL)
        gx1, gw1 = torch.autograd.grad(ours(x).square().sum(),
                                       (x, ours.weight))
        gx2, gw2 = torch.autograd.grad(theirs(x).square().sum(),
                                       (x, theirs.weight))
        torch.testing.assert_close(gx1, gx2, **TOL)
        torch.testing.assert_close(gw1, gw2, **TOL)


@st.composite
def pool_cases(draw):
    kernel = pair(draw, 1, 4)
    kh, kw = both(kernel)
    stride = draw(st.one_of(st.none(), st.integers(1, 3)))
    dilation = draw(st.sampled_from([1, 2, (1, 2)]))
    dh, dw = both(dilation)
    padding = (draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2)))
    h = dh * (kh - 1) + 1 + draw(st.integers(0, 6))
    w = dw * (kw - 1) + 1 + draw(st.integers(0, 6))
    return dict(shape=(draw(st.integers(1, 3)), draw(st.integers(1, 3)),
                       h, w),
                kernel_size=kernel, stride=stride, padding=padding,
                dilation=dilation)


@settings(max_examples=80, deadline=None)
@given(case=pool_cases(), seed=st.integers(0, 2**16))
def test_max_pool2d_equals_torch(case, seed):
    # a permutation: no ties, so the gradient has one right answer
    numel = torch.Size(case["shape"]).numel()
    x = torch.randperm(numel, generator=torch.Generator().manual_seed(seed))
    x = x.view(case["shape"]).float().requires_grad_()
    options = {k: case[k] for k in ("kernel_size", "stride", "padding",
                                    "dilation")}
    ours, theirs = max_pool2d(x, **options), F.max_pool2d(x, **options)
    torch.testing.assert_close(ours, theirs, **EXACT)
    upstream = torch.randn(ours.shape)
    torch.testing.assert_close(torch.autograd.grad(ours, x, upstream)[0],
                               torch.autograd.grad(theirs, x, upstream)[0],
                               **TOL)


@settings(max_examples=80, deadline=None)
@given(case=pool_cases(), seed=st.integers(0, 2**16),
       count_include_pad=st.booleans())
def test_avg_pool2d_equals_torch(case, seed, count_include_pad):
    x = torch.randn(case["shape"], generator=torch.Generator()
                    .manual_seed(seed)).requires_grad_()
    options = dict(kernel_size=case["kernel_size"], stride=case["stride"],
                   padding=case["padding"],
                   count_include_pad=count_include_pad)  # no dilation
    ours, theirs = avg_pool2d(x, **options), F.avg_pool2d(x, **options)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
    upstream = torch.randn(ours.shape)
    torch.testing.assert_close(torch.autograd.grad(ours, x, upstream)[0],
                               torch.autograd.grad(theirs, x, upstream)[0],
                               atol=1e-6, rtol=1e-6)


def test_pool_modules_match_torch_modules():
    x = torch.randn(2, 3, 10, 10)
    torch.testing.assert_close(MaxPool2d(3, 2, 1)(x),
                               nn.MaxPool2d(3, 2, 1)(x), **EXACT)
    torch.testing.assert_close(AvgPool2d(2)(x), nn.AvgPool2d(2)(x), **TOL)
    torch.testing.assert_close(
        AvgPool2d(3, 1, 1, count_include_pad=False)(x),
        nn.AvgPool2d(3, 1, 1, count_include_pad=False)(x), **TOL)


def bn_pair(**kwargs):
    ours, theirs = BatchNorm2d(**kwargs), nn.BatchNorm2d(**kwargs)
    if ours.affine:
        with torch.no_grad():
            ours.weight.uniform_(0.5, 1.5)
            ours.bias.uniform_(-1, 1)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 6), c=st.integers(1, 6), h=st.integers(1, 5),
       w=st.integers(2, 5), affine=st.booleans(), track=st.booleans(),
       momentum=st.sampled_from([0.1, 0.7, None]),
       dtype=st.sampled_from(DTYPES))
def test_batchnorm2d_equals_torch(n, c, h, w, affine, track, momentum,
                                  dtype):
    count = n * h * w  # values per channel
    # nn.BatchNorm2d's bfloat16 kernel rounds the batch mean and 1/std to
    # bfloat16 (ours keeps float32; see test_deep_networks): with fewer
    # than 8 values per channel its statistics are too rough to compare
    assume(dtype != torch.bfloat16 or count >= 8)
    torch.manual_seed(n * 1000 + c * 100 + h * 10 + w)
    ours, theirs = bn_pair(num_features=c, affine=affine, momentum=momentum,
                           track_running_stats=track)
    ours, theirs, tol = ours.to(dtype), theirs.to(dtype), TOLS[dtype]
    # a parameter's gradient sums `count` values, each off by up to a
    # step of bfloat16 in PyTorch's kernel: 2**-6 sqrt(count)
    param_tol = (dict(atol=2 ** -6 * count ** 0.5, rtol=2 ** -6)
                 if dtype == torch.bfloat16 else tol)
    for _ in range(4):  # running statistics accumulate over steps
        x = (torch.randn(n, c, h, w) * 3 + 1).to(dtype)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = ours(x1), theirs(x2)
        torch.testing.assert_close(y1, y2, **tol)
        upstream = torch.randn(y1.shape).to(dtype)
        (y1 * upstream).sum().backward()
        (y2 * upstream).sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad, **tol)
        if affine:
            torch.testing.assert_close(ours.weight.grad, theirs.weight.grad,
                                       **param_tol)
            torch.testing.assert_close(ours.bias.grad, theirs.bias.grad,
                                       **param_tol)
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    for key in a:  # values and dtypes: each buffer keeps the module's
        torch.testing.assert_close(a[key], b[key], **tol)
    ours.eval(), theirs.eval()
    x = torch.randn(n, c, h, w).to(dtype)
    torch.testing.assert_close(ours(x), theirs(x), **tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_and_pool_layers_equal_torch_in_every_dtype(dtype):
    torch.manual_seed(0)
    tol = TOLS[dtype]
    ours = Conv2d(6, 9, 3, stride=2, padding=1, groups=3)
    theirs = nn.Conv2d(6, 9, 3, stride=2, padding=1, groups=3)
    theirs.load_state_dict(ours.state_dict())
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    x = torch.randn(2, 6, 11, 10).to(dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ours(x1), theirs(x2)
    assert y1.dtype == dtype
    torch.testing.assert_close(y1, y2, **tol)
    upstream = torch.randn(y1.shape).to(dtype)
    (y1 * upstream).sum().backward()
    (y2 * upstream).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, **tol)
    # a weight's gradient sums 2 * 6 * 5 = 60 products
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad,
                               **(tol if dtype != torch.bfloat16 else
                                  dict(atol=2 ** -6 * 60 ** 0.5,
                                       rtol=2 ** -6)))
    pools = [(MaxPool2d(3, 2, 1), nn.MaxPool2d(3, 2, 1)),
             (AvgPool2d(3, 2, 1), nn.AvgPool2d(3, 2, 1)),
             (AvgPool2d(3, 1, 1, count_include_pad=False),
              nn.AvgPool2d(3, 1, 1, count_include_pad=False))]
    # no ties within a channel, or max pooling's gradient may pick either
    # of two equal values (bfloat16 has only 256 numbers per octave): each
    # channel holds 0, 1, ..., 109 in random order, exact in every dtype
    x = torch.rand(12, 110).argsort(dim=1).view(2, 6, 11, 10).to(dtype) / 16
    for ours, theirs in pools:
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = ours(x1), theirs(x2)
        assert y1.dtype == dtype
        torch.testing.assert_close(y1, y2, **tol)
        y1.sum().backward()
        y2.sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad, **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_resnet_trains_a_step_in_every_dtype(dtype):
    torch.manual_seed(0)
    model = ResNet(ResNetConfig(stem_channels=8, widths=(8, 16),
                                blocks=(1, 1))).to(dtype)
    logits = model(torch.rand(4, 28, 28).to(dtype))  # (4, 10)
    assert logits.dtype == dtype and logits.shape == (4, 10)
    F.cross_entropy(logits.float(), torch.arange(4)).backward()
    assert all(p.grad.dtype == dtype for p in model.parameters())
    buffers = [b for name, b in model.named_buffers()
               if name.endswith("running_var")]
    assert buffers and all(b.dtype == dtype for b in buffers)


def test_batchnorm2d_statistics_run_over_batch_and_positions():
    bn = BatchNorm2d(2, momentum=1.0, affine=False)  # running = last batch
    x = torch.randn(4, 2, 3, 5) * torch.tensor([1.0, 5.0]).view(1, 2, 1, 1)
    y = bn(x)
    per_channel = x.transpose(0, 1).reshape(2, -1)  # (C, N * H * W)
    torch.testing.assert_close(bn.running_mean, per_channel.mean(1))
    torch.testing.assert_close(bn.running_var, per_channel.var(1))  # N-1
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(2),
                               atol=1e-6, rtol=0)


def test_receptive_field_formula_matches_gradients():
    chain = [(3, 1, 1), (5, 2, 1), (3, 1, 2), (2, 2, 1), (3, 1, 1)]
    torch.manual_seed(0)
    x = torch.randn(1, 1, 64, 64, requires_grad=True)
    h = x
    for (k, s, d), (size, jump) in zip(chain, receptive_field(chain)):
        h = torch.tanh(conv2d(h, torch.randn(1, 1, k, k), stride=s,
                              padding=0, dilation=d))
        grad, = torch.autograd.grad(h[0, 0, 3, 3], x, retain_graph=True)
        rows = grad[0, 0].abs().sum(1).nonzero()
        cols = grad[0, 0].abs().sum(0).nonzero()
        assert rows.max() - rows.min() + 1 == size
        assert cols.max() - cols.min() + 1 == size
        assert rows.min() == 3 * jump  # unit 3 starts 3 jumps in
    assert receptive_field([(3, 1, 1)] * 4) == [(3, 1), (5, 1), (7, 1),
                                               (9, 1)]


def test_residual_block_shortcuts():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    same = ResidualBlock(4, 4)
    assert isinstance(same.shortcut, nn.Identity)
    down = ResidualBlock(4, 8, stride=2)
    assert down(x).shape == (2, 8, 4, 4)
    assert isinstance(down.shortcut[0], Conv2d)
    assert down.shortcut[0].stride == (2, 2)
    # with F(x) = 0 (bn2's gamma and beta at zero), a residual block is
    # relu(x) and a plain block outputs zeros
    plain = ResidualBlock(4, 4, residual=False)
    for block in (same, plain):
        with torch.no_grad():
            block.bn2.weight.zero_()
            block.bn2.bias.zero_()
    torch.testing.assert_close(same(x), F.relu(x))
    torch.testing.assert_close(plain(x), torch.zeros_like(x))
    no_norm = ResidualBlock(4, 4, batch_norm=False)
    assert no_norm.conv1.bias is not None
    assert not any(isinstance(m, BatchNorm2d) for m in no_norm.modules())


def test_resnet_shapes_depth_and_input_forms():
    torch.manual_seed(0)
    model = ResNet().eval()
    x = torch.rand(3, 28, 28)
    maps = model.feature_maps(x)
    assert [tuple(m.shape) for m in maps] == [
        (3, 32, 14, 14), (3, 32, 14, 14), (3, 64, 7, 7), (3, 128, 4, 4)]
    torch.testing.assert_close(model(x), model(x.unsqueeze(1)))
    assert model(x).shape == (3, 10) and model.depth == 7
    deep = ResNet(ResNetConfig(widths=(8, 8), blocks=(2, 3),
                               stem_channels=8))
    assert deep.depth == 11
    convs = [m for m in deep.modules() if isinstance(m, Conv2d)]
    assert len(convs) == 12  # 11 on the path, one 1x1 at the stride 2
    assert not any(isinstance(m, nn.Conv2d) for m in deep.modules())


def test_resnet_errors_name_expected_and_actual():
    model = ResNet()
    with pytest.raises(TypeError, match="float pixels.*uint8"):
        model(torch.zeros(2, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\).*\(2, 3, 28, 28\)"):
        model(torch.zeros(2, 3, 28, 28))
    with pytest.raises(ValueError, match="one entry per stage"):
        ResNet(ResNetConfig(widths=(8, 16), blocks=(1,)))


def message(pattern):
    return pytest.raises((ValueError, TypeError), match=pattern)


def test_conv_errors_name_expected_and_actual():
    x = torch.randn(2, 3, 8, 8)
    with message(r"expected input with 4 channels .*\(6, 2, 3, 3\), "
                 r"groups=2\), got 3 channels"):
        conv2d(x, torch.randn(6, 2, 3, 3), groups=2)
    with message(r"kernel 5x5 .* spans 9x9, larger than the padded input "
                 r"8x8 \(input 6x6, padding \(1, 1\)\)"):
        conv2d(torch.randn(1, 3, 6, 6), torch.randn(4, 3, 5, 5), padding=1,
               dilation=2)
    with message(r"groups=4 must divide in_channels=6 and out_channels=8"):
        Conv2d(6, 8, 3, groups=4)
    with message(r"groups=2 must divide out_channels=3"):
        conv2d(torch.randn(1, 4, 5, 5), torch.randn(3, 2, 3, 3), groups=2)
    with message(r"stride must be >= 1, got 0"):
        conv2d(x, torch.randn(4, 3, 3, 3), stride=0)
    with message(r"padding must be >= 0, got \(1, -1\)"):
        conv2d(x, torch.randn(4, 3, 3, 3), padding=(1, -1))
    with message(r"stride must be an int or a pair of ints, got 1.5"):
        conv2d(x, torch.randn(4, 3, 3, 3), stride=1.5)
    with message(r"padding must be an int or a pair of ints, got 'same'"):
        Conv2d(3, 4, 3, padding="same")
    with message(r"input of shape \(N, C, H, W\), got \(3, 8, 8\)"):
        conv2d(x[0], torch.randn(4, 3, 3, 3))
    with message(r"bias of shape \(4,\), got \(3,\)"):
        conv2d(x, torch.randn(4, 3, 3, 3), torch.randn(3))
    with message(r"expected input with 3 channels.*got 1 channels"):
        Conv2d(3, 4, 3)(torch.randn(2, 1, 8, 8))


def test_pool_and_norm_errors_name_expected_and_actual():
    x = torch.randn(2, 3, 8, 8)
    with message(r"max_pool2d: padding \(2, 2\) must be at most half the "
                 r"kernel \(3, 3\)"):
        max_pool2d(x, 3, padding=2)
    with message(r"avg_pool2d expected input of shape \(N, C, H, W\), got "
                 r"\(8, 8\)"):
        avg_pool2d(x[0, 0], 2)
    with message(r"kernel 9x9 .* larger than the padded input 8x8"):
        max_pool2d(x, 9)
    with message(r"BatchNorm2d expected input of shape \(N, 3, H, W\), got "
                 r"\(2, 4, 8, 8\)"):
        BatchNorm2d(3)(torch.randn(2, 4, 8, 8))


def test_short_training_run_learns_digits():
    from cave.fundamentals.data import mnist_split

    (tx, ty), (vx, vy) = mnist_split(seed=0)
    torch.manual_seed(0)
    model = ResNet(ResNetConfig(stem_channels=8, widths=(8, 16),
                                blocks=(1, 1)))
    before = evaluate(model, vx[:500], vy[:500])[1]
    history = train(model, (tx[:1500], ty[:1500]), (vx[:500], vy[:500]),
                    TrainConfig(epochs=4, batch_size=50, lr=1e-2,
                                warmup=0.1, max_shift=0))
    assert history.best_val_acc > 0.75 > before + 0.5
    assert history.step_loss[-1] < history.step_loss[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_everything_runs_on_cuda():
    torch.manual_seed(0)
    x = torch.randn(4, 6, 12, 12, device="cuda")
    w = torch.randn(9, 2, 3, 3, device="cuda")
    torch.testing.assert_close(conv2d(x, w, padding=1, groups=3),
                               F.conv2d(x, w, padding=1, groups=3),
                               atol=1e-3, rtol=1e-3)  # TF32 may be on
    torch.testing.assert_close(max_pool2d(x, 3, 2, 1),
                               F.max_pool2d(x, 3, 2, 1))
    torch.testing.assert_close(avg_pool2d(x, 2), F.avg_pool2d(x, 2))
    model = ResNet().cuda()
    assert model(torch.rand(8, 28, 28, device="cuda")).shape == (8, 10)


def test_recorded_full_run_reaches_99_percent():
    record = load_results("cnn")["resnet"]
    # recorded before `cave run cnn --full` existed; either command is it
    assert record["command"] in ("python -m cave.classical.cnn --full",
                                 "cave run cnn --full",
                                 "cave run cnn --full part=resnet")
    assert record["best_val_acc"] >= 0.99
    expected = {**RECIPE.__dict__, "device": record["train"]["device"]}
    # recorded before TrainConfig had optimizer and schedule: it ran with
    # what their defaults are now
    assert set(expected) - set(record["train"]) <= {"optimizer", "schedule"}
    assert (RECIPE.optimizer, RECIPE.schedule) == ("adam", "one_cycle")
    assert {k: expected[k] for k in record["train"]} == record["train"]
    assert record["model"] == ResNetConfig().__dict__ | {
        "widths": list(ResNetConfig().widths),
        "blocks": list(ResNetConfig().blocks)}
    history = record["history"]
    assert len(history["val_acc"]) == RECIPE.epochs
    assert max(history["val_acc"]) == record["best_val_acc"]
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", record["torch"])
    assert len(record["stem_filters"]) == ResNetConfig().stem_channels


def test_full_run_returns_a_json_record(monkeypatch):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (96, 28, 28), dtype=torch.uint8,
                           generator=g)
    labels = torch.randint(0, 10, (96,), generator=g)
    monkeypatch.setattr(cnn, "mnist_split", lambda seed=0: (
        (images[:64], labels[:64]), (images[64:], labels[64:])))
    record = full_run("cpu", epochs=1, batch_size=32)
    json.dumps(record)  # serialisable as it is
    assert record["device"] == "cpu"
    assert record["train"] == {**RECIPE.__dict__, "epochs": 1,
                               "batch_size": 32, "device": "cpu"}
    assert len(record["history"]["val_acc"]) == 1
    assert len(record["stem_filters"]) == ResNetConfig().stem_channels
    assert not {"command", "torch", "date", "threads", "cpus"} & set(record)


def test_full_run_checks_its_overrides_before_training():
    with pytest.raises(ValueError, match=r"unknown override.*\['epoch'\]"
                       r".*'label_smoothing'"):
        full_run("cpu", epoch=3)
    with pytest.raises(TypeError, match="epochs='3'"):
        full_run("cpu", epochs="3")


def test_recorded_lenet_run_and_lenet_shapes():
    from cave.classical.cnn import LeNet5
    record = load_results("cnn")["lenet"]
    assert record["command"].startswith("cave run cnn --full")
    assert record["parameters"] == 61_706 == sum(
        p.numel() for p in LeNet5().parameters())
    assert record["train"] == {**RECIPE.__dict__,
                               "device": record["train"]["device"]}
    assert len(record["history"]["val_acc"]) == RECIPE.epochs
    assert 0.97 < record["best_val_acc"] <= 1.0
    # the chapter's reading of its table: MLP < LeNet-5 < ResNet
    mlp = load_results("deep_networks")["recipe"]["best_val_acc"]
    resnet = load_results("cnn")["resnet"]["best_val_acc"]
    assert mlp < record["best_val_acc"] < resnet
    model = LeNet5()
    assert model(torch.rand(3, 28, 28)).shape == (3, 10)
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    with pytest.raises(ValueError, match=r"expected input of shape "
                       r"\(B, 1, 28, 28\) or \(B, 28, 28\), got "
                       r"\(3, 1, 32, 32\)"):
        model(torch.rand(3, 1, 32, 32))
    with pytest.raises(TypeError, match="float pixels"):
        model(torch.zeros(3, 28, 28, dtype=torch.uint8))


def test_full_run_refuses_an_unknown_part():
    from cave.classical.cnn import full_run
    with pytest.raises(ValueError, match=r"part must be one of "
                       r"\('resnet', 'lenet'\), got 'vgg'"):
        full_run("cpu", part="vgg")
