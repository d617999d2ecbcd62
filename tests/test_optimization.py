"""The optimisation chapter: every optimiser equals its reference over
many steps (parameter groups, weight decay, a state_dict saved and loaded
half-way), every schedule equals torch.optim.lr_scheduler's, the loss
scaler takes GradScaler's decisions, and accumulation equals the large
batch."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from lion_pytorch import Lion as ReferenceLion
from torch import nn

from cave.fundamentals.data import load_results
from cave.techniques.optimization import (
    FULL_RUN_PARTS, RACE, SGD, Adam, AdamW, Lion, LossScaler, Muon,
    RaceConfig, Scheduler, accumulate, constant, cosine, full_run, linear,
    newton_schulz, one_cycle, sequential, step_decay, warmup_cosine)

lrs = torch.optim.lr_scheduler
# The optimisers run the same operations in the same order as their
# references, so every float32 weight agrees to the last bit; EXACT says
# so. Schedules: PyTorch computes most rates recursively (each from the
# previous one), we in closed form; float64 rounding over 200 steps stays
# far below 1e-12 of the base rate.
EXACT = dict(atol=0, rtol=0)
SCHEDULE_TOL = dict(atol=1e-12, rtol=1e-12)


pytestmark = pytest.mark.usefixtures("one_thread")


def make_net(seed, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(7, 12), nn.Tanh(), nn.Linear(12, 12),
                         nn.Tanh(), nn.Linear(12, 4)).to(dtype)


def groups(net, second):
    """Three groups: the first layer's weight with the defaults, the
    other matrices with `second` overriding them, the biases alone."""
    return [{"params": [net[0].weight]},
            {"params": [net[2].weight, net[4].weight], **second},
            {"params": [net[0].bias, net[2].bias, net[4].bias],
             "lr": 2e-3}]


def race(make_ours, make_theirs, steps=45, seed=0, second=None,
         dtype=torch.float32, matrices_only=False):
    """Train twin networks, ours and theirs, on the same batches; save
    each optimiser's state_dict at steps // 3, build a fresh optimiser and
    load it. Returns both networks' parameters."""
    nets = [make_net(seed, dtype), make_net(seed, dtype)]
    second = second or {}

    def param_groups(net):
        g = groups(net, second)
        return g[:2] if matrices_only else g

    makers = [make_ours, make_theirs]
    opts = [make(param_groups(n)) for make, n in zip(makers, nets)]
    gen = torch.Generator().manual_seed(seed + 1)
    for step in range(steps):
        x = torch.randn(32, 7, generator=gen, dtype=dtype)
        y = torch.randint(0, 4, (32,), generator=gen)
        for net, opt in zip(nets, opts):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
        if step == steps // 3:
            states = [json_round_trip(opt.state_dict()) for opt in opts]
            opts = [make(param_groups(n)) for make, n in zip(makers, nets)]
            for opt, state in zip(opts, states):
                opt.load_state_dict(state)
    return [list(n.parameters()) for n in nets]


def json_round_trip(state):
    """A state_dict whose hyperparameters went through a file and back
    (tuples become lists), tensors kept: what a checkpoint restores."""
    tensors = {}

    def encode(value):
        if isinstance(value, torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = value.clone()
            return {"tensor": key}
        if isinstance(value, dict):
            return {str(k): encode(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [encode(v) for v in value]
        return value

    def decode(value):
        if isinstance(value, dict) and set(value) == {"tensor"}:
            return tensors[value["tensor"]]
        if isinstance(value, dict):
            return {k: decode(v) for k, v in value.items()}
        if isinstance(value, list):
            return [decode(v) for v in value]
        return value

    restored = decode(json.loads(json.dumps(encode(state))))
    restored["state"] = {int(k): v for k, v in restored["state"].items()}
    for group in restored["param_groups"]:
        for key in ("betas", "ns_coefficients"):
            if key in group:
                group[key] = tuple(group[key])
    return restored


def assert_twins(params):
    ours, theirs = params
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **EXACT)
    # and the run moved the weights: the comparison is not of two starts
    assert any(not torch.equal(a, b) for a, b in
               zip(ours, make_net(0, ours[0].dtype).parameters()))


# --------------------------------------------------------------------------
# optimisers
# --------------------------------------------------------------------------

SGD_CASES = [
    dict(lr=0.1),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.01),
    dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.05),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options", SGD_CASES)
def test_sgd_equals_torch(options, dtype):
    assert_twins(race(lambda g: SGD(g, **options),
                      lambda g: torch.optim.SGD(g, **options),
                      second=dict(momentum=0.5, weight_decay=0.1)
                      if options.get("momentum") else dict(lr=0.2),
                      dtype=dtype))


ADAM_CASES = [
    dict(),
    dict(lr=3e-3, weight_decay=0.05),
    dict(lr=3e-3, amsgrad=True),
    dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1,
         amsgrad=True),
]


