"""The sampler contract and registry: each sampler against an independent reference (diffusers' schedulers,
the closed-form ODE solution of Gaussian data), its convergence order, and every bad combination."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from ddpm_nb.config import DiffusionConfig, UNetConfig
from ddpm_nb.diffusion import GaussianDiffusion
from ddpm_nb.sample import (SAMPLERS, ConfigError, describe_samplers, get_sampler, make_plan, predict, run_sampler,
                            sample, sigma_of)
from ddpm_nb.unet import UNet

T = 1000


@pytest.fixture(scope="module")
def cosine():
    return GaussianDiffusion(DiffusionConfig(timesteps=T, schedule="cosine"))


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet(UNetConfig.tiny()).eval()


class GaussianDataModel(nn.Module):
    """The exact eps-prediction for data x0 ~ N(mu, c^2 I): E[eps | x_t] = s (x - a mu) / (a^2 c^2 + s^2).
    It reads sigma off t by interpolating log sigma linearly between integer timesteps, the inverse of the
    samplers' fractional timesteps, so its probability-flow ODE is smooth and has a closed-form solution:
    x/a = mu + (x_T/a_T - mu) sqrt(c^2 + sigma^2) / sqrt(c^2 + sigma_T^2)."""

    def __init__(self, diffusion, mu=0.3, c=0.5):
        super().__init__()
        self.mu, self.c = mu, c
        self.register_buffer("log_sigma", torch.tensor([math.log(sigma_of(diffusion, t))
                                                        for t in range(diffusion.timesteps)], dtype=torch.float64))
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x, t, y=None):
        t = t.double()
        lo = t.floor().long().clamp(max=len(self.log_sigma) - 2)
        w = t - lo
        sigma = torch.exp((1 - w) * self.log_sigma[lo] + w * self.log_sigma[lo + 1])[:, None, None, None]
        a, s = 1 / torch.sqrt(1 + sigma ** 2), sigma / torch.sqrt(1 + sigma ** 2)
        return (s * (x.double() - a * self.mu) / (a ** 2 * self.c ** 2 + s ** 2)).float()


def exact_gaussian_solution(x_T, plan, mu, c):
    """x at the clean end of the PF-ODE started at x_T on level 0 (Gaussian data)."""
    sigma0 = plan.sigma[0]
    return mu + (x_T / plan.a[0] - mu) * math.sqrt(c ** 2) / math.sqrt(c ** 2 + sigma0 ** 2)


# ---- the registry ------------------------------------------------------------------------------------

def test_registry_is_the_one_place_names_live():
    assert list(SAMPLERS) == ["ddpm", "ddim", "euler", "heun", "dpm++2m", "dpm++2m-sde"]
    table = describe_samplers()
    for name, s in SAMPLERS.items():
        assert get_sampler(name) is s and s.name == name
        line = next(row for row in table.splitlines() if row.split()[0] == name)
        assert str(s.order) in line.split()[1]
    assert SAMPLERS["heun"].nfe(10) == 19 and SAMPLERS["heun"].steps_for_nfe(10) == 5
    assert SAMPLERS["dpm++2m"].nfe(10) == 10 and SAMPLERS["dpm++2m"].steps_for_nfe(10) == 10


def test_unknown_sampler_lists_the_registry():
    with pytest.raises(ConfigError) as err:
        get_sampler("nope")
    msg = str(err.value)
    assert "'nope'" in msg and "\n" not in msg
    assert all(name in msg for name in SAMPLERS)


@pytest.mark.parametrize("kw, words", [
    (dict(sampler="euler", eta=0.5), ["euler", "eta", "ddim"]),
    (dict(sampler="dpm++2m-sde", eta=1.0), ["dpm++2m-sde", "eta"]),
    (dict(sampler="ddim", variance="fixed_large"), ["ddim", "variance", "ddpm"]),
    (dict(sampler="ddim", steps=0), ["steps", "1 to 1000"]),
    (dict(sampler="heun", steps=1001), ["steps", "1 to 1000"]),
    (dict(sampler="dpm++2m", sigma_max=1e9), ["sigma_max", "noise levels"]),
    (dict(sampler="euler", sigma_max=1e-9), ["sigma_max"]),
    (dict(sampler="ddim", eta=-1.0), ["eta", ">= 0"]),
    (dict(sampler="ddpm", variance="huge"), ["variance", "fixed_small"]),
    (dict(sampler="ddim", spacing="random"), ["spacing", "karras"]),
    (dict(sampler="ddim", method="ddpm"), ["disagree"]),
])
def test_combinations_a_sampler_cannot_honour_are_one_line_errors(unet, cosine, kw, words):
    with pytest.raises(ConfigError) as err:
        sample(unet, cosine, 1, progress=False, **kw)
    msg = str(err.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_eta_zero_is_allowed_everywhere_as_the_default(unet, cosine):
    out = sample(unet, cosine, 1, sampler="euler", steps=2, eta=0.0, progress=False)
    assert out.shape == (1, 1, 16, 16)


# ---- predict: one conversion for every objective --------------------------------------------------------

@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
@pytest.mark.parametrize("clip_x0", [True, False])
def test_predict_equals_split_output_at_integer_timesteps(objective, clip_x0):
    d = GaussianDiffusion(DiffusionConfig(timesteps=T, schedule="cosine", objective=objective))
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    for t in (0, 17, 500, 998):
        eps, x0 = d.split_output(out, x, torch.full((4,), t), clip_x0=clip_x0)
        a, s = math.sqrt(d.alphas_cumprod_host[t]), math.sqrt(d.one_minus_alphas_cumprod_host[t])
        pred = predict(d, out, x, a, s, clip_x0=clip_x0)
        torch.testing.assert_close(pred.x0, x0, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(pred.eps, eps, rtol=1e-4, atol=1e-3 if t == 0 else 1e-4)
        # and the pair is consistent: x = a x0 + s eps
        torch.testing.assert_close(a * pred.x0 + s * pred.eps, x, rtol=1e-4, atol=1e-4)


# ---- the same images as an independent implementation: diffusers ------------------------------------------

def _diffusers_chain(scheduler, model, x_T, plan0_a, noises=None):
    """Run a diffusers scheduler's loop on our VP model; x_T is our VP noise (x~ = x_T / a_0 for diffusers)."""
    latents = x_T.double().div(plan0_a).float() if scheduler.__class__.__name__ != "DPMSolverMultistepScheduler" \
        else x_T.clone()
    k = 0
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(latents, t)
        eps = model(inp, t.expand(x_T.shape[0]))
        kw = {}
        if noises is not None:
            kw["variance_noise"] = noises[k] if k < len(noises) else torch.zeros_like(x_T)
        k += 1
        latents = scheduler.step(eps, t, latents, **kw).prev_sample
    return latents


