"""docs/transformers/vit.md against PyTorch and Hugging Face transformers.

Tolerances: float32 comparisons use rtol=atol=1e-5 (values of order 1;
the sums run in different orders in different kernels); float64 uses
1e-10. The reference is transformers 5.24's ViTForImageClassification
(eager attention; in float64 sdpa, since eager takes its softmax in
float32 whatever the dtype), built from small random configurations: patch sizes
2 to 8, widths 16 to 48, 1 to 6 heads, 1 to 3 layers, 1 and 3 channels,
with and without interpolated position embeddings. Logits and the
gradient of every parameter are compared, through the name table of
export_hf / import_hf.
"""

import json

import pytest
import torch
import torch.nn.functional as F

from cave import cli
from cave.classical.cnn import Conv2d, receptive_field
from cave.transformers import vit as V

import transformers  # noqa: E402  (a test requirement: never skip)

F32 = {"rtol": 1e-5, "atol": 1e-5}
F64 = {"rtol": 1e-10, "atol": 1e-10}

CONFIGS = [  # image_size, patch_size, in_channels, dim, heads, depth, mlp
    dict(image_size=28, patch_size=4, in_channels=1, dim=32, heads=4,
         depth=2, mlp_dim=64),
    dict(image_size=28, patch_size=7, in_channels=1, dim=16, heads=1,
         depth=1, mlp_dim=24),
    dict(image_size=16, patch_size=2, in_channels=3, dim=24, heads=3,
         depth=3, mlp_dim=40),
    dict(image_size=32, patch_size=8, in_channels=3, dim=48, heads=6,
         depth=2, mlp_dim=96),
]


def ours_and_theirs(dtype=torch.float32, seed=0, attention="eager", **kw):
    """Our ViT with every weight random (norm gains too), and Hugging
    Face's with our weights loaded through export_hf."""
    torch.manual_seed(seed)
    ours = V.ViT(V.ViTConfig(input_mean=0.0, input_std=1.0, **kw))
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "norm" in name or name in ("cls_token", "positions"):
                p.copy_(torch.randn_like(p) * 0.3 + (
                    1.0 if name.endswith("norm1.weight") or
                    name.endswith("norm2.weight") or
                    name == "norm.weight" else 0.0))
    state, hf_config = V.export_hf(ours)
    config = transformers.ViTConfig(**hf_config,
                                    attn_implementation=attention)
    theirs = transformers.ViTForImageClassification(config)
    theirs.load_state_dict(state, strict=True)
    return ours.to(dtype).eval(), theirs.to(dtype).eval()


def compare(ours, theirs, x, tol, interpolate=False):
    """Logits and every parameter's gradient, through the name table."""
    out_ours = ours(x, interpolate_pos_encoding=interpolate)
    out_theirs = theirs(x, interpolate_pos_encoding=interpolate).logits
    torch.testing.assert_close(out_ours, out_theirs, **tol)
    upstream = torch.randn_like(out_ours)
    (out_ours * upstream).sum().backward()
    (out_theirs * upstream).sum().backward()
    names = V._hf_names(ours.config.depth)
    theirs_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs_params[names[name]].grad,
                                   **tol, msg=f"gradient of {name}")


# --------------------------------------------------------------------------
# patches
# --------------------------------------------------------------------------


def test_patchify_order_is_grid_row_then_channel_row_column():
    x = torch.arange(2 * 3 * 6 * 4.0).view(2, 3, 6, 4)  # (B, C, H, W)
    p = V.patchify(x, 2)  # (2, 6, 12)
    assert p.shape == (2, 6, 12)
    for k in range(6):
        i, j = divmod(k, 2)  # grid 3 x 2
        expected = x[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].reshape(2, -1)
        assert torch.equal(p[:, k], expected)


@pytest.mark.parametrize("C, size, P, D", [(1, 28, 4, 64), (1, 28, 7, 8),
                                          (3, 32, 8, 48), (2, 12, 3, 5)])
def test_patch_embedding_equals_the_strided_convolution(C, size, P, D):
    torch.manual_seed(0)
    embed = V.PatchEmbedding(C, D, P)
    x = torch.randn(3, C, size, size, requires_grad=True)
    a, b = embed(x), embed.forward_conv(x)
    torch.testing.assert_close(a, b, **F32)
    reference = F.conv2d(x, embed.projection.weight, embed.projection.bias,
                         stride=P).flatten(2).transpose(1, 2)
    torch.testing.assert_close(a, reference, **F32)
    up = torch.randn_like(a)
    ga = torch.autograd.grad((a * up).sum(), [x, *embed.parameters()])
    gb = torch.autograd.grad((b * up).sum(), [x, *embed.parameters()])
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, **F32)
    assert isinstance(embed.projection, Conv2d)


