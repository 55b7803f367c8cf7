"""Samplers: one contract, one registry. DDPM (Algorithm 2), DDIM (Song et al. 2021), Euler and Heun in
the EDM parameterisation (Karras et al. 2022), DPM-Solver++ 2M and its SDE variant (Lu et al. 2022).

Explained in notebooks/04_sampling (DDPM, DDIM) and notebooks/09_fast_samplers (the score/ODE view and
the rest).

The contract, comparable to diffusers' `set_timesteps` / `step`:
- a sampler chooses the noise levels it visits (`Sampler.plan`: model timesteps t_0 > t_1 > ... and their
  alpha-bars, ending at the clean level alpha-bar = 1), with every coefficient computed once per chain in
  double precision on the host;
- `predict` turns the network's output (eps, x0 or v) into the pair (eps, x0) at a level;
- `Sampler.step` maps (x at level i, the prediction there, i[, noise]) to x at level i + 1;
- `SAMPLERS` maps each name to its sampler: the only place names live. `sample()`, the command line,
  the trainer's sample grids, the benchmarks and the lessons all read it.

All samplers work on the variance-preserving x_t = sqrt(abar) x0 + sqrt(1 - abar) eps. The ODE samplers
are written in the paper's variables: sigma = sqrt((1 - abar) / abar) (EDM: x_t / sqrt(abar) = x0 + sigma eps)
and lambda = log(sqrt(abar) / sqrt(1 - abar)) = -log sigma (DPM-Solver).

Every sampler takes an explicit `torch.Generator` for reproducible noise, can return the whole
trajectory (x_t and the predicted x0 at every step, or only the steps asked for, for figures and
GIFs), and shows a tqdm progress bar that `progress=False` turns off.

On a GPU the chain never waits for the host: noise is drawn on the generator's device (use
`device_generator`), recorded steps stay on the device until one copy at the end, and the coefficients
are Python floats computed once per chain (no float64 tensor ever reaches the device, which Apple's MPS
could not hold).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from .diffusion import GaussianDiffusion
from .utils import ConfigError, Progress, check_steps

__all__ = [
    "SAMPLERS",
    "DEFAULT_SAMPLER",
    "default_sampler",
    "Sampler",
    "Plan",
    "Prediction",
    "predict",
    "get_sampler",
    "describe_samplers",
    "run_sampler",
    "prepare",
    "denoiser",
    "karras_sigmas",
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

SPACINGS = ("uniform", "linspace", "trailing")  # the integer spacings of ddim_timesteps
LEVELS = SPACINGS + ("karras",)  # what a sampler's `spacing` may be
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



# ---- the contract: levels, predictions, samplers ------------------------------------------------------

class Plan:
    """The noise levels one chain visits, noisiest first: the network is called at `t[i]` (an int on the
    schedule's grid, or a float between grid points for Karras levels), where alpha-bar is `abar[i]`.
    `abar` has one more entry, 1.0 (the clean image), so a chain of `steps = len(t)` steps goes from
    level i to level i + 1. Every quantity a step needs is here as Python floats (double precision),
    computed once: a = sqrt(abar), s = sqrt(1 - abar), sigma = s / a, lam = log(a / s).
    """

    def __init__(self, t, abar, one_minus, kind: str = "ddpm"):
        if len(abar) != len(t) + 1 or len(one_minus) != len(abar):
            raise ValueError("a Plan needs one alpha-bar per timestep plus the final 1.0")
        self.kind = kind  # "ddpm", or "flow": then abar = a^2 = (1 - t)^2 and one_minus = s^2 = t^2
        self.t = tuple(t)
        self.abar = tuple(float(v) for v in abar)
        self.one_minus = tuple(float(v) for v in one_minus)  # 1 - abar, kept exact near abar = 1
        self.a = tuple(math.sqrt(v) for v in self.abar)
        self.s = tuple(math.sqrt(max(v, 0.0)) for v in self.one_minus)
        self.sigma = tuple(s / a if a > 0 else math.inf for a, s in zip(self.a, self.s))
        self.lam = tuple(math.log(a / s) if s > 0 and a > 0 else (math.inf if s == 0 else -math.inf)
                         for a, s in zip(self.a, self.s))

    @property
    def steps(self) -> int:
        return len(self.t)

    def __repr__(self) -> str:
        return f"Plan(steps={self.steps}, t={list(self.t)[:3]}...{list(self.t)[-1:]}, sigma_max={self.sigma[0]:.4g})"


def sigma_of(diffusion: GaussianDiffusion, t: int) -> float:
    """sigma_t = sqrt((1 - abar_t) / abar_t) of the integer timestep t (double precision)."""
    return math.sqrt(diffusion.one_minus_alphas_cumprod_host[t] / diffusion.alphas_cumprod_host[t])


def _t_of_sigma(log_sigmas: list[float], sigma: float) -> float:
    """The (fractional) model timestep of noise level sigma: log sigma interpolated linearly between the
    integer timesteps around it (as diffusers' `_sigma_to_t`), clamped to [0, T - 1]. `log_sigmas`: log sigma_t
    for t = 0 .. T-1, computed once per plan."""
    target = math.log(sigma)
    if target <= log_sigmas[0]:
        return 0.0
    if target >= log_sigmas[-1]:
        return float(len(log_sigmas) - 1)
    hi = next(i for i, v in enumerate(log_sigmas) if v > target)
    lo = hi - 1
    w = (log_sigmas[lo] - target) / (log_sigmas[lo] - log_sigmas[hi])
    return (1 - w) * lo + w * hi


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> list[float]:
    """The EDM noise levels (Karras et al. 2022, eq. 5): sigma_i = (sigma_max^(1/rho) + i / (n - 1) *
    (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho for i = 0 .. n-1, descending; rho = 7 spends more steps
    at low noise, where detail forms."""
    if n == 1:
        return [sigma_max]
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return [(hi + i / (n - 1) * (lo - hi)) ** rho for i in range(n)]


def _start_step(diffusion: GaussianDiffusion, sigma_max: float | None) -> int:
    """The last integer timestep a chain may start at: T - 1, or the largest t with sigma_t <= sigma_max."""
    T = diffusion.timesteps
    if sigma_max is None:
        return T - 1
    lo, hi = sigma_of(diffusion, 0), sigma_of(diffusion, T - 1)
    if not (math.isfinite(sigma_max) and lo <= sigma_max <= hi):
        raise ConfigError(f"sigma_max must lie within this schedule's noise levels, {lo:.4g} to {hi:.4g} "
                          f"(sigma_t of t = 0 and t = T - 1), got {sigma_max}")
    return max(t for t in range(T) if sigma_of(diffusion, t) <= sigma_max * (1 + 1e-12))


def make_plan(diffusion: GaussianDiffusion, steps: int, spacing: str = "uniform", *, sigma_max: float | None = None,
              timesteps=None, rho: float = 7.0) -> Plan:
    """The levels of a chain of `steps` steps. `spacing`: "uniform", "linspace" or "trailing" pick integer
    timesteps (`ddim_timesteps`) among 0 .. t_max; "karras" puts `steps` levels on the rho-ramp from
    sigma_max down to sigma_0, each at a fractional timestep. t_max (and the Karras sigma_max) is the
    last timestep, T - 1, unless `sigma_max` is given. `timesteps`: an explicit descending list of
    integer timesteps instead (as diffusers' `set_timesteps(timesteps=...)`).
    """
    if diffusion.is_flow:
        return _flow_plan(diffusion, steps, spacing, sigma_max, timesteps)
    ab, om = diffusion.alphas_cumprod_host, diffusion.one_minus_alphas_cumprod_host
    T = diffusion.timesteps
    if timesteps is not None:
        ts = [int(t) for t in timesteps]
        if not ts or any(not 0 <= t < T for t in ts) or any(a <= b for a, b in zip(ts, ts[1:])):
            raise ConfigError(f"timesteps must be distinct integers in 0..{T - 1}, in descending order")
        return Plan(ts, [ab[t] for t in ts] + [1.0], [om[t] for t in ts] + [0.0])
    if spacing not in LEVELS:
        raise ConfigError(f"spacing must be one of {', '.join(LEVELS)}, got {spacing!r}")
    check_steps(steps, T, "steps")
    t_max = _start_step(diffusion, sigma_max)
    if spacing != "karras":
        ts = ddim_timesteps(t_max + 1, min(steps, t_max + 1), spacing)
        return Plan(ts, [ab[t] for t in ts] + [1.0], [om[t] for t in ts] + [0.0])
    sigmas = karras_sigmas(sigma_of(diffusion, 0), sigma_max or sigma_of(diffusion, T - 1), steps, rho)
    log_sigmas = [math.log(sigma_of(diffusion, t)) for t in range(T)]
    ts = [_t_of_sigma(log_sigmas, s) for s in sigmas]
    return Plan(ts, [1 / (1 + s * s) for s in sigmas] + [1.0], [s * s / (1 + s * s) for s in sigmas] + [0.0])


def _flow_plan(flow, steps: int, spacing: str, sigma_max, timesteps) -> Plan:
    """Flow matching's levels: t_i = 1 - i / steps (from the noise at t = 1 to t = 0), the network's input
    t * timesteps, a = 1 - t, s = t."""
    if sigma_max is not None or timesteps is not None or spacing not in SPACINGS:
        raise ConfigError("a flow-matching model takes evenly spaced times from t = 1 to 0: leave spacing, sigma_max "
                          "and timesteps at their defaults")
    if not (isinstance(steps, int) and steps >= 1):
        raise ConfigError(f"steps must be an integer >= 1, got {steps!r}")
    ts = [1 - i / steps for i in range(steps)]
    return Plan([flow.timesteps * t for t in ts], [(1 - t) ** 2 for t in ts] + [1.0], [t * t for t in ts] + [0.0],
                kind="flow")


FLOW_SAMPLERS = ("ddim", "euler", "heun", "dpm++2m")  # deterministic, written for any x = a x0 + s eps

# Where the Karras levels of the ODE samplers start by default: EDM's sigma_max = 80, not sigma(T - 1). On the cosine
# schedule sigma(T - 1) is about 2e4 (beta clipped at 0.999 makes sigma jump over the last steps), and a rho = 7 ramp
# from there spends 4 of 10 levels between t = 998 and 999. Measured (results/BENCHMARKS.md, "Samplers"; Inception
# FID at n = 1,000, fashion-quick-cond, DPM-Solver++ 2M, 10 NFE): from 80, 37.0; from sigma(T - 1), 68.5; the
# integer spacings "trailing" (starts at T - 1) 40.3 and "uniform" (starts at t = 900) 84.1; x0 clipping on 37.0,
# off 37.8 (within noise; clipping stays on).
KARRAS_SIGMA_MAX = 80.0


@dataclass
class Prediction:
    """What the network says at one level, as the pair every sampler uses: eps (the noise in x) and x0
    (the clean image), both float32, consistent: x = a x0 + s eps."""

    eps: torch.Tensor
    x0: torch.Tensor


def predict(diffusion: GaussianDiffusion, out: torch.Tensor, x: torch.Tensor, a: float, s: float, *,
            clip_x0: bool = True) -> Prediction:
    """The network output `out` at a level with sqrt(abar) = a, sqrt(1 - abar) = s, turned into (eps, x0)
    for the diffusion's objective: eps: x0 = (x - s eps) / a; x0: eps = (x - a x0) / s; v (Salimans & Ho
    2022): x0 = a x - s v, eps = s x + a v. With `clip_x0`, x0 is clamped to [-1, 1] and eps re-derived
    from it, so the step stays consistent with the clipped estimate. Equals `diffusion.split_output` at
    integer timesteps (tested); this form also serves levels between them.
    """
    out, x = out.float(), x.float()
    obj = diffusion.cfg.objective
    if diffusion.is_flow:  # the velocity eps - x0 on x = a x0 + s eps with a + s = 1
        x0, eps = x - s * out, x + a * out
    elif obj == "eps":
        eps, x0 = out, (x - s * out) / a
    elif obj == "x0":
        x0, eps = out, (x - a * out) / s
    else:
        x0, eps = a * x - s * out, s * x + a * out
    if clip_x0:
        x0 = x0.clamp(-1.0, 1.0)
        eps = (x - a * x0) / s
    return Prediction(eps, x0)


class Sampler:
    """One sampler: the levels it visits (`plan`) and its update (`step`). Subclasses set:
    name, order (of the ODE solver; 1 for the stochastic first-order ones), nfe_per_step, stochastic,
    default_spacing, options (the keyword options it takes besides steps and spacing) and summary.

    `step(i, x, pred, ctx)` maps x at level i, with `pred` (the network's Prediction there), to x at level
    i + 1. `ctx` gives the plan, this chain's coefficients (`coefficients(plan, **options)`, computed once),
    `ctx.noise()` (a fresh N(0, I) draw, in the chain's fixed order), `ctx.denoise(x, level)` (one more
    network evaluation, for Heun) and `ctx.state` (a dict a multistep sampler keeps its history in).
    """

    name = ""
    order = 1
    nfe_per_step = 1
    stochastic = False
    default_spacing = "uniform"
    default_sigma_max: float | None = None  # where Karras levels start unless asked (capped at sigma(T - 1))
    options: tuple = ()
    summary = ""

    def default_steps(self, diffusion: GaussianDiffusion) -> int:
        return DEFAULT_STEPS

    def plan(self, diffusion: GaussianDiffusion, steps: int | None = None, spacing: str | None = None, *,
             sigma_max: float | None = None, timesteps=None) -> Plan:
        """The levels of this sampler's chain: `make_plan` with the sampler's defaults for what is not given
        (its own steps and spacing; on Karras levels its default_sigma_max, capped at the schedule's top)."""
        if diffusion.is_flow:  # evenly spaced t from 1 to 0; no other levels
            return make_plan(diffusion, steps if steps is not None else self.default_steps(diffusion),
                             spacing or "uniform", sigma_max=sigma_max, timesteps=timesteps)
        spacing = spacing or self.default_spacing
        if sigma_max is None and spacing == "karras" and self.default_sigma_max is not None:
            sigma_max = min(self.default_sigma_max, sigma_of(diffusion, diffusion.timesteps - 1))
        return make_plan(diffusion, steps if steps is not None else self.default_steps(diffusion), spacing,
                         sigma_max=sigma_max, timesteps=timesteps)

    def nfe(self, steps: int) -> int:
        """Network evaluations of a chain of `steps` steps (guidance doubles the batch, not the count)."""
        return steps * self.nfe_per_step

    def steps_for_nfe(self, nfe: int) -> int:
        """The most steps whose chain costs at most `nfe` network evaluations."""
        return max(1, nfe // self.nfe_per_step)

    def coefficients(self, plan: Plan, **options) -> list:
        return [None] * plan.steps

    def step(self, i: int, x: torch.Tensor, pred: Prediction, ctx) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<sampler {self.name}: order {self.order}, {self.nfe_per_step} NFE/step>"


class DDPM(Sampler):
    """Ancestral sampling (Ho et al. 2020, Algorithm 2, line 4): x_prev ~ N(mu(x_t, x0), var), with
    mu = sqrt(abar_prev) beta'/(1 - abar_t) x0 + sqrt(alpha') (1 - abar_prev)/(1 - abar_t) x_t (eq. 7),
    alpha' = abar_t / abar_prev, beta' = 1 - alpha'. var: "fixed_small" beta-tilde = beta' (1 - abar_prev)/
    (1 - abar_t), "fixed_large" beta' (Section 3.2). With fewer than T steps these are the respaced
    betas of Nichol & Dhariwal (2021, Section 4). No noise is added on the last step."""

    name, order, stochastic, default_spacing = "ddpm", 1, True, "uniform"
    options = ("variance",)
    summary = "ancestral sampling (DDPM Algorithm 2), all T steps by default"

    def default_steps(self, diffusion):
        return diffusion.timesteps

    def coefficients(self, plan, variance="fixed_small"):
        if variance not in VARIANCES:
            raise ConfigError(f"variance must be one of {', '.join(VARIANCES)}, got {variance!r}")
        out = []
        for i in range(plan.steps):
            ab_t, ab_p, om_t, om_p = plan.abar[i], plan.abar[i + 1], plan.one_minus[i], plan.one_minus[i + 1]
            alpha = ab_t / ab_p
            beta = 1.0 - alpha
            var = beta * om_p / om_t if variance == "fixed_small" else beta
            out.append((math.sqrt(ab_p) * beta / om_t, math.sqrt(alpha) * om_p / om_t, math.sqrt(var)))
        return out

    def step(self, i, x, pred, ctx):
        c_x0, c_x, std = ctx.coefficients[i]
        mean = c_x0 * pred.x0 + c_x * x
        return mean if i == ctx.plan.steps - 1 else mean + std * ctx.noise()


class DDIM(Sampler):
    """DDIM (Song et al. 2021, eq. 12): x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps
    + sigma z, sigma = eta sqrt((1 - abar_prev)/(1 - abar_t)) sqrt(1 - abar_t/abar_prev) (eq. 16).
    eta = 0 is deterministic (and is the Euler step of the probability-flow ODE in x/sqrt(abar), sigma:
    see `Euler`); eta = 1 on every step is DDPM with fixed_small."""

    name, order, default_spacing = "ddim", 1, "uniform"
    options = ("eta",)
    summary = "DDIM; eta = 0 deterministic, eta > 0 adds fresh noise"

    def default_steps(self, diffusion):
        return 50  # DDIM's long-standing default (ddim_sample, the lessons)

    def coefficients(self, plan, eta=0.0):
        if not (math.isfinite(eta) and eta >= 0):
            raise ConfigError(f"eta must be a number >= 0 (0 deterministic, 1 ancestral), got {eta}")
        return [_ddim_coefficients(plan.abar, plan.one_minus, i, i + 1, eta) for i in range(plan.steps)]

    def step(self, i, x, pred, ctx):
        c_x0, c_eps, sigma = ctx.coefficients[i]
        x_prev = c_x0 * pred.x0 + c_eps * pred.eps
        return x_prev + sigma * ctx.noise() if sigma > 0 and i < ctx.plan.steps - 1 else x_prev


class Euler(Sampler):
    """Euler on the probability-flow ODE in EDM form (Karras et al. 2022, Algorithm 1 without the
    correction): with x~ = x / sqrt(abar) = x0 + sigma eps, dx~/dsigma = (x~ - D(x~; sigma)) / sigma = eps
    (eq. 3 and 7), so x~_{i+1} = x~_i + (sigma_{i+1} - sigma_i) eps_i. On the same levels this is
    exactly DDIM with eta = 0 (lesson 09 asserts it); its default levels are the Karras ramp (eq. 5)."""

    name, order, default_spacing, default_sigma_max = "euler", 1, "karras", KARRAS_SIGMA_MAX
    summary = "Euler on the probability-flow ODE (EDM), Karras levels"

    def coefficients(self, plan):
        # at a = 0 (flow matching's t = 1) x~ is undefined: the same step, written as a' x0 + s' eps
        return [(plan.a[i + 1] / plan.a[i], plan.a[i + 1] * (plan.sigma[i + 1] - plan.sigma[i])) if plan.a[i] > 0
                else None for i in range(plan.steps)]

    def step(self, i, x, pred, ctx):
        if ctx.coefficients[i] is None:
            return ctx.plan.a[i + 1] * pred.x0 + ctx.plan.s[i + 1] * pred.eps
        c_x, c_d = ctx.coefficients[i]
        return c_x * x + c_d * pred.eps


class Heun(Sampler):
    """Heun's second-order method (Karras et al. 2022, Algorithm 1, lines 5-8, no churn): an Euler step
    to sigma_{i+1}, a second evaluation there, and the step redone with the average slope:
    x~_{i+1} = x~_i + (sigma_{i+1} - sigma_i) (d_i + d'_{i+1}) / 2. The last step, to sigma = 0, is plain
    Euler (d' would divide by sigma = 0), so a chain of N steps costs 2N - 1 network evaluations."""

    name, order, nfe_per_step, default_spacing, default_sigma_max = "heun", 2, 2, "karras", KARRAS_SIGMA_MAX
    summary = "Heun (2nd order, EDM Algorithm 1), Karras levels"

    def nfe(self, steps):
        return 2 * steps - 1

    def steps_for_nfe(self, nfe):
        return max(1, (nfe + 1) // 2)

    coefficients = Euler.coefficients

    def step(self, i, x, pred, ctx):
        plan, last = ctx.plan, i == ctx.plan.steps - 1
        if plan.kind == "flow":  # Heun in flow matching's own variables: dx/dt = v = eps - x0, dt = s' - s
            dt, v = plan.s[i + 1] - plan.s[i], pred.eps - pred.x0
            if last:
                return x + dt * v
            second = ctx.denoise(x + dt * v, i + 1)
            return x + dt * 0.5 * (v + second.eps - second.x0)
        c_x, c_d = ctx.coefficients[i]
        x_euler = c_x * x + c_d * pred.eps
        if i == ctx.plan.steps - 1:
            return x_euler
        second = ctx.denoise(x_euler, i + 1)
        return c_x * x + c_d * 0.5 * (pred.eps + second.eps)


class DPMSolverPP2M(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2), in data prediction: with lam = log(a / s) and
    h_i = lam_{i+1} - lam_i, x_{i+1} = (s_{i+1} / s_i) x_i - a_{i+1} (e^{-h_i} - 1) D_i (the exact solution of
    the linear part, with the data prediction held at D_i over the step), where D_i = x0_i on the first step
    and the last (to sigma = 0), and otherwise D_i = (1 + 1/(2 r_i)) x0_i - 1/(2 r_i) x0_{i-1},
    r_i = h_{i-1} / h_i: the previous prediction turns the step into a second-order multistep method at one
    network call a step."""

    name, order, default_spacing, default_sigma_max = "dpm++2m", 2, "karras", KARRAS_SIGMA_MAX
    summary = "DPM-Solver++ 2M (multistep, 2nd order)"

    @staticmethod
    def step_sizes(plan):
        """(h_i, r_i) of every step: r_i is None on the first and the last, which are first order."""
        out = []
        for i in range(plan.steps):
            h = plan.lam[i + 1] - plan.lam[i]
            out.append((h, (plan.lam[i] - plan.lam[i - 1]) / h if 0 < i < plan.steps - 1 else None))
        return out

    def coefficients(self, plan):
        return [(plan.s[i + 1] / plan.s[i], plan.a[i + 1] * -math.expm1(-h), r)
                for i, (h, r) in enumerate(self.step_sizes(plan))]

    def data_term(self, i, pred, ctx):
        r = ctx.coefficients[i][2]
        previous = ctx.state.get("x0")
        ctx.state["x0"] = pred.x0
        if r is None or previous is None:
            return pred.x0
        return (1 + 0.5 / r) * pred.x0 - (0.5 / r) * previous

    def step(self, i, x, pred, ctx):
        c_x, c_d, _ = ctx.coefficients[i]
        return c_x * x + c_d * self.data_term(i, pred, ctx)


class DPMSolverPP2MSDE(DPMSolverPP2M):
    """SDE-DPM-Solver++(2M) (Lu et al. 2022b, Appendix; as diffusers' "sde-dpmsolver++", midpoint):
    x_{i+1} = (s_{i+1}/s_i) e^{-h} x_i + a_{i+1} (1 - e^{-2h}) D_i + s_{i+1} sqrt(1 - e^{-2h}) z, with D_i as
    in `DPMSolverPP2M`: the reverse SDE solved with fresh noise at every step, which forgets part of the
    error made so far. No noise on the last step (to sigma = 0)."""

    name, order, stochastic, default_spacing = "dpm++2m-sde", 2, True, "karras"
    summary = "DPM-Solver++ 2M SDE (stochastic, multistep)"

    def coefficients(self, plan):
        out = []
        for i, (h, r) in enumerate(self.step_sizes(plan)):
            e2 = -math.expm1(-2 * h)
            out.append((plan.s[i + 1] / plan.s[i] * math.exp(-h), plan.a[i + 1] * e2, r,
                        plan.s[i + 1] * math.sqrt(e2)))
        return out

    def step(self, i, x, pred, ctx):
        c_x, c_d, _, c_z = ctx.coefficients[i]
        x_next = c_x * x + c_d * self.data_term(i, pred, ctx)
        return x_next + c_z * ctx.noise() if i < ctx.plan.steps - 1 else x_next


SAMPLERS: dict[str, Sampler] = {s.name: s for s in (DDPM(), DDIM(), Euler(), Heun(), DPMSolverPP2M(),
                                                     DPMSolverPP2MSDE())}
# The defaults of sample() and of `python -m ddpm_nb sample/animate/fid`, chosen from the measured table
# (results/BENCHMARKS.md, "Samplers"; fashion-quick-cond, Inception FID at n = 1,000, floor 23.4): the ODE samplers
# level off at FID 37-41 from 10-20 NFE (the model's own error: more steps solve the same ODE better, not the model),
# while fresh noise corrects part of that error: DPM-Solver++ 2M SDE scores 32.9 at 20 NFE, DDIM-50 with eta = 1
# 32.0 at 50, the previous default DDIM-50 (eta = 0) 41.2.
DEFAULT_SAMPLER = "dpm++2m-sde"
DEFAULT_STEPS = 20
FLOW_DEFAULT_SAMPLER = "dpm++2m"  # a flow-matching model takes the deterministic samplers only


def default_sampler(diffusion) -> str:
    """The sampler used when none is named: DEFAULT_SAMPLER, or FLOW_DEFAULT_SAMPLER for a flow-matching model."""
    return FLOW_DEFAULT_SAMPLER if diffusion.is_flow else DEFAULT_SAMPLER


def get_sampler(name: str | Sampler) -> Sampler:
    """The registered sampler of that name; a one-line ConfigError listing the registry otherwise."""
    if isinstance(name, Sampler):
        return name
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)} "
                          "(python -m ddpm_nb sample --list-samplers describes them)")
    return SAMPLERS[name]


def describe_samplers() -> str:
    """A table of the registry: name, order, network evaluations per step, stochastic, default levels."""
    rows = [f"{'name':<12} {'order':>5} {'NFE/step':>10}  {'noise':<6} {'levels':<16} what"]
    for s in SAMPLERS.values():
        per = "2 (last 1)" if s.name == "heun" else str(s.nfe_per_step)
        levels = s.default_spacing + (f" from {s.default_sigma_max:g}" if s.default_sigma_max else "")
        rows.append(f"{s.name:<12} {s.order:>5} {per:>10}  {'fresh' if s.stochastic else 'none':<6} "
                    f"{levels:<16} {s.summary}")
    return "\n".join(rows)


class _Chain:
    """What a sampler's step may use: the plan, its coefficients, fresh noise, one more evaluation, state."""

    def __init__(self, plan, coefficients, noise, denoise):
        self.plan, self.coefficients, self.noise, self.denoise = plan, coefficients, noise, denoise
        self.state: dict = {}


def check_formulation(sampler: Sampler, diffusion, options: dict) -> None:
    """A flow-matching model takes the deterministic samplers only (FLOW_SAMPLERS, DDIM with eta = 0)."""
    if diffusion.is_flow and (sampler.name not in FLOW_SAMPLERS or options.get("eta")):
        raise ConfigError(f"this is a flow-matching model: sample it with {', '.join(FLOW_SAMPLERS)} (ddim with eta = 0); "
                          f"{sampler.name}{' with eta' if options.get('eta') else ''} is written for the DDPM's "
                          "variance-preserving noise")


def _check_options(sampler: Sampler, options: dict) -> dict:
    given = {k: v for k, v in options.items() if v is not None}
    for key in given:
        if key not in sampler.options:
            takers = [s.name for s in SAMPLERS.values() if key in s.options]
            if key == "eta" and given[key] == 0:
                continue
            kind = "deterministic" if not sampler.stochastic else "stochastic in its own way"
            raise ConfigError(f"the {sampler.name} sampler does not take {key} (it is {kind}); "
                              f"{key} applies to: {', '.join(takers)}")
    return {k: v for k, v in given.items() if k in sampler.options}


def prepare(diffusion: GaussianDiffusion, sampler: str | Sampler | None = None, *, steps: int | None = None,
            spacing: str | None = None, sigma_max: float | None = None, timesteps=None, eta: float | None = None,
            variance: str | None = None) -> tuple[Sampler, Plan, list]:
    """(sampler, plan, coefficients) of one chain, every option checked against the sampler and the model's
    formulation first (a ConfigError otherwise): what `run_sampler` runs and the command line checks."""
    s = get_sampler(sampler if sampler is not None else default_sampler(diffusion))
    opts = _check_options(s, dict(eta=eta, variance=variance))
    check_formulation(s, diffusion, opts)
    plan = s.plan(diffusion, steps, spacing, sigma_max=sigma_max, timesteps=timesteps)
    return s, plan, s.coefficients(plan, **opts)


def denoiser(model: nn.Module, diffusion: GaussianDiffusion, plan: Plan, batch: int, device, *,
             y: torch.Tensor | None = None, guidance_scale: float = 1.0, clip_x0: bool = True):
    """denoise(x, level) -> the network's Prediction at level `level` of `plan` (guided when asked)."""
    def denoise(x, level: int) -> Prediction:
        tt = torch.full((batch,), plan.t[level], device=device,
                        dtype=torch.long if isinstance(plan.t[level], int) else torch.float32)
        out = model_output(model, x, tt, y, guidance_scale)
        return predict(diffusion, out, x, plan.a[level], plan.s[level], clip_x0=clip_x0)
    return denoise


def run_sampler(model: nn.Module, diffusion: GaussianDiffusion, shape: tuple, sampler: str | Sampler | None = None,
                *, steps: int | None = None, spacing: str | None = None, sigma_max: float | None = None,
                timesteps=None, eta: float | None = None, variance: str | None = None, y: torch.Tensor | None = None,
                guidance_scale: float = 1.0, clip_x0: bool = True, generator: torch.Generator | None = None,
                x_T: torch.Tensor | None = None, return_trajectory: bool = False, trajectory_steps=None,
                progress: bool = True, device=None, dtype: torch.dtype | None = None):
    """Draw images of `shape` = (B, C, H, W) with a registered sampler (see `SAMPLERS`).

    steps: default the sampler's own (all T for ddpm, 50 for ddim, else DEFAULT_STEPS); spacing: its default levels;
    sigma_max: where the chain starts (default the last timestep); timesteps: explicit integer levels.
    eta (ddim) and variance (ddpm) are options of those samplers only: passing one to another sampler is
    an error, as is any combination a sampler cannot honour.
    Noise is drawn from `generator` in a fixed order: x_T first, then one draw per step that needs it.
    Returns the samples (B, C, H, W) in [-1, 1] (float32), or (samples, Trajectory): entry i is the state
    before step i and the network's x0 estimate from it, the last entry the final sample;
    `trajectory_steps` picks the entries 0 .. steps kept (default all). `dtype` (e.g. torch.bfloat16)
    runs the network under autocast.
    """
    s, plan, coefficients = prepare(diffusion, sampler, steps=steps, spacing=spacing, sigma_max=sigma_max,
                                    timesteps=timesteps, eta=eta, variance=variance)
    device, x = _prepare(model, shape, x_T, generator, device)
    denoise = denoiser(model, diffusion, plan, shape[0], device, y=y, guidance_scale=guidance_scale, clip_x0=clip_x0)
    chain = _Chain(plan, coefficients, lambda: _randn(shape, generator, device), denoise)

    def step(x, i):
        pred = denoise(x, i)
        return s.step(i, x.float(), pred, chain), pred.x0

    desc = f"{s.name}-{plan.steps}" if s.name != "ddpm" else "DDPM"
    return _run(model, plan, x, return_trajectory, trajectory_steps, progress, desc, device, dtype, step)


def _run(model, plan, x, return_trajectory, trajectory_steps, progress, desc, device, dtype, step):
    n = plan.steps
    keep = set(range(n + 1)) if trajectory_steps is None else {int(i) for i in trajectory_steps}
    if return_trajectory and not keep <= set(range(n + 1)):
        raise ValueError(f"trajectory_steps must be chain entries 0..{n} (this chain has {n} steps), "
                         f"got {sorted(keep - set(range(n + 1)))[:5]}")
    xs, x0s = [], []  # kept entries, on the device: one copy to the CPU at the end, not one per step
    with _eval_mode(model), _autocast(device, dtype), Progress(n, desc, progress, unit="steps") as bar:
        for i in range(n):
            x_next, x0 = step(x, i)
            bar.update(1)
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
    timesteps = [(list(plan.t) + [-1])[i] for i in steps]
    return x, Trajectory(timesteps=timesteps, x_t=torch.stack(xs).cpu(), x0_pred=torch.stack(x0s).cpu(),
                         steps=steps)


def ddpm_sample(model: nn.Module, diffusion: GaussianDiffusion, shape: tuple, *, variance: str = "fixed_small",
                **kw):
    """Ancestral sampling over all T steps (Algorithm 2): `run_sampler` with the ddpm sampler.
    `trajectory_steps` e.g. `animate.frame_schedule(T + 1, 60)`. See `run_sampler` for the rest."""
    return run_sampler(model, diffusion, shape, "ddpm", variance=variance, **kw)


def ddim_sample(model: nn.Module, diffusion: GaussianDiffusion, shape: tuple, *, steps: int = 50,
                eta: float = 0.0, spacing: str = "uniform", **kw):
    """DDIM sampling over `steps` timesteps chosen by `spacing`: `run_sampler` with the ddim sampler.
    Noise order matches `ddpm_sample`: x_T first, then (when eta > 0) one draw per step but the last."""
    if not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be >= 0, got {eta}")
    return run_sampler(model, diffusion, shape, "ddim", steps=steps, eta=eta, spacing=spacing, **kw)


def sample(model: nn.Module, diffusion: GaussianDiffusion, n: int, *, sampler: str | None = None,
           method: str | None = None, **kw):
    """Draw `n` images with the model's own image size and channels, with the named sampler (default
    `default_sampler(diffusion)`; `method` is the older name of the same argument). Keywords as `run_sampler`."""
    if sampler is not None and method is not None and sampler != method:
        raise ConfigError(f"sampler={sampler!r} and method={method!r} disagree; give one (method is its old name)")
    cfg = model.cfg
    shape = (n, cfg.in_channels, cfg.image_size, cfg.image_size)
    return run_sampler(model, diffusion, shape, sampler or method, **kw)
