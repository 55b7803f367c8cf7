"""Datasets and data loaders: FashionMNIST, Oxford Flowers102, any image folder, numpy arrays.

Every dataset built here yields `(image, label)` pairs:

- `image`: (C, H, W) float32 in [-1, 1], C = 1 (grayscale) or 3 (RGB), H = W = `image_size`;
- `label`: int class index, or -1 when the source has no labels.

Where the data comes from (the *data root*): `DataConfig.root`, else `$DDPM_NB_DATA`, else the
checkout's `data/` (installed from a wheel: the per-user cache, `$DDPM_NB_CACHE` or
`~/.cache/ddpm_nb`); an explicit root must be an existing folder (a typo is an error, not a
fallback). With internet access FashionMNIST and Flowers102 download there by themselves.
Offline, point `DDPM_NB_DATA` at a folder that already holds them. A read-only root is only ever
read; downloads then go to the cache. Download attempts give up at once when the server (or the
HTTP proxy) cannot be reached, or when `DDPM_NB_OFFLINE=1`. With nothing at all, FashionMNIST
falls back to its test split, which ships inside the package in `ddpm_nb/assets/FashionMNIST-test/`
(MIT, Zalando SE), so it works from a clone, a wheel and Colab alike.

Explained in notebooks/03_training.
"""
from __future__ import annotations

import copy
import gzip
import multiprocessing
import os
import random
import shutil
import socket
import sys
import threading
import urllib.error
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlparse

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from typing import TYPE_CHECKING

from .utils import ConfigError, cache_dir, data_root, display_path, repo_root

if TYPE_CHECKING:  # data sits below config (config's validation reads DATASETS), so only for annotations
    from .config import DataConfig

__all__ = [
    "DATASETS",
    "DatasetSpec",
    "class_names",
    "TrainBatches",
    "DatasetNotFoundError",
    "BundledDataWarning",
    "UnreadableImageWarning",
    "ImageTransform",
    "build_transform",
    "load_dataset",
    "dataset_channels",
    "dataset_num_classes",
    "train_val_datasets",
    "make_loader",
    "infinite_batches",
    "default_num_workers",
    "real_images",
    "cache_dir",
    "flowers_on_disk",
]

SPLITS = ("train", "test", "val", "all")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# FashionMNIST: IDX files as published by Zalando (torchvision reads the same names).
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_PARTS = {"train": ("train",), "test": ("test",), "all": ("train", "test")}
FASHION_BUNDLED = "FashionMNIST-test"  # folder with the two t10k .gz files (package data, see BUNDLED_DIR)
BUNDLED_DIR = Path(__file__).resolve().parent / "assets" / FASHION_BUNDLED
FLOWERS_SPLIT_KEYS = {"train": "trnid", "val": "valid", "test": "tstid"}  # keys of setid.mat



def _offline_hint(holds: str) -> str:
    return (f"Connect to the internet once and it downloads by itself; or, offline, point DDPM_NB_DATA at a "
            f"folder that holds {holds} (e.g. DDPM_NB_DATA=/path/to/data), or set DataConfig.root.")


class DatasetNotFoundError(FileNotFoundError):
    """The data is neither on disk nor downloadable; the message says where we looked and what to do."""


class BundledDataWarning(UserWarning):
    """FashionMNIST fell back to the test split bundled with the package (ddpm_nb/assets/FashionMNIST-test/)."""


class UnreadableImageWarning(UserWarning):
    """Image files that cannot be decoded (empty, truncated, not an image) were skipped."""


_BAD_FILES: set[str] = set()  # unreadable images already warned about (once each)


def _reason(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:120] if lines else type(exc).__name__


def _unreadable(path: str) -> str | None:
    """Why `path` cannot be used as an image (None when it can). Cheap: the header, plus a full
    decode only for a JPEG/PNG whose end marker is missing (a truncated file)."""
    from PIL import Image

    try:
        size = os.path.getsize(path)
        if size == 0:
            return "empty file"
        with Image.open(path) as img:
            with open(path, "rb") as fh:
                fh.seek(max(0, size - 16))
                tail = fh.read()
            complete = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}.get(img.format, b"") in tail
            if not complete:
                img.load()
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return _reason(exc)
    return None


def _drop_unreadable(files: list[str], labels: list[int], where: Path) -> tuple[list[str], list[int]]:
    """Keep the decodable images; one warning names the others and their count; none left is an error."""
    bad = [(f, why) for f in files if (why := _unreadable(f))]
    if not bad:
        return files, labels
    skip = {f for f, _ in bad}
    _BAD_FILES.update(skip)
    kept = [(f, y) for f, y in zip(files, labels) if f not in skip]
    names = "; ".join(f"{os.path.relpath(f, where)} ({why})" for f, why in bad[:5])
    more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
    if not kept:
        raise DatasetNotFoundError(f"no readable images in {where}: all {len(bad)} image files failed to "
                                   f"decode: {names}{more}")
    warnings.warn(f"skipped {len(bad)} unreadable image file(s) of {len(files)} in {where}: {names}{more}",
                  UnreadableImageWarning, stacklevel=3)
    return [f for f, _ in kept], [y for _, y in kept]


# ---------------------------------------------------------------------------------------------
# Paths, permissions, network
# ---------------------------------------------------------------------------------------------
def _root(cfg: DataConfig | None) -> Path:
    """`cfg.root`, else `$DDPM_NB_DATA`, else the repository's data/ (see `_user_path` for relative paths).

    An explicit setting must name an existing folder: a typo is an error, not a silent fallback."""
    root = cfg.root if cfg is not None else None
    given = root or os.environ.get("DDPM_NB_DATA")
    if not given:
        return data_root()
    path = _user_path(given, data=False)
    what = "DataConfig.root" if root else "DDPM_NB_DATA"
    if not path.is_dir():
        raise DatasetNotFoundError(f"{what}={given!r} is {'a file' if path.exists() else 'not there'} ({path}); "
                                   f"it must be the folder that holds the datasets. Fix or unset {what}.")
    return path


def _explicit_empty_root(cfg: DataConfig, root: Path) -> bool:
    """An explicitly set data root (DataConfig.root / DDPM_NB_DATA) with nothing in it."""
    return bool(cfg.root or os.environ.get("DDPM_NB_DATA")) and root.is_dir() and not any(root.iterdir())


