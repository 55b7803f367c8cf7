"""ddpm_nb: the package behind the notebook-first DDPM course.

One module per noun of the paper: schedule, diffusion, unet, sample, data, train,
animate, metrics, config, utils. The notebooks in notebooks/ explain each one.
"""
import importlib

from . import config, utils  # noqa: F401  (light: `import ddpm_nb` then ddpm_nb.utils.pick_device())
from ._version import __version__  # noqa: F401

# The one place the repository address lives: notebooks' Colab badges and install cells must use
# exactly this (tests/test_notebooks.py checks).
REPO_URL = "https://github.com/ddpm-nb/ddpm_nb"


def pretrained(name: str, *, device=None, ema: bool = True):
    """(model, diffusion, RunConfig) of a model shipped with the package: "fashion-quick-cond",
    "flowers-cpu-cond". See ddpm_nb.shipped."""
    from .shipped import pretrained as _pretrained

    return _pretrained(name, device=device, ema=ema)


_LAZY = ("schedule", "diffusion", "unet", "sample", "edit", "data", "metrics", "animate", "checkpoint", "train", "shipped",
         "lesson")


def __getattr__(name: str):
    """Submodules on first use (`import ddpm_nb; ddpm_nb.shipped.lesson_model(...)`): the package entry point
    imports nothing above the bottom layer (config, utils), so no module it loads can import it back."""
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'ddpm_nb' has no attribute {name!r}")