@pytest.mark.parametrize("ours, theirs", [(Adam, torch.optim.Adam),
                                          (AdamW, torch.optim.AdamW)])
@pytest.mark.parametrize("options", ADAM_CASES)
def test_adam_and_adamw_equal_torch(ours, theirs, options):
    second = dict(betas=(0.5, 0.9), weight_decay=0.2)
    assert_twins(race(lambda g: ours(g, **options),
                      lambda g: theirs(g, **options), second=second))


def test_adam_equals_torch_in_float64():
    assert_twins(race(lambda g: Adam(g, lr=1e-2, amsgrad=True),
                      lambda g: torch.optim.Adam(g, lr=1e-2, amsgrad=True),
                      dtype=torch.float64))


def test_adamw_default_decay_is_torchs():
    w = nn.Parameter(torch.ones(2))
    assert AdamW([w]).defaults["weight_decay"] == \
        torch.optim.AdamW([w]).defaults["weight_decay"] == 1e-2


@pytest.mark.parametrize("options", [
    dict(lr=1e-3),
    dict(lr=3e-4, weight_decay=0.5),
    dict(lr=1e-3, betas=(0.95, 0.98), weight_decay=0.1),
])
def test_lion_equals_lion_pytorch(options):
    second = dict(betas=(0.8, 0.9), weight_decay=1.0)
    assert_twins(race(lambda g: Lion(g, **options),
                      lambda g: ReferenceLion(g, **options), second=second,
                      steps=60))


@pytest.mark.parametrize("options", [
    dict(lr=0.02),
    dict(lr=0.02, nesterov=False, weight_decay=0.0),
    dict(lr=0.01, momentum=0.9, adjust_lr_fn="match_rms_adamw"),
    dict(lr=0.05, ns_steps=3, weight_decay=0.05, adjust_lr_fn="original"),
    dict(lr=0.02, ns_coefficients=(2.0, -1.5, 0.5), eps=1e-5),
])
def test_muon_equals_torch(options):
    second = dict(lr=0.01, momentum=0.8, weight_decay=0.2)
    assert_twins(race(lambda g: Muon(g, **options),
                      lambda g: torch.optim.Muon(g, **options),
                      second=second, matrices_only=True))


@pytest.mark.parametrize("shape", [(8, 8), (16, 5), (5, 16)])
def test_newton_schulz_equals_torchs_and_orthogonalises(shape):
    from torch.optim._muon import _zeropower_via_newtonschulz

    torch.manual_seed(0)
    G = torch.randn(shape)
    ours = newton_schulz(G)
    torch.testing.assert_close(
        ours, _zeropower_via_newtonschulz(G, (3.4445, -4.7750, 2.0315), 5,
                                          1e-7), **EXACT)
    # singular values pushed into the quintic's band around 1
    s = torch.linalg.svdvals(ours.float())
    assert s.min() > 0.5 and s.max() < 1.3, s
    # the singular vectors are G's: U^T O V is nearly diagonal
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    inner = U.T @ ours.float() @ Vh.T
    off = inner - torch.diag(torch.diagonal(inner))
    assert off.abs().max() < 0.1


def test_optimisers_skip_parameters_without_gradients():
    for make in (lambda p: SGD(p, lr=0.1, momentum=0.9),
                 lambda p: Adam(p), lambda p: AdamW(p), lambda p: Lion(p),
                 lambda p: Muon(p)):
        a, b = nn.Parameter(torch.ones(3, 3)), nn.Parameter(torch.ones(3, 3))
        opt = make([a, b])
        a.grad = torch.ones(3, 3)
        opt.step()
        assert torch.equal(b, torch.ones(3, 3)) and b not in opt.state
        assert not torch.equal(a, torch.ones(3, 3))