def _user_path(p: str | os.PathLike, *, data: bool = True) -> Path:
    """A user-given path: absolute as is; a relative one is looked up in the working directory, then
    (when `data`) in the data root, then in the checkout's root (when there is one), so a path relative
    to the repository works both from its root (CLI) and from notebooks/ (nbmake runs notebooks there)."""
    path = Path(p).expanduser()
    if path.is_absolute():
        return path
    for base in (Path.cwd(), *([data_root()] if data else []), *filter(None, [repo_root()])):
        if (base / path).exists():
            return (base / path).resolve()
    return path.resolve()


def _is_writable(path: Path) -> bool:
    """Whether we may create files under `path` (it, or its nearest existing parent, is writable)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return p.is_dir() and os.access(p, os.W_OK | os.X_OK)


_ONLINE: dict[tuple[str, int], bool] = {}


def _probe_target(url: str) -> tuple[str, int]:
    """(host, port) a download of `url` connects to first: the HTTP(S) proxy when the environment
    sets one (`https_proxy`, `http_proxy`, ... honouring `no_proxy`, as urllib does), else the server."""
    import urllib.request

    u = urlparse(url)
    host = u.hostname or ""
    proxy = urllib.request.getproxies().get(u.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        p = urlparse(proxy if "://" in proxy else "http://" + proxy)
        return p.hostname or "", p.port or (443 if p.scheme == "https" else 80)
    return host, u.port or (443 if u.scheme == "https" else 80)


def _network_available(url: str, timeout: float = 3.0) -> bool:
    """Can we open a TCP connection toward `url` within `timeout` seconds? Cached per process.

    Behind an HTTP proxy (`https_proxy` / `http_proxy`, not bypassed by `no_proxy`) it is the proxy
    that is probed, since the download goes through it. Runs in a thread so that a hanging DNS
    lookup cannot hang a notebook; `DDPM_NB_OFFLINE=1` answers False without trying.
    """
    if os.environ.get("DDPM_NB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    key = _probe_target(url)
    if key not in _ONLINE:
        ok = [False]

        def probe():
            try:
                with socket.create_connection(key, timeout=timeout):
                    ok[0] = True
            except OSError:
                pass

        t = threading.Thread(target=probe, daemon=True)
        t.start()
        t.join(timeout + 1.0)
        _ONLINE[key] = ok[0]
    return _ONLINE[key]


def _not_found(name: str, looked: list[Path], detail: str) -> DatasetNotFoundError:
    where = ", ".join(str(p) for p in dict.fromkeys(looked))
    return DatasetNotFoundError(f"{name} not found. Looked in: {where}. {detail}")


# ---------------------------------------------------------------------------------------------
# Transform
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageTransform:
    """PIL image, (H, W[, C]) numpy array or (C, H, W) tensor -> (C, H, W) float32 in [-1, 1].

    uint8 inputs are divided by 255, float inputs are taken to be in [0, 1]. PIL images of every
    mode decode correctly (see `_pil_to_tensor`: 16-bit scaled, alpha composited over white). Steps: convert to
    `channels` (1: luminance, 3: RGB; None keeps the input's), resize the shorter side to
    `image_size` (bicubic, antialias), center-crop to a square, random horizontal flip when `hflip`,
    then x -> 2x - 1.
    """

    image_size: int
    hflip: bool = False
    channels: int | None = None

    def __call__(self, img) -> torch.Tensor:
        import torchvision.transforms.functional as TF

        if isinstance(img, np.ndarray):
            x = torch.from_numpy(np.ascontiguousarray(img))
            x = x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1)  # numpy images are HWC
        elif isinstance(img, torch.Tensor):
            x = img.unsqueeze(0) if img.dim() == 2 else img
        else:  # PIL
            x = _pil_to_tensor(img, self.channels)
        if x.dim() != 3 or x.shape[0] not in (1, 3):
            raise ValueError(f"expected an image of shape (C, H, W) with C = 1 or 3, got {tuple(x.shape)}")
        x = x.float().div(255.0) if x.dtype == torch.uint8 else x.float()
        if self.channels == 3 and x.shape[0] == 1:
            x = x.expand(3, -1, -1)
        elif self.channels == 1 and x.shape[0] == 3:  # ITU-R 601 luma, as PIL's convert("L")
            x = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).unsqueeze(0)
        s = self.image_size
        if min(x.shape[-2:]) != s:
            x = TF.resize(x, [s], interpolation=TF.InterpolationMode.BICUBIC, antialias=True).clamp_(0.0, 1.0)
        if tuple(x.shape[-2:]) != (s, s):
            x = TF.center_crop(x, [s, s])
        if self.hflip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return (x * 2.0 - 1.0).contiguous()


_GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def _pil_to_tensor(img, channels: int | None) -> torch.Tensor:
    """A PIL image of any mode -> (C, H, W): uint8, or float32 in [0, 1] for 16/32-bit modes.

    16-bit images (mode I;16 / I) are divided by 65535, not clipped at 255; float images (F) are
    taken as [0, 1] when their maximum is at most 1, else [0, 255]. Transparency (RGBA, LA,
    palette with a transparent colour) is composited over a white background, the usual look of
    a cut-out or icon. CMYK, palette, YCbCr and 1-bit images are converted by PIL. `channels`
    1 or 3 converts to grayscale or RGB; None keeps grayscale images grayscale, all others RGB.
    """
    import torchvision.transforms.functional as TF
    from PIL import Image

    gray = img.mode in _GRAY_MODES
    if img.mode in _GRAY_MODES[4:]:  # high bit depth: numpy keeps the values that convert("L") would clip
        a = np.asarray(img, dtype=np.float32)
        a = a / (65535.0 if img.mode != "F" else (1.0 if a.max(initial=0.0) <= 1.0 else 255.0))
        x = torch.from_numpy(np.clip(a, 0.0, 1.0))[None]
        return x.expand(3, -1, -1) if channels == 3 else x
    if img.mode in ("RGBA", "LA", "La", "RGBa", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    mode = {1: "L", 3: "RGB"}.get(channels) or ("L" if gray else "RGB")
    return TF.pil_to_tensor(img if img.mode == mode else img.convert(mode))


def _check_size_channels(image_size, channels) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer (pixels of the square output), got {image_size!r}")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1 (grayscale), 3 (RGB) or None (follow the data), got {channels!r}")


def build_transform(image_size: int, *, hflip: bool, channels: int | None = None) -> Callable:
    """The training transform: PIL/array/tensor image -> (C, image_size, image_size) float32 in [-1, 1].

    Resize the shorter side (bicubic, antialias) and center-crop, optional random horizontal flip,
    scale [0, 1] -> [-1, 1]. `channels` converts (1 or 3); None keeps the image's own channels.
    The result is picklable (DataLoader workers).
    """
    _check_size_channels(image_size, channels)
    return ImageTransform(int(image_size), bool(hflip), channels)


# ---------------------------------------------------------------------------------------------
# Dataset classes (picklable: plain tensors, lists and a frozen-dataclass transform)
# ---------------------------------------------------------------------------------------------
class _Images(Dataset):
    """Common bits: `channels`, `source` (a description for messages), `with_transform`, `head`."""

    transform: ImageTransform
    channels: int
    source: str

    def with_transform(self, transform: ImageTransform) -> "_Images":
        """A shallow copy that applies `transform` (the data itself is shared, not copied)."""
        out = copy.copy(self)
        out.transform = transform
        return out

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({len(self)} images, {self.channels} channel(s), "
                f"{self.transform.image_size}px, hflip={self.transform.hflip}, from {self.source})")


class TensorImages(_Images):
    """Images held in memory: `images` (N, C, H, W) uint8 (0..255) or float32 (0..1), `labels` (N,) int64."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: ImageTransform, source: str):
        self.images, self.labels, self.transform, self.source = images, labels, transform, source
        self.channels = transform.channels or int(images.shape[1])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[i]), int(self.labels[i])

    def head(self, n: int) -> "TensorImages":
        out = copy.copy(self)
        out.images, out.labels = self.images[:n], self.labels[:n]
        return out


