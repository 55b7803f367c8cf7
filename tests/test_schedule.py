"""Noise schedules: shapes, monotonicity, and the derived quantities against the paper's formulas."""
import math

import pytest
import torch

from ddpm_nb.config import ConfigError, DiffusionConfig
from ddpm_nb.diffusion import GaussianDiffusion
from ddpm_nb.schedule import NoiseSchedule, make_betas, rescale_zero_terminal_snr

NAMES = ["linear", "cosine", "sigmoid", "quadratic"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("T", [50, 1000])
def test_alpha_bar_strictly_decreasing_in_open_unit_interval(name, T):
    s = NoiseSchedule(make_betas(name, T))
    ab = s.alphas_cumprod.double()
    assert ab.shape == (T,)
    assert (ab > 0).all() and (ab < 1).all()
    assert (ab[1:] < ab[:-1]).all()
    # the end of the chain is close to pure noise for every schedule at T = 1000
    if T == 1000:
        assert ab[-1] < 1e-3


def test_linear_matches_ddpm_endpoints():
    b = make_betas("linear", 1000)
    assert b[0].item() == pytest.approx(1e-4)
    assert b[-1].item() == pytest.approx(0.02)
    assert torch.allclose(b[1:] - b[:-1], torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64))


def test_cosine_follows_its_closed_form():
    T, s = 1000, 0.008
    ab = torch.cumprod(1 - make_betas("cosine", T), 0)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in [0, 10, 500, 900]:  # away from the max-beta clip at the very end
        assert ab[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert make_betas("cosine", T).max().item() <= 0.999


def test_derived_buffers_equal_definitions():
    s = NoiseSchedule(make_betas("linear", 100))
    b = make_betas("linear", 100)
    ab = torch.cumprod(1 - b, 0)
    torch.testing.assert_close(s.alphas_cumprod, ab.float())
    torch.testing.assert_close(s.alphas_cumprod_prev[1:], ab[:-1].float())
    assert s.alphas_cumprod_prev[0].item() == 1.0
    torch.testing.assert_close(s.log_snr, torch.log(ab / (1 - ab)).float())
    torch.testing.assert_close(s.sqrt_recipm1_alphas_cumprod, torch.sqrt(1 / ab - 1).float())


def test_posterior_coefficients_equal_bayes_rule():
    """DDPM eq. (6)-(7) against an independent derivation: the product of two Gaussians.

    q(x_{t-1}|x_0) = N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1}) and q(x_t|x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t):
    the posterior precision is 1/(1 - abar_{t-1}) + alpha_t / beta_t, and its mean is
    var * (sqrt(abar_{t-1}) x0 / (1 - abar_{t-1}) + sqrt(alpha_t) x_t / beta_t).
    """
    T = 200
    betas = [float(b) for b in make_betas("cosine", T)]
    d = GaussianDiffusion(DiffusionConfig(timesteps=T, schedule="cosine"))
    abar, prod = [], 1.0
    for b in betas:
        prod *= 1 - b
        abar.append(prod)
    x0 = torch.tensor([[0.3, -0.7]]).reshape(1, 2, 1, 1)
    x_t = torch.tensor([[1.1, 0.2]]).reshape(1, 2, 1, 1)
    for t in [1, 5, 50, 150, T - 1]:
        a_t, ab_prev = 1 - betas[t], abar[t - 1]
        var = 1 / (1 / (1 - ab_prev) + a_t / betas[t])
        mean = var * (math.sqrt(ab_prev) * x0 / (1 - ab_prev) + math.sqrt(a_t) * x_t / betas[t])
        tt = torch.tensor([t])
        m, v, logv = d.q_posterior_mean_variance(x0, x_t, tt)
        torch.testing.assert_close(m, mean.float(), rtol=1e-4, atol=1e-5)
        assert v.item() == pytest.approx(var, rel=1e-4)
        assert logv.item() == pytest.approx(math.log(var), rel=1e-4, abs=1e-5)
    # at t = 0 the posterior is the data point itself: variance 0, mean x0
    m, v, logv = d.q_posterior_mean_variance(x0, x_t, torch.tensor([0]))
    torch.testing.assert_close(m, x0)
    assert v.item() == 0.0
    assert logv.item() == pytest.approx(math.log(d.schedule.posterior_variance[1].item()))


def test_zero_terminal_snr_rescale():
    b = make_betas("linear", 1000)
    z = rescale_zero_terminal_snr(b)
    ab, abz = torch.cumprod(1 - b, 0), torch.cumprod(1 - z, 0)
    assert abz[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert abz[0].item() == pytest.approx(ab[0].item(), rel=1e-9)
    assert (abz[1:] < abz[:-1]).all()
    d = GaussianDiffusion(DiffusionConfig(zero_terminal_snr=True, objective="v"))
    assert d.schedule.alphas_cumprod[-1].item() == 0.0


def test_schedule_follows_device_and_state_dict():
    s = NoiseSchedule(make_betas("sigmoid", 20))
    assert "alphas_cumprod" in s.state_dict()
    s2 = NoiseSchedule(make_betas("linear", 20))
    s2.load_state_dict(s.state_dict())
    torch.testing.assert_close(s2.betas, s.betas)
    assert s.to(torch.float64).alphas_cumprod.dtype == torch.float64


@pytest.mark.parametrize("kw, field", [
    (dict(schedule="exponential"), "DiffusionConfig.schedule"),
    (dict(timesteps=-5), "DiffusionConfig.timesteps"),
    (dict(objective="score"), "DiffusionConfig.objective"),
    (dict(loss_type="l3"), "DiffusionConfig.loss_type"),
    (dict(zero_terminal_snr=True), "DiffusionConfig.zero_terminal_snr"),
])
def test_bad_diffusion_config_names_the_field(kw, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")) as info:
        DiffusionConfig(**kw)
    assert "allowed" in str(info.value) or "must" in str(info.value) or "needs" in str(info.value)