# --------------------------------------------------------------------------
# Hugging Face's ViT
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kw", CONFIGS)
def test_logits_and_gradients_equal_transformers(kw):
    ours, theirs = ours_and_theirs(**kw)
    x = torch.randn(3, kw["in_channels"], kw["image_size"], kw["image_size"])
    compare(ours, theirs, x, F32)


@pytest.mark.parametrize("kw", CONFIGS[:3])
def test_equal_to_transformers_in_float64(kw):
    # eager attention takes its softmax in float32 whatever the dtype;
    # PyTorch's fused attention (sdpa) keeps float64 throughout
    ours, theirs = ours_and_theirs(torch.float64, attention="sdpa", **kw)
    x = torch.randn(2, kw["in_channels"], kw["image_size"],
                    kw["image_size"], dtype=torch.float64)
    compare(ours, theirs, x, F64)


@pytest.mark.parametrize("kw, extra", [(CONFIGS[0], (8, 4)),
                                       (CONFIGS[0], (-8, -8)),
                                       (CONFIGS[1], (14, 0)),
                                       (CONFIGS[2], (4, 10)),
                                       (CONFIGS[3], (16, 16))])
def test_interpolated_positions_equal_transformers(kw, extra):
    ours, theirs = ours_and_theirs(**kw)
    H, W = kw["image_size"] + extra[0], kw["image_size"] + extra[1]
    x = torch.randn(2, kw["in_channels"], H, W)
    compare(ours, theirs, x, F32, interpolate=True)


def test_interpolation_leaves_an_unchanged_grid_alone():
    table = torch.randn(1, 50, 8)
    assert V.interpolate_positions(table, (7, 7)) is table
    bigger = V.interpolate_positions(table, (9, 11))
    assert bigger.shape == (1, 1 + 99, 8)
    assert torch.equal(bigger[:, 0], table[:, 0])
    with pytest.raises(ValueError, match="square grid"):
        V.interpolate_positions(torch.randn(1, 49, 8), (7, 7))


def test_weights_load_both_ways():
    kw = CONFIGS[2]
    # theirs -> ours: a randomly initialised Hugging Face model
    torch.manual_seed(1)
    hf_config = transformers.ViTConfig(
        image_size=kw["image_size"], patch_size=kw["patch_size"],
        num_channels=kw["in_channels"], hidden_size=kw["dim"],
        num_hidden_layers=kw["depth"], num_attention_heads=kw["heads"],
        intermediate_size=kw["mlp_dim"], num_labels=7,
        attn_implementation="eager")
    theirs = transformers.ViTForImageClassification(hf_config).eval()
    ours = V.import_hf(theirs.state_dict(), hf_config.to_dict()).eval()
    assert ours.config.classes == 7 and ours.config.layer_norm_eps == 1e-12
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(ours(x), theirs(x).logits, **F32)
    # ours -> theirs -> ours: the same tensors come back
    state, config = V.export_hf(ours)
    again = V.import_hf(state, config)
    for (name, a), (_, b) in zip(ours.state_dict().items(),
                                 again.state_dict().items()):
        assert torch.equal(a, b), name
    # the normalisation travels as arguments: ours standardises itself
    digits = V.ViT()
    state, config = V.export_hf(digits)
    back = V.import_hf(state, config, input_mean=0.1307, input_std=0.3081)
    pixels = torch.rand(2, 28, 28)
    torch.testing.assert_close(back(pixels), digits(pixels), **F32)


