"""Flow matching: the loss against hand computation, the registry's samplers on an exact velocity field (the
Gaussian transport map), training and resume from the command line, and the refusals."""
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from ddpm_nb.config import ConfigError, DiffusionConfig, preset
from ddpm_nb.diffusion import FlowMatching, GaussianDiffusion, make_diffusion
from ddpm_nb.sample import SAMPLERS, run_sampler

FLOW = DiffusionConfig(timesteps=1000, formulation="flow", objective="v")


class Constant(nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value, self.p = value, nn.Parameter(torch.zeros(1))
        self.seen = []

    def forward(self, x, t, y=None):
        self.seen.append(t.clone())
        return torch.full_like(x, self.value)


def test_loss_is_the_velocity_regression_by_hand():
    flow = make_diffusion(FLOW)
    assert isinstance(flow, FlowMatching) and isinstance(make_diffusion(DiffusionConfig()), GaussianDiffusion)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 1, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(3, 1, 4, 4, generator=g)
    t = torch.tensor([0.0, 250.0, 1000.0])  # the network's time input: t * 1000
    model = Constant(0.5)
    per = flow.training_losses(model, x0, t=t, noise=noise)
    u = (t / 1000).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(flow.q_sample(x0, t, noise), (1 - u) * x0 + u * noise)
    expected = ((0.5 - (noise - x0)) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(per, expected)
    assert torch.equal(model.seen[0], t)


@pytest.mark.parametrize("dist", ["uniform", "logit-normal"])
def test_time_draws_follow_the_configured_distribution(dist):
    flow = FlowMatching(DiffusionConfig(formulation="flow", objective="v", flow_time=dist))
    t = flow.sample_timesteps(20000, "cpu", torch.Generator().manual_seed(0)) / 1000
    assert 0 < t.min() and t.max() < 1
    if dist == "uniform":
        assert abs(t.mean() - 0.5) < 0.01 and abs(t.var() - 1 / 12) < 0.003
    else:  # logit(t) ~ N(0, 1)
        z = torch.log(t / (1 - t))
        assert abs(z.mean()) < 0.03 and abs(z.std() - 1) < 0.03


class GaussianVelocity(nn.Module):
    """E[eps - x0 | x_t] for data N(mu, c^2) on the linear path: with V = (1-t)^2 c^2 + t^2 and m = x - (1-t) mu,
    E[x0 | x] = mu + (1-t) c^2 m / V and E[eps | x] = t m / V. Its ODE carries x_1 to x_0 = mu + c x_1."""

    def __init__(self, mu=0.3, c=0.5):
        super().__init__()
        self.mu, self.c, self.p = mu, c, nn.Parameter(torch.zeros(1))

    def forward(self, x, t, y=None):
        t = (t.double() / 1000).reshape(-1, 1, 1, 1)
        x = x.double()
        var = (1 - t) ** 2 * self.c ** 2 + t ** 2
        m = x - (1 - t) * self.mu
        return (t * m / var - (self.mu + (1 - t) * self.c ** 2 * m / var)).float()


# DPM-Solver++ 2M converges here at about order 1.2 to 1.6, not 2: its first step starts at t = 1, where
# lambda = log((1 - t) / t) = -inf, so the first (first-order) step spans an infinite h
@pytest.mark.parametrize("name, order", [("ddim", 1), ("euler", 1), ("heun", 2), ("dpm++2m", 1)])
def test_flow_samplers_reach_the_gaussian_transport_map(name, order):
    flow = FlowMatching(FLOW)
    model = GaussianVelocity()
    x1 = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(0)).clamp(-1.2, 1.2)
    exact = model.mu + model.c * x1
    errors = []
    for steps in (8, 32):
        out = run_sampler(model, flow, x1.shape, name, steps=steps, x_T=x1, clip_x0=False, progress=False)
        errors.append((out - exact.clamp(-1, 1)).abs().max().item())
    rate = math.log(errors[0] / errors[1]) / math.log(4)
    assert errors[1] < 0.03 and rate > order - 0.4, (errors, rate)


def test_flow_refuses_the_ddpm_samplers_and_levels():
    flow = FlowMatching(FLOW)
    model = GaussianVelocity()
    for kw, words in [(dict(sampler="ddpm"), "flow-matching model"), (dict(sampler="dpm++2m-sde"), "flow-matching"),
                      (dict(sampler="ddim", eta=1.0), "eta"), (dict(sampler="euler", spacing="karras"), "evenly spaced"),
                      (dict(sampler="heun", sigma_max=10.0), "evenly spaced")]:
        sampler = kw.pop("sampler")
        with pytest.raises(ConfigError, match=words):
            run_sampler(model, flow, (1, 1, 2, 2), sampler, steps=4, progress=False, **kw)
    assert set(SAMPLERS) >= {"ddim", "euler", "heun", "dpm++2m"}


@pytest.mark.parametrize("over, words", [
    ({"diffusion.formulation": "flows"}, "unknown formulation 'flows'"),
    ({"diffusion.formulation": "flow"}, "set objective 'v'"),
    ({"diffusion.formulation": "flow", "diffusion.objective": "v", "diffusion.min_snr_gamma": 5.0},
     "min_snr_gamma"),
    ({"diffusion.formulation": "flow", "diffusion.objective": "v", "diffusion.flow_time": "beta"},
     "unknown flow time distribution"),
])
def test_flow_settings_are_checked_in_one_line(over, words):
    with pytest.raises(ConfigError) as err:
        preset("tiny", **over)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_flow_trains_resumes_samples_from_the_cli_and_refuses_a_ddpm_resume(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "DDPM_NB_RESULTS": str(tmp_path), "DDPM_NB_THREADS": "1", "HOME": str(tmp_path),
           "PYTHONWARNINGS": "ignore"}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "ddpm_nb", *args], capture_output=True, text=True, env=env,
                              timeout=600, cwd=tmp_path)

    base = ["train", "--preset", "tiny", "--name", "f", "--diffusion.formulation", "flow", "--diffusion.objective", "v",
            "--no-progress"]
    first = cli(*base, "--steps", "10", "--train.ckpt_every", "5")
    assert first.returncode == 0, first.stderr
    resumed = cli(*base, "--steps", "14", "--resume")
    assert resumed.returncode == 0 and "resumed at step 10" in resumed.stderr, resumed.stderr
    from ddpm_nb.checkpoint import load_checkpoint, load_model
    assert load_checkpoint(tmp_path / "f")["step"] == 14
    model, flow, cfg = load_model(tmp_path / "f", device="cpu")
    assert isinstance(flow, FlowMatching) and cfg.diffusion.formulation == "flow"
    ok = cli("sample", "f", "--sampler", "heun", "--steps", "3", "--num", "2", "--no-progress")
    assert ok.returncode == 0 and (tmp_path / "f" / "samples_cli" / "grid_heun3_seed0.png").is_file(), ok.stderr
    bad = cli("sample", "f", "--sampler", "ddpm", "--num", "2")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "flow-matching model" in bad.stderr
    ddpm = cli("train", "--preset", "tiny", "--name", "f", "--steps", "16", "--resume", "--no-progress")
    assert ddpm.returncode == 2 and "diffusion.formulation: checkpoint 'flow' vs now 'ddpm'" in ddpm.stderr
