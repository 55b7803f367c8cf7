"""Forward process, parameterisation conversions and the training loss."""
import math

import pytest
import torch

from ddpm_nb.config import DiffusionConfig, UNetConfig
from ddpm_nb.diffusion import GaussianDiffusion
from ddpm_nb.unet import UNet


def test_q_sample_matches_iterating_the_markov_chain():
    """Closed form q(x_t|x_0) vs x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) z iterated t times.

    Monte Carlo with N = 100,000 chains per pixel value; the standard error of a mean is
    at most 1/sqrt(N) ~ 0.0032 and of a standard deviation about 0.0022, so a tolerance of
    0.015 is about 5 standard errors.
    """
    T, N = 100, 100_000
    d = GaussianDiffusion(DiffusionConfig(timesteps=T, schedule="linear"))
    betas = d.schedule.betas.double()
    x0 = torch.tensor([-1.0, -0.2, 0.5, 1.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    for t in [0, 9, 49, T - 1]:
        x = x0.expand(N, -1).clone()
        for s in range(t + 1):  # index t means t+1 transitions
            x = torch.sqrt(1 - betas[s]) * x + torch.sqrt(betas[s]) * torch.randn(x.shape, generator=g, dtype=torch.float64)
        closed = d.q_sample(x0.float().expand(N, -1).reshape(N, 4, 1, 1), torch.full((N,), t), generator=g).reshape(N, 4)
        # both Monte Carlo estimates agree with the analytic moments, and with each other
        ab = torch.prod(1 - betas[: t + 1])
        for samples in (x, closed.double()):
            assert torch.allclose(samples.mean(0), ab.sqrt() * x0, atol=0.015)
            assert torch.allclose(samples.std(0), torch.sqrt(1 - ab).expand(4), atol=0.015)
        assert torch.allclose(x.mean(0), closed.double().mean(0), atol=0.02)


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_conversions_round_trip(objective):
    d = GaussianDiffusion(DiffusionConfig(timesteps=1000, schedule="cosine", objective=objective))
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(6, 3, 8, 8, generator=g) * 2 - 1
    eps = torch.randn(6, 3, 8, 8, generator=g)
    t = torch.tensor([0, 1, 100, 500, 900, 998])
    x_t = d.q_sample(x0, t, eps)
    torch.testing.assert_close(d.predict_x0_from_eps(x_t, t, eps), x0, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(d.predict_eps_from_x0(x_t, t, x0), eps, atol=2e-3, rtol=1e-3)
    v = d.get_v(x0, eps, t)
    torch.testing.assert_close(d.predict_x0_from_v(x_t, t, v), x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(d.predict_eps_from_v(x_t, t, v), eps, atol=1e-5, rtol=1e-5)
    # the network output for each objective maps back to the same (eps, x0)
    out = d.target(x0, eps, t)
    e2, x2 = d.split_output(out, x_t, t, clip_x0=False)
    torch.testing.assert_close(x2, x0, atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(e2, eps, atol=2e-3, rtol=1e-3)


def test_v_definition_is_a_rotation():
    """v = sqrt(abar) eps - sqrt(1-abar) x0: with x_t it forms an orthonormal change of basis of (x0, eps)."""
    d = GaussianDiffusion(DiffusionConfig(timesteps=100))
    x0, eps, t = torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2), torch.tensor([3, 30, 60, 99])
    x_t, v = d.q_sample(x0, t, eps), d.get_v(x0, eps, t)
    torch.testing.assert_close(x_t.pow(2) + v.pow(2), x0.pow(2) + eps.pow(2), atol=1e-5, rtol=1e-5)


class _Const(torch.nn.Module):
    """A 'network' that returns a fixed tensor, to check the loss arithmetic."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x, t, y=None):
        return self.out


@pytest.mark.parametrize("loss_type", ["mse", "l1", "huber"])
def test_loss_types_against_formulas(loss_type):
    d = GaussianDiffusion(DiffusionConfig(timesteps=10, loss_type=loss_type))
    x0, noise = torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    out = torch.tensor([0.5, -2.0]).reshape(2, 1, 1, 1).expand(2, 1, 2, 2)
    per = d.training_losses(_Const(out), x0, t=torch.tensor([1, 2]), noise=noise)
    err = torch.tensor([0.5, 2.0])
    expected = {"mse": err ** 2, "l1": err, "huber": torch.where(err < 1, 0.5 * err ** 2, err - 0.5)}[loss_type]
    torch.testing.assert_close(per, expected)


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_min_snr_weights(objective):
    gamma = 5.0
    d = GaussianDiffusion(DiffusionConfig(timesteps=1000, objective=objective, min_snr_gamma=gamma))
    t = torch.tensor([0, 100, 400, 999])
    ab = d.schedule.alphas_cumprod[t].double()
    snr = ab / (1 - ab)
    expected = {"eps": torch.minimum(snr, torch.tensor(gamma)) / snr,
                "x0": torch.minimum(snr, torch.tensor(gamma)),
                "v": torch.minimum(snr, torch.tensor(gamma)) / (snr + 1)}[objective]
    torch.testing.assert_close(d.loss_weight(t).double(), expected, rtol=1e-4, atol=1e-6)
    # early (high-SNR) steps are down-weighted for eps
    if objective == "eps":
        assert d.loss_weight(t)[0] < 0.01 and d.loss_weight(t)[-1].item() == pytest.approx(1.0)


def test_loss_is_fp32_under_low_precision_autocast():
    model = UNet(UNetConfig.tiny())
    d = GaussianDiffusion(DiffusionConfig(timesteps=50))
    x0 = torch.rand(4, 1, 16, 16) * 2 - 1
    seen = {}

    def record(module, inputs, output):
        seen["dtype"] = output.dtype

    model.conv_out.register_forward_hook(record)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        per = d.training_losses(model, x0)
    assert seen["dtype"] == torch.bfloat16      # the network really ran in bf16
    assert per.dtype == torch.float32           # the loss did not
    assert per.shape == (4,) and torch.isfinite(per).all()


def test_training_loss_decreases_on_one_batch():
    """A few optimizer steps on one fixed batch: a real gradient flows through the whole chain."""
    torch.manual_seed(0)
    model = UNet(UNetConfig.tiny())
    d = GaussianDiffusion(DiffusionConfig(timesteps=50))
    x0 = torch.rand(8, 1, 16, 16) * 2 - 1
    t, noise = torch.randint(0, 50, (8,)), torch.randn_like(x0)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    first = None
    for _ in range(30):
        loss = d.loss(model, x0, t=t, noise=noise)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


class _Spy(torch.nn.Module):
    """Records the network input and returns zeros, so the per-sample loss is the target's mean square."""

    def forward(self, x, t, y=None):
        self.x_t, self.t = x.clone(), t.clone()
        return torch.zeros_like(x)


def test_training_losses_draws_t_then_eps_from_its_generator():
    d = GaussianDiffusion(DiffusionConfig(timesteps=50))
    x0 = torch.rand(6, 1, 4, 4) * 2 - 1
    spy = _Spy()
    per = d.training_losses(spy, x0, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # the documented order, replayed by hand
    t = torch.randint(0, 50, (6,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    abar = d.schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1).float()
    torch.testing.assert_close(spy.t, t)
    torch.testing.assert_close(spy.x_t, abar.sqrt() * x0 + (1 - abar).sqrt() * eps)
    torch.testing.assert_close(per, eps.pow(2).flatten(1).mean(1))  # zero output: the loss is |eps|^2


def test_input_perturbation_perturbs_the_input_not_the_target():
    gamma = 0.1
    d = GaussianDiffusion(DiffusionConfig(timesteps=50, input_perturbation=gamma))
    x0 = torch.rand(6, 1, 4, 4) * 2 - 1
    spy = _Spy()
    per = d.training_losses(spy, x0, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 50, (6,), generator=g)
    eps, xi = torch.randn(x0.shape, generator=g), torch.randn(x0.shape, generator=g)
    abar = d.schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1).float()
    torch.testing.assert_close(spy.x_t, abar.sqrt() * x0 + (1 - abar).sqrt() * (eps + gamma * xi))
    torch.testing.assert_close(per, eps.pow(2).flatten(1).mean(1))   # the target stays eps
    plain = d.training_losses(spy, x0, generator=torch.Generator().manual_seed(3), input_perturbation=0.0)
    torch.testing.assert_close(spy.x_t, abar.sqrt() * x0 + (1 - abar).sqrt() * eps)  # evaluation: switched off
    torch.testing.assert_close(plain, per)
    with pytest.raises(ValueError, match=r"DiffusionConfig.input_perturbation: must be in \[0, 1\]"):
        DiffusionConfig(input_perturbation=-0.1)


def test_drop_labels_replaces_with_the_null_class():
    from ddpm_nb.diffusion import drop_labels

    y = torch.arange(10).repeat(100)
    out = drop_labels(y, 0.3, 10, torch.Generator().manual_seed(0))
    u = torch.rand(1000, generator=torch.Generator().manual_seed(0))  # one uniform per label, in order
    torch.testing.assert_close(out, torch.where(u < 0.3, torch.full_like(y, 10), y))
    assert torch.equal(drop_labels(y, 0.0, 10), y)
