"""The text-to-image chapter: the noise schedule, the forward process and
every sampler update equal diffusers' DDPMScheduler and DDIMScheduler step
for step; cross-attention equals nn.MultiheadAttention with kdim and vdim;
classifier-free guidance has the right sign."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn

from cave.frontiers.text_to_image import (FULL_RUN_PARTS, CrossAttention,
                                          NoiseSchedule, TextToImage,
                                          TextToImageConfig, UNet,
                                          UNetConfig, cosine_betas,
                                          ddim_step, ddpm_step,
                                          diffusion_loss, full_run, guide,
                                          guided, linear_betas,
                                          load_multihead_attention, sample,
                                          sampling_steps)

# Both sides compute in float32 from the same float32 alphas_cumprod; the
# cosine betas come from float64 here and Python floats there, which can
# differ in the last bit (6e-8 relative); a step then moves by a few ulps
# of numbers of order one, amplified by 1/sqrt(alpha_bar) near t = T.
TOL = dict(atol=1e-5, rtol=1e-5)
SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
CONFIGS = [("linear", "epsilon"), ("cosine", "epsilon"),
           ("linear", "v_prediction"), ("cosine", "v_prediction")]


def theirs(cls, kind, prediction, steps=1000, **kw):
    return cls(num_train_timesteps=steps, beta_schedule=SCHEDULES[kind],
               prediction_type=prediction, **kw)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [1000, 200])
def test_schedule_equals_diffusers(kind, steps):
    ours = NoiseSchedule.make(kind, steps)
    ref = theirs(DDPMScheduler, kind, "epsilon", steps)
    torch.testing.assert_close(ours.betas, ref.betas, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod,
                               atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_add_noise_and_velocity_equal_diffusers(kind):
    ours, ref = NoiseSchedule.make(kind), theirs(DDPMScheduler, kind,
                                                 "epsilon")
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 1, 28, 28, generator=g) * 2 - 1
    noise = torch.randn(6, 1, 28, 28, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    torch.testing.assert_close(ours.add_noise(x0, noise, t),
                               ref.add_noise(x0, noise, t), **TOL)
    torch.testing.assert_close(ours.velocity(x0, noise, t),
                               ref.get_velocity(x0, noise, t), **TOL)


@pytest.mark.parametrize("kind,prediction", CONFIGS)
@pytest.mark.parametrize("n", [None, 25])
def test_ddpm_steps_equal_diffusers(kind, prediction, n):
    """Every update of a whole chain, on the same inputs: all 1,000 steps
    or 25 'leading' ones; the noise from identically seeded generators."""
    ours = NoiseSchedule.make(kind)
    ref = theirs(DDPMScheduler, kind, prediction)
    if n is not None:
        ref.set_timesteps(n)
    times = sampling_steps(ours, n)
    assert times == ref.timesteps.tolist()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 28, 28, generator=g)
    outputs = torch.randn(len(times), 2, 1, 28, 28, generator=g)
    picked = range(len(times)) if n else [0, 1, 500, 998, 999]
    for i in picked:
        t = times[i]
        prev = times[i + 1] if i + 1 < len(times) else -1
        expected = ref.step(outputs[i], t, x,
                            generator=torch.Generator().manual_seed(i)
                            ).prev_sample
        got = ddpm_step(ours, outputs[i], t, x, prev,
                        torch.Generator().manual_seed(i), prediction)
        torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize("kind,prediction", CONFIGS)
@pytest.mark.parametrize("n,eta", [(25, 0.0), (50, 0.0), (10, 0.7)])
@pytest.mark.parametrize("clipped_eps", [False, True])
def test_ddim_steps_equal_diffusers(kind, prediction, n, eta, clipped_eps):
    """clipped_eps is diffusers' use_clipped_model_output: the random
    outputs put x0_hat outside [-1, 1] at most steps, so the two differ."""
    ours = NoiseSchedule.make(kind)
    ref = theirs(DDIMScheduler, kind, prediction)
    ref.set_timesteps(n)
    times = sampling_steps(ours, n)
    assert times == ref.timesteps.tolist()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 1, 28, 28, generator=g)
    for i, t in enumerate(times):
        prev = times[i + 1] if i + 1 < len(times) else -1
        out = torch.randn(2, 1, 28, 28, generator=g)
        z = torch.randn(2, 1, 28, 28, generator=g)
        expected = ref.step(out, t, x, eta=eta,
                            use_clipped_model_output=clipped_eps,
                            variance_noise=z if eta else None).prev_sample
        got = ddim_step(ours, out, t, prev, x, eta, z if eta else None,
                        prediction, clipped_eps=clipped_eps)
        torch.testing.assert_close(got, expected, **TOL)
        x = got  # walk the chain on our own output


def fake_model(x, t):
    """A fixed denoiser that depends on x and t, for whole loops."""
    return torch.tanh(x) * (t.float() / 1000).view(-1, 1, 1, 1) + 0.1 * x


@pytest.mark.parametrize("method,n", [("ddpm", 1000), ("ddpm", 20),
                                      ("ddim", 25)])
def test_sampling_loops_equal_diffusers(method, n):
    """Whole loops: x_T from the generator, then every step, as the
    diffusers pipelines run them (DDPMPipeline passes the generator)."""
    kind = "cosine" if method == "ddim" else "linear"
    ours = NoiseSchedule.make(kind)
    cls = DDPMScheduler if method == "ddpm" else DDIMScheduler
    ref = theirs(cls, kind, "epsilon")
    ref.set_timesteps(n)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 1, 28, 28, generator=g)
    for t in ref.timesteps:
        out = fake_model(x, t.expand(2))
        kw = ({"generator": g} if method == "ddpm"
              else {"use_clipped_model_output": True})  # our default
        x = ref.step(out, t, x, **kw).prev_sample
    got = sample(fake_model, ours, (2, 1, 28, 28), n, method,
                 torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, x, atol=1e-4, rtol=1e-4)


def test_guidance_sign():
    """eps_u + w (eps_c - eps_u): w = 0 unconditional, w = 1 conditional,
    w > 1 beyond the conditional, away from the unconditional."""
    cond, uncond = torch.randn(3, 1, 28, 28), torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(guide(cond, uncond, 0.0), uncond)
    torch.testing.assert_close(guide(cond, uncond, 1.0), cond)
    far = guide(cond, uncond, 3.0)
    torch.testing.assert_close(far - cond, 2.0 * (cond - uncond))
    slipped = cond + 3.0 * (uncond - cond)  # the published error
    assert not torch.allclose(slipped, far)


def small_model():
    torch.manual_seed(0)
    return TextToImage(TextToImageConfig(unet=UNetConfig(
        channels=(8, 16), attention=(False, True), heads=2, time_dim=32,
        groups=4))).eval()


def test_guided_batches_equal_two_calls():
    model = small_model()
    ids = model.encode(["a handwritten seven", "the digit 3"])
    empty = model.encode(["", ""])
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([10, 900])
    with torch.no_grad():
        cond, uncond = model(x, t, ids), model(x, t, empty)
        got = guided(model, ids, 4.0)(x, t)
        plain = guided(model, ids, 1.0)(x, t)
    torch.testing.assert_close(got, guide(cond, uncond, 4.0), **TOL)
    torch.testing.assert_close(plain, cond, **TOL)


@pytest.mark.parametrize("dim,context_dim,heads", [(32, 64, 4), (48, 16, 3),
                                                   (16, 64, 1)])
def test_cross_attention_equals_multihead_attention(dim, context_dim, heads):
    torch.manual_seed(0)
    ours = CrossAttention(dim, context_dim, heads)
    ref = nn.MultiheadAttention(dim, heads, kdim=context_dim,
                                vdim=context_dim, batch_first=True)
    with torch.no_grad():
        ref.in_proj_bias.normal_()  # not zeros, so the copy is tested
    load_multihead_attention(ours, ref)
    x = torch.randn(3, 49, dim, requires_grad=True)
    z = torch.randn(3, 7, context_dim, requires_grad=True)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, 4:], mask[2, 2:] = False, False
    expected, _ = ref(x, z, z, key_padding_mask=~mask)
    for record in (False, True):  # the fused path and the readable path
        ours.record_weights = record
        got = ours(x, z, mask)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    gx, gz = torch.autograd.grad(got.square().sum(), (x, z))
    rx, rz = torch.autograd.grad(expected.square().sum(), (x, z))
    torch.testing.assert_close(gx, rx, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gz, rz, atol=1e-4, rtol=1e-4)
    _, ref_weights = ref(x, z, z, key_padding_mask=~mask,
                         average_attn_weights=False)
    torch.testing.assert_close(ours.weights, ref_weights.detach(),
                               atol=1e-6, rtol=1e-5)
    assert ours.weights[0, :, :, 4:].abs().max() == 0  # padding ignored


def test_unet_shapes_and_padding():
    """Output like the input; padding tokens change nothing."""
    torch.manual_seed(0)
    unet = UNet(UNetConfig(channels=(8, 16, 16), heads=2, time_dim=32,
                           groups=4, context_dim=12)).eval()
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([3, 700])
    context, mask = torch.randn(2, 5, 12), torch.ones(2, 5, dtype=torch.bool)
    mask[:, 3:] = False
    out = unet(x, t, context, mask)
    assert out.shape == x.shape
    changed = context.clone()
    changed[:, 3:] = 100.0  # what padding holds must not matter
    torch.testing.assert_close(unet(x, t, changed, mask), out)


def test_loss_trains_and_drops_captions():
    model = small_model().train()
    g = torch.Generator().manual_seed(0)
    ids = model.encode(["seven"] * 1000)
    dropped = model.drop_captions(ids, g)
    empty = model.encode([""])[0]
    share = (dropped == empty).all(dim=1).float().mean().item()
    assert 0.07 < share < 0.13  # caption_dropout = 0.1
    images = torch.randint(0, 256, (16, 28, 28), dtype=torch.uint8)
    loss = model.loss(images, ids[:16], generator=g)
    loss.backward()
    assert 0.5 < loss.item() < 2.0  # about the variance of the noise
    assert model.text.token_embedding.weight.grad.abs().sum() > 0


def test_diffusion_loss_targets():
    """A model that outputs the true target has zero loss, for both."""
    schedule = NoiseSchedule.make("cosine")
    x0 = torch.rand(4, 1, 28, 28) * 2 - 1
    for prediction in ("epsilon", "v_prediction"):
        def perfect(x_t, t, x0=x0):
            a = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
            eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
            return (eps if prediction == "epsilon"
                    else schedule.velocity(x0, eps, t))
        loss = diffusion_loss(perfect, x0, schedule, prediction=prediction,
                              generator=torch.Generator().manual_seed(0))
        assert loss.item() < 1e-6


def test_bad_input_messages():
    with pytest.raises(ValueError, match=r"kind must be one of"):
        NoiseSchedule.make("quadratic")
    with pytest.raises(ValueError, match=r"every beta must lie in \(0, 1\)"):
        NoiseSchedule(torch.tensor([0.1, 1.5]))
    schedule = NoiseSchedule(linear_betas(10))
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match=r"steps t must be integers in "
                                         r"\[0, 10\), got \[3, 10\]"):
        schedule.add_noise(x, x, torch.tensor([3, 10]))
    with pytest.raises(ValueError, match=r"noise must have x0's shape"):
        schedule.add_noise(x, x[:1], torch.tensor([3, 4]))
    with pytest.raises(ValueError, match=r"prediction must be one of"):
        diffusion_loss(lambda x, t: x, x, schedule, prediction="sample")
    with pytest.raises(ValueError, match=r"n must be in \[1, 10\], got 11"):
        sampling_steps(schedule, 11)
    with pytest.raises(ValueError, match=r"method must be 'ddpm' or 'ddim'"):
        sample(lambda x, t: x, schedule, (1, 1, 4, 4), method="euler")
    with pytest.raises(ValueError, match=r"needs noise"):
        ddim_step(schedule, x, 5, 4, x, eta=0.5)
    cross = CrossAttention(8, 6, 2)
    with pytest.raises(ValueError, match=r"context must be \(B=2, L, "
                                         r"context_dim=6\), got \(2, 3, 8\)"):
        cross(torch.zeros(2, 5, 8), torch.zeros(2, 3, 8))
    with pytest.raises(ValueError, match=r"context_mask must be bool"):
        cross(torch.zeros(2, 5, 8), torch.zeros(2, 3, 6),
              torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"heads must divide dim"):
        CrossAttention(10, 6, 4)
    with pytest.raises(ValueError, match=r"expected \(embed_dim, kdim, "
                                         r"vdim, num_heads\) = "):
        load_multihead_attention(cross, nn.MultiheadAttention(
            8, 2, kdim=5, vdim=5))
    with pytest.raises(ValueError, match=r"groups=8 and heads=4 must "
                                         r"divide every width, got \[12\]"):
        UNetConfig(channels=(16, 12), attention=(False, True))
    with pytest.raises(ValueError, match=r"context_dim must equal the text "
                                         r"encoder's dim: got 32 and 64"):
        TextToImageConfig(unet=UNetConfig(context_dim=32))
    unet = UNet(UNetConfig(channels=(8,), attention=(True,), heads=2,
                           groups=4, context_dim=6))
    with pytest.raises(ValueError, match=r"UNet expected x of shape "
                                         r"\(B, 1, 28, 28\), got"):
        unet(torch.zeros(2, 1, 32, 32), torch.zeros(2, dtype=torch.long),
             torch.zeros(2, 3, 6), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"part must be one of"):
        full_run(part="everything")
    assert FULL_RUN_PARTS == ("classifier", "diffusion", "evaluate",
                              "ddim")
    assert torch.equal(cosine_betas(4), NoiseSchedule.make(
        "cosine", 4).betas)
