"""Editing on the sampler contract: SDEdit, inpainting (replacement and RePaint), DDIM inversion."""
import math

import pytest
import torch

import ddpm_nb
from ddpm_nb.config import DiffusionConfig, UNetConfig
from ddpm_nb.diffusion import GaussianDiffusion
from ddpm_nb.edit import ddim_invert, ddim_reconstruct, img2img, inpaint
from ddpm_nb.sample import ConfigError
from ddpm_nb.unet import UNet

from test_samplers import GaussianDataModel


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return UNet(UNetConfig.tiny()).eval(), GaussianDiffusion(DiffusionConfig(timesteps=1000, schedule="cosine"))


@pytest.fixture(scope="module")
def fashion():
    model, diffusion, cfg = ddpm_nb.pretrained("fashion-quick-cond", device="cpu")
    from ddpm_nb.data import real_images
    images = real_images(cfg.data.replace(class_cond=False, limit=None), 28, 4, split="test", seed=0)
    return model, diffusion, images


def test_img2img_keeps_the_input_at_small_t0_and_forgets_it_at_large(fashion):
    model, diffusion, images = fashion
    y = torch.arange(4) % 10
    dist = {}
    for t0 in (20, 400, 900):
        out = img2img(model, diffusion, images, t0, steps=10, y=y, generator=torch.Generator().manual_seed(0),
                      progress=False)
        dist[t0] = (out - images).pow(2).mean().sqrt().item()
    assert dist[20] < 0.1 < dist[400] < dist[900], dist
    again = img2img(model, diffusion, images, 400, steps=10, y=y, generator=torch.Generator().manual_seed(0),
                    progress=False)
    other = img2img(model, diffusion, images, 400, steps=10, y=y, generator=torch.Generator().manual_seed(1),
                    progress=False)
    assert math.isclose((again - images).pow(2).mean().sqrt().item(), dist[400], rel_tol=1e-5)
    assert (again - other).abs().max() > 0.1  # the noise comes from the generator


def test_img2img_starts_exactly_at_t0_with_q_sample(tiny):
    """With one DDIM step from t0 the result is the network's x0 estimate at the noised input: compare with
    q_sample and split_output done by hand."""
    model, d = tiny
    x0 = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = img2img(model, d, x0, 300, steps=1, generator=torch.Generator().manual_seed(5), progress=False)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    t = torch.full((2,), 300)
    x_t = d.q_sample(x0, t, eps)
    with torch.no_grad():
        _, x0_hat = d.split_output(model(x_t, t), x_t, t)
    torch.testing.assert_close(out, x0_hat.clamp(-1, 1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kw", [dict(), dict(resample=3, jump=2), dict(sampler="ddim", eta=1.0, steps=20)])
def test_inpaint_leaves_the_known_pixels_exact(tiny, kw):
    model, d = tiny
    x0 = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :, :8] = 1  # left half known
    out = inpaint(model, d, x0, mask, steps=kw.pop("steps", 12), generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(out[..., :8], x0[..., :8])
    assert (out[..., 8:] - x0[..., 8:]).abs().max() > 0.05  # the rest was invented, not copied


def test_repaint_resampling_costs_what_it_should(tiny):
    """RePaint with resample U and jump j redoes each block of j steps U - 1 times (but the last): count calls."""
    model, d = tiny
    calls = []
    orig = model.forward

    def counting(x, t, y=None):
        calls.append(int(t[0]))
        return orig(x, t, y)

    model.forward = counting
    try:
        x0 = torch.zeros(1, 1, 16, 16)
        inpaint(model, d, x0, torch.ones(1, 1, 16, 16), steps=12, resample=3, jump=4,
                generator=torch.Generator().manual_seed(0))
    finally:
        model.forward = orig
    # blocks of 4 steps: the first two are redone twice (3 passes), the last block ends the chain once
    assert len(calls) == 4 * 3 + 4 * 3 + 4


def test_inversion_reconstructs_the_image_better_with_more_steps(fashion):
    model, diffusion, images = fashion
    y = torch.arange(4) % 10
    errors = {}
    for steps in (10, 50):
        latent, ts = ddim_invert(model, diffusion, images, steps=steps, y=y, return_levels=True)
        back = ddim_reconstruct(model, diffusion, latent, ts, y=y, progress=False)
        errors[steps] = (back - images).pow(2).mean().sqrt().item()
    # measured: RMS 0.32 at 10 steps, 0.11 at 50 (pixels in [-1, 1]): the ODE run upwards uses eps at the level
    # it starts from, an error that shrinks with the step
    assert errors[50] < 0.6 * errors[10] and errors[50] < 0.15, errors
    # the latent looks like noise: about unit variance, nothing like the image
    assert 0.6 < latent.std().item() < 1.4


def test_inversion_of_gaussian_data_is_exact_in_the_limit():
    """On the exact ODE of Gaussian data, inversion then DDIM recovers the input to the solver's error."""
    d = GaussianDiffusion(DiffusionConfig(timesteps=1000, schedule="cosine"))
    model = GaussianDataModel(d)
    model.cfg = UNetConfig(image_size=4, in_channels=1, base_channels=8, channel_mults=(1,), num_res_blocks=1,
                           attn_resolutions=(), norm_groups=4)
    x0 = 0.3 + 0.5 * torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    err = []
    for steps in (20, 100):
        latent, ts = ddim_invert(model, d, x0.clamp(-1, 1), steps=steps, return_levels=True)
        back = ddim_reconstruct(model, d, latent, ts, progress=False)
        err.append((back - x0.clamp(-1, 1)).abs().max().item())
    assert err[1] < err[0] / 3 and err[1] < 0.05, err  # first order: 0.18 at 20 steps, 0.04 at 100


def test_editing_refuses_bad_input_in_one_line(tiny):
    model, d = tiny
    x = torch.zeros(1, 1, 16, 16)
    cases = [
        (lambda: img2img(model, d, x, 1000), "t0 must be an integer timestep in 0..999"),
        (lambda: img2img(model, d, torch.zeros(1, 3, 16, 16), 10), "must be (B, 1, 16, 16)"),
        (lambda: inpaint(model, d, x, torch.ones(1, 1, 8, 8)), "mask must be"),
        (lambda: inpaint(model, d, x, torch.ones(1, 1, 16, 16), sampler="dpm++2m"), "without a history"),
        (lambda: inpaint(model, d, x, torch.ones(1, 1, 16, 16), resample=0), "at least 1"),
        (lambda: img2img(model, d, x, 10, sampler="nope"), "unknown sampler"),
    ]
    for call, words in cases:
        with pytest.raises(ConfigError) as err:
            call()
        assert words in str(err.value) and "\n" not in str(err.value)
