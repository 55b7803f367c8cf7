"""Inception FID against NFE for every registered sampler on a shipped model, with the real-vs-real floor
at the same n. Rows appended to one JSONL file, a Markdown table printed:

    python benchmarks/sampler_fid.py fashion-quick-cond --num 1000 --part 1/2 &
    python benchmarks/sampler_fid.py fashion-quick-cond --num 1000 --part 2/2

1. "start" (DPM-Solver++ 2M at 10 NFE): where a chain starts and whether x0 is clipped: the integer
   spacings "uniform" (DDIM's 0, c, 2c, ...: starts at T - c) and "trailing" (starts at T - 1), the Karras
   ramp from sigma(T - 1) (about 2e4 on the cosine schedule) or from sigma_max = 80 (EDM's), and the best
   of these without clipping.
2. "nfe": DDIM (its uniform spacing, as before this table) and each other ODE sampler at the best start
   of stage 1, at NFE 5, 10, 20, 50; DDIM-50 with eta = 1; DDPM with all T steps.

Inception features dominate the cost on a CPU (about 4 images/s a core), so `--part 1/2` and `--part 2/2`
split the work over two processes: part 1 runs stage 1, part 2 the configurations that do not depend on
it (DDIM, DDPM) while it waits; then each takes half of the rest.

The same x_T for every configuration: batch k is drawn from a generator seeded with 1000 * seed + k, and
classes cycle. The network runs under bf16 autocast where the CPU has native bf16 (`--fp32` turns it
off); the rows record which. Features are cached beside --out per configuration, so a killed run
continues where it stopped. Needs `pip install "ddpm_nb[inception]"`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import ddpm_nb
from ddpm_nb import metrics
from ddpm_nb.data import real_images
from ddpm_nb.sample import SAMPLERS, get_sampler, make_plan, sample, sigma_of
from ddpm_nb.train import cpu_native_bf16
from ddpm_nb.utils import DiskFullError, append_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fid_table import save_atomic, score  # noqa: E402  (the same caching and scoring as the DDIM table)

ODE = ("euler", "heun", "dpm++2m", "dpm++2m-sde")
NFES = (5, 10, 20, 50)


def starts(diffusion) -> list[dict]:
    top = sigma_of(diffusion, diffusion.timesteps - 1)
    return [dict(spacing="uniform"), dict(spacing="trailing"), dict(spacing="karras", sigma_max=top),
            dict(spacing="karras", sigma_max=80.0)]


def key(cfg: dict) -> str:
    s = f"{cfg['sampler']}-{cfg['spacing']}"
    if cfg.get("sigma_max") is not None:
        s += f"@{cfg['sigma_max']:.4g}"
    if cfg.get("eta"):
        s += f"-eta{cfg['eta']:g}"
    if cfg.get("clip_x0") is False:
        s += "-noclip"
    return s + f"-{cfg['steps']}steps"


def sampler_fn(model, diffusion, run_cfg, cfg: dict, seed: int, dtype):
    device = next(model.parameters()).device
    drawn = [0]
    kw = {k: v for k, v in cfg.items() if k != "sampler"}

    def fn(n: int) -> torch.Tensor:
        batch = drawn[0] // n
        y = None
        if run_cfg.unet.num_classes:
            y = torch.arange(drawn[0], drawn[0] + n, device=device) % run_cfg.unet.num_classes
        drawn[0] += n
        gen = torch.Generator().manual_seed(1000 * seed + batch)
        return sample(model, diffusion, n, sampler=cfg["sampler"], y=y, generator=gen, progress=False,
                      device=device, dtype=dtype, **kw)
    return fn


KEEP = ("what", "stage", "sampler", "spacing", "sigma_max", "sigma_start", "clip_x0", "eta", "steps", "nfe", "n", "fid",
        "kid_mean", "kid_std", "kid_subset", "network_dtype", "date")


def record(model: str, rows_file: Path) -> None:
    """Merge this model's newest sampler rows (one per configuration and n) and their floor into the
    'quality.rows' of its shipped JSON record; rows of other tables (benchmarks/fid_table.py) stay."""
    from ddpm_nb.shipped import pretrained_info, pretrained_path, write_record

    newest = newest_rows(model, rows_file)
    if not newest:
        raise SystemExit(f"error: no rows for {model!r} in {rows_file}: run `python benchmarks/sampler_fid.py {model}` first")
    quality = dict(pretrained_info(model).get("quality", {}))
    ours = {(r["what"], r["n"], r["stage"]) for r in newest}
    kept = [r for r in quality.get("rows", []) if (r["what"], r["n"], r.get("stage")) not in ours]
    quality["rows"] = kept + [{k: r[k] for k in KEEP if k in r} for r in newest]
    quality["samplers_measured_with"] = (f"python benchmarks/sampler_fid.py {model} --num N --part 1/2 (and 2/2): rows "
                                         "with a 'sampler' field; the same x_T for every sampler")
    path = write_record(pretrained_path(model), {"quality": quality}, keep=None)
    print(f"wrote {len(newest)} sampler rows into {path}")


def newest_rows(model: str, rows_file: Path) -> list[dict]:
    """The model's newest row of each configuration, n and stage (a re-run appends; the last line wins)."""
    newest = {}
    for line in rows_file.read_text().splitlines():
        r = json.loads(line)
        if r["model"] == model:
            newest[(r["what"], r["n"], r["stage"])] = r
    return list(newest.values())


