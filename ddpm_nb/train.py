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
from tqdm.auto import tqdm

from . import __version__
from .checkpoint import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, CheckpointError, RunFolder, RunInUseError,
                         is_good_checkpoint,
                         config_differences as _config_differences, export_weights, load_checkpoint, load_model,
                         load_weights as _load_weights, plain as _plain, save_checkpoint)
from .config import ConfigError, RunConfig
from .diffusion import GaussianDiffusion, drop_labels
from .sample import device_generator
from .sample import sample as draw_samples
from .unet import UNet, count_parameters
from .utils import TrainProgress, pick_device, progress_mode, results_dir, save_image

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "CheckpointError",
    "RunInUseError",
    "TrainingDivergedError",
    "EMA",
    "resolve_amp",
    "cpu_native_bf16",
    "lr_factor",
    "save_checkpoint",
    "load_checkpoint",
    "load_model",
    "export_weights",
    "EpochSampler",
    "Trainer",
]

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


class EpochSampler(torch.utils.data.Sampler):
    """Shuffled indices for one epoch, seeded by (seed, epoch), split across ranks, starting at `skip`.

    Everything is a pure function of its arguments, so a resumed run reads exactly the batches
    an uninterrupted run would have read.
    """

    def __init__(self, n: int, *, seed: int, epoch: int, micro_batch: int, rank: int = 0, world: int = 1,
                 skip_batches: int = 0):
        self.n, self.seed, self.epoch = n, seed, epoch
        self.micro_batch, self.rank, self.world, self.skip = micro_batch, rank, world, skip_batches
        self.batches = n // (micro_batch * world)
        if self.batches < 1:
            raise ConfigError(f"TrainConfig.batch_size: the dataset has only {n} images, fewer than one batch "
                              f"({micro_batch} per process x {world} processes); use a smaller batch_size")

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)[: self.batches * self.micro_batch * self.world]
        mine = perm[self.rank::self.world]
        return iter(mine[self.skip * self.micro_batch:].tolist())

    def __len__(self) -> int:
        return (self.batches - self.skip) * self.micro_batch


def _apply_train_settings(optimizer, scheduler, tc) -> None:
    """Put lr, weight decay and betas of `tc` into a restored optimizer, and the lr schedule of `tc`
    (its lambda already reads tc's steps and warm-up) at the restored step."""
    for group in optimizer.param_groups:
        group.update(initial_lr=tc.lr, weight_decay=tc.weight_decay, betas=tc.betas)
    scheduler.base_lrs = [tc.lr] * len(optimizer.param_groups)
    for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(scheduler.last_epoch)


# ---- distributed helpers ---------------------------------------------------------------------
def _dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank), from torchrun's environment variables."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