def test_import_checks_names_and_shapes_before_copying():
    ours, theirs = ours_and_theirs(**CONFIGS[0])
    state, config = V.export_hf(ours)
    wrong = dict(state)
    del wrong["classifier.bias"]
    with pytest.raises(ValueError, match="missing.*classifier.bias"):
        V.import_hf(wrong, config)
    wrong = dict(state, **{"vit.pooler.dense.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected.*pooler"):
        V.import_hf(wrong, config)
    wrong = dict(state)
    wrong["vit.embeddings.position_embeddings"] = torch.zeros(1, 10, 32)
    with pytest.raises(ValueError, match=r"expected shape \(1, 50, 32\), "
                                         r"got \(1, 10, 32\)"):
        V.import_hf(wrong, config)


@pytest.mark.parametrize("field, value, words", [
    ("hidden_act", "gelu_new", "hidden_act: this model supports 'gelu'"),
    ("qkv_bias", False, "qkv_bias: this model supports True"),
    ("model_type", "deit", "model_type"),
    ("patch_size", [4, 2], "one int"),
])
def test_config_from_hf_refuses_what_it_cannot_compute(field, value, words):
    config = V.config_to_hf(V.ViTConfig())
    config[field] = value
    with pytest.raises(ValueError, match=words):
        V.config_from_hf(config)


def test_config_round_trip():
    c = V.ViTConfig(image_size=32, patch_size=8, in_channels=3, classes=5,
                    dim=48, depth=3, heads=6, mlp_dim=72, dropout=0.1,
                    attention_dropout=0.2, layer_norm_eps=1e-6,
                    input_mean=0.0, input_std=1.0)
    assert V.config_from_hf(V.config_to_hf(c)) == c
    with pytest.raises(ValueError, match="position embeddings"):
        V.config_to_hf(V.ViTConfig(position_embeddings=False))


# --------------------------------------------------------------------------
# wrong inputs
# --------------------------------------------------------------------------


def test_wrong_inputs_name_expected_and_actual():
    model = V.ViT()
    with pytest.raises(ValueError, match=r"image size 30x30 is not "
                                         r"divisible by the patch size 4"):
        model(torch.rand(2, 30, 30))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\) or \(B, H, W\) "
                                         r"with 1 channel\(s\), got "
                                         r"\(2, 3, 28, 28\)"):
        model(torch.rand(2, 3, 28, 28))
    with pytest.raises(ValueError, match="expected 28x28 images, got "
                                         "32x32"):
        model(torch.rand(2, 32, 32))
    with pytest.raises(TypeError, match="expected float pixels, got "
                                        "torch.uint8"):
        model(torch.zeros(2, 28, 28, dtype=torch.uint8))
    colour = V.ViT(V.ViTConfig(image_size=32, patch_size=8, in_channels=3))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\) with 3 "
                                         r"channel\(s\), got \(2, 32, 32\)"):
        colour(torch.rand(2, 32, 32))
    with pytest.raises(ValueError, match="image size 28x28 is not "
                                         "divisible by the patch size 5"):
        V.ViTConfig(patch_size=5)
    with pytest.raises(ValueError, match="heads must divide dim: got "
                                         "dim=64, heads=5"):
        V.ViTConfig(heads=5)
    with pytest.raises(ValueError, match="patchify expected images"):
        V.patchify(torch.rand(28, 28), 4)


# --------------------------------------------------------------------------
# the hybrid
# --------------------------------------------------------------------------


def test_hybrid_tokens_are_the_feature_map_flattened_row_by_row():
    torch.manual_seed(0)
    hybrid = V.HybridViT().eval()
    x = torch.rand(3, 28, 28)
    maps = hybrid.feature_map(x)  # (3, 128, 4, 4): the ResNet's last map
    assert maps.shape == (3, 128, 4, 4)
    tokens = hybrid.tokens(x)
    assert tokens.shape == (3, 16, 128)
    for i in range(4):
        for j in range(4):
            assert torch.equal(tokens[:, i * 4 + j], maps[:, :, i, j])
    # the map is the CNN chapter's ResNet's, and the ViT reads exactly it
    assert hybrid.config.cnn == V.ResNetConfig()
    assert torch.equal(maps, hybrid.cnn.feature_maps(x)[-1])
    torch.testing.assert_close(hybrid(x), hybrid.vit(maps), **F32)
    # its patch embedding (1x1 patches) is one linear map per position
    w = hybrid.vit.patch_embed.projection.weight.view(64, 128)
    torch.testing.assert_close(hybrid.vit.patch_embed(maps),
                               tokens @ w.T +
                               hybrid.vit.patch_embed.projection.bias,
                               **F32)
    assert hybrid.config.feature_size == 4
    assert hybrid.vit.config.grid == 4


def test_hybrid_feature_size_follows_the_cnn():
    config = V.HybridConfig(image_size=32, cnn=V.ResNetConfig(
        widths=(16, 32, 48), blocks=(1, 1, 1)))
    hybrid = V.HybridViT(config)
    maps = hybrid.feature_map(torch.rand(2, 32, 32))
    assert maps.shape[-1] == config.feature_size == 4
    assert hybrid(torch.rand(2, 32, 32)).shape == (2, 10)


# --------------------------------------------------------------------------
# inside a ViT
# --------------------------------------------------------------------------


