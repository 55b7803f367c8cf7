"""Before/after timings of the fast paths of issue 13, measured side by side in one process.

Each "before" is the code as it was before the change (kept below, verbatim where it matters), run
in the same process as the package's current code, the two interleaved round by round; the table
gives the median of the rounds and the ratio before/after. Run it on a quiet machine:

    python benchmarks/fast_paths.py --threads 1 --repeats 5          # about 5 minutes on one CPU core
    python benchmarks/fast_paths.py --quick                           # a smoke run (half a minute)

It prints a Markdown table (what results/BENCHMARKS.md quotes) and, with --out FILE, appends one JSON
line per row. Cheap rows get 5x the rounds of expensive ones; the table gives the ratio of the medians
and of the minima (the minimum is the steadier of the two on a machine shared with other jobs). On a GPU it measures the same things there (--device cuda); the host syncs and copies
that items 2 and 3 remove cost nothing on a CPU but a full device round trip on a GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone without installing

import ddpm_nb.sample as sample_mod  # noqa: E402
from ddpm_nb.config import DiffusionConfig, UNetConfig, preset  # noqa: E402
from ddpm_nb.diffusion import GaussianDiffusion  # noqa: E402
from ddpm_nb.sample import ddim_sample, ddpm_sample, device_generator  # noqa: E402
from ddpm_nb.train import Trainer, cpu_native_bf16  # noqa: E402
from ddpm_nb.unet import AttentionBlock, UNet, sdpa_kernel  # noqa: E402
from ddpm_nb.utils import set_threads  # noqa: E402


# ---- the code as it was before issue 13 --------------------------------------------------------
def before_attention_forward(self, x):
    """AttentionBlock.forward before: q/k/v views with last-dim stride H*W (SDPA falls back to math)."""
    b, c, h, w = x.shape
    qkv = self.qkv(self.norm(x))
    q, k, v = rearrange(qkv, "b (three heads d) h w -> three b heads (h w) d", three=3, heads=self.heads)
    out = F.scaled_dot_product_attention(q, k, v)
    out = rearrange(out, "b heads (h w) d -> b (heads d) h w", h=h, w=w)
    return x + self.proj(out)


def before_ddim_step(diffusion, x_t, t, t_prev, eps, x0, eta=0.0, noise=None, *, coefficients=None):
    """ddim_step before: 0-d float64 coefficients recomputed on the device at every step."""
    s = diffusion.schedule
    ab_t, one_minus_t = s.alphas_cumprod[t].double(), s.sqrt_one_minus_alphas_cumprod[t].double() ** 2
    if t_prev >= 0:
        ab_prev, one_minus_prev = s.alphas_cumprod[t_prev].double(), s.sqrt_one_minus_alphas_cumprod[t_prev].double() ** 2
    else:
        ab_prev, one_minus_prev = torch.ones_like(ab_t), torch.zeros_like(ab_t)
    sigma = eta * torch.sqrt(one_minus_prev / one_minus_t * (1 - ab_t / ab_prev))
    c_x0, c_eps = ab_prev.sqrt().float(), torch.sqrt((one_minus_prev - sigma ** 2).clamp(min=0)).float()
    x_prev = c_x0 * x0 + c_eps * eps
    if eta > 0 and t_prev >= 0:
        if noise is None:
            noise = torch.randn_like(x0)
        x_prev = x_prev + sigma.float() * noise
    return x_prev


def before_run(model, ts, x, return_trajectory, trajectory_steps, progress, desc, device, dtype, step):
    """sample._run before: every step's x_t and x0_pred copied to the CPU (trajectory_steps ignored)."""
    xs, x0s = [], []
    with sample_mod._eval_mode(model), sample_mod._autocast(device, dtype):
        for i in range(len(ts)):
            t, t_prev = ts[i], ts[i + 1] if i + 1 < len(ts) else -1
            x_next, x0 = step(x, t, t_prev)
            if return_trajectory:
                xs.append(x.float().cpu())
                x0s.append(x0.float().cpu())
            x = x_next.float()
    x = x.clamp(-1.0, 1.0)
    if not return_trajectory:
        return x
    xs.append(x.cpu())
    x0s.append(x.cpu())
    return x, sample_mod.Trajectory(timesteps=list(ts) + [-1], x_t=torch.stack(xs), x0_pred=torch.stack(x0s))


