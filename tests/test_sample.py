"""Samplers: DDIM(eta=1, all steps) == DDPM, determinism, guidance, trajectories."""
import pytest
import torch

from ddpm_nb.config import DiffusionConfig, UNetConfig
from ddpm_nb.diffusion import GaussianDiffusion
from ddpm_nb.sample import ddim_sample, ddim_timesteps, ddpm_sample, model_output, p_sample, sample
from ddpm_nb.unet import UNet


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = UNet(UNetConfig.tiny()).eval()
    return model, GaussianDiffusion(DiffusionConfig(timesteps=40, schedule="linear"))


@pytest.mark.parametrize("clip_x0", [True, False])
def test_ddim_eta1_all_steps_equals_ddpm_ancestral(setup, clip_x0):
    model, d = setup
    shape = (3, 1, 16, 16)
    a = ddpm_sample(model, d, shape, generator=torch.Generator().manual_seed(7), clip_x0=clip_x0, progress=False)
    b = ddim_sample(model, d, shape, steps=d.timesteps, eta=1.0, spacing="uniform",
                    generator=torch.Generator().manual_seed(7), clip_x0=clip_x0, progress=False)
    torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)
    # and it is not trivially equal: another seed gives other images
    c = ddpm_sample(model, d, shape, generator=torch.Generator().manual_seed(8), clip_x0=clip_x0, progress=False)
    assert (a - c).abs().max() > 0.1


def test_ddim_eta0_is_deterministic_given_x_T(setup):
    model, d = setup
    x_T = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    a = ddim_sample(model, d, x_T.shape, steps=10, eta=0.0, x_T=x_T, generator=torch.Generator().manual_seed(1),
                    progress=False)
    b = ddim_sample(model, d, x_T.shape, steps=10, eta=0.0, x_T=x_T, generator=torch.Generator().manual_seed(2),
                    progress=False)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = ddim_sample(model, d, x_T.shape, steps=10, eta=0.5, x_T=x_T, generator=torch.Generator().manual_seed(2),
                    progress=False)
    assert (a - c).abs().max() > 1e-3  # eta > 0 does use the noise


def test_fixed_generator_reproduces_ddpm(setup):
    model, d = setup
    shape = (2, 1, 16, 16)
    a = ddpm_sample(model, d, shape, generator=torch.Generator().manual_seed(5), variance="fixed_large", progress=False)
    b = ddpm_sample(model, d, shape, generator=torch.Generator().manual_seed(5), variance="fixed_large", progress=False)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert a.min() >= -1 and a.max() <= 1


def test_p_sample_adds_posterior_variance_noise(setup):
    """One step from a fixed x_t: the spread over many noise draws equals sqrt(beta_tilde_t)."""
    model, d = setup
    x_t = torch.randn(1, 1, 16, 16).expand(2000, -1, -1, -1).contiguous()
    t = 20
    with torch.no_grad():
        x_prev, _ = p_sample(model, d, x_t, t)
    expected = d.schedule.posterior_variance[t].sqrt().item()
    assert x_prev.std(0).mean().item() == pytest.approx(expected, rel=0.05)
    with torch.no_grad():
        last, x0 = p_sample(model, d, x_t[:2], 0)
    torch.testing.assert_close(last[0], last[1])  # no noise at t = 0


def test_trajectory_shapes_and_endpoints(setup):
    model, d = setup
    x, traj = ddim_sample(model, d, (2, 1, 16, 16), steps=8, return_trajectory=True,
                          generator=torch.Generator().manual_seed(0), progress=False)
    assert traj.x_t.shape == (9, 2, 1, 16, 16) and traj.x0_pred.shape == (9, 2, 1, 16, 16)
    assert traj.timesteps[0] == max(traj.timesteps) and traj.timesteps[-1] == -1
    torch.testing.assert_close(traj.x_t[-1], x)
    assert traj.x_t[0].std() > 0.5  # starts from noise
    x2, traj2 = ddpm_sample(model, d, (1, 1, 16, 16), return_trajectory=True, progress=False)
    assert traj2.x_t.shape[0] == d.timesteps + 1


@pytest.mark.parametrize("spacing", ["uniform", "linspace", "trailing"])
def test_ddim_timesteps(spacing):
    ts = ddim_timesteps(1000, 50, spacing)
    assert len(ts) == 50 and ts == sorted(ts, reverse=True) and all(0 <= t < 1000 for t in ts)
    if spacing == "uniform":
        assert ts[-1] == 0 and ts[0] == 980
    if spacing == "trailing":
        assert ts[0] == 999
    assert ddim_timesteps(1000, 1000, spacing) == list(range(999, -1, -1))
    with pytest.raises(ValueError, match="steps"):
        ddim_timesteps(100, 101, spacing)


def test_ddim_linspace_timesteps_are_exact_at_large_T():
    """float32 linspace rounded T=4000, 2682 steps to ...2310... (exact: 2311); compare every point with
    exact rational rounding (halves to even, numpy's rule) for many step counts, ties included."""
    from fractions import Fraction

    T = 4000
    assert 2311 in ddim_timesteps(T, 2682, "linspace") and 2310 not in ddim_timesteps(T, 2682, "linspace")
    for steps in [2, 3, 15, 27, 1000, 2682, 3999, 4000, *range(5, T, 97)]:
        exact = sorted({round(Fraction(i * (T - 1), steps - 1)) for i in range(steps)}, reverse=True)
        assert ddim_timesteps(T, steps, "linspace") == exact, steps
    assert ddim_timesteps(T, 1, "linspace") == [0]


def test_classifier_free_guidance():
    torch.manual_seed(0)
    model = UNet(UNetConfig.tiny(num_classes=3)).eval()
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([5, 5]), torch.tensor([0, 2])
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, torch.tensor([3, 3]))
        torch.testing.assert_close(model_output(model, x, t, y, 1.0), cond)
        torch.testing.assert_close(model_output(model, x, t, y, 0.0), uncond, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model_output(model, x, t, y, 3.0), uncond + 3 * (cond - uncond), atol=1e-5,
                                   rtol=1e-5)
    d = GaussianDiffusion(DiffusionConfig(timesteps=20))
    a = sample(model, d, 2, steps=5, y=y, guidance_scale=2.0, generator=torch.Generator().manual_seed(0),
               progress=False)
    b = sample(model, d, 2, steps=5, y=y, guidance_scale=0.0, generator=torch.Generator().manual_seed(0),
               progress=False)
    assert a.shape == (2, 1, 16, 16) and (a - b).abs().max() > 1e-4


def test_sampler_restores_training_mode(setup):
    model, d = setup
    model.train()
    sample(model, d, 1, steps=2, progress=False)
    assert model.training
    model.eval()
