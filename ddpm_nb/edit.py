"""Editing with a trained diffusion model, on the sampler contract of ddpm_nb.sample: SDEdit (img2img),
inpainting (plain replacement and RePaint's resampling) and deterministic DDIM inversion.

Each function takes images in [-1, 1] of the model's shape, any class label (conditional models) and a
`torch.Generator` for reproducible noise, and returns images in [-1, 1].

- `img2img` (Meng et al. 2022, SDEdit): noise the input to level t0 with q(x_t0 | x0), then run any
  registered sampler from t0 down. Small t0 keeps the input; large t0 keeps only its rough layout.
- `inpaint` (Lugmayr et al. 2022, RePaint): at every level, the known pixels are replaced by the input
  noised to that level, so the sampler only invents the unknown ones; with `resample` > 1, each block of
  `jump` steps is undone by forward noising and redone, which lets the unknown region agree with the known.
- `ddim_invert` (Song et al. 2021, Section 4.3; Dhariwal & Nichol 2021): the DDIM ODE run from the image up
  to noise, x_{k+1} = a_{k+1} x0(x_k) + s_{k+1} eps(x_k, t_k); DDIM (eta = 0) on the same levels maps the
  latent back to (almost) the image; the error falls as the steps shrink.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .diffusion import GaussianDiffusion
from .sample import _Chain, _autocast, _eval_mode, _randn, denoiser, get_sampler, make_plan, run_sampler, sigma_of
from .utils import ConfigError

__all__ = ["img2img", "inpaint", "ddim_invert", "ddim_reconstruct"]


def _device(model: nn.Module, device) -> torch.device:
    return torch.device(device) if device is not None else next(model.parameters()).device


def _check_images(images: torch.Tensor, model: nn.Module, name: str = "images") -> None:
    c = model.cfg
    want = (c.in_channels, c.image_size, c.image_size)
    if images.dim() != 4 or tuple(images.shape[1:]) != want:
        raise ConfigError(f"{name} must be (B, {want[0]}, {want[1]}, {want[2]}) for this model, got {tuple(images.shape)}")


def _check_t0(t0: int, diffusion: GaussianDiffusion) -> None:
    if not (isinstance(t0, int) and 0 <= t0 < diffusion.timesteps):
        raise ConfigError(f"t0 must be an integer timestep in 0..{diffusion.timesteps - 1}, got {t0!r}")


def img2img(model: nn.Module, diffusion: GaussianDiffusion, images: torch.Tensor, t0: int, *, sampler: str = "ddim",
            steps: int = 50, spacing: str = "trailing", generator: torch.Generator | None = None, device=None,
            **kw) -> torch.Tensor:
    """SDEdit: x_t0 = sqrt(abar_t0) x0 + sqrt(1 - abar_t0) eps, then `sampler` from level t0 to the clean image.

    `steps` levels among 0..t0 ("trailing" spacing starts exactly at t0); fewer if t0 + 1 < steps. The noise eps
    is the first draw from `generator`, the sampler's own noise comes after. Other keywords go to `run_sampler`
    (y, guidance_scale, eta, clip_x0, ...). Returns (B, C, H, W) in [-1, 1].
    """
    _check_images(images, model)
    _check_t0(t0, diffusion)
    device = _device(model, device)
    steps = min(steps, t0 + 1)
    plan = make_plan(diffusion, steps, spacing, sigma_max=sigma_of(diffusion, t0))
    eps = _randn(images.shape, generator, device)
    x_t0 = plan.a[0] * images.to(device).float() + plan.s[0] * eps
    return run_sampler(model, diffusion, images.shape, sampler, steps=steps, spacing=spacing,
                       sigma_max=sigma_of(diffusion, t0), x_T=x_t0, generator=generator, device=device, **kw)


def inpaint(model: nn.Module, diffusion: GaussianDiffusion, images: torch.Tensor, mask: torch.Tensor, *,
            sampler: str = "ddpm", steps: int = 250, resample: int = 1, jump: int = 1, eta: float | None = None,
            y: torch.Tensor | None = None, guidance_scale: float = 1.0, clip_x0: bool = True,
            generator: torch.Generator | None = None, device=None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Fill the pixels where `mask` is 0, keeping those where it is 1 (mask: (B or 1, 1 or C, H, W) of 0/1).

    At every level i the known pixels of the state are set to the input noised to that level,
    a_i x0 + s_i z (fresh z each time), so the final image equals the input there exactly. `resample` = 1 is
    plain replacement; RePaint uses `resample` = 10 and `jump` = 10: after each block of `jump` steps down, the
    state is noised back up `jump` levels with q(x_i | x_{i+jump}) and the block redone, `resample` - 1 times.
    Needs a sampler that keeps no history between steps (ddpm, ddim, euler); stochastic ones (ddpm, or ddim
    with eta > 0) let the invented pixels settle, as the paper recommends. Noise comes from `generator`.
    """
    _check_images(images, model)
    s = get_sampler(sampler)
    if s.name in ("heun", "dpm++2m", "dpm++2m-sde"):
        raise ConfigError(f"inpaint needs a sampler without a history or a second evaluation per step (ddpm, ddim or "
                          f"euler); {s.name} has one")
    if resample < 1 or jump < 1:
        raise ConfigError(f"resample and jump must be at least 1, got resample={resample}, jump={jump}")
    if mask.dim() != 4 or mask.shape[-2:] != images.shape[-2:]:
        raise ConfigError(f"mask must be (B or 1, 1 or C, H, W) with the images' H and W, got {tuple(mask.shape)}")
    device = _device(model, device)
    options = {"eta": eta} if s.name == "ddim" and eta is not None else {}
    plan = make_plan(diffusion, steps, "uniform")
    coefficients = s.coefficients(plan, **options)
    known = images.to(device).float()
    m = mask.to(device).float()
    noise = lambda: _randn(images.shape, generator, device)  # noqa: E731
    denoise = denoiser(model, diffusion, plan, images.shape[0], device, y=y, guidance_scale=guidance_scale,
                       clip_x0=clip_x0)

    def known_at(level):
        return known if level == plan.steps else plan.a[level] * known + plan.s[level] * noise()

    chain = _Chain(plan, coefficients, noise, denoise)
    x = noise()
    i = 0
    redone = {}  # block start -> times redone
    with _eval_mode(model), _autocast(device, dtype):
        while i < plan.steps:
            x = m * known_at(i) + (1 - m) * x
            x = s.step(i, x, denoise(x, i), chain).float()
            i += 1
            start = i - jump
            if i % jump == 0 and i < plan.steps and redone.get(start, 0) < resample - 1:
                redone[start] = redone.get(start, 0) + 1
                # undo `jump` levels at once: q(x_start | x_i) = N(sqrt(abar_start / abar_i) x_i, 1 - abar_start / abar_i)
                ratio = plan.abar[start] / plan.abar[i]
                x = math.sqrt(ratio) * x + math.sqrt(1 - ratio) * noise()
                i = start
    x = m * known + (1 - m) * x
    return x.clamp(-1.0, 1.0)