# ---- the trainer -----------------------------------------------------------------------------
class Trainer:
    """Train a UNet with DDPM's objective. `Trainer(cfg).train()` runs `cfg.train.steps` steps.

    resume=True continues from `run_dir/checkpoints/latest.pt` exactly (weights, optimizer,
    scaler, LR schedule, EMA, RNG states, data position). `on_log(trainer, row)` is called on every
    log row (notebooks use it for live plots); a row's loss is the mean over its log interval.
    `progress`: True = a bar in a terminal or notebook, one plain line per log row when the output
    is a file or pipe; 'bar', 'lines' or False (silent) force one (see utils.TrainProgress).
    Under `torchrun` it uses DistributedDataParallel.
    """

    def __init__(self, cfg: RunConfig, *, run_dir: str | os.PathLike | None = None, device=None,
                 resume: bool = False, progress: bool | str = True, on_log: Callable | None = None,
                 train_dataset=None, val_dataset=None):
        self.cfg, self.progress, self.on_log = cfg, progress, on_log
        tc = cfg.train
        self.rank, self.world, local_rank = _dist_env()
        self.distributed = self.world > 1
        if self.distributed and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend)
        if device is None and self.distributed and torch.cuda.is_available():
            device = f"cuda:{local_rank}"
        self.device = torch.device(device) if device is not None else pick_device()
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)
        self.is_main = self.rank == 0

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

        # model, EMA, optimizer
        torch.manual_seed(tc.seed)
        self.raw_model = UNet(cfg.unet).to(self.device)
        if tc.channels_last:
            self.raw_model = self.raw_model.to(memory_format=torch.channels_last)
        self.ema = EMA(self.raw_model, tc.ema_decay, tc.ema_start, tc.ema_warmup)
        self.diffusion = GaussianDiffusion(cfg.diffusion).to(self.device)
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
        self._sample_dtype = torch.bfloat16 if tc.sample_amp == "auto" and \
            resolve_amp("auto", self.device)[0] == torch.bfloat16 else None
        _set_cudnn_benchmark(self.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, warmup=tc.warmup_steps, total=tc.steps,
                                                schedule=tc.lr_schedule, min_ratio=tc.min_lr_ratio))
        model = self.raw_model
        if self.distributed:
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.model = torch.compile(model) if tc.compile else model
        self.gen = torch.Generator(device=self.device).manual_seed(tc.seed * 1000 + self.rank)

        self.step = 0
        self.micro_batches_seen = 0
        self.history: list[dict] = []
        self._interval = [0.0, 0]  # loss sum and steps of the open log interval (checkpointed: resume logs alike)
        self.val_history: list[dict] = []
        self.last_checkpoint: Path | None = None  # the last good checkpoint (see save_checkpoint)
        self._good_step = 0
        self.notes: list[str] = []  # one line each, printed by the main process: what changed and why
        if resume and self.folder.latest.exists():
            self._resume(self.folder.latest)
        elif self.is_main:
            if resume:
                self.notes.append(f"no run to resume in {self.run_dir}; starting a fresh one")
            self.folder.trim_logs(0)  # a fresh run: no rows from an earlier attempt that never checkpointed
            self.folder.write_config(cfg)
        if self.is_main:
            for note in self.notes:
                print(f"note: {note}", file=sys.stderr)
        self._tb = None
        if self.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=self.step or None)
            except Exception:  # tensorboard not installed: CSV only
                self._tb = None

    # ---- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "ddpm_nb_version": __version__,
            "config": _plain(self.cfg.to_dict()),
            "step": self.step,
            "micro_batches_seen": self.micro_batches_seen,
            "log_interval": [float(self._interval[0]), int(self._interval[1])],
            "model": self.raw_model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": {
                "cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
                "train": self.gen.get_state(),
            },
        }

    def save_checkpoint(self, loss: float | None = None) -> Path | None:
        """Write checkpoints/latest.pt (+ step_N.pt, keeping the last `keep_last`). Main process only.

        Only a good checkpoint (finite weights, recent loss `loss` and logged rows not blown up)
        replaces latest.pt and becomes `last_checkpoint`, the one the NaN guard names; it is kept
        out of rotation until a newer good one exists.
        """
        if not self.is_main:
            return None
        good = self._healthy(loss)
        path = self.folder.save(self.state_dict(), self.step, keep_last=self.cfg.train.keep_last, good=good,
                                protect=self.last_checkpoint)
        if good:
            self.last_checkpoint = path
            self._good_step = self.step
        else:
            print(f"note: step {self.step}: the loss blew up or the weights are not finite; checkpoint written as "
                  f"{path.name} only, latest.pt stays the last good one ({self.last_checkpoint or 'none yet'})",
                  file=sys.stderr)
        return path

    def _healthy(self, loss: float | None) -> bool:
        losses = [r["loss"] for r in self.history if r["step"] > self._good_step] + ([loss] if loss is not None else [])
        return is_good_checkpoint(self.raw_model, losses, [r["loss"] for r in self.history])

    def _resume(self, path: Path) -> None:
        state = load_checkpoint(path, map_location=self.device)
        saved = state["config"]
        diffs = _config_differences(saved["unet"], _plain(self.cfg.unet.to_dict()))
        diffs += _config_differences(saved["diffusion"], _plain(self.cfg.diffusion.to_dict()))
        if diffs:
            raise CheckpointError(f"cannot resume {path}: the run was made with another network or diffusion "
                                  f"setting ({'; '.join(diffs)}). Resume without changing those settings.")
        _load_weights(self.raw_model, state["model"], saved["unet"], str(path))
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler.is_enabled() and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])  # else: amp changed to or from fp16, a fresh scaler
        self.step = self._good_step = int(state["step"])
        self.micro_batches_seen = int(state["micro_batches_seen"])
        loss_sum, steps = state.get("log_interval", (0.0, 0))
        self._interval = [float(loss_sum), int(steps)]
        torch.set_rng_state(state["rng"]["cpu"].cpu())
        if state["rng"]["cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), self.device)
        self.gen.set_state(state["rng"]["train"].cpu())
        self.last_checkpoint = path
        changed = _config_differences({k: saved.get(k, {}) for k in ("data", "train")},
                                      {k: _plain(getattr(self.cfg, k).to_dict()) for k in ("data", "train")})
        if changed:  # the new settings apply from here on; the optimizer state keeps its moments
            _apply_train_settings(self.optimizer, self.scheduler, self.cfg.train)
            self.notes.append(f"resuming step {self.step} with changed settings, applied from here on: "
                              + "; ".join(d.replace(": checkpoint ", ": ").replace(" vs now ", " -> ")
                                          for d in changed))
        if self.is_main:
            self.folder.trim_logs(self.step)
            self.folder.write_config(self.cfg)  # what actually runs from here on
            self.history.extend(self.folder.log.rows())
            self.val_history.extend(self.folder.val.rows())

    # ---- data -------------------------------------------------------------------------------
    def _setup_data(self, train_dataset, val_dataset) -> None:
        """The datasets (built from cfg.data unless given), cached in memory when asked. Flips happen in
        `_prepare` with our own generator, so the datasets themselves are deterministic."""
        from . import data as data_mod

        cfg = self.cfg
        data_cfg = cfg.data.replace(hflip=False)
        if train_dataset is None:
            train_dataset, val_dataset = data_mod.train_val_datasets(data_cfg, cfg.unet.image_size)
        self.train_ds, self.val_ds = train_dataset, val_dataset
        if cfg.data.in_memory:
            self.train_ds = _materialize(self.train_ds, progress=progress_mode(self.progress) == "bar" and self.is_main)
            if self.val_ds is not None:
                self.val_ds = _materialize(self.val_ds, progress=False)
        self._tensors = None
        if isinstance(self.train_ds, torch.utils.data.TensorDataset):
            images, labels = self.train_ds.tensors[:2]
            if self.device.type == "cuda":
                images, labels = images.to(self.device), labels.to(self.device)
            self._tensors = (images, labels)
        channels = data_mod.dataset_channels(self.train_ds)
        if channels != cfg.unet.in_channels:
            raise ConfigError(f"UNetConfig.in_channels={cfg.unet.in_channels} but the dataset "
                              f"{cfg.data.dataset!r} has {channels} channel(s); set unet.in_channels={channels}")
        self.num_workers = cfg.data.num_workers if cfg.data.num_workers is not None \
            else data_mod.default_num_workers()

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless micro-batches starting at `micro_batches_seen`, identical across resumes."""
        from .data import make_loader

        n = len(self.train_ds)
        per_epoch = EpochSampler(n, seed=self.cfg.train.seed, epoch=0, micro_batch=self.micro_batch,
                                 world=self.world).batches
        while True:
            epoch, skip = divmod(self.micro_batches_seen, per_epoch)
            sampler = EpochSampler(n, seed=self.cfg.train.seed, epoch=epoch, micro_batch=self.micro_batch,
                                   rank=self.rank, world=self.world, skip_batches=skip)
            if self._tensors is not None:  # in memory (on the GPU when training there): index directly
                images, labels = self._tensors
                # the epoch's order goes to the device once, not one pageable copy per micro-batch
                order = torch.tensor(list(sampler), dtype=torch.long).to(images.device)
                for i in range(0, len(order) - self.micro_batch + 1, self.micro_batch):
                    idx = order[i:i + self.micro_batch]
                    yield images[idx], labels[idx]
                continue
            # an explicit generator keeps the loader from drawing on the global RNG (dropout's)
            loader = make_loader(self.train_ds, self.micro_batch, shuffle=False, num_workers=self.num_workers,
                                 drop_last=True, sampler=sampler,
                                 generator=torch.Generator().manual_seed(self.cfg.train.seed + epoch))
            for x, y in loader:
                yield x, y

    def _prepare(self, x: torch.Tensor, y: torch.Tensor):
        x = x.to(self.device, non_blocking=True).float()
        if self.cfg.data.hflip:
            flip = torch.rand(x.shape[0], generator=self.gen, device=self.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if self.cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = y.to(self.device).long() if self.cfg.data.class_cond else None
        if y is not None and self.cfg.unet.num_classes:  # classifier-free guidance training
            y = drop_labels(y, self.cfg.train.label_dropout, self.cfg.unet.num_classes, self.gen)
        return x, y

    # ---- one step ---------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def train_step(self, batches: Iterator) -> dict:
        """One optimizer step over `grad_accum` micro-batches. Returns {'loss', 'grad_norm', 'lr'}:
        loss and grad_norm are 0-d tensors on the device (`float()` them when you need the numbers; on a
        GPU that waits for the step, so the trainer does it only at the log interval), lr a float.

        A non-finite loss never updates the weights or the optimizer state. With a fused AdamW and no
        GradScaler the check stays on the device and `check_finite` raises at the next log, eval, sample
        or checkpoint step; otherwise this step raises `TrainingDivergedError` at once.
        """
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
        else:
            loss_value = total.item()
            if not math.isfinite(loss_value):
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
        step = int(self._first_nonfinite)
        if step >= 0:
            self._diverged(float(self._nonfinite_loss), step)

    def _diverged(self, loss_value: float, step: int):
        where = self.last_checkpoint or "none yet"
        raise TrainingDivergedError(
            f"loss became {loss_value} at step {step}; the weights were not updated with it. Last good "
            f"checkpoint: {where}. Lower train.lr, keep train.grad_clip on, or try train.amp='bf16' or 'off', "
            "then resume.")

    # ---- periodic work ----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation loss of the online and EMA weights, and per quartile of t (online).

        t and noise come from a fixed generator, so values are comparable across steps.
        """
        if self.val_ds is None or len(self.val_ds) == 0:
            return {}
        from .data import make_loader

        tc, T = self.cfg.train, self.diffusion.timesteps
        g = torch.Generator().manual_seed(12345)
        loader = make_loader(self.val_ds, min(self.micro_batch, len(self.val_ds)), shuffle=False, num_workers=0,
                             drop_last=False, generator=torch.Generator().manual_seed(0))
        sums = {"online": 0.0, "ema": 0.0}
        buckets, counts, n = torch.zeros(4), torch.zeros(4), 0
        for i, (x, y) in enumerate(loader):
            if i >= tc.eval_batches:
                break
            x = x.to(self.device).float()
            y = y.to(self.device).long() if self.cfg.data.class_cond else None
            t = self.diffusion.sample_timesteps(x.shape[0], self.device, g)  # the same t and eps for both nets
            noise = torch.randn(x.shape, generator=g).to(self.device)
            for name, net in (("online", self.raw_model), ("ema", self.ema.model)):
                was = net.training
                net.eval()
                with self._autocast():
                    per = self.diffusion.training_losses(net, x, y, t=t, noise=noise, input_perturbation=0.0).cpu()
                net.train(was)
                sums[name] += per.sum().item()
                if name == "online":
                    q = (t.cpu() * 4 // T).clamp(max=3)
                    buckets.index_add_(0, q, per)
                    counts.index_add_(0, q, torch.ones_like(per))
            n += x.shape[0]
        row = {"step": self.step, "val_loss": sums["online"] / n, "val_loss_ema": sums["ema"] / n}
        for k in range(4):
            row[f"q{k + 1}"] = (buckets[k] / counts[k]).item() if counts[k] else float("nan")
        return row

    @torch.no_grad()
    def sample(self, n: int | None = None, *, ema: bool = True, method: str = "ddim", steps: int | None = None,
               seed: int = 0, **kw) -> torch.Tensor:
        """Images (n, C, H, W) in [-1, 1] from the EMA (default) or online weights, with fixed noise."""
        net = self.ema.model if ema else self.raw_model
        n = n or self.cfg.train.num_samples
        if self.cfg.unet.num_classes and "y" not in kw:
            kw["y"] = torch.arange(n, device=self.device) % self.cfg.unet.num_classes
        g = device_generator(self.device, seed)  # noise drawn on the device: no copy per step
        return draw_samples(net, self.diffusion, n, method=method, steps=steps or self.cfg.train.sample_steps,
                            generator=g, progress=False, device=self.device, **kw)

    def save_samples(self) -> list[Path]:
        """The sample grids of this step: `sample_weights` (online and/or EMA), DDIM-`sample_steps` at the
        end of training and DDIM-`preview_steps` before, in bf16 where it is native (`sample_amp`)."""
        tc, out = self.cfg.train, []
        steps = tc.sample_steps if self.step >= tc.steps else min(tc.preview_steps, tc.sample_steps)
        for ema in {"both": (False, True), "online": (False,), "ema": (True,)}[tc.sample_weights]:
            images = self.sample(ema=ema, steps=steps, dtype=self._sample_dtype)
            tag = "ema" if ema else "online"
            out.append(save_image(images, self.run_dir / "samples" / f"step_{self.step:07d}_{tag}.png",
                                  scale=2 if self.cfg.unet.image_size < 64 else 1))
            if self._tb is not None:
                from .utils import make_grid
                self._tb.add_image(f"samples/{tag}", make_grid(images), self.step, dataformats="HWC")
        return out

    # ---- the loop ---------------------------------------------------------------------------
    def train(self, until: int | None = None) -> list[dict]:
        """Train until step `until` (default: cfg.train.steps). Returns the log rows."""
        tc = self.cfg.train
        until = min(until or tc.steps, tc.steps)
        batches = self._batches()
        report = TrainProgress(self.progress if self.is_main else False, total=until, initial=self.step,
                               desc=self.cfg.name)
        t0, last_step, started = time.perf_counter(), self.step, time.perf_counter()
        try:
            while self.step < until:
                out = self.train_step(batches)
                self._interval[0] += out["loss"]  # a row's loss is its interval's mean (a device tensor until then)
                self._interval[1] += 1
                report.update()
                last = self.step == until
                if last or any(every and self.step % every == 0
                               for every in (tc.log_every, tc.eval_every, tc.sample_every, tc.ckpt_every)):
                    self.check_finite()  # the deferred NaN guard, before anything is logged, drawn or saved
                if self.is_main and (self.step % tc.log_every == 0 or last):
                    out = {**out, "loss": float(out["loss"]), "grad_norm": float(out["grad_norm"])}  # the only syncs
                    now = time.perf_counter()
                    row = {"step": self.step, **out, "loss": float(self._interval[0]) / self._interval[1],
                           "images_per_s": (self.step - last_step) * tc.batch_size / max(now - t0, 1e-9),
                           "time_s": now - started}
                    t0, last_step = now, self.step
                    if self.step % tc.log_every == 0:  # a stop mid-interval leaves it open for the resume
                        self._interval = [0.0, 0]
                    report.log(row)
                    self.history.append(row)
                    self.folder.log.append(row)
                    if self._tb is not None:
                        for k in ("loss", "lr", "grad_norm", "images_per_s"):
                            self._tb.add_scalar(f"train/{k}", row[k], self.step)
                    if self.on_log is not None:
                        self.on_log(self, row)
                if self.is_main and ((tc.eval_every and self.step % tc.eval_every == 0) or
                                     (self.step == tc.steps)):
                    row = self.evaluate()
                    if row:
                        report.note(self.step, f"val loss {row['val_loss']:.4f} (EMA weights {row['val_loss_ema']:.4f})")
                        self.val_history.append(row)
                        self.folder.val.append(row)
                        if self._tb is not None:
                            for k, v in row.items():
                                if k != "step":
                                    self._tb.add_scalar(f"val/{k}", v, self.step)
                if self.is_main and ((tc.sample_every and self.step % tc.sample_every == 0) or
                                     self.step == tc.steps):
                    report.note(self.step, f"samples {self.save_samples()[-1]}")
                if (tc.ckpt_every and self.step % tc.ckpt_every == 0) or last:
                    if self.save_checkpoint(loss=out["loss"]) is not None:
                        report.note(self.step, f"checkpoint {self.ckpt_dir / 'latest.pt'}")
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


IN_MEMORY_LIMIT = 2 * 1024 ** 3  # bytes of float32 images that `_materialize` may hold


def _materialize(ds, *, progress: bool = False):
    """Decode and resize every image once into a float32 TensorDataset (deterministic transforms only:
    the trainer does the random flips itself). Skipped, returning `ds`, when it would exceed
    IN_MEMORY_LIMIT. Saves JPEG decoding and resizing on every epoch, which otherwise starves a GPU."""
    from torch.utils.data import TensorDataset

    if isinstance(ds, TensorDataset) or len(ds) == 0:
        return ds
    x0, _ = ds[0]
    if len(ds) * x0.numel() * 4 > IN_MEMORY_LIMIT:
        return ds
    from .data import default_num_workers, make_loader

    loader = make_loader(ds, 256, shuffle=False, drop_last=False, num_workers=default_num_workers())
    xs, ys = [], []
    for x, y in tqdm(loader, desc="caching images in memory", disable=not progress, leave=False):
        xs.append(x.float())
        ys.append(torch.as_tensor(y).long())
    out = TensorDataset(torch.cat(xs), torch.cat(ys))
    out.channels = int(x0.shape[0])
    return out
