"""The compression chapter: quantisation equal to torch's quantised
tensors, 4-bit packing that round-trips, GPTQ below round-to-nearest on
every layer, pruning masks equal to torch.nn.utils.prune's, the
distillation loss equal to F.kl_div's formula, and LoRA equal to peft's
LoRA layer in outputs and gradients."""

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.utils.prune as prune
from peft import LoraConfig, get_peft_model

import cave.techniques.compression as comp
from cave.classical.cnn import Conv2d, LeNet5
from cave.fundamentals.data import RESULTS_DIR
from cave.techniques.compression import (
    CompressionConfig, DistillConfig, LoRALinear, QuantLinear, add_lora,
    channel_mask, character_text, dequantize, dequantize_groups,
    distillation_loss, full_run, gptq_quantize, input_hessians,
    keep_pruned, layer_error, lora_finetune, magnitude_mask, model_bytes,
    pack_int4, prune_model, quant_params, quantize, quantize_groups,
    quantize_llama, sparsity, trainable_parameters, two_four_mask,
    unpack_int4)
from cave.transformers.llama import Llama, LlamaConfig

TOL = dict(atol=1e-5, rtol=1e-5)  # float32 sums taken in another order
pytestmark = pytest.mark.filterwarnings(  # torch's deprecated API, used
    "ignore:torch.quantize_per")  # here as the reference it still is


def scaled_rows(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    return w * torch.rand(rows, 1, generator=g) * 3  # rows of many sizes


# --------------------------------------------------------------------------
# Quantisation
# --------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape,seed", [((32, 48), 0), ((7, 5), 1),
                                        ((3, 16, 9), 2)])
def test_per_tensor_equals_torch_quantize_per_tensor(symmetric, shape,
                                                     seed):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    x = x + (0.0 if symmetric else 0.7)  # asymmetric: a shifted range
    s, z = quant_params(x, 8, symmetric)
    q = quantize(x, s, z, 8, symmetric)
    dtype = torch.qint8 if symmetric else torch.quint8
    theirs = torch.quantize_per_tensor(x, s.item(), z.item(), dtype)
    assert torch.equal(q, theirs.int_repr())
    assert torch.equal(dequantize(q, s, z), theirs.dequantize())
    assert ((dequantize(q, s, z) - x).abs() <= s / 2 * (1 + 1e-5)).all()


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("seed", [0, 1])
def test_per_channel_equals_torch_quantize_per_channel(symmetric, dim,
                                                       seed):
    x = scaled_rows(24, 40, seed)
    s, z = quant_params(x, 8, symmetric, dim=dim)
    q = quantize(x, s, z, 8, symmetric, dim=dim)
    dtype = torch.qint8 if symmetric else torch.quint8
    theirs = torch.quantize_per_channel(x, s.double(), z, dim, dtype)
    assert torch.equal(dequantize(theirs.int_repr(), s, z, dim),
                       theirs.dequantize())
    if symmetric:  # zero point 0: the same integers, bit for bit
        assert torch.equal(q, theirs.int_repr())
        return
    # torch's per-channel kernel rounds x / s + z, the sum rounded to
    # float32 first; we round x / s, then add z. They differ by one only
    # where that float32 sum lands exactly on a half.
    shape = [1, 1]
    shape[dim] = -1
    t = x / s.reshape(shape) + z.reshape(shape).float()
    differ = q != theirs.int_repr()
    assert ((q.int() - theirs.int_repr().int()).abs() <= 1).all()
    assert (t[differ] - t[differ].floor() == 0.5).all()
    assert differ.sum() <= 3


def test_quant_params_rejects_bad_bits():
    with pytest.raises(ValueError, match="bits must be an int from 2 to 8"):
        quant_params(torch.randn(3), bits=16)