class ImageFiles(_Images):
    """Image files read lazily with PIL: `files` (paths), `labels` (ints, -1 = unlabeled)."""

    def __init__(self, files: list[str], labels: list[int], transform: ImageTransform, source: str,
                 classes: list[str] | None = None):
        self.files, self.labels, self.transform, self.source = list(files), list(labels), transform, source
        self.classes = classes
        self.channels = transform.channels or 3

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        """The i-th image; one that cannot be decoded is skipped (one warning naming it) and the next
        readable one is returned in its place, so a damaged file never stops a training run."""
        from PIL import Image

        for k in range(len(self.files)):
            j = (i + k) % len(self.files)
            try:
                with Image.open(self.files[j]) as img:
                    img.load()
                    return self.transform(img), self.labels[j]
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
                if self.files[j] not in _BAD_FILES:
                    _BAD_FILES.add(self.files[j])
                    warnings.warn(f"skipping unreadable image {self.files[j]} ({_reason(exc)}); "
                                  f"{len(_BAD_FILES)} skipped so far", UnreadableImageWarning, stacklevel=2)
        raise DatasetNotFoundError(f"none of the {len(self.files)} images of {self.source} can be decoded")

    def head(self, n: int) -> "ImageFiles":
        out = copy.copy(self)
        out.files, out.labels = self.files[:n], self.labels[:n]
        return out


# ---------------------------------------------------------------------------------------------
# FashionMNIST
# ---------------------------------------------------------------------------------------------
_IDX_CACHE: dict[tuple, np.ndarray] = {}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally .gz) of uint8 values into an array; decoded arrays are cached."""
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if key not in _IDX_CACHE:
        try:
            with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as fh:
                raw = fh.read()
            ndim = raw[3]
            dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
            if raw[:3] != b"\x00\x00\x08" or len(raw) != 4 + 4 * ndim + int(np.prod(dims)):
                raise ValueError("bad header or length")
        except (OSError, EOFError, ValueError, IndexError) as exc:
            raise DatasetNotFoundError(f"{path} is not a valid FashionMNIST IDX file ({exc}); delete it and "
                                       "download again, or copy the original .gz files there") from None
        if len(_IDX_CACHE) >= 8:
            _IDX_CACHE.pop(next(iter(_IDX_CACHE)))
        _IDX_CACHE[key] = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)
    return _IDX_CACHE[key]


def _find_idx_pair(dirs: list[Path], part: str) -> tuple[Path, Path] | None:
    """The first folder in `dirs` holding both the images and labels file of `part` (.gz or unpacked)."""
    for d in dirs:
        found = []
        for name in FASHION_FILES[part]:
            hits = [d / n for n in (name, name + ".gz") if (d / n).is_file()]
            if not hits:
                break
            found.append(hits[0])
        else:
            return found[0], found[1]
    return None


def _fashion_dirs(root: Path) -> list[Path]:
    """Where the full FashionMNIST may be: torchvision's layout under the root, the root itself, the cache."""
    return [root / "FashionMNIST" / "raw", root / "FashionMNIST", root, cache_dir() / "FashionMNIST" / "raw"]


def _bundled_dirs(root: Path) -> list[Path]:
    """Where the bundled test split may be: a copy under the data root, else the package's own
    (`ddpm_nb/assets/`, in a checkout and in the wheel alike), always the last resort."""
    return [root / FASHION_BUNDLED, BUNDLED_DIR]


def _download_fashion(root: Path, sources: list[Path]) -> Path:
    """Download FashionMNIST with torchvision; returns the raw folder that now holds it.

    Goes to `root` when writable, else to the cache. Any .gz already present in `sources` is
    symlinked in first, so torchvision only checks its md5 and unpacks it (no network, and no
    write into a read-only source). Raises OSError when offline or the download fails.
    """
    from torchvision.datasets import FashionMNIST

    if not _network_available(FashionMNIST.mirrors[0]):
        raise OSError("no network connection to " + urlparse(FashionMNIST.mirrors[0]).hostname)
    base = root if _is_writable(root) else cache_dir()
    raw = base / "FashionMNIST" / "raw"
    created = [d for d in (raw, raw.parent) if not d.exists()]
    raw.mkdir(parents=True, exist_ok=True)
    for src in sources:
        for gz in src.glob("*-ubyte.gz") if src.is_dir() and src.resolve() != raw.resolve() else ():
            if not (raw / gz.name).exists():
                try:
                    (raw / gz.name).symlink_to(gz.resolve())
                except OSError:  # no symlinks (Windows without developer mode): copy instead
                    shutil.copyfile(gz, raw / gz.name)
    try:
        FashionMNIST(str(base), train=True, download=True)
    except (urllib.error.URLError, OSError, RuntimeError) as exc:
        for d in created:  # leave no empty folders behind
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        raise OSError(f"download into {raw} failed: {str(exc).strip().splitlines()[0]}") from exc
    return raw


