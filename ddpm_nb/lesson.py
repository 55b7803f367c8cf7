"""What every lesson notebook does before its first idea: threads, device, seed, figure folder, and the
one-line facts of the model it samples from. Plumbing, so the notebooks import it rather than copy it.

    lesson = ddpm_nb.lesson.setup("04_sampling", seed=SEED, tiny=TINY, save_figures=SAVE_FIGURES)
    device, g, fig_dir, save = lesson
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple

import torch

from .utils import pick_device, repo_root, results_dir, seed_everything, set_threads

__all__ = ["Lesson", "setup", "shown", "model_facts"]


class Lesson(NamedTuple):
    device: torch.device
    g: torch.Generator  # seeded by `setup`: the lesson's own draws (figures, checks) are reproducible
    fig_dir: Path  # results/notebooks/<lesson>/
    save: Callable  # save(fig, name): fig_dir/<name>.png when the lesson's SAVE_FIGURES is on


def shown(path: str | Path) -> str:
    """A path as a lesson prints it: relative to the repository (or the working folder), never this machine's
    absolute path."""
    path = Path(path).resolve()
    for base in filter(None, (repo_root(), Path.cwd())):
        try:
            return str(path.relative_to(Path(base).resolve()))
        except ValueError:
            continue
    return path.name


def setup(name: str, *, seed: int = 0, tiny: bool = False, threads: int | None = None,
          save_figures: bool = True, dpi: int = 110) -> Lesson:
    """Threads, device, seed and figure folder of lesson `name` (e.g. "04_sampling"); prints one line.

    Threads: in tiny mode on a CPU one (CI shares two busy cores, and OpenMP threads of one process then
    wait for each other); else `threads`, $DDPM_NB_THREADS or torch's default (`utils.set_threads`).
    """
    device = pick_device()
    if tiny and device.type == "cpu":
        torch.set_num_threads(1)
    else:
        set_threads(threads)
    g = seed_everything(seed)
    fig_dir = results_dir("notebooks", name)
    print(f"device: {device}; figures go to {shown(fig_dir)}/")

    def save(fig, figure: str) -> None:
        """Write a figure to results/notebooks/<lesson>/<figure>.png when the lesson saves figures."""
        if save_figures:
            fig.savefig(fig_dir / f"{figure}.png", dpi=dpi, bbox_inches="tight")

    return Lesson(device, g, fig_dir, save)


def model_facts(dataset: str, model: torch.nn.Module, cfg) -> str:
    """One line on the shipped model a lesson samples from: name, size, data, schedule and objective."""
    from .shipped import ALIASES, LESSON_MODELS
    from .unet import count_parameters

    name = LESSON_MODELS[ALIASES.get(dataset, dataset)]
    return (f"{name}: UNet with {count_parameters(model):,} parameters, {cfg.unet.image_size} px, "
            f"{cfg.unet.in_channels} channel(s), {cfg.unet.num_classes} classes + the null label; "
            f"{cfg.diffusion.schedule} schedule, T = {cfg.diffusion.timesteps}, predicts {cfg.diffusion.objective!r}")