def test_attention_rollout_follows_the_formula_and_restores_flags():
    torch.manual_seed(0)
    model = V.ViT(V.ViTConfig(dim=32, depth=3, heads=4, mlp_dim=32))
    model.train()
    x = torch.rand(2, 28, 28)
    weights = V.attention_maps(model, x)
    assert len(weights) == 3 and weights[0].shape == (2, 4, 50, 50)
    assert model.training and not any(b.attn.record_weights
                                       for b in model.blocks)
    eye = torch.eye(50)
    rollout = eye.expand(2, 50, 50)
    for w in weights:
        a = (w.mean(1) + eye) / 2  # rows already sum to 1
        rollout = a @ rollout
    maps = V.attention_rollout(model, x)
    torch.testing.assert_close(maps, rollout[:, 0, 1:].view(2, 7, 7),
                               **F32)
    # what does not reach the patches stays with the class token
    torch.testing.assert_close(maps.sum((1, 2)) + rollout[:, 0, 0],
                               torch.ones(2), **F32)
    # the weights are the ones the attention computes
    with torch.no_grad():
        h = model.blocks[0].norm1(model.embed(x))
        _, w0 = model.blocks[0].attn(h, h, h, need_weights=True)
    torch.testing.assert_close(weights[0], w0, **F32)


def test_position_similarity_is_cosine_on_the_grid():
    torch.manual_seed(0)
    model = V.ViT()
    s = V.position_similarity(model)
    assert s.shape == (7, 7, 7, 7)
    torch.testing.assert_close(torch.diagonal(s.view(49, 49)),
                               torch.ones(49), **F32)
    p = model.positions[0, 1:].detach()
    torch.testing.assert_close(s[2, 3, 4, 5], F.cosine_similarity(
        p[2 * 7 + 3], p[4 * 7 + 5], dim=0), **F32)
    with pytest.raises(ValueError, match="no position embeddings"):
        V.position_similarity(V.ViT(V.ViTConfig(position_embeddings=False)))


def test_the_hybrid_tokens_see_the_receptive_field_the_chapter_states():
    chain = [(5, 1, 1), (2, 2, 1), (3, 1, 1), (3, 1, 1), (3, 2, 1),
             (3, 1, 1), (3, 2, 1), (3, 1, 1)]
    size = receptive_field(chain)[-1][0]
    assert size == 50
    torch.manual_seed(0)
    hybrid = V.HybridViT().eval()
    # on a 64-pixel image a middle token's field is not cut by the border
    big = V.HybridViT(V.HybridConfig(image_size=64)).eval()
    image = torch.rand(1, 64, 64, requires_grad=True)
    tokens = big.tokens(image)  # (1, 64, 128): an 8x8 grid
    grad, = torch.autograd.grad(tokens[0, 3 * 8 + 3].sum(), image)
    rows = grad[0].abs().sum(dim=1).nonzero()
    cols = grad[0].abs().sum(dim=0).nonzero()
    assert rows.max() - rows.min() + 1 == size  # exactly the chain's
    assert cols.max() - cols.min() + 1 == size
    image = torch.rand(1, 28, 28, requires_grad=True)
    hybrid.tokens(image)[0, 0].sum().backward()  # the top-left token
    rows = image.grad[0].abs().sum(dim=1).nonzero()
    assert rows.min() == 0 and rows.max() + 1 == 26


# --------------------------------------------------------------------------
# the full run
# --------------------------------------------------------------------------


@pytest.fixture
def tiny_split(monkeypatch, tmp_path):
    """Every part of the full run on 256 + 100 digits, weights in tmp."""
    from cave.fundamentals.data import mnist_split

    (tx, ty), (vx, vy) = mnist_split(seed=0)
    monkeypatch.setattr(V, "mnist_split",
                        lambda seed=0: ((tx[:256], ty[:256]),
                                        (vx[:100], vy[:100])))
    monkeypatch.setattr(V, "WEIGHTS", tmp_path / "vit.safetensors")
    return tmp_path


