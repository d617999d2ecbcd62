"""docs/frontiers/mamba.md against closed forms and Hugging Face transformers.

Tolerances: float64 comparisons of two orders of the same sums use 1e-10;
float32 comparisons with transformers' MambaForCausalLM (its pure-PyTorch
selective scan, the loop) use rtol=atol=1e-5 for logits (values of order
1, sums taken in other orders: x_proj before or after a transpose, the
read-out by matmul or by sum) and 1e-4 for gradients (sums over the batch
and the sequence of such terms).
"""

import json

import pytest
import torch

import transformers  # noqa: E402  (a test requirement: never skip)
from cave.fundamentals.data import load_results
from cave.frontiers import mamba as M
from cave.transformers.llama import Llama, LlamaConfig

pytestmark = pytest.mark.usefixtures("one_thread")

F32 = {"rtol": 1e-5, "atol": 1e-5}
GRAD = {"rtol": 1e-4, "atol": 1e-5}
F64 = {"rtol": 1e-10, "atol": 1e-10}


def ids(B, T, V=37, seed=0):
    return torch.randint(0, V, (B, T),
                         generator=torch.Generator().manual_seed(seed))


def spread(model, seed=0):
    """Random norm gains, D and conv biases too, so that a swapped or
    forgotten one is caught."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".D") or "conv1d.bias" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model


# --------------------------------------------------------------------------
# the SSM pieces
# --------------------------------------------------------------------------

def test_zero_order_hold_equals_the_augmented_matrix_exponential():
    """exp([[A, B], [0, 0]] * delta) = [[A_bar, B_bar], [0, 1]] for each
    channel's diagonal system (the textbook construction of the ZOH)."""
    gen = torch.Generator().manual_seed(0)
    D, N = 3, 4
    A = -torch.rand(D, N, generator=gen, dtype=torch.float64) * 3 - 0.01
    B = torch.randn(D, N, generator=gen, dtype=torch.float64)
    delta = torch.tensor([0.01, 0.4, 3.0], dtype=torch.float64)
    A_bar, B_bar = M.discretize_zoh(A, B, delta)
    for d in range(D):
        big = torch.zeros(N + 1, N + 1, dtype=torch.float64)
        big[:N, :N] = torch.diag(A[d])
        big[:N, N] = B[d]
        E = torch.linalg.matrix_exp(big * delta[d])
        torch.testing.assert_close(torch.diag(E[:N, :N]), A_bar[d], **F64)
        torch.testing.assert_close(E[:N, N], B_bar[d], **F64)


@pytest.mark.parametrize("D, N, T", [(1, 1, 1), (3, 4, 17), (5, 8, 64)])
def test_recurrent_and_convolutional_views_agree(D, N, T):
    gen = torch.Generator().manual_seed(T)
    kw = dict(generator=gen, dtype=torch.float64)
    A = -torch.rand(D, N, **kw) - 0.05
    A_bar, B_bar = M.discretize_zoh(A, torch.randn(D, N, **kw),
                                    torch.rand(D, **kw) + 0.01)
    C = torch.randn(D, N, **kw)
    x = torch.randn(2, T, D, **kw)
    K = M.ssm_kernel(A_bar, B_bar, C, T)
    assert K.shape == (D, T)
    torch.testing.assert_close(M.causal_conv(x, K),
                               M.ssm_recurrent(A_bar, B_bar, C, x), **F64)
    # the kernel's first entry is C . B_bar: y_0 = K_0 x_0
    torch.testing.assert_close(K[:, 0], (C * B_bar).sum(-1), **F64)


@pytest.mark.parametrize("T", [1, 2, 3, 7, 16, 33, 100])
@pytest.mark.parametrize("with_h0", [False, True])
def test_parallel_scan_equals_the_loop(T, with_h0):
    gen = torch.Generator().manual_seed(T)
    kw = dict(generator=gen, dtype=torch.float64)
    a, b = torch.rand(3, T, 2, 4, **kw), torch.randn(3, T, 2, 4, **kw)
    h0 = torch.randn(3, 2, 4, **kw) if with_h0 else None
    seq = M.scan_sequential(a, b, h0)
    torch.testing.assert_close(M.scan_parallel(a, b, h0), seq, **F64)
    # and the loop is the recurrence, checked by hand at one position
    h = torch.zeros(3, 2, 4, dtype=torch.float64) if h0 is None else h0
    for t in range(T):
        h = a[:, t] * h + b[:, t]
    torch.testing.assert_close(seq[:, -1], h, **F64)


