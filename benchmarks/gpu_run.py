"""The one-command GPU run: everything a GPU is wanted for, inside one call of at most 9 minutes.

    bash benchmarks/gpu_run.sh           # (= make gpu) on a CUDA machine; writes to $OUT, else results/gpu_run/
    bash benchmarks/gpu_run.sh --cpu     # the same stages at tiny size on the CPU, in well under 2 minutes
    python benchmarks/import_gpu_results.py OUTDIR   # afterwards, on any machine: BENCHMARKS.md rows + model

Stages, in order. Each runs in its own forked process with its own time budget and is killed when
the budget is spent, so a slow stage cannot starve the rest (rows measured before that are kept):

  env       GPU, driver, torch, CUDA, bf16 support (one line, also in summary.json)
  ladder    training step of the 35.7M DDPM CIFAR-10 UNet at 32 px, batch 128, each rung a fixed
            number of timed steps after warm-up: fp32 -> bf16 -> channels_last -> SDPA -> compile;
            images/s, MFU, peak memory (benchmarks/bench.py)
  peers     diffusers' UNet2DModel (the identical network) and lucidrains' Unet beside ours, same
            batch, bf16 + channels_last + SDPA; "skipped: not installed" when the wheels did not travel
  sampling  DDIM-50 and DDPM-1000 images/s at 32 px (batch 256), the time of a 1000-step 64-image GIF chain
  flowers   the rest of the time: a class-conditional Flowers102 run at 64 px (bf16, channels_last,
            torch.compile when the ladder says it pays off in the time left), stopped by the clock;
            then its EMA weights in half precision (one file <= 16 MiB), a sample grid, a denoising
            GIF and >= 2,000 samples (uint8, 1,024 per file) for FID on the CPU afterwards

Budgets on the GPU: env 20 s, ladder 160, peers 60, sampling 80, flowers the rest (at least 195),
515 s in all from the script's start; gpu_run.sh stops everything at 528 s whatever happens. On the
CPU: 10, 30, 30, 15 and the rest (at least 25) of 110 s; the work takes about 25 s on 2 idle cores.

Outputs (at most 8 files, each <= 16 MiB; OUTPUTS below): summary.json (environment, every stage's
status, budget and time, the Flowers run), bench.jsonl (benchmarks/bench.py's rows), run.log
(written by gpu_run.sh), flowers_ema_fp16.pt, flowers_samples.png, flowers_chain.gif,
flowers_samples_0.npz, flowers_samples_1.npz.

The data travel with the working tree: `make gpu-prep` packs Flowers102 into .carry/flowers102.npz
(benchmarks/pack_flowers.py) and downloads the peers' wheels into .whl/.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback

_T0 = time.perf_counter()  # the stages' total budget counts from here, imports included
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/gpu_run.py` in a clone: this clone's ddpm_nb first
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ddpm_nb import __version__  # noqa: E402
from ddpm_nb.config import (DataConfig, DiffusionConfig, RunConfig, TrainConfig,  # noqa: E402
                            UNetConfig)
from ddpm_nb.utils import repo_root, results_dir  # noqa: E402

STAGES = ("env", "ladder", "peers", "sampling", "flowers")
OUTPUTS = ("summary.json", "bench.jsonl", "run.log", "flowers_ema_fp16.pt", "flowers_samples.png",
           "flowers_chain.gif", "flowers_samples_0.npz", "flowers_samples_1.npz")
MAX_FILES, MAX_BYTES = 8, 16 * 2**20
SUMMARY_VERSION = 1
FLOWERS_CLASSES = 102
PEER_MODELS = ("diffusers.UNet2DModel", "denoising_diffusion_pytorch.Unet")


@dataclass(frozen=True)
class FlowersPlan:
    """The Flowers102 stage: network, optimisation, and what is sampled afterwards."""

    unet: UNetConfig
    batch: int                  # images per optimizer step
    lr: float                   # AdamW, constant after warm-up (the run is stopped by the clock, not a step count)
    warmup_steps: int
    ema_decay: float
    ema_start: int
    max_steps: int              # stop here even if time is left (the CPU mode's fixed size)
    log_every: int              # steps between log rows (and clock checks)
    reserve_s: float            # seconds kept after training for sampling, the GIF and saving
    compile: str                # "auto" (when the ladder says it pays off), "on" or "off"
    limit: int | None           # use only the first N packed images
    num_samples: int            # for FID afterwards
    shard: int                  # samples per .npz file (1,024 x 64 x 64 x 3 uint8 = 12 MiB even uncompressed)
    sample_steps: int           # DDIM steps of the samples and the grid
    sample_batch: int
    guidance_scale: float       # classifier-free guidance of the samples (1 = plain conditional)
    grid: int                   # images in the grid (the first samples: classes 0, 1, 2, ...)
    gif_images: int
    gif_sampler: tuple          # (a name in ddpm_nb.sample.SAMPLERS, steps): the chain the GIF shows
    gif_frames: int


@dataclass(frozen=True)
class Mode:
    """Sizes and budgets of one mode: the real GPU run, or its tiny CPU rehearsal."""

    name: str
    device: str
    total_s: float                            # wall budget from the script's start to the end of the last stage
    budgets: dict                             # stage -> seconds; "flowers" gets the rest, at least its number
    ladder: list                              # benchmarks/bench.py arguments per stage
    peers: list
    sample: list
    gif: list
    flowers: FlowersPlan
    bench_common: list = field(default_factory=list)


FLOWERS_GPU_UNET = UNetConfig(image_size=64, in_channels=3, base_channels=64, channel_mults=(1, 1, 2, 2),
                              num_res_blocks=2, attn_resolutions=(16,), attn_head_channels=64, dropout=0.0,
                              num_classes=FLOWERS_CLASSES, norm_groups=32)  # 7.16M parameters: 13.7 MiB in fp16

GPU = Mode(
    name="gpu", device="cuda", total_s=515,
    budgets={"env": 20, "ladder": 160, "peers": 60, "sampling": 80, "flowers": 195},
    bench_common=["--no-progress"],
    ladder=["--what", "train", "--presets", "ddpm-cifar10", "--batch", "128", "--iters", "30", "--warmup", "5",
            "--settings", "fp32", "bf16", "channels_last", "sdpa", "compile"],
    peers=["--what", "peers", "--presets", "ddpm-cifar10", "--batch", "128", "--iters", "20", "--warmup", "5",
           "--settings", "sdpa"],
    sample=["--what", "sample", "--presets", "ddpm-cifar10", "--sample-batches", "256", "--sample-settings", "eager",
            "--ddim-steps", "50"],
    gif=["--what", "gif", "--presets", "ddpm-cifar10", "--gif-images", "64", "--gif-setting", "eager"],
    flowers=FlowersPlan(unet=FLOWERS_GPU_UNET, batch=128, lr=4e-4, warmup_steps=200, ema_decay=0.999,
                        ema_start=500, max_steps=1_000_000, log_every=50, reserve_s=45, compile="auto", limit=None,
                        num_samples=2048, shard=1024, sample_steps=50, sample_batch=512, guidance_scale=1.0,
                        grid=64, gif_images=16, gif_sampler=("ddpm", 1000), gif_frames=60),
)

CPU = Mode(
    name="cpu", device="cpu", total_s=110,
    budgets={"env": 10, "ladder": 30, "peers": 30, "sampling": 15, "flowers": 25},
    bench_common=["--no-progress", "--device", "cpu", "--presets", "tiny", "--timesteps", "20"],
    ladder=["--what", "train", "--batch", "4", "--iters", "1", "--warmup", "1",
            "--settings", "fp32", "bf16", "channels_last", "sdpa", "compile"],
    peers=["--what", "peers", "--batch", "4", "--iters", "1", "--warmup", "1", "--settings", "sdpa"],
    sample=["--what", "sample", "--sample-batches", "4", "--sample-settings", "eager", "--ddim-steps", "5"],
    gif=["--what", "gif", "--gif-images", "4", "--gif-frames", "8", "--gif-setting", "eager"],
    flowers=FlowersPlan(unet=UNetConfig(image_size=16, in_channels=3, base_channels=16, channel_mults=(1, 2),
                                        num_res_blocks=1, attn_resolutions=(8,), attn_head_channels=16, dropout=0.0,
                                        num_classes=FLOWERS_CLASSES, norm_groups=8),
                        batch=8, lr=1e-3, warmup_steps=2, ema_decay=0.9, ema_start=0, max_steps=6, log_every=2,
                        reserve_s=10, compile="off", limit=64, num_samples=32, shard=16, sample_steps=5,
                        sample_batch=16, guidance_scale=1.0, grid=16, gif_images=4, gif_sampler=("ddim", 10),
                        gif_frames=12),
)
MODES = {"gpu": GPU, "cpu": CPU}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _log(msg: str) -> None:
    print(f"[gpu_run {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- stages (each runs in a forked child; returns a JSON-able dict) ---------------------------
@dataclass
class Context:
    mode: Mode
    out: Path
    tmp: Path
    pack: Path | None
    threads: int


def _bench(ctx: Context, args: list[str]) -> None:
    from benchmarks import bench

    extra = ["--threads", str(ctx.threads)] if ctx.mode.device == "cpu" else []
    code = bench.main([*args, *ctx.mode.bench_common, *extra, "--out", str(ctx.out / "bench.jsonl")])
    if code:
        raise RuntimeError(f"benchmarks/bench.py {' '.join(args)} exited with {code}")


def _rows(ctx: Context, kind: str) -> list[dict]:
    path = ctx.out / "bench.jsonl"
    if not path.exists():
        return []
    return [r for r in (json.loads(line) for line in path.read_text().splitlines() if line.strip())
            if r.get("bench") == kind]


def stage_env(ctx: Context, deadline: float) -> dict:
    """The environment line: device, driver, torch, CUDA, bf16."""
    env = {"python": platform.python_version(), "torch": torch.__version__, "ddpm_nb": __version__,
           "cuda_available": torch.cuda.is_available(), "cpu": platform.processor() or platform.machine(),
           "cpu_count": os.cpu_count()}
    if ctx.mode.device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device here: run `bash benchmarks/gpu_run.sh --cpu` for the CPU rehearsal")
        p = torch.cuda.get_device_properties(0)
        env.update(device="cuda", gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(p.total_memory / 2**30, 1),
                   sm_count=p.multi_processor_count, capability=f"{p.major}.{p.minor}",
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   bf16=bool(torch.cuda.is_bf16_supported()))
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=15)
            env["driver"], env["max_sm_clock"], env["power_limit"] = [s.strip() for s in smi.stdout.split(",")][:3]
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            env["driver"] = f"n/a ({type(exc).__name__})"
    else:
        from benchmarks.bench import _device_name
        from ddpm_nb.train import cpu_native_bf16

        torch.set_num_threads(ctx.threads)
        env.update(device="cpu", gpu=None, device_name=_device_name(torch.device("cpu")), bf16=cpu_native_bf16(),
                   threads=ctx.threads)
    try:
        import importlib.metadata as md
        env["peers"] = {m: md.version(m) for m in ("diffusers", "denoising_diffusion_pytorch")
                        if _has_dist(md, m)}
    except Exception:  # noqa: BLE001 - informative only
        env["peers"] = {}
    label = env.get("gpu") or env.get("device_name")
    _log(f"env: {label}; driver {env.get('driver', '-')}; torch {env['torch']} (CUDA {env.get('cuda', '-')}); "
         f"bf16 {'yes' if env['bf16'] else 'no'}; peers {env['peers'] or 'not installed'}")
    return {"env": env}


def _has_dist(md, name: str) -> bool:
    try:
        md.version(name)
        return True
    except md.PackageNotFoundError:
        return False


def stage_ladder(ctx: Context, deadline: float) -> dict:
    _bench(ctx, ctx.mode.ladder)
    return {"rows": len(_rows(ctx, "train"))}


def stage_peers(ctx: Context, deadline: float) -> dict:
    _bench(ctx, ctx.mode.peers)
    peers = {}
    for name in PEER_MODELS:
        rows = [r for r in _rows(ctx, "peers") if r.get("model") == name]
        if not rows:
            peers[name] = "missing"
        elif any(r.get("skipped") for r in rows):
            peers[name] = "skipped: not installed"
        elif any(r.get("error") for r in rows):
            peers[name] = "error: " + next(r["error"] for r in rows if r.get("error"))
        else:
            peers[name] = "measured"
    return {"peers": peers}


def stage_sampling(ctx: Context, deadline: float) -> dict:
    _bench(ctx, ctx.mode.sample)
    _bench(ctx, ctx.mode.gif)
    return {"rows": len(_rows(ctx, "sample")) + len(_rows(ctx, "gif"))}


class _TimeUp(Exception):
    """Raised from the trainer's log hook when the Flowers run's training time is spent."""


def _compile_pays_off(ctx: Context, train_s: float) -> dict:
    """Whether torch.compile pays off for `train_s` seconds of training, from the ladder's own rows.

    The ladder measured the compile rung's warm-up time (compile included) and its speed-up over
    the eager rung above it; compiling pays when (train_s - compile_s) * speedup > train_s.
    """
    rows = {r["setting"]: r for r in _rows(ctx, "train") if r.get("images_per_s")}
    if "compile" not in rows or "sdpa" not in rows:
        return {"compile": False, "why": "the ladder has no measured compile row"}
    speedup = rows["compile"]["images_per_s"] / rows["sdpa"]["images_per_s"]
    compile_s = rows["compile"]["warmup_s"]
    pays = (train_s - compile_s) * speedup > train_s
    return {"compile": bool(pays), "speedup": round(speedup, 3), "compile_s": round(compile_s, 1),
            "train_s": round(train_s, 1),
            "why": f"(train {train_s:.0f} s - compile {compile_s:.0f} s) x speedup {speedup:.2f} "
                   f"{'>' if pays else '<='} {train_s:.0f} s"}


def flowers_config(plan: FlowersPlan, pack: Path, *, compile: bool, amp: str) -> RunConfig:
    """The RunConfig of the Flowers stage: class-conditional, cosine T=1000, like the CPU flowers model."""
    return RunConfig(
        name="flowers-gpu",
        unet=plan.unet,
        diffusion=DiffusionConfig(timesteps=1000, schedule="cosine"),
        data=DataConfig(dataset="npy", path=str(pack), split="all", val_fraction=0.0, hflip=True, class_cond=True,
                        limit=plan.limit, in_memory=True),
        train=TrainConfig(steps=plan.max_steps, batch_size=plan.batch, lr=plan.lr, warmup_steps=plan.warmup_steps,
                          lr_schedule="constant", grad_clip=1.0, amp=amp, channels_last=plan.unet.image_size >= 32,
                          compile=compile, ema_decay=plan.ema_decay, ema_start=plan.ema_start,
                          log_every=plan.log_every, sample_every=0, eval_every=0, ckpt_every=0, keep_last=0),
    )


def half_state(cfg: RunConfig, ema_model: torch.nn.Module, step: int) -> dict:
    """A sampling-only checkpoint (the format `load_model` and `ddpm_nb.pretrained` read) with fp16 weights."""
    from ddpm_nb.checkpoint import checkpoint_dict

    weights = {k: (v.detach().to("cpu", torch.float16) if v.is_floating_point() else v.detach().cpu())
               for k, v in ema_model.state_dict().items()}
    return checkpoint_dict(cfg, weights, step=step, weights="ema", dtype="float16",
                           exported_from="benchmarks/gpu_run.py")


def stage_flowers(ctx: Context, deadline: float) -> dict:
    """Train on the packed Flowers102 until the clock says stop, then save weights, grid, GIF and samples."""
    from ddpm_nb.animate import chain_frames, write_gif
    from ddpm_nb.sample import ddim_sample, run_sampler
    from ddpm_nb.checkpoint import load_model, save_checkpoint
    from ddpm_nb.train import Trainer
    from ddpm_nb.unet import count_parameters
    from ddpm_nb.utils import save_image

    plan, t_start = ctx.mode.flowers, time.perf_counter()
    if ctx.pack is None or not ctx.pack.is_file():
        raise FileNotFoundError(f"no packed Flowers102 at {ctx.pack}: run `make gpu-prep` "
                                "(python benchmarks/pack_flowers.py) before the run")
    device = torch.device(ctx.mode.device)
    if device.type == "cpu":
        torch.set_num_threads(ctx.threads)
    else:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
    train_s = max(0.0, deadline - time.perf_counter() - plan.reserve_s)
    decision = {"compile": False, "why": "off in this mode"} if plan.compile == "off" else \
        {"compile": True, "why": "forced on"} if plan.compile == "on" else _compile_pays_off(ctx, train_s)
    amp = "bf16" if device.type == "cuda" else "off"
    cfg = flowers_config(plan, ctx.pack, compile=decision["compile"], amp=amp)
    _log(f"flowers: {train_s:.0f} s of training; compile: {decision['why']}")

    def on_log(trainer, row):
        _log(f"flowers: step {row['step']} loss {row['loss']:.4f} {row['images_per_s']:.0f} img/s")
        if time.perf_counter() >= train_until or trainer.step >= plan.max_steps:
            raise _TimeUp

    trainer = Trainer(cfg, run_dir=ctx.tmp / "flowers-run", device=device, progress=False, on_log=on_log)
    params = count_parameters(trainer.raw_model)
    t_data = time.perf_counter() - t_start
    train_until = time.perf_counter() + max(0.0, deadline - time.perf_counter() - plan.reserve_s)
    t0 = time.perf_counter()
    try:
        trainer.train()
    except _TimeUp:
        pass
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_wall = time.perf_counter() - t0
    steps = trainer.step
    _log(f"flowers: {steps} steps of {plan.batch} in {train_wall:.1f} s")

    # EMA weights in half precision: the file that comes back; everything below samples from exactly it
    state = half_state(cfg, trainer.ema.model, steps)
    model_path = save_checkpoint(state, ctx.out / "flowers_ema_fp16.pt")
    losses = [r["loss"] for r in trainer.history]
    result = {
        "config": json.loads(json.dumps(state["config"])), "params": params, "images": len(trainer.train_ds),
        "steps": steps, "batch": plan.batch, "images_seen": steps * plan.batch,
        "epochs": round(steps * plan.batch / max(1, len(trainer.train_ds)), 2),
        "data_s": round(t_data, 1), "train_s": round(train_wall, 1),
        "images_per_s": round(steps * plan.batch / max(train_wall, 1e-9), 1), "compile": decision,
        "final_loss": float(np.mean(losses[-5:])) if losses else None,
        "log": [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()} for r in trainer.history],
        "model_file": model_path.name, "model_bytes": model_path.stat().st_size}
    (ctx.tmp / "flowers.partial.json").write_text(json.dumps({"flowers": result}))  # kept if sampling overruns
    model, diffusion, _ = load_model(model_path, device=device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    t1 = time.perf_counter()
    samples, labels = [], []
    g = torch.Generator(device).manual_seed(0)
    for start in range(0, plan.num_samples, plan.sample_batch):
        n = min(plan.sample_batch, plan.num_samples - start)
        y = (torch.arange(start, start + n, device=device) % FLOWERS_CLASSES)
        x = ddim_sample(model, diffusion, (n, 3, plan.unet.image_size, plan.unet.image_size), steps=plan.sample_steps,
                        y=y, guidance_scale=plan.guidance_scale, generator=g, progress=False, device=device,
                        dtype=dtype)
        samples.append(((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu())
        labels.append(y.cpu())
    if device.type == "cuda":
        torch.cuda.synchronize()
    sample_s = time.perf_counter() - t1
    images, labels = torch.cat(samples).numpy(), torch.cat(labels).numpy().astype(np.int64)
    files = []
    for i, start in enumerate(range(0, len(images), plan.shard)):
        path = ctx.out / f"flowers_samples_{i}.npz"
        np.savez_compressed(path, images=images[start:start + plan.shard], labels=labels[start:start + plan.shard])
        files.append(path.name)
    grid = torch.from_numpy(images[:plan.grid]).permute(0, 3, 1, 2).float() / 127.5 - 1
    save_image(grid, ctx.out / "flowers_samples.png", nrow=int(math.sqrt(plan.grid)),
               scale=max(1, 64 // plan.unet.image_size))

    t2 = time.perf_counter()
    shape = (plan.gif_images, 3, plan.unet.image_size, plan.unet.image_size)
    y = torch.arange(plan.gif_images, device=device) * 7 % FLOWERS_CLASSES
    gen = torch.Generator(device).manual_seed(1)
    kind, steps_gif = plan.gif_sampler
    _, traj = run_sampler(model, diffusion, shape, kind, steps=steps_gif, y=y, guidance_scale=plan.guidance_scale,
                          generator=gen, return_trajectory=True, progress=False, device=device, dtype=dtype)
    frames = chain_frames(traj.x_t, traj.x0_pred, num_frames=plan.gif_frames, timesteps=traj.timesteps,
                          scale=max(1, 32 // plan.unet.image_size))
    write_gif(frames, ctx.out / "flowers_chain.gif")
    gif_s = time.perf_counter() - t2
    return {"flowers": {
        **result,
        "samples": {"n": int(len(images)), "files": files, "sampler": "ddim", "steps": plan.sample_steps,
                    "eta": 0.0, "guidance_scale": plan.guidance_scale, "labels": f"i % {FLOWERS_CLASSES}",
                    "seed": 0, "batch": plan.sample_batch, "dtype": "bf16" if dtype is not None else "fp32",
                    "seconds": round(sample_s, 1),
                    "shape": list(images.shape[1:])},
        "gif": {"sampler": f"{kind.upper()}-{steps_gif}", "images": plan.gif_images, "frames": len(frames),
                "seconds": round(gif_s, 1)},
    }}


STAGE_FUNCS = {"env": stage_env, "ladder": stage_ladder, "peers": stage_peers, "sampling": stage_sampling,
               "flowers": stage_flowers}


# ---- the runner -------------------------------------------------------------------------------
def _child(name: str, ctx: Context, deadline: float, result: Path) -> None:
    try:
        out = {"status": "ok", **STAGE_FUNCS[name](ctx, deadline)}
    except BaseException as exc:  # noqa: BLE001 - any failure is recorded, the next stage still runs
        traceback.print_exc()
        out = {"status": "error", "error": f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"}
    result.write_text(json.dumps(out))
    sys.stdout.flush()
    sys.stderr.flush()


def run_stage(name: str, ctx: Context, budget: float) -> dict:
    """Run one stage in a forked process; kill it when `budget` seconds are spent."""
    result = ctx.tmp / f"{name}.json"
    proc = multiprocessing.get_context("fork").Process(target=_child, name=f"gpu_run-{name}",
                                                       args=(name, ctx, time.perf_counter() + budget, result))
    t0 = time.perf_counter()
    proc.start()
    proc.join(budget)
    timed_out = proc.is_alive()
    if timed_out:
        proc.terminate()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()
    seconds = time.perf_counter() - t0
    partial = ctx.tmp / f"{name}.partial.json"  # what a stage saved before it was stopped
    if timed_out:
        out = {"status": "timeout", "error": f"stopped at its budget of {budget:.0f} s",
               **(json.loads(partial.read_text()) if partial.exists() else {})}
    elif result.exists():
        out = json.loads(result.read_text())
    else:
        out = {"status": "error", "error": f"the stage's process ended with code {proc.exitcode} and no result"}
    return {**out, "budget_s": round(budget, 1), "seconds": round(seconds, 1)}


def _files(out: Path, *, all_files: bool = False) -> dict:
    """name -> bytes of the output files (without summary.json and the growing run.log unless all_files)."""
    return {p.name: p.stat().st_size for p in sorted(out.iterdir())
            if p.is_file() and (all_files or p.name not in ("summary.json", "run.log"))}


def check_outputs(out: Path) -> list[str]:
    """Problems with what would come back: unknown names, more than 8 files, files over 16 MiB."""
    files = _files(out, all_files=True)
    problems = [f"unexpected file {n}" for n in files if n not in OUTPUTS]
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files (at most {MAX_FILES})")
    problems += [f"{n} is {b / 2**20:.1f} MiB (at most 16)" for n, b in files.items() if b > MAX_BYTES]
    return problems


def run(mode: Mode, out: Path, *, pack: Path | None, threads: int, stages: list[str] | None = None) -> dict:
    """All stages in order; summary.json is rewritten after each one. Returns the summary."""
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:  # a rerun into the same folder starts clean (run.log is gpu_run.sh's, being written)
        if name != "run.log":
            (out / name).unlink(missing_ok=True)
    started, t0 = _now(), _T0
    summary = {"summary_version": SUMMARY_VERSION, "mode": mode.name, "started": started,
               "total_budget_s": mode.total_s,
               "budgets_s": mode.budgets, "pack": str(pack) if pack else None, "env": None, "stages": {},
               "flowers": None, "files": {}, "problems": []}
    _log(f"{mode.name} mode: stages {', '.join(stages or STAGES)}; budgets {mode.budgets} s, "
         f"{mode.total_s:.0f} s in all; "
         f"output in {out}")
    with tempfile.TemporaryDirectory(prefix="gpu_run-") as tmp:
        ctx = Context(mode=mode, out=out, tmp=Path(tmp), pack=pack, threads=threads)
        for name in STAGES:
            if stages and name not in stages:
                continue
            left = mode.total_s - (time.perf_counter() - t0)
            budget = left if name == "flowers" else min(mode.budgets[name], left)  # flowers: the rest of the time
            if budget < 5:
                summary["stages"][name] = {"status": "skipped", "error": "no time left", "budget_s": round(budget, 1),
                                           "seconds": 0.0}
                continue
            _log(f"stage {name}: budget {budget:.0f} s")
            res = run_stage(name, ctx, budget)
            _log(f"stage {name}: {res['status']} in {res['seconds']:.1f} s" +
                 (f" ({res['error']})" if res.get("error") else ""))
            for key in ("env", "flowers"):
                if key in res:
                    summary[key] = res.pop(key)
            summary["stages"][name] = res
            summary["wall_s"] = round(time.perf_counter() - t0, 1)
            _write_summary(out, summary)
            if name == "env" and res["status"] != "ok":
                _log("the environment stage failed: stopping")
                break
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    _write_summary(out, summary)
    summary["problems"] = check_outputs(out)
    _write_summary(out, summary)
    _log(f"done in {summary['wall_s']:.0f} s: " + ", ".join(f"{k} {v['status']}" for k, v in summary["stages"].items()))
    for name, size in summary["files"].items():
        _log(f"  {name}: {size / 2**20:.2f} MiB")
    if summary["problems"]:
        _log("problems: " + "; ".join(summary["problems"]))
    return summary


def _write_summary(out: Path, summary: dict) -> None:
    summary["files"] = _files(out)
    tmp = out / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, out / "summary.json")


def _default_pack(mode: Mode, tmp_root: Path) -> Path | None:
    """.carry/flowers102.npz; in CPU mode a small pack of its first images, or, when it is not
    there, of the data root's (decoding all 8,189 would take most of the CPU mode's time)."""
    from benchmarks.pack_flowers import find_flowers, head, pack
    from ddpm_nb.utils import data_root

    packed = repo_root() / ".carry" / "flowers102.npz"
    if mode.name != "cpu":
        return packed
    if packed.is_file():
        return Path(head(packed, tmp_root / "flowers102-small.npz", mode.flowers.limit)["path"])
    try:
        folder = find_flowers(data_root())
    except FileNotFoundError as exc:
        _log(f"no packed Flowers102 and none to pack: {exc}")
        return None
    return Path(pack(folder, tmp_root / "flowers102-small.npz", limit=mode.flowers.limit)["path"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/gpu_run.py",
                                description="The one-command GPU run (see the module docstring); "
                                            "usually started by benchmarks/gpu_run.sh.")
    p.add_argument("--cpu", action="store_true", help="the tiny CPU rehearsal of every stage (< 2 minutes)")
    p.add_argument("--out", default=None,
                   help="output folder (default: $OUT, else results/gpu_run or results/gpu_run_cpu)")
    p.add_argument("--pack", default=None, help="packed Flowers102 (default .carry/flowers102.npz)")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=None, help="run only these stages")
    p.add_argument("--threads", type=int, default=None, help="CPU mode: torch threads (default $DDPM_NB_THREADS or 1)")
    args = p.parse_args(argv)
    mode = CPU if args.cpu else GPU
    out = Path(args.out or os.environ.get("OUT") or results_dir("gpu_run_cpu" if args.cpu else "gpu_run"))
    threads = args.threads or int(os.environ.get("DDPM_NB_THREADS") or 1)
    if threads < 1:
        print(f"error: --threads must be >= 1, got {threads}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="gpu_run-pack-") as tmp:
        pack = Path(args.pack).expanduser().resolve() if args.pack else _default_pack(mode, Path(tmp))
        summary = run(mode, out, pack=pack, threads=threads, stages=args.stages)
    bad = [k for k, v in summary["stages"].items() if v["status"] != "ok"]
    return 1 if bad or summary["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
