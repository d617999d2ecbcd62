"""The linear attention chapter: the kernel form with the softmax kernel
against F.scaled_dot_product_attention; the quadratic, parallel,
recurrent and chunked causal forms against each other (float64 tight,
float32 close), the recurrent state against prefix sums; Performer's
random features against the softmax kernel; the linear LLaMA's cached
generation against its full forward, and its recorded full run."""

import pytest
import torch
import torch.nn.functional as F

import cave.frontiers.linear_attention as linear_module
from cave.frontiers.linear_attention import (
    FULL_RUN_PARTS, LinearAttention, LinearCache, LinearLlama,
    RandomFeatures, causal_chunked, causal_parallel, causal_quadratic,
    causal_recurrent, elu_features, full_run, kernel_attention,
    linear_attention, relu_features, softmax_kernel)
from cave.fundamentals.data import load_results
from cave.transformers.llama import Llama, LlamaConfig, rope_angles

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = {torch.float64: dict(atol=1e-12, rtol=1e-10),  # rounding only
       torch.float32: dict(atol=1e-5, rtol=1e-5)}  # sums of ~50 terms


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_softmax_kernel_form_equals_softmax_attention(causal, dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 2, 3, 40, 16, generator=g, dtype=dtype)
    ours = kernel_attention(q, k, v, softmax_kernel, causal=causal)
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(ours, theirs, **TOL[dtype])


def features(name, q, k):
    if name == "elu":
        return elu_features(q), elu_features(k)
    if name == "relu":
        return relu_features(q), relu_features(k)
    phi = RandomFeatures(q.shape[-1], 24, seed=3).to(q.dtype)
    return phi(q * 0.5), phi(k * 0.5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", ["elu", "relu", "random"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 8), (2, 3, 37, 8),
                                   (1, 2, 64, 16)])
def test_the_causal_forms_equal_each_other(shape, name, dtype):
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, *shape, generator=g, dtype=dtype)
    v = torch.randn(*shape[:-1], 5, generator=g, dtype=dtype)  # dv != D
    fq, fk = features(name, q, k)
    reference = causal_quadratic(fq, fk, v)
    torch.testing.assert_close(causal_parallel(fq, fk, v), reference,
                               **TOL[dtype])
    torch.testing.assert_close(causal_recurrent(fq, fk, v)[0], reference,
                               **TOL[dtype])
    for chunk in (1, 3, 16, 100):
        torch.testing.assert_close(causal_chunked(fq, fk, v, chunk)[0],
                                   reference, **TOL[dtype])


def test_quadratic_form_is_the_kernel_form_with_feature_kernel():
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(3, 2, 30, 8, generator=g, dtype=torch.float64)
    fq, fk = elu_features(q), elu_features(k)

    def kernel(a, b):
        return elu_features(a) @ elu_features(b).transpose(-1, -2)

    torch.testing.assert_close(causal_quadratic(fq, fk, v, eps=0.0),
                               kernel_attention(q, k, v, kernel, True))
    torch.testing.assert_close(linear_attention(fq, fk, v, eps=0.0),
                               kernel_attention(q, k, v, kernel, False))


def test_recurrent_state_after_each_token_is_the_prefix_sum():
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 2, 2, 25, 6, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, 25, 4, generator=g, dtype=torch.float64)
    fq, fk = elu_features(q), elu_features(k)
    out, (S, z), states = causal_recurrent(fq, fk, v, keep_states=True)
    assert len(states) == 25
    for t, (S_t, z_t) in enumerate(states):
        torch.testing.assert_close(
            S_t, torch.einsum("bhtd,bhte->bhde", fk[:, :, :t + 1],
                              v[:, :, :t + 1]))
        torch.testing.assert_close(z_t, fk[:, :, :t + 1].sum(2))
    assert S.shape == (2, 2, 6, 4) and z.shape == (2, 2, 6)
    # the chunked form ends in the same state
    _, (S_c, z_c) = causal_chunked(fq, fk, v, 7)
    torch.testing.assert_close(S_c, S)
    torch.testing.assert_close(z_c, z)


def test_random_features_approach_the_softmax_kernel():
    g = torch.Generator().manual_seed(4)
    d = 8
    q, k = torch.randn(2, 32, d, generator=g, dtype=torch.float64) * 0.5
    exact = torch.exp(q @ k.T / d ** 0.5)
    errors = []
    for m in (16, 256, 4096):
        phi = RandomFeatures(d, m, seed=0).to(torch.float64)
        approx = phi(q * d ** -0.25) @ phi(k * d ** -0.25).T
        assert (approx > 0).all()  # positive features, positive estimates
        errors.append(((approx - exact).abs() / exact).mean().item())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < errors[0] / 8  # 1/sqrt(m): 16 times smaller
    # orthogonal blocks: the directions within a block are orthogonal
    w = RandomFeatures(d, 2 * d, orthogonal=True, seed=1).w
    block = w[:d] / w[:d].norm(dim=1, keepdim=True)
    torch.testing.assert_close(block @ block.T, torch.eye(d), atol=1e-5,
                               rtol=0)