def test_closure_returns_the_loss():
    w = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = Adam([w], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = w.square().sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 5.0
    assert w.grad is not None


@pytest.mark.parametrize("make, message", [
    (lambda p: SGD(p, lr=-1), "lr must be >= 0.0, got -1"),
    (lambda p: SGD(p, lr=0.1, nesterov=True),
     "Nesterov momentum needs momentum > 0 and dampening 0"),
    (lambda p: Adam(p, betas=(0.9, 1.0)), r"betas\[1\] must be in \[0.0, "
     r"1.0\), got 1.0"),
    (lambda p: AdamW(p, weight_decay=-0.1), "weight_decay must be >= 0"),
    (lambda p: Lion(p, betas=(1.5, 0.99)), r"betas\[0\] must be in"),
    (lambda p: Muon(p, adjust_lr_fn="rms"), "adjust_lr_fn must be None, "
     "'original' or 'match_rms_adamw', got 'rms'"),
])
def test_bad_hyperparameters_are_named(make, message):
    with pytest.raises(ValueError, match=message):
        make([nn.Parameter(torch.ones(2, 2))])


def test_muon_refuses_what_is_not_a_matrix():
    with pytest.raises(ValueError, match=r"Muon updates matrices only, got "
                       r"a parameter of shape \(4,\): give it to AdamW"):
        Muon([nn.Parameter(torch.ones(4))])
    with pytest.raises(ValueError, match=r"newton_schulz expects a matrix "
                       r"\(2 dimensions\), got shape \(2, 3, 4\)"):
        newton_schulz(torch.ones(2, 3, 4))


# --------------------------------------------------------------------------
# schedules
# --------------------------------------------------------------------------

def rates(make_scheduler, steps, lr=0.1):
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler, seen = make_scheduler(optimizer), []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    seen.append(optimizer.param_groups[0]["lr"])  # after the last step too
    return torch.tensor(seen, dtype=torch.float64)


def assert_same_rates(ours, make_theirs, steps, lr=0.1):
    theirs = rates(make_theirs, steps, lr)
    torch.testing.assert_close(rates(lambda o: Scheduler(o, ours), steps,
                                     lr), theirs, **SCHEDULE_TOL)
    assert theirs.unique().numel() > 1 or steps < 2  # the rate did change


@pytest.mark.parametrize("step_size, gamma", [(1, 0.9), (7, 0.5), (30, 0.1)])
def test_step_decay_equals_steplr(step_size, gamma):
    assert_same_rates(step_decay(step_size, gamma), lambda o: lrs.StepLR(
        o, step_size=step_size, gamma=gamma), 100)


@pytest.mark.parametrize("start, end, total", [(1.0, 0.0, 50),
                                               (0.1, 1.0, 10),
                                               (0.5, 1.0, 1)])
def test_linear_equals_linearlr(start, end, total):
    assert_same_rates(linear(start, end, total), lambda o: lrs.LinearLR(
        o, start_factor=start, end_factor=end, total_iters=total), 80)


@pytest.mark.parametrize("total, final", [(100, 0.0), (37, 0.1), (5, 0.5)])
def test_cosine_equals_cosineannealinglr(total, final):
    assert_same_rates(cosine(total, final), lambda o: lrs.CosineAnnealingLR(
        o, T_max=total, eta_min=final * 0.1), total)


@pytest.mark.parametrize("total, pct, div, final_div", [
    (100, 0.3, 25.0, 1e4), (50, 0.1, 10.0, 100.0), (7, 0.5, 5.0, 1e3)])
def test_one_cycle_equals_onecyclelr(total, pct, div, final_div):
    assert_same_rates(one_cycle(total, pct, div, final_div),
                      lambda o: lrs.OneCycleLR(
                          o, max_lr=0.1, total_steps=total, pct_start=pct,
                          div_factor=div, final_div_factor=final_div,
                          cycle_momentum=False), total)


def test_one_cycle_refuses_steps_past_its_end_like_torch():
    with pytest.raises(ValueError, match="one_cycle covers steps 0..10, "
                       "got 11"):
        one_cycle(10)(11)


@pytest.mark.parametrize("warmup, total, final", [(10, 100, 0.0),
                                                  (1, 30, 0.1),
                                                  (25, 60, 0.05)])
def test_warmup_cosine_equals_sequentiallr(warmup, total, final):
    def theirs(o):
        first = (lrs.LinearLR(o, 1 / warmup, 1.0, total_iters=warmup - 1)
                 if warmup > 1 else lrs.ConstantLR(o, 1.0, total_iters=0))
        return lrs.SequentialLR(o, [first, lrs.CosineAnnealingLR(
            o, T_max=total - warmup, eta_min=final * 0.1)], [warmup])

    assert_same_rates(warmup_cosine(warmup, total, final), theirs, total)


def test_three_schedules_in_sequence_equal_sequentiallr():
    ours = sequential([linear(0.25, 1.0, 4), constant(1.0),
                       step_decay(10, 0.3)], [5, 20])
    assert_same_rates(ours, lambda o: lrs.SequentialLR(o, [
        lrs.LinearLR(o, 0.25, 1.0, total_iters=4),
        lrs.ConstantLR(o, 1.0, total_iters=0),
        lrs.StepLR(o, 10, 0.3)], milestones=[5, 20]), 60)


def test_schedules_equal_the_earlier_chapters():
    from cave.fundamentals.deep_networks import one_cycle_lr
    from cave.transformers.llama_training import TrainConfig, lr_at

    config = TrainConfig(max_steps=300, warmup_steps=20)
    ours = warmup_cosine(20, 300, config.min_lr / config.lr)
    for t in range(300):
        assert math.isclose(lr_at(t, config), config.lr * ours(t),
                            rel_tol=1e-12, abs_tol=1e-15)
    ours = warmup_cosine(int(0.2 * 500), 500)
    for t in range(500):
        assert math.isclose(one_cycle_lr(t, 500, 3e-3), 3e-3 * ours(t),
                            rel_tol=1e-12, abs_tol=1e-15)


def test_scheduler_state_dict_round_trip():
    def make():
        opt = torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))]},
                               {"params": [nn.Parameter(torch.zeros(1))],
                                "lr": 0.5}], lr=0.1)
        return opt, Scheduler(opt, cosine(50))

    opt, scheduler = make()
    for _ in range(17):
        scheduler.step()
    state = json.loads(json.dumps(scheduler.state_dict()))
    opt2, scheduler2 = make()
    scheduler2.load_state_dict(state)
    for _ in range(9):
        scheduler.step(), scheduler2.step()
    assert scheduler.get_last_lr() == scheduler2.get_last_lr()
    assert scheduler2.get_last_lr()[1] == pytest.approx(0.5 * cosine(50)(26))


