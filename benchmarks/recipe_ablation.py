"""The training-recipe ablation: each arm trained with the package's own CLI at the same number of
images seen, then scored with Inception FID at n samples beside the real-vs-real floor at the same n.

    DDPM_NB_DATA=/path/to/datasets python benchmarks/recipe_ablation.py fashion --runs ~/ddpm-runs
    python benchmarks/recipe_ablation.py fashion --runs ~/ddpm-runs --table   # the Markdown table only

Every arm is `python -m ddpm_nb train --preset <base> <overrides> --resume` followed by
`python -m ddpm_nb fid <run> --extractor inception`, so a killed ablation continues where it stopped
(a finished run is not retrained, a scored arm is not re-scored). Runs go under --runs (keep it
outside the repository); the scores are appended to <runs>/ablation_<model>.jsonl, one JSON line per arm.
One torch thread per job: run at most two ablations at once on a 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# The screening budget: 1,000 steps x 64 = 64,000 images seen for FashionMNIST (two sevenths of the
# shipped model's 224,000). Every arm sees the same images except `wide`, which trades steps for width
# at about the same CPU time (a 2.1x slower step, 480 steps).
FASHION_BASE = ["--preset", "quick", "--data.class_cond", "true", "--unet.num_classes", "10",
                "--train.steps", "1000", "--train.sample_every", "0", "--train.eval_every", "500",
                "--train.ckpt_every", "250", "--train.num_samples", "20"]
ARMS = {
    "fashion": {
        # name: (overrides, what it changes)
        "baseline": ([], "today's `quick` preset (EMA 0.995 from step 200, lr 2e-3, 100 warm-up steps, eps)"),
        "ema-0.998": (["--train.ema_decay", "0.998"], "EMA decay 0.998: averages ~500 steps, half the run"),
        "min-snr-5": (["--diffusion.min_snr_gamma", "5"], "min-SNR-5 loss weighting"),
        "v-pred": (["--diffusion.objective", "v"], "v-prediction (DDIM samples it through split_output)"),
        "ip-0.1": (["--diffusion.input_perturbation", "0.1"], "DDPM-IP, gamma = 0.1"),
        "lr-1e-3": (["--train.lr", "1e-3", "--train.warmup_steps", "50"], "lr 1e-3, 50 warm-up steps"),
        "wide": (["--unet.base_channels", "48", "--train.steps", "480"],
                 "base_channels 48 (2.4M parameters), 480 steps: the same CPU time, fewer images"),
    },
}
BASES = {"fashion": FASHION_BASE}


def run(cmd: list[str], log: Path) -> None:
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        subprocess.run(cmd, check=True, stdout=fh, stderr=subprocess.STDOUT)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def table(path: Path) -> str:
    out = ["| arm | seed | images seen | train min | FID | floor (real vs real) | KID x1e3 |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows(path):
        out.append(f"| {r['arm']} | {r['seed']} | {r['images_seen']:,} | {r['train_minutes']:.1f} | "
                   f"{r['fid']:.2f} | {r['fid_real_vs_real']:.2f} | {1e3 * r['kid_mean']:.2f} ± "
                   f"{1e3 * r['kid_std']:.2f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", choices=sorted(ARMS))
    p.add_argument("--runs", required=True, help="folder for the run folders and the scores (outside git)")
    p.add_argument("--arms", default=None, help="comma-separated arm[:seed] list (default: every arm, seed 0, "
                                                 "then baseline seed 1)")
    p.add_argument("--num", type=int, default=1000, help="samples scored per arm (and real images per half)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps of the scored samples")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--table", action="store_true", help="print the table of what is scored and exit")
    args = p.parse_args(argv)
    runs = Path(args.runs).expanduser().resolve()
    runs.mkdir(parents=True, exist_ok=True)
    scores = runs / f"ablation_{args.model}.jsonl"
    if args.table:
        print(table(scores))
        return 0
    plan = [a.split(":") if ":" in a else (a, "0") for a in args.arms.split(",")] if args.arms else \
        [(a, "0") for a in ARMS[args.model]] + [("baseline", "1")]
    py = [sys.executable, "-m", "ddpm_nb"]
    for arm, seed in plan:
        if arm not in ARMS[args.model]:
            p.error(f"unknown arm {arm!r}; the arms are {', '.join(ARMS[args.model])}")
        name = f"abl-{args.model}-{arm}-s{seed}"
        if any(r["arm"] == arm and str(r["seed"]) == seed and r["num"] == args.num for r in rows(scores)):
            print(f"{name}: scored already")
            continue
        overrides, what = ARMS[args.model][arm]
        log = runs / f"{name}.log"
        run(py + ["train", *BASES[args.model], *overrides, "--train.seed", seed, "--name", name,
                  "--results-dir", str(runs), "--resume", "--no-progress", "--threads", str(args.threads)], log)
        fid_dir = runs / name / f"fid{args.num}"
        fid_file = fid_dir / "fid.jsonl"
        if not fid_file.exists():
            run(py + ["fid", str(runs / name), "--extractor", "inception", "--num", str(args.num), "--split", "test",
                      "--steps", str(args.steps), "--batch", "100", "--out", str(fid_dir), "--no-progress",
                      "--threads", str(args.threads)], log)
        result = rows(fid_file)[-1]
        log_rows = [line.split(",") for line in (runs / name / "log.csv").read_text().splitlines()]
        head, body = log_rows[0], log_rows[1:]
        col = {k: head.index(k) for k in ("step", "images_per_s")}
        images = int(body[-1][col["step"]]) * 64
        # training time from the logged throughput (a resumed run's wall clock would miss its first part)
        speed = sum(float(r[col["images_per_s"]]) for r in body) / len(body)
        train_minutes = images / speed / 60
        row = dict(arm=arm, seed=int(seed), what=what, overrides=overrides, num=args.num,
                   sampler=f"ddim-{args.steps}", images_seen=images, images_per_s=speed, train_minutes=train_minutes,
                   fid=result["fid"], fid_real_vs_real=result.get("fid_real_vs_real", float("nan")),
                   kid_mean=result["kid_mean"], kid_std=result["kid_std"],
                   date=time.strftime("%Y-%m-%d"))
        with open(scores, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(f"{name}: FID {row['fid']:.2f} (floor {row['fid_real_vs_real']:.2f})", flush=True)
    print(table(scores))
    return 0


if __name__ == "__main__":
    sys.exit(main())
