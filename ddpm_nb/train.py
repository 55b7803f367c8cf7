"""The trainer: AdamW, warm-up + cosine LR, mixed precision, EMA, exact resume, DDP.

Explained in notebooks/03_training.

A run lives in `results/<name>/` (config.yaml, checkpoints/, samples/, log.csv, val.csv): the
folder, its lock and the checkpoint format are `ddpm_nb.checkpoint`'s; this module is the loop.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import RunFolder, restore_run_state, save_run_checkpoint
from .config import ConfigError, RunConfig
from .data import TrainBatches, dataset_channels, default_num_workers, make_loader, materialize, train_val_datasets
from .diffusion import drop_labels, make_diffusion
from .sample import device_generator
from .sample import get_sampler
from .sample import sample as draw_samples
from .unet import UNet, count_parameters
from .utils import TrainProgress, make_grid, pick_device, progress_mode, results_dir, save_image

__all__ = ["TrainingDivergedError", "EMA", "resolve_amp", "cpu_native_bf16", "lr_factor", "due", "Trainer"]


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the weights were not updated with it."""


# ---- pieces ----------------------------------------------------------------------------------
class EMA:
    """Exponential moving average of a model's weights (Polyak averaging).

    Before `start` the average is a plain copy. After it, with `warmup`, the decay ramps as
    min(decay, (1 + n) / (10 + n)) for the n-th update, so early averages are not dominated by
    the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, start: int = 0, warmup: bool = True):
        self.decay, self.start, self.warmup = decay, start, warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.num_updates = 0

    def current_decay(self, step: int) -> float:
        if step < self.start:
            return 0.0
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = self.current_decay(step)
        if step >= self.start:
            self.num_updates += 1
        ema_p = list(self.model.parameters())
        src_p = list(model.parameters())
        if d == 0.0:
            torch._foreach_copy_(ema_p, src_p)
        else:
            torch._foreach_lerp_(ema_p, src_p, 1.0 - d)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.num_updates = int(state["num_updates"])


def resolve_amp(mode: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use GradScaler) for a TrainConfig.amp mode on a device.

    'auto': bf16 on GPUs that support it (no scaler needed: bf16 has fp32's range), fp16 with a
    GradScaler on older GPUs, bf16 on a CPU with native bf16 instructions (AVX-512 BF16 or AMX:
    a training step takes about 0.57x the fp32 time there), off on other CPUs and on MPS.
    'bf16'/'fp16' force it (also on CPU, for learning).
    """
    if mode == "off":
        return None, False
    if mode == "auto":
        if device.type == "cpu":
            return (torch.bfloat16, False) if cpu_native_bf16() else (None, False)
        if device.type != "cuda":
            return None, False
        mode = "bf16" if _native_bf16() else "fp16"
    if mode == "bf16":
        if device.type == "cuda" and not _native_bf16():
            raise ConfigError("TrainConfig.amp: this GPU does not support bf16; use 'fp16' or 'auto'")
        return torch.bfloat16, False
    return torch.float16, True


def cpu_native_bf16() -> bool:
    """True when this CPU computes bf16 in hardware (x86 AVX-512 BF16 or AMX); elsewhere bf16
    autocast is emulated and slower than fp32. `DDPM_NB_CPU_BF16=0/1` overrides the check."""
    env = os.environ.get("DDPM_NB_CPU_BF16")
    if env in ("0", "1"):
        return env == "1"
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # a torch build without the probe
            pass
    return False


