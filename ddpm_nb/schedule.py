"""Noise schedules: the betas and every quantity derived from them, in one place.

Explained in notebooks/01_forward_process.

Indexing: the package uses 0-based timesteps t = 0 .. T-1; the paper's step t corresponds to
index t-1. So `alphas_cumprod[0]` is the paper's alpha-bar_1 and `alphas_cumprod[T-1]` is
alpha-bar_T. All tensors are computed in float64 and stored as float32 buffers of
`NoiseSchedule`, so they follow `.to(device)` and `state_dict()`.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import SCHEDULES, ConfigError, DiffusionConfig

__all__ = [
    "linear_betas",
    "cosine_betas",
    "sigmoid_betas",
    "quadratic_betas",
    "make_betas",
    "rescale_zero_terminal_snr",
    "NoiseSchedule",
    "extract",
]

MAX_BETA = 0.999  # the clip of Nichol & Dhariwal (2021): keeps beta_t < 1 near t = T


def _ddpm_range(timesteps: int) -> tuple[float, float]:
    """DDPM's 1e-4 -> 0.02 is for T = 1000; scaled by 1000/T, other T keep the same sum of betas (and so about
    the same final alpha-bar, exp(-sum beta), while the betas are small; larger betas end a little noisier)."""
    scale = 1000.0 / timesteps
    return scale * 1e-4, scale * 0.02


def linear_betas(timesteps: int) -> torch.Tensor:
    """Ho et al. (2020): betas linear from 1e-4 to 0.02 (for T = 1000). Shape (T,), float64."""
    start, end = _ddpm_range(timesteps)
    return torch.linspace(start, end, timesteps, dtype=torch.float64).clamp(max=MAX_BETA)


def quadratic_betas(timesteps: int) -> torch.Tensor:
    """sqrt(beta) linear between the DDPM end points, then squared. Shape (T,), float64."""
    start, end = _ddpm_range(timesteps)
    return (torch.linspace(start ** 0.5, end ** 0.5, timesteps, dtype=torch.float64) ** 2).clamp(max=MAX_BETA)


def _betas_from_alpha_bar(alpha_bar: torch.Tensor) -> torch.Tensor:
    """alpha_bar sampled at t/T for t = 0..T (T+1 values) -> betas_t = 1 - abar(t+1)/abar(t), clipped."""
    return (1.0 - alpha_bar[1:] / alpha_bar[:-1]).clamp(min=0.0, max=MAX_BETA)


def cosine_betas(timesteps: int, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal (2021): alpha_bar(t) = cos^2(((t/T + s)/(1 + s)) * pi/2) / alpha_bar(0)."""
    t = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return _betas_from_alpha_bar(f / f[0])


def sigmoid_betas(timesteps: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0) -> torch.Tensor:
    """Chen (2023), "On the importance of noise scheduling": alpha_bar follows a shifted sigmoid."""
    t = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64) / timesteps
    v_start = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64))
    v_end = torch.sigmoid(torch.tensor(end / tau, dtype=torch.float64))
    alpha_bar = (v_end - torch.sigmoid((t * (end - start) + start) / tau)) / (v_end - v_start)
    return _betas_from_alpha_bar(alpha_bar.clamp(min=1e-12))


_MAKERS = {"linear": linear_betas, "cosine": cosine_betas, "sigmoid": sigmoid_betas, "quadratic": quadratic_betas}


def make_betas(name: str, timesteps: int) -> torch.Tensor:
    """Betas of the named schedule, shape (T,), float64."""
    if name not in _MAKERS:
        raise ConfigError(f"DiffusionConfig.schedule: unknown schedule {name!r}; allowed: {', '.join(SCHEDULES)}")
    if not isinstance(timesteps, int) or timesteps < 2:
        raise ConfigError(f"DiffusionConfig.timesteps: must be an integer >= 2, got {timesteps!r}")
    return _MAKERS[name](timesteps)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. (2024), Algorithm 1: shift and scale sqrt(alpha_bar) so that its last value is 0
    (zero terminal SNR) and its first value is unchanged; return the matching betas."""
    sqrt_ab = torch.cumprod(1.0 - betas, 0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alpha_bar = sqrt_ab ** 2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1.0 - alphas


def extract(a: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Gather a[t] for a batch of timesteps t: (B,) and reshape to (B, 1, ..., 1) with `ndim` dims."""
    out = a.gather(0, t.long())
    return out.reshape(t.shape[0], *([1] * (ndim - 1)))


class NoiseSchedule(nn.Module):
    """Every precomputed quantity of the forward process, as buffers (float32).

    Names follow the paper: betas, alphas, alphas_cumprod (alpha-bar), alphas_cumprod_prev,
    sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod,
    sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod, posterior_variance (beta-tilde),
    posterior_log_variance_clipped, posterior_mean_coef1/2 (eq. 7), log_snr.
    """

    def __init__(self, betas: torch.Tensor):
        super().__init__()
        betas = betas.to(torch.float64)
        if betas.dim() != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ConfigError("NoiseSchedule: betas must be a 1-D tensor with values in (0, 1]")
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, 0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        # q(x_{t-1} | x_t, x_0) = N(coef1 * x_0 + coef2 * x_t, beta_tilde): DDPM eq. (6)-(7)
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # beta_tilde_1 = 0, so the log is clipped with the next value (as in the DDPM code)
        posterior_log_variance_clipped = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]]))
        values = dict(
            betas=betas,
            alphas=alphas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            sqrt_alphas_cumprod=alphas_cumprod.sqrt(),
            sqrt_one_minus_alphas_cumprod=(1.0 - alphas_cumprod).sqrt(),
            sqrt_recip_alphas_cumprod=(1.0 / alphas_cumprod.clamp(min=1e-20)).sqrt(),
            sqrt_recipm1_alphas_cumprod=(1.0 / alphas_cumprod.clamp(min=1e-20) - 1.0).sqrt(),
            posterior_variance=posterior_variance,
            posterior_log_variance_clipped=posterior_log_variance_clipped,
            posterior_mean_coef1=betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
            posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod),
            log_snr=torch.log(alphas_cumprod) - torch.log(1.0 - alphas_cumprod),
        )
        for name, value in values.items():
            self.register_buffer(name, value.to(torch.float32))

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> "NoiseSchedule":
        betas = make_betas(cfg.schedule, cfg.timesteps)
        if cfg.zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls(betas)

    @property
    def timesteps(self) -> int:
        return self.betas.shape[0]

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """alpha_bar_t / (1 - alpha_bar_t) for a batch of timesteps (B,) -> (B,) float32."""
        ab = self.alphas_cumprod[t]
        return ab / (1.0 - ab).clamp(min=1e-20)

    def extra_repr(self) -> str:
        return f"T={self.timesteps}, alpha_bar[T-1]={self.alphas_cumprod[-1].item():.3e}"