def _betas(d):
    return d.schedule.betas.double().numpy()


@pytest.mark.parametrize("spacing", ["trailing", "karras"])
def test_euler_matches_diffusers(unet, cosine, spacing):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.EulerDiscreteScheduler(num_train_timesteps=T, trained_betas=_betas(cosine),
                                             timestep_spacing="trailing" if spacing == "trailing" else "linspace",
                                             use_karras_sigmas=spacing == "karras")
    sched.set_timesteps(8)
    x_T = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    ts = [int(t) for t in sched.timesteps] if spacing == "trailing" else None
    plan = make_plan(cosine, 8, spacing, timesteps=ts)
    if spacing == "karras":  # the same levels and fractional timesteps
        np.testing.assert_allclose(plan.sigma[:-1], sched.sigmas[:-1].numpy(), rtol=1e-3)  # theirs: 1 - abar in float32
        np.testing.assert_allclose(plan.t, sched.timesteps.numpy(), rtol=1e-5, atol=0.05)
    ref = _diffusers_chain(sched, unet, x_T, plan.a[0])
    ours, traj = run_sampler(unet, cosine, x_T.shape, "euler", steps=8, spacing=spacing, timesteps=ts, x_T=x_T,
                             sigma_max=sigma_of(cosine, T - 1) if spacing == "karras" else None,
                             clip_x0=False, progress=False, return_trajectory=True)
    torch.testing.assert_close(ours, ref.clamp(-1, 1), rtol=1e-4, atol=1e-4)
    assert (ref - x_T).abs().max() > 0.1  # the chain moved


