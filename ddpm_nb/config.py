"""Configuration: dataclasses with defaults, named presets, validated at construction.

Every field carries a one-line `help` (shown by `python -m ddpm_nb train --help`).
A `RunConfig` is saved inside every checkpoint, so a run can be resumed or sampled
from without remembering its settings.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any

from .data import DATASETS
from .utils import ConfigError, check_steps

__all__ = [
    "ConfigError",
    "UNetConfig",
    "DiffusionConfig",
    "DataConfig",
    "TrainConfig",
    "RunConfig",
    "PRESETS",
    "UNET_PRESETS",
    "preset",
    "DATASETS",
    "SCHEDULES",
    "OBJECTIVES",
    "LOSS_TYPES",
]

SCHEDULES = ("linear", "cosine", "sigmoid", "quadratic")
OBJECTIVES = ("eps", "x0", "v")
FORMULATIONS = ("ddpm", "flow")
FLOW_TIMES = ("uniform", "logit-normal")
LOSS_TYPES = ("mse", "l1", "huber")
AMP_MODES = ("auto", "bf16", "fp16", "off")




def _h(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    """A dataclass field with a help string."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


def _need(ok: bool, where: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{where}: {message}")


_NONE_WORDS = ("none", "null", "off", "~", "")
_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False,
               "0": False}
_EXPECTED = {"int": "an integer", "float": "a finite number (e.g. 2e-4)", "bool": "true or false", "str": "text",
             "tuple[int, ...]": "a list of integers such as [1, 2, 2]",
             "tuple[float, ...]": "a list of numbers such as [0.9, 0.999]"}


class _Bad(Exception):
    pass


def _scalar(kind: str, v):
    """`v` (from a flag, YAML or code) as a `kind` value; _Bad when it does not convert exactly."""
    if kind == "bool":
        if isinstance(v, bool):
            return v
        if isinstance(v, (int, str)) and str(v).strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[str(v).strip().lower()]
        raise _Bad
    if kind == "str":
        if isinstance(v, bool):  # YAML reads off/on/no/yes as booleans: --train.amp off means 'off'
            return "on" if v else "off"
        if isinstance(v, (str, int, float)):
            return str(v)
        raise _Bad
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise _Bad
    try:
        x = float(v.strip()) if isinstance(v, str) else v  # any notation: 1e-4, 2E-4, 0.0002, 1_000
    except ValueError:
        raise _Bad from None
    if not math.isfinite(x):
        raise _Bad
    if kind == "float":
        return float(x)
    if isinstance(x, int):
        return x
    if isinstance(v, str) and re.fullmatch(r"\s*[+-]?\d[\d_]*\s*", v):
        return int(v)
    if float(x).is_integer():
        return int(x)
    raise _Bad


def _convert(where: str, kind: str, value):
    """`value` converted to the declared type `kind` ('int', 'float | None', 'tuple[int, ...]', ...), or
    one ConfigError naming the field, the value and the expected type."""
    optional = kind.endswith("| None")
    base = kind.replace("| None", "").strip()
    if optional and (value is None or value is False or
                     (isinstance(value, str) and value.strip().lower() in _NONE_WORDS)):
        return None
    try:
        if base.startswith("tuple"):
            elem = "float" if "float" in base else "int"
            if isinstance(value, str):
                parts = [p for p in re.split(r"[,\s]+", value.strip().strip("[]()")) if p]
            elif isinstance(value, (list, tuple)):
                parts = list(value)
            else:
                parts = [value]
            return tuple(_scalar(elem, p) for p in parts)
        return _scalar(base, value)
    except _Bad:
        expected = _EXPECTED.get(base, base) + (" or none" if optional else "")
        raise ConfigError(f"{where}: cannot use {value!r}: expected {expected}") from None


def _typed(obj) -> None:
    """Convert every field of a frozen config dataclass to its declared type (see `_convert`)."""
    for f in fields(obj):
        if isinstance(f.type, str) and f.type.replace(" | None", "") in _EXPECTED:
            object.__setattr__(obj, f.name, _convert(f"{type(obj).__name__}.{f.name}", f.type,
                                                     getattr(obj, f.name)))


