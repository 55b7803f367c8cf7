"""Small helpers every lesson uses: device, seeding, paths, image grids.

Explained in notebooks/01_forward_process (grids) and used everywhere else.
"""
from __future__ import annotations

import contextlib
import errno
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "pick_device",
    "seed_everything",
    "repo_root",
    "results_dir",
    "data_root",
    "cache_dir",
    "to_uint8",
    "make_grid",
    "save_image",
    "atomic_path",
    "append_text",
    "disk_full",
    "is_disk_full",
    "atomic_write_bytes",
    "ConfigError",
    "check_steps",
    "DiskFullError",
    "set_threads",
    "progress_mode",
    "TrainProgress",
    "busy_cpu_warning",
]


def pick_device(prefer: str | None = None) -> torch.device:
    """The best available device: cuda, then Apple's mps, then cpu.

    `prefer` ("cuda", "mps", "cpu") forces a choice; the environment variable
    `DDPM_NB_DEVICE` does the same without touching code.
    """
    prefer = prefer or os.environ.get("DDPM_NB_DEVICE")
    if prefer:
        if prefer.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"device {prefer!r} was asked for but CUDA is not available; use 'cpu'")
        return torch.device(prefer)
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def set_threads(n: int | str | None = None) -> int:
    """Set torch's CPU thread count from `n`, else `DDPM_NB_THREADS`; returns the count in use.

    On a 2-core machine where another process holds a core, one thread is often several times
    faster than two (OpenMP threads spin at every barrier waiting for the busy core).
    """
    n = n if n is not None else os.environ.get("DDPM_NB_THREADS")
    if n is None or n == "":
        return torch.get_num_threads()
    try:
        n = int(n)
    except (TypeError, ValueError):
        raise ValueError(f"threads must be a positive integer, got {n!r} (--threads or DDPM_NB_THREADS)") from None
    if n < 1:
        raise ValueError(f"threads must be a positive integer, got {n} (--threads or DDPM_NB_THREADS)")
    torch.set_num_threads(n)
    return n


def busy_cpu_warning(threads: int | None = None, device=None) -> str | None:
    """One line of warning when torch will compute with several threads on a CPU that other processes
    already keep busy (1-minute load average + our threads > cores) and fewer threads would fit, else
    None. Suggests the thread count that fits."""
    if device is not None and torch.device(device).type != "cpu" or not hasattr(os, "getloadavg"):
        return None
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    cores = os.cpu_count() or 1
    threads = threads or torch.get_num_threads()
    if load + threads <= cores + 0.5:
        return None
    fit = max(1, cores - round(load))
    if fit >= threads:  # nothing to gain from fewer threads
        return None
    return (f"warning: the CPU is busy (load {load:.1f} on {cores} cores) and torch uses {threads} threads; "
            f"threads waiting for a busy core can make a run several times slower: use --threads {fit} "
            f"(or DDPM_NB_THREADS={fit})")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (all devices); return a CPU generator seeded the same way.

    Pass the returned generator to samplers and `q_sample` wherever a figure must be reproducible.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _is_checkout(folder: Path) -> bool:
    """Whether `folder` is a ddpm_nb source tree (a clone, or an editable install of one)."""
    pyproject = folder / "pyproject.toml"
    try:
        return (folder / "ddpm_nb").is_dir() and 'name = "ddpm_nb"' in pyproject.read_text()
    except OSError:
        return False


def repo_root() -> Path | None:
    """The repository (checkout) this package runs from, or None when it is installed from a wheel.

    Found from the package location, not the working directory (nbmake runs each notebook from its
    own folder). `DDPM_NB_ROOT` names a checkout explicitly. Where things go follows from it:
    see `results_dir`, `data_root` and `cache_dir`.
    """
    env = os.environ.get("DDPM_NB_ROOT")
    if env:
        return Path(env).expanduser().resolve()
    here = Path(__file__).resolve().parent.parent
    return here if _is_checkout(here) else None


def results_dir(*parts: str, create: bool = True) -> Path:
    """`results/<parts...>`: under `DDPM_NB_RESULTS` when set; else the checkout's `results/`; else
    (installed from a wheel) `./results` of the working directory, never site-packages."""
    env = os.environ.get("DDPM_NB_RESULTS")
    root = repo_root()
    base = Path(env) if env else (root / "results" if root is not None else Path.cwd() / "results")
    path = base.expanduser().joinpath(*parts)
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PermissionError(
                f"cannot create results folder {path}: {exc.strerror}. "
                "Choose a writable place with DDPM_NB_RESULTS=/some/dir or --results-dir."
            ) from exc
    return path


