"""The regularisation chapter: dropout variants against nn.Dropout and
nn.Dropout2d, augmentations against integer rolls, mixed labels against
weighted losses, label smoothing against F.cross_entropy, decoupled weight
decay against torch.optim.SGD and torch.optim.AdamW."""

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cave.techniques.regularization as reg
from cave.classical.cnn import ResidualBlock, ResNet, ResNetConfig
from cave.fundamentals.data import load_results
from cave.fundamentals.deep_networks import Adam, Dropout, random_shift
from cave.techniques.regularization import (
    METHODS, SEEDS, DropConnectLinear, Dropout2d, EarlyStopping, RegConfig,
    StochasticDepth, add_stochastic_depth, affine_matrices, augment_batch,
    cutmix, cutout, decay_weights_, drop_path, fit, full_run,
    monte_carlo_mean, mixup, one_hot, random_affine, smooth_labels,
    soft_cross_entropy, warp)

TOL = dict(atol=1e-6, rtol=1e-6)  # float32 sums in another order


def binomial_ok(fraction, p, n):
    """fraction of n Bernoulli(p) draws within 5 standard deviations."""
    return abs(fraction - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-12


# --------------------------------------------------------------------------
# Dropout and its variants
# --------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.8])
def test_dropout_statistics_match_nn_dropout(p):
    """Fraction zeroed, the survivors' scale, and the mean over masks, for
    the deep networks chapter's Dropout and for nn.Dropout alike."""
    torch.manual_seed(0)
    x = torch.randn(200, 50)
    for layer in (Dropout(p), nn.Dropout(p)):
        y = layer(x)
        assert binomial_ok((y == 0).float().mean().item(), p, x.numel())
        kept = y != 0
        torch.testing.assert_close(y[kept], x[kept] / (1 - p))
        mean = monte_carlo_mean(layer, x[:4], draws=3000)
        se = math.sqrt(p / (1 - p) / 3000) * x[:4].abs().double()
        assert ((mean - x[:4].double()).abs() <= 5 * se + 1e-12).all()
        layer.eval()
        assert torch.equal(layer(x), x)


def test_monte_carlo_mean_restores_modes_and_checks_draws():
    model = nn.Sequential(nn.Dropout(0.5), nn.BatchNorm1d(3))
    model.eval()
    model[1].train()  # a mixed state, restored as it was
    monte_carlo_mean(model, torch.randn(4, 3), draws=3)
    assert not model.training and not model[0].training and model[1].training
    with pytest.raises(ValueError, match="draws must be a positive int"):
        monte_carlo_mean(model, torch.randn(4, 3), draws=0)


@pytest.mark.parametrize("p", [0.0, 0.2, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("shape", [(8, 16, 5, 5), (3, 7, 1, 9)])
def test_dropout2d_draws_the_masks_of_nn_dropout2d(p, shape):
    x = torch.randn(shape)
    for seed in range(3):
        torch.manual_seed(seed)
        ours = Dropout2d(p)(x)
        torch.manual_seed(seed)
        theirs = nn.Dropout2d(p)(x)
        assert torch.equal(ours, theirs)


def test_dropout2d_zeroes_whole_channels_with_the_right_statistics():
    torch.manual_seed(0)
    p = 0.3
    x = torch.randn(64, 32, 4, 4) + 5  # no zeros in the input
    y = Dropout2d(p)(x)
    zero = (y == 0).all(dim=(2, 3))
    kept = (y != 0).all(dim=(2, 3))
    assert (zero | kept).all(), "every channel is zeroed or kept whole"
    assert binomial_ok(zero.float().mean().item(), p, zero.numel())
    torch.testing.assert_close(y[kept], x[kept] / (1 - p))
    mean = monte_carlo_mean(Dropout2d(p), x[:2], draws=3000)
    torch.testing.assert_close(mean, x[:2].double(), atol=0.5, rtol=0.05)
    layer = Dropout2d(p).eval()
    assert torch.equal(layer(x), x)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\), got \(4, 4\)"):
        Dropout2d(p)(torch.randn(4, 4))
    with pytest.raises(ValueError, match=r"in \[0, 1\], got 1.5"):
        Dropout2d(1.5)


def test_dropconnect_is_linear_in_evaluation_and_on_average():
    torch.manual_seed(0)
    linear = nn.Linear(12, 5)
    layer = DropConnectLinear.from_linear(linear, p=0.4)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    x = torch.randn(6, 12)
    layer.eval()
    assert torch.equal(layer(x), linear(x))
    layer.train()
    assert not torch.allclose(layer(x), linear(x))
    mean = monte_carlo_mean(layer, x, draws=20000)
    torch.testing.assert_close(mean, linear(x).double(), atol=0.03, rtol=0)
    torch.manual_seed(1)  # one mask: the weights that took part get grads
    y = layer.train()(x)
    y.sum().backward()
    dropped = layer.weight.grad == 0
    assert binomial_ok(dropped.float().mean().item(), 0.4, dropped.numel())
    with pytest.raises(ValueError, match=r"in \[0, 1\), got 1.0"):
        DropConnectLinear(3, 4, p=1.0)


def test_dropconnect_with_p_zero_equals_nn_linear_in_training():
    torch.manual_seed(0)
    linear = nn.Linear(7, 3, bias=False)
    layer = DropConnectLinear.from_linear(linear, p=0.0)
    x = torch.randn(5, 7)
    assert torch.equal(layer(x), linear(x))
    assert "p=0.0" in repr(layer)


@pytest.mark.parametrize("p", [0.0, 0.25, 0.6])
def test_drop_path_drops_whole_examples_and_keeps_the_mean(p):
    torch.manual_seed(0)
    x = torch.randn(400, 3, 2, 2) + 4  # no zeros
    y = drop_path(x, p)
    dropped = (y == 0).flatten(1).all(dim=1)
    kept = (y != 0).flatten(1).all(dim=1)
    assert (dropped | kept).all()
    assert binomial_ok(dropped.float().mean().item(), p, len(x))
    torch.testing.assert_close(y[kept], x[kept] / (1 - p))
    assert torch.equal(drop_path(x, p, training=False), x)
    means = torch.stack([drop_path(x[:5], p) for _ in range(4000)]).mean(0)
    torch.testing.assert_close(means, x[:5], atol=0.35, rtol=0.03)


def test_stochastic_depth_wraps_the_cnn_block():
    torch.manual_seed(0)
    block = ResidualBlock(4, 8, stride=2)  # a projection shortcut
    wrapped = StochasticDepth(block, 0.5)
    x = torch.randn(10, 4, 6, 6)
    wrapped.eval()
    assert torch.equal(wrapped(x), block(x))
    wrapped.train()
    block.bn1.eval(), block.bn2.eval()
    block.shortcut[1].eval()
    with torch.no_grad():
        branch = block.bn2(block.conv2(F.relu(block.bn1(block.conv1(x)))))
        short = block.shortcut(x)
        torch.manual_seed(0)
        y = wrapped(x)
    for n in range(len(x)):
        dropped = torch.equal(y[n], F.relu(short[n]))
        kept = torch.allclose(y[n], F.relu(short[n] + 2 * branch[n]),
                              **TOL)
        assert dropped or kept
    with pytest.raises(TypeError, match="residual=True"):
        StochasticDepth(ResidualBlock(4, 4, residual=False), 0.1)
    with pytest.raises(ValueError, match=r"in \[0, 1\), got 1"):
        StochasticDepth(block, 1)


def test_add_stochastic_depth_follows_the_linear_rule():
    torch.manual_seed(0)
    model = ResNet(ResNetConfig(blocks=(1, 2, 3)))
    ps = add_stochastic_depth(model, 0.6)
    torch.testing.assert_close(torch.tensor(ps),
                               0.6 * torch.arange(1, 7) / 6)
    wrapped = [m for m in model.modules() if isinstance(m, StochasticDepth)]
    assert [m.p for m in wrapped] == ps
    assert model(torch.rand(4, 28, 28)).shape == (4, 10)
    with pytest.raises(TypeError, match="the CNN chapter's ResNet"):
        add_stochastic_depth(nn.Linear(2, 2), 0.1)


# --------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------


def roll_with_zeros(x, dy, dx):
    """torch.roll, then zero what wrapped around."""
    y = torch.roll(x, (dy, dx), dims=(-2, -1))
    H, W = x.shape[-2:]
    rows, cols = torch.arange(H), torch.arange(W)
    wrapped_rows = (rows < dy) | (rows >= H + dy)
    wrapped_cols = (cols < dx) | (cols >= W + dx)
    mask = wrapped_rows.view(H, 1) | wrapped_cols.view(1, W)
    return y.masked_fill(mask, 0.0)


@pytest.mark.parametrize("shape", [(5, 28, 28), (3, 2, 17, 24), (2, 9, 8)])
def test_integer_shifts_equal_integer_rolls_exactly(shape):
    g = torch.Generator().manual_seed(0)
    levels = torch.randint(0, 256, shape, generator=g)
    x = levels.float() / 255  # the grey levels of 8-bit images
    B = shape[0]
    for dy in range(-4, 5):
        for dx in range(-4, 5):
            theta = affine_matrices(torch.zeros(B), torch.ones(B),
                                    torch.tensor([[dx, dy]] * B),
                                    shape[-2:])
            assert torch.equal(warp(x, theta), roll_with_zeros(x, dy, dx)), \
                (dy, dx)


def test_the_other_align_corners_convention_is_off_by_a_fraction():
    """With align_corners=False a pixel is 2/W wide; 2/(W-1), the other
    convention's width, moves the content by more than a whole pixel."""
    x = torch.rand(2, 1, 12, 12)
    theta = torch.tensor([[1.0, 0, -2 / 11], [0, 1, 0]]).expand(2, 2, 3)
    grid = F.affine_grid(theta, [2, 1, 12, 12], align_corners=False)
    wrong = F.grid_sample(x, grid, align_corners=False)
    assert (wrong - roll_with_zeros(x, 0, 1)).abs().max() > 0.01


def test_warp_equals_the_deep_networks_random_shift():
    x = torch.randint(0, 256, (16, 28, 28)).float() / 255
    for k in (1, 2, 3):
        g = torch.Generator().manual_seed(k)
        theirs = random_shift(x, k, g)
        g = torch.Generator().manual_seed(k)
        dy = torch.randint(0, 2 * k + 1, (16, 1, 1), generator=g).view(16)
        dx = torch.randint(0, 2 * k + 1, (16, 1, 1), generator=g).view(16)
        theta = affine_matrices(torch.zeros(16), torch.ones(16),
                                torch.stack([k - dx, k - dy], 1), (28, 28))
        assert torch.equal(warp(x, theta), theirs)


@pytest.mark.parametrize("size", [6, 7, 28])
def test_quarter_turns_equal_rot90(size):
    x = torch.randint(0, 256, (3, 2, size, size)).float() / 255
    for quarters in (1, 2, 3, -1):
        theta = affine_matrices(torch.full((3,), 90.0 * quarters),
                                torch.ones(3), torch.zeros(3, 2),
                                (size, size))
        assert torch.equal(warp(x, theta), torch.rot90(x, quarters, (2, 3)))


def test_scaling_about_the_centre_and_bad_input():
    x = torch.zeros(1, 9, 9)
    x[0, 4, 4] = 1.0  # the centre pixel stays where it is
    theta = affine_matrices(torch.zeros(1), torch.full((1,), 2.0),
                            torch.zeros(1, 2), (9, 9))
    y = warp(x, theta, levels=None)
    assert y[0, 4, 4] == y.max() and y.sum() > 1.5  # spread out, centred
    with pytest.raises(ValueError, match=r"expected angles \(B,\)"):
        affine_matrices(torch.zeros(2), torch.ones(3), torch.zeros(2, 2),
                        (5, 5))
    with pytest.raises(ValueError, match=r"theta of shape \(1, 2, 3\)"):
        warp(x, torch.zeros(2, 2, 3))
    with pytest.raises(ValueError, match="float images"):
        warp(torch.zeros(1, 5, 5, dtype=torch.uint8), theta)
    with pytest.raises(ValueError, match="max_scale in"):
        random_affine(x, max_scale=1.0)


def test_random_affine_with_nothing_to_do_is_the_identity():
    x = torch.randint(0, 256, (4, 28, 28)).float() / 255
    assert torch.equal(random_affine(x), x)
    g = torch.Generator().manual_seed(0)
    moved = random_affine(x, max_shift=2, max_rotation=10, max_scale=0.1,
                          generator=g)
    assert moved.shape == x.shape and not torch.equal(moved, x)
    assert ((moved * 255).round() == moved * 255).all()  # 8-bit levels


def test_cutout_zeroes_one_clipped_square_per_image():
    g = torch.Generator().manual_seed(0)
    x = torch.ones(200, 3, 20, 20)
    y = cutout(x, 6, generator=g)
    holes = (y == 0).all(dim=1)  # (B, H, W): every channel zero
    assert ((y == 0).any(dim=1) == holes).all()
    areas = holes.flatten(1).sum(1)
    assert (areas <= 36).all() and (areas == 36).any() and (areas < 36).any()
    for n in range(len(y)):  # each hole is one rectangle
        rows, cols = holes[n].any(1).nonzero(), holes[n].any(0).nonzero()
        assert areas[n] == len(rows) * len(cols)
    assert torch.equal(cutout(x, 0), x)
    with pytest.raises(ValueError, match="cutout size must be an int"):
        cutout(x, 2.5)


# --------------------------------------------------------------------------
# Mixed labels and label smoothing
# --------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [0.0, 0.2, 0.5, 0.93])
@pytest.mark.parametrize("mix", [mixup, cutmix])
def test_mixed_targets_give_the_lam_weighted_sum_of_losses(mix, lam):
    torch.manual_seed(0)
    x, labels = torch.rand(16, 28, 28), torch.randint(0, 10, (16,))
    g = torch.Generator().manual_seed(0)
    m = mix(x, one_hot(labels, 10), lam=lam, generator=g)
    logits = torch.randn(16, 10, requires_grad=True)
    ours = soft_cross_entropy(logits, m.targets)
    weighted = (m.lam * F.cross_entropy(logits, labels) + (1 - m.lam)
                * F.cross_entropy(logits, labels[m.index]))
    torch.testing.assert_close(ours, weighted, **TOL)
    g1, = torch.autograd.grad(ours, logits)
    g2, = torch.autograd.grad(weighted, logits)
    torch.testing.assert_close(g1, g2, **TOL)
    torch.testing.assert_close(m.targets.sum(1), torch.ones(16))


def test_mixup_blends_images_with_the_targets_weight():
    x, t = torch.rand(8, 5, 5), one_hot(torch.arange(8), 8)
    m = mixup(x, t, lam=0.3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(m.x, 0.3 * x + 0.7 * x[m.index])
    assert sorted(m.index.tolist()) == list(range(8))
    torch.manual_seed(0)
    lams = [mixup(x, t, alpha=0.4).lam for _ in range(400)]
    mean = sum(lams) / len(lams)
    assert all(0 <= v <= 1 for v in lams) and abs(mean - 0.5) < 0.05
    with pytest.raises(ValueError, match=r"soft targets \(B, K\)"):
        mixup(x, torch.arange(8), lam=0.5)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        mixup(x, t, alpha=0.0)


def test_cutmix_lam_is_the_fraction_of_own_pixels():
    """Images that differ from every other in every pixel: the pixels an
    image keeps are counted exactly, also when the box is clipped."""
    torch.manual_seed(0)
    for trial in range(50):
        x = torch.arange(6.0).view(6, 1, 1, 1).expand(6, 2, 11, 13).clone()
        g = torch.Generator().manual_seed(trial)
        m = cutmix(x, one_hot(torch.arange(6), 6), alpha=1.0, generator=g)
        own = (m.x == x).all(dim=1).float().mean(dim=(1, 2))  # (6,)
        moved = m.index != torch.arange(6)
        torch.testing.assert_close(own[moved],
                                   torch.full((int(moved.sum()),), m.lam))
        torch.testing.assert_close(m.targets[moved].amax(1),
                                   torch.full((int(moved.sum()),),
                                              max(m.lam, 1 - m.lam)))


def test_augment_batch_keeps_labels_where_it_should():
    x = torch.randint(0, 256, (10, 28, 28)).float() / 255
    t = smooth_labels(torch.randint(0, 10, (10,)), 10, 0.1)
    g = torch.Generator().manual_seed(0)
    keeping = RegConfig(max_shift=2, max_rotation=10, max_scale=0.1,
                        cutout=8)
    y, targets = augment_batch(x, t, keeping, g)
    assert not torch.equal(y, x) and torch.equal(targets, t)
    for mixing in (RegConfig(mixup=0.4), RegConfig(cutmix=1.0)):
        y, targets = augment_batch(x, t, mixing, g)
        assert not torch.equal(targets, t)
        torch.testing.assert_close(targets.sum(1), torch.ones(10))


@pytest.mark.parametrize("eps", [0.0, 0.05, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("classes", [2, 10, 37])
def test_label_smoothing_equals_f_cross_entropy(eps, classes):
    torch.manual_seed(classes)
    logits = (3 * torch.randn(24, classes)).requires_grad_()
    labels = torch.randint(0, classes, (24,))
    ours = soft_cross_entropy(logits, smooth_labels(labels, classes, eps))
    theirs = F.cross_entropy(logits, labels, label_smoothing=eps)
    torch.testing.assert_close(ours, theirs, **TOL)
    g1, = torch.autograd.grad(ours, logits)
    g2, = torch.autograd.grad(theirs, logits)
    torch.testing.assert_close(g1, g2, **TOL)


def test_targets_check_their_input():
    with pytest.raises(TypeError, match="int64 labels"):
        one_hot(torch.tensor([1.0, 2.0]), 3)
    with pytest.raises(ValueError, match=r"smoothing must be in \[0, 1\]"):
        smooth_labels(torch.tensor([1]), 3, -0.1)
    with pytest.raises(ValueError, match=r"one shape \(B, K\)"):
        soft_cross_entropy(torch.randn(4, 3), torch.rand(4, 5))


# --------------------------------------------------------------------------
# Weight decay
# --------------------------------------------------------------------------


def train_steps(make, decay=None, steps=40, seed=0, state_at=None):
    """A linear model in two parameter groups, a changing lr; returns the
    flat parameters. decay(group, lr) is called before each step."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 3))
    groups = [{"params": list(model[0].parameters()), "lr_scale": 1.0},
              {"params": list(model[2].parameters()), "lr_scale": 0.5}]
    optimiser = make(groups)
    data = torch.Generator().manual_seed(seed + 1)
    for step in range(steps):
        for group in optimiser.param_groups:
            group["lr"] = 0.05 * group["lr_scale"] * (1 + math.cos(
                math.pi * step / steps)) / 2
        x = torch.randn(16, 10, generator=data)
        y = torch.randint(0, 3, (16,), generator=data)
        loss = F.cross_entropy(model(x), y)
        optimiser.zero_grad()
        loss.backward()
        if decay is not None:
            for group in optimiser.param_groups:
                decay(group["params"], group["lr"])
        optimiser.step()
        if state_at == step:  # save and reload mid-run
            saved = optimiser.state_dict()
            optimiser = make(groups)
            optimiser.load_state_dict(saved)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("wd", [0.01, 0.1, 0.5])
def test_l2_equals_decoupled_decay_under_sgd(wd):
    l2 = train_steps(lambda g: torch.optim.SGD(g, lr=0.05, weight_decay=wd))
    decoupled = train_steps(lambda g: torch.optim.SGD(g, lr=0.05),
                            lambda p, lr: decay_weights_(p, lr, wd))
    torch.testing.assert_close(decoupled, l2, **TOL)
    unscaled = train_steps(lambda g: torch.optim.SGD(g, lr=0.05),
                           lambda p, lr: decay_weights_(p, 0.05, wd))
    assert (unscaled - l2).abs().max() > 1e-4  # lr not scaled: differs


@pytest.mark.parametrize("wd", [0.01, 0.1, 0.5])
@pytest.mark.parametrize("state_at", [None, 17])
def test_adam_plus_decoupled_decay_equals_torch_adamw(wd, state_at):
    ours = train_steps(lambda g: Adam(g, lr=0.05),
                       lambda p, lr: decay_weights_(p, lr, wd),
                       state_at=state_at)
    theirs = train_steps(lambda g: torch.optim.AdamW(g, lr=0.05,
                                                     weight_decay=wd),
                         state_at=state_at)
    torch.testing.assert_close(ours, theirs, **TOL)
    l2 = train_steps(lambda g: Adam(g, lr=0.05, weight_decay=wd))
    assert (l2 - theirs).abs().max() > 1e-3  # Adam's L2 is not AdamW


def test_decay_weights_checks_and_skips():
    p = torch.ones(3)
    decay_weights_([p], 0.1, 0.0)
    assert torch.equal(p, torch.ones(3))
    decay_weights_([p], 0.1, 0.5)
    torch.testing.assert_close(p, torch.full((3,), 0.95))
    with pytest.raises(ValueError, match="weight_decay >= 0"):
        decay_weights_([p], 0.1, -1.0)


# --------------------------------------------------------------------------
# Early stopping, the training run, the record
# --------------------------------------------------------------------------


def test_early_stopping_counts_patience_and_restores_the_best():
    model = nn.Linear(2, 2)
    stopper = EarlyStopping(patience=2, min_delta=0.01)
    scores = [0.5, 0.6, 0.605, 0.59, 0.7]  # 0.605: not better by 0.01
    decisions = []
    for k, score in enumerate(scores):
        with torch.no_grad():
            model.weight.fill_(k)
        decisions.append(stopper.step(score, model))
    assert decisions == [False, False, False, True, False]
    assert stopper.best == 0.7 and stopper.best_step == 4
    stopper = EarlyStopping(patience=1)
    for k, score in enumerate([0.3, 0.9, 0.8]):
        with torch.no_grad():
            model.weight.fill_(k)
        stopper.step(score, model)
    stopper.restore(model)
    assert torch.equal(model.weight, torch.ones(2, 2))
    with pytest.raises(ValueError, match="patience >= 1"):
        EarlyStopping(patience=0)
    with pytest.raises(RuntimeError, match="no weights kept"):
        EarlyStopping().restore(model)


def fake_data(n=60, holdout=20, test=30):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n + holdout + test, 28, 28),
                           dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n + holdout + test,), generator=g)
    return ((images[:n], labels[:n]),
            (images[n:n + holdout], labels[n:n + holdout]),
            (images[n + holdout:], labels[n + holdout:]))


def test_fit_returns_curves_and_stops_early():
    config = RegConfig(epochs=3, batch_size=20, hidden=(32,), device="cpu",
                       dropconnect=0.2, max_shift=1.0, mixup=0.4,
                       label_smoothing=0.1, weight_decay=0.1)
    record = fit(config, fake_data())
    json.dumps(record)
    assert len(record["test_acc"]) == len(record["holdout_acc"]) == 3
    assert 0 <= record["final_test_acc"] <= 1
    stopped = fit(RegConfig(epochs=30, batch_size=20, hidden=(16,),
                            device="cpu", patience=1, lr=1e-5), fake_data())
    assert stopped["epochs_run"] < 30  # random labels: no progress


def test_reg_config_checks_its_fields():
    with pytest.raises(ValueError, match="mixup and cutmix are exclusive"):
        RegConfig(mixup=0.2, cutmix=1.0)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        RegConfig(dropout=1.0)
    with pytest.raises(ValueError, match="holdout_size >= 1"):
        RegConfig(patience=3, holdout_size=0)


def test_full_run_checks_its_arguments_before_training(monkeypatch):
    with pytest.raises(ValueError, match=r"unknown override.*\['epoch'\]"):
        full_run("cpu", epoch=3)
    with pytest.raises(ValueError, match="expected methods among"):
        full_run("cpu", methods="none, magic")
    monkeypatch.setattr(reg, "small_data", lambda config: fake_data())
    record = full_run("cpu", seeds=2, methods="none,cutout 10 px",
                      epochs=1, batch_size=30, hidden=(8,))
    json.dumps(record)
    assert list(record["runs"]) == ["none", "cutout 10 px"]
    assert record["seeds"] == [0, 1]
    assert not {"command", "torch", "date"} & set(record)


def test_the_recorded_full_run_covers_every_method_and_seed():
    record = load_results("regularization")
    assert record["command"].startswith("cave run regularization --full")
    assert record["methods"] == METHODS
    assert record["seeds"] == list(SEEDS)
    assert record["config"]["train_size"] == 1000
    for name in METHODS:
        runs = record["runs"][name]
        assert len(runs) == len(SEEDS)
        assert all(0.5 < r["final_test_acc"] <= 1 for r in runs)