class _Base:
    """Shared dict conversion for the config dataclasses."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown field(s) {sorted(unknown)}; allowed: {sorted(known)}")
        kwargs = {}
        for f in fields(cls):
            if f.name in d:
                v = d[f.name]
                if isinstance(v, list):
                    v = tuple(v)
                kwargs[f.name] = v
        return cls(**kwargs)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, kw_only=True)
class UNetConfig(_Base):
    """The noise-prediction network. Explained in notebooks/02_unet."""

    image_size: int = _h("height = width of the images, in pixels", 32)
    in_channels: int = _h("image channels: 1 (grayscale) or 3 (RGB)", 3)
    base_channels: int = _h("channels of the first level; level i has base_channels * channel_mults[i]", 64)
    channel_mults: tuple[int, ...] = _h("channel multiplier per resolution level; each level after the first "
                                        "halves H and W",
                                        (1, 2, 2, 2))
    num_res_blocks: int = _h("residual blocks per level on the way down (one more on the way up)", 2)
    attn_resolutions: tuple[int, ...] = _h("feature-map sizes (pixels) that get self-attention, e.g. (16,)", (16,))
    attn_head_channels: int = _h("channels per attention head (heads = channels // this)", 64)
    dropout: float = _h("dropout inside residual blocks", 0.1)
    num_classes: int | None = _h("number of classes for conditioning; None = unconditional "
                                 "(index num_classes is the null class used for guidance)", None)
    norm_groups: int = _h("GroupNorm groups; every channel count must be divisible by it", 32)

    def __post_init__(self):
        _typed(self)
        w = "UNetConfig"
        _need(self.in_channels in (1, 3), f"{w}.in_channels", f"must be 1 or 3, got {self.in_channels}")
        _need(self.image_size > 0, f"{w}.image_size", f"must be positive, got {self.image_size}")
        _need(self.base_channels > 0, f"{w}.base_channels", f"must be positive, got {self.base_channels}")
        _need(len(self.channel_mults) >= 1 and all(m > 0 for m in self.channel_mults),
              f"{w}.channel_mults", f"must be a non-empty tuple of positive ints, got {self.channel_mults}")
        _need(self.num_res_blocks >= 1, f"{w}.num_res_blocks", f"must be >= 1, got {self.num_res_blocks}")
        _need(0.0 <= self.dropout < 1.0, f"{w}.dropout", f"must be in [0, 1), got {self.dropout}")
        _need(self.num_classes is None or self.num_classes >= 1, f"{w}.num_classes",
              f"must be None (unconditional) or >= 1, got {self.num_classes}")
        downs = len(self.channel_mults) - 1
        factor = 2 ** downs
        if self.image_size % factor:
            fixes = [s for s in range(self.image_size, self.image_size + factor + 1) if s % factor == 0][0]
            raise ConfigError(
                f"UNetConfig.image_size={self.image_size} cannot be halved {downs} times "
                f"(channel_mults={self.channel_mults} has {len(self.channel_mults)} levels): it must be divisible "
                f"by {factor}. Resize or pad the images to {fixes}, or use fewer channel_mults levels."
            )
        sizes = [self.image_size // 2 ** i for i in range(len(self.channel_mults))]
        for r in self.attn_resolutions:
            _need(r in sizes, f"{w}.attn_resolutions",
                  f"{r} is not a feature-map size of this network; the sizes are {sizes}")
        for m in self.channel_mults:
            ch = self.base_channels * m
            _need(ch % self.norm_groups == 0, f"{w}.norm_groups",
                  f"{self.norm_groups} does not divide the channel count {ch}; choose a divisor of every "
                  f"base_channels * mult")
        _need(self.attn_head_channels > 0, f"{w}.attn_head_channels", "must be positive")

    @property
    def feature_sizes(self) -> list[int]:
        return [self.image_size // 2 ** i for i in range(len(self.channel_mults))]

    # ---- presets -------------------------------------------------------------------------
    @classmethod
    def tiny(cls, **kw) -> "UNetConfig":
        """A few thousand parameters, for CI and smoke runs (16 px)."""
        return cls(**{**dict(image_size=16, in_channels=1, base_channels=16, channel_mults=(1, 2),
                             num_res_blocks=1, attn_resolutions=(8,), attn_head_channels=16, dropout=0.0,
                             norm_groups=8), **kw})

    @classmethod
    def quick(cls, **kw) -> "UNetConfig":
        """Small enough to train on a laptop CPU in minutes (FashionMNIST at 28 px)."""
        return cls(**{**dict(image_size=28, in_channels=1, base_channels=32, channel_mults=(1, 2, 2),
                             num_res_blocks=1, attn_resolutions=(7,), attn_head_channels=32, dropout=0.0,
                             norm_groups=8), **kw})

    @classmethod
    def fashion_mnist(cls, **kw) -> "UNetConfig":
        """FashionMNIST padded/resized to 32 px, a quarter-width DDPM CIFAR-10 network."""
        return cls(**{**dict(image_size=32, in_channels=1, base_channels=64, channel_mults=(1, 2, 2, 2),
                             num_res_blocks=2, attn_resolutions=(16,), dropout=0.1), **kw})

    @classmethod
    def flowers_cpu(cls, **kw) -> "UNetConfig":
        """Flowers102 at 32 px, sized for 2 CPU cores: 2.3M parameters, class-conditional (102).

        Chosen by timing a bf16 training step (batch 64) of eight shapes on 2 cores: this one
        (4 levels 32-16-8-4, 2 blocks each, attention at 8 px) ran 98 images/s (61 on one thread),
        64 channels wide ran 55-62 and 96 wide 27; a 3-level net of the same width was 18% faster
        but its deepest features stay at 8 px, too small a receptive field for a whole flower.
        """
        return cls(**{**dict(image_size=32, in_channels=3, base_channels=32, channel_mults=(1, 2, 2, 2),
                             num_res_blocks=2, attn_resolutions=(8,), attn_head_channels=32, dropout=0.0,
                             num_classes=102, norm_groups=8), **kw})

    @classmethod
    def flowers_32(cls, **kw) -> "UNetConfig":
        """Oxford Flowers102 at 32 px."""
        return cls(**{**dict(image_size=32, in_channels=3, base_channels=96, channel_mults=(1, 2, 2, 2),
                             num_res_blocks=2, attn_resolutions=(16,), dropout=0.1), **kw})

    @classmethod
    def flowers_64(cls, **kw) -> "UNetConfig":
        """Oxford Flowers102 at 64 px."""
        return cls(**{**dict(image_size=64, in_channels=3, base_channels=64, channel_mults=(1, 2, 2, 4),
                             num_res_blocks=2, attn_resolutions=(16,), dropout=0.1), **kw})

    @classmethod
    def ddpm_cifar10(cls, **kw) -> "UNetConfig":
        """The DDPM paper's CIFAR-10 network (Ho et al. 2020, appendix B): 35.7M parameters."""
        return cls(**{**dict(image_size=32, in_channels=3, base_channels=128, channel_mults=(1, 2, 2, 2),
                             num_res_blocks=2, attn_resolutions=(16,), attn_head_channels=256, dropout=0.1),
                      **kw})