def test_full_run_parts_record_and_save(tiny_split, monkeypatch):
    assert V.FULL_RUN_PARTS == ("vit", "hybrid", "efficiency_mlp",
                                "efficiency_resnet", "efficiency_vit",
                                "efficiency_hybrid")
    timed = []  # the step timings, stubbed: tested on their own below
    monkeypatch.setattr(V, "step_seconds", lambda make, x, y, device: (
        timed.append(make().config) or {"float32": 1.0, "bfloat16": 2.0}))
    assert sum(p.numel() for p in V.ViT(V.VIT_MODEL).parameters()) == \
        sum(p.numel() for p in V.ViT().parameters()) == 205_962  # 7x7, 4x4
    run = V.full_run("cpu", part="vit", epochs=1, batch_size=128,
                     model_depth=1)  # a model override: one layer
    assert run["train"]["epochs"] == 1 and 0 <= run["best_val_acc"] <= 1
    assert run["model"] == {**V.dataclasses.asdict(V.VIT_MODEL), "depth": 1}
    assert run["model"]["patch_size"] == 7 and not run["train"]["bf16"]
    assert timed == [V.ViTConfig(**run["model"]), V.ViTConfig()]  # 7, 4
    assert set(run["step_seconds"]) == {"recipe's model",
                                        "ViT with 4x4 patches"}
    loaded = V.load_trained_vit(V.WEIGHTS, V.ViTConfig(**run["model"]))
    assert not loaded.training
    with torch.no_grad():
        x = torch.rand(3, 28, 28)
        torch.testing.assert_close(loaded(x), loaded(x), **F32)
    eff = V.full_run("cpu", part="efficiency_hybrid", steps=2,
                     sizes=(64, 128))
    assert eff["model"] == "hybrid" and set(eff["accuracy"]) == {"64",
                                                                 "128"}
    assert eff["accuracy"]["64"]["epochs"] == 2  # one batch an epoch
    assert eff["accuracy"]["128"]["epochs"] == 2
    with pytest.raises(ValueError, match="part must be one of"):
        V.full_run("cpu", part="nope")
    with pytest.raises(ValueError, match="unknown override"):
        V.full_run("cpu", part="vit", epoch=1)


def test_cli_records_each_part_as_its_own_entry(monkeypatch, tmp_path):
    monkeypatch.setattr(V, "full_run", lambda device=None, part="vit",
                        **kw: {"part_was": part, **kw})
    path = tmp_path / "vit.json"
    assert cli.main(["run", "vit", "--full", "part=hybrid", "epochs=2",
                     "--json", str(path)]) == 0
    import json

    record = json.loads(path.read_text())
    assert record["hybrid"]["part_was"] == "hybrid"
    assert record["hybrid"]["epochs"] == 2


def test_recorded_full_run_has_every_part():
    from cave.fundamentals.data import load_results

    record = load_results("vit")
    assert set(V.FULL_RUN_PARTS) <= set(record)
    assert record["vit"]["model"] == V.dataclasses.asdict(V.VIT_MODEL)
    # the records are of the models and recipes the module now defines
    assert record["hybrid"]["model"] == json.loads(json.dumps(
        V.dataclasses.asdict(V.HybridConfig())))  # tuples read as lists
    for part, recipe in (("vit", V.VIT_RECIPE), ("hybrid", V.HYBRID_RECIPE)):
        assert record[part]["train"]["epochs"] == recipe.epochs
    models = V.era_models()
    for part, name in V.EFFICIENCY_PARTS.items():
        run = record[part]  # older records kept the steps in the config
        assert run.get("steps", run["config"]["steps"]) == \
            V.EfficiencyConfig().steps_for(models[name][1]), part
    assert V.WEIGHTS.is_file() and V.WEIGHTS.stat().st_size < 2_000_000
    for part, name in V.EFFICIENCY_PARTS.items():
        run = record[part]
        assert run["model"] == name
        assert set(run["accuracy"]) == {str(n)
                                        for n in run["config"]["sizes"]}


def test_efficiency_steps_are_a_share_of_each_recipe():
    config = V.EfficiencyConfig()
    models = V.era_models()
    steps = {name: config.steps_for(recipe)
             for name, (_, recipe) in models.items()}
    assert steps["MLP"] == steps["ResNet"] == 315  # 15 epochs of 63, / 3
    assert steps["ViT"] == round(V.VIT_RECIPE.epochs * 63 / 3)
    assert steps["hybrid"] == round(V.HYBRID_RECIPE.epochs * 63 / 3)
    assert V.EfficiencyConfig(steps=7).steps_for(V.VIT_RECIPE) == 7
    with pytest.raises(ValueError, match=r"share in \(0, 1\]"):
        V.EfficiencyConfig(share=0.0)


def test_step_seconds_times_both_precisions():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (8, 28, 28), dtype=torch.uint8)
    y = torch.randint(0, 10, (8,))
    seconds = V.step_seconds(lambda: V.ViT(V.ViTConfig(
        patch_size=7, dim=16, depth=1, heads=2, mlp_dim=16)), x, y, "cpu",
        repeats=1)
    assert set(seconds) == {"float32", "bfloat16"}
    assert all(0 < t < 10 for t in seconds.values())
