"""Benchmarks: training throughput and memory, sampling throughput, GIF-chain time, and peers.

Tooling beside the package, not a lesson: the numbers and the exact commands live in
results/BENCHMARKS.md. Run `python benchmarks/bench.py --help` from a clone.

What is measured (every row in the same run, on the same device):

- train:  images/s, peak memory, model FLOPs per image and the fraction of the device's peak
          (MFU) of one training step = forward + `GaussianDiffusion.training_losses` + backward +
          AdamW step (fused on CUDA), on random images already on the device (no data loading,
          no EMA, no gradient clipping). The settings form a ladder, each rung adding one thing:
          fp32 eager with naive attention -> bf16 autocast -> channels_last -> SDPA attention ->
          torch.compile -> CUDA graphs. The last two run on CUDA only.
- sample: images/s of DDPM ancestral sampling over all T steps and of DDIM-50, per batch size.
- gif:    seconds to sample a T-step chain with `return_trajectory=True`, turn it into frames with
          `animate.chain_frames` and write it with `animate.write_gif`.
- peers:  the same training step for `diffusers.UNet2DModel` and `denoising_diffusion_pytorch.Unet`
          configured like our network, when those packages are installed (`pip install .[peers]`).

Each measurement is one JSON line, printed and appended to `--out`; a Markdown table of them all
is printed at the end (`--markdown PATH` also writes it; `--report FILE...` renders old lines).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

if __package__ in (None, ""):  # `python benchmarks/bench.py` in a clone: this clone's ddpm_nb first
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddpm_nb import __version__
from ddpm_nb import unet as unet_mod
from ddpm_nb.config import UNET_PRESETS, ConfigError, DiffusionConfig, UNetConfig, preset
from ddpm_nb.diffusion import GaussianDiffusion
from ddpm_nb.train import resolve_amp
from ddpm_nb.unet import UNet, count_parameters
from ddpm_nb.utils import pick_device, results_dir

__all__ = [
    "Rung",
    "LADDER",
    "PEAK_TFLOPS",
    "naive_scaled_dot_product_attention",
    "naive_attention",
    "count_flops",
    "device_peak_tflops",
    "bench_train",
    "bench_sample",
    "bench_gif",
    "bench_peers",
    "diffusers_unet",
    "lucidrains_unet",
    "markdown_tables",
    "main",
]

WHATS = ("train", "sample", "gif", "peers")


# ---- the ladder ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rung:
    """One training setting. The ladder is cumulative: each rung keeps everything above it."""

    name: str            # short name used by --settings and in the JSON lines
    label: str           # what this rung adds, for the table
    amp: bool            # bf16 autocast
    channels_last: bool  # model and inputs in channels_last memory format
    sdpa: bool           # F.scaled_dot_product_attention (False: softmax(QK^T/sqrt(d))V written out)
    compile_mode: str | None = None  # torch.compile mode, None = eager
    cuda_only: bool = False


LADDER: tuple[Rung, ...] = (
    Rung("fp32", "fp32 eager, naive attention", amp=False, channels_last=False, sdpa=False),
    Rung("bf16", "+ bf16 autocast", amp=True, channels_last=False, sdpa=False),
    Rung("channels_last", "+ channels_last", amp=True, channels_last=True, sdpa=False),
    Rung("sdpa", "+ SDPA attention", amp=True, channels_last=True, sdpa=True),
    Rung("compile", "+ torch.compile", amp=True, channels_last=True, sdpa=True, compile_mode="default",
         cuda_only=True),
    Rung("cudagraphs", "+ CUDA graphs", amp=True, channels_last=True, sdpa=True, compile_mode="reduce-overhead",
         cuda_only=True),
)
RUNGS = {r.name: r for r in LADDER}
AUTOTUNE_MODES = {"default": "max-autotune-no-cudagraphs", "reduce-overhead": "max-autotune"}

# Sampling settings: eager (bf16 autocast + channels_last on CUDA, fp32 elsewhere), or compiled.
SAMPLE_SETTINGS = ("eager", "compile", "cudagraphs")

# Public NVIDIA dense (no sparsity) peaks in TFLOP/s. "tf32" is the tensor-core rate that cuDNN
# convolutions use for fp32 tensors by default (torch.backends.cudnn.allow_tf32 = True); "fp32"
# is the plain CUDA-core rate. The first name that occurs in torch.cuda.get_device_name() wins.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 PCIe": {"bf16": 756.5, "tf32": 378.0, "fp32": 51.2},
    "H100 NVL": {"bf16": 835.5, "tf32": 417.5, "fp32": 59.8},
    "H200": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},   # same compute as H100 SXM (also GH200)
    "H100": {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9},   # SXM
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
}


# ---- naive attention -------------------------------------------------------------------------
def naive_scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                       attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
                                       scale: float | None = None, **kwargs) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V written out, the baseline for the SDPA rung.

    query, key: (..., L, d); value: (..., L, d_v) -> (..., L, d_v). Materialises the (..., L, L)
    attention matrix, as F.scaled_dot_product_attention's fused kernels avoid doing.
    Only what AttentionBlock uses: no mask, no dropout, not causal.
    """
    if attn_mask is not None or dropout_p or is_causal or kwargs:
        raise NotImplementedError("naive attention supports no mask, dropout, causal or GQA arguments")
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    weights = torch.softmax((query * scale) @ key.transpose(-2, -1), dim=-1)
    return weights.to(value.dtype) @ value


class _FunctionalWithNaiveAttention:
    """torch.nn.functional, except scaled_dot_product_attention is the written-out version."""

    scaled_dot_product_attention = staticmethod(naive_scaled_dot_product_attention)

    def __getattr__(self, name):
        return getattr(F, name)