UNET_PRESETS = {
    "tiny": UNetConfig.tiny,
    "quick": UNetConfig.quick,
    "fashion-mnist": UNetConfig.fashion_mnist,
    "flowers-cpu": UNetConfig.flowers_cpu,
    "flowers-32": UNetConfig.flowers_32,
    "flowers-64": UNetConfig.flowers_64,
    "ddpm-cifar10": UNetConfig.ddpm_cifar10,
}


@dataclass(frozen=True, kw_only=True)
class DiffusionConfig(_Base):
    """The forward process and the training objective. Explained in notebooks/01 and 03."""

    timesteps: int = _h("number of diffusion steps T", 1000)
    schedule: str = _h(f"beta schedule: one of {SCHEDULES}", "linear")
    zero_terminal_snr: bool = _h("rescale the schedule so alphas_cumprod[T-1] = 0 (Lin et al. 2024); needs "
                                 "objective 'v'", False)
    objective: str = _h(f"what the network predicts: one of {OBJECTIVES}", "eps")
    loss_type: str = _h(f"regression loss: one of {LOSS_TYPES}", "mse")
    min_snr_gamma: float | None = _h("min-SNR-gamma loss weighting (Hang et al. 2023), e.g. 5.0; None = off",
                                     None)
    input_perturbation: float = _h("DDPM-IP gamma (Ning et al. 2023): x_t is formed from eps + gamma * xi while "
                                   "the target stays eps; 0 = off, the paper uses 0.1", 0.0)
    formulation: str = _h("'ddpm' (the Gaussian diffusion of the course) or 'flow' (flow matching, rectified flow: "
                          "x_t = (1 - t) x0 + t eps, the network predicts the velocity eps - x0; needs objective 'v'; "
                          "the network sees t * timesteps)", "ddpm")
    flow_time: str = _h(f"flow matching only: how t is drawn in training, one of {FLOW_TIMES} (logit-normal: "
                        "sigmoid of N(0, 1), Esser et al. 2024)", "uniform")

    def __post_init__(self):
        _typed(self)
        w = "DiffusionConfig"
        _need(isinstance(self.timesteps, int) and self.timesteps >= 2, f"{w}.timesteps",
              f"must be an integer >= 2, got {self.timesteps!r}")
        _need(self.schedule in SCHEDULES, f"{w}.schedule",
              f"unknown schedule {self.schedule!r}; allowed: {', '.join(SCHEDULES)}")
        _need(self.objective in OBJECTIVES, f"{w}.objective",
              f"unknown objective {self.objective!r}; allowed: {', '.join(OBJECTIVES)}")
        _need(self.loss_type in LOSS_TYPES, f"{w}.loss_type",
              f"unknown loss {self.loss_type!r}; allowed: {', '.join(LOSS_TYPES)}")
        _need(self.min_snr_gamma is None or self.min_snr_gamma > 0, f"{w}.min_snr_gamma",
              f"must be None or > 0, got {self.min_snr_gamma}")
        _need(0.0 <= self.input_perturbation <= 1.0, f"{w}.input_perturbation",
              f"must be in [0, 1] (0 = off; the paper uses 0.1), got {self.input_perturbation}")
        _need(self.formulation in FORMULATIONS, f"{w}.formulation",
              f"unknown formulation {self.formulation!r}; allowed: {', '.join(FORMULATIONS)}")
        _need(self.flow_time in FLOW_TIMES, f"{w}.flow_time",
              f"unknown flow time distribution {self.flow_time!r}; allowed: {', '.join(FLOW_TIMES)}")
        if self.formulation == "flow":
            _need(self.objective == "v", f"{w}.objective",
                  f"flow matching predicts the velocity eps - x0: set objective 'v', got {self.objective!r}")
            for name, off in (("min_snr_gamma", None), ("input_perturbation", 0.0), ("zero_terminal_snr", False)):
                _need(getattr(self, name) == off, f"{w}.{name}",
                      f"is a DDPM setting; flow matching does not use it: leave it at {off!r}")
        _need(not self.zero_terminal_snr or self.objective == "v", f"{w}.zero_terminal_snr",
              "needs objective='v': with alphas_cumprod[T-1] = 0, an eps- or x0-prediction cannot recover "
              "the image at the last step")


