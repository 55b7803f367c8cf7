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


# ---- fast paths (issue 13) -------------------------------------------------------------------
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

from ddpm_nb.sample import ddim_coefficients, ddim_step, device_generator  # noqa: E402


class _RecordOutputs(TorchDispatchMode):
    """Records (op, dtype, device) of every tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.seen += [(str(func), t.dtype, t.device.type) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out

    def float64_off_cpu(self):
        return sorted({op for op, dtype, device in self.seen if dtype == torch.float64 and device != "cpu"})


def test_no_float64_tensor_on_a_non_cpu_device():
    """Apple's MPS has no float64: no sampler or animation path may put one on the device (the trainer's
    grids: tests/test_train.py). Runs on the 'meta' device (and a fake CUDA device for slerp, which copies
    to the CPU)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ddpm_nb.animate import slerp

    torch.manual_seed(0)
    model = UNet(UNetConfig.tiny(num_classes=3)).to("meta").eval()
    d = GaussianDiffusion(DiffusionConfig(timesteps=12)).to("meta")
    y = torch.tensor([0, 2], device="meta")
    with _RecordOutputs() as rec:
        ddpm_sample(model, d, (2, 1, 16, 16), y=y, guidance_scale=2.0, progress=False,
                    generator=device_generator("meta", 0))
        ddpm_sample(model, d, (2, 1, 16, 16), variance="fixed_large", progress=False)
        for eta in (0.0, 1.0):
            ddim_sample(model, d, (2, 1, 16, 16), steps=4, eta=eta, progress=False,
                        generator=device_generator("meta", 0))
    assert rec.seen and {device for _, _, device in rec.seen} >= {"meta"}
    assert rec.float64_off_cpu() == []

    with FakeTensorMode(allow_non_fake_inputs=True):
        z = torch.randn(2, 1, 8, 8, device="cuda")
        with _RecordOutputs() as rec:
            out = slerp(z[:1], z[1:], torch.linspace(0, 1, 5))
        assert out.device.type == "cuda" and out.dtype == torch.float32 and out.shape == (5, 1, 8, 8)
    assert any(dtype == torch.float64 for _, dtype, _ in rec.seen)  # computed in float64, on the CPU
    assert rec.float64_off_cpu() == []


def test_ddim_coefficients_are_floats_computed_in_double(setup):
    _, d = setup
    ab = d.schedule.alphas_cumprod.double()
    one_minus = d.schedule.sqrt_one_minus_alphas_cumprod.double() ** 2
    for t, t_prev, eta in [(30, 20, 0.0), (30, 20, 1.0), (5, -1, 0.5), (39, 0, 0.3)]:
        c_x0, c_eps, sigma = ddim_coefficients(d, t, t_prev, eta)
        assert all(type(c) is float for c in (c_x0, c_eps, sigma))
        ab_prev = ab[t_prev] if t_prev >= 0 else torch.tensor(1.0, dtype=torch.float64)
        om_prev = one_minus[t_prev] if t_prev >= 0 else torch.tensor(0.0, dtype=torch.float64)
        expected_sigma = eta * torch.sqrt(om_prev / one_minus[t] * (1 - ab[t] / ab_prev))
        assert sigma == pytest.approx(expected_sigma.item(), rel=1e-12, abs=1e-15)
        assert c_x0 == pytest.approx(ab_prev.sqrt().item(), rel=1e-12)
        assert c_eps == pytest.approx(torch.sqrt((om_prev - expected_sigma ** 2).clamp(min=0)).item(), rel=1e-12,
                                      abs=1e-15)
    # ddim_step with and without precomputed coefficients is the same update
    x, e, x0, z = torch.randn(4, 2, 1, 4, 4).unbind(0)
    torch.testing.assert_close(ddim_step(d, x, 30, 20, e, x0, 0.7, z),
                               ddim_step(d, x, 30, 20, e, x0, 0.7, z, coefficients=ddim_coefficients(d, 30, 20, 0.7)),
                               rtol=0, atol=0)


def test_ddim_step_runs_few_kernels(setup):
    """The update itself: 2 multiplies and an add (+ 2 for the noise), no scalar kernels recomputing abar."""
    _, d = setup
    x, e, x0, z = torch.randn(4, 2, 1, 4, 4).unbind(0)
    coefficients = ddim_coefficients(d, 30, 20, 0.0)
    with _RecordOutputs() as rec:
        ddim_step(d, x, 30, 20, e, x0, 0.0, coefficients=coefficients)
    assert len(rec.seen) == 3
    with _RecordOutputs() as rec:
        ddim_step(d, x, 30, 20, e, x0, 1.0, z, coefficients=ddim_coefficients(d, 30, 20, 1.0))
    assert len(rec.seen) == 5


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_trajectory_keeps_only_the_steps_asked_for_and_copies_once(setup, monkeypatch, sampler):
    model, d = setup
    run = (lambda **kw: ddpm_sample(model, d, (2, 1, 16, 16), progress=False, **kw)) if sampler == "ddpm" else \
        (lambda **kw: ddim_sample(model, d, (2, 1, 16, 16), steps=10, progress=False, **kw))
    x_full, full = run(return_trajectory=True, generator=torch.Generator().manual_seed(3))
    n = len(full.timesteps) - 1  # steps in the chain
    keep = [0, 1, n // 2, n - 1, n]
    copies = []
    original = torch.Tensor.cpu

    def counting_cpu(self, *a, **k):
        copies.append(tuple(self.shape))
        return original(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    x, part = run(return_trajectory=True, trajectory_steps=keep, generator=torch.Generator().manual_seed(3))
    monkeypatch.undo()
    assert len(copies) == 2  # x_t and x0_pred, each stacked on the device and copied once
    torch.testing.assert_close(x, x_full, rtol=0, atol=0)
    assert part.steps == keep and part.x_t.shape == (5, 2, 1, 16, 16) and part.x_t.device.type == "cpu"
    torch.testing.assert_close(part.x_t, full.x_t[keep], rtol=0, atol=0)
    torch.testing.assert_close(part.x0_pred, full.x0_pred[keep], rtol=0, atol=0)
    assert part.timesteps == [full.timesteps[i] for i in keep] and part.timesteps[-1] == -1
    assert full.steps == list(range(n + 1))
    with pytest.raises(ValueError, match="trajectory_steps"):
        run(return_trajectory=True, trajectory_steps=[0, n + 1])


def test_device_generator():
    g = device_generator("cpu", 5)
    assert g.device.type == "cpu" and g.initial_seed() == 5
    assert torch.equal(torch.randn(3, generator=g), torch.randn(3, generator=torch.Generator().manual_seed(5)))
    assert device_generator("meta", 1).device.type == "cpu"  # devices without generators use a CPU one