_NOTIFIED: set[tuple[str, str]] = set()


def _fashion_mnist(root: Path, split: str, transform: ImageTransform, *, explicit_empty: bool = False) -> TensorImages:
    if split == "val":
        raise ValueError("FashionMNIST has no 'val' split: use split='train', 'test' or 'all' (train+test); "
                         "for validation set DataConfig.val_split='test' or hold out val_fraction of train")
    dirs = _fashion_dirs(root)
    pairs = {part: _find_idx_pair(dirs, part) for part in FASHION_PARTS[split]}
    if pairs.get("test") is None and "test" in pairs:  # the test split ships with the repository
        pairs["test"] = _find_idx_pair(_bundled_dirs(root), "test")
    if any(p is None for p in pairs.values()):
        try:
            raw = _download_fashion(root, dirs[:3])
            pairs = {part: _find_idx_pair([raw], part) for part in FASHION_PARTS[split]}
            if any(p is None for p in pairs.values()):
                raise OSError(f"the download left no complete FashionMNIST files in {raw}")
        except OSError as exc:
            reason = str(exc)
            bundled = _find_idx_pair(_bundled_dirs(root), "test")
            if explicit_empty:  # the user pointed us at a folder, and it is empty: say so, no fallback
                raise _not_found("FashionMNIST", dirs, f"The data root {root} was set explicitly (DataConfig.root or "
                                 f"DDPM_NB_DATA) but is empty, and the download failed ({reason}). "
                                 + _offline_hint("FashionMNIST/raw/*.gz"))
            if bundled is None:
                raise _not_found(
                    "FashionMNIST", dirs + _bundled_dirs(root),
                    f"Could not download it ({reason}). With internet access it downloads by itself "
                    f"(~30 MB, torchvision). " + _offline_hint("FashionMNIST/raw/*.gz")) from None
            if (str(root), split) not in _NOTIFIED:  # one notice per root and split, not one per call
                _NOTIFIED.add((str(root), split))
                warnings.warn(
                    f"FashionMNIST {split!r} split not found under {display_path(root)} and not downloadable "
                    f"({reason}); using the 10,000-image test split bundled in {display_path(bundled[0].parent)} "
                    f"instead. For the full 70,000 "
                    f"images connect to the internet once (it downloads by itself), or set DDPM_NB_DATA to a "
                    f"folder with FashionMNIST/raw/*.gz.", BundledDataWarning, stacklevel=3)
            pairs = {"test": bundled}
    where = ", ".join(dict.fromkeys(display_path(p[0].parent) for p in pairs.values()))
    source = f"FashionMNIST {'/'.join(pairs)} split in {where}"
    images = np.concatenate([read_idx(p[0]) for p in pairs.values()])
    labels = np.concatenate([read_idx(p[1]) for p in pairs.values()])
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise DatasetNotFoundError(f"FashionMNIST files {list(pairs.values())} have unexpected shapes "
                                   f"{images.shape} / {labels.shape}; replace them with the original .gz files")
    return TensorImages(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)),
                        transform, source)


# ---------------------------------------------------------------------------------------------
# Oxford Flowers102
# ---------------------------------------------------------------------------------------------
def _flowers_dirs(root: Path) -> list[Path]:
    """torchvision's layout `<root>/flowers-102/`, the course's `<root>/flowers/flowers-102/`, the cache."""
    return [root / "flowers-102", root / "flowers" / "flowers-102", cache_dir() / "flowers-102"]


def _flowers_ok(d: Path) -> bool:
    return (d / "setid.mat").is_file() and (d / "imagelabels.mat").is_file() and (d / "jpg").is_dir()


def flowers_on_disk(cfg: DataConfig | None = None) -> bool:
    """True when Flowers102's files are already on disk (nothing to download), where `cfg` would look
    (`cfg.root`, `$DDPM_NB_DATA`, the data folder, the cache). Notebooks 01 and 03 use it to pick the real
    flowers when they are there and FashionMNIST elsewhere."""
    return any(_flowers_ok(d) for d in _flowers_dirs(_root(cfg)))


def _flowers102(root: Path, split: str, transform: ImageTransform) -> ImageFiles:
    dirs = _flowers_dirs(root)
    folder = next((d for d in dirs if _flowers_ok(d)), None)
    if folder is None:
        from torchvision.datasets import Flowers102

        base = root if _is_writable(root) else cache_dir()
        try:
            if not _network_available(Flowers102._download_url_prefix):
                raise OSError("no network connection to " + urlparse(Flowers102._download_url_prefix).hostname)
            Flowers102(str(base), split="train", download=True)
            folder = base / "flowers-102"
        except (urllib.error.URLError, OSError, RuntimeError) as exc:
            raise _not_found(
                "Oxford Flowers102", dirs,
                f"Could not download it ({str(exc).strip().splitlines()[0]}). With internet access it downloads "
                f"by itself (~330 MB, torchvision). " +
                _offline_hint("flowers-102/ or flowers/flowers-102/ (setid.mat, imagelabels.mat, jpg/)")) from None
    try:
        from scipy.io import loadmat
    except ImportError as exc:  # pragma: no cover - scipy is a dependency
        raise ImportError("Flowers102 needs scipy to read its .mat files: pip install scipy") from exc
    set_ids = loadmat(folder / "setid.mat", squeeze_me=True)
    labels = loadmat(folder / "imagelabels.mat", squeeze_me=True)["labels"].astype(np.int64) - 1
    parts = ("train", "val", "test") if split == "all" else (split,)
    ids = [int(i) for part in parts for i in np.atleast_1d(set_ids[FLOWERS_SPLIT_KEYS[part]])]
    files = [str(folder / "jpg" / f"image_{i:05d}.jpg") for i in ids]
    return ImageFiles(files, [int(labels[i - 1]) for i in ids], transform,
                      f"Flowers102 '{split}' split in {display_path(folder)}")


# ---------------------------------------------------------------------------------------------
# Image folders and numpy arrays
# ---------------------------------------------------------------------------------------------
_SPLIT_DIRS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}


def _source_path(cfg: DataConfig) -> Path:
    path = _user_path(cfg.path)
    if not path.exists():
        kind = "image folder" if cfg.dataset == "imagefolder" else "numpy image arrays"
        raise _not_found(f"{kind} {cfg.path!r} (DataConfig.path)", [path, data_root() / cfg.path],
                         "Give an absolute path, or one relative to the working directory, to the data root "
                         "($DDPM_NB_DATA or the repository's data/) or to the repository.")
    return path