@pytest.mark.parametrize("make, message", [
    (lambda: step_decay(0), "step_size must be >= 1, got 0"),
    (lambda: linear(1.0, 0.0, 0), "total must be >= 1 step, got 0"),
    (lambda: cosine(0), "total must be >= 1 step, got 0"),
    (lambda: one_cycle(10, pct_start=1.0), "expected total >= 2 and "
     r"pct_start in \(0, 1\), got total=10, pct_start=1.0"),
    (lambda: sequential([constant(), constant()], [3, 5]),
     r"expected 1 increasing milestones for 2 schedules, got \[3, 5\]"),
    (lambda: warmup_cosine(10, 10), "expected 1 <= warmup < total, got "
     "warmup=10, total=10"),
])
def test_bad_schedules_are_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# --------------------------------------------------------------------------
# gradient accumulation
# --------------------------------------------------------------------------

def token_batch(lengths, vocab=9, T=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (len(lengths), T), generator=g)
    y = torch.randint(0, vocab, (len(lengths), T), generator=g)
    y[torch.arange(T) >= torch.tensor(lengths)[:, None]] = -100
    return x, y


def grads_of(model, fill):
    model.zero_grad()
    result = fill()
    return result, torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("lengths, split", [
    ([10, 1, 3, 10, 5, 2, 8, 4], 2),  # varying token counts
    ([10, 1, 3, 10, 5, 2, 8, 4], 3),  # and micro-batches of 3, 3, 2
    ([6] * 8, 4),  # equal counts
    ([0, 0, 7, 0], 1),  # micro-batches with no token at all
])
def test_accumulation_equals_the_large_batch(lengths, split):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(9, 8), nn.Linear(8, 9)).double()
    x, y = token_batch(lengths)
    whole_loss, whole = grads_of(model, lambda: F.cross_entropy(
        model(x).flatten(0, 1), y.flatten(), ignore_index=-100).backward())
    micro = list(zip(x.split(split), y.split(split)))
    loss, ours = grads_of(model, lambda: accumulate(model, micro))
    # float64: sums in another grouping agree to ~1e-16 relative
    torch.testing.assert_close(ours, whole, atol=1e-12, rtol=1e-12)
    expected = F.cross_entropy(model(x).flatten(0, 1), y.flatten(),
                               ignore_index=-100).item()
    assert loss == pytest.approx(expected, rel=1e-12)


