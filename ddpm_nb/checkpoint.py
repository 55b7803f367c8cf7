"""Checkpoints and the run folder: nothing a run wrote is lost, and one process owns a run.

A run lives in `results/<name>/`:
    config.yaml           the RunConfig that actually ran (rewritten on every start and resume)
    checkpoints/latest.pt the newest good checkpoint (finite weights, loss not blown up)
    checkpoints/step_N.pt the last `keep_last` checkpoints, and the last good one
    samples/step_N_{online,ema}.png
    log.csv, val.csv      training and validation rows (TensorBoard in tb/ when installed)
    .lock                 held (flock) by the training process; its PID is written inside

Every file here is written to a temp file, fsynced and renamed into place (`utils.atomic_path`),
so a kill at any moment leaves the previous version; temp files of killed writes are removed
when the next process takes the run over. Explained in notebooks/03_training.
"""
from __future__ import annotations

import csv
import io
import math
import os
import shutil
from pathlib import Path

import torch
import yaml
from torch import nn

from ._version import __version__
from .config import RunConfig
from .utils import append_text, atomic_path, pick_device

try:  # POSIX: a lock the kernel drops when its process dies, so a stale lock is never a problem
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "CheckpointError",
    "RunInUseError",
    "checkpoint_dict",
    "save_checkpoint",
    "load_checkpoint",
    "capture_run_state",
    "save_run_checkpoint",
    "restore_run_state",
    "load_model",
    "export_weights",
    "is_good_checkpoint",
    "CsvLog",
    "RunFolder",
]

CHECKPOINT_FORMAT = "ddpm_nb-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: missing, truncated, not ours, or made for another configuration."""


class RunInUseError(FileExistsError):
    """Another live process trains in this run folder."""