def _split_folders(path: Path, split: str) -> list[Path] | None:
    """For a `path/{train,val,test}/<class>/...` layout: the folders of `split`; None when flat."""
    subdirs = {p.name: p for p in path.iterdir() if p.is_dir()}
    known = {n for names in _SPLIT_DIRS.values() for n in names}
    if "train" not in subdirs or not set(subdirs) <= known:
        return None
    parts = ("train", "val", "test") if split == "all" else (split,)
    out = [subdirs[n] for part in parts for n in _SPLIT_DIRS[part] if n in subdirs]
    if not out:
        raise ValueError(f"{path} has no {split!r} folder (it has {', '.join(sorted(subdirs))})")
    return out


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not p.name.startswith(".")


def _scan_image_folder(path: Path, split: str) -> tuple[list[str], list[int], list[str] | None]:
    """Files, labels (index into the sorted class folders, -1 for a flat folder) and class names."""
    folders = _split_folders(path, split)
    if folders is None:
        if split not in ("train", "all"):
            raise ValueError(f"image folder {path} has no {split!r} split (no train/val/test subfolders): use "
                             "split='train' or 'all' (the whole folder) and hold out val_fraction for validation")
        folders = [path]
    classes = sorted({c.name for f in folders for c in f.iterdir()
                      if c.is_dir() and any(_is_image(p) for p in c.rglob("*"))})
    files, labels = [], []
    for f in folders:
        if classes:
            for i, c in enumerate(classes):
                hits = sorted(str(p) for p in (f / c).rglob("*") if _is_image(p)) if (f / c).is_dir() else []
                files += hits
                labels += [i] * len(hits)
        else:
            hits = sorted(str(p) for p in f.iterdir() if _is_image(p))
            files += hits
            labels += [-1] * len(hits)
    if not files:
        raise _not_found(f"images ({', '.join(IMAGE_EXTENSIONS)})", folders,
                         "An image folder holds <path>/<class name>/<image files> (or the images directly).")
    return files, labels, classes or None


_IMAGE_KEYS = ("images", "image", "x", "data", "arr_0")
_LABEL_KEYS = ("labels", "label", "y", "targets")


def _npy_files(path: Path) -> list[Path]:
    files = [path] if path.is_file() else sorted(p for p in path.iterdir()
                                                 if p.suffix in (".npy", ".npz") and not p.name.startswith("."))
    if not files:
        raise _not_found("numpy image arrays (.npy/.npz)", [path], "Save arrays of shape (N, H, W), "
                         "(N, H, W, C) or (N, C, H, W) with np.save / np.savez there.")
    return files


def _decode_packed_jpegs(data: np.ndarray, offsets: np.ndarray, size: int | None, name: str) -> np.ndarray:
    """Packed JPEG bytes (image i is data[offsets[i]:offsets[i + 1]]) -> (N, S, S, 3) uint8 RGB.

    Each image is center-cropped to a square and, when `size` is given and differs, resized to
    size x size (bicubic), so the images stack. S = size, or the first image's shorter side.
    """
    import io

    from PIL import Image

    offsets = np.asarray(offsets, np.int64).reshape(-1)
    if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != data.size or np.any(np.diff(offsets) <= 0):
        raise ValueError(f"{name}: 'offsets' must rise from 0 to the length of 'jpeg' ({data.size} bytes)")
    out = None
    raw = np.ascontiguousarray(data, np.uint8).tobytes()
    for i in range(len(offsets) - 1):
        with Image.open(io.BytesIO(raw[offsets[i]:offsets[i + 1]])) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = min(w, h)
            im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
            size = size or s
            if s != size:
                im = im.resize((size, size), Image.BICUBIC)
            if out is None:
                out = np.empty((len(offsets) - 1, size, size, 3), np.uint8)
            out[i] = np.asarray(im)
    return out


def _load_array_file(f: Path) -> tuple[np.ndarray, np.ndarray | None]:
    if f.suffix == ".npy":
        return np.load(f, allow_pickle=False), None
    with np.load(f, allow_pickle=False) as z:
        keys = list(z.keys())
        if "jpeg" in keys and "offsets" in keys:  # JPEG files packed into one .npz (benchmarks/pack_flowers.py)
            lab_key = next((k for k in _LABEL_KEYS if k in keys), None)
            size = int(z["image_size"]) if "image_size" in keys else None
            return (_decode_packed_jpegs(z["jpeg"], z["offsets"], size, str(f)),
                    (z[lab_key] if lab_key else None))
        img_key = next((k for k in _IMAGE_KEYS if k in keys), keys[0] if len(keys) == 1 else None)
        if img_key is None:
            raise ValueError(f"{f}: cannot tell which array holds the images (keys {keys}); name it 'images'")
        lab_key = next((k for k in _LABEL_KEYS if k in keys), None)
        return z[img_key], (z[lab_key] if lab_key else None)


def _to_nchw(a: np.ndarray, name: str) -> np.ndarray:
    """(N, H, W), (N, H, W, C) or (N, C, H, W) with C in {1, 3} -> (N, C, H, W)."""
    if a.ndim == 3:
        return a[:, None]
    if a.ndim == 4:
        if a.shape[-1] in (1, 3):  # channels-last is numpy's convention, so it wins ties
            return a.transpose(0, 3, 1, 2)
        if a.shape[1] in (1, 3):
            return a
    raise ValueError(f"{name}: images must have shape (N, H, W), (N, H, W, C) or (N, C, H, W) with C = 1 or 3, "
                     f"got {a.shape}")


def _labels_from_npz_only(files: list[Path]) -> np.ndarray | None:
    labels = []
    for f in files:
        if f.suffix != ".npz":
            return None
        with np.load(f, allow_pickle=False) as z:
            key = next((k for k in _LABEL_KEYS if k in z.keys()), None)
            if key is None:
                return None
            labels.append(z[key].reshape(-1))
    return np.concatenate(labels)


