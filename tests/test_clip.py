"""docs/frontiers/clip.md against Hugging Face transformers and by hand.

Tolerances: float32 comparisons use rtol=atol=1e-5 (values of order 1
to 10, the logits scaled by up to 1/0.07; sums run in different orders in
different kernels); float64 uses 1e-10. The reference is transformers
5.24's CLIPModel (eager attention; sdpa in float64, since eager takes
its softmax in float32), built from small random
configurations through export_hf: widths 16 to 48, 1 to 4 heads, 1 to 3
layers per tower, patch sizes 4 to 14, with every weight random (norm
gains and biases too). Logits per image, per text and the loss
(return_loss=True, diagonal targets) are compared, and the gradients of
every parameter through the name table.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from cave.frontiers import clip as C
from cave.transformers.vit import HybridConfig, HybridViT, ViTConfig

import transformers  # noqa: E402  (a test requirement: never skip)

F32 = {"rtol": 1e-5, "atol": 1e-5}
F64 = {"rtol": 1e-10, "atol": 1e-10}

CONFIGS = [  # vision (patch, dim, heads, depth, mlp), text (...), embed
    dict(vision=(7, 32, 4, 2, 64), text=(32, 4, 2, 64), embed=16),
    dict(vision=(4, 16, 1, 1, 24), text=(48, 3, 3, 96), embed=24),
    dict(vision=(14, 48, 2, 3, 40), text=(16, 2, 1, 32), embed=8),
]


def make_config(vision, text, embed, scale_init=0.07):
    P, D, H, L, M = vision
    image = ViTConfig(image_size=28, patch_size=P, in_channels=1,
                      classes=10, dim=D, depth=L, heads=H, mlp_dim=M,
                      dropout=0.0, attention_dropout=0.0,
                      layer_norm_eps=1e-5, position_embeddings=True,
                      input_mean=0.1307, input_std=0.3081)
    D, H, L, M = text
    return C.CLIPConfig(image=image,
                        text=C.TextConfig(dim=D, heads=H, depth=L,
                                          mlp_dim=M),
                        embed_dim=embed, init_temperature=scale_init)


def randomise(model, seed):
    """Every parameter random: norm gains around 1, the rest around 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name == "logit_scale":
                p.copy_(math.log(1 / 0.07) - 0.5 * noise.abs())
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.3 * noise)
            else:
                p.copy_(0.3 * noise if p.ndim < 2 or "positions" in name
                        else noise / math.sqrt(p.shape[-1]))


def ours_and_theirs(kw, seed=0, dtype=torch.float32, attention="eager"):
    torch.manual_seed(seed)
    ours = C.CLIP(make_config(**kw))
    randomise(ours, seed)
    ours.to(dtype)  # before the export: it folds the bias in this dtype
    state, hf = C.export_hf(ours)
    config = transformers.CLIPConfig(
        text_config=hf["text_config"], vision_config=hf["vision_config"],
        projection_dim=hf["projection_dim"],
        logit_scale_init_value=hf["logit_scale_init_value"],
        attn_implementation=attention)
    theirs = transformers.CLIPModel(config).to(dtype)
    theirs.load_state_dict(state, strict=True)
    return ours.eval(), theirs.eval()


def batch(n=6, seed=0):
    """Digits and captions of random templates, train and held-out."""
    (_, _), (x, y) = C_split()
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(x), generator=g)[:n]
    images = x[pick].float() / 255  # (n, 28, 28)
    captions = C.captions_for(y[pick], C.TRAIN_TEMPLATES +
                              C.HELD_OUT_TEMPLATES, g)
    return images, C.CaptionTokenizer().encode(captions), y[pick]


_SPLIT = []


def C_split():
    if not _SPLIT:
        from cave.fundamentals.data import mnist_split
        _SPLIT.append(mnist_split(seed=0))
    return _SPLIT[0]


def hf_pixels(model, images):
    c = model.config.image
    return ((images - c.input_mean) / c.input_std).unsqueeze(1)


# --------------------------------------------------------------------------
# the proof: logits and loss equal transformers.CLIPModel
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kw", CONFIGS)
def test_logits_loss_and_gradients_equal_transformers(kw):
    ours, theirs = ours_and_theirs(kw)
    images, ids, _ = batch()
    per_image, per_text = ours(images, ids)
    out = theirs(input_ids=ids, pixel_values=hf_pixels(ours, images),
                 return_loss=True)
    torch.testing.assert_close(per_image, out.logits_per_image, **F32)
    torch.testing.assert_close(per_text, out.logits_per_text, **F32)
    loss = C.clip_loss(per_image)
    torch.testing.assert_close(loss, out.loss, **F32)
    loss.backward()
    out.loss.backward()
    theirs_params = dict(theirs.named_parameters())
    grads = exported_grads(ours)
    assert set(grads) == set(theirs_params)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, theirs_params[name].grad, **F32,
                                   msg=f"gradient of {name}")
    # the folded bias: one vector added to every patch's position
    pos = theirs_params["vision_model.embeddings.position_embedding.weight"]
    bias = ours.image_encoder.vit.patch_embed.projection.bias
    torch.testing.assert_close(bias.grad, pos.grad[1:].sum(0), **F32)