def test_the_naive_mean_of_means_is_the_trap():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(9, 8), nn.Linear(8, 9)).double()
    x, y = token_batch([10, 1, 3, 10, 5, 2, 8, 4])
    _, whole = grads_of(model, lambda: F.cross_entropy(
        model(x).flatten(0, 1), y.flatten(), ignore_index=-100).backward())
    micro = list(zip(x.split(2), y.split(2)))
    _, naive = grads_of(model, lambda: [(F.cross_entropy(
        model(a).flatten(0, 1), b.flatten(), ignore_index=-100) / 4
    ).backward() for a, b in micro])
    assert (naive - whole).abs().max() > 0.1 * whole.abs().max()


def test_accumulation_on_images_equals_the_large_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 5)).double()
    x, y = torch.randn(12, 4, 4, dtype=torch.float64), torch.randint(0, 5,
                                                                     (12,))
    _, whole = grads_of(model, lambda: F.cross_entropy(model(x),
                                                       y).backward())
    _, ours = grads_of(model, lambda: accumulate(
        model, list(zip(x.split(5), y.split(5)))))
    torch.testing.assert_close(ours, whole, atol=1e-12, rtol=1e-12)


def test_accumulate_names_empty_input():
    model = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="at least one micro-batch"):
        accumulate(model, [])
    with pytest.raises(ValueError, match="every target is "
                       "ignore_index=-100: there is nothing to average"):
        accumulate(model, [(torch.randn(2, 3), torch.full((2,), -100))])


# --------------------------------------------------------------------------
# loss scaling
# --------------------------------------------------------------------------