@contextlib.contextmanager
def naive_attention(enabled: bool = True):
    """Within the block, ddpm_nb.unet's attention runs `naive_scaled_dot_product_attention`.

    Swaps the `F` that ddpm_nb.unet sees; torch.nn.functional itself (and so every other
    library, e.g. the peers) is untouched. enabled=False does nothing, for `with naive_attention(flag):`.
    """
    if not enabled:
        yield
        return
    saved = unet_mod.F
    unet_mod.F = _FunctionalWithNaiveAttention()
    try:
        yield
    finally:
        unet_mod.F = saved


# ---- small helpers ---------------------------------------------------------------------------
def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        model = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        return f"CPU {model}, {torch.get_num_threads()} threads"
    return device.type


def _reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device: torch.device) -> tuple[float | None, str]:
    """(MB, what it is): CUDA's max_memory_allocated since the last reset, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max_memory_allocated"
    try:
        import resource  # not on Windows
        rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux, bytes on macOS
        return (rss_kb / 2**20 if sys.platform == "darwin" else rss_kb / 2**10), "process peak RSS (whole run)"
    except (ImportError, AttributeError, OSError):
        return None, "n/a"


def _free(device: torch.device, compiled: bool) -> None:
    if compiled:
        torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def device_peak_tflops(device: torch.device, precision: str, override: float | None = None) -> tuple[float | None, str]:
    """(dense peak TFLOP/s, where it came from) for rows in `precision` ("bf16" or "fp32").

    fp32 rows on CUDA are compared with the TF32 tensor-core peak when cuDNN may use TF32 (PyTorch's
    default), since the convolutions dominate the UNet. None on CPU/MPS unless `override` is given.
    """
    if override is not None:
        return float(override), "--peak-tflops"
    if device.type != "cuda":
        return None, "n/a"
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS.items():
        if key in name:
            kind = precision
            if precision == "fp32" and torch.backends.cudnn.allow_tf32:
                kind = "tf32"
            return peaks[kind], f"{key} {kind} dense"
    return None, f"n/a (no peak known for {name!r}; pass --peak-tflops)"


def count_flops(model: nn.Module, diffusion: GaussianDiffusion, x0: torch.Tensor, *,
                sdpa: bool = False) -> dict[str, int]:
    """Model FLOPs of one forward and of one training step (forward + loss + backward) on batch `x0`.

    x0: (B, C, H, W). Counted by torch.utils.flop_counter.FlopCounterMode in fp32 (matmuls,
    convolutions and attention; element-wise work is not counted, as usual for MFU). With
    sdpa=False ddpm_nb's attention is written out (same count; kernel-independent).
    Returns {"forward": int, "train": int}; divide by B for per-image numbers.
    """
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.train()
    t = torch.randint(0, diffusion.timesteps, (x0.shape[0],), generator=torch.Generator().manual_seed(0))
    t = t.to(x0.device)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)).to(x0.device)
    out = {}
    try:
        # SDPA's math path for counting: FlopCounterMode has no formula for some fused kernels (the CPU flash one)
        with naive_attention(not sdpa), torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            with torch.no_grad(), FlopCounterMode(display=False) as fwd:
                model(diffusion.q_sample(x0, t, noise), t)
            with FlopCounterMode(display=False) as step:
                diffusion.training_losses(model, x0, t=t, noise=noise).mean().backward()
            out = {"forward": int(fwd.get_total_flops()), "train": int(step.get_total_flops())}
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was)
    return out


def _unet_config(name: str, image_size: int | None) -> UNetConfig:
    cfg = UNET_PRESETS[name]()
    return cfg.replace(image_size=image_size) if image_size else cfg


def _diffusion_config(name: str, timesteps: int | None) -> DiffusionConfig:
    cfg = preset(name).diffusion
    return cfg.replace(timesteps=timesteps) if timesteps else cfg


# ---- one training measurement ------------------------------------------------------------------
def _measure_train_step(make_model: Callable[[], nn.Module], diffusion: GaussianDiffusion, shape: tuple, *,
                        rung: Rung, device: torch.device, iters: int, warmup: int,
                        naive: bool = False, compile_mode: str | None = None) -> dict:
    """Time `iters` training steps after `warmup` untimed ones. Returns images_per_s and friends.

    A step: forward + training_losses + backward + AdamW (fused on CUDA) + zero_grad.
    """
    _reset_memory(device)
    torch.manual_seed(0)
    raw = make_model().to(device).train()
    if rung.channels_last:
        raw = raw.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(raw.parameters(), lr=2e-4, **({"fused": True} if device.type == "cuda" else {}))
    model = torch.compile(raw, mode=compile_mode) if compile_mode else raw
    amp_dtype = resolve_amp("bf16" if rung.amp else "off", device)[0]
    x0 = torch.rand(shape, device=device) * 2 - 1
    if rung.channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    graphs = compile_mode is not None and compile_mode in ("reduce-overhead", "max-autotune")
    kernel = None if naive else _attention_kernel(raw, x0, amp_dtype, device)  # which SDPA kernel ran

    def step():
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = diffusion.training_losses(model, x0).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with naive_attention(naive):
        t0 = time.perf_counter()
        for _ in range(warmup):
            step()
        _sync(device)
        warmup_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        _sync(device)
        elapsed = time.perf_counter() - t0
    mem, mem_kind = _peak_memory(device)
    model = raw = opt = x0 = None  # free them (the closure `step` holds the same cells)
    _free(device, compile_mode is not None)
    return {"images_per_s": shape[0] * iters / elapsed, "step_ms": 1e3 * elapsed / iters,
            "warmup_s": warmup_s, "peak_mem_mb": mem, "mem_kind": mem_kind,
            "amp": "bf16" if amp_dtype is not None else "fp32", "channels_last": rung.channels_last,
            "attention": "naive" if naive else "sdpa", "sdpa_kernel": kernel, "compile_mode": compile_mode}


def _attention_kernel(model: nn.Module, x0: torch.Tensor, amp_dtype, device: torch.device) -> str:
    """The SDPA kernel the model's attention runs for this rung (`unet.sdpa_kernel`), e.g. 'flash'."""
    try:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            return unet_mod.sdpa_kernel(model, x0[:1], torch.zeros(1, dtype=torch.long, device=device))
    except Exception:  # a peer whose forward takes other arguments
        return "unknown kernel"


