"""The small trained models that ship inside the package, so sampling lessons show real images
without training first, from a clone, a wheel or Colab alike.

    model, diffusion, cfg = ddpm_nb.pretrained("fashion-quick-cond")

Each model is an exported checkpoint (EMA weights + its RunConfig) in `ddpm_nb/assets/`, with a
JSON beside it that records how it was trained (command, steps, wall time, device, quality).
Used in notebooks/04_sampling and 05_animations.
"""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["PRETRAINED", "pretrained", "pretrained_path", "pretrained_info"]

ASSETS = Path(__file__).resolve().parent / "assets"

# name -> (file in assets/, one line on what it is)
PRETRAINED: dict[str, tuple[str, str]] = {
    "fashion-quick-cond": ("fashion_quick_cond.pt",
                           "FashionMNIST, 28 px grayscale, class-conditional (10 + null), 1.1M parameters"),
    "flowers-cpu-cond": ("flowers_cpu_cond.pt",
                         "Oxford Flowers102, 32 px RGB, class-conditional (102 + null), 2.3M parameters"),
}


def pretrained_path(name: str) -> Path:
    """The checkpoint file of a shipped model; one clear error for an unknown or missing name."""
    from .train import CheckpointError

    if name not in PRETRAINED:
        raise CheckpointError(f"no shipped model named {name!r}; available: {', '.join(PRETRAINED)}")
    path = ASSETS / PRETRAINED[name][0]
    if not path.is_file():
        raise CheckpointError(f"the shipped model {name!r} is missing from this installation ({path}); "
                              "reinstall ddpm_nb (pip install --force-reinstall ddpm_nb) or train it yourself "
                              "with the command in its JSON file")
    return path


def pretrained_info(name: str) -> dict:
    """The JSON record beside a shipped model: command, steps, wall time, device, val loss, quality."""
    return json.loads(pretrained_path(name).with_suffix(".json").read_text())


def pretrained(name: str, *, device=None, ema: bool = True):
    """(model, diffusion, RunConfig) of a shipped model, in eval mode on `device` (default: best)."""
    from .train import load_model

    return load_model(pretrained_path(name), ema=ema, device=device)
