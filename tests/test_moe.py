"""docs/frontiers/moe.md against a loop, the paper's formula and Hugging
Face transformers' Mixtral sparse-MoE block.

Tolerances: float32 comparisons use rtol=atol=1e-5 for outputs and router
logits (sums of up to a few hundred products of values of order 1, taken
in another order: batched products against one product per expert) and
1e-4 for gradients (sums over all tokens of such terms); float64 uses
1e-10; the balancing loss, a sum of E products of float32 means, 1e-6.
"""

import json

import pytest
import torch
from torch import nn

import transformers  # noqa: E402  (a test requirement: never skip)
from transformers.models.mixtral.modeling_mixtral import (
    MixtralSparseMoeBlock, load_balancing_loss_func)

from cave.fundamentals.data import load_results
from cave.frontiers import moe as M
from cave.transformers.llama import FeedForward, Llama, LlamaConfig

pytestmark = pytest.mark.usefixtures("one_thread")

F32 = {"rtol": 1e-5, "atol": 1e-5}
GRAD = {"rtol": 1e-4, "atol": 1e-5}
F64 = {"rtol": 1e-10, "atol": 1e-10}
LOSS = {"rtol": 1e-6, "atol": 1e-6}

SHAPES = [  # dim, hidden, experts, top_k
    (16, 24, 8, 2), (12, 20, 4, 1), (8, 16, 6, 3), (16, 8, 3, 3)]


def layer(dim, hidden, experts, top_k, seed=0, **kw):
    torch.manual_seed(seed)
    moe = M.MoE(M.MoEConfig(dim=dim, hidden_dim=hidden, n_experts=experts,
                            top_k=top_k, **kw))
    with torch.no_grad():  # a router with logits of order 1
        moe.gate.weight.normal_(0, 0.5)
    return moe


def mixtral_block(moe):
    c = moe.config
    config = transformers.MixtralConfig(
        hidden_size=c.dim, intermediate_size=c.hidden_dim,
        num_local_experts=c.n_experts, num_experts_per_tok=c.top_k)
    block = MixtralSparseMoeBlock(config).eval()
    with torch.no_grad():  # Mixtral stores gate and up as one (E, 2h, d)
        block.gate.weight.copy_(moe.gate.weight)
        block.experts.gate_up_proj.copy_(torch.cat([moe.w1, moe.w3], 1))
        block.experts.down_proj.copy_(moe.w2)
    return block


# --------------------------------------------------------------------------
# the layer
# --------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES)
def test_index_dispatch_equals_the_loop_over_experts(shape):
    moe = layer(*shape).double()
    x = torch.randn(3, 11, shape[0], dtype=torch.float64)
    torch.testing.assert_close(moe(x), M.moe_loop(moe, x), **F64)


@pytest.mark.parametrize("shape", SHAPES)
def test_equals_mixtral_outputs_router_logits_and_gradients(shape):
    moe = layer(*shape)
    block = mixtral_block(moe)
    x = torch.randn(2, 13, shape[0], generator=torch.Generator()
                    .manual_seed(1))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, theirs = moe(x1), block(x2)
    torch.testing.assert_close(ours, theirs, **F32)
    logits, scores, indices = block.gate(x.reshape(-1, shape[0]))
    torch.testing.assert_close(moe.router_logits, logits, **F32)
    weights, experts = M.route(moe.router_logits, shape[3])
    assert torch.equal(experts, indices)
    torch.testing.assert_close(weights, scores, **F32)
    w = torch.randn(ours.shape, generator=torch.Generator().manual_seed(2))
    (ours * w).sum().backward()
    (theirs * w).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, **GRAD)
    torch.testing.assert_close(moe.gate.weight.grad, block.gate.weight.grad,
                               **GRAD)
    gate_up = block.experts.gate_up_proj.grad
    torch.testing.assert_close(torch.cat([moe.w1.grad, moe.w3.grad], 1),
                               gate_up, **GRAD)
    torch.testing.assert_close(moe.w2.grad, block.experts.down_proj.grad,
                               **GRAD)