@pytest.mark.parametrize("shape", [(3, 8), (5, 2, 64), (1, 2)])
def test_int4_packing_round_trips(shape):
    q = torch.randint(0, 16, shape, dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (*shape[:-1], shape[-1] // 2)
    assert torch.equal(unpack_int4(packed), q)
    assert torch.equal(packed[..., 0] & 15, q[..., 0])  # low nibble first


def test_pack_int4_names_what_it_expects():
    with pytest.raises(ValueError, match="uint8 values 0..15 with an even"):
        pack_int4(torch.full((2, 4), 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="even last dimension"):
        pack_int4(torch.zeros(2, 3, dtype=torch.uint8))


@pytest.mark.parametrize("bits,symmetric", [(8, True), (8, False),
                                            (4, False)])
def test_groups_of_a_whole_row_are_per_channel(bits, symmetric):
    w = scaled_rows(16, 32, 3)
    q, s, z = quantize_groups(w, bits, 32, symmetric)
    sc, zc = quant_params(w, bits, symmetric, dim=0)
    assert torch.equal(q, quantize(w, sc, zc, bits, symmetric, dim=0))
    assert torch.equal(dequantize_groups(q, s, z),
                       dequantize(q, sc, zc, dim=0))


def test_smaller_groups_lower_the_error_and_bad_shapes_are_refused():
    w = scaled_rows(32, 128, 4)
    errors = [(dequantize_groups(*quantize_groups(w, 4, g)) - w).norm()
              for g in (128, 64, 32)]
    assert errors[0] > errors[1] > errors[2]
    with pytest.raises(ValueError, match="multiple of group_size=32"):
        quantize_groups(torch.randn(4, 40), 4, 32)


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 32), (4, 16)])
def test_quant_linear_is_the_linear_of_its_dequantised_weight(bits,
                                                              group_size):
    linear = nn.Linear(64, 24)
    layer = QuantLinear.from_linear(linear, bits, group_size)
    x = torch.randn(5, 3, 64)
    torch.testing.assert_close(
        layer(x), F.linear(x, layer.dequantized_weight(), linear.bias),
        atol=0, rtol=0)
    # each weight moved by at most half its group's step s: |dy| <= sum
    # over inputs of |x| s / 2
    step = layer.scale.repeat_interleave(layer.group_size, dim=1)
    bound = x.abs() @ (step / 2).T  # (5, 3, 24)
    assert ((layer(x) - linear(x)).abs() <= bound * (1 + 1e-4) + 1e-6).all()
    assert model_bytes(layer) < model_bytes(linear) / 3  # 32 bits -> < 11


# --------------------------------------------------------------------------
# GPTQ
# --------------------------------------------------------------------------


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return Llama(LlamaConfig(vocab_size=32, dim=64, n_layers=2, n_heads=4,
                             n_kv_heads=2, max_seq_len=32)).eval()


@pytest.mark.parametrize("bits,group_size", [(4, 16), (3, None)])
def test_gptq_beats_round_to_nearest_on_every_layer(bits, group_size):
    model = tiny_llama()
    calibration = torch.randint(0, 32, (8, 32),
                                generator=torch.Generator().manual_seed(1))
    quantized, errors = quantize_llama(model, "gptq", bits, group_size,
                                       calibration)
    assert len(errors) == 2 * 7  # every linear layer of both blocks
    for name, e in errors.items():
        assert e["gptq"] < e["rtn"], (name, e)
    layers = [m for m in quantized.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14 and all(m.bits == bits for m in layers)
    logits, _ = quantized(calibration)
    assert torch.isfinite(logits).all()


def test_gptq_on_correlated_inputs_and_its_errors():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g) @ torch.randn(8, 48, generator=g)
    x = x + 0.1 * torch.randn(512, 48, generator=g)  # (512, 48) low rank
    w = torch.randn(16, 48, generator=g)
    layer = nn.Linear(48, 16, bias=False)
    layer.weight.data = w
    h = input_hessians(layer, {"": layer}, x)[""]
    torch.testing.assert_close(h, x.T @ x / 512, **TOL)
    q, s, z = gptq_quantize(w, h, 4, 16)
    rtn = dequantize_groups(*quantize_groups(w, 4, 16))
    assert layer_error(w, dequantize_groups(q, s, z), h) < \
        0.5 * layer_error(w, rtn, h)
    with pytest.raises(ValueError, match=r"expected a \(48, 48\) Hessian"):
        gptq_quantize(w, h[:8, :8])
    with pytest.raises(ValueError, match="GPTQ needs calibration"):
        quantize_llama(tiny_llama(), "gptq")
    with pytest.raises(ValueError, match="method must be 'rtn' or 'gptq'"):
        quantize_llama(tiny_llama(), "awq")


# --------------------------------------------------------------------------
# Pruning
# --------------------------------------------------------------------------


