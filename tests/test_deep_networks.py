"""The deep-networks chapter: batch norm, dropout and Adam equal PyTorch's,
in float32, float64 and bfloat16."""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import cave.fundamentals.deep_networks as deep_networks
from cave.fundamentals.checkpoints import override_config
from cave.fundamentals.deep_networks import (MLP, Adam, BatchNorm1d, Dropout,
                                             MLPConfig, TrainConfig,
                                             evaluate, full_run,
                                             one_cycle_lr,
                                             random_shift, train)

TOL = dict(atol=1e-5, rtol=1e-5)  # float32, sums in a different order
# The same comparisons in each dtype a module can be converted to with
# .to(dtype). float64: sums in a different order, 2**29 times finer than
# float32. bfloat16: both sides compute in float32 and round the result to
# bfloat16 (8 significant bits), so a value lands on the same bfloat16
# number or a neighbour: two steps (2 * 2**-7 relative), and 2**-8 absolute
# for values near zero.
TOLS = {torch.float32: TOL,
        torch.float64: dict(atol=1e-12, rtol=1e-12),
        torch.bfloat16: dict(atol=2 ** -8, rtol=2 ** -6)}
# nn.BatchNorm1d's bfloat16 kernel is rougher: it rounds the batch mean and
# 1/std to bfloat16 (ours keeps them in float32), which moves each
# normalised value by up to about 2**-8 (|x_hat| + |mean| / std). So in
# bfloat16 batch norm is held to two steps at 1 (2**-6 absolute), and a
# parameter's gradient, a sum over `count` such values, to 2**-6 times
# sqrt(count), the size of a sum of count independent rounding errors.
BN_BF16 = dict(atol=2 ** -6, rtol=2 ** -6)
DTYPES = list(TOLS)


def pair(**kwargs):
    ours, theirs = BatchNorm1d(**kwargs), nn.BatchNorm1d(**kwargs)
    if ours.affine:  # non-trivial gamma and beta
        with torch.no_grad():
            ours.weight.uniform_(0.5, 1.5)
            ours.bias.uniform_(-1, 1)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def assert_same_state(ours, theirs, tol=TOL):
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    for key in a:  # assert_close checks the dtypes too
        torch.testing.assert_close(a[key], b[key], **tol)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 16), c=st.integers(1, 8),
       length=st.one_of(st.none(), st.integers(1, 5)),
       affine=st.booleans(), track=st.booleans(),
       momentum=st.sampled_from([0.1, 0.5, None]),
       dtype=st.sampled_from(DTYPES))
def test_batchnorm_equals_torch(n, c, length, affine, track, momentum,
                                dtype):
    shape = (n, c) if length is None else (n, c, length)
    # nn.BatchNorm1d's bfloat16 kernel rounds the batch mean and 1/std to
    # bfloat16 (ours keeps them in float32); with 2 to 7 values per
    # feature its batch statistics are too rough to agree to two steps
    # (test_batchnorm_bfloat16_is_closer_to_the_truth covers those)
    assume(dtype != torch.bfloat16 or n * (length or 1) >= 8)
    torch.manual_seed(n * 100 + c)
    ours, theirs = pair(num_features=c, affine=affine, momentum=momentum,
                        track_running_stats=track)
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    tol = BN_BF16 if dtype == torch.bfloat16 else TOLS[dtype]
    count = n * (length or 1)  # values per feature
    param_tol = (dict(atol=2 ** -6 * count ** 0.5, rtol=2 ** -6)
                 if dtype == torch.bfloat16 else tol)
    for _ in range(4):  # several training steps: running stats accumulate
        x = (torch.randn(shape) * 3 + 1).to(dtype)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = ours(x1), theirs(x2)
        torch.testing.assert_close(y1, y2, **tol)
        w = torch.randn(shape).to(dtype)
        (y1 * w).sum().backward()
        (y2 * w).sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad, **tol)
        if affine:
            torch.testing.assert_close(ours.weight.grad, theirs.weight.grad,
                                       **param_tol)
            torch.testing.assert_close(ours.bias.grad, theirs.bias.grad,
                                       **param_tol)
    assert_same_state(ours, theirs, tol)
    ours.eval(), theirs.eval()
    x = torch.randn(shape).to(dtype)
    torch.testing.assert_close(ours(x), theirs(x), **tol)
    assert_same_state(ours, theirs, tol)  # evaluation changes no buffer