def _numpy_arrays(path: Path, split: str, transform: ImageTransform,
                  value_range: tuple[float, float] | None = None) -> TensorImages:
    """Images from .npy/.npz files. The value rule is explicit: uint8 arrays are 0..255; float
    arrays must already lie in [0, 1] or in [-1, 1] (all files together decide which); anything
    else is an error naming the file and its range, unless `value_range` (DataConfig.value_range,
    e.g. (0, 255)) says what the stored values span. Nothing is ever silently clipped."""
    if split not in ("train", "all"):
        raise ValueError(f"numpy arrays at {path} have no {split!r} split: use split='train' or 'all' and "
                         "hold out val_fraction for validation")
    arrays, labels, ranges = [], [], []
    for f in _npy_files(path):
        a, y = _load_array_file(f)
        a = _to_nchw(a, str(f))
        if not (a.dtype == np.uint8 or np.issubdtype(a.dtype, np.floating) or
                (value_range and np.issubdtype(a.dtype, np.integer))):
            raise ValueError(f"{f}: images must be uint8 (0..255) or float, got dtype {a.dtype} (for other "
                             "integer types set data.value_range, e.g. [0, 65535])")
        if arrays and a.shape[1:] != arrays[0].shape[1:]:
            raise ValueError(f"{f}: images of shape {a.shape[1:]} (C, H, W) do not match the first file's "
                             f"{arrays[0].shape[1:]}")
        if y is not None and len(y.reshape(-1)) != len(a):
            raise ValueError(f"{f}: {len(y.reshape(-1))} labels for {len(a)} images")
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if not np.isfinite([lo, hi]).all():
            raise ValueError(f"{f}: the image array contains NaN or inf")
        arrays.append(a)
        ranges.append((f, lo, hi))
        labels.append(None if y is None else y.reshape(-1).astype(np.int64))
    x = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
    if value_range is not None:
        low, high = map(float, value_range)
        tol = 1e-6 * (high - low)  # float32 arrays: 1.2 is stored as 1.2000000477
        outside = [(f, lo, hi) for f, lo, hi in ranges if lo < low - tol or hi > high + tol]
    elif x.dtype == np.uint8:
        low, high, outside = 0.0, 255.0, []
    else:
        negative = any(lo < 0 for _, lo, _ in ranges)
        low, high = (-1.0, 1.0) if negative else (0.0, 1.0)
        outside = [(f, lo, hi) for f, lo, hi in ranges if lo < low or hi > high]
    if outside:
        f, lo, hi = outside[0]
        allowed = f"data.value_range [{low:g}, {high:g}]" if value_range is not None else "[0, 1] or [-1, 1]"
        raise ValueError(f"{f}: values span [{lo:g}, {hi:g}], outside {allowed}. Rescale the arrays, save "
                         "them as uint8 (0..255), or set data.value_range to the range they use (e.g. [0, 255])")
    if x.dtype == np.uint8 and value_range is None:
        images = torch.from_numpy(np.ascontiguousarray(x))
    else:  # -> float32 in [0, 1]
        images = torch.from_numpy(np.clip((x.astype(np.float32) - low) / (high - low), 0.0, 1.0))
    y = (np.concatenate(labels) if all(v is not None for v in labels)
         else np.full(len(x), -1, np.int64))
    return TensorImages(images, torch.from_numpy(y), transform, f"numpy arrays in {path}")


# ---------------------------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------------------------
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"  # torchvision's checksum of the archive
CIFAR10_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def _cifar10_dirs(root: Path) -> list[Path]:
    """torchvision's layout `<root>/cifar-10-batches-py/`, and the cache."""
    return [root / "cifar-10-batches-py", cache_dir() / "cifar-10-batches-py"]


def _cifar10(cfg: DataConfig, split: str, transform: ImageTransform) -> TensorImages:
    """CIFAR-10's python batches (50,000 train + 10,000 test, 32 px RGB, 10 classes): read from disk, downloaded
    (170 MB, once) when online, else a one-line error that names DDPM_NB_DATA."""
    import pickle

    if split == "val":
        raise ValueError("CIFAR-10 has no 'val' split: use split='train', 'test' or 'all'; for validation set "
                         "DataConfig.val_split='test' or hold out val_fraction of train")
    root = _root(cfg)
    names = [f for part in (("train", "test") if split == "all" else (split,)) for f in CIFAR10_FILES[part]]
    folder = next((d for d in _cifar10_dirs(root) if all((d / f).is_file() for f in names)), None)
    if folder is None:
        from torchvision.datasets.utils import download_and_extract_archive

        base = root if _is_writable(root) else cache_dir()
        try:
            if not _network_available(CIFAR10_URL):
                raise OSError("no network connection to " + urlparse(CIFAR10_URL).hostname)
            download_and_extract_archive(CIFAR10_URL, str(base), md5=CIFAR10_MD5)
            folder = base / "cifar-10-batches-py"
        except (urllib.error.URLError, OSError, RuntimeError) as exc:
            raise _not_found("CIFAR-10", _cifar10_dirs(root),
                             f"Could not download it ({str(exc).strip().splitlines()[0]}). With internet access it "
                             f"downloads by itself (~170 MB). " +
                             _offline_hint("cifar-10-batches-py/ (data_batch_1..5, test_batch)")) from None
    images, labels = [], []
    for name in names:
        with open(folder / name, "rb") as fh:
            batch = pickle.load(fh, encoding="bytes")
        images.append(np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[b"labels"], np.int64))
    return TensorImages(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)),
                        transform, f"CIFAR-10 {split!r} split in {display_path(folder)}")


# ---------------------------------------------------------------------------------------------
# The registry: every dataset the package knows, in one place
# ---------------------------------------------------------------------------------------------
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# the 102 category names of Oxford Flowers102 (Nilsback & Zisserman 2008), in label order 0..101
FLOWERS102_CLASSES = tuple((Path(__file__).resolve().parent / "assets" / "flowers102_classes.txt")
                           .read_text().splitlines())


@dataclass(frozen=True)
class DatasetSpec:
    """What the package knows about a dataset before reading a file of it."""

    loader: Callable  # (DataConfig, split, ImageTransform) -> Dataset of (image (C, S, S) in [-1, 1], label)
    channels: int | None  # 1 or 3; None = whatever the files hold ('npy')
    image_size: int | None  # native height = width in px; None = varies
    num_classes: int | None  # None = read from the files (class folders, .npz labels)
    class_names: tuple[str, ...] | None
    value_range: str  # what the stored values are, before they are mapped to [-1, 1]
    source: str  # where it comes from, and what happens offline
    needs_path: bool = False  # DataConfig.path names the files