@pytest.mark.parametrize("amount", [0.0, 0.3, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("make", [lambda: nn.Linear(40, 12),
                                  lambda: nn.Conv2d(3, 8, 3)])
def test_magnitude_mask_equals_l1_unstructured(amount, make):
    torch.manual_seed(0)
    layer = make()
    ours = magnitude_mask(layer.weight, amount)
    prune.l1_unstructured(layer, "weight", amount)
    assert torch.equal(ours, layer.weight_mask)


@pytest.mark.parametrize("amount", [0.0, 0.25, 0.5, 0.8])
@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("dim", [0, 1])
def test_channel_mask_equals_ln_structured(amount, n, dim):
    torch.manual_seed(1)
    for layer in (nn.Linear(16, 20), nn.Conv2d(4, 8, 3)):
        ours = channel_mask(layer.weight, amount, n, dim)
        prune.ln_structured(layer, "weight", amount, n=n, dim=dim)
        assert torch.equal(ours, layer.weight_mask)


def test_two_four_keeps_the_two_largest_of_every_four():
    w = torch.randn(6, 16)
    mask = two_four_mask(w)
    quads = mask.reshape(6, 4, 4)
    assert (quads.sum(-1) == 2).all()
    a = w.abs().reshape(6, 4, 4)
    kept_min = torch.where(quads.bool(), a, torch.inf).amin(-1)
    dropped_max = torch.where(quads.bool(), -torch.inf, a).amax(-1)
    assert (kept_min >= dropped_max).all()
    with pytest.raises(ValueError, match="2:4 needs inputs in fours"):
        two_four_mask(torch.randn(3, 6))


def test_pruned_weights_stay_zero_through_fine_tuning():
    torch.manual_seed(0)
    model = LeNet5()
    for kind in ("magnitude", "channels", "2:4"):
        net = copy.deepcopy(model)
        masks = prune_model(net, kind, 0.6)
        zeros = {n: p == 0 for n, p in net.named_parameters()
                 if n in masks}
        before = sparsity(net)
        handles = keep_pruned(net, masks)
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        for _ in range(3):
            loss = F.cross_entropy(net(torch.rand(8, 28, 28)),
                                   torch.randint(0, 10, (8,)))
            opt.zero_grad()
            loss.backward()
            opt.step()
        for n, p in net.named_parameters():
            if n in masks:
                assert (p[zeros[n]] == 0).all(), (kind, n)
        assert sparsity(net) == before > 0.05
        for h in handles:
            h.remove()
    with pytest.raises(ValueError, match="kind must be"):
        prune_model(model, "random")
    with pytest.raises(ValueError, match=r"amount must be a fraction"):
        magnitude_mask(torch.randn(3), 1.5)


def test_channels_pruning_spares_the_last_layer_and_zeroes_biases():
    torch.manual_seed(0)
    model = LeNet5()
    masks = prune_model(model, "channels", 0.5)
    last = [n for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, Conv2d))][-1]
    assert f"{last}.weight" not in masks
    conv = model.features[0]
    dead = conv.weight.flatten(1).abs().sum(1) == 0
    assert dead.sum() == 3 and (conv.bias[dead] == 0).all()


# --------------------------------------------------------------------------
# Distillation
# --------------------------------------------------------------------------


@pytest.mark.parametrize("T,alpha", [(1.0, 0.5), (4.0, 0.9), (2.5, 1.0),
                                     (10.0, 0.0)])
def test_distillation_loss_equals_the_kl_div_formula(T, alpha):
    torch.manual_seed(0)
    s = torch.randn(16, 10, requires_grad=True)
    t, y = torch.randn(16, 10) * 3, torch.randint(0, 10, (16,))
    ours = distillation_loss(s, t, y, T, alpha)
    theirs = alpha * T ** 2 * F.kl_div(
        F.log_softmax(s / T, -1), F.log_softmax(t / T, -1),
        reduction="batchmean", log_target=True) + \
        (1 - alpha) * F.cross_entropy(s, y)
    torch.testing.assert_close(ours, theirs, **TOL)
    g_ours, = torch.autograd.grad(ours, s)
    g_theirs, = torch.autograd.grad(theirs, s)
    torch.testing.assert_close(g_ours, g_theirs, **TOL)