def test_batchnorm_float64_computes_in_float64():
    # far from zero: float32 statistics would be off by about 1e-3 here
    x = 1e4 + torch.randn(64, 3, dtype=torch.float64)  # (N, C)
    ours, theirs = BatchNorm1d(3).double(), nn.BatchNorm1d(3).double()
    far = dict(atol=1e-9, rtol=1e-9)  # x - mean loses 4 of float64's 16
    torch.testing.assert_close(ours(x), theirs(x), **far)  # digits
    torch.testing.assert_close(ours.running_mean, theirs.running_mean,
                               **far)
    assert ours.running_var.dtype == torch.float64


def test_batchnorm_bfloat16_is_closer_to_the_truth():
    # two values per feature: the case nn.BatchNorm1d's bfloat16 kernel
    # rounds worst, because it keeps the batch mean and 1/std in bfloat16
    x = torch.tensor([[3.765625], [2.59375]], dtype=torch.bfloat16)
    z = x.double()
    truth = (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5)
    ours = BatchNorm1d(1, affine=False).bfloat16()(x)
    theirs = nn.BatchNorm1d(1, affine=False).bfloat16()(x)
    err_ours = (ours.double() - truth).abs().max().item()
    err_theirs = (theirs.double() - truth).abs().max().item()
    assert err_ours <= 2 ** -8 < err_theirs  # ours: one rounding at most
    torch.testing.assert_close(ours, theirs, atol=2 ** -5, rtol=0)


def test_batchnorm_running_stats_use_unbiased_variance():
    bn = BatchNorm1d(1, momentum=1.0)  # running stats = last batch's
    x = torch.tensor([[1.0], [2.0], [3.0], [6.0]])  # (4, 1)
    bn(x)
    torch.testing.assert_close(bn.running_mean, torch.tensor([3.0]))
    torch.testing.assert_close(bn.running_var, x.var(0))  # unbiased: 14/3
    assert bn.num_batches_tracked.item() == 1


def test_batchnorm_eval_uses_running_stats():
    bn = BatchNorm1d(3, affine=False)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([1.0, 2.0, 3.0]))
        bn.running_var.copy_(torch.tensor([4.0, 9.0, 16.0]))
    bn.eval()
    x = torch.tensor([[1.0, 5.0, 7.0]])  # one example is fine in eval
    want = (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(bn(x), want)


def test_batchnorm_state_dict_loads_into_torch():
    ours = BatchNorm1d(5)
    ours(torch.randn(8, 5))
    theirs = nn.BatchNorm1d(5)
    theirs.load_state_dict(ours.state_dict())  # strict: same keys
    assert_same_state(ours, theirs)


def test_batchnorm_under_bf16_autocast_keeps_dtype():
    bn = BatchNorm1d(4)
    x = torch.randn(16, 4, dtype=torch.bfloat16)
    y = bn(x)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    assert bn.running_mean.dtype == torch.float32


@pytest.mark.parametrize("shape", [(8, 4, 2, 2), (8,), (8, 5), (8, 5, 3)])
def test_batchnorm_shape_errors_name_expected_and_actual(shape):
    bn = BatchNorm1d(4)
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 4\)"
                       r".*got " + str(shape).replace("(", r"\(")
                       .replace(")", r"\)")):
        bn(torch.randn(shape))