@dataclass(frozen=True, kw_only=True)
class DataConfig(_Base):
    """Which images to train on. Explained in notebooks/03_training."""

    dataset: str = _h(f"a name in ddpm_nb.data.DATASETS: {', '.join(DATASETS)}", "fashion-mnist")
    root: str | None = _h("dataset root; default: $DDPM_NB_DATA or the repository's data/", None)
    path: str | None = _h("for 'imagefolder' / 'npy': the folder (or .npy/.npz file) to read", None)
    split: str = _h("'train', 'test', 'val' or 'all' (Flowers102: train+val+test)", "train")
    val_split: str | None = _h("split used for validation loss; None = hold out val_fraction of the data", None)
    val_fraction: float = _h("fraction held out for validation when val_split is None", 0.02)
    class_cond: bool = _h("return labels so the UNet can be class-conditional", False)
    hflip: bool = _h("random horizontal flip", True)
    num_workers: int | None = _h("DataLoader workers; None = 0 in notebooks/CI, min(8, cpus) elsewhere", None)
    limit: int | None = _h("use only the first N images (quick experiments)", None)
    in_memory: bool = _h("decode and resize the images once and keep them in memory (when under 2 GB)", True)
    value_range: tuple[float, ...] | None = _h("for 'npy': [low, high] of the stored values, e.g. [0, 255] "
                                               "for float arrays of 8-bit values; None = uint8 is 0..255, "
                                               "floats must lie in [0, 1] or [-1, 1]", None)

    def __post_init__(self):
        _typed(self)
        w = "DataConfig"
        _need(self.dataset in DATASETS, f"{w}.dataset",
              f"unknown dataset {self.dataset!r}; allowed: {', '.join(DATASETS)}")
        _need(self.split in ("train", "test", "val", "all"), f"{w}.split",
              f"must be 'train', 'test', 'val' or 'all', got {self.split!r}")
        _need(0.0 <= self.val_fraction < 0.5, f"{w}.val_fraction", f"must be in [0, 0.5), got {self.val_fraction}")
        _need(self.num_workers is None or self.num_workers >= 0, f"{w}.num_workers", "must be None or >= 0")
        _need(self.limit is None or self.limit > 0, f"{w}.limit", "must be None or > 0")
        _need(self.value_range is None or (len(self.value_range) == 2 and self.value_range[0] < self.value_range[1]),
              f"{w}.value_range", f"must be None or [low, high] with low < high, got {self.value_range}")
        _need(not DATASETS[self.dataset].needs_path or bool(self.path), f"{w}.path",
              f"dataset {self.dataset!r} needs path= the folder or file to read")