def test_heun_matches_diffusers(unet, cosine):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.HeunDiscreteScheduler(num_train_timesteps=T, trained_betas=_betas(cosine),
                                            timestep_spacing="linspace", use_karras_sigmas=True)
    sched.set_timesteps(6)
    assert len(sched.timesteps) == SAMPLERS["heun"].nfe(6) == 11
    x_T = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    plan = make_plan(cosine, 6, "karras")
    ref = _diffusers_chain(sched, unet, x_T, plan.a[0])
    ours = run_sampler(unet, cosine, x_T.shape, "heun", steps=6, x_T=x_T, clip_x0=False, progress=False,
                       sigma_max=sigma_of(cosine, T - 1))  # diffusers' ramp starts at the last timestep
    torch.testing.assert_close(ours, ref.clamp(-1, 1), rtol=1e-4, atol=1e-4)


def _dpm_scheduler(diffusers, d, sde=False, karras=True, spacing="linspace"):
    return diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=d.timesteps, trained_betas=_betas(d), solver_order=2,
        algorithm_type="sde-dpmsolver++" if sde else "dpmsolver++", solver_type="midpoint",
        use_karras_sigmas=karras, timestep_spacing=spacing, final_sigmas_type="zero", lower_order_final=True)


class RoundedT(nn.Module):
    """The network asked at round(t): what diffusers' DPM-Solver does with Karras levels (see below)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, t, y=None):
        return self.model(x, t.double().round().long())


@pytest.fixture(scope="module")
def linear():
    # the linear schedule's sigma_max (157) keeps diffusers' rounded Karras timesteps distinct, which its
    # step counter needs; on the cosine schedule several round to 998/999 (see the sigma_max test)
    return GaussianDiffusion(DiffusionConfig(timesteps=T, schedule="linear"))


@pytest.mark.parametrize("steps", [3, 8, 20])
def test_dpmpp_2m_matches_diffusers(unet, linear, steps):
    diffusers = pytest.importorskip("diffusers")
    sched = _dpm_scheduler(diffusers, linear)
    sched.set_timesteps(steps)
    assert len(set(sched.timesteps.tolist())) == steps
    x_T = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    model = RoundedT(unet)
    ref = _diffusers_chain(sched, model, x_T, 1.0)
    ours = run_sampler(model, linear, x_T.shape, "dpm++2m", steps=steps, spacing="karras", x_T=x_T, clip_x0=False,
                       sigma_max=sigma_of(linear, T - 1), progress=False)
    torch.testing.assert_close(ours, ref.clamp(-1, 1), rtol=1e-4, atol=1e-4)


def test_dpmpp_2m_on_integer_timesteps_matches_diffusers(unet, cosine):
    diffusers = pytest.importorskip("diffusers")
    sched = _dpm_scheduler(diffusers, cosine, karras=False, spacing="trailing")
    sched.set_timesteps(10)
    ts = [int(t) for t in sched.timesteps]
    assert ts[0] == T - 1
    x_T = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    ref = _diffusers_chain(sched, unet, x_T, 1.0)
    ours = run_sampler(unet, cosine, x_T.shape, "dpm++2m", timesteps=ts, x_T=x_T, clip_x0=False, progress=False)
    torch.testing.assert_close(ours, ref.clamp(-1, 1), rtol=1e-4, atol=1e-4)


def test_dpmpp_2m_sde_matches_diffusers_with_the_same_noise(unet, linear):
    diffusers = pytest.importorskip("diffusers")
    sched = _dpm_scheduler(diffusers, linear, sde=True)
    sched.set_timesteps(8)
    x_T = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(6)
    noises = [torch.randn(x_T.shape, generator=g) for _ in range(7)]  # our draw order: one per step but the last
    model = RoundedT(unet)
    ref = _diffusers_chain(sched, model, x_T, 1.0, noises=noises)
    ours = run_sampler(model, linear, x_T.shape, "dpm++2m-sde", steps=8, spacing="karras", x_T=x_T, clip_x0=False,
                       sigma_max=sigma_of(linear, T - 1), generator=torch.Generator().manual_seed(6), progress=False)
    # diffusers forms exp(-h), sqrt(1 - exp(-2h)) in float32, we in float64: 1 pixel in 512 differs by 2e-4
    torch.testing.assert_close(ours, ref.clamp(-1, 1), rtol=1e-3, atol=5e-4)
    # the noise matters: another seed, other images
    other = run_sampler(model, linear, x_T.shape, "dpm++2m-sde", steps=8, spacing="karras", x_T=x_T, clip_x0=False,
                        sigma_max=sigma_of(linear, T - 1), generator=torch.Generator().manual_seed(7), progress=False)
    assert (other - ours).abs().max() > 1e-2


def test_where_diffusers_differs_by_design_integer_timesteps(linear):
    """diffusers' DPM-Solver gives the network integer timesteps (Karras levels rounded, or truncated to int64)
    while its step keeps the unrounded sigma, so the network is asked about a slightly different noise level
    than the step assumes. We pass the fractional timestep whose sigma is the level's (the tests above match
    diffusers by rounding t in a wrapper). Same levels, other t."""
    diffusers = pytest.importorskip("diffusers")
    sched = _dpm_scheduler(diffusers, linear)
    sched.set_timesteps(10)
    plan = make_plan(linear, 10, "karras")
    np.testing.assert_allclose(plan.sigma[:-1], sched.sigmas[:-1].numpy(), rtol=1e-3)
    theirs = sched.timesteps.numpy().astype(float)
    assert np.array_equal(theirs, np.round(plan.t))
    assert np.abs(theirs - np.array(plan.t)).max() > 0.1  # the rounding is real: up to half a step off


def test_the_ode_samplers_start_karras_levels_at_80_by_default(cosine, unet):
    from ddpm_nb.sample import KARRAS_SIGMA_MAX
    for name in ("euler", "heun", "dpm++2m", "dpm++2m-sde"):
        plan = SAMPLERS[name].plan(cosine, 10)
        assert abs(plan.sigma[0] - KARRAS_SIGMA_MAX) < 1e-9 and plan.t[0] < T - 1
    # a schedule whose top level is below 80 starts at its top instead of refusing
    short = GaussianDiffusion(DiffusionConfig(timesteps=1000, schedule="quadratic"))  # sigma(T - 1) = 36.9
    assert abs(SAMPLERS["dpm++2m"].plan(short, 5).sigma[0] - sigma_of(short, T - 1)) < 1e-9 < 80 - sigma_of(short, T - 1)
    assert SAMPLERS["ddim"].plan(cosine, 10).t[0] == 900  # DDIM keeps its uniform spacing


def test_karras_levels_from_the_last_cosine_step_crowd_into_two_timesteps(cosine):
    """Why the default start is not sigma(T - 1) on the cosine schedule: beta clipped at 0.999 makes sigma jump
    from 1.6e2 to 2.0e4 over the last few timesteps, and a rho = 7 ramp from there puts half of 8 levels
    between t = 998 and 999. Starting at sigma_max = 80 (EDM's) spreads them."""
    crowded = make_plan(cosine, 8, "karras", sigma_max=sigma_of(cosine, T - 1))
    assert sum(t >= 998 for t in crowded.t) == 4
    spread = make_plan(cosine, 8, "karras", sigma_max=80.0)
    assert sum(t >= 998 for t in spread.t) == 0 and abs(spread.sigma[0] - 80.0) < 1e-9


# ---- independent math: Euler is DDIM, and the solvers converge at their order ----------------------------

def test_euler_on_the_same_levels_is_ddim_eta0(unet, cosine):
    x_T = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(8))
    for spacing, top in (("uniform", None), ("trailing", None), ("karras", 80.0), ("karras", sigma_of(cosine, T - 1))):
        a = run_sampler(unet, cosine, x_T.shape, "euler", steps=7, spacing=spacing, sigma_max=top, x_T=x_T,
                        clip_x0=False, progress=False)
        b = run_sampler(unet, cosine, x_T.shape, "ddim", steps=7, spacing=spacing, sigma_max=top, x_T=x_T,
                        clip_x0=False, progress=False)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # with x0 clipped too, where the chain does not start at sigma ~ 2e4 (there DDIM's x0 = (x - s eps) / a
    # multiplies float32 rounding by 1 / a = 2e4 before the clip; Euler never forms x0)
    a = run_sampler(unet, cosine, x_T.shape, "euler", steps=7, spacing="uniform", x_T=x_T, progress=False)
    b = run_sampler(unet, cosine, x_T.shape, "ddim", steps=7, spacing="uniform", x_T=x_T, progress=False)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _ode_errors(name, cosine, steps_list, sigma_max=20.0):
    mu, c = 0.3, 0.5
    model = GaussianDataModel(cosine, mu, c)
    x_T = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    ref_plan = make_plan(cosine, 1000, "karras", sigma_max=sigma_max)
    exact = exact_gaussian_solution(x_T, ref_plan, mu, c)
    reference = run_sampler(model, cosine, x_T.shape, "heun", steps=1000, spacing="karras", sigma_max=sigma_max,
                            x_T=x_T, clip_x0=False, progress=False)
    errors = []
    for n in steps_list:
        out = run_sampler(model, cosine, x_T.shape, name, steps=n, spacing="karras", sigma_max=sigma_max, x_T=x_T,
                          clip_x0=False, progress=False)
        errors.append((out - reference).pow(2).mean().sqrt().item())
    return errors, (reference - exact.clamp(-1, 1)).abs().max().item()