def test_distillation_checks_shapes_and_config():
    with pytest.raises(ValueError, match="student and teacher logits must"):
        distillation_loss(torch.randn(2, 10), torch.randn(2, 5),
                          torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature > 0"):
        DistillConfig(temperature=0.0)


# --------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------


class Two(nn.Module):
    def __init__(self, bias):
        super().__init__()
        self.proj = nn.Linear(20, 12, bias=bias)
        self.out = nn.Linear(12, 5)

    def forward(self, x):
        return self.out(torch.tanh(self.proj(x)))


@pytest.mark.parametrize("rank,alpha,bias", [(4, 8, True), (2, 1, False),
                                             (8, 32, True)])
def test_lora_equals_peft_in_outputs_and_gradients(rank, alpha, bias):
    torch.manual_seed(rank)
    model = Two(bias)
    theirs = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=["proj", "out"],
        lora_dropout=0.0))
    ours = copy.deepcopy(model)
    add_lora(ours, rank, alpha, targets=("proj", "out"))
    for name in ("proj", "out"):
        peft_layer = getattr(theirs.base_model.model, name)
        a = torch.randn_like(peft_layer.lora_A["default"].weight)
        b = torch.randn_like(peft_layer.lora_B["default"].weight)
        with torch.no_grad():
            peft_layer.lora_A["default"].weight.copy_(a)
            peft_layer.lora_B["default"].weight.copy_(b)
            getattr(ours, name).lora_A.copy_(a)
            getattr(ours, name).lora_B.copy_(b)
    x = torch.randn(7, 20, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y_ours, y_theirs = ours(x), theirs(x2)
    torch.testing.assert_close(y_ours, y_theirs, **TOL)
    y_ours.square().sum().backward()
    y_theirs.square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, **TOL)
    for name in ("proj", "out"):
        peft_layer = getattr(theirs.base_model.model, name)
        mine = getattr(ours, name)
        torch.testing.assert_close(
            mine.lora_A.grad, peft_layer.lora_A["default"].weight.grad,
            **TOL)
        torch.testing.assert_close(
            mine.lora_B.grad, peft_layer.lora_B["default"].weight.grad,
            **TOL)
    trained = {n for n, p in ours.named_parameters() if p.grad is not None}
    assert trained == {"proj.lora_A", "proj.lora_B", "out.lora_A",
                       "out.lora_B"}
    assert trainable_parameters(ours) == trainable_parameters(theirs) == \
        sum(rank * (i + o) for i, o in ((20, 12), (12, 5)))


def test_lora_merge_equals_unmerged_and_unmerge_restores():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 8), rank=4, alpha=8)
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x), layer.base(x), atol=0, rtol=0)
    nn.init.normal_(layer.lora_B)
    w0, unmerged = layer.base.weight.clone(), layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), unmerged, **TOL)
    with pytest.raises(RuntimeError, match="unmerged nn.Linear base"):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, w0, **TOL)
    torch.testing.assert_close(layer(x), unmerged, **TOL)


def test_lora_over_a_four_bit_base_trains_only_the_adapters():
    model = tiny_llama()
    quantized, _ = quantize_llama(model, "rtn", 4, 16)
    names = add_lora(quantized, rank=2, alpha=4)
    assert len(names) == 14
    assert trainable_parameters(quantized) == sum(
        2 * (m.in_features + m.out_features)  # rank 2: A (2, in), B (out, 2)
        for m in model.layers.modules() if isinstance(m, nn.Linear))
    ids = torch.randint(0, 32, (400,))
    before = {n: p.clone() for n, p in quantized.named_parameters()}
    losses = lora_finetune(quantized, ids, 3, 2, 16, lr=1e-2)
    assert len(losses) == 3
    for n, p in quantized.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == ("lora_B" in n or "lora_A" in n), n
    layer = quantized.layers[0].attention.wq
    with pytest.raises(RuntimeError, match="got QuantLinear"):
        layer.merge()
    with pytest.raises(ValueError, match="rank must be a positive int"):
        LoRALinear(nn.Linear(2, 2), rank=0)


def test_character_text_full_run_and_config_errors():
    text = "A:\nhi\n\nB:\nho\n\nA:\nyo"
    assert character_text(text, "A") == "A:\nhi\n\nA:\nyo"
    with pytest.raises(ValueError, match="no speech begins with 'C:'"):
        character_text(text, "C")
    with pytest.raises(ValueError, match="part must be one of"):
        full_run(part="bert")
    with pytest.raises(ValueError, match="group_size must be even"):
        CompressionConfig(group_size=3)
    assert comp.FULL_RUN_PARTS == ("llama", "cnn", "lora")


def test_the_recorded_full_run_holds_what_the_chapter_claims():
    record = json.loads((RESULTS_DIR / "compression.json").read_text())
    assert set(comp.FULL_RUN_PARTS) <= set(record)
    llama = record["llama"]
    assert len(llama["table"]) == 5 and len(llama["errors"]) == 42
    for name, e in llama["errors"].items():
        assert e["gptq"] < e["rtn"], name
    loss = {k: v["val_loss"] for k, v in llama["table"].items()}
    assert loss["4-bit g32 GPTQ"] < loss["4-bit g32 nearest"]
    for row in record["cnn"]["pruning"]:
        assert row["sparsity_finetuned"] == row["sparsity"]
    seeds = record["cnn"]["config"]["seeds"]
    for run in record["cnn"]["students"].values():
        assert len(run["alone"]) == len(run["distilled"]) == seeds
    for run in record["lora"]["runs"].values():
        assert run["prospero_after"] < run["prospero_before"]