def scripted_run(scaler, pattern, scale_of):
    """Feed a scripted sequence of gradients (f: finite, i: inf, n: nan)
    through scaler.step and update; return the scales used, the skipped
    steps and the final weights."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(4))]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    scaler.scale(torch.ones(()))  # GradScaler makes its scale lazily
    scales, skipped = [], []
    gen = torch.Generator().manual_seed(1)
    for i, kind in enumerate(pattern):
        S = scale_of(scaler)
        scales.append(S)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * S
        if kind != "f":
            params[i % 2].grad.view(-1)[i % 3] = (math.inf if kind == "i"
                                                   else math.nan)
        before = [p.detach().clone() for p in params]
        scaler.step(opt)
        scaler.update()
        skipped.append(all(torch.equal(b, p) for b, p in zip(before,
                                                               params)))
    return scales, skipped, [p.detach() for p in params]


@pytest.mark.parametrize("settings", [
    dict(init_scale=2.0 ** 16, growth_interval=3),
    dict(init_scale=1024.0, growth_factor=4.0, backoff_factor=0.25,
         growth_interval=2),
    dict(init_scale=2.0 ** 10, growth_interval=1),
])
def test_loss_scaler_decides_like_gradscaler(settings):
    pattern = "fffiffffnfiiffffffnfffffffff"
    ours = scripted_run(LossScaler(**settings), pattern,
                        lambda s: s.scale_value)
    theirs = scripted_run(torch.amp.GradScaler("cpu", **settings), pattern,
                          lambda s: s.get_scale())
    assert ours[0] == theirs[0], "the scale sequences differ"
    assert ours[1] == theirs[1], "the skipped steps differ"
    assert ours[1] == [k != "f" for k in pattern]  # skips exactly those
    assert len(set(ours[0])) > 2  # the scale both grew and backed off
    for a, b in zip(ours[2], theirs[2]):
        torch.testing.assert_close(a, b, **EXACT)


def test_loss_scaler_in_float16_training_equals_gradscaler():
    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
            for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    settings = dict(init_scale=2.0 ** 24, growth_interval=4)
    scalers = [LossScaler(**settings),
               torch.amp.GradScaler("cpu", **settings)]
    opts = [Adam(nets[0].parameters(), lr=1e-2),
            torch.optim.Adam(nets[1].parameters(), lr=1e-2)]
    scales = [[], []]
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        x = torch.randn(64, 10, generator=gen) * 40
        y = torch.randint(0, 3, (64,), generator=gen)
        for net, scaler, opt, seen in zip(nets, scalers, opts, scales):
            opt.zero_grad()
            with torch.autocast("cpu", torch.float16):
                loss = F.cross_entropy(net(x).float(), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            seen.append(scaler.scale_value if scaler is scalers[0]
                        else scaler.get_scale())
    assert scales[0] == scales[1]
    assert min(scales[0]) < 2.0 ** 24  # some steps overflowed
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, **EXACT)


def test_loss_scaler_state_dict_and_misuse():
    scaler = LossScaler(init_scale=8.0, growth_interval=3)
    w = nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.1)
    for _ in range(4):
        w.grad = torch.ones(2)
        scaler.step(opt)
        scaler.update()
    assert scaler.state_dict() == {"scale": 16.0, "clean_steps": 1}
    copy = LossScaler()
    copy.load_state_dict(json.loads(json.dumps(scaler.state_dict())))
    assert copy.state_dict() == scaler.state_dict()
    w.grad = torch.ones(2)
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="unscale_\\(\\) was already "
                       "called since the last update\\(\\)"):
        scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="update\\(\\) needs a step"):
        LossScaler().update()
    with pytest.raises(ValueError, match="expected init_scale > 0"):
        LossScaler(growth_factor=1.0)
    half = nn.Parameter(torch.ones(2, dtype=torch.float16))
    half.grad = torch.ones(2, dtype=torch.float16)
    with pytest.raises(ValueError, match="gradients must be float32"):
        LossScaler().unscale_(torch.optim.SGD([half], lr=0.1))


# --------------------------------------------------------------------------
# the race
# --------------------------------------------------------------------------

def test_full_run_returns_a_json_record():
    record = full_run("cpu", part="Muon", epochs=1, train_size=256,
                      hidden=16, batch_size=64)
    json.dumps(record)
    assert [r["lr"] for r in record["runs"]] == list(RACE["Muon"][0])
    assert record["best_lr"] == min(record["runs"],
                                    key=lambda r: r["val_loss"])["lr"]
    assert all(len(r["step_loss"]) == 4 for r in record["runs"])
    assert record["train"]["hidden"] == 16


def test_full_run_checks_part_and_overrides_before_training():
    with pytest.raises(ValueError, match="unknown part 'Adagrad': expected "
                       "one of SGD, Adam, AdamW, Lion, Muon"):
        full_run("cpu", part="Adagrad")
    with pytest.raises(ValueError, match="unknown override"):
        full_run("cpu", part="SGD", epoch=3)
    with pytest.raises(ValueError, match="warmup must be in"):
        RaceConfig(warmup=0.0)


def test_recorded_race_covers_every_optimiser():
    race = load_results("optimization")
    assert sorted(race) == sorted(FULL_RUN_PARTS)
    for name, entry in race.items():
        assert [r["lr"] for r in entry["runs"]] == list(RACE[name][0]), name
        best = min(entry["runs"], key=lambda r: (math.isnan(r["val_loss"]),
                                                 r["val_loss"]))
        assert best["lr"] == entry["best_lr"]
        assert best["val_acc"] > 0.9, (name, best["val_acc"])