@pytest.mark.parametrize("name, order", [("euler", 1), ("heun", 2), ("dpm++2m", 2)])
def test_ode_samplers_converge_at_their_order(cosine, name, order):
    steps_list = [8, 16, 32, 64]
    errors, ref_error = _ode_errors(name, cosine, steps_list)
    assert ref_error < 1e-4  # the 1000-step reference is the exact solution of this ODE
    slope = -np.polyfit(np.log(steps_list), np.log(errors), 1)[0]
    assert abs(slope - order) < 0.35, (name, errors, slope)
    assert SAMPLERS[name].order == order


def test_ddpm_with_all_steps_is_the_respaced_ancestral_sampler(unet):
    """Fewer ddpm steps use the respaced betas; with eta = 1, DDIM's update is the same chain (both draw one
    noise per step but the last)."""
    d = GaussianDiffusion(DiffusionConfig(timesteps=40, schedule="linear"))
    x_T = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(9))
    a = run_sampler(unet, d, x_T.shape, "ddpm", steps=10, x_T=x_T, generator=torch.Generator().manual_seed(1),
                    progress=False)
    b = run_sampler(unet, d, x_T.shape, "ddim", steps=10, eta=1.0, x_T=x_T, generator=torch.Generator().manual_seed(1),
                    progress=False)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    c = run_sampler(unet, d, x_T.shape, "ddpm", steps=10, variance="fixed_large", x_T=x_T,
                    generator=torch.Generator().manual_seed(1), progress=False)
    assert (c - a).abs().max() > 1e-3