def before_train_step(self, batches):
    """Trainer.train_step before: loss.item() and float(grad_norm) at every step."""
    tc = self.cfg.train
    self.model.train()
    total = torch.zeros((), device=self.device)
    for _ in range(tc.grad_accum):
        x, y = self._prepare(*next(batches))
        self.micro_batches_seen += 1
        b = x.shape[0]
        t = torch.randint(0, self.diffusion.timesteps, (b,), generator=self.gen, device=self.device)
        noise = torch.randn(x.shape, generator=self.gen, device=self.device)
        with self._autocast():
            loss = self.diffusion.training_losses(self.model, x, t=t, noise=noise, y=y).mean()
        self.scaler.scale(loss / tc.grad_accum).backward()
        total += loss.detach() / tc.grad_accum
    loss_value = total.item()
    if not math.isfinite(loss_value):
        raise RuntimeError("diverged")
    self.scaler.unscale_(self.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), tc.grad_clip or float("inf"))
    self.scaler.step(self.optimizer)
    self.scaler.update()
    self.optimizer.zero_grad(set_to_none=True)
    lr = self.optimizer.param_groups[0]["lr"]
    self.scheduler.step()
    self.step += 1
    self.ema.update(self.raw_model, self.step)
    return {"loss": loss_value, "grad_norm": float(grad_norm), "lr": lr}


@contextlib.contextmanager
def patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


class CountOps(TorchDispatchMode):
    """Counts aten ops (all, and host syncs: _local_scalar_dense = .item()/float() of a tensor)."""

    def __init__(self):
        super().__init__()
        self.ops = self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.syncs += func.overloadpacket.__name__ == "_local_scalar_dense"
        return func(*args, **(kwargs or {}))