# Skipped and failed rows carry the measured fields too, as None, so every row has the same keys.
NOT_MEASURED = {"images_per_s": None, "step_ms": None, "peak_mem_mb": None, "achieved_tflops": None, "mfu": None}


def _skip_reason(rung: Rung, device: torch.device) -> str | None:
    if rung.cuda_only and device.type != "cuda":
        if rung.name == "cudagraphs":
            return "CUDA graphs need a CUDA device"
        return "torch.compile rows run on CUDA only (the C++ compile takes minutes on a small CPU)"
    return None


# ---- the four benchmarks ---------------------------------------------------------------------
@dataclass
class Plan:
    """What to run; built from the command line (see `_plan`)."""

    device: torch.device
    small: bool                    # CPU-sized defaults
    presets: list[str]
    image_size: int | None         # override the presets' image size
    batch: int | None              # None: the preset's own batch size (CUDA) or 8 (CPU)
    iters: int
    warmup: int
    settings: list[str]
    autotune: bool
    sample_batches: list[int]
    sample_settings: list[str]
    ddim_steps: int
    timesteps: int | None          # override T (quick runs)
    gif_images: int
    gif_frames: int
    gif_setting: str
    peak_tflops: float | None
    repeats: int = 1               # training ladder: measure every rung this many times, interleaved; report the median
    progress: bool = True


def _common(plan: Plan, bench: str, preset_name: str, cfg: UNetConfig, batch: int) -> dict:
    return {"bench": bench, "preset": preset_name, "image_size": cfg.image_size, "channels": cfg.in_channels,
            "batch": batch, "device": plan.device.type, "device_name": _device_name(plan.device),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__, "ddpm_nb": __version__, "timestamp": _now()}


def _batch_for(plan: Plan, preset_name: str) -> int:
    if plan.batch:
        return plan.batch
    return preset(preset_name).train.batch_size if not plan.small else 8


def _error_row(row: dict, exc: BaseException) -> dict:
    """The row of a measurement that raised: the error's first line instead of numbers (traceback to stderr)."""
    oom = isinstance(exc, torch.cuda.OutOfMemoryError)
    message = f"{'out of memory' if oom else type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
    print(f"[bench] {row.get('preset')} {row.get('model', '')} {row.get('setting')}: {message}", file=sys.stderr)
    if not oom:
        traceback.print_exc(limit=3, file=sys.stderr)
    return {**row, **NOT_MEASURED, "error": message}


def bench_train(plan: Plan, emit: Callable[[dict], None]) -> None:
    """The training ladder for every preset: one JSON row per (preset, rung)."""
    for name in plan.presets:
        cfg = _unet_config(name, plan.image_size)
        batch = _batch_for(plan, name)
        shape = (batch, cfg.in_channels, cfg.image_size, cfg.image_size)
        diffusion = GaussianDiffusion(_diffusion_config(name, plan.timesteps)).to(plan.device)
        torch.manual_seed(0)
        probe = UNet(cfg).to(plan.device)
        params = count_parameters(probe)
        flops = count_flops(probe, diffusion, torch.rand(shape, device=plan.device) * 2 - 1)
        del probe
        _free(plan.device, False)
        rungs = [RUNGS[s] for s in plan.settings]
        runs: dict[str, list[dict]] = {r.name: [] for r in rungs}
        jobs = [(rep, rung) for rep in range(plan.repeats) for rung in rungs]  # interleaved: drift hits every rung
        for rep, rung in tqdm(jobs, desc=f"train {name} {cfg.image_size}px b{batch}", disable=not plan.progress,
                              leave=False):
            last = rep == plan.repeats - 1
            precision = "bf16" if rung.amp else "fp32"
            peak, peak_src = device_peak_tflops(plan.device, precision, plan.peak_tflops)
            row = {**_common(plan, "train", name, cfg, batch), "setting": rung.name, "setting_label": rung.label,
                   "params": params, "flops_per_image": flops["train"] / batch,
                   "forward_flops_per_image": flops["forward"] / batch, "peak_tflops": peak,
                   "peak_source": peak_src, "iters": plan.iters, "warmup": plan.warmup, "repeats": plan.repeats}
            reason = _skip_reason(rung, plan.device)
            if reason:
                if last:
                    emit({**row, **NOT_MEASURED, "skipped": reason})
                continue
            mode = rung.compile_mode
            if mode and plan.autotune:
                mode = AUTOTUNE_MODES[mode]
            m = None
            try:
                m = _measure_train_step(lambda: UNet(cfg), diffusion, shape, rung=rung, device=plan.device,
                                        iters=plan.iters, warmup=plan.warmup, naive=not rung.sdpa,
                                        compile_mode=mode)
            except Exception as exc:  # OOM, compile failures: record the row, go on
                emit(_error_row({**row, "repeat": rep}, exc))
            if m is None:
                _free(plan.device, mode is not None)  # after the except block: the traceback held the model
                continue
            runs[rung.name].append(m)
            if last:
                m = _median_run(runs[rung.name])
                achieved = row["flops_per_image"] * m["images_per_s"] / 1e12
                emit({**row, **m, "achieved_tflops": achieved, "mfu": achieved / peak if peak else None})