# ---- the command line and the trainer read the registry ------------------------------------------------

def _cli(args, tmp_path):
    import subprocess
    import sys
    env = {"PATH": "/usr/bin:/bin", "DDPM_NB_RESULTS": str(tmp_path / "results"), "DDPM_NB_THREADS": "1",
           "PYTHONWARNINGS": "ignore", "HOME": str(tmp_path)}
    return subprocess.run([sys.executable, "-m", "ddpm_nb", *args], capture_output=True, text=True, env=env,
                          timeout=600, cwd=tmp_path)


def test_cli_samples_with_a_registered_sampler(tmp_path):
    out = tmp_path / "dpm"
    proc = _cli(["sample", "fashion-quick-cond", "--sampler", "dpm++2m", "--steps", "10", "--num", "8", "--out",
                 str(out), "--no-progress"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    from PIL import Image
    images = sorted((out / "images").glob("dpm++2m10_seed0_*.png"))
    assert len(images) == 8
    pixels = np.asarray(Image.open(images[0]).convert("L"), dtype=float)
    assert pixels.std() > 10  # a drawn garment, not a blank
    assert (out / "grid_dpm++2m10_seed0.png").is_file()


@pytest.mark.parametrize("args, words", [
    (["--sampler", "nope"], ["unknown sampler 'nope'", "dpm++2m-sde"]),
    (["--sampler", "euler", "--eta", "0.5"], ["euler", "eta", "ddim"]),
    (["--sampler", "ddim", "--variance", "fixed_large"], ["ddim", "variance"]),
    (["--sampler", "dpm++2m", "--sigma-max", "1e9"], ["sigma_max", "noise levels"]),
    (["--steps", "0"], ["--steps", "at least 1"]),
    (["--steps", "1001"], ["--steps", "1 to 1000"]),
])
def test_cli_refuses_what_a_sampler_cannot_honour_in_one_line(tmp_path, args, words):
    proc = _cli(["sample", "fashion-quick-cond", "--num", "1", "--out", str(tmp_path / "o"), *args], tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and all(w in lines[0] for w in words), proc.stderr
    assert not (tmp_path / "o" / "images").exists()


def test_cli_lists_the_registry_and_keeps_method_as_an_alias(tmp_path):
    proc = _cli(["sample", "--list-samplers"], tmp_path)
    assert proc.returncode == 0
    names = [line.split()[0] for line in proc.stdout.strip().splitlines()[1:]]
    assert names == list(SAMPLERS)
    help_text = _cli(["animate", "--help"], tmp_path).stdout
    assert all(name in help_text for name in SAMPLERS) and "NFE/step" in help_text
    from ddpm_nb.__main__ import make_parser
    assert make_parser().parse_args(["sample", "x", "--method", "ddpm"]).sampler == "ddpm"


def test_trainer_sample_grids_use_the_configured_sampler(tmp_path):
    from ddpm_nb.config import preset
    from ddpm_nb.train import Trainer
    cfg = preset("tiny", **{"train.sampler": "dpm++2m", "train.sample_steps": 4})
    tr = Trainer(cfg, run_dir=tmp_path / "run", device="cpu", progress=False)
    a = tr.sample(2, seed=3)
    b = tr.sample(2, seed=3, sampler="dpm++2m", steps=4)
    c = tr.sample(2, seed=3, sampler="ddim", steps=4)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-4
    with pytest.raises(ConfigError, match="TrainConfig.sampler: unknown sampler 'nope'"):
        Trainer(preset("tiny", **{"train.sampler": "nope"}), run_dir=tmp_path / "bad", device="cpu", progress=False)


def test_cli_progress_in_a_log_is_plain_lines(tmp_path):
    """Output to a file or pipe gets a plain line per tenth of the chain, not tqdm's carriage returns."""
    proc = _cli(["sample", "fashion-quick-cond", "--sampler", "ddim", "--steps", "20", "--num", "1", "--out",
                 str(tmp_path / "o")], tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("ddim-20:")]
    assert "\r" not in proc.stderr and len(lines) == 10 and lines[-1].startswith("ddim-20: 20/20 steps")
    quiet = _cli(["sample", "fashion-quick-cond", "--steps", "20", "--num", "1", "--out", str(tmp_path / "q"),
                  "--no-progress"], tmp_path)
    assert "ddim-20" not in quiet.stderr


def test_the_default_sampler_is_the_measured_one_and_flow_models_get_theirs(unet, cosine):
    from ddpm_nb.diffusion import FlowMatching
    from ddpm_nb.sample import DEFAULT_SAMPLER, default_sampler
    assert DEFAULT_SAMPLER == "dpm++2m-sde" and default_sampler(cosine) == DEFAULT_SAMPLER
    flow = FlowMatching(DiffusionConfig(formulation="flow", objective="v"))
    assert default_sampler(flow) in ("ddim", "euler", "heun", "dpm++2m")
    assert SAMPLERS[DEFAULT_SAMPLER].default_steps(cosine) == 20 and SAMPLERS["ddim"].default_steps(cosine) == 50