def cache_dir() -> Path:
    """The per-user cache: `DDPM_NB_CACHE`, else `$XDG_CACHE_HOME/ddpm_nb` (default ~/.cache/ddpm_nb).

    Downloads go here when the data root is read-only, and it is the data root itself for an
    installed (non-checkout) package, so `pip uninstall` leaves nothing in site-packages."""
    env = os.environ.get("DDPM_NB_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "ddpm_nb"


def data_root() -> Path:
    """The dataset root: `DDPM_NB_DATA` when set; else the checkout's `data/`; else `cache_dir()`."""
    env = os.environ.get("DDPM_NB_DATA")
    if env:
        return Path(env).expanduser().resolve()
    root = repo_root()
    return root / "data" if root is not None else cache_dir()


def display_path(path: str | os.PathLike) -> str:
    """A path as messages and lessons print it, never this machine's layout: relative to the checkout
    (`ddpm_nb/assets/...`), `<ddpm_nb>/...` inside an installed package, `<data>/...` under $DDPM_NB_DATA,
    `~/...` under the home folder; anything else as given."""
    path = Path(path).expanduser()
    try:
        path = path.resolve()
    except OSError:
        return str(path)
    bases = []
    if os.environ.get("DDPM_NB_DATA"):
        bases.append((Path(os.environ["DDPM_NB_DATA"]).expanduser().resolve(), "<data>"))
    root = repo_root()
    if root is not None:
        bases.append((root.resolve(), None))
    bases += [(Path(__file__).resolve().parent, "<ddpm_nb>"), (Path.home().resolve(), "~")]
    for base, name in bases:
        try:
            rel = path.relative_to(base)
        except ValueError:
            continue
        return str(rel) if name is None else f"{name}/{rel}" if str(rel) != "." else name
    return str(path)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, 3) uint8 RGB (grayscale is repeated to 3 channels)."""
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (B, 1|3, H, W), got {tuple(images.shape)}")
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def make_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2, pad_value: int = 255,
              scale: int = 1) -> np.ndarray:
    """Tile (B, C, H, W) images in [-1, 1] into one (H', W', 3) uint8 RGB array.

    `nrow` images per row (default: about square); `scale` upsamples with nearest-neighbour
    so small images stay crisp.
    """
    tiles = to_uint8(images)
    b, h, w, _ = tiles.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(b)))
    ncol = math.ceil(b / nrow)
    grid = np.full((ncol * (h + padding) + padding, nrow * (w + padding) + padding, 3), pad_value, np.uint8)
    for i in range(b):
        r, c = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + c * (w + padding)
        grid[y:y + h, x:x + w] = tiles[i]
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    return grid


class ConfigError(ValueError):
    """A configuration value is out of range; the message names the field and what is allowed.
    (Defined here, at the bottom of the package, so that data.py's registry can raise it; `ddpm_nb.config`
    exports it.)"""


def check_steps(steps: int, timesteps: int, name: str) -> None:
    """The one rule for a sampler's step count: 1 <= steps <= T. A ConfigError naming `name` otherwise
    (the config's sample grids, the command line's --steps and `sample.ddim_timesteps` all call it)."""
    if not 1 <= steps <= timesteps:
        raise ConfigError(f"{name}: {steps} DDIM steps, but the diffusion has T = {timesteps} steps; "
                          f"use 1 to {timesteps}")


class DiskFullError(OSError):
    """A file could not be written for lack of space; the message names it and says nothing was lost."""

    def __str__(self) -> str:
        return str(self.strerror)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.0f} kB"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None, *, size_hint: int | None = None):
    """Yield a temp path next to `path` (with `path`'s suffix, or `suffix`, so writers that pick a
    format by the file name still work); when the block succeeds, fsync it, rename it over `path`
    and fsync the folder. On any error the temp file is removed and `path` is left as it was, so a
    crash never leaves a half-written file under the real name. A full disk raises `DiskFullError`
    naming the file, the space it needs (`size_hint` bytes when given) and what is free."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix or suffix or ''}")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        if not is_disk_full(exc) or isinstance(exc, DiskFullError):
            raise
        written = tmp.stat().st_size if tmp.exists() else 0
        kept = f"the previous {path.name} is intact" if path.exists() else "no partial file was left"
        raise disk_full(path, size_hint or written, kept, exact=bool(size_hint)) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def is_disk_full(exc: BaseException) -> bool:
    """True for the errors a full disk or an exhausted quota raises (ENOSPC, EDQUOT)."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def disk_full(path: str | os.PathLike, need: int, kept: str, *, exact: bool = True,
              then: str = "Free some space and run the command again") -> DiskFullError:
    """The one message of every full-disk error: the file, the space it needs, the space free there,
    what was kept (`kept`, e.g. "the previous latest.pt is intact") and what to do (`then`).
    The parts are kept on the error (`.what`, `.then`) so a caller can say more about what was kept."""
    path = Path(path)
    folder = next((p for p in (path.parent, *path.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(folder).free
    need_text = f"about {_megabytes(need)}" if exact else f"more than the {_megabytes(need)} written"
    what = f"could not write {path}: no space left on the device (it needs {need_text}; {_megabytes(free)} free there)"
    err = DiskFullError(errno.ENOSPC, f"{what}. Nothing was lost: {kept}. {then}")
    err.what, err.kept, err.then = what, kept, then
    return err


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append `text` to `path` whole or not at all: a full disk truncates the file back to its old length
    (no half-written row for the next reader) and raises `DiskFullError`."""
    path = Path(path)
    data = text.encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        view = memoryview(data)
        try:
            while view:  # unbuffered: a short write continues, a full disk raises here and nowhere later
                view = view[os.write(fd, view):]
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            os.ftruncate(fd, start)
            raise disk_full(path, len(data), f"{path.name} keeps every line written before") from None
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (see `atomic_path`)."""
    with atomic_path(path, size_hint=len(data)) as tmp:
        tmp.write_bytes(data)


def save_image(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None, scale: int = 1) -> Path:
    """Save a grid of (B, C, H, W) images in [-1, 1] as a PNG; returns the path."""
    import imageio.v3 as iio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # encoded in memory, then written: no encoder holds a file that a full disk could break (imageio would
    # retry the close at garbage collection and print a traceback)
    atomic_write_bytes(path, iio.imwrite("<bytes>", make_grid(images, nrow=nrow, scale=scale),
                                         extension=path.suffix or ".png"))
    return path


# ---- progress of long loops: a bar for people, plain lines for log files ------------------------------------
def progress_mode(progress: bool | str) -> str:
    """'bar', 'lines' or 'off' for a `progress` argument.

    True / 'auto': a bar in a terminal or a notebook (Jupyter, Colab), else plain lines (stdout
    redirected to a file or a pipe, nohup, a batch job). False / 'off': nothing. 'bar' and
    'lines' force one.
    """
    if progress is False or progress is None or progress == "off":
        return "off"
    if progress in ("bar", "lines"):
        return progress
    if progress is True or progress == "auto":
        if "ipykernel" in sys.modules:
            return "bar"
        try:
            return "bar" if sys.stdout.isatty() and sys.stderr.isatty() else "lines"
        except (AttributeError, ValueError):  # a closed or replaced stream
            return "lines"
    raise ValueError(f"progress must be True, False, 'auto', 'bar', 'lines' or 'off', got {progress!r}")


class Progress:
    """Progress of a counted loop as `progress_mode` says: a tqdm bar ('bar'), a plain line on stderr at every
    tenth of the total and at the end ('lines': what a log file or a pipe gets), or nothing ('off').

        with Progress(total, "DDIM-50", progress) as bar:
            for ...: bar.update(1)
    """

    def __init__(self, total: int | None, desc: str, progress: bool | str = True, unit: str = "it"):
        self.mode, self.total, self.desc, self.unit, self.done = progress_mode(progress), total, desc, unit, 0
        self._step = max(1, (total or 0) // 10)  # an unknown total: a line at every update
        self._next = self._step
        self._bar = None
        if self.mode == "bar":
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total, desc=desc, unit=unit, leave=False)
        self._started = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "lines" and self.done >= self._next:
            while self._next <= self.done:
                self._next += self._step
            of = f"/{self.total}" if self.total else ""
            print(f"{self.desc}: {self.done}{of} {self.unit} ({time.perf_counter() - self._started:.0f} s)",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _hms(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class TrainProgress:
    """What a training loop shows while it runs (see `progress_mode`).

    bar:   a tqdm bar (refreshed at most twice a second) with the last logged loss and lr;
    lines: one plain line on stdout per log row, flushed at once, e.g.
           `step   400/1200 | loss 0.0612 | lr 2.00e-04 | 161 img/s | ETA 0:04:58`,
           plus one line per `note` (validation loss, samples, checkpoints), so a log file grows
           by a line per interval instead of a line per step;
    off:   nothing.
    """

    def __init__(self, progress: bool | str, *, total: int, initial: int = 0, desc: str = ""):
        self.mode, self.total, self.initial = progress_mode(progress), total, initial
        self.started = time.perf_counter()
        self.width = len(str(total))
        self.bar = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, mininterval=0.5,
                            smoothing=0.05)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def eta(self, step: int) -> float:
        """Seconds to `total` at the average pace of this run so far (periodic work included)."""
        done = step - self.initial
        return (time.perf_counter() - self.started) / done * (self.total - step) if done > 0 else float("nan")

    def log(self, row: dict) -> None:
        """A log row: step, loss (the interval's mean), lr, images_per_s."""
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", refresh=False)
        elif self.mode == "lines":
            eta = self.eta(row["step"])
            print(f"step {row['step']:>{self.width}}/{self.total} | loss {row['loss']:.4f} | lr {row['lr']:.2e} | "
                  f"{row['images_per_s']:,.0f} img/s | ETA {_hms(eta) if math.isfinite(eta) else '?'}", flush=True)

    def note(self, step: int, text: str) -> None:
        """An event between log rows (validation loss, a checkpoint): a line in 'lines' mode."""
        if self.mode == "lines":
            print(f"step {step:>{self.width}}/{self.total} | {text}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