# ---- the checkpoint format -------------------------------------------------------------------
def plain(d):
    """Tuples -> lists recursively, so configs are YAML-friendly and load with weights_only=True."""
    if isinstance(d, dict):
        return {k: plain(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [plain(v) for v in d]
    return d


def checkpoint_dict(cfg, model_state: dict, *, step: int, ema: dict | None = None, **extra) -> dict:
    """The checkpoint format, built in this one place for every writer (the trainer, `export_weights`,
    benchmarks/gpu_run.py): format tag and version, the package version, the RunConfig as plain data,
    the step, the weights, the EMA state (None in a sampling-only file), then `extra` (optimizer, RNGs, ...).
    `cfg` is a RunConfig or its dict."""
    return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "ddpm_nb_version": __version__,
            "config": plain(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg), "step": int(step),
            "model": model_state, "ema": ema, **extra}


def save_checkpoint(state: dict, path: str | os.PathLike, *, also: list[Path] = ()) -> Path:
    """Write `state` atomically (temp file, fsync, rename: `utils.atomic_path`).

    `also`: more names for the same file (hard links when possible), e.g. the step-numbered copy.
    A crash at any moment leaves the previous file intact; a full disk raises `utils.DiskFullError`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()  # serialised in memory first: torch's zip writer turns a full disk into a RuntimeError
    torch.save(state, buf)
    with atomic_path(path, size_hint=buf.tell()) as tmp:
        tmp.write_bytes(buf.getbuffer())
    size = buf.tell()
    del buf
    for other in also:
        with atomic_path(other, size_hint=size) as other_tmp:
            try:
                os.link(path, other_tmp)
            except OSError:
                shutil.copyfile(path, other_tmp)
    return path


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:160]}" if lines else type(exc).__name__


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load and validate a checkpoint with `torch.load(weights_only=True)`; one clear error otherwise."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / "latest.pt" if (path / "checkpoints").is_dir() else path / "latest.pt"
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}. Pass a .pt file or a run folder (results/<name>) that "
                              "holds checkpoints/latest.pt")
    older = sorted(p for p in path.parent.glob("step_*.pt") if p != path)
    hint = f" An earlier checkpoint of the run may still be good: {older[-1]}." if older else ""
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): its write was interrupted or the file was truncated, "
                              f"so it is not a readable ddpm_nb checkpoint.{hint}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, random bytes, pickles of foreign objects
        raise CheckpointError(f"{path} is not a readable ddpm_nb checkpoint (truncated, corrupt or not a "
                              f"PyTorch file: {_first_line(exc)}).{hint}") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is a PyTorch file but not a ddpm_nb checkpoint (no "
                              f"'format': '{CHECKPOINT_FORMAT}' entry). Use a file written by ddpm_nb's trainer.")
    if int(state.get("version", 0)) > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {state['version']}, newer than this "
                              f"ddpm_nb understands ({CHECKPOINT_VERSION}); upgrade ddpm_nb.")
    return state


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """'key: checkpoint A vs now B' for every setting that differs (nested dicts are walked)."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_differences(a, b, f"{prefix}{key}.")
        elif (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
            diffs.append(f"{prefix}{key}: checkpoint {a!r} vs now {b!r}")
    return diffs


def load_weights(model: nn.Module, weights: dict, saved_unet: dict, path: str) -> None:
    """`model.load_state_dict(weights)`, or a CheckpointError that lists the differing network settings."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        diffs = config_differences(saved_unet, model.cfg.to_dict())
        raise CheckpointError(f"{path} was trained with a different network: "
                              f"{'; '.join(diffs) or _first_line(exc)}. Use the checkpoint's own "
                              "configuration (load_model / --resume without network overrides).") from exc


def load_model(path: str | os.PathLike, *, ema: bool = True, device=None):
    """(model, diffusion, RunConfig) from a checkpoint, in eval mode on `device` (EMA weights by default)."""
    from .diffusion import make_diffusion
    from .unet import UNet

    state = load_checkpoint(path)
    cfg = RunConfig.from_dict(state["config"])
    device = torch.device(device) if device is not None else pick_device()
    model = UNet(cfg.unet)
    load_weights(model, state["ema"]["model"] if ema and state.get("ema") else state["model"],
                 state["config"]["unet"], str(path))
    diffusion = make_diffusion(cfg.diffusion)
    return model.to(device).eval(), diffusion.to(device), cfg


def export_weights(src: str | os.PathLike, dst: str | os.PathLike, *, ema: bool = True) -> Path:
    """Write a small, sampling-only checkpoint: the config and one set of weights (EMA by default).

    No optimizer, scaler or RNG state, so it is about a third of a training checkpoint and cannot be
    resumed; `load_model` and `python -m ddpm_nb sample/animate` read it like any other.
    """
    state = load_checkpoint(src)
    weights = state["ema"]["model"] if ema and state.get("ema") else state["model"]
    slim = checkpoint_dict(state["config"], weights, step=state.get("step", 0), exported_from=str(Path(src)),
                           weights="ema" if ema else "online")
    return save_checkpoint(slim, dst)


def is_good_checkpoint(model: nn.Module, recent_losses: list[float], all_losses: list[float]) -> bool:
    """May a checkpoint of `model` be called good? Its weights are finite, and every loss since the last
    good checkpoint is finite and at most max(1, 10 x the best loss so far): 1 is about what
    predicting zero costs, so a loss far above it means the weights exploded even while finite."""
    with torch.no_grad():
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            return False
    best = min((v for v in all_losses if math.isfinite(v)), default=1.0)
    return all(math.isfinite(v) and v <= max(1.0, 10.0 * best) for v in map(float, recent_losses))


# ---- a Trainer's run state: captured, saved, restored ------------------------------------------
def capture_run_state(trainer) -> dict:
    """Everything an exact resume needs from a `train.Trainer`: weights, EMA, optimizer, LR schedule,
    GradScaler, the RNG states (torch's global ones and the trainer's generator), the data position
    (micro-batches seen) and the open log interval."""
    return checkpoint_dict(
        trainer.cfg, trainer.raw_model.state_dict(), step=trainer.step, ema=trainer.ema.state_dict(),
        micro_batches_seen=trainer.micro_batches_seen,
        log_interval=[float(trainer._interval[0]), int(trainer._interval[1])],
        optimizer=trainer.optimizer.state_dict(), scheduler=trainer.scheduler.state_dict(),
        scaler=trainer.scaler.state_dict(),
        rng={"cpu": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state(trainer.device) if trainer.device.type == "cuda" else None,
             "train": trainer.gen.get_state()})


def save_run_checkpoint(trainer, loss: float | None = None) -> tuple[Path, bool]:
    """Write the trainer's checkpoint: latest.pt (+ step_N.pt, keeping the last `keep_last`) when it is good
    (`is_good_checkpoint`: finite weights, the losses since the last good one not blown up), else step_N.pt
    only, so latest.pt and `trainer.last_checkpoint` stay the last good one. Returns (path written, good)."""
    logged = [r["loss"] for r in trainer.history]
    recent = [r["loss"] for r in trainer.history if r["step"] > trainer._good_step] + ([loss] if loss is not None else [])
    good = is_good_checkpoint(trainer.raw_model, recent, logged)
    path = trainer.folder.save(capture_run_state(trainer), trainer.step, keep_last=trainer.cfg.train.keep_last,
                               good=good, protect=trainer.last_checkpoint)
    if good:
        trainer.last_checkpoint, trainer._good_step = path, trainer.step
    return path, good


def restore_run_state(trainer, path: Path) -> None:
    """Load `path` into a freshly built trainer so that it continues exactly where the checkpoint was made.

    Refused (CheckpointError, one line) when the checkpoint's network, diffusion (the formulation: schedule,
    objective, T) or dataset differ from the trainer's. Changed training or data-loading settings apply from
    the resumed step on; a note in `trainer.notes` lists them.
    """
    state = load_checkpoint(path, map_location=trainer.device)
    saved, cfg = state["config"], trainer.cfg
    current = {k: plain(getattr(cfg, k).to_dict()) for k in ("unet", "diffusion", "data", "train")}
    fixed = {"unet": saved["unet"], "diffusion": {**current["diffusion"], **saved["diffusion"]},
             "data": {"dataset": saved.get("data", {}).get("dataset", cfg.data.dataset)}}
    diffs = config_differences(fixed, {"unet": current["unet"], "diffusion": current["diffusion"],
                                       "data": {"dataset": cfg.data.dataset}})
    if diffs:
        raise CheckpointError(f"cannot resume {path}: the run was made with another network, diffusion or dataset "
                              f"({'; '.join(diffs)}). Resume without changing those settings.")
    load_weights(trainer.raw_model, state["model"], saved["unet"], str(path))
    trainer.ema.load_state_dict(state["ema"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    if trainer.scaler.is_enabled() and state["scaler"]:
        trainer.scaler.load_state_dict(state["scaler"])  # else: amp changed to or from fp16, a fresh scaler
    trainer.step = trainer._good_step = int(state["step"])
    trainer.micro_batches_seen = int(state["micro_batches_seen"])
    loss_sum, steps = state.get("log_interval", (0.0, 0))
    trainer._interval = [float(loss_sum), int(steps)]
    torch.set_rng_state(state["rng"]["cpu"].cpu())
    if state["rng"]["cuda"] is not None and trainer.device.type == "cuda":
        torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), trainer.device)
    trainer.gen.set_state(state["rng"]["train"].cpu())
    trainer.last_checkpoint = path
    changed = config_differences({k: {**current[k], **saved.get(k, {})} for k in ("data", "train")},
                                 {k: current[k] for k in ("data", "train")})
    if changed:  # the new settings apply from here on; the optimizer state keeps its moments
        _apply_train_settings(trainer.optimizer, trainer.scheduler, cfg.train)
        trainer.notes.append(f"resuming step {trainer.step} with changed settings, applied from here on: "
                             + "; ".join(d.replace(": checkpoint ", ": ").replace(" vs now ", " -> ") for d in changed))


def _apply_train_settings(optimizer, scheduler, tc) -> None:
    """Put lr, weight decay and betas of `tc` into a restored optimizer, and the lr schedule of `tc`
    (its lambda already reads tc's steps and warm-up) at the restored step."""
    for group in optimizer.param_groups:
        group.update(initial_lr=tc.lr, weight_decay=tc.weight_decay, betas=tc.betas)
    scheduler.base_lrs = [tc.lr] * len(optimizer.param_groups)
    for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * fn(scheduler.last_epoch)


# ---- the run folder --------------------------------------------------------------------------
class CsvLog:
    """Rows of a CSV file with a `step` column: appended as they come, trimmed back to a step on
    resume (so a killed run leaves no duplicate rows). Trimming rewrites the file atomically."""

    def __init__(self, path: Path, fields: list[str]):
        self.path, self.fields = Path(path), list(fields)

    def rows(self) -> list[dict]:
        """The rows as dicts of numbers (step as int; empty cells left out)."""
        if not self.path.exists():
            return []
        with open(self.path, newline="") as fh:
            return [{k: int(float(v)) if k == "step" else float(v) for k, v in r.items() if v not in ("", None)}
                    for r in csv.DictReader(fh)]

    def trim(self, step: int) -> None:
        """Keep only the rows up to `step` (temp file + rename: a kill leaves the old file whole)."""
        if not self.path.exists():
            return
        with open(self.path, newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r.get("step") and int(float(r["step"])) <= step]
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=self.fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    def append(self, row: dict) -> None:
        """Append one row (the header first in a new file), whole or not at all (`utils.append_text`)."""
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.fields, extrasaction="ignore")
        if not self.path.exists() or self.path.stat().st_size == 0:
            w.writeheader()
        w.writerow(row)
        append_text(self.path, buf.getvalue())


_HELD: dict[str, int] = {}  # run folders this process has locked: resolved path -> lock file descriptor


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


class RunFolder:
    """`results/<name>/` of one training run: its lock, config.yaml, CSV logs and checkpoint rotation.

    `open(resume=...)` (the main process only) creates the folder, takes the lock, removes temp files
    of killed writes and refuses to overwrite a finished or running run. One process owns a run:
    a second one gets `RunInUseError` naming the holder's PID; the lock of a killed process is
    released by the kernel and taken over. The same process may open its run again (a notebook
    cell run twice).
    """

    LOG_FIELDS = ["step", "loss", "lr", "grad_norm", "images_per_s", "time_s"]
    VAL_FIELDS = ["step", "val_loss", "val_loss_ema", "q1", "q2", "q3", "q4"]

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.ckpt_dir = self.path / "checkpoints"
        self.latest = self.ckpt_dir / "latest.pt"
        self.log = CsvLog(self.path / "log.csv", self.LOG_FIELDS)
        self.val = CsvLog(self.path / "val.csv", self.VAL_FIELDS)

    # ---- ownership ------------------------------------------------------------------------
    def open(self, *, resume: bool) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "samples").mkdir(exist_ok=True)
            probe = self.path / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise PermissionError(f"cannot write to the run folder {self.path}: {exc.strerror}. Choose a "
                                  "writable place with --results-dir or DDPM_NB_RESULTS.") from exc
        self.lock()
        self.remove_temp_files()
        if self.latest.exists() and not resume:
            raise FileExistsError(f"{self.path} already holds a run (checkpoints/latest.pt). Pass "
                                  "resume=True (--resume) to continue it, or choose another name (--name).")

    def lock(self) -> None:
        """Own the run folder (flock on `.lock`, which records our PID)."""
        key = str(self.path.resolve())
        if key in _HELD:
            return
        lock = self.path / ".lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunInUseError(f"{self.path} is in use by another training process (PID {holder}). Wait "
                                    "for it to finish or stop it, or choose another name (--name).") from None
        else:  # pragma: no cover - without flock: a PID file, taken over when its process is gone
            holder = os.read(fd, 64).decode(errors="replace").strip()
            if holder.isdigit() and int(holder) != os.getpid() and _alive(int(holder)):
                os.close(fd)
                raise RunInUseError(f"{self.path} is in use by another training process (PID {holder}). Wait "
                                    "for it to finish or stop it, or choose another name (--name).")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD[key] = fd

    def release(self) -> None:
        fd = _HELD.pop(str(self.path.resolve()), None)
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock

    def remove_temp_files(self) -> list[Path]:
        """Delete temp files (`.<name>.tmp-<pid>...`) that killed writers left, never a live process's."""
        gone = []
        for folder in (self.path, self.ckpt_dir, self.path / "samples"):
            for tmp in folder.glob(".*.tmp-*") if folder.is_dir() else ():
                pid = tmp.name.rsplit(".tmp-", 1)[1].split(".")[0]
                if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
                    continue
                tmp.unlink(missing_ok=True)
                gone.append(tmp)
        return gone

    # ---- contents -------------------------------------------------------------------------
    def write_config(self, cfg: RunConfig) -> None:
        with atomic_path(self.path / "config.yaml") as tmp, open(tmp, "w") as fh:
            yaml.safe_dump(plain(cfg.to_dict()), fh, sort_keys=False)

    def trim_logs(self, step: int) -> None:
        """Drop log rows after `step` (rows of an attempt that never reached its next checkpoint)."""
        self.log.trim(step)
        self.val.trim(step)

    def save(self, state: dict, step: int, *, keep_last: int, good: bool = True,
             protect: Path | None = None) -> Path:
        """Write a checkpoint and rotate: returns its path (step_N.pt when kept, else latest.pt).

        A good checkpoint becomes latest.pt (+ step_N.pt); one that is not good (non-finite weights or
        a loss that blew up) is written only as step_N.pt, so latest.pt and `protect` (the last good
        one) stay what a resume should start from. Rotation keeps the last `keep_last` and `protect`.
        """
        step_file = self.ckpt_dir / f"step_{step:07d}.pt"
        if good:
            save_checkpoint(state, self.latest, also=[step_file] if keep_last else [])
        else:
            save_checkpoint(state, step_file)
        keep = {step_file} if (keep_last or not good) else set()
        keep |= set(sorted(self.ckpt_dir.glob("step_*.pt"))[-keep_last:] if keep_last else [])
        if protect is not None:
            keep.add(Path(protect))
        for old in self.ckpt_dir.glob("step_*.pt"):
            if old not in keep:
                old.unlink()
        return step_file if (keep_last or not good) else self.latest