def _native_bf16() -> bool:
    """bf16 in hardware (Ampere and newer); older GPUs such as a T4 only emulate it, slowly."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # older torch without the argument
        return torch.cuda.is_bf16_supported()


def lr_factor(step: int, *, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warm-up, then cosine or constant."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def due(step: int, every: int, *, end: bool = False) -> bool:
    """The one rule of periodic work (logging, evaluation, sample grids, checkpoints, the NaN check): at every
    `every`-th step, and at the end (`end`); `every = 0` means never except at the end."""
    return end or (every > 0 and step % every == 0)


# ---- the trainer -----------------------------------------------------------------------------
class Trainer:
    """Train a UNet with the diffusion's objective. `Trainer(cfg).train()` runs `cfg.train.steps` steps.

    resume=True continues from `run_dir/checkpoints/latest.pt` exactly (weights, optimizer, scaler, LR
    schedule, EMA, RNG states, data position: `checkpoint.restore_run_state`). `on_log(trainer, row)` is called
    on every log row (notebooks use it for live plots); a row's loss is the mean over its log interval.
    `progress`: True = a bar in a terminal or notebook, one plain line per log row when the output is a file
    or pipe; 'bar', 'lines' or False (silent) force one (see utils.TrainProgress).
    Under `torchrun` it uses DistributedDataParallel. Explained in notebooks/03_training.
    """

    # ---- build ------------------------------------------------------------------------------
    def __init__(self, cfg: RunConfig, *, run_dir: str | os.PathLike | None = None, device=None,
                 resume: bool = False, progress: bool | str = True, on_log: Callable | None = None,
                 train_dataset=None, val_dataset=None):
        self.cfg, self.progress, self.on_log = cfg, progress, on_log
        tc = cfg.train
        self.rank, self.world, self.device = _dist_setup(device)
        self.distributed, self.is_main = self.world > 1, self.rank == 0
        if tc.batch_size % (tc.grad_accum * self.world):
            raise ConfigError(f"TrainConfig.batch_size={tc.batch_size} must be divisible by grad_accum x processes "
                              f"= {tc.grad_accum} x {self.world}")
        self.micro_batch = tc.batch_size // (tc.grad_accum * self.world)

        # run folder: owned by this process (a lock), temp files of killed writes removed
        self.folder = RunFolder(run_dir if run_dir is not None else results_dir(cfg.name, create=False))
        self.run_dir, self.ckpt_dir = self.folder.path, self.folder.ckpt_dir
        if self.is_main:
            self.folder.open(resume=resume)
        self._setup_data(train_dataset, val_dataset)

        # model, EMA, diffusion, precision, optimizer, LR schedule
        torch.manual_seed(tc.seed)
        self.raw_model = UNet(cfg.unet).to(self.device)
        if tc.channels_last:
            self.raw_model = self.raw_model.to(memory_format=torch.channels_last)
        self.ema = EMA(self.raw_model, tc.ema_decay, tc.ema_start, tc.ema_warmup)
        try:
            get_sampler(tc.sampler)
        except ConfigError as exc:
            raise ConfigError(f"TrainConfig.sampler: {exc}") from None
        self.diffusion = make_diffusion(cfg.diffusion).to(self.device)
        self.amp_dtype, use_scaler = resolve_amp(tc.amp, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        # one fused kernel for the whole update, on CPUs too (6.5 -> 1.7 ms per step on the tiny preset)
        fused = self.device.type in _fused_adamw_devices()
        self.optimizer = torch.optim.AdamW(self.raw_model.parameters(), lr=tc.lr, betas=tc.betas,
                                           weight_decay=tc.weight_decay, **({"fused": True} if fused else {}))
        # The NaN guard without a host sync per step: a fused AdamW skips its update on the device while
        # `found_inf` is 1, and the flag is read at the next log/eval/sample/checkpoint step. A GradScaler
        # (fp16) sets found_inf itself, and unfused optimizers cannot skip: those check every step.
        self._deferred_guard = fused and not use_scaler
        self._first_nonfinite = torch.full((), -1, dtype=torch.long, device=self.device)  # step, or -1
        self._nonfinite_loss = torch.zeros((), device=self.device)
        native_bf16 = resolve_amp("auto", self.device)[0] == torch.bfloat16
        self._sample_dtype = torch.bfloat16 if tc.sample_amp == "auto" and native_bf16 else None
        _set_cudnn_benchmark(self.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, warmup=tc.warmup_steps, total=tc.steps,
                                                schedule=tc.lr_schedule, min_ratio=tc.min_lr_ratio))
        model = nn.parallel.DistributedDataParallel(self.raw_model, device_ids=[self.device.index] if self.device.type
                                                    == "cuda" else None) if self.distributed else self.raw_model
        self.model = torch.compile(model) if tc.compile else model
        self.gen = torch.Generator(device=self.device).manual_seed(tc.seed * 1000 + self.rank)

        # where the run stands (all of it checkpointed: checkpoint.capture_run_state)
        self.step = self._good_step = self.micro_batches_seen = 0
        self._interval = [0.0, 0]  # loss sum and steps of the open log interval: a resume logs alike
        self.history: list[dict] = []
        self.val_history: list[dict] = []
        self.last_checkpoint: Path | None = None  # the last good checkpoint (see write_checkpoint)
        self.notes: list[str] = []  # one line each, printed by the main process: what changed and why
        if resume and self.folder.latest.exists():
            restore_run_state(self, self.folder.latest)
            if self.is_main:
                self.folder.trim_logs(self.step)  # rows of an attempt that never reached its next checkpoint
                self.history.extend(self.folder.log.rows())
                self.val_history.extend(self.folder.val.rows())
        elif self.is_main:
            if resume:
                self.notes.append(f"no run to resume in {self.run_dir}; starting a fresh one")
            self.folder.trim_logs(0)  # a fresh run: no rows from an earlier attempt that never checkpointed
        if self.is_main:
            self.folder.write_config(cfg)  # what actually runs from here on
            print("".join(f"note: {note}\n" for note in self.notes), end="", file=sys.stderr)
        self._tb = _tensorboard(self.run_dir, self.step) if self.is_main else None

    def _setup_data(self, train_dataset, val_dataset) -> None:
        """The datasets (built from cfg.data unless given), cached in memory when asked, and the batch stream.
        Flips happen in `_prepare` with our own generator, so the datasets themselves are deterministic."""
        cfg = self.cfg
        if train_dataset is None:
            train_dataset, val_dataset = train_val_datasets(cfg.data.replace(hflip=False), cfg.unet.image_size)
        self.train_ds, self.val_ds = train_dataset, val_dataset
        if cfg.data.in_memory:
            self.train_ds = materialize(self.train_ds, progress=progress_mode(self.progress) == "bar" and self.is_main)
            if self.val_ds is not None:
                self.val_ds = materialize(self.val_ds, progress=False)
        channels = dataset_channels(self.train_ds)
        if channels != cfg.unet.in_channels:
            raise ConfigError(f"UNetConfig.in_channels={cfg.unet.in_channels} but the dataset "
                              f"{cfg.data.dataset!r} has {channels} channel(s); set unet.in_channels={channels}")
        workers = cfg.data.num_workers if cfg.data.num_workers is not None else default_num_workers()
        self.batches = TrainBatches(self.train_ds, self.micro_batch, seed=cfg.train.seed, rank=self.rank,
                                    world=self.world, device=self.device, num_workers=workers)

    def _prepare(self, x: torch.Tensor, y: torch.Tensor):
        """A micro-batch on the device: random flips, then classifier-free guidance's label dropout."""
        x = x.to(self.device, non_blocking=True).float()
        if self.cfg.data.hflip:
            flip = torch.rand(x.shape[0], generator=self.gen, device=self.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if self.cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = y.to(self.device).long() if self.cfg.data.class_cond else None
        if y is not None and self.cfg.unet.num_classes:
            y = drop_labels(y, self.cfg.train.label_dropout, self.cfg.unet.num_classes, self.gen)
        return x, y

    # ---- one step ---------------------------------------------------------------------------
    def _autocast(self):
        amp = self.amp_dtype is not None
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype) if amp else contextlib.nullcontext()

    def train_step(self, batches: Iterator) -> dict:
        """One optimizer step over `grad_accum` micro-batches: {'loss', 'grad_norm'} as 0-d device tensors
        (reading them waits for a GPU, so the loop does it only at the log interval) and 'lr'. A non-finite
        loss never updates the weights: fused AdamW without a GradScaler skips the update on the device and
        `check_finite` raises at the next periodic step; otherwise this step raises `TrainingDivergedError`."""
        tc = self.cfg.train
        self.model.train()
        total = torch.zeros((), device=self.device)
        for i in range(tc.grad_accum):
            x, y = self._prepare(*next(batches))
            self.micro_batches_seen += 1
            sync = i == tc.grad_accum - 1 or not self.distributed
            ctx = self.model.no_sync() if not sync and hasattr(self.model, "no_sync") else contextlib.nullcontext()
            with ctx:
                with self._autocast():
                    loss = self.diffusion.training_losses(self.model, x, y, generator=self.gen).mean()
                self.scaler.scale(loss / tc.grad_accum).backward()
            total += loss.detach() / tc.grad_accum
        if self.distributed:
            dist.all_reduce(total)
            total /= self.world
        if self._deferred_guard:  # on the device: remember the first non-finite step, skip every update after it
            new = ~torch.isfinite(total) & (self._first_nonfinite < 0)
            self._first_nonfinite = torch.where(new, self.step, self._first_nonfinite)
            self._nonfinite_loss = torch.where(new, total, self._nonfinite_loss)
            self.optimizer.found_inf = (self._first_nonfinite >= 0).float()
        elif not math.isfinite(loss_value := total.item()):
            self.optimizer.zero_grad(set_to_none=True)
            self._diverged(loss_value, self.step)
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(),
                                                   tc.grad_clip if tc.grad_clip else float("inf"))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.step += 1
        self.ema.update(self.raw_model, self.step)
        return {"loss": total, "grad_norm": grad_norm, "lr": lr}

    def check_finite(self) -> None:
        """Raise `TrainingDivergedError` if a step since the start had a non-finite loss (one device sync)."""
        if (step := int(self._first_nonfinite)) >= 0:
            self._diverged(float(self._nonfinite_loss), step)

    def _diverged(self, loss_value: float, step: int):
        raise TrainingDivergedError(
            f"loss became {loss_value} at step {step}; the weights were not updated with it. Last good "
            f"checkpoint: {self.last_checkpoint or 'none yet'}. Lower train.lr, keep train.grad_clip on, or try "
            "train.amp='bf16' or 'off', then resume.")

    # ---- periodic work ----------------------------------------------------------------------
    def evaluate(self) -> dict:
        """Validation losses of the online and EMA weights at this step (`validation_losses`), or {}."""
        return {"step": self.step, **validation_losses(self)} if self.val_ds is not None and len(self.val_ds) else {}

    @torch.no_grad()
    def sample(self, n: int | None = None, *, ema: bool = True, sampler: str | None = None, steps: int | None = None,
               seed: int = 0, **kw) -> torch.Tensor:
        """Images (n, C, H, W) in [-1, 1] from the EMA (default) or online weights, with fixed noise, drawn by
        `sampler` (default the config's `train.sampler`)."""
        net = self.ema.model if ema else self.raw_model
        n = n or self.cfg.train.num_samples
        if self.cfg.unet.num_classes and "y" not in kw:
            kw["y"] = torch.arange(n, device=self.device) % self.cfg.unet.num_classes
        g = device_generator(self.device, seed)  # noise drawn on the device: no copy per step
        return draw_samples(net, self.diffusion, n, sampler=sampler or kw.pop("method", None) or self.cfg.train.sampler,
                            steps=steps or self.cfg.train.sample_steps,
                            generator=g, progress=False, device=self.device, **kw)

    def save_samples(self) -> list[Path]:
        """The sample grids of this step: `sample_weights` (online and/or EMA), drawn by `train.sampler` with
        `sample_steps` at the end of training and `preview_steps` before, in bf16 where it is native (`sample_amp`)."""
        tc, out = self.cfg.train, []
        steps = tc.sample_steps if self.step >= tc.steps else min(tc.preview_steps, tc.sample_steps)
        for ema in {"both": (False, True), "online": (False,), "ema": (True,)}[tc.sample_weights]:
            images = self.sample(ema=ema, steps=steps, dtype=self._sample_dtype)
            tag = "ema" if ema else "online"
            out.append(save_image(images, self.run_dir / "samples" / f"step_{self.step:07d}_{tag}.png",
                                  scale=2 if self.cfg.unet.image_size < 64 else 1))
            if self._tb is not None:
                self._tb.add_image(f"samples/{tag}", make_grid(images), self.step, dataformats="HWC")
        return out

    def write_checkpoint(self, loss: float | None = None) -> Path | None:
        """Write checkpoints/latest.pt (+ step_N.pt) when good, else step_N.pt only (main process only; see
        `checkpoint.save_run_checkpoint`)."""
        if not self.is_main:
            return None
        path, good = save_run_checkpoint(self, loss)
        if not good:
            print(f"note: step {self.step}: the loss blew up or the weights are not finite; checkpoint written as "
                  f"{path.name} only, latest.pt stays the last good one ({self.last_checkpoint or 'none yet'})",
                  file=sys.stderr)
        return path

    def _log(self, out: dict, report: TrainProgress, clock: list[float]) -> None:
        """One log row: the interval's mean loss, images/s since the last row; CSV, TensorBoard, on_log."""
        tc, now = self.cfg.train, time.perf_counter()
        out = {**out, "loss": float(out["loss"]), "grad_norm": float(out["grad_norm"])}  # the only syncs
        row = {"step": self.step, **out, "loss": float(self._interval[0]) / self._interval[1],
               "images_per_s": (self.step - clock[1]) * tc.batch_size / max(now - clock[0], 1e-9),
               "time_s": now - clock[2]}
        clock[:2] = [now, self.step]
        if due(self.step, tc.log_every):  # a stop mid-interval leaves it open for the resume
            self._interval = [0.0, 0]
        report.log(row)
        self.history.append(row)
        self.folder.log.append(row)
        if self._tb is not None:
            for k in ("loss", "lr", "grad_norm", "images_per_s"):
                self._tb.add_scalar(f"train/{k}", row[k], self.step)
        if self.on_log is not None:
            self.on_log(self, row)

    def _validate(self, report: TrainProgress) -> None:  # one val row: CSV, TensorBoard, a progress note
        row = self.evaluate()
        if row:
            report.note(self.step, f"val loss {row['val_loss']:.4f} (EMA weights {row['val_loss_ema']:.4f})")
            self.val_history.append(row)
            self.folder.val.append(row)
            if self._tb is not None:
                for k, v in row.items():
                    if k != "step":
                        self._tb.add_scalar(f"val/{k}", v, self.step)

    # ---- the loop ---------------------------------------------------------------------------
    def train(self, until: int | None = None) -> list[dict]:
        """Train until step `until` (default: cfg.train.steps). Returns the log rows.

        After each step, `due` decides the periodic work: a log row (every `log_every` and at `until`),
        validation and sample grids (every `eval_every` / `sample_every` and at the final step), a checkpoint
        (every `ckpt_every` and at `until`), and before any of them the deferred NaN check."""
        tc = self.cfg.train
        until = min(until or tc.steps, tc.steps)
        batches = self.batches.stream(self.micro_batches_seen)
        report = TrainProgress(self.progress if self.is_main else False, total=until, initial=self.step,
                               desc=self.cfg.name)
        clock = [time.perf_counter(), self.step, time.perf_counter()]  # last row's time and step, the start
        try:
            while self.step < until:
                out = self.train_step(batches)
                self._interval[0] += out["loss"]  # a row's loss is its interval's mean (a device tensor until then)
                self._interval[1] += 1
                report.update()
                step, stop, final = self.step, self.step == until, self.step == tc.steps
                work = {"log": due(step, tc.log_every, end=stop), "eval": due(step, tc.eval_every, end=final),
                        "samples": due(step, tc.sample_every, end=final), "ckpt": due(step, tc.ckpt_every, end=stop)}
                if any(work.values()):
                    self.check_finite()  # the deferred NaN guard, before anything is logged, drawn or saved
                if self.is_main and work["log"]:
                    self._log(out, report, clock)
                if self.is_main and work["eval"]:
                    self._validate(report)
                if self.is_main and work["samples"]:
                    report.note(step, f"samples {self.save_samples()[-1]}")
                if work["ckpt"] and self.write_checkpoint(loss=float(out["loss"])) is not None:
                    report.note(step, f"checkpoint {self.ckpt_dir / 'latest.pt'}")
        finally:
            report.close()
            if self._tb is not None:
                self._tb.flush()
        return self.history

    def close(self) -> None:
        """Flush the logs and hand the run folder back (its lock); under DDP, leave the group."""
        if self._tb is not None:
            self._tb.close()
        if self.is_main:
            self.folder.release()
        if self.distributed and dist.is_initialized():
            dist.barrier()  # every rank done with gloo/nccl before any tears the group down
            dist.destroy_process_group()

    def summary(self) -> str:
        return (f"{self.cfg.name}: UNet {count_parameters(self.raw_model) / 1e6:.2f}M params, "
                f"{len(self.train_ds)} training images, batch {self.cfg.train.batch_size} "
                f"(x{self.cfg.train.grad_accum} accumulation, {self.world} process(es)), "
                f"amp={self.amp_dtype}, device={self.device}")


