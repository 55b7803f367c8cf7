"""Samplers: DDPM ancestral sampling (Algorithm 2) and DDIM (Song et al. 2021), with guidance.

Explained in notebooks/04_sampling.

Every sampler takes an explicit `torch.Generator` for reproducible noise, can return the whole
trajectory (x_t and the predicted x0 at every step, or only the steps asked for, for figures and
GIFs), and shows a tqdm progress bar that `progress=False` turns off.

On a GPU the chain never waits for the host: noise is drawn on the generator's device (use
`device_generator`), recorded steps stay on the device until one copy at the end, and the DDIM
coefficients are Python floats computed once per chain (no float64 tensor ever reaches the device,
which Apple's MPS could not hold).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .diffusion import GaussianDiffusion
from .utils import check_steps

__all__ = [
    "Trajectory",
    "device_generator",
    "model_output",
    "p_sample",
    "ddpm_sample",
    "ddim_timesteps",
    "ddim_coefficients",
    "ddim_step",
    "ddim_sample",
    "sample",
]

SPACINGS = ("uniform", "linspace", "trailing")
VARIANCES = ("fixed_small", "fixed_large")


@dataclass
class Trajectory:
    """A recorded chain. x_t and x0_pred are (K, B, C, H, W) on the CPU, in float32, K = S+1 for a
    chain of S steps (or the number of entries asked for with `trajectory_steps`): entry i of the full
    chain is the state before step i (entry 0 is the starting noise) and the network's x0 estimate
    from it; the last entry is the final sample (for both). `timesteps[k]` is t of kept entry k (-1 for
    the last), `steps[k]` its position 0..S in the full chain.
    """

    timesteps: list[int]
    x_t: torch.Tensor
    x0_pred: torch.Tensor
    steps: list[int] | None = None


def device_generator(device, seed: int) -> torch.Generator:
    """A `torch.Generator` on `device` seeded with `seed`, so the sampler's noise is drawn where the
    model runs (a CPU generator would copy the noise to a GPU at every DDPM step). Devices without
    generators of their own get a CPU one. Note: the same seed gives other noise on CPU and CUDA."""
    device = torch.device(device)
    try:
        return torch.Generator(device=device).manual_seed(seed)
    except RuntimeError:  # e.g. the meta device
        return torch.Generator().manual_seed(seed)


def _randn(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    """Standard normal noise drawn from `generator` (on its own device), moved to `device`."""
    if generator is None:
        return torch.randn(shape, device=device)
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def model_output(model: nn.Module, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                 guidance_scale: float = 1.0, null_class: int | None = None) -> torch.Tensor:
    """The network output, with classifier-free guidance when `y` is given and `guidance_scale != 1`:
    out = out(null) + s * (out(y) - out(null)) (Ho & Salimans 2022). s = 0 is unconditional, s = 1 conditional.
    """
    if y is None:
        return model(x_t, t)
    if guidance_scale == 1.0:
        return model(x_t, t, y)
    if null_class is None:
        null_class = model.cfg.num_classes
    null = torch.full_like(y, null_class)
    out = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, null]))
    cond, uncond = out.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _prepare(model, shape, x_T, generator, device):
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    x = _randn(shape, generator, device) if x_T is None else x_T.to(device).float()
    return device, x


def p_sample(model: nn.Module, diffusion: GaussianDiffusion, x_t: torch.Tensor, t: int, *,
             y: torch.Tensor | None = None, guidance_scale: float = 1.0, variance: str = "fixed_small",
             clip_x0: bool = True, noise: torch.Tensor | None = None):
    """One ancestral step x_t -> x_{t-1} (Algorithm 2, line 4). Returns (x_{t-1}, x0_pred).

    variance "fixed_small" uses beta-tilde_t (the posterior variance), "fixed_large" uses beta_t.
    No noise is added at t = 0.
    """
    tt = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
    out = model_output(model, x_t, tt, y, guidance_scale)
    eps, x0 = diffusion.split_output(out, x_t, tt, clip_x0=clip_x0)
    mean, _, log_var = diffusion.q_posterior_mean_variance(x0, x_t.float(), tt)
    if variance == "fixed_large":
        s = diffusion.schedule
        log_var = torch.log(torch.cat([s.posterior_variance[1:2], s.betas[1:]]))[t].reshape(1, 1, 1, 1)
    if t == 0:
        return mean, x0
    if noise is None:
        noise = torch.randn_like(mean)
    return mean + torch.exp(0.5 * log_var) * noise, x0


def ddpm_sample(model: nn.Module, diffusion: GaussianDiffusion, shape: tuple, *, y: torch.Tensor | None = None,
                guidance_scale: float = 1.0, variance: str = "fixed_small", clip_x0: bool = True,
                generator: torch.Generator | None = None, x_T: torch.Tensor | None = None,
                return_trajectory: bool = False, trajectory_steps=None, progress: bool = True, device=None,
                dtype: torch.dtype | None = None):
    """Ancestral sampling over all T steps (Algorithm 2). shape = (B, C, H, W).

    Noise is drawn from `generator` in a fixed order: x_T first, then one draw per step for t > 0.
    Returns the samples (B, C, H, W) in [-1, 1] (float32), or (samples, Trajectory).
    `trajectory_steps`: the chain entries (0 = the noise .. T = the sample) the Trajectory keeps,
    e.g. `animate.frame_schedule(T + 1, 60)`; default all. They stay on the device until the end.
    `dtype` (e.g. torch.bfloat16) runs the network under autocast.
    """
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
    device, x = _prepare(model, shape, x_T, generator, device)
    ts = list(range(diffusion.timesteps - 1, -1, -1))
    return _run(model, ts, x, return_trajectory, trajectory_steps, progress, "DDPM", device, dtype,
                lambda x, t, t_prev: p_sample(model, diffusion, x, t, y=y, guidance_scale=guidance_scale,
                                              variance=variance, clip_x0=clip_x0,
                                              noise=_randn(shape, generator, device) if t > 0 else None))


def _run(model, ts, x, return_trajectory, trajectory_steps, progress, desc, device, dtype, step):
    n = len(ts)
    keep = set(range(n + 1)) if trajectory_steps is None else {int(i) for i in trajectory_steps}
    if return_trajectory and not keep <= set(range(n + 1)):
        raise ValueError(f"trajectory_steps must be chain entries 0..{n} (this chain has {n} steps), "
                         f"got {sorted(keep - set(range(n + 1)))[:5]}")
    xs, x0s = [], []  # kept entries, on the device: one copy to the CPU at the end, not one per step
    with _eval_mode(model), _autocast(device, dtype):
        for i in tqdm(range(n), desc=desc, disable=not progress, leave=False):
            t, t_prev = ts[i], ts[i + 1] if i + 1 < n else -1
            x_next, x0 = step(x, t, t_prev)
            if return_trajectory and i in keep:
                xs.append(x.float())
                x0s.append(x0.float())
            x = x_next.float()
    x = x.clamp(-1.0, 1.0)
    if not return_trajectory:
        return x
    if n in keep:
        xs.append(x)
        x0s.append(x)
    steps = sorted(keep)
    timesteps = [(list(ts) + [-1])[i] for i in steps]
    return x, Trajectory(timesteps=timesteps, x_t=torch.stack(xs).cpu(), x0_pred=torch.stack(x0s).cpu(),
                         steps=steps)


def _round_ratio(num: int, den: int) -> int:
    """round(num / den) exactly, halves to even as numpy/torch round: integer arithmetic, because
    float32 `linspace(0, T - 1, steps).round()` lands one off (T = 4000, steps = 2682 gave 2310 for
    2311) and float64 still misjudges exact halves."""
    q, r = divmod(num, den)
    return q + (2 * r > den or (2 * r == den and q % 2 == 1))


def ddim_timesteps(timesteps: int, steps: int, spacing: str = "uniform") -> list[int]:
    """The subsequence of timesteps DDIM visits, in descending order.

    "uniform": 0, c, 2c, ... with c = T // steps (DDIM paper); "linspace": round(linspace(0, T-1, steps)), computed exactly;
    "trailing": T-1, T-1-c, ... (Lin et al. 2024: always starts at the last, noisiest step).
    """
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    check_steps(steps, timesteps, "steps")
    if spacing == "uniform":
        ts = list(range(0, timesteps, timesteps // steps))[:steps]
    elif spacing == "linspace":
        ts = [_round_ratio(i * (timesteps - 1), steps - 1) for i in range(steps)] if steps > 1 else [0]
    else:
        ts = [int(round(timesteps - i * timesteps / steps)) - 1 for i in range(steps)]
    return sorted(set(ts), reverse=True)


def _schedule_floats(diffusion: GaussianDiffusion) -> tuple[list[float], list[float]]:
    """(abar_t, 1 - abar_t) for every t as Python floats (double precision), kept by the diffusion.

    1 - abar comes from the buffer made in float64 (sqrt_one_minus_alphas_cumprod, squared), not from
    1 - abar in float32, which loses digits near t = 0.
    """
    return diffusion.alphas_cumprod_host, diffusion.one_minus_alphas_cumprod_host


def _ddim_coefficients(alphas_cumprod, one_minus, t: int, t_prev: int, eta: float) -> tuple[float, float, float]:
    ab_t, one_minus_t = alphas_cumprod[t], one_minus[t]
    ab_prev, one_minus_prev = (alphas_cumprod[t_prev], one_minus[t_prev]) if t_prev >= 0 else (1.0, 0.0)
    # sigma = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev)
    sigma = eta * math.sqrt(one_minus_prev / one_minus_t * (1.0 - ab_t / ab_prev)) if eta > 0 else 0.0
    return math.sqrt(ab_prev), math.sqrt(max(one_minus_prev - sigma ** 2, 0.0)), sigma


def ddim_coefficients(diffusion: GaussianDiffusion, t: int, t_prev: int, eta: float = 0.0) -> tuple[float, float, float]:
    """(c_x0, c_eps, sigma) of the DDIM update from t to t_prev, as Python floats (double precision):
    x_prev = c_x0 * x0 + c_eps * eps + sigma * z. See `ddim_step`."""
    return _ddim_coefficients(*_schedule_floats(diffusion), t, t_prev, eta)


def ddim_step(diffusion: GaussianDiffusion, x_t: torch.Tensor, t: int, t_prev: int, eps: torch.Tensor,
              x0: torch.Tensor, eta: float = 0.0, noise: torch.Tensor | None = None, *,
              coefficients: tuple[float, float, float] | None = None) -> torch.Tensor:
    """The DDIM update (Song et al. 2021, eq. 12) from step t to t_prev (t_prev = -1: the clean image).

    x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z,
    sigma = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev).
    eta = 0 is deterministic; eta = 1 with every step is DDPM's ancestral sampler.
    The coefficients are computed in double precision on the host (`ddim_coefficients`); `ddim_sample`
    computes them once per chain and passes them as `coefficients`.
    """
    c_x0, c_eps, sigma = coefficients if coefficients is not None else ddim_coefficients(diffusion, t, t_prev, eta)
    x_prev = c_x0 * x0 + c_eps * eps
    if eta > 0 and t_prev >= 0:
        if noise is None:
            noise = torch.randn_like(x0)
        x_prev = x_prev + sigma * noise
    return x_prev


def ddim_sample(model: nn.Module, diffusion: GaussianDiffusion, shape: tuple, *, steps: int = 50,
                eta: float = 0.0, spacing: str = "uniform", y: torch.Tensor | None = None,
                guidance_scale: float = 1.0, clip_x0: bool = True, generator: torch.Generator | None = None,
                x_T: torch.Tensor | None = None, return_trajectory: bool = False, trajectory_steps=None,
                progress: bool = True, device=None, dtype: torch.dtype | None = None):
    """DDIM sampling over `steps` timesteps chosen by `spacing`. shape = (B, C, H, W).

    Noise order matches `ddpm_sample`: x_T first, then (when eta > 0) one draw per step that
    lands on t_prev >= 0. Returns samples (B, C, H, W) in [-1, 1], or (samples, Trajectory);
    `trajectory_steps` as in `ddpm_sample` (entries 0 .. len(ddim_timesteps(...))).
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    device, x = _prepare(model, shape, x_T, generator, device)
    ts = ddim_timesteps(diffusion.timesteps, steps, spacing)
    # every step's (c_x0, c_eps, sigma) once, as Python floats: no per-step scalar kernels, no float64 on the device
    schedule = _schedule_floats(diffusion)
    coefficients = {t: _ddim_coefficients(*schedule, t, t_prev, eta) for t, t_prev in zip(ts, ts[1:] + [-1])}

    def step(x, t, t_prev):
        tt = torch.full((x.shape[0],), t, device=device, dtype=torch.long)
        out = model_output(model, x, tt, y, guidance_scale)
        eps, x0 = diffusion.split_output(out, x, tt, clip_x0=clip_x0)
        noise = _randn(shape, generator, device) if eta > 0 and t_prev >= 0 else None
        return ddim_step(diffusion, x.float(), t, t_prev, eps, x0, eta, noise, coefficients=coefficients[t]), x0

    return _run(model, ts, x, return_trajectory, trajectory_steps, progress, f"DDIM-{len(ts)}", device, dtype,
                step)


def sample(model: nn.Module, diffusion: GaussianDiffusion, n: int, *, method: str = "ddim", steps: int = 50,
           eta: float = 0.0, **kw):
    """Draw `n` images with the model's own image size and channels: method "ddpm" or "ddim"."""
    cfg = model.cfg
    shape = (n, cfg.in_channels, cfg.image_size, cfg.image_size)
    if method == "ddpm":
        return ddpm_sample(model, diffusion, shape, **kw)
    if method == "ddim":
        return ddim_sample(model, diffusion, shape, steps=steps, eta=eta, **kw)
    raise ValueError(f"method must be 'ddpm' or 'ddim', got {method!r}")