DATASETS: dict[str, DatasetSpec] = {
    "fashion-mnist": DatasetSpec(
        loader=lambda cfg, split, tf: _fashion_mnist(_root(cfg), split, tf,
                                                     explicit_empty=_explicit_empty_root(cfg, _root(cfg))),
        channels=1, image_size=28, num_classes=10, class_names=FASHION_MNIST_CLASSES, value_range="uint8 0..255",
        source="torchvision's download (30 MB); offline, its test split bundled with the package"),
    "flowers102": DatasetSpec(
        loader=lambda cfg, split, tf: _flowers102(_root(cfg), split, tf),
        channels=3, image_size=None, num_classes=102, class_names=FLOWERS102_CLASSES, value_range="JPEG, 8 bit",
        source="torchvision's download (330 MB); offline, a one-line error naming DDPM_NB_DATA"),
    "cifar10": DatasetSpec(
        loader=_cifar10, channels=3, image_size=32, num_classes=10, class_names=CIFAR10_CLASSES,
        value_range="uint8 0..255", source="the authors' archive (170 MB); offline, a one-line error naming "
                                           "DDPM_NB_DATA"),
    "imagefolder": DatasetSpec(
        loader=lambda cfg, split, tf: _image_folder(_source_path(cfg), split, tf),
        channels=3, image_size=None, num_classes=None, class_names=None, value_range="any image file, 8 bit",
        source="DataConfig.path: a folder (class subfolders optional, train/val/test optional)", needs_path=True),
    "npy": DatasetSpec(
        loader=lambda cfg, split, tf: _numpy_arrays(_source_path(cfg), split, tf, cfg.value_range),
        channels=None, image_size=None, num_classes=None, class_names=None,
        value_range="uint8 0..255, floats in [0, 1] or [-1, 1], or DataConfig.value_range",
        source="DataConfig.path: a .npy/.npz file or a folder of them", needs_path=True),
}


def _image_folder(path: Path, split: str, transform: ImageTransform) -> ImageFiles:
    if not path.is_dir():
        raise ValueError(f"DataConfig.path={str(path)!r} must be a folder for dataset 'imagefolder'")
    files, labels, classes = _scan_image_folder(path, split)
    files, labels = _drop_unreadable(files, labels, path)
    return ImageFiles(files, labels, transform, f"image folder {path} ({split!r})", classes)


def class_names(dataset: str) -> tuple[str, ...] | None:
    """The class names of a registered dataset, in label order (None when the files decide)."""
    return DATASETS[dataset].class_names


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------
def load_dataset(cfg: DataConfig, image_size: int, *, split: str | None = None, train: bool = True,
                 channels: int | None = None) -> Dataset:
    """The dataset `cfg` describes; items are (image (C, S, S) float32 in [-1, 1], label int).

    `S = image_size`. `split` overrides `cfg.split` ('train', 'test', 'val', 'all'); `train=False`
    turns random flips off (validation, reference images); `cfg.limit` keeps the first N items.
    `channels` converts to 1 or 3 channels; by default channels follow the dataset's spec in `DATASETS`
    (1 for FashionMNIST, 3 for Flowers102, CIFAR-10 and image folders, whatever the arrays hold for 'npy').
    label is -1 when the source has none.
    """
    split = split or cfg.split
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    _check_size_channels(image_size, channels)
    spec = DATASETS[cfg.dataset]  # a DataConfig names a registered dataset (checked at construction)
    transform = ImageTransform(int(image_size), bool(cfg.hflip and train), channels or spec.channels)
    ds = spec.loader(cfg, split, transform)
    return ds.head(cfg.limit) if cfg.limit else ds


def dataset_channels(ds: Dataset) -> int:
    """Channels of the images `ds` yields: 1 or 3 (looks through Subset and ConcatDataset)."""
    inner = ds
    while isinstance(inner, (Subset, ConcatDataset)):
        inner = inner.dataset if isinstance(inner, Subset) else inner.datasets[0]
    c = getattr(inner, "channels", None)
    if c is None:
        c = int(ds[0][0].shape[0])
    if c not in (1, 3):
        raise ValueError(f"dataset yields {c}-channel images; expected 1 or 3")
    return int(c)


def dataset_num_classes(cfg: DataConfig) -> int | None:
    """The spec's number of classes (10 for FashionMNIST and CIFAR-10, 102 for Flowers102); else read from
    the files: the number of class folders for 'imagefolder' (None for a flat folder), 1 + the largest label
    for 'npy' .npz files with labels, else None."""
    if DATASETS[cfg.dataset].num_classes is not None:
        return DATASETS[cfg.dataset].num_classes
    path = _source_path(cfg)
    if cfg.dataset == "imagefolder":
        return len(_scan_image_folder(path, "all")[2] or []) or None
    labels = _labels_from_npz_only(_npy_files(path))
    return int(labels.max()) + 1 if labels is not None and len(labels) and labels.max() >= 0 else None


def train_val_datasets(cfg: DataConfig, image_size: int, *, channels: int | None = None,
                       seed: int = 0) -> tuple[Dataset, Dataset]:
    """(train, validation) datasets; validation never flips.

    With `cfg.val_split` (e.g. 'test') validation is that split. Otherwise a fixed
    `cfg.val_fraction` of the training split is held out: `torch.randperm` seeded with `seed`
    picks it, and the training part does not contain those items (val_fraction=0 gives an empty
    validation set). Explained in notebooks/03_training.
    """
    train = load_dataset(cfg, image_size, train=True, channels=channels)
    if cfg.val_split:
        val = load_dataset(cfg, image_size, split=cfg.val_split, train=False, channels=channels)
        if cfg.val_split != cfg.split and train.source == val.source:
            warnings.warn(f"validation ({cfg.val_split!r}) is the same data as training ({train.source}); "
                          "the validation loss will not measure generalisation", BundledDataWarning, stacklevel=2)
        return train, val
    n = len(train)
    n_val = round(n * cfg.val_fraction)
    if cfg.val_fraction > 0 and not 1 <= n_val < n:
        n_val = 1 if n > 1 else 0
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = sorted(perm[:n_val].tolist()), sorted(perm[n_val:].tolist())
    evaluation = train.with_transform(replace(train.transform, hflip=False))
    return Subset(train, train_idx), Subset(evaluation, val_idx)


def default_num_workers() -> int:
    """DataLoader workers that never hang: 0 in Jupyter/IPython, under pytest, when $CI is set or
    without fork (Windows); else min(8, usable CPUs)."""
    ipython = sys.modules.get("IPython")
    if "ipykernel" in sys.modules or (ipython is not None and getattr(ipython, "get_ipython", lambda: None)()):
        return 0
    if "pytest" in sys.modules or "PYTEST_CURRENT_TEST" in os.environ:
        return 0
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        return 0
    if "fork" not in multiprocessing.get_all_start_methods():
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(8, cpus)


