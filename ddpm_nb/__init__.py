"""ddpm_nb: the package behind the notebook-first DDPM course.

One module per noun of the paper: schedule, diffusion, unet, sample, data, train,
animate, metrics, config, utils. The notebooks in notebooks/ explain each one.
"""
__version__ = "0.1.0"

from . import config, shipped, utils  # noqa: E402,F401  (light: `import ddpm_nb` then ddpm_nb.utils.pick_device())

# The one place the repository address lives: notebooks' Colab badges and install cells must use
# exactly this (tests/test_notebooks.py checks).
REPO_URL = "https://github.com/ddpm-nb/ddpm_nb"


def pretrained(name: str, *, device=None, ema: bool = True):
    """(model, diffusion, RunConfig) of a model shipped with the package: "fashion-quick-cond",
    "flowers-cpu-cond". See ddpm_nb.shipped."""
    from .shipped import pretrained as _pretrained

    return _pretrained(name, device=device, ema=ema)