def table(model: str, rows_file: Path) -> str:
    """The Markdown tables (start stage, then FID against NFE) of a model's newest rows."""
    rows = newest_rows(model, rows_file)
    floor = next(r for r in rows if r["stage"] == "floor")
    head = (f"{model}: Inception FID at n = {floor['n']} (KID x1e3 beside it), real-vs-real floor "
            f"{floor['fid']:.1f}; network in {floor['network_dtype']}, guidance scale 1, classes cycled, the same x_T "
            f"(seed {floor['x_T_seed']}) for every row; {floor['date']}.\n\n")

    def levels(r):
        s = r["spacing"] + (f" from σ_max {r['sigma_max']:.3g}" if r.get("sigma_max") else "")
        return s + f" (first σ {r['sigma_start']:.3g})" + ("" if r["clip_x0"] else ", x̂₀ not clipped")

    out = head + "| start stage: dpm++2m, 10 NFE | FID | KID x1e3 |\n| --- | --- | --- |\n"
    out += "".join(f"| {levels(r)} | {r['fid']:.1f} | {1e3 * r['kid_mean']:.1f} ± {1e3 * r['kid_std']:.1f} |\n"
                   for r in sorted((r for r in rows if r["stage"] == "start"), key=lambda r: r["fid"]))
    nfe_rows = [r for r in rows if r["stage"] == "nfe"]
    out += "\n| sampler | levels | NFE | FID | KID x1e3 |\n| --- | --- | --- | --- | --- |\n"
    out += "".join(f"| {r['sampler']}{', η = ' + format(r['eta'], 'g') if r.get('eta') else ''} | {levels(r)} | "
                   f"{r['nfe']} | {r['fid']:.1f} | {1e3 * r['kid_mean']:.1f} ± {1e3 * r['kid_std']:.1f} |\n"
                   for r in sorted(nfe_rows, key=lambda r: (list(SAMPLERS).index(r["sampler"]), bool(r.get("eta")),
                                                           r["nfe"])))
    return out