def test_batchnorm_one_example_in_training_is_an_error():
    with pytest.raises(ValueError, match="more than 1 value"):
        BatchNorm1d(3)(torch.randn(1, 3))


def test_dropout_statistics_match_torch():
    torch.manual_seed(0)
    x = torch.full((500, 1000), 2.0)
    for p in [0.1, 0.5, 0.8]:
        ours, theirs = Dropout(p)(x), nn.Dropout(p)(x)
        for y in (ours, theirs):
            # 500,000 draws: the zero fraction's std is <= 0.0008
            assert abs((y == 0).float().mean().item() - p) < 0.005
            assert abs(y.mean().item() - 2.0) < 0.03  # E[y] = x
        torch.testing.assert_close(ours[ours != 0].unique(),
                                   torch.tensor([2.0 / (1 - p)]))
        torch.testing.assert_close(theirs[theirs != 0].unique(),
                                   torch.tensor([2.0 / (1 - p)]))


def test_dropout_eval_identity_and_edges():
    x = torch.randn(64, 32)
    assert torch.equal(Dropout(0.7).eval()(x), x)
    assert torch.equal(Dropout(0.0)(x), x)
    assert torch.equal(Dropout(1.0)(x), torch.zeros_like(x))
    for p in [-0.1, 1.5]:
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            Dropout(p)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_matches_torch_in_every_dtype(dtype):
    torch.manual_seed(0)
    x = torch.full((500, 1000), 3.0, dtype=dtype)
    for p in [0.1, 0.3]:
        ours, theirs = Dropout(p)(x), nn.Dropout(p)(x)
        assert ours.dtype == theirs.dtype == dtype
        assert abs((ours == 0).float().mean().item() - p) < 0.005
        # survivors are the very numbers nn.Dropout gives: x times
        # 1/(1-p) rounded to x's dtype, not x / (1-p) rounded once
        assert torch.equal(ours[ours != 0].unique(),
                           theirs[theirs != 0].unique())


def test_dropout_gradient_is_the_mask():
    torch.manual_seed(0)
    x = torch.randn(100, 50, requires_grad=True)
    y = Dropout(0.5)(x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, (y != 0).float() * 2.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.5, 0.9)])
def test_adam_equals_torch(weight_decay, betas, dtype):
    # the same operations in the same order: equal in every dtype (they
    # agree to the last bit today; the tolerance is the dtype's)
    torch.manual_seed(0)
    tol = TOLS[dtype]
    shapes = [(3,), (4, 5), (2, 3, 4), ()]
    ps = [torch.randn(s).to(dtype) for s in shapes]
    ours = [p.clone().requires_grad_() for p in ps]
    theirs = [p.clone().requires_grad_() for p in ps]
    kw = dict(lr=1e-2, betas=betas, eps=1e-8, weight_decay=weight_decay)
    opt1, opt2 = Adam(ours, **kw), torch.optim.Adam(theirs, **kw)
    for step in range(25):
        grads = [(torch.randn(s) * (step + 1)).to(dtype) for s in shapes]
        for params, opt in [(ours, opt1), (theirs, opt2)]:
            opt.zero_grad()
            sum((p * g).sum() + (p ** 2).sum() for p, g
                in zip(params, grads)).backward()
            opt.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, **tol)
    for a, b in zip(ours, theirs):
        s1, s2 = opt1.state[a], opt2.state[b]
        torch.testing.assert_close(s1["exp_avg"], s2["exp_avg"], **tol)
        torch.testing.assert_close(s1["exp_avg_sq"], s2["exp_avg_sq"],
                                   **tol)
        assert s1["step"] == int(s2["step"]) == 25


def test_adam_first_step_is_lr_times_sign():
    # bias correction: the first step moves every weight by lr * sign(g)
    p = torch.zeros(4, requires_grad=True)
    opt = Adam([p], lr=0.1, eps=0.0)
    p.grad = torch.tensor([3.0, -0.001, 50.0, -2.0])
    opt.step()
    torch.testing.assert_close(p.detach(),
                               torch.tensor([-0.1, 0.1, -0.1, 0.1]))