def test_parallel_scan_gradients_equal_the_loops():
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(2, 21, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(2, 21, 3, generator=gen, dtype=torch.float64)
    w = torch.randn(2, 21, 3, generator=gen, dtype=torch.float64)
    grads = []
    for scan in (M.scan_sequential, M.scan_parallel):
        a_, b_ = a.clone().requires_grad_(), b.clone().requires_grad_()
        (scan(a_, b_) * w).sum().backward()
        grads.append((a_.grad, b_.grad))
    for g_seq, g_par in zip(*grads):
        torch.testing.assert_close(g_par, g_seq, **F64)


def test_selective_scan_with_constant_parameters_is_the_convolution():
    gen = torch.Generator().manual_seed(0)
    kw = dict(generator=gen, dtype=torch.float64)
    E, N, T = 4, 3, 20
    A, x = -torch.rand(E, N, **kw) - 0.1, torch.randn(2, T, E, **kw)
    dt, B0, C0 = torch.rand(E, **kw), torch.randn(N, **kw), \
        torch.randn(N, **kw)
    D = torch.randn(E, **kw)
    for parallel in (False, True):
        y, h = M.selective_scan(x, dt.expand(2, T, E), A,
                                B0.expand(2, T, N), C0.expand(2, T, N), D,
                                parallel=parallel)
        K = M.ssm_kernel(torch.exp(dt[:, None] * A), dt[:, None] * B0,
                         C0.expand(E, N), T)
        torch.testing.assert_close(y, M.causal_conv(x, K) + D * x, **F64)
        assert h.shape == (2, E, N)


# --------------------------------------------------------------------------
# the model against transformers' MambaForCausalLM
# --------------------------------------------------------------------------

CONFIGS = [  # dim, layers, d_state, expand, d_conv, dt_rank, tied, biases
    (32, 2, 8, 2, 4, None, True, False),
    (24, 3, 4, 3, 3, 5, False, True),
    (16, 1, 16, 2, 2, 1, True, True),
]


def pair(dim, layers, d_state, expand, d_conv, dt_rank, tied, biases,
         parallel=False):
    """Our model, spread, and transformers' with its weights copied."""
    torch.manual_seed(dim + layers)
    ours = spread(M.Mamba(M.MambaConfig(
        vocab_size=37, dim=dim, n_layers=layers, d_state=d_state,
        expand=expand, d_conv=d_conv, dt_rank=dt_rank, tie_embeddings=tied,
        bias=biases, parallel_scan=parallel)))
    if biases:
        with torch.no_grad():
            for layer in ours.layers:
                layer.mixer.in_proj.bias.normal_(0, 0.1)
                layer.mixer.out_proj.bias.normal_(0, 0.1)
    state, config = M.export_hf(ours)
    config = json.loads(json.dumps(config))  # what config.json would hold
    ref = transformers.MambaForCausalLM(transformers.MambaConfig(**config))
    ref.load_state_dict(state, strict=True)
    if tied:
        assert ref.lm_head.weight.data_ptr() == \
            ref.backbone.embeddings.weight.data_ptr()
    return ours, ref


@pytest.mark.parametrize("shape", CONFIGS)
@pytest.mark.parametrize("parallel", [False, True])
def test_logits_and_gradients_equal_transformers(shape, parallel):
    ours, ref = pair(*shape, parallel=parallel)
    x = ids(2, 19)
    ours_logits, ref_logits = ours(x)[0], ref(x, use_cache=False).logits
    torch.testing.assert_close(ours_logits, ref_logits, **F32)
    w = torch.randn(ours_logits.shape,
                    generator=torch.Generator().manual_seed(1))
    (ours_logits * w).sum().backward()
    (ref_logits * w).sum().backward()
    theirs = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        key = name if name == "lm_head.weight" else f"backbone.{name}"
        torch.testing.assert_close(p.grad, theirs[key].grad, **GRAD,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("shape", CONFIGS[:2])
def test_weights_load_both_ways(shape):
    ours, ref = pair(*shape)
    config = json.loads(ref.config.to_json_string())
    back = M.import_hf(ref.state_dict(), config)
    assert back.config == ours.config
    x = ids(3, 11, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(back(x)[0], ref(x, use_cache=False)
                                   .logits, **F32)
        torch.testing.assert_close(back(x)[0], ours(x)[0], rtol=0, atol=0)


def test_stepping_with_the_state_equals_the_parallel_forward():
    for shape in CONFIGS:
        ours, _ = pair(*shape)
        x = ids(2, 15, seed=3)
        with torch.no_grad():
            full = ours(x)[0]
            state = ours.new_state(2)
            parts = [ours(x[:, :5], state=state)[0]]
            parts += [ours(x[:, t:t + 1], state=state)[0]
                      for t in range(5, 10)]
            parts.append(ours(x[:, 10:], state=state)[0])  # a chunk again
        torch.testing.assert_close(torch.cat(parts, dim=1), full, **F32)


def test_greedy_generation_equals_transformers_generate():
    ours, ref = pair(*CONFIGS[0])
    prompt = ids(1, 4, seed=4)
    mine = M.generate(ours, prompt, 12, temperature=0)
    theirs = ref.generate(prompt, max_new_tokens=12, do_sample=False,
                          min_new_tokens=12)
    assert torch.equal(mine, theirs)
    # and each token is the argmax of a full forward over what came before
    with torch.no_grad():
        for t in range(4, mine.shape[1]):
            assert ours(mine[:, :t])[0][0, -1].argmax() == mine[0, t]


def test_state_size_is_constant_and_matches_its_formula():
    config = M.MambaConfig(dim=32, n_layers=3, d_state=8)
    model = M.Mamba(config)
    sizes = []
    for T in (1, 10, 40):
        state = model.new_state(2)
        with torch.no_grad():
            model(ids(2, T, V=65), state=state)
        sizes.append(state.nbytes)
    E = config.inner
    assert sizes == [3 * 2 * 4 * (E * 3 + E * 8)] * 3


def test_scan_stays_float32_under_bfloat16_autocast():
    model = M.Mamba(M.MambaConfig(dim=16, n_layers=1, d_state=4))
    with torch.autocast("cpu", torch.bfloat16):
        state = model.new_state(1)
        model(ids(1, 6, V=65), state=state)
    assert state.ssm[0].dtype == torch.float32


# --------------------------------------------------------------------------
# errors that name what was expected
# --------------------------------------------------------------------------

def test_bad_inputs_get_clear_errors():
    with pytest.raises(ValueError, match="d_state must be a positive int"):
        M.MambaConfig(d_state=0)
    with pytest.raises(ValueError, match="dt_min <= dt_max"):
        M.MambaConfig(dt_min=0.5, dt_max=0.1)
    with pytest.raises(ValueError, match="d_conv must be at least 2"):
        M.MambaConfig(d_conv=1)
    model = M.Mamba(M.MambaConfig(dim=16, n_layers=1, d_state=4))
    with pytest.raises(ValueError, match=r"shape \(B, T\).*int64"):
        model(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="batch size 1, got ids of shape"):
        model(ids(2, 3, V=65), state=model.new_state(1))
    with pytest.raises(ValueError, match="targets must match idx"):
        model(ids(2, 3, V=65), targets=ids(2, 4, V=65))
    with pytest.raises(ValueError, match=r"shape \(B, T\) with T >= 1"):
        M.generate(model, torch.zeros(3, dtype=torch.long), 2)
    state, config = M.export_hf(model)
    with pytest.raises(ValueError, match="missing.*A_log"):
        M.import_hf({k: v for k, v in state.items() if "A_log" not in k},
                    config)
    state["backbone.layers.0.mixer.D"] = torch.zeros(5)
    with pytest.raises(ValueError, match=r"mixer.D: expected shape \(32,\)"):
        M.import_hf(state, config)
    with pytest.raises(ValueError, match="expected model_type 'mamba'"):
        M.config_from_hf({**config, "model_type": "llama"})


# --------------------------------------------------------------------------
# the recorded race
# --------------------------------------------------------------------------

def test_the_recorded_race_matches_the_models_it_names():
    race = load_results("mamba")
    assert race["command"].startswith("cave run mamba --full")
    llama = Llama(LlamaConfig(**race["llama"]["model"]))
    mamba = M.Mamba(M.MambaConfig(**race["mamba"]["model"]))
    for name, model in (("llama", llama), ("mamba", mamba)):
        assert race[name]["parameters"] == \
            sum(p.numel() for p in model.parameters())
        assert race[name]["val_loss"] < 2.6  # far below ln 65 = 4.17
        assert race[name]["history"]["val"][-1]["step"] == \
            race["train"]["max_steps"]
    ratio = race["mamba"]["parameters"] / race["llama"]["parameters"]
    assert 0.9 < ratio < 1.1, "the race compares models of the same size"