# ---- the measurements ---------------------------------------------------------------------------
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, iters=1) -> float:
    """Seconds per call of fn (after the caller's warm-up)."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / iters


def make_cases(device: torch.device, quick: bool):
    """(item, what, unit, before_fn, after_fn, extra) for every measurement; fns return seconds."""
    cases = []
    it = 2 if quick else 3

    # 1. attention: one block (forward + backward) and a whole training step with attention
    blk_cfg = (64, 16) if quick else (128, 16)  # channels, H = W: fashion-mnist's attention level
    block = AttentionBlock(blk_cfg[0], groups=32, head_channels=64).to(device)
    xb = torch.randn(8, blk_cfg[0], blk_cfg[1], blk_cfg[1], device=device, requires_grad=True)

    def attn_block():
        block(xb).sum().backward()

    kernel_after = sdpa_kernel(block, xb.detach())
    with patched(AttentionBlock, "forward", before_attention_forward):
        kernel_before = sdpa_kernel(block, xb.detach())

    def before_block():
        with patched(AttentionBlock, "forward", before_attention_forward):
            return timed(attn_block, device, it)

    cases.append(("1", f"AttentionBlock fwd+bwd, {blk_cfg[0]} ch, {blk_cfg[1]}x{blk_cfg[1]}, batch 8",
                  "ms", before_block, lambda: timed(attn_block, device, it),
                  f"kernel: {kernel_before} -> {kernel_after}"))

    xs = xb.detach()[:, :, :, :].repeat(4, 1, 1, 1)  # batch 32, as when sampling a grid

    def attn_forward():
        with torch.no_grad():
            block(xs)

    def before_forward():
        with patched(AttentionBlock, "forward", before_attention_forward):
            return timed(attn_forward, device, it)

    cases.append(("1", f"AttentionBlock forward (no grad), {blk_cfg[0]} ch, {blk_cfg[1]}x{blk_cfg[1]}, batch 32",
                  "ms", before_forward, lambda: timed(attn_forward, device, it), "as in sampling"))

    net = UNet(UNetConfig.quick()).to(device)
    xq = torch.rand(32, 1, 28, 28, device=device) * 2 - 1
    tq = torch.randint(0, 1000, (32,), device=device)

    def sample_forward():
        with torch.no_grad():
            net(xq, tq)

    def before_fwd():
        with patched(AttentionBlock, "forward", before_attention_forward):
            return timed(sample_forward, device, it)

    cases.append(("1", "UNet 'quick' forward (sampling), batch 32", "ms", before_fwd,
                  lambda: timed(sample_forward, device, it), "attention at 7x7 only: a small share"))

    # 2 + 6: the trainer's step (tiny preset, in-memory data): before = per-step syncs + foreach AdamW
    def trainer(fused: bool):
        cfg = preset("tiny", **{"train.steps": 10_000, "train.batch_size": 16, "train.amp": "off",
                                "train.sample_every": 0, "train.eval_every": 0, "train.ckpt_every": 0,
                                "train.log_every": 50})
        g = torch.Generator().manual_seed(0)
        data = torch.utils.data.TensorDataset(torch.rand(256, 1, 16, 16, generator=g) * 2 - 1,
                                              torch.zeros(256, dtype=torch.long))
        import tempfile
        tr = Trainer(cfg, run_dir=Path(tempfile.mkdtemp()) / "run", device=device, progress=False,
                     train_dataset=data, val_dataset=None)
        if not fused:
            tr.optimizer = torch.optim.AdamW(tr.raw_model.parameters(), lr=cfg.train.lr, betas=cfg.train.betas,
                                             weight_decay=cfg.train.weight_decay)
            tr._deferred_guard = False
            tr.scheduler = torch.optim.lr_scheduler.LambdaLR(tr.optimizer, lambda s: 1.0)
        return tr, tr._batches()

    tr_old, b_old = trainer(fused=device.type == "cuda")  # before: fused only on CUDA
    tr_new, b_new = trainer(fused=True)
    steps = 3 if quick else 5
    for _ in range(2):
        before_train_step(tr_old, b_old)
        tr_new.train_step(b_new)
    with CountOps() as c_old:
        before_train_step(tr_old, b_old)
    with CountOps() as c_new:
        tr_new.train_step(b_new)
    cases.append(("2+6", "Trainer.train_step, tiny preset, batch 16 (fp32)", "ms",
                  lambda: timed(lambda: before_train_step(tr_old, b_old), device, steps),
                  lambda: timed(lambda: tr_new.train_step(b_new), device, steps),
                  f"host syncs per step: {c_old.syncs} -> {c_new.syncs}; aten ops per step: {c_old.ops} -> "
                  f"{c_new.ops}; AdamW foreach -> fused"))

    # 6 alone: AdamW.step over the quick preset's parameters
    params = [p.detach().clone().requires_grad_(True) for p in UNet(UNetConfig.quick()).to(device).parameters()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt_foreach = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    opt_fused = torch.optim.AdamW(params, lr=1e-4, fused=True)
    for _ in range(2):
        opt_foreach.step()
        opt_fused.step()
    cases.append(("6", "AdamW.step, 'quick' preset (1.11M params)", "ms",
                  lambda: timed(opt_foreach.step, device, 5 * it), lambda: timed(opt_fused.step, device, 5 * it),
                  "foreach (the CPU default) -> fused=True"))

    # 7: the DDIM update alone, and a whole DDIM-50 chain of the tiny net
    diffusion = GaussianDiffusion(DiffusionConfig(timesteps=1000)).to(device)
    x = torch.randn(64, 1, 28, 28, device=device)
    eps, x0 = torch.randn_like(x), torch.randn_like(x).clamp(-1, 1)
    ts = sample_mod.ddim_timesteps(1000, 50)
    pairs = list(zip(ts, ts[1:] + [-1]))

    def chain_updates(step_fn, coefficients):
        for t, t_prev in pairs:
            step_fn(diffusion, x, t, t_prev, eps, x0, 0.0, coefficients=coefficients[t] if coefficients else None)

    def after_updates():
        fl = sample_mod._schedule_floats(diffusion)
        chain_updates(sample_mod.ddim_step, {t: sample_mod._ddim_coefficients(*fl, t, tp, 0.0) for t, tp in pairs})

    with CountOps() as c_old:
        before_ddim_step(diffusion, x, 980, 960, eps, x0)
    with CountOps() as c_new:
        sample_mod.ddim_step(diffusion, x, 980, 960, eps, x0, coefficients=sample_mod.ddim_coefficients(diffusion, 980, 960))
    cases.append(("7", "50 DDIM updates (eta=0), 64x1x28x28, network excluded", "ms",
                  lambda: timed(lambda: chain_updates(before_ddim_step, None), device, it),
                  lambda: timed(after_updates, device, it),
                  f"aten ops per update: {c_old.ops} -> {c_new.ops}"))

    tiny = UNet(UNetConfig.tiny()).to(device).eval()
    d_tiny = GaussianDiffusion(DiffusionConfig(timesteps=1000)).to(device)

    def ddim_chain():
        ddim_sample(tiny, d_tiny, (16, 1, 16, 16), steps=50, progress=False, generator=device_generator(device, 0))

    def before_chain():
        with patched(sample_mod, "ddim_step", before_ddim_step):
            return timed(ddim_chain, device)

    cases.append(("7", "DDIM-50 chain, tiny net, 16 images", "ms", before_chain, lambda: timed(ddim_chain, device),
                  "the network dominates on a CPU"))

    # 3: a recorded DDPM chain (T steps) for a 60-frame GIF
    T = 100 if quick else 250
    d_T = GaussianDiffusion(DiffusionConfig(timesteps=T)).to(device)
    keep = __import__("ddpm_nb.animate", fromlist=["frame_schedule"]).frame_schedule(T + 1, 60)

    def gif_chain(**kw):
        return ddpm_sample(tiny, d_T, (8, 1, 16, 16), return_trajectory=True, progress=False,
                           generator=device_generator(device, 0), **kw)

    def before_gif():
        with patched(sample_mod, "_run", before_run):
            return timed(gif_chain, device)

    with patched(sample_mod, "_run", before_run):
        mb_old = gif_chain()[1].x_t.numel() * 4 * 2 / 2 ** 20
    mb_new = gif_chain(trajectory_steps=keep)[1].x_t.numel() * 4 * 2 / 2 ** 20
    cases.append(("3", f"DDPM-{T} chain with trajectory, tiny net, 8 images, 60 frames kept", "ms", before_gif,
                  lambda: timed(lambda: gif_chain(trajectory_steps=keep), device),
                  f"device->host copies: {2 * T + 2} -> 2; trajectory {mb_old:.1f} MB -> {mb_new:.1f} MB"))

    # 5: the sample grids of one save_samples call (quick preset net; online + EMA)
    grid_net = UNet(UNetConfig.quick()).to(device)
    d_grid = GaussianDiffusion(DiffusionConfig(timesteps=1000)).to(device)
    n_grid = 8
    bf16 = cpu_native_bf16() if device.type == "cpu" else True
    after_dtype = torch.bfloat16 if bf16 else None

    def grids(steps, dtype):
        for _ in range(2):  # online and EMA
            sample_mod.sample(grid_net, d_grid, n_grid, steps=steps, progress=False, dtype=dtype,
                              generator=device_generator(device, 0), device=device)

    cases.append(("5", f"intermediate sample grids: 2 x {n_grid} images, 'quick' net", "ms",
                  lambda: timed(lambda: grids(50, None), device), lambda: timed(lambda: grids(20, after_dtype), device),
                  f"DDIM-50 fp32 -> DDIM-20 {'bf16' if after_dtype else 'fp32'} (preview_steps, sample_amp='auto')"))
    return cases


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: $DDPM_NB_THREADS)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the median is reported")
    p.add_argument("--quick", action="store_true", help="small sizes, one round: a smoke run")
    p.add_argument("--out", default=None, help="append one JSON line per row to this file")
    args = p.parse_args(argv)
    threads = set_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    cases = make_cases(device, args.quick)
    repeats = 1 if args.quick else args.repeats
    cheap = {"1", "2+6", "6"}  # rows whose calls take well under a second
    times = {i: ([], []) for i in range(len(cases))}
    for r in range(5 * repeats):
        for i, (item, what, _, before, after, _) in enumerate(cases):
            if r < repeats or (item in cheap or "50 DDIM updates" in what):
                times[i][0].append(before())  # before then after, call after call
                times[i][1].append(after())
    name = platform.processor() or platform.machine()
    print(f"Device: {device.type} ({name}), torch {torch.__version__}, {threads} thread(s), "
          f"median of {repeats} interleaved round(s)\n")
    print("| item | what | rounds | before ms | after ms | before/after (median) | (min) | note |")
    print("|---|---|---|---|---|---|---|---|")
    for i, (item, what, _, _, _, note) in enumerate(cases):
        b, a = statistics.median(times[i][0]) * 1e3, statistics.median(times[i][1]) * 1e3
        ratio_min = min(times[i][0]) / min(times[i][1])
        print(f"| {item} | {what} | {len(times[i][0])} | {b:.2f} | {a:.2f} | {b / a:.2f}x | {ratio_min:.2f}x | {note} |")
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(json.dumps({"item": item, "what": what, "before_ms": b, "after_ms": a,
                                     "before_min_ms": min(times[i][0]) * 1e3, "after_min_ms": min(times[i][1]) * 1e3,
                                     "note": note,
                                     "device": str(device), "threads": threads, "torch": torch.__version__,
                                     "rounds": repeats}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