def test_adam_skips_params_without_grad_and_param_groups():
    a = torch.ones(2, requires_grad=True)
    b = torch.ones(2, requires_grad=True)
    opt = Adam([{"params": [a]}, {"params": [b], "lr": 0.5}], lr=0.1)
    b.grad = torch.ones(2)
    opt.step()
    assert torch.equal(a.detach(), torch.ones(2))  # no grad: untouched
    torch.testing.assert_close(b.detach(), torch.full((2,), 0.5))


def test_adam_rejects_bad_hyperparameters():
    p = [torch.zeros(1, requires_grad=True)]
    with pytest.raises(ValueError, match="learning rate"):
        Adam(p, lr=-1)
    with pytest.raises(ValueError, match="betas"):
        Adam(p, betas=(0.9, 1.0))


def test_mlp_shapes_and_input_forms():
    torch.manual_seed(0)
    model = MLP(MLPConfig(hidden=(32, 16))).eval()
    x = torch.rand(5, 28, 28)
    assert model(x).shape == (5, 10)
    torch.testing.assert_close(model(x), model(x.reshape(5, 784)))


def test_mlp_without_batch_norm_or_dropout_has_no_such_layers():
    model = MLP(MLPConfig(hidden=(8,), batch_norm=False, dropout=0.0))
    kinds = [type(m) for m in model.layers]
    assert kinds == [nn.Linear, nn.ReLU, nn.Linear]
    assert model.layers[0].bias is not None  # no batch norm: keep the bias


@pytest.mark.parametrize("init, std", [("kaiming", (2 / 784) ** 0.5),
                                       ("xavier", (2 / (784 + 512)) ** 0.5),
                                       ("naive", 1.0)])
def test_mlp_init_schemes(init, std):
    torch.manual_seed(0)
    model = MLP(MLPConfig(hidden=(512,), init=init))
    w = model.layers[0].weight  # (512, 784)
    assert abs(w.std().item() / std - 1) < 0.02


