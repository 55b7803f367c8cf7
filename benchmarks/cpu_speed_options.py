"""Which CPU speed options pay off for a preset's training step? Prints images/s side by side.

    python benchmarks/cpu_speed_options.py --preset flowers-cpu --threads 1

Options, each a full optimizer step (loss, backward, AdamW) at the preset's batch size, timed in
interleaved rounds in one process so a busy machine slows all of them alike: fp32; bf16 autocast;
bf16 + channels_last; bf16 + torch.compile (its compile time is reported separately). Reports the
median over rounds and the ratio to fp32.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from ddpm_nb.config import preset
from ddpm_nb.diffusion import GaussianDiffusion
from ddpm_nb.unet import UNet, count_parameters


def make_step(cfg, *, bf16: bool, channels_last: bool, compile: bool):
    torch.manual_seed(0)
    model = UNet(cfg.unet)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if compile else model
    diffusion = GaussianDiffusion(cfg.diffusion)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    b, c, s = cfg.train.batch_size, cfg.unet.in_channels, cfg.unet.image_size
    x = torch.randn(b, c, s, s)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, cfg.unet.num_classes, (b,)) if cfg.unet.num_classes else None

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = diffusion.training_losses(net, x, y=y).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="flowers-cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="timed steps per option per round")
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = preset(args.preset)
    options = {"fp32": dict(bf16=False, channels_last=False, compile=False),
               "bf16": dict(bf16=True, channels_last=False, compile=False),
               "bf16 + channels_last": dict(bf16=True, channels_last=True, compile=False)}
    if not args.no_compile:
        options["bf16 + compile"] = dict(bf16=True, channels_last=False, compile=True)
    steps, times = {}, {k: [] for k in options}
    for name, kw in options.items():
        model, step = make_step(cfg, **kw)
        t0 = time.perf_counter()
        step()
        step()  # warm-up (compile happens here)
        print(f"{name:22s} warm-up {time.perf_counter() - t0:6.1f} s", flush=True)
        steps[name] = step
    print(f"preset {args.preset}: UNet {count_parameters(model) / 1e6:.2f}M, batch {cfg.train.batch_size}, "
          f"{args.threads} thread(s), torch {torch.__version__}, {args.rounds} interleaved rounds of {args.steps} steps")
    for _ in range(args.rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append(args.steps * cfg.train.batch_size / (time.perf_counter() - t0))
    base = statistics.median(times["fp32"])
    for name, vals in times.items():
        med = statistics.median(vals)
        print(f"{name:22s} {med:7.1f} images/s (min {min(vals):.1f}, max {max(vals):.1f})  {med / base:4.2f}x fp32")


if __name__ == "__main__":
    main()
