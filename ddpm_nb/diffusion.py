"""The forward process q(x_t | x_0), the conversions between eps, x0 and v, and the training loss.

Explained in notebooks/01_forward_process (q_sample) and notebooks/03_training (the loss).
All timesteps are 0-based indices t = 0 .. T-1 (see ddpm_nb.schedule).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import DiffusionConfig
from .schedule import NoiseSchedule, extract

__all__ = ["GaussianDiffusion", "FlowMatching", "make_diffusion", "drop_labels"]


def _randn(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    """N(0, I) of `shape`, drawn on the generator's device (so a seeded run is reproducible) and moved."""
    if generator is None:
        return torch.randn(shape, device=device)
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def drop_labels(y: torch.Tensor, p: float, null_class: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Classifier-free guidance training (Ho & Salimans 2022): each label becomes `null_class` with
    probability p, independently. y: (B,) long. One uniform per label is drawn from `generator`.
    Explained in notebooks/06_guidance.
    """
    where = generator.device if generator is not None else y.device
    drop = (torch.rand(y.shape[0], generator=generator, device=where) < p).to(y.device)
    return torch.where(drop, torch.full_like(y, null_class), y)


def regression_loss(out: torch.Tensor, target: torch.Tensor, loss_type: str) -> torch.Tensor:
    """Per-sample (B,) loss of the network output against its target: "mse", "l1" or "huber" (delta 1), averaged
    over every other dimension, in the inputs' precision (fp32 here)."""
    if loss_type == "mse":
        per = F.mse_loss(out, target, reduction="none")
    elif loss_type == "l1":
        per = F.l1_loss(out, target, reduction="none")
    else:
        per = F.huber_loss(out, target, reduction="none", delta=1.0)
    return per.flatten(1).mean(1)


class GaussianDiffusion(nn.Module):
    """A noise schedule plus the objective: everything about diffusion that is not the network.

    Holds the schedule as a submodule (its buffers follow `.to(device)`); has no parameters.
    """

    is_flow = False  # FlowMatching's is True: the samplers read it

    def __init__(self, cfg: DiffusionConfig | None = None, *, schedule: NoiseSchedule | None = None):
        super().__init__()
        self.cfg = cfg or DiffusionConfig()
        self.schedule = schedule if schedule is not None else NoiseSchedule.from_config(self.cfg)
        if self.schedule.timesteps != self.cfg.timesteps:
            raise ValueError(f"schedule has {self.schedule.timesteps} steps but cfg.timesteps={self.cfg.timesteps}")
        # decided once here: reading the buffer in split_output would sync a GPU at every sampler step
        self._eps_from_clipped_x0 = self.cfg.objective != "v" or float(self.schedule.alphas_cumprod[-1]) > 0
        # host copies (Python floats) of abar_t and 1 - abar_t (the latter from the float64-made buffer), for
        # the samplers' per-step coefficients: read once here, never a device sync or a float64 device tensor
        self.alphas_cumprod_host = self.schedule.alphas_cumprod.tolist()
        self.one_minus_alphas_cumprod_host = [v * v for v in self.schedule.sqrt_one_minus_alphas_cumprod.tolist()]

    @property
    def timesteps(self) -> int:
        return self.schedule.timesteps

    def _get(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return extract(getattr(self.schedule, name), t, x.dim()).to(x.dtype)

    # ---- forward process ------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) in one step.

        x0: (B, C, H, W) in [-1, 1]; t: (B,) long in [0, T); noise: like x0 (drawn if None).
        """
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype) \
                if generator is not None else torch.randn_like(x0)
        return self._get("sqrt_alphas_cumprod", t, x0) * x0 + self._get("sqrt_one_minus_alphas_cumprod", t, x0) * noise

    def q_posterior_mean_variance(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """q(x_{t-1} | x_t, x_0) = N(mean, beta_tilde_t I), DDPM eq. (6)-(7).

        Returns (mean (B, C, H, W), variance (B, 1, 1, 1), log_variance_clipped (B, 1, 1, 1)).
        """
        mean = self._get("posterior_mean_coef1", t, x_t) * x0 + self._get("posterior_mean_coef2", t, x_t) * x_t
        return mean, self._get("posterior_variance", t, x_t), self._get("posterior_log_variance_clipped", t, x_t)

    # ---- conversions between the three parameterisations --------------------------------
    def predict_x0_from_eps(self, x_t, t, eps):
        """x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)."""
        return self._get("sqrt_recip_alphas_cumprod", t, x_t) * x_t - self._get("sqrt_recipm1_alphas_cumprod", t, x_t) * eps

    def predict_eps_from_x0(self, x_t, t, x0):
        """eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)."""
        return (self._get("sqrt_recip_alphas_cumprod", t, x_t) * x_t - x0) / self._get("sqrt_recipm1_alphas_cumprod", t, x_t)

    def get_v(self, x0, eps, t):
        """v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022)."""
        return self._get("sqrt_alphas_cumprod", t, x0) * eps - self._get("sqrt_one_minus_alphas_cumprod", t, x0) * x0

    def predict_x0_from_v(self, x_t, t, v):
        """x0 = sqrt(abar) x_t - sqrt(1 - abar) v."""
        return self._get("sqrt_alphas_cumprod", t, x_t) * x_t - self._get("sqrt_one_minus_alphas_cumprod", t, x_t) * v

    def predict_eps_from_v(self, x_t, t, v):
        """eps = sqrt(1 - abar) x_t + sqrt(abar) v."""
        return self._get("sqrt_one_minus_alphas_cumprod", t, x_t) * x_t + self._get("sqrt_alphas_cumprod", t, x_t) * v

    def split_output(self, model_out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, *,
                     clip_x0: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Turn the network output (whatever the objective) into (eps_pred, x0_pred), both in fp32.

        With `clip_x0`, x0_pred is clamped to [-1, 1] and eps_pred re-derived from it, so a sampler
        step stays consistent with the clipped estimate.
        """
        out, x_t = model_out.float(), x_t.float()
        obj = self.cfg.objective
        if obj == "eps":
            eps, x0 = out, self.predict_x0_from_eps(x_t, t, out)
        elif obj == "x0":
            x0 = out
            eps = self.predict_eps_from_x0(x_t, t, x0)
        else:
            x0, eps = self.predict_x0_from_v(x_t, t, out), self.predict_eps_from_v(x_t, t, out)
        if clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
            if self._eps_from_clipped_x0:
                eps = self.predict_eps_from_x0(x_t, t, x0)
        return eps, x0

    # ---- training loss --------------------------------------------------------------------
    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network should output for the configured objective."""
        if self.cfg.objective == "eps":
            return noise
        if self.cfg.objective == "x0":
            return x0
        return self.get_v(x0, noise, t)

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample weights (B,): 1, or min-SNR-gamma expressed for the objective (Hang et al. 2023)."""
        if self.cfg.min_snr_gamma is None:
            return torch.ones(t.shape[0], device=t.device)
        snr = self.schedule.snr(t)
        clipped = snr.clamp(max=self.cfg.min_snr_gamma)
        if self.cfg.objective == "eps":
            return clipped / snr.clamp(min=1e-8)
        if self.cfg.objective == "x0":
            return clipped
        return clipped / (snr + 1.0)

    def sample_timesteps(self, batch: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniform t ~ U{0, ..., T-1}: (B,) long, drawn on the generator's device and moved to `device`."""
        where = generator.device if generator is not None else device
        return torch.randint(0, self.timesteps, (batch,), device=where, generator=generator).to(device)

    def training_losses(self, model: nn.Module, x0: torch.Tensor, y: torch.Tensor | None = None, *,
                        generator: torch.Generator | None = None, t: torch.Tensor | None = None,
                        noise: torch.Tensor | None = None,
                        input_perturbation: float | None = None) -> torch.Tensor:
        """Algorithm 1 of DDPM, per sample: (B,) float32 losses with the objective's weighting.

        Draws t ~ U{0..T-1}, then eps ~ N(0, I) (in that order, from `generator`), unless given;
        forms x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps and regresses the network's output on the
        objective's target. With input perturbation gamma (DDPM-IP, Ning et al. 2023, eq. 8), x_t is
        formed from eps + gamma * xi (xi drawn after eps) while the target keeps eps, which trains the
        network on the slightly-off inputs it meets while sampling. `input_perturbation` overrides
        cfg.input_perturbation (evaluation passes 0: the plain objective).
        The network may run under autocast; its output is cast to fp32 before the loss, so the
        regression and the reduction are always computed in full precision.
        """
        b = x0.shape[0]
        if t is None:
            t = self.sample_timesteps(b, x0.device, generator)
        if noise is None:
            noise = _randn(x0.shape, generator, x0.device)
        gamma = self.cfg.input_perturbation if input_perturbation is None else input_perturbation
        x_t = self.q_sample(x0, t, noise + gamma * _randn(x0.shape, generator, x0.device) if gamma else noise)
        out = model(x_t, t, y) if y is not None else model(x_t, t)
        out = out.float()
        target = self.target(x0.float(), noise.float(), t)
        return regression_loss(out, target, self.cfg.loss_type) * self.loss_weight(t)

    def loss(self, model: nn.Module, x0: torch.Tensor, **kw) -> torch.Tensor:
        """Mean of `training_losses`: a scalar in fp32."""
        return self.training_losses(model, x0, **kw).mean()


class FlowMatching(nn.Module):
    """Flow matching with the linear (rectified-flow) path, a sibling of `GaussianDiffusion` with the interface
    the Trainer and the samplers use. Explained in notebooks/11_flow_matching.

    x_t = (1 - t) x0 + t eps for t in [0, 1] (t = 0 the data, t = 1 the noise), and the network regresses the
    conditional velocity d x_t / dt = eps - x0 (Lipman et al. 2023; Liu et al. 2023). Its minimiser is the
    marginal velocity E[eps - x0 | x_t], whose ODE carries the noise distribution to the data. The network
    sees t scaled by cfg.timesteps (1000: the range its time embedding was built for). t is drawn uniformly,
    or logit-normal (Esser et al. 2024) with cfg.flow_time. In the samplers' terms this is a path with
    a = 1 - t and s = t: x = a x0 + s eps, so DDIM (eta = 0), Euler, Heun and DPM-Solver++ 2M apply.
    """

    is_flow = True

    def __init__(self, cfg: DiffusionConfig):
        super().__init__()
        if cfg.formulation != "flow":
            raise ValueError("FlowMatching needs DiffusionConfig(formulation='flow')")
        self.cfg = cfg

    @property
    def timesteps(self) -> int:
        """The scale of the network's time input: it sees t * timesteps."""
        return self.cfg.timesteps

    def sample_timesteps(self, batch: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        """The network's time input for t drawn from cfg.flow_time: (B,) float32 in (0, timesteps)."""
        where = generator.device if generator is not None else device
        if self.cfg.flow_time == "uniform":
            t = torch.rand(batch, device=where, generator=generator)
        else:
            t = torch.sigmoid(torch.randn(batch, device=where, generator=generator))
        return (t * self.timesteps).to(device)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = (1 - t) x0 + t eps, t given as the network's time input (B,) in [0, timesteps]."""
        u = (t.float() / self.timesteps).reshape(-1, *([1] * (x0.dim() - 1)))
        return (1 - u) * x0 + u * noise

    def training_losses(self, model: nn.Module, x0: torch.Tensor, y: torch.Tensor | None = None, *,
                        generator: torch.Generator | None = None, t: torch.Tensor | None = None,
                        noise: torch.Tensor | None = None, input_perturbation: float | None = None) -> torch.Tensor:
        """Conditional flow matching, per sample: (B,) float32 MSE between the network's output at x_t and
        eps - x0. Draws t then eps (in that order, from `generator`) unless given; `t` is the network's time
        input (t * timesteps). `input_perturbation` exists for the Trainer's interface and must be 0/None."""
        if input_perturbation:
            raise ValueError("input perturbation is a DDPM setting; flow matching does not use it")
        if t is None:
            t = self.sample_timesteps(x0.shape[0], x0.device, generator)
        if noise is None:
            noise = _randn(x0.shape, generator, x0.device)
        x_t = self.q_sample(x0, t, noise)
        out = (model(x_t, t, y) if y is not None else model(x_t, t)).float()
        return regression_loss(out, noise.float() - x0.float(), self.cfg.loss_type)

    def loss(self, model: nn.Module, x0: torch.Tensor, **kw) -> torch.Tensor:
        return self.training_losses(model, x0, **kw).mean()


def make_diffusion(cfg: DiffusionConfig) -> GaussianDiffusion | FlowMatching:
    """The process a config describes: `GaussianDiffusion`, or `FlowMatching` for formulation 'flow'."""
    return FlowMatching(cfg) if cfg.formulation == "flow" else GaussianDiffusion(cfg)