def test_mlp_errors():
    model = MLP(MLPConfig(hidden=(8,)))
    with pytest.raises(TypeError, match="float pixels.*uint8"):
        model(torch.zeros(2, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(B, 784\).*\(2, 27, 27\)"):
        model(torch.zeros(2, 27, 27))
    with pytest.raises(ValueError, match="init"):
        MLP(MLPConfig(init="orthogonal"))
    with pytest.raises(ValueError, match="activation"):
        MLP(MLPConfig(activation="swish"))


def test_one_cycle_lr_shape():
    lrs = [one_cycle_lr(s, 100, 1.0, warmup=0.2) for s in range(100)]
    assert lrs.index(max(lrs)) == 19 and max(lrs) == 1.0
    assert all(a < b for a, b in zip(lrs[:19], lrs[1:20]))  # warm-up
    assert all(a >= b for a, b in zip(lrs[19:], lrs[20:]))  # cosine down
    assert lrs[-1] < 0.001


def test_random_shift_moves_whole_images():
    torch.manual_seed(0)
    x = torch.zeros(64, 28, 28)
    x[:, 10:18, 10:18] = 1.0  # a square well inside the frame
    y = random_shift(x, 2)
    assert y.shape == x.shape
    assert torch.equal(y.sum((1, 2)), x.sum((1, 2)))  # nothing cut off
    rows = y.sum(2).argmax(1) - 10  # (64,) vertical shift of each image
    assert set(rows.tolist()) <= set(range(-2, 3)) and len(set(rows)) > 1
    assert torch.equal(random_shift(x, 0), x)


def test_short_training_run_learns():
    # 1,000 digits, 2 small epochs: far above the 10 % of chance
    g = torch.Generator().manual_seed(0)
    centres = torch.rand(10, 28, 28, generator=g)
    labels = torch.randint(0, 10, (1200,), generator=g)
    noise = torch.rand(1200, 28, 28, generator=g)
    images = ((0.6 * centres[labels] + 0.4 * noise) * 255).to(torch.uint8)
    torch.manual_seed(0)
    model = MLP(MLPConfig(hidden=(64,)))
    before = evaluate(model, images[1000:], labels[1000:])[1]
    history = train(model, (images[:1000], labels[:1000]),
                    (images[1000:], labels[1000:]),
                    TrainConfig(epochs=2, batch_size=64, bf16=False,
                                max_shift=1))
    assert history.best_val_acc > 0.9 > before + 0.3
    assert len(history.step_loss) == 2 * 16 and len(history.val_acc) == 2
    assert history.step_loss[-1] < history.step_loss[0]
    assert evaluate(model, images[1000:], labels[1000:])[1] == pytest.approx(
        history.best_val_acc)  # the kept weights are the best epoch's


def test_mnist_training_beats_chance():
    from cave.fundamentals.data import mnist_split

    (tx, ty), (vx, vy) = mnist_split(seed=0)
    torch.manual_seed(0)
    model = MLP(MLPConfig(hidden=(256,)))
    history = train(model, (tx[:4000], ty[:4000]), (vx, vy),
                    TrainConfig(epochs=2, max_shift=0))
    assert history.best_val_acc > 0.9
    assert history.best_epoch in (0, 1)


def test_evaluate_restores_each_layers_own_mode():
    torch.manual_seed(0)
    model = MLP(MLPConfig(hidden=(16,)))
    model.layers[1].eval()  # one layer already in evaluation mode
    modes = [m.training for m in model.modules()]
    images = torch.randint(0, 256, (10, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (10,))
    evaluate(model, images, labels)
    assert [m.training for m in model.modules()] == modes

    def broken(x):
        assert not model.training  # evaluation inside
        raise RuntimeError("a forward that fails")

    model.forward = broken
    with pytest.raises(RuntimeError, match="fails"):
        evaluate(model, images, labels)
    assert [m.training for m in model.modules()] == modes  # even then


def test_train_config_checks_its_fields():
    for bad in [dict(epochs=0), dict(batch_size=0), dict(lr=0.0),
                dict(warmup=1.5), dict(label_smoothing=1.0),
                dict(max_shift=-1)]:
        with pytest.raises(ValueError, match=str(list(bad.values())[0])):
            TrainConfig(**bad)


def test_override_config_names_the_fields_and_types():
    config = override_config(TrainConfig(), {"epochs": 3, "lr": 1})
    assert config.epochs == 3 and config.lr == 1 and TrainConfig().epochs == 15
    with pytest.raises(ValueError, match=r"\['epoch'\].*'batch_size'"):
        override_config(TrainConfig(), {"epoch": 3})
    with pytest.raises(TypeError, match="epochs='3': expected a int"):
        override_config(TrainConfig(), {"epochs": "3"})
    with pytest.raises(TypeError, match="bf16=1: expected a bool"):
        override_config(TrainConfig(), {"bf16": 1})


def test_full_run_returns_a_json_record(monkeypatch):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (160, 28, 28), dtype=torch.uint8,
                           generator=g)
    labels = torch.randint(0, 10, (160,), generator=g)
    monkeypatch.setattr(deep_networks, "mnist_split", lambda seed=0: (
        (images[:128], labels[:128]), (images[128:], labels[128:])))
    record = full_run("cpu", epochs=1, batch_size=64, bf16=False)
    json.dumps(record)  # serialisable as it is
    assert record["device"] == "cpu" and record["train"]["epochs"] == 1
    assert len(record["history"]["val_acc"]) == 1
    assert record["best_epoch"] == 1
    assert not {"command", "torch", "date", "threads", "cpus"} & set(record)
    wrong = [k for k, _ in record["mistakes"]]
    assert len(wrong) == round((1 - record["best_val_acc"]) * 32)
    with pytest.raises(ValueError, match="unknown override"):
        full_run("cpu", epoch=1)
    with pytest.raises(ValueError, match=r"part must be one of "
                       r"\('recipe', 'eras'\), got 'ladder'"):
        full_run("cpu", part="ladder")


def test_train_config_checks_optimizer_and_schedule():
    with pytest.raises(ValueError, match="optimizer 'adam' or 'sgd'.*'lbfgs'"):
        TrainConfig(optimizer="lbfgs")
    with pytest.raises(ValueError, match="'one_cycle' or 'constant'.*'step'"):
        TrainConfig(schedule="step")


def test_sgd_at_a_constant_rate_is_torchs_sgd_step_for_step():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 28, 28), dtype=torch.uint8,
                           generator=g)
    labels = torch.randint(0, 10, (64,), generator=g)
    config = TrainConfig(epochs=1, batch_size=64, max_shift=0, bf16=False,
                         optimizer="sgd", schedule="constant", lr=0.1)
    torch.manual_seed(0)
    model = MLP(MLPConfig(hidden=(16,), batch_norm=False, dropout=0.0))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    history = train(model, (images, labels), (images, labels), config)
    assert history.lr == [0.1]
    # the same single step by hand: p - lr * grad of the same loss
    reference = MLP(MLPConfig(hidden=(16,), batch_norm=False, dropout=0.0))
    reference.load_state_dict(start)
    x = images.float() / 255
    F.cross_entropy(reference(x), labels).backward()
    with torch.no_grad():
        for p in reference.parameters():
            p -= 0.1 * p.grad
    for a, b in zip(model.state_dict().values(),
                    reference.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_the_eras_ladder_adds_one_ingredient_per_rung():
    rungs = deep_networks.era_configs(TrainConfig())
    assert len(rungs) == len(deep_networks.ERAS) == 5
    first, last = rungs[0], rungs[-1]
    assert first[1].activation == "sigmoid" and not first[1].batch_norm
    assert first[2].optimizer == "sgd" and first[2].schedule == "constant"
    assert first[1].dropout == 0.0 and first[2].max_shift == 0
    # the last rung is the chapter's recipe
    assert last[1] == MLPConfig() and last[2] == TrainConfig()


def test_recorded_full_run():
    from cave.fundamentals.data import load_results
    record = load_results("deep_networks")
    recipe, eras = record["recipe"], record["eras"]
    assert recipe["best_val_acc"] >= 0.97
    assert recipe["train"] == {**TrainConfig().__dict__, "device": None}
    assert len(recipe["mistakes"]) == round(
        (1 - recipe["best_val_acc"]) * 2000)
    names = [r["name"] for r in eras["rungs"]]
    assert names == [name for name, _, _ in deep_networks.ERAS]
    # what the chapter's prose reads in the ladder
    sigmoid, relu, adam, bn, recipe_rung = eras["rungs"]
    acc = [r["best_val_acc"] for r in eras["rungs"]]
    assert 0 < relu["best_val_acc"] - sigmoid["best_val_acc"] < 0.01
    assert sigmoid["lr"] > relu["lr"] and relu["tried"][str(sigmoid["lr"])] \
        < 0.2  # the sigmoid's rate makes the ReLU network diverge
    assert max(sigmoid["tried"].values()) == sigmoid["best_val_acc"] != \
        sigmoid["tried"][str(max(deep_networks.SGD_RATES))]  # not at the edge
    assert adam["best_val_acc"] - relu["best_val_acc"] > 0.005
    assert bn["best_val_acc"] < adam["best_val_acc"]
    assert bn["history"]["train_loss"][2] < adam["history"]["train_loss"][2]
    assert recipe_rung["best_val_acc"] == max(acc)