def _median_run(runs: list[dict]) -> dict:
    """The run with the median images/s (the lower middle one), plus every run's images/s and the peak memory."""
    ordered = sorted(runs, key=lambda m: m["images_per_s"])
    mid = dict(ordered[(len(ordered) - 1) // 2])
    mems = [m["peak_mem_mb"] for m in runs if m["peak_mem_mb"] is not None]
    mid["peak_mem_mb"] = max(mems) if mems else None
    if len(runs) > 1:
        mid["images_per_s_runs"] = [m["images_per_s"] for m in runs]
    return mid


class _MarkStep(nn.Module):
    """Calls torch.compiler.cudagraph_mark_step_begin() before each call of a compiled model, so a
    sampler's repeated calls may reuse the CUDA graph's output buffers."""

    def __init__(self, compiled: nn.Module, raw: nn.Module):
        super().__init__()
        self.compiled = compiled
        self.cfg = raw.cfg

    def forward(self, *args):
        torch.compiler.cudagraph_mark_step_begin()
        return self.compiled(*args)


def _sampling_model(cfg: UNetConfig, setting: str, device: torch.device, autotune: bool):
    """(model, dtype for the samplers' autocast, compiled?) for a sampling setting."""
    torch.manual_seed(0)
    raw = UNet(cfg).to(device).eval()
    dtype = None
    if device.type == "cuda":
        raw = raw.to(memory_format=torch.channels_last)
        dtype = resolve_amp("bf16", device)[0]
    if setting == "eager":
        return raw, dtype, False
    mode = {"compile": "default", "cudagraphs": "reduce-overhead"}[setting]
    if autotune:
        mode = AUTOTUNE_MODES[mode]
    compiled = torch.compile(raw, mode=mode, dynamic=False)
    return (_MarkStep(compiled, raw) if setting == "cudagraphs" else compiled), dtype, True


def _sample_skip_reason(setting: str, device: torch.device) -> str | None:
    if setting != "eager" and device.type != "cuda":
        return f"sampling setting {setting!r} runs on CUDA only"
    return None


def bench_sample(plan: Plan, emit: Callable[[dict], None]) -> None:
    """DDPM over all T steps and DDIM-`ddim_steps`, for each batch size: images/s."""
    from ddpm_nb.sample import ddim_sample, ddpm_sample

    for name in plan.presets:
        cfg = _unet_config(name, plan.image_size)
        diffusion = GaussianDiffusion(_diffusion_config(name, plan.timesteps)).to(plan.device)
        T = diffusion.timesteps
        for setting in plan.sample_settings:
            base = {"setting": setting}
            reason = _sample_skip_reason(setting, plan.device)
            if reason:
                for batch in plan.sample_batches:
                    for sampler, steps in (("DDPM", T), ("DDIM", plan.ddim_steps)):
                        emit({**_common(plan, "sample", name, cfg, batch), **base, "sampler": f"{sampler}-{steps}",
                              "steps": steps, "images_per_s": None, "seconds": None, "peak_mem_mb": None,
                              "skipped": reason})
                continue
            _reset_memory(plan.device)
            model, dtype, compiled = _sampling_model(cfg, setting, plan.device, plan.autotune)
            jobs = [(b, s) for b in plan.sample_batches for s in ("DDPM", "DDIM")]
            for batch, sampler in tqdm(jobs, desc=f"sample {name} {setting}", disable=not plan.progress, leave=False):
                shape = (batch, cfg.in_channels, cfg.image_size, cfg.image_size)
                steps = T if sampler == "DDPM" else plan.ddim_steps
                row = {**_common(plan, "sample", name, cfg, batch), **base, "sampler": f"{sampler}-{steps}",
                       "steps": steps, "dtype": "bf16" if dtype is not None else "fp32",
                       "params": count_parameters(model)}
                try:
                    # warm-up: a short DDIM chain at this batch size (compiles, picks kernels)
                    t0 = time.perf_counter()
                    ddim_sample(model, diffusion, shape, steps=min(3, T), progress=False, device=plan.device,
                                dtype=dtype, generator=torch.Generator(plan.device).manual_seed(0))
                    _sync(plan.device)
                    warmup_s = time.perf_counter() - t0
                    if plan.device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(plan.device)
                    g = torch.Generator(plan.device).manual_seed(0)  # noise drawn on the device, no copies
                    t0 = time.perf_counter()
                    if sampler == "DDPM":
                        ddpm_sample(model, diffusion, shape, generator=g, progress=False, device=plan.device,
                                    dtype=dtype)
                    else:
                        ddim_sample(model, diffusion, shape, steps=steps, generator=g, progress=False,
                                    device=plan.device, dtype=dtype)
                    _sync(plan.device)
                    seconds = time.perf_counter() - t0
                except Exception as exc:  # OOM, compile failures: record the row, go on
                    emit(_error_row(row, exc))
                    continue
                mem, mem_kind = _peak_memory(plan.device)
                emit({**row, "images_per_s": batch / seconds, "seconds": seconds, "ms_per_step": 1e3 * seconds / steps,
                      "warmup_s": warmup_s, "peak_mem_mb": mem, "mem_kind": mem_kind})
            del model
            _free(plan.device, compiled)


def bench_gif(plan: Plan, emit: Callable[[dict], None], gif_dir: Path | None = None) -> None:
    """Seconds to render a T-step DDPM chain of `gif_images` images as a GIF, split into its parts."""
    from ddpm_nb.animate import chain_frames, write_gif
    from ddpm_nb.sample import ddim_sample, ddpm_sample

    for name in plan.presets:
        cfg = _unet_config(name, plan.image_size)
        diffusion = GaussianDiffusion(_diffusion_config(name, plan.timesteps)).to(plan.device)
        n, T, setting = plan.gif_images, diffusion.timesteps, plan.gif_setting
        row = {**_common(plan, "gif", name, cfg, n), "setting": setting, "sampler": f"DDPM-{T}", "steps": T,
               "frames": plan.gif_frames}
        reason = _sample_skip_reason(setting, plan.device)
        if reason:
            emit({**row, "total_s": None, "peak_mem_mb": None, "skipped": reason})
            continue
        _reset_memory(plan.device)
        model, dtype, compiled = _sampling_model(cfg, setting, plan.device, plan.autotune)
        shape = (n, cfg.in_channels, cfg.image_size, cfg.image_size)
        row["dtype"] = "bf16" if dtype is not None else "fp32"
        with tempfile.TemporaryDirectory() as tmp:
            try:
                ddim_sample(model, diffusion, shape, steps=min(3, T), progress=False, device=plan.device, dtype=dtype)
                _sync(plan.device)
                bar = tqdm(total=3, desc=f"gif {name}", disable=not plan.progress, leave=False)
                t0 = time.perf_counter()
                _, traj = ddpm_sample(model, diffusion, shape, generator=torch.Generator(plan.device).manual_seed(0),
                                      return_trajectory=True, progress=False, device=plan.device, dtype=dtype)
                t1 = time.perf_counter()
                bar.update()
                frames = chain_frames(traj.x_t, traj.x0_pred, num_frames=plan.gif_frames, timesteps=traj.timesteps,
                                      scale=2 if cfg.image_size >= 32 else 4)
                t2 = time.perf_counter()
                bar.update()
                path = write_gif(frames, Path(gif_dir or tmp) / f"chain-{name}-{n}x{T}.gif")
                t3 = time.perf_counter()
                bar.update()
                bar.close()
                mem, mem_kind = _peak_memory(plan.device)
                emit({**row, "total_s": t3 - t0, "sample_s": t1 - t0, "frames_s": t2 - t1, "write_s": t3 - t2,
                      "gif_bytes": path.stat().st_size, "gif_path": str(path) if gif_dir else None,
                      "peak_mem_mb": mem, "mem_kind": mem_kind})
                del traj, frames
            except Exception as exc:  # OOM, compile failures: record the row, go on
                emit(_error_row(row, exc))
        del model
        _free(plan.device, compiled)


# ---- peers -----------------------------------------------------------------------------------
class _DiffusersAdapter(nn.Module):
    """diffusers.UNet2DModel with ddpm_nb's call signature: (x_t, t) -> eps."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x, t, return_dict=False)[0]


def _level_sizes(cfg: UNetConfig) -> list[int]:
    return [cfg.image_size // 2 ** i for i in range(len(cfg.channel_mults))]


def diffusers_unet(cfg: UNetConfig) -> nn.Module:
    """diffusers.UNet2DModel configured like `cfg` (for ddpm_cifar10: the same 35.7M network)."""
    from diffusers import UNet2DModel

    sizes = _level_sizes(cfg)
    attn = [s in cfg.attn_resolutions for s in sizes]
    net = UNet2DModel(
        sample_size=cfg.image_size, in_channels=cfg.in_channels, out_channels=cfg.in_channels,
        layers_per_block=cfg.num_res_blocks, block_out_channels=tuple(cfg.base_channels * m for m in cfg.channel_mults),
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        norm_num_groups=cfg.norm_groups, dropout=cfg.dropout, attention_head_dim=cfg.attn_head_channels)
    return _DiffusersAdapter(net)


def lucidrains_unet(cfg: UNetConfig) -> nn.Module:
    """denoising_diffusion_pytorch.Unet as close to `cfg` as it goes.

    It always has two ResNet blocks per level, a 7x7 input conv and linear attention at every level
    without full attention, so the parameter count differs (printed by `bench_peers`).
    """
    from denoising_diffusion_pytorch import Unet

    sizes = _level_sizes(cfg)
    heads = tuple(max(1, cfg.base_channels * m // cfg.attn_head_channels) for m in cfg.channel_mults)
    return Unet(dim=cfg.base_channels, dim_mults=tuple(cfg.channel_mults), channels=cfg.in_channels,
                dropout=cfg.dropout, attn_dim_head=cfg.attn_head_channels, attn_heads=heads,
                full_attn=tuple(s in cfg.attn_resolutions for s in sizes), flash_attn=True)


PEERS: dict[str, tuple[str, Callable[[UNetConfig], nn.Module]]] = {
    "diffusers.UNet2DModel": ("diffusers", diffusers_unet),
    "denoising_diffusion_pytorch.Unet": ("denoising_diffusion_pytorch", lucidrains_unet),
}


def _installed(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


def bench_peers(plan: Plan, emit: Callable[[dict], None]) -> None:
    """Our UNet and each installed peer, same config, batch, precision and optimizer, same run."""
    # peers run the SDPA rungs this device can run (naive attention is a switch of ddpm_nb's own UNet)
    settings = [s for s in plan.settings if RUNGS[s].sdpa and not _skip_reason(RUNGS[s], plan.device)] or ["sdpa"]
    for name in plan.presets:
        cfg = _unet_config(name, plan.image_size)
        batch = _batch_for(plan, name)
        shape = (batch, cfg.in_channels, cfg.image_size, cfg.image_size)
        diffusion = GaussianDiffusion(_diffusion_config(name, plan.timesteps)).to(plan.device)
        models = {"ddpm_nb.UNet": lambda: UNet(cfg)}
        for peer, (module, build) in PEERS.items():
            if _installed(module):
                models[peer] = (lambda b=build: b(cfg))
            else:
                print(f"[bench] peers: {module} is not installed, skipping {peer} "
                      f"(pip install 'ddpm_nb[peers]' to compare)", file=sys.stderr)
                emit({**_common(plan, "peers", name, cfg, batch), "model": peer, "setting": None, **NOT_MEASURED,
                      "skipped": f"{module} not installed"})
        built = {}  # model name -> (factory, params, train FLOPs per image)
        for model_name, make in models.items():
            try:
                torch.manual_seed(0)
                probe = make().to(plan.device)
                params = count_parameters(probe)
                flops = count_flops(probe, diffusion, torch.rand(shape, device=plan.device) * 2 - 1, sdpa=True)
            except Exception as exc:  # a peer whose API changed: note it, go on
                emit(_error_row({**_common(plan, "peers", name, cfg, batch), "model": model_name, "setting": None},
                                exc))
                continue
            finally:
                probe = None
                _free(plan.device, False)
            print(f"[bench] peers: {model_name} configured like {name}: {params / 1e6:.2f}M parameters",
                  file=sys.stderr)
            built[model_name] = (make, params, flops["train"] / batch)
        runs: dict[tuple, list[dict]] = {}
        # interleaved: models alternate within each setting and repeat, so drift in the machine's load hits all
        jobs = [(rep, s, m) for rep in range(plan.repeats) for s in settings for m in built]
        for rep, s, model_name in tqdm(jobs, desc=f"peers {name}", disable=not plan.progress, leave=False):
            make, params, flops_per_image = built[model_name]
            rung = RUNGS[s]
            peak, peak_src = device_peak_tflops(plan.device, "bf16" if rung.amp else "fp32", plan.peak_tflops)
            row = {**_common(plan, "peers", name, cfg, batch), "model": model_name, "params": params,
                   "setting": s, "setting_label": rung.label, "flops_per_image": flops_per_image,
                   "peak_tflops": peak, "peak_source": peak_src, "iters": plan.iters, "warmup": plan.warmup,
                   "repeats": plan.repeats}
            mode = AUTOTUNE_MODES[rung.compile_mode] if rung.compile_mode and plan.autotune else rung.compile_mode
            m = None
            try:
                m = _measure_train_step(make, diffusion, shape, rung=rung, device=plan.device, iters=plan.iters,
                                        warmup=plan.warmup, naive=False, compile_mode=mode)
            except Exception as exc:  # peers may fail to compile etc.; record and go on
                emit(_error_row({**row, "repeat": rep}, exc))
            if m is None:
                _free(plan.device, mode is not None)
                continue
            runs.setdefault((s, model_name), []).append(m)
            if rep == plan.repeats - 1:
                m = _median_run(runs[(s, model_name)])
                achieved = flops_per_image * m["images_per_s"] / 1e12
                emit({**row, **m, "achieved_tflops": achieved, "mfu": achieved / peak if peak else None})


# ---- tables ----------------------------------------------------------------------------------
def _fmt(v, spec: str = ".1f", none: str = "—") -> str:
    if v is None:
        return none
    if isinstance(v, float) and not math.isfinite(v):
        return none
    return format(v, spec)


def _ips(r: dict) -> str:
    """images/s, with the min–max of the repeated runs when there were several."""
    ips, runs = r.get("images_per_s"), r.get("images_per_s_runs")
    return f"{_fmt(ips)} ({min(runs):.1f}–{max(runs):.1f})" if ips and runs else _fmt(ips)


def _note(r: dict) -> str:
    kernel = f"SDPA kernel: {r['sdpa_kernel']}" if r.get("sdpa_kernel") else ""
    return r.get("skipped") or r.get("error") or kernel


def markdown_tables(rows: Iterable[dict]) -> str:
    """Markdown tables (train ladder, sampling, GIF, peers) of benchmark rows (the JSON lines)."""
    rows = list(rows)
    out: list[str] = []
    devices = sorted({f"{r.get('device_name')} (torch {r.get('torch')})" for r in rows})
    if devices:
        out.append("Device: " + "; ".join(devices) + "\n")

    train = [r for r in rows if r.get("bench") == "train"]
    if train:
        out += ["#### Training step (forward + loss + backward + AdamW)\n",
                "| preset | px | batch | setting | img/s | vs fp32 | step ms | peak mem MB | GFLOP/img | TFLOP/s | "
                "MFU | note |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        base: dict[tuple, float] = {}
        for r in train:
            key = (r["preset"], r["image_size"], r["batch"], r.get("device_name"))
            if r.get("setting") == "fp32" and r.get("images_per_s"):
                base[key] = r["images_per_s"]
        for r in train:
            key = (r["preset"], r["image_size"], r["batch"], r.get("device_name"))
            ips = r.get("images_per_s")
            speed = f"{ips / base[key]:.2f}x" if ips and key in base else "—"
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
            out.append(f"| {r['preset']} | {r['image_size']} | {r['batch']} | {r['setting']} | {_ips(r)} | {speed} | "
                       f"{_fmt(r.get('step_ms'))} | {_fmt(r.get('peak_mem_mb'), '.0f')} | "
                       f"{_fmt(r.get('flops_per_image') and r['flops_per_image'] / 1e9, '.3f')} | "
                       f"{_fmt(r.get('achieved_tflops'), '.3f')} | {mfu} | {_note(r)} |")
        kinds = sorted({r.get("mem_kind") for r in train if r.get("mem_kind")})
        out.append("\nimg/s: the median of --repeats interleaved runs (min–max in brackets) when there were "
                   f"several. Peak memory: {', '.join(kinds) or 'n/a'}. MFU: achieved model TFLOP/s over the device's "
                   "dense peak for the row's precision (n/a where no peak is known).\n")

    sample = [r for r in rows if r.get("bench") == "sample"]
    if sample:
        out += ["#### Sampling\n",
                "| preset | px | sampler | batch | setting | dtype | img/s | s per batch | ms/step | peak mem MB "
                "| note |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sample:
            out.append(f"| {r['preset']} | {r['image_size']} | {r['sampler']} | {r['batch']} | {r.get('setting')} | "
                       f"{r.get('dtype', '—')} | {_fmt(r.get('images_per_s'), '.2f')} | "
                       f"{_fmt(r.get('seconds'), '.2f')} | "
                       f"{_fmt(r.get('ms_per_step'), '.2f')} | {_fmt(r.get('peak_mem_mb'), '.0f')} | {_note(r)} |")
        out.append("")

    gif = [r for r in rows if r.get("bench") == "gif"]
    if gif:
        out += ["#### GIF of the denoising chain (sample with trajectory + chain_frames + write_gif)\n",
                "| preset | px | images | chain | frames | setting | total s | sampling s | frames s | write s "
                "| GIF KB | note |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in gif:
            out.append(f"| {r['preset']} | {r['image_size']} | {r['batch']} | {r['sampler']} | {r['frames']} | "
                       f"{r.get('setting')} | {_fmt(r.get('total_s'), '.2f')} | {_fmt(r.get('sample_s'), '.2f')} | "
                       f"{_fmt(r.get('frames_s'), '.2f')} | {_fmt(r.get('write_s'), '.2f')} | "
                       f"{_fmt(r.get('gif_bytes') and r['gif_bytes'] / 1024, '.0f')} | {_note(r)} |")
        out.append("")

    peers = [r for r in rows if r.get("bench") == "peers"]
    if peers:
        out += ["#### Peers (same configuration, batch, precision and optimizer)\n",
                "| matched to | px | batch | model | params M | setting | img/s | ours / this | GFLOP/img | MFU "
                "| note |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        ours = {(r["preset"], r["batch"], r["setting"], r.get("device_name")): r["images_per_s"]
                for r in peers if r.get("model") == "ddpm_nb.UNet" and r.get("images_per_s")}
        for r in peers:
            ips = r.get("images_per_s")
            mine = ours.get((r["preset"], r["batch"], r.get("setting"), r.get("device_name")))
            ratio = f"{mine / ips:.2f}x" if ips and mine else "—"
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
            out.append(f"| {r['preset']} | {r['image_size']} | {r['batch']} | {r['model']} | "
                       f"{_fmt(r.get('params') and r['params'] / 1e6, '.2f')} | {r.get('setting') or '—'} | "
                       f"{_ips(r)} | {ratio} | "
                       f"{_fmt(r.get('flops_per_image') and r['flops_per_image'] / 1e9, '.3f')} | "
                       f"{mfu} | {_note(r)} |")
        out.append("")
    return "\n".join(out)


# ---- command line ----------------------------------------------------------------------------
def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python benchmarks/bench.py",
        description="Training/sampling throughput, memory, FLOPs and MFU; GIF-chain time; peers. One JSON line "
                    "per measurement (stdout and --out), a Markdown table at the end. Without CUDA (or with "
                    "--cpu-small) the defaults are CPU-sized and the compile/CUDA-graph rows are skipped.")
    p.add_argument("--what", nargs="+", default=["train"], choices=[*WHATS, "all"],
                   help="which benchmarks (default: train)")
    p.add_argument("--presets", nargs="+", default=None, choices=list(UNET_PRESETS),
                   help="network presets (default: ddpm-cifar10 flowers-64 on CUDA, tiny quick on CPU; "
                        "peers: the first one)")
    p.add_argument("--image-size", type=int, default=None, help="run the presets at this size instead of their own")
    p.add_argument("--batch", type=int, default=None,
                   help="training batch (default: the preset's batch_size on CUDA, 8 on CPU)")
    p.add_argument("--iters", type=int, default=None, help="timed training steps per row (default 30 CUDA / 5 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10 CUDA / 2 CPU)")
    p.add_argument("--settings", nargs="+", default=None, choices=list(RUNGS),
                   help="rungs of the training ladder to run, in ladder order (default: all)")
    p.add_argument("--repeats", type=int, default=1,
                   help="measure the training ladder this many times, rungs interleaved, and report each rung's "
                        "median (for noisy shared machines; default 1)")
    p.add_argument("--autotune", action="store_true",
                   help="compile rows use max-autotune(-no-cudagraphs) instead of default/reduce-overhead")
    p.add_argument("--sample-batches", nargs="+", type=int, default=None,
                   help="sampling batch sizes (default 64 256 on CUDA, 8 on CPU)")
    p.add_argument("--sample-settings", nargs="+", default=None, choices=SAMPLE_SETTINGS,
                   help="sampling settings (default: all three on CUDA, eager on CPU)")
    p.add_argument("--ddim-steps", type=int, default=None, help="DDIM steps (default 50)")
    p.add_argument("--timesteps", type=int, default=None,
                   help="override the diffusion's T (DDPM then runs T steps; --quick uses 20)")
    p.add_argument("--gif-images", type=int, default=None,
                   help="images in the GIF chain (default 64 on CUDA, 16 on CPU)")
    p.add_argument("--gif-frames", type=int, default=None, help="frames taken from the chain (default 60)")
    p.add_argument("--gif-setting", default=None, choices=SAMPLE_SETTINGS,
                   help="sampling setting of the GIF chain (default cudagraphs on CUDA, eager elsewhere)")
    p.add_argument("--keep-gif", default=None, metavar="DIR", help="keep the benchmark's GIFs in this folder")
    p.add_argument("--device", default=None, help="cuda, cuda:1, mps or cpu (default: best available)")
    p.add_argument("--cpu-small", action="store_true", help="CPU-sized defaults even with CUDA (automatic without)")
    p.add_argument("--quick", action="store_true", help="a very small run for smoke tests (tiny preset, T=20)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's dense peak TFLOP/s to compute MFU against (default: from a table of GPUs)")
    p.add_argument("--out", default=None,
                   help="JSON lines are appended here (default results/bench/<device>.jsonl; '-' = stdout only)")
    p.add_argument("--markdown", default=None, help="also write the Markdown tables to this file")
    p.add_argument("--report", nargs="+", default=None, metavar="JSONL",
                   help="measure nothing: print (and with --markdown write) the tables of these JSON-lines files")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for the run (default: torch's). On a shared machine use fewer threads "
                        "than free cores: OpenMP threads that wait for a busy core slow every op down")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def _given(value, default):
    return default if value is None else value


def _plan(args: argparse.Namespace) -> Plan:
    device = torch.device(args.device) if args.device else pick_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device}: CUDA is not available here; use --device cpu")
    small = args.cpu_small or args.quick or device.type != "cuda"
    if args.quick:
        d = dict(presets=["tiny"], batch=4, iters=2, warmup=1, sample_batches=[4], ddim_steps=5, timesteps=20,
                 gif_images=4, gif_frames=8)
    elif small:
        d = dict(presets=["tiny", "quick"], batch=8, iters=5, warmup=2, sample_batches=[8], ddim_steps=50,
                 timesteps=None, gif_images=16, gif_frames=60)
    else:
        d = dict(presets=["ddpm-cifar10", "flowers-64"], batch=None, iters=30, warmup=10, sample_batches=[64, 256],
                 ddim_steps=50, timesteps=None, gif_images=64, gif_frames=60)
    cuda = device.type == "cuda"
    plan = Plan(
        device=device, small=small, presets=args.presets or d["presets"], image_size=args.image_size,
        batch=_given(args.batch, d["batch"]), iters=_given(args.iters, d["iters"]),
        warmup=_given(args.warmup, d["warmup"]),
        settings=[r.name for r in LADDER if r.name in (args.settings or RUNGS)], autotune=args.autotune,
        sample_batches=args.sample_batches or d["sample_batches"],
        sample_settings=args.sample_settings or (list(SAMPLE_SETTINGS) if cuda else ["eager"]),
        ddim_steps=_given(args.ddim_steps, d["ddim_steps"]), timesteps=_given(args.timesteps, d["timesteps"]),
        gif_images=_given(args.gif_images, d["gif_images"]), gif_frames=_given(args.gif_frames, d["gif_frames"]),
        gif_setting=args.gif_setting or ("cudagraphs" if cuda else "eager"), peak_tflops=args.peak_tflops,
        repeats=args.repeats,
        progress=not args.no_progress)
    for field_name in ("iters", "batch", "ddim_steps", "gif_images", "gif_frames", "repeats"):
        v = getattr(plan, field_name)
        if v is not None and v < 1:
            raise ConfigError(f"--{field_name.replace('_', '-')} must be >= 1, got {v}")
    if plan.warmup < 0:
        raise ConfigError(f"--warmup must be >= 0, got {plan.warmup}")
    if any(b < 1 for b in plan.sample_batches):
        raise ConfigError(f"--sample-batches must all be >= 1, got {plan.sample_batches}")
    if plan.timesteps is not None and plan.timesteps < 2:
        raise ConfigError(f"--timesteps must be >= 2, got {plan.timesteps}")
    if plan.timesteps is not None and plan.ddim_steps > plan.timesteps:
        plan = replace(plan, ddim_steps=plan.timesteps)
    for name in plan.presets:
        _unet_config(name, plan.image_size)  # a bad --image-size fails here, with the config's message
    return plan


def _default_out(device: torch.device) -> Path:
    if device.type == "cuda":
        tag = "cuda-" + torch.cuda.get_device_name(device).replace("NVIDIA ", "").split()[0].lower()
    else:
        tag = device.type
    return results_dir("bench") / f"{tag}.jsonl"


def _read_jsonl(paths: Iterable[str]) -> list[dict]:
    rows = []
    for path in paths:
        with open(path) as fh:
            rows += [json.loads(line) for line in fh if line.strip()]
    return rows


def main(argv: list[str] | None = None) -> int:
    """`python benchmarks/bench.py ...`: run the benchmarks, print JSON lines and the tables. Returns 0."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = make_parser().parse_args(argv)
    if args.report:
        table = markdown_tables(_read_jsonl(args.report))
        print(table)
        if args.markdown:
            Path(args.markdown).write_text(table + "\n")
        return 0
    try:
        if args.threads is not None and args.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {args.threads}")
        plan = _plan(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = None if args.out == "-" else Path(args.out) if args.out else _default_out(plan.device)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
    saved_threads, saved_cudnn = torch.get_num_threads(), torch.backends.cudnn.benchmark
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        if plan.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
        rows = _run(args, plan, out)
    finally:
        torch.set_num_threads(saved_threads)
        torch.backends.cudnn.benchmark = saved_cudnn
    table = markdown_tables(rows)
    print("\n" + table)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(table + "\n")
    return 0


def _run(args: argparse.Namespace, plan: Plan, out: Path | None) -> list[dict]:
    """Run the chosen benchmarks; every row is printed and appended to `out` as soon as it is measured."""
    rows: list[dict] = []

    def emit(row: dict) -> None:
        row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        line = json.dumps(row)
        tqdm.write(line, file=sys.stdout)
        if out is not None:
            with open(out, "a") as fh:
                fh.write(line + "\n")
        rows.append(row)

    what = WHATS if "all" in args.what else tuple(dict.fromkeys(args.what))
    if plan.device.type == "cpu" and hasattr(os, "getloadavg"):
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
        threads = torch.get_num_threads()
        if load + threads > cores + 0.5:
            advice = "--repeats 3 helps" if threads == 1 else \
                f"fewer threads (--threads {max(1, cores - round(load))}) and --repeats 3 help"
            print(f"[bench] note: the machine is busy (load {load:.1f} on {cores} cores) and torch uses {threads} "
                  f"thread(s); CPU numbers will be noisy: {advice}.", file=sys.stderr)
    print(f"[bench] {', '.join(what)} on {_device_name(plan.device)}, torch {torch.__version__}; presets "
          f"{' '.join(plan.presets)}{' (CPU-sized run)' if plan.small else ''}; JSON lines -> {out or 'stdout'}",
          file=sys.stderr)
    runners = {"train": bench_train, "sample": bench_sample, "peers": bench_peers,
               "gif": lambda p, e: bench_gif(p, e, gif_dir=Path(args.keep_gif) if args.keep_gif else None)}
    for w in what:
        if w == "peers" and args.presets is None:
            runners[w](replace(plan, presets=plan.presets[:1]), emit)
        else:
            runners[w](plan, emit)
    return rows


if __name__ == "__main__":
    sys.exit(main())