def exported_grads(model):
    """Our gradients under Hugging Face's names: the model's parameters
    replaced by their gradients (the patch bias by zero, so that nothing
    is folded into the positions' gradient), then exported."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for (name, p), (_, q) in zip(twin.named_parameters(),
                                     model.named_parameters()):
            p.copy_(q.grad)
        twin.image_encoder.vit.patch_embed.projection.bias.zero_()
    return C.export_hf(twin)[0]


def test_equal_to_transformers_in_float64():
    # sdpa: eager attention takes its softmax in float32 whatever the dtype
    ours, theirs = ours_and_theirs(CONFIGS[0], seed=3, dtype=torch.float64,
                                   attention="sdpa")
    images, ids, _ = batch(8, seed=1)
    images = images.double()
    per_image, _ = ours(images, ids)
    out = theirs(input_ids=ids, pixel_values=hf_pixels(ours, images),
                 return_loss=True)
    torch.testing.assert_close(per_image, out.logits_per_image, **F64)
    torch.testing.assert_close(C.clip_loss(per_image), out.loss, **F64)


def test_each_tower_equals_its_transformers_model():
    ours, theirs = ours_and_theirs(CONFIGS[1], seed=2)
    images, ids, _ = batch(5, seed=2)
    states, pooled = ours.text_encoder(ids)
    out = theirs.text_model(input_ids=ids)
    torch.testing.assert_close(states, out.last_hidden_state, **F32)
    torch.testing.assert_close(pooled, out.pooler_output, **F32)
    _, pooled = ours.image_encoder(images)
    out = theirs.vision_model(pixel_values=hf_pixels(ours, images))
    torch.testing.assert_close(pooled, out.pooler_output, **F32)


def test_the_legacy_end_token_rule_lands_on_the_same_position():
    """eos_token_id == 2 makes transformers pool at the largest id: ours
    is the largest, so the pooled states agree either way."""
    ours, theirs = ours_and_theirs(CONFIGS[0], seed=4)
    theirs.text_model.eos_token_id = 2
    _, ids, _ = batch(6, seed=4)
    torch.testing.assert_close(ours.text_encoder(ids)[1],
                               theirs.text_model(input_ids=ids).pooler_output,
                               **F32)


# --------------------------------------------------------------------------
# the loss by hand
# --------------------------------------------------------------------------


def test_loss_is_the_mean_of_row_and_column_cross_entropies_by_hand():
    torch.manual_seed(0)
    logits = torch.randn(7, 7, dtype=torch.float64) * 5

    def ce(rows):  # -log softmax at the diagonal, averaged, by hand
        total = 0.0
        for i, row in enumerate(rows.tolist()):
            top = max(row)
            log_z = top + math.log(sum(math.exp(v - top) for v in row))
            total += log_z - row[i]
        return total / len(rows)

    by_hand = (ce(logits) + ce(logits.T)) / 2
    assert abs(C.clip_loss(logits).item() - by_hand) < 1e-12


def test_matching_targets_spread_each_row_over_its_digit():
    torch.manual_seed(0)
    logits = torch.randn(6, 6, dtype=torch.float64)
    labels = torch.tensor([3, 1, 3, 0, 1, 3])
    match = (labels[:, None] == labels[None, :]).double()
    rows = -(match / match.sum(1, keepdim=True)
             * logits.log_softmax(1)).sum(1).mean()
    cols = -(match / match.sum(0, keepdim=True)
             * logits.log_softmax(0)).sum(0).mean()
    torch.testing.assert_close(C.clip_loss(logits, labels),
                               (rows + cols) / 2, **F64)
    # all labels different: the diagonal targets
    distinct = torch.arange(6)
    torch.testing.assert_close(C.clip_loss(logits, distinct),
                               C.clip_loss(logits), **F64)


# --------------------------------------------------------------------------
# captions and the tokenizer
# --------------------------------------------------------------------------


def test_every_template_fills_encodes_and_decodes_for_every_digit():
    tok = C.CaptionTokenizer()
    assert C.WORDS[0] == "<pad>" and tok.pad_id == 0
    assert (tok.bos_id, tok.eos_id) == (len(C.WORDS) - 2, len(C.WORDS) - 1)
    captions = [C.fill(t, d) for t in C.TRAIN_TEMPLATES +
                C.HELD_OUT_TEMPLATES for d in range(10)]
    ids = tok.encode(captions)
    assert ids.dtype == torch.int64 and ids.shape == (len(captions), 12)
    assert (ids[:, 0] == tok.bos_id).all()
    assert ((ids == tok.eos_id).sum(1) == 1).all()
    assert (ids.argmax(1) == (ids == tok.eos_id).int().argmax(1)).all(), \
        "the end token is each row's largest id"
    assert tok.decode(ids) == captions
    assert C.fill("the digit {number}", 7) == "the digit 7"
    assert C.fill("a handwritten {name}", 7) == "a handwritten seven"


def test_held_out_templates_are_new_phrases_of_training_words():
    train_words = {w for t in C.TRAIN_TEMPLATES for w in t.split()}
    for template in C.HELD_OUT_TEMPLATES:
        assert template not in C.TRAIN_TEMPLATES
        assert set(template.split()) <= train_words, template
    digits = range(10)
    train = {C.fill(t, d) for t in C.TRAIN_TEMPLATES for d in digits}
    assert not train & {C.fill(t, d) for t in C.HELD_OUT_TEMPLATES
                        for d in digits}


def test_captions_follow_their_generator_and_name_each_label():
    labels = torch.tensor([7, 0, 3, 7])
    a = C.captions_for(labels, C.TRAIN_TEMPLATES,
                       torch.Generator().manual_seed(5))
    b = C.captions_for(labels, C.TRAIN_TEMPLATES,
                       torch.Generator().manual_seed(5))
    assert a == b and len(a) == 4
    for caption, d in zip(a, labels.tolist()):
        words = caption.split()
        assert C.NAMES[d] in words or str(d) in words


def test_bad_captions_and_labels_name_expected_and_actual():
    tok = C.CaptionTokenizer()
    with pytest.raises(ValueError, match=r"unknown word\(s\) \['cat'\]"):
        tok.encode(["a photo of a cat"])
    with pytest.raises(ValueError, match="expected at most 10"):
        tok.encode([" ".join(["seven"] * 11)])
    with pytest.raises(TypeError, match="wrap it"):
        tok.encode("seven")
    with pytest.raises(ValueError, match="expected digits 0 to 9, got "
                       "labels from 0 to 12"):
        C.captions_for(torch.tensor([0, 12]), C.TRAIN_TEMPLATES)
    with pytest.raises(ValueError, match="integer labels"):
        C.captions_for(torch.tensor([1.0]), C.TRAIN_TEMPLATES)


# --------------------------------------------------------------------------
# the encoders and configurations
# --------------------------------------------------------------------------


def test_text_encoder_refuses_ids_it_cannot_read():
    enc = C.TextEncoder(C.TextConfig(dim=16, depth=1, heads=2, mlp_dim=16))
    tok = C.CaptionTokenizer()
    ids = tok.encode(["seven", "the digit 7"])
    with pytest.raises(ValueError, match=r"rows \[0\] have no end token"):
        enc(torch.where(ids == tok.eos_id, 0, ids)[:1])
    with pytest.raises(ValueError, match="integer ids"):
        enc(ids.float())
    with pytest.raises(ValueError, match="expected at most max_len=12"):
        enc(torch.cat([ids, ids], dim=1))
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 47\)"):
        enc(ids + 100)


def test_pooled_state_is_the_first_end_token_and_ignores_what_follows():
    torch.manual_seed(0)
    enc = C.TextEncoder(C.TextConfig(dim=16, depth=2, heads=2, mlp_dim=32))
    tok = C.CaptionTokenizer()
    ids = tok.encode(["a handwritten seven", "7"])
    states, pooled = enc(ids)
    end = (ids == tok.eos_id).int().argmax(1)
    torch.testing.assert_close(pooled, states[torch.arange(2), end])
    later = ids.clone()
    later[ids == tok.pad_id] = tok.eos_id  # more end tokens after the first
    torch.testing.assert_close(enc(later)[1], pooled, rtol=0, atol=0)


def test_configs_refuse_bad_fields():
    with pytest.raises(ValueError, match="heads must divide dim"):
        C.TextConfig(dim=30, heads=4)
    with pytest.raises(ValueError, match="eos_id must be an id below"):
        C.TextConfig(eos_id=47)
    with pytest.raises(TypeError, match="ViTConfig or HybridConfig"):
        C.CLIPConfig(image=C.TextConfig())
    with pytest.raises(ValueError, match="exceeds max_scale"):
        C.CLIPConfig(init_temperature=0.001)
    with pytest.raises(ValueError, match="targets must be"):
        C.CLIPRecipe(targets="all")
    with pytest.raises(ValueError, match=r"square logits \(B, B\), got "
                       r"\(2, 3\)"):
        C.clip_loss(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"expected labels \(2,\)"):
        C.clip_loss(torch.zeros(2, 2), torch.zeros(3, dtype=torch.long))


def test_hybrid_tower_reads_the_vit_chapters_hybrid_tokens():
    from cave.classical.cnn import ResNetConfig

    config = HybridConfig(image_size=28,
                          cnn=ResNetConfig(widths=(8, 16), blocks=(1, 1)),
                          dim=16, depth=1, heads=2, mlp_dim=32, dropout=0.0)
    torch.manual_seed(0)
    tower = C.ImageEncoder(config).eval()
    torch.manual_seed(0)
    hybrid = HybridViT(config).eval()  # the same weights, same seed
    x = torch.rand(3, 28, 28)
    with torch.no_grad():
        want = hybrid.vit.embed(hybrid.feature_map(x))  # (B, 1 + N, D)
        torch.testing.assert_close(tower.embed(x), want, rtol=0, atol=0)
        assert want.shape == (3, 1 + 49, 16)
        states, pooled = tower(x)
        assert states.shape == (3, 50, 16)
        torch.testing.assert_close(pooled, states[:, 0])
    with pytest.raises(ValueError, match="no convolutional stem"):
        C.config_to_hf(C.CLIPConfig(image=config))


# --------------------------------------------------------------------------
# zero-shot, retrieval, the full run
# --------------------------------------------------------------------------


def test_zero_shot_and_recall_are_the_nearest_caption_by_hand():
    torch.manual_seed(0)
    model = C.CLIP(make_config(**CONFIGS[0]))
    (_, _), (x, y) = C_split()
    x, y = x[:50], y[:50]
    scores = C.zero_shot(model, x, y, templates=("the digit {number}",))
    u = model.encode_image(x.float() / 255).detach()
    ids = C.CaptionTokenizer().encode([f"the digit {d}" for d in range(10)])
    v = model.encode_text(ids).detach()
    by_hand = ((u @ v.T).argmax(1) == y).float().mean().item()
    assert scores["the digit {number}"] == by_hand == scores["mean"]
    recall = C.recall_at_1(model, x, y, seed=3)
    assert set(recall) == {"image_to_text", "text_to_image"}
    assert all(0 <= r <= 1 for r in recall.values())


@pytest.fixture
def tiny_split(monkeypatch, tmp_path):
    """The full run on 256 + 100 digits, weights in tmp."""
    (tx, ty), (vx, vy) = C_split()
    monkeypatch.setattr(C, "mnist_split",
                        lambda seed=0: ((tx[:256], ty[:256]),
                                        (vx[:100], vy[:100])))
    monkeypatch.setattr(C, "WEIGHTS", tmp_path / "clip.safetensors")
    return tmp_path


def test_full_run_parts_record_and_save(tiny_split):
    assert C.FULL_RUN_PARTS == ("clip", "targets")
    run = C.full_run("cpu", part="clip", epochs=1, batch_size=128)
    assert run["recipe"]["epochs"] == 1
    assert len(run["history"]["step_loss"]) == 2  # 256 digits, 128 a batch
    assert 0 <= run["zero_shot"]["mean"] <= 1
    loaded = C.load_trained_clip(C.WEIGHTS)
    assert not loaded.training
    assert C.zero_shot(loaded, *C.mnist_split()[1]) == run["zero_shot"]
    part = C.full_run("cpu", part="targets", epochs=1, batch_size=128)
    assert {name: r["recipe"]["targets"] for name, r in
            part["runs"].items()} == {"matching": "matching",
                                      "diagonal": "diagonal"}
    with pytest.raises(ValueError, match="part must be one of"):
        C.full_run("cpu", part="nope")
    with pytest.raises(ValueError, match="unknown override"):
        C.full_run("cpu", part="clip", epoch=1)


def test_recorded_full_run_reaches_the_issues_bar_and_its_weights_load():
    from cave.fundamentals.data import load_results

    record = load_results("clip")
    assert set(C.FULL_RUN_PARTS) <= set(record)
    run = record["clip"]
    assert run["model"] == C.dataclasses.asdict(C.TRAINED)
    assert run["zero_shot"]["mean"] >= 0.95
    assert C.WEIGHTS.is_file() and C.WEIGHTS.stat().st_size < 2_000_000
    model = C.load_trained_clip()
    assert sum(p.numel() for p in model.parameters()) == run["parameters"]
    runs = record["targets"]["runs"]
    assert {r["recipe"]["targets"] for r in runs.values()} == \
        {"matching", "diagonal"}