def plot(model: str, rows_file: Path, out: Path) -> Path:
    """FID against NFE, one line per sampler, the floor dashed; written to `out` (PNG)."""
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = newest_rows(model, rows_file)
    floor = next(r for r in rows if r["stage"] == "floor")
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name in SAMPLERS:
        pts = sorted((r["nfe"], r["fid"]) for r in rows if r["stage"] == "nfe" and r["sampler"] == name
                     and not r.get("eta"))
        if pts:
            ax.plot(*zip(*pts), "o-" if len(pts) > 1 else "s", label=name)
    for r in rows:
        if r["stage"] == "nfe" and r.get("eta"):
            ax.plot([r["nfe"]], [r["fid"]], "k^", label=f"{r['sampler']}, eta = {r['eta']:g}")
    ax.axhline(floor["fid"], color="grey", ls="--", label="real vs real")
    ax.set_xscale("log")
    ax.set_xticks([5, 10, 20, 50] + ([1000] if any(r.get("nfe") == 1000 for r in rows) else []))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_yscale("log")
    ax.get_yaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.minorticks_off()
    ax.set_yticks([t for t in (20, 30, 40, 50, 70, 100, 150, 200, 300) if t <= max(r["fid"] for r in rows) * 1.1])
    ax.set_xlabel("network evaluations (NFE)")
    ax.set_ylabel(f"Inception FID, n = {floor['n']}")
    ax.set_title(f"{model}: FID against NFE, the same x_T for every sampler", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a shipped model name (ddpm_nb.shipped.PRETRAINED)")
    p.add_argument("--num", type=int, default=1000, help="samples per configuration (and real images per half)")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--part", default="1/1", help="K/N: this process's share of the work (see above)")
    p.add_argument("--no-ddpm", action="store_true", help="leave out DDPM with all T steps (the longest row)")
    p.add_argument("--fp32", action="store_true", help="run the network in fp32 even where bf16 is native")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="results/bench/sampler_fid.jsonl")
    p.add_argument("--record", action="store_true",
                   help="measure nothing: merge this model's newest rows from --out into its JSON record in ddpm_nb/assets/")
    p.add_argument("--table", action="store_true", help="measure nothing: print this model's newest rows as Markdown")
    p.add_argument("--plot", metavar="PNG", default=None, help="measure nothing: plot FID against NFE into PNG")
    args = p.parse_args(argv)
    if args.table:
        return print(table(args.model, Path(args.out)))
    if args.plot:
        return print(f"wrote {plot(args.model, Path(args.out), Path(args.plot))}")
    if args.record:
        return record(args.model, Path(args.out))
    ddpm_nb.utils.set_threads(args.threads)
    model, diffusion, cfg = ddpm_nb.pretrained(args.model, device="cpu")
    dtype = None if args.fp32 or not cpu_native_bf16() else torch.bfloat16
    extractor = metrics.InceptionFeatures()
    split = "test" if cfg.data.dataset == "fashion-mnist" else "all"
    data_cfg = cfg.data.replace(class_cond=False, limit=None, split=split)
    cache = Path(args.out).with_name(f"real_{cfg.data.dataset}_{split}_{cfg.unet.image_size}px_{2 * args.num}.npy")
    while not cache.is_file() and not args.part.startswith("1/"):  # part 1 computes them
        time.sleep(10)
    if cache.is_file():
        real = np.load(cache)
    else:
        imgs = real_images(data_cfg, cfg.unet.image_size, 2 * args.num, split=split, seed=0)
        real = metrics.compute_features(extractor, imgs, args.batch, progress=False)
        save_atomic(cache, real)
    a, b = real[:args.num], real[args.num:2 * args.num]
    base = dict(model=args.model, dataset=cfg.data.dataset, split=split, extractor=extractor.name, device="cpu",
                threads=torch.get_num_threads(), network_dtype="bf16" if dtype else "fp32", guidance_scale=1.0,
                x_T_seed=args.seed, date=time.strftime("%Y-%m-%d"))
    floor = dict(base, what="real vs real (floor)", stage="floor", n=args.num, **score(a, b))
    if args.part.startswith("1/"):
        append_text(args.out, json.dumps(floor) + "\n")
    print(json.dumps(floor), flush=True)
    rows = [floor]

    def measure(cfg_: dict, stage: str) -> dict:
        t0 = time.perf_counter()
        name = key(cfg_)
        fake_file = cache.with_name(f"fake_{args.model}_{name}_{'bf16' if dtype else 'fp32'}_{args.num}.npy")
        if fake_file.is_file():
            fake = np.load(fake_file)
        else:
            fake = metrics.compute_features(extractor, sampler_fn(model, diffusion, cfg, cfg_, args.seed, dtype),
                                            args.batch, num_samples=args.num, progress=False)
            save_atomic(fake_file, fake)
        s = get_sampler(cfg_["sampler"])
        plan = make_plan(diffusion, cfg_["steps"], cfg_["spacing"], sigma_max=cfg_.get("sigma_max"))
        row = dict(base, what=name, stage=stage, sampler=s.name, spacing=cfg_["spacing"],
                   sigma_max=cfg_.get("sigma_max"), sigma_start=plan.sigma[0], clip_x0=cfg_.get("clip_x0", True),
                   eta=cfg_.get("eta", 0.0 if s.name == "ddim" else None), steps=cfg_["steps"],
                   nfe=s.nfe(cfg_["steps"]), n=args.num, **score(a, fake), seconds=time.perf_counter() - t0)
        append_text(args.out, json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        rows.append(row)
        return row

    part, parts = (int(v) for v in args.part.split("/"))
    nfe_steps = {name: [SAMPLERS[name].steps_for_nfe(nfe) for nfe in NFES] for name in SAMPLERS}
    independent = [dict(sampler="ddim", spacing="uniform", steps=k) for k in nfe_steps["ddim"]]
    independent += [dict(sampler="ddim", spacing="uniform", steps=50, eta=1.0)]
    if not args.no_ddpm:
        independent += [dict(sampler="ddpm", spacing="uniform", steps=diffusion.timesteps)]
    start_cfgs = [dict(o, sampler="dpm++2m", steps=10) for o in starts(diffusion)]

    def start_rows() -> list[dict]:
        found = {}
        if Path(args.out).is_file():
            for line in Path(args.out).read_text().splitlines():
                r = json.loads(line)
                if r.get("stage") == "start" and r["model"] == args.model and r["n"] == args.num \
                        and r["network_dtype"] == base["network_dtype"]:
                    found[r["what"]] = r
        return list(found.values())

    if part == 1:
        for c in start_cfgs:
            measure(c, "start")
        best = min(start_rows(), key=lambda r: r["fid"])
        measure(dict(sampler="dpm++2m", spacing=best["spacing"], sigma_max=best["sigma_max"], steps=10,
                     clip_x0=False), "start")
    if parts == 1 or part == 2:
        for c in independent:
            measure(c, "nfe")
    while len(start_rows()) < len(start_cfgs) + 1:  # part 1's start stage, in another process
        time.sleep(30)
    best = min(start_rows(), key=lambda r: r["fid"])
    opts = dict(spacing=best["spacing"], sigma_max=best["sigma_max"], clip_x0=best["clip_x0"])
    print(f"best start at 10 NFE: {best['what']} (FID {best['fid']:.2f})", flush=True)
    dependent = [dict(opts, sampler=name, steps=k) for name in ODE for k in nfe_steps[name]]
    for c in dependent[part - 1::parts]:
        measure(c, "nfe")
    print("| model | stage | what | NFE | n | FID | KID x1e3 |\n| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['stage']} | {r['what']} | {r.get('nfe', '')} | {r['n']} | {r['fid']:.2f} | "
              f"{1e3 * r['kid_mean']:.2f} ± {1e3 * r['kid_std']:.2f} |")


if __name__ == "__main__":
    try:
        main()
    except DiskFullError as exc:  # the caches already written stay: the next run continues from them
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