def test_one_expert_top_1_is_the_dense_swiglu():
    moe = layer(16, 40, 1, 1)
    dense = FeedForward(16, 40)
    with torch.no_grad():
        dense.w1.weight.copy_(moe.w1[0])
        dense.w3.weight.copy_(moe.w3[0])
        dense.w2.weight.copy_(moe.w2[0])
    x = torch.randn(4, 9, 16, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    torch.testing.assert_close(moe(x), dense(x2), **F32)
    moe(x).sum().backward()
    dense(x2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, **F32)
    torch.testing.assert_close(moe.w1.grad[0], dense.w1.weight.grad, **F32)


def test_capacity_drops_second_choices_first_and_zeroes_lost_tokens():
    moe = layer(8, 4, 4, 2, capacity_factor=0.5)
    x = torch.randn(40, 8)
    y = moe(x)
    C = moe.capacity(40)
    assert C == 10  # ceil(0.5 * 2 * 40 / 4)
    weights, experts = M.route(moe.router_logits, 2)
    # recompute which assignments were kept, choice-major, by hand
    seen = {e: 0 for e in range(4)}
    kept = torch.zeros(40, 2, dtype=torch.bool)
    for choice in range(2):
        for n in range(40):
            e = experts[n, choice].item()
            kept[n, choice] = seen[e] < C
            seen[e] += 1
    assert abs(moe.dropped - (1 - kept.float().mean().item())) < 1e-9
    # the output is the loop's, with only the kept assignments weighted
    full = M.moe_loop(moe, x)  # every assignment
    expected = torch.zeros_like(x)
    for n in range(40):
        for choice in range(2):
            if kept[n, choice]:
                e = experts[n, choice]
                single = M.MoE(M.MoEConfig(dim=8, hidden_dim=4,
                                           n_experts=1, top_k=1))
                with torch.no_grad():
                    single.w1.copy_(moe.w1[e:e + 1])
                    single.w3.copy_(moe.w3[e:e + 1])
                    single.w2.copy_(moe.w2[e:e + 1])
                expected[n] += weights[n, choice] * single(x[n:n + 1])[0]
    torch.testing.assert_close(y, expected, **F32)
    assert not torch.allclose(y, full)  # something was dropped
    lost = ~kept.any(1)
    assert (y[lost] == 0).all()
    # a first choice is never dropped while a second choice is kept
    # by the same expert
    for e in range(4):
        first_dropped = ((experts[:, 0] == e) & ~kept[:, 0]).any()
        second_kept = ((experts[:, 1] == e) & kept[:, 1]).any()
        assert not (first_dropped and second_kept)


def test_unlimited_capacity_drops_nothing_and_usage_counts():
    moe = layer(8, 4, 4, 2)
    x = torch.randn(30, 8)
    moe(x)
    assert moe.dropped == 0.0
    assert moe.usage.sum().item() == 60
    _, experts = M.route(moe.router_logits, 2)
    assert moe.usage.tolist() == torch.bincount(experts.flatten(),
                                                minlength=4).float().tolist()


# --------------------------------------------------------------------------
# the losses
# --------------------------------------------------------------------------

def paper_balance(logits, top_k):
    """Switch's eq. 4-6 by loops: E * sum_i f_i P_i, f_i the fraction of
    tokens whose top-k includes i, P_i the mean probability of i."""
    N, E = logits.shape
    probs = torch.softmax(logits.double(), -1)
    total = 0.0
    for i in range(E):
        f = sum(i in probs[n].topk(top_k).indices.tolist()
                for n in range(N)) / N
        P = sum(probs[n, i].item() for n in range(N)) / N
        total += f * P
    return E * total


@pytest.mark.parametrize("E, k", [(8, 2), (4, 1), (6, 3), (2, 1)])
def test_balancing_loss_equals_transformers_and_the_paper(E, k):
    logits = torch.randn(97, E, generator=torch.Generator().manual_seed(E))
    ours = M.load_balancing_loss(logits, k)
    theirs = load_balancing_loss_func((logits,), num_experts=E, top_k=k)
    torch.testing.assert_close(ours, theirs, **LOSS)
    assert abs(ours.item() - paper_balance(logits, k)) < 1e-5


def test_transformers_pools_layers_where_we_average_them():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(50, 4, generator=gen)
    b = torch.randn(50, 4, generator=gen)
    b[:, 0] += 3  # a second layer that prefers expert 0
    pooled = load_balancing_loss_func((a, b), num_experts=4, top_k=2)
    torch.testing.assert_close(
        pooled, M.load_balancing_loss(torch.cat([a, b]), 2), **LOSS)
    mean = (M.load_balancing_loss(a, 2) + M.load_balancing_loss(b, 2)) / 2
    assert abs(mean.item() - pooled.item()) > 1e-3


def test_balancing_loss_gradient_moves_probability_off_crowded_experts():
    logits = torch.zeros(200, 4)
    logits[:, 0] = 1.0  # every token prefers expert 0
    logits = (logits + 0.01 * torch.randn(200, 4)).requires_grad_()
    M.load_balancing_loss(logits, 1).backward()
    assert (logits.grad[:, 0] > 0).all()  # descent lowers expert 0's logit


def test_router_z_loss_by_hand():
    logits = torch.randn(10, 5, dtype=torch.float64)
    by_hand = sum(torch.log(torch.exp(row).sum()) ** 2 for row in logits) / 10
    assert abs(M.router_z_loss(logits).item() - by_hand.item()) < 1e-6


# --------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------

def test_moe_llama_counts_and_trains_one_step():
    config = LlamaConfig(vocab_size=30, dim=16, n_layers=2, n_heads=2,
                         n_kv_heads=2, max_seq_len=16)
    moe = M.MoEConfig(dim=16, hidden_dim=8, n_experts=4, top_k=2)
    model = M.MoELlama(config, moe)
    total = sum(p.numel() for p in model.parameters())
    dense = Llama(LlamaConfig(**{**config.__dict__, "hidden_dim": 8 * 4}))
    # the same as a dense model with all experts' width, plus routers
    assert total == sum(p.numel() for p in dense.parameters()) + 2 * 4 * 16
    assert model.active_parameters() == total - 2 * 2 * 3 * 16 * 8
    x = torch.randint(0, 30, (2, 12))
    _, loss = model(x, targets=x)
    aux = model.aux_loss()
    by_hand = sum(0.01 * M.load_balancing_loss(m.router_logits, 2)
                  + 1e-3 * M.router_z_loss(m.router_logits)
                  for m in model.moe_layers())
    torch.testing.assert_close(aux, by_hand)
    (loss + aux).backward()
    assert all(m.gate.weight.grad.abs().sum() > 0
               for m in model.moe_layers())


def test_bad_inputs_get_clear_errors():
    with pytest.raises(ValueError, match="top_k must be at most n_experts"):
        M.MoEConfig(n_experts=2, top_k=3)
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        M.MoEConfig(capacity_factor=0.0)
    with pytest.raises(ValueError, match="n_experts must be a positive int"):
        M.MoEConfig(n_experts=0)
    with pytest.raises(ValueError, match="MoE expected last dimension 8"):
        layer(8, 4, 4, 2)(torch.randn(3, 5))
    with pytest.raises(ValueError, match="expected dim 32, got 16"):
        M.MoELlama(LlamaConfig(dim=32, n_heads=4, n_kv_heads=4),
                   M.MoEConfig(dim=16))
    with pytest.raises(ValueError, match="part must be one of"):
        M.full_run(part="sparse")


def test_the_recorded_race_matches_its_models():
    runs = load_results("moe")
    assert set(M.FULL_RUN_PARTS) <= set(runs)
    moe = runs["moe"]
    assert moe["command"].startswith("cave run moe --full")
    assert runs["dense_active"]["parameters"] == \
        runs["dense_active"]["active_parameters"]
    # the MoE is as big as the large dense model and works like the small
    assert abs(moe["parameters"] - runs["dense_total"]["parameters"]) \
        == 4 * 8 * 64  # the routers
    assert moe["active_parameters"] - \
        runs["dense_active"]["parameters"] == 4 * 8 * 64
    for part in M.FULL_RUN_PARTS:
        assert runs[part]["val_loss"] < 2.6
        assert runs[part]["history"]["val"][-1]["step"] == \
            moe["train"]["max_steps"]
    shares = torch.tensor(moe["usage"][-1]["shares"])
    torch.testing.assert_close(shares.sum(-1), torch.ones(4))