def ddim_invert(model: nn.Module, diffusion: GaussianDiffusion, images: torch.Tensor, *, steps: int = 50,
                y: torch.Tensor | None = None, guidance_scale: float = 1.0, device=None,
                dtype: torch.dtype | None = None, return_levels: bool = False):
    """The latent x at the top level whose DDIM (eta = 0, `steps` "uniform" levels, x0 not clipped) chain ends at
    `images`: the same ODE run upwards, each step using the network at the level it starts from:
    x_{k+1} = sqrt(abar_{k+1}) x0_k + sqrt(1 - abar_{k+1}) eps_k, from x_0 = the image at t = 0.
    Deterministic (no generator). Returns the latent (B, C, H, W), or (latent, timesteps descending) with
    `return_levels`, which `ddim_reconstruct` takes."""
    _check_images(images, model)
    device = _device(model, device)
    plan = make_plan(diffusion, steps, "uniform")
    up = list(range(plan.steps - 1, -1, -1))  # plan levels from t = 0 upwards
    x = images.to(device).float()
    denoise = denoiser(model, diffusion, plan, images.shape[0], device, y=y, guidance_scale=guidance_scale,
                       clip_x0=False)
    with _eval_mode(model), _autocast(device, dtype):
        for level, nxt in zip(up, up[1:]):
            pred = denoise(x, level)
            x = (plan.a[nxt] * pred.x0 + plan.s[nxt] * pred.eps).float()
    return (x, list(plan.t)) if return_levels else x


def ddim_reconstruct(model: nn.Module, diffusion: GaussianDiffusion, latent: torch.Tensor, timesteps: list[int], *,
                     y: torch.Tensor | None = None, guidance_scale: float = 1.0, **kw) -> torch.Tensor:
    """DDIM (eta = 0, x0 not clipped) from an inverted latent over the levels `ddim_invert` used (or a class
    label and guidance scale other than the inversion's: an edit)."""
    return run_sampler(model, diffusion, latent.shape, "ddim", timesteps=timesteps, x_T=latent, y=y,
                       guidance_scale=guidance_scale, clip_x0=False, **kw)