@pytest.mark.parametrize("orthogonal", [True, False])
def test_random_features_are_unbiased(orthogonal):
    """The mean of phi(q) . phi(k) over independent draws is exp(q . k),
    within four standard errors (orthogonal draws included: their
    directions must be uniform, which QR gives only with R's signs
    corrected)."""
    q = torch.tensor([0.4, -0.3, 0.5, 0.1], dtype=torch.float64)
    k = torch.tensor([0.2, 0.5, 0.3, -0.4], dtype=torch.float64)
    draws = torch.stack([
        (lambda phi: phi(q) @ phi(k))(
            RandomFeatures(4, 4, orthogonal, seed=s).to(torch.float64))
        for s in range(1500)])
    se = draws.std() / len(draws) ** 0.5
    assert abs(draws.mean() - torch.exp(q @ k)) < 4 * se


def small_config(**changes):
    return LlamaConfig(**{**dict(vocab_size=40, dim=32, n_layers=2,
                                 n_heads=4, n_kv_heads=2, max_seq_len=48),
                          **changes})


@pytest.mark.parametrize("features", ["elu", "relu"])
def test_linear_llama_cache_equals_the_full_forward(features):
    torch.manual_seed(0)
    model = LinearLlama(small_config(), features=features, chunk=8).eval()
    idx = torch.randint(0, 40, (2, 30))
    with torch.no_grad():
        whole, _ = model(idx)
        cache = model.new_cache(2)
        assert isinstance(cache, LinearCache)
        pieces = [model(idx[:, a:b], cache=cache, start_pos=a)[0]
                  for a, b in ((0, 11), (11, 12), (12, 30))]
        size = cache.nbytes
        model(idx[:, :5], cache=model.new_cache(2))
    torch.testing.assert_close(torch.cat(pieces, 1), whole, atol=1e-5,
                               rtol=1e-5)
    # 2 layers x batch 2 x 4 heads x (8 x 8 + 8) float32 numbers
    assert size == 2 * 2 * 4 * (8 * 8 + 8) * 4
    out = model.generate(idx[:, :3], 10,
                         generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 13) and torch.equal(out[:, :3], idx[:, :3])


def test_linear_llama_has_llama_parameters_and_initialisation():
    torch.manual_seed(0)
    softmax = Llama(small_config())
    torch.manual_seed(0)
    linear = LinearLlama(small_config())
    a, b = softmax.state_dict(), linear.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape
    linear.load_state_dict(a)  # softmax weights load as they are


def test_attention_layer_keeps_sums_in_float32_under_bfloat16(monkeypatch):
    """Half precision overflows in the running sums (fast-transformers#32):
    under bf16 autocast the layer hands float32 to the chunked form."""
    torch.manual_seed(0)
    config = small_config(n_kv_heads=4)
    layer = LinearAttention(config)
    x = torch.randn(1, 40, 32)
    cos, sin = rope_angles(torch.arange(40), config.head_dim)
    seen = []

    def spy(fq, fk, v, *args, **kwargs):
        seen.append((fq.dtype, fk.dtype, v.dtype))
        return causal_chunked(fq, fk, v, *args, **kwargs)

    monkeypatch.setattr(linear_module, "causal_chunked", spy)
    with torch.autocast("cpu", torch.bfloat16):
        low = layer(x, cos, sin)
    assert seen == [(torch.float32,) * 3]
    torch.testing.assert_close(low.float(), layer(x, cos, sin), atol=0.05,
                               rtol=0.05)


def test_bad_inputs_get_clear_errors():
    q = torch.randn(1, 5, 4)
    with pytest.raises(ValueError, match=r"phi\(k\) \(\.\.\., S, D\)"):
        causal_quadratic(q, torch.randn(1, 5, 3), torch.randn(1, 5, 2))
    with pytest.raises(ValueError, match="chunk must be a positive int"):
        causal_chunked(q, q, q, 0)
    with pytest.raises(ValueError, match="features must be one of"):
        LinearAttention(small_config(), features="softmax")
    with pytest.raises(ValueError, match="n_features >= 1"):
        RandomFeatures(4, 0)
    with pytest.raises(ValueError, match=r"part must be one of \('lm', "
                                         r"'speed'\), got 'x'"):
        full_run(part="x")
    with pytest.raises(ValueError, match="speed part takes no overrides"):
        full_run(part="speed", repeats=1)


def test_the_recorded_full_run():
    results = load_results("linear_attention")
    assert set(results) == set(FULL_RUN_PARTS)
    lm = results["lm"]
    assert set(lm["runs"]) == {"softmax", "linear"}
    for run in lm["runs"].values():
        assert len(run["train_loss"]) == lm["train"]["max_steps"]
        assert 0 < run["val_loss"] < 3.0  # far below the 4.17 of chance
        assert len(run["gen_tok_per_s"]) == 3
    # the linear state does not grow: smaller than the KV cache here
    assert lm["runs"]["linear"]["cache_bytes"] < \
        lm["runs"]["softmax"]["cache_bytes"]
    rows = results["speed"]["rows"]
    assert [r["T"] for r in rows] == sorted(r["T"] for r in rows)
    # the formula's memory is quadratic, the chunked form's linear
    first, last = rows[0], rows[-2]
    growth = last["T"] / first["T"]
    assert last["softmax, formula bytes"] > \
        0.5 * growth ** 2 * first["softmax, formula bytes"]
    assert last["linear, chunked bytes"] < \
        2 * growth * first["linear, chunked bytes"]
