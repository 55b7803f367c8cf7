"""The small trained models that ship inside the package, so sampling lessons show real images
without training first, from a clone, a wheel or Colab alike.

    model, diffusion, cfg = ddpm_nb.pretrained("fashion-quick-cond")

Each model is an exported checkpoint (EMA weights + its RunConfig) in `ddpm_nb/assets/`, with a
JSON beside it that records how it was trained (command, steps, wall time, device, quality).
Used in notebooks/04_sampling to 08_diffusers, through `lesson_model(DATASET)`.
"""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["PRETRAINED", "LESSON_MODELS", "lesson_data", "pretrained", "pretrained_path", "pretrained_info", "write_record", "lesson_model",
           "class_name"]

ASSETS = Path(__file__).resolve().parent / "assets"

# name -> (file in assets/, one line on what it is)
PRETRAINED: dict[str, tuple[str, str]] = {
    "fashion-quick-cond": ("fashion_quick_cond.pt",
                           "FashionMNIST, 28 px grayscale, class-conditional (10 + null), 1.1M parameters"),
    "flowers-cpu-cond": ("flowers_cpu_cond.pt",
                         "Oxford Flowers102, 32 px RGB, class-conditional (102 + null), 2.3M parameters"),
}
# a lesson's DATASET parameter (a name in ddpm_nb.data.DATASETS) -> the shipped model it samples from
LESSON_MODELS = {"fashion-mnist": "fashion-quick-cond", "flowers102": "flowers-cpu-cond"}
ALIASES = {"flowers": "flowers102"}  # the lessons' spelling before the registry: still accepted


def lesson_data(dataset: str) -> dict:
    """The config settings of a class-conditional model of a lesson's DATASET (any size), from its spec."""
    from .data import DATASETS

    spec = DATASETS[ALIASES.get(dataset, dataset)]
    return {"data.dataset": ALIASES.get(dataset, dataset), "unet.num_classes": spec.num_classes,
            "unet.in_channels": spec.channels}


def pretrained_path(name: str) -> Path:
    """The checkpoint file of a shipped model; one clear error for an unknown or missing name."""
    from .checkpoint import CheckpointError

    if name not in PRETRAINED:
        raise CheckpointError(f"no shipped model named {name!r}; available: {', '.join(PRETRAINED)}")
    path = ASSETS / PRETRAINED[name][0]
    if not path.is_file():
        raise CheckpointError(f"the shipped model {name!r} is missing from this installation ({path}); "
                              "reinstall ddpm_nb (pip install --force-reinstall ddpm_nb) or train it yourself "
                              "with the command in its JSON file")
    return path


def write_record(model_file: str | Path, fields: dict, *, keep: tuple[str, ...] | None = ("quality",)) -> Path:
    """Write the JSON record beside a shipped model file (the one writer: scripts/ship_model.py,
    benchmarks/import_gpu_results.py and benchmarks/fid_table.py --record all call it).

    `fields` replace the record's entries; those named in `keep` (every entry when None) survive from an
    existing record unless `fields` sets them. The file's name, sha256 and size are always taken from the file itself, so a
    record never describes another file. Written atomically."""
    import hashlib

    from .utils import atomic_write_bytes

    model_file = Path(model_file)
    path = model_file.with_suffix(".json")
    old = json.loads(path.read_text()) if path.is_file() else {}
    record = {k: v for k, v in old.items() if keep is None or k in keep}
    record.update(fields)
    data = model_file.read_bytes()
    record.update(file=model_file.name, sha256=hashlib.sha256(data).hexdigest(), size_mb=round(len(data) / 1e6, 2))
    atomic_write_bytes(path, (json.dumps(record, indent=1, ensure_ascii=False) + "\n").encode())
    return path


def pretrained_info(name: str) -> dict:
    """The JSON record beside a shipped model: command, steps, wall time, device, val loss, quality."""
    return json.loads(pretrained_path(name).with_suffix(".json").read_text())


def pretrained(name: str, *, device=None, ema: bool = True):
    """(model, diffusion, RunConfig) of a shipped model, in eval mode on `device` (default: best)."""
    from .checkpoint import load_model

    return load_model(pretrained_path(name), ema=ema, device=device)


def lesson_model(dataset: str, *, device=None, tiny: bool = False, fallback_dir=None):
    """(model, diffusion, RunConfig) of the shipped model for a lesson's DATASET ("fashion-mnist" or "flowers").

    Explained in notebooks/04_sampling. When the model file is missing (a trimmed install) and `tiny`
    is true, a tiny class-conditional model (preset 'tiny': 16 px, T = 50, 30 steps) is trained in
    `fallback_dir` instead, so that every cell of a lesson still runs in CI; its samples are blobs.
    A second call reuses that finished run. Without `tiny`, the error says how to get the model back.
    """
    from .checkpoint import CheckpointError

    dataset = ALIASES.get(dataset, dataset)
    if dataset not in LESSON_MODELS:
        raise ValueError(f"DATASET must be one of {', '.join(LESSON_MODELS)}, got {dataset!r}")
    name = LESSON_MODELS[dataset]
    try:
        return pretrained(name, device=device)
    except CheckpointError:
        if not tiny or fallback_dir is None:
            raise
    from .config import preset
    from .train import Trainer

    print(f"The shipped model {name!r} is missing, so TINY mode trains a tiny class-conditional model (preset 'tiny': "
          "16 px, T = 50, 30 steps) right here, so that every cell runs. Its samples are blobs.")
    cfg = preset("tiny").override({"name": f"fallback-tiny-{dataset}", "data.class_cond": True, **lesson_data(dataset)})
    trainer = Trainer(cfg, run_dir=Path(fallback_dir) / cfg.name, device=device, resume=True)
    trainer.train()                       # resume=True: a second call reuses the finished model
    trainer.close()
    return trainer.ema.model.eval(), trainer.diffusion, cfg


def class_name(dataset: str, c) -> str:
    """The readable name of label c of a dataset in ddpm_nb.data.DATASETS (its spec's class names), else
    "class c"."""
    from .data import DATASETS

    names = DATASETS[ALIASES.get(dataset, dataset)].class_names
    return names[int(c)] if names else f"class {int(c)}"