@dataclass(frozen=True, kw_only=True)
class TrainConfig(_Base):
    """Optimisation and bookkeeping. Explained in notebooks/03_training."""

    steps: int = _h("optimizer steps to train for (total, across resumes)", 10_000)
    batch_size: int = _h("images per optimizer step (global, across accumulation and GPUs)", 128)
    grad_accum: int = _h("micro-batches per optimizer step (batch_size must be divisible)", 1)
    lr: float = _h("peak learning rate (AdamW)", 2e-4)
    weight_decay: float = _h("AdamW weight decay", 0.0)
    betas: tuple[float, ...] = _h("AdamW betas (beta1, beta2), each in [0, 1)", (0.9, 0.999))
    warmup_steps: int = _h("linear warm-up steps", 500)
    lr_schedule: str = _h("'cosine' (decay to min_lr_ratio * lr after warm-up) or 'constant'", "cosine")
    min_lr_ratio: float = _h("final lr as a fraction of lr for the cosine schedule", 0.1)
    grad_clip: float | None = _h("clip the global gradient norm (after unscaling); None = off", 1.0)
    amp: str = _h("mixed precision: 'auto' (bf16 on capable GPUs and on CPUs with native bf16, fp16+GradScaler "
                  "on older GPUs, off elsewhere), "
                  "'bf16', 'fp16' or 'off'", "auto")
    channels_last: bool = _h("use channels_last memory format (faster convs on GPUs)", False)
    compile: bool = _h("torch.compile the model", False)
    ema_decay: float = _h("EMA decay of the weights", 0.9999)
    ema_start: int = _h("step at which the EMA starts tracking (before: a copy)", 0)
    ema_warmup: bool = _h("ramp the EMA decay as min(decay, (1+n)/(10+n)) after ema_start", True)
    log_every: int = _h("steps between CSV/TensorBoard log rows; 0 = one row only at the end", 50)
    sample_every: int = _h("steps between sample grids (online and EMA); 0 = only at the end", 2000)
    eval_every: int = _h("steps between validation-loss evaluations; 0 = only at the end", 1000)
    ckpt_every: int = _h("steps between checkpoints (latest + rotation); 0 = only at the end (of each train() "
                         "call)", 1000)
    keep_last: int = _h("how many step-numbered checkpoints to keep besides latest", 3)
    num_samples: int = _h("images in each sample grid", 64)
    sampler: str = _h("the sampler of the sample grids: a name in ddpm_nb.sample.SAMPLERS (python -m ddpm_nb "
                      "sample --list-samplers)", "ddim")
    sample_steps: int = _h("sampler steps for the final sample grids", 50)
    preview_steps: int = _h("sampler steps for the sample grids before the last step (at most sample_steps)", 20)
    sample_weights: str = _h("which weights draw the sample grids: 'both' (online and EMA), 'ema' or 'online'",
                             "both")
    sample_amp: str = _h("precision of the sample grids: 'auto' (bf16 where it is native: GPUs with bf16, CPUs "
                         "with AVX-512 BF16/AMX) or 'off' (fp32)", "auto")
    label_dropout: float = _h("classifier-free guidance: probability that a training label is replaced by the "
                              "null class (class-conditional runs only; Ho & Salimans 2022 use 0.1-0.2)", 0.1)
    eval_batches: int = _h("validation batches per evaluation", 8)
    seed: int = _h("random seed", 0)

    def __post_init__(self):
        _typed(self)
        w = "TrainConfig"
        for name in ("steps", "batch_size", "grad_accum", "num_samples", "sample_steps", "preview_steps",
                     "eval_batches"):
            _need(int(getattr(self, name)) >= 1, f"{w}.{name}", f"must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "log_every", "sample_every", "eval_every", "ckpt_every", "keep_last",
                     "ema_start"):
            _need(int(getattr(self, name)) >= 0, f"{w}.{name}", f"must be >= 0, got {getattr(self, name)}")
        _need(self.batch_size % self.grad_accum == 0, f"{w}.grad_accum",
              f"batch_size={self.batch_size} must be divisible by grad_accum={self.grad_accum}")
        _need(self.lr > 0, f"{w}.lr", f"must be > 0, got {self.lr}")
        _need(self.weight_decay >= 0, f"{w}.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _need(len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas), f"{w}.betas",
              f"must be two numbers in [0, 1) such as [0.9, 0.999], got {list(self.betas)}")
        _need(self.amp in AMP_MODES, f"{w}.amp", f"unknown mode {self.amp!r}; allowed: {', '.join(AMP_MODES)}")
        _need(self.sample_weights in ("both", "ema", "online"), f"{w}.sample_weights",
              f"must be 'both', 'ema' or 'online', got {self.sample_weights!r}")
        _need(self.sample_amp in ("auto", "off"), f"{w}.sample_amp", f"must be 'auto' or 'off', got {self.sample_amp!r}")
        _need(self.lr_schedule in ("cosine", "constant"), f"{w}.lr_schedule",
              f"must be 'cosine' or 'constant', got {self.lr_schedule!r}")
        _need(0.0 <= self.ema_decay < 1.0, f"{w}.ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        _need(self.grad_clip is None or self.grad_clip > 0, f"{w}.grad_clip", "must be None or > 0")
        _need(0.0 <= self.min_lr_ratio <= 1.0, f"{w}.min_lr_ratio", "must be in [0, 1]")
        _need(0.0 <= self.label_dropout < 1.0, f"{w}.label_dropout",
              f"must be in [0, 1) (0 = never drop; 0.1 is usual), got {self.label_dropout}")


@dataclass(frozen=True, kw_only=True)
class RunConfig(_Base):
    """Everything a training run needs; saved in every checkpoint."""

    name: str = _h("run name: outputs go to results/<name>/", "run")
    unet: UNetConfig = _h("network", factory=UNetConfig)
    diffusion: DiffusionConfig = _h("forward process and loss", factory=DiffusionConfig)
    data: DataConfig = _h("dataset", factory=DataConfig)
    train: TrainConfig = _h("optimisation", factory=TrainConfig)

    SECTIONS = {"unet": UNetConfig, "diffusion": DiffusionConfig, "data": DataConfig, "train": TrainConfig}

    def __post_init__(self):
        _typed(self)
        _need(bool(self.name) and "/" not in self.name and self.name not in (".", ".."), "RunConfig.name",
              f"must be a plain folder name, got {self.name!r}")
        spec = DATASETS[self.data.dataset]
        if self.data.class_cond:
            _need(self.unet.num_classes is not None, "UNetConfig.num_classes",
                  f"data.class_cond=True needs unet.num_classes ({spec.num_classes or 'the number of classes'} for "
                  f"{self.data.dataset})")
            _need(spec.num_classes is None or self.unet.num_classes == spec.num_classes, "UNetConfig.num_classes",
                  f"{self.data.dataset} has {spec.num_classes} classes, got num_classes={self.unet.num_classes}; "
                  f"use {spec.num_classes}")
        # the built-in datasets' channels are known now; image folders and arrays are checked once read
        _need(spec.channels is None or spec.needs_path or self.unet.in_channels == spec.channels,
              "UNetConfig.in_channels",
              f"{self.data.dataset} has {spec.channels}-channel images, got in_channels={self.unet.in_channels}; "
              f"use {spec.channels}")
        check_steps(self.train.sample_steps, self.diffusion.timesteps, "TrainConfig.sample_steps")

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        d = dict(d)
        unknown = set(d) - {"name", *cls.SECTIONS}
        if unknown:
            raise ConfigError(f"RunConfig: unknown section(s) {sorted(unknown)}; allowed: name, "
                              f"{', '.join(cls.SECTIONS)}")
        for k in cls.SECTIONS:
            if k in d and not isinstance(d[k], (dict, cls.SECTIONS[k])):
                raise ConfigError(f"RunConfig.{k}: expected a mapping of {cls.SECTIONS[k].__name__} fields, "
                                  f"got {d[k]!r}")
        kwargs = {k: sec.from_dict(d[k]) if isinstance(d.get(k), dict) else d[k]
                  for k, sec in cls.SECTIONS.items() if k in d}
        if "name" in d:
            kwargs["name"] = d["name"]
        return cls(**kwargs)

    def override(self, dotted: dict[str, Any]) -> "RunConfig":
        """Return a copy with `{"train.lr": 1e-4, "unet.dropout": 0.0, "name": "x"}` applied."""
        d = self.to_dict()
        for key, value in dotted.items():
            if key == "name":
                d["name"] = value
                continue
            section, _, fname = key.partition(".")
            if section not in self.SECTIONS or not fname:
                raise ConfigError(f"unknown setting {key!r}; use <section>.<field> with section in "
                                  f"{', '.join(self.SECTIONS)}")
            allowed = {f.name for f in fields(self.SECTIONS[section])}
            if fname not in allowed:
                raise ConfigError(f"unknown setting {key!r}; {section} has: {', '.join(sorted(allowed))}")
            d[section][fname] = value
        return RunConfig.from_dict(d)


def _fashion(unet: UNetConfig, **train) -> dict:
    return dict(unet=unet, data=DataConfig(dataset="fashion-mnist", hflip=True), train=TrainConfig(**train))


def _flowers(unet: UNetConfig, **train) -> dict:
    return dict(unet=unet, data=DataConfig(dataset="flowers102", split="all", hflip=True),
                train=TrainConfig(**train))


# Named run presets for `python -m ddpm_nb train --preset NAME`.
PRESETS: dict[str, dict] = {
    # CI and smoke tests: every periodic branch fires within 30 steps.
    "tiny": dict(unet=UNetConfig.tiny(), diffusion=DiffusionConfig(timesteps=50),
                 data=DataConfig(dataset="fashion-mnist", limit=512, val_fraction=0.1),
                 train=TrainConfig(steps=30, batch_size=16, lr=1e-3, warmup_steps=5, ema_decay=0.9,
                                   log_every=5, sample_every=10, eval_every=10, ckpt_every=10, keep_last=2,
                                   num_samples=16, sample_steps=10, eval_batches=2)),
    # A laptop CPU in about ten minutes: recognisable clothing shapes.
    "quick": dict(unet=UNetConfig.quick(), diffusion=DiffusionConfig(timesteps=1000, schedule="cosine"),
                  data=DataConfig(dataset="fashion-mnist", hflip=True),
                  train=TrainConfig(steps=1200, batch_size=64, lr=2e-3, warmup_steps=100, ema_decay=0.995,
                                    ema_start=200, log_every=50, sample_every=600, eval_every=300,
                                    ckpt_every=200, num_samples=64, sample_steps=50, eval_batches=4)),
    # The quick preset trained by flow matching instead (notebooks/11): the same network, data and budget.
    "flow-quick": dict(unet=UNetConfig.quick(),
                       diffusion=DiffusionConfig(timesteps=1000, formulation="flow", objective="v"),
                       data=DataConfig(dataset="fashion-mnist", hflip=True),
                       train=TrainConfig(steps=1200, batch_size=64, lr=2e-3, warmup_steps=100, ema_decay=0.995,
                                         ema_start=200, log_every=50, sample_every=600, eval_every=300,
                                         ckpt_every=200, num_samples=64, sample_steps=50, eval_batches=4)),
    "fashion-mnist": dict(diffusion=DiffusionConfig(timesteps=1000, schedule="cosine"),
                          **_fashion(UNetConfig.fashion_mnist(), steps=30_000, batch_size=256, lr=4e-4,
                                     warmup_steps=500, ema_decay=0.9995, amp="auto")),
    # Flowers102 on 2 CPU cores in about two hours (bf16 autocast where the CPU has it natively):
    # class-conditional with 10% label dropout, so classifier-free guidance works on flowers too.
    # lr 1e-3 suits a 2.3M-parameter net at batch 64 (the quick preset's 2e-3 is for a 1.1M one);
    # EMA 0.999 averages over the last ~1,000 of 5,000 steps.
    "flowers-cpu": dict(diffusion=DiffusionConfig(timesteps=1000, schedule="cosine"),
                        unet=UNetConfig.flowers_cpu(),
                        data=DataConfig(dataset="flowers102", split="all", hflip=True, class_cond=True),
                        train=TrainConfig(steps=5000, batch_size=64, lr=1e-3, warmup_steps=200, ema_decay=0.999,
                                          ema_start=200, amp="auto", log_every=50, sample_every=1000,
                                          eval_every=500, ckpt_every=250, keep_last=2, num_samples=64,
                                          sample_steps=50, eval_batches=4)),
    "flowers-32": dict(diffusion=DiffusionConfig(timesteps=1000, schedule="cosine"),
                       **_flowers(UNetConfig.flowers_32(), steps=40_000, batch_size=128, lr=2e-4,
                                  warmup_steps=1000, ema_decay=0.9995)),
    "flowers-64": dict(diffusion=DiffusionConfig(timesteps=1000, schedule="cosine"),
                       **_flowers(UNetConfig.flowers_64(), steps=60_000, batch_size=64, lr=1e-4,
                                  warmup_steps=1000, ema_decay=0.9999)),
    # The DDPM paper's CIFAR-10 run (Ho et al. 2020, appendix B): 800k steps of 128, lr 2e-4, EMA 0.9999.
    "ddpm-cifar10": dict(diffusion=DiffusionConfig(timesteps=1000, schedule="linear"), unet=UNetConfig.ddpm_cifar10(),
                         data=DataConfig(dataset="cifar10", hflip=True),
                         train=TrainConfig(steps=800_000, batch_size=128, lr=2e-4, warmup_steps=5000, grad_clip=1.0,
                                           ema_decay=0.9999)),
}


def preset(name: str, **overrides: Any) -> RunConfig:
    """The named run preset as a RunConfig; `overrides` are dotted settings ("train.lr"=...)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    cfg = RunConfig(name=name, **PRESETS[name])
    return cfg.override(overrides) if overrides else cfg
