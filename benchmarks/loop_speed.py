"""Training images/s of the whole Trainer loop and sampling images/s, for the ddpm_nb that Python imports.

    python benchmarks/loop_speed.py --rounds 3                      # this checkout
    PYTHONPATH=/path/to/other/checkout python benchmarks/loop_speed.py --rounds 3 --label before

Each round trains the `quick` preset for --steps steps (batch 64, 4,096 images, no periodic work but a
log row and a checkpoint when `train` returns) and times the steps after the first --warmup ones, then draws
--num images with DDIM-20 from a fresh `quick` network. Prints one JSON line per round, for comparing two
versions of the package round by round on the same machine (results/BENCHMARKS.md, "Trainer split").
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch


def train_speed(steps: int, warmup: int) -> float:
    from ddpm_nb.config import preset
    from ddpm_nb.train import Trainer

    # the run is one step longer than the timed part, so the final evaluation and sample grids never run;
    # log_every = steps because trainers before the split refused log_every = 0 (ZeroDivisionError)
    cfg = preset("quick").override({"train.steps": steps + 1, "train.log_every": steps, "train.eval_every": 0,
                                    "train.sample_every": 0, "train.ckpt_every": 0, "data.limit": 4096})
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(cfg, run_dir=f"{tmp}/run", device="cpu", progress=False)
        tr.train(until=warmup)
        t0 = time.perf_counter()
        tr.train(until=steps)
        seconds = time.perf_counter() - t0
        tr.close()
    return (steps - warmup) * cfg.train.batch_size / seconds


@torch.no_grad()
def sample_speed(num: int, steps: int) -> float:
    from ddpm_nb.config import preset
    from ddpm_nb.diffusion import GaussianDiffusion
    from ddpm_nb.sample import sample
    from ddpm_nb.unet import UNet

    cfg = preset("quick")
    torch.manual_seed(0)
    model, diffusion = UNet(cfg.unet).eval(), GaussianDiffusion(cfg.diffusion)
    sample(model, diffusion, 4, sampler="ddim", steps=2, progress=False, device="cpu")  # warm-up
    t0 = time.perf_counter()
    sample(model, diffusion, num, sampler="ddim", steps=steps, progress=False, device="cpu",
           generator=torch.Generator().manual_seed(0))
    return num / (time.perf_counter() - t0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--num", type=int, default=64, help="images drawn in the sampling timing")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--label", default="this checkout")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import ddpm_nb

    for r in range(args.rounds):
        row = {"label": args.label, "round": r, "package": ddpm_nb.__file__, "threads": args.threads,
               "train_images_per_s": round(train_speed(args.steps, args.warmup), 1),
               "sample_images_per_s": round(sample_speed(args.num, args.sample_steps), 2)}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