@torch.no_grad()
def validation_losses(trainer: Trainer) -> dict:
    """Validation loss (the plain objective: no input perturbation) of the online and EMA weights, and the
    online one per quartile of t. t and noise come from a fixed generator, the same for both nets, so the
    values are comparable across steps."""
    diffusion, T, g = trainer.diffusion, trainer.diffusion.timesteps, torch.Generator().manual_seed(12345)
    loader = make_loader(trainer.val_ds, min(trainer.micro_batch, len(trainer.val_ds)), shuffle=False,
                         num_workers=0, drop_last=False, generator=torch.Generator().manual_seed(0))
    sums = {"online": 0.0, "ema": 0.0}
    buckets, counts, n = torch.zeros(4), torch.zeros(4), 0
    for i, (x, y) in enumerate(loader):
        if i >= trainer.cfg.train.eval_batches:
            break
        x = x.to(trainer.device).float()
        y = y.to(trainer.device).long() if trainer.cfg.data.class_cond else None
        t = diffusion.sample_timesteps(x.shape[0], trainer.device, g)
        noise = torch.randn(x.shape, generator=g).to(trainer.device)
        for name, net in (("online", trainer.raw_model), ("ema", trainer.ema.model)):
            was = net.training
            net.eval()
            with trainer._autocast():
                per = diffusion.training_losses(net, x, y, t=t, noise=noise, input_perturbation=0.0).cpu()
            net.train(was)
            sums[name] += per.sum().item()
            if name == "online":
                q = (t.cpu() * 4 // T).long().clamp(max=3)
                buckets.index_add_(0, q, per)
                counts.index_add_(0, q, torch.ones_like(per))
        n += x.shape[0]
    row = {"val_loss": sums["online"] / n, "val_loss_ema": sums["ema"] / n}
    for k in range(4):
        row[f"q{k + 1}"] = (buckets[k] / counts[k]).item() if counts[k] else float("nan")
    return row


def _tensorboard(run_dir: Path, step: int):
    """A TensorBoard writer in run_dir/tb (continuing at `step`), or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter(str(run_dir / "tb"), purge_step=step or None)
    except Exception:  # tensorboard not installed: CSV only
        return None


def _dist_setup(device) -> tuple[int, int, torch.device]:
    """(rank, world size, device) under torchrun (joining the process group) or alone (0, 1, device)."""
    rank, world, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), \
        int(os.environ.get("LOCAL_RANK", 0))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if device is None and world > 1 and torch.cuda.is_available():
        device = f"cuda:{local_rank}"
    device = torch.device(device) if device is not None else pick_device()
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return rank, world, device


def _fused_adamw_devices() -> tuple[str, ...]:
    """Device types with a fused AdamW kernel (torch's own list where it has one)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
        return tuple(_get_fused_kernels_supported_devices())
    except Exception:  # an older torch without the list
        return ("cuda", "cpu")


def _set_cudnn_benchmark(device: torch.device) -> None:
    """Training shapes are fixed, so let cuDNN time its convolution algorithms once and keep the fastest."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