def _seed_worker(worker_id: int) -> None:
    """Give Python's and NumPy's RNGs in each worker the seed torch already gave it."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def make_loader(ds: Dataset, batch_size: int, *, shuffle: bool, num_workers: int | None = None,
                drop_last: bool = True, sampler=None, generator: torch.Generator | None = None,
                seed: int = 0) -> DataLoader:
    """A DataLoader yielding (images (B, C, H, W) in [-1, 1], labels (B,) int64).

    `num_workers=None` uses `default_num_workers()`. Shuffling is reproducible: without a
    `generator` one seeded with `seed` is used. A `sampler` (e.g. DistributedSampler) replaces
    shuffling. pin_memory when CUDA is available; workers persist between epochs, so re-iterating
    (see `infinite_batches`) is cheap. Explained in notebooks/03_training.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(sampler) if sampler is not None and hasattr(sampler, "__len__") else len(ds)
    if n == 0:
        raise ValueError("the dataset is empty: nothing to load (check DataConfig.limit / val_fraction)")
    if drop_last and n < batch_size:
        raise ValueError(f"only {n} images for batch_size={batch_size} with drop_last=True: the loader would "
                         "yield no batch at all. Use a smaller batch_size, more data or drop_last=False.")
    workers = default_num_workers() if num_workers is None else int(num_workers)
    if sampler is not None:
        shuffle = False
    if shuffle and generator is None:
        generator = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, sampler=sampler, num_workers=workers,
                      drop_last=drop_last, pin_memory=torch.cuda.is_available(), generator=generator,
                      persistent_workers=workers > 0, worker_init_fn=_seed_worker if workers > 0 else None)


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


IN_MEMORY_LIMIT = 2 * 1024 ** 3  # bytes of float32 images that `materialize` may hold


def materialize(ds: Dataset, *, progress: bool = False) -> Dataset:
    """Decode and resize every image once into a float32 TensorDataset (deterministic transforms only:
    the trainer does the random flips itself). Skipped, returning `ds`, when it would exceed
    IN_MEMORY_LIMIT. Saves JPEG decoding and resizing on every epoch, which otherwise starves a GPU."""
    from torch.utils.data import TensorDataset
    from tqdm.auto import tqdm

    if isinstance(ds, TensorDataset) or len(ds) == 0:
        return ds
    x0, _ = ds[0]
    if len(ds) * x0.numel() * 4 > IN_MEMORY_LIMIT:
        return ds
    loader = make_loader(ds, 256, shuffle=False, drop_last=False, num_workers=default_num_workers())
    xs, ys = [], []
    for x, y in tqdm(loader, desc="caching images in memory", disable=not progress, leave=False):
        xs.append(x.float())
        ys.append(torch.as_tensor(y).long())
    out = TensorDataset(torch.cat(xs), torch.cat(ys))
    out.channels = int(x0.shape[0])
    return out


class TrainBatches:
    """The training batch stream: endless micro-batches (images, labels) of one rank, starting at micro-batch
    `start`, identical across resumes (each epoch's order is `EpochSampler`'s, a pure function of the seed and
    the epoch). Datasets held in memory (`materialize`) are indexed directly, on `device` when it is a GPU;
    others go through a DataLoader with `num_workers`.
    """

    def __init__(self, ds: Dataset, micro_batch: int, *, seed: int, rank: int = 0, world: int = 1,
                 device: torch.device | str = "cpu", num_workers: int | None = None):
        self.ds, self.micro_batch, self.seed, self.rank, self.world = ds, micro_batch, seed, rank, world
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.per_epoch = EpochSampler(len(ds), seed=seed, epoch=0, micro_batch=micro_batch, world=world).batches
        self._tensors = None
        if isinstance(ds, torch.utils.data.TensorDataset):
            images, labels = ds.tensors[:2]
            if torch.device(device).type == "cuda":
                images, labels = images.to(device), labels.to(device)
            self._tensors = (images, labels)

    def stream(self, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Micro-batches from number `start` (counted from the first of epoch 0) on, forever."""
        seen = start
        while True:
            epoch, skip = divmod(seen, self.per_epoch)
            sampler = EpochSampler(len(self.ds), seed=self.seed, epoch=epoch, micro_batch=self.micro_batch,
                                   rank=self.rank, world=self.world, skip_batches=skip)
            if self._tensors is not None:
                images, labels = self._tensors
                # the epoch's order goes to the device once, not one pageable copy per micro-batch
                order = torch.tensor(list(sampler), dtype=torch.long).to(images.device)
                for i in range(0, len(order) - self.micro_batch + 1, self.micro_batch):
                    idx = order[i:i + self.micro_batch]
                    yield images[idx], labels[idx]
            else:
                # an explicit generator keeps the loader from drawing on the global RNG (dropout's)
                loader = make_loader(self.ds, self.micro_batch, shuffle=False, num_workers=self.num_workers,
                                     drop_last=True, sampler=sampler,
                                     generator=torch.Generator().manual_seed(self.seed + epoch))
                yield from loader
            seen = (epoch + 1) * self.per_epoch


def infinite_batches(loader: DataLoader) -> Iterator:
    """Iterate over `loader` forever, calling `sampler.set_epoch(epoch)` when the sampler has it."""
    epoch = 0
    while True:
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def real_images(cfg: DataConfig, image_size: int, n: int, *, split: str = "test", seed: int = 0,
                channels: int | None = None) -> torch.Tensor:
    """`n` real images (n, C, S, S) in [-1, 1], a fixed random choice (`seed`) from `split`, no flips.

    For figures and FID reference sets. Image folders and arrays without splits use all images.
    """
    if cfg.dataset in ("imagefolder", "npy") and split != "train":
        path = _source_path(cfg)
        if cfg.dataset == "npy" or _split_folders(path, "train") is None:
            split = "all"
    ds = load_dataset(cfg, image_size, split=split, train=False, channels=channels)
    if not 1 <= n <= len(ds):
        raise ValueError(f"n must be between 1 and the {len(ds)} images of {ds.source}, got {n}")
    from tqdm.auto import tqdm

    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    return torch.stack([ds[i][0] for i in tqdm(idx, desc="real images", leave=False, disable=n < 2000)])
