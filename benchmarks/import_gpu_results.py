"""Turn the output folder of benchmarks/gpu_run.sh into committed results.

    python benchmarks/import_gpu_results.py OUTDIR            # e.g. the folder the device tool brought back

What it does (on any machine, CPU is fine):

1. checks the folder: summary.json, every file gpu_run.py promises, each <= 16 MiB;
2. copies the benchmark rows to results/bench/gpu_run-<device>.jsonl and writes (or replaces) one
   section of results/BENCHMARKS.md labelled with the device: the stages with their budgets, the
   training ladder, the peers side by side with the ratio to the faster peer, sampling speeds, the
   GIF chain, and the Flowers-64 run;
3. copies the Flowers sample grid and denoising GIF to results/figures/gpu_run-<device>-*;
4. decides whether the Flowers model ships: only if its FID beats the CPU Flowers model's
   (ddpm_nb.pretrained("flowers-cpu-cond"), ddpm_nb/assets/flowers_cpu_cond.pt) at the same n:
   the same number of samples, the same sampler, guidance and labels, the same real images and the
   same feature extractor, compared at the smaller of the two models' image sizes (so resolution
   alone cannot win). If it wins, the weights go to ddpm_nb/assets/flowers_gpu_cond.pt with a JSON
   beside them. If the CPU model or the Inception weights are not there, it says so and ships nothing.

A rehearsal folder (`gpu_run.sh --cpu`) imports the same way; its rows are labelled as CPU rows.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import re
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/import_gpu_results.py` in a clone: this clone's ddpm_nb first
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.bench import markdown_tables  # noqa: E402
from benchmarks.gpu_run import MAX_BYTES, OUTPUTS, PEER_MODELS, SUMMARY_VERSION  # noqa: E402
from ddpm_nb.shipped import write_record  # noqa: E402
from ddpm_nb.utils import repo_root  # noqa: E402

ASSET_NAME = "flowers_gpu_cond"


class NotARunFolder(ValueError):
    """The folder is not a usable gpu_run output."""


def read_output(folder: Path) -> tuple[dict, list[dict]]:
    """(summary, bench rows) of a gpu_run output folder, after checking what it promises."""
    path = folder / "summary.json"
    if not path.is_file():
        raise NotARunFolder(f"{folder} has no summary.json: is it the output folder of benchmarks/gpu_run.sh?")
    summary = json.loads(path.read_text())
    if summary.get("summary_version") != SUMMARY_VERSION:
        raise NotARunFolder(f"{path}: summary_version {summary.get('summary_version')}, expected {SUMMARY_VERSION}")
    for name in OUTPUTS:
        f = folder / name
        if f.is_file() and f.stat().st_size > MAX_BYTES:
            raise NotARunFolder(f"{f} is over 16 MiB")
    bench = folder / "bench.jsonl"
    rows = [json.loads(line) for line in bench.read_text().splitlines() if line.strip()] if bench.is_file() else []
    return summary, rows


def device_label(summary: dict) -> tuple[str, str]:
    """(label for headings, tag for file names): 'NVIDIA H200', 'h200'; or the CPU's, 'cpu'."""
    env = summary.get("env") or {}
    if env.get("gpu"):
        name = env["gpu"]
        return name, re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-") or "gpu"
    return f"{env.get('device_name') or 'CPU'} (the CPU rehearsal, gpu_run.sh --cpu)", "cpu"


def peer_ratios(rows: list[dict]) -> list[str]:
    """Lines: ours vs the faster peer at each (preset, batch, setting) where both were measured."""
    out = []
    keys = {(r["preset"], r["batch"], r.get("setting")) for r in rows if r.get("bench") == "peers"}
    for key in sorted(keys, key=str):
        ips = {r["model"]: r["images_per_s"] for r in rows if r.get("bench") == "peers"
               and (r["preset"], r["batch"], r.get("setting")) == key and r.get("images_per_s")}
        peers = {m: v for m, v in ips.items() if m in PEER_MODELS}
        if "ddpm_nb.UNet" in ips and peers:
            best = max(peers, key=peers.get)
            out.append(f"- {key[0]}, batch {key[1]}, {key[2]}: ddpm_nb {ips['ddpm_nb.UNet']:.1f} img/s, the faster "
                       f"peer {best} {peers[best]:.1f} img/s: **{ips['ddpm_nb.UNet'] / peers[best]:.2f}x**")
    return out


def section(summary: dict, rows: list[dict], *, label: str, tag: str, figures: dict, decision: dict) -> str:
    """The Markdown section of BENCHMARKS.md for one gpu_run output (between markers, replaced on re-import)."""
    env = summary.get("env") or {}
    lines = [f"<!-- {tag} start -->", f"## GPU run: {label}", "",
             f"`bash benchmarks/gpu_run.sh{' --cpu' if summary['mode'] == 'cpu' else ''}` "
             f"({summary['mode']} mode), started {summary['started']}, {summary.get('wall_s', 0):.0f} s wall of a "
             f"{summary['total_budget_s']:.0f} s budget; imported {_dt.date.today().isoformat()} with "
             "`python benchmarks/import_gpu_results.py`.", "",
             "Environment: " + ", ".join(f"{k} {env[k]}" for k in ("gpu", "device_name", "driver", "torch", "cuda",
                                                                     "bf16") if env.get(k) not in (None, "")) +
             ", peers " + (", ".join(f"{m} {v}" for m, v in env.get("peers", {}).items()) or "not installed") + ".",
             "", "| stage | status | budget s | took s | note |", "|---|---|---|---|---|"]
    for name, st in summary["stages"].items():
        note = st.get("error") or ("; ".join(f"{m}: {v}" for m, v in st["peers"].items()) if "peers" in st else "")
        lines.append(f"| {name} | {st['status']} | {st['budget_s']:.0f} | {st['seconds']:.1f} | {note} |")
    lines += ["", markdown_tables(rows), ""]
    ratios = peer_ratios(rows)
    if ratios:
        lines += ["Ours against the faster peer (same batch, precision and step):", "", *ratios, ""]
    fl = summary.get("flowers")
    if fl:
        u = fl["config"]["unet"]
        s = fl.get("samples") or {"n": 0, "steps": "-", "guidance_scale": "-", "labels": "-", "seconds": 0.0}
        fl.setdefault("gif", {"sampler": "none (stopped before)", "images": 0, "seconds": 0.0})
        loss = "—" if fl["final_loss"] is None else f"{fl['final_loss']:.4f}"
        lines += [f"#### Flowers102 at {u['image_size']} px, class-conditional ({fl['params'] / 1e6:.2f}M parameters)",
                  "",
                  f"{fl['steps']:,} steps of {fl['batch']} ({fl['epochs']} epochs of {fl['images']:,} images) in "
                  f"{fl['train_s']:.0f} s, {fl['images_per_s']:.0f} img/s including the step's host sync and EMA; "
                  f"final loss {loss}; torch.compile: {fl['compile'].get('why')}. EMA weights in "
                  f"fp16: {fl['model_bytes'] / 2**20:.1f} MiB. {s['n']:,} samples (DDIM-{s['steps']}, guidance "
                  f"{s['guidance_scale']}, labels {s['labels']}) in {s['seconds']:.1f} s; "
                  f"GIF: {fl['gif']['sampler']}, {fl['gif']['images']} images, {fl['gif']['seconds']:.1f} s.", ""]
        for kind, path in figures.items():
            lines.append(f"![{kind}]({path})" if kind == "grid" else f"[{kind}]({path})")
        lines += ["", f"Shipped? {decision['summary']}", ""]
    lines.append(f"<!-- {tag} end -->")
    return "\n".join(lines)


def replace_section(text: str, tag: str, new: str) -> str:
    """`text` with the section of `tag` replaced by `new` (appended when there is none)."""
    pattern = re.compile(rf"<!-- {re.escape(tag)} start -->.*?<!-- {re.escape(tag)} end -->", re.S)
    if pattern.search(text):
        return pattern.sub(lambda _: new, text)
    return text.rstrip("\n") + "\n\n" + new + "\n"


# ---- the model decision ------------------------------------------------------------------------
def load_samples(folder: Path, files: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The Flowers samples: (N, 3, H, W) float in [-1, 1] and (N,) labels."""
    images, labels = [], []
    for name in files:
        with np.load(folder / name, allow_pickle=False) as z:
            images.append(z["images"])
            labels.append(z["labels"])
    x = torch.from_numpy(np.concatenate(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, torch.from_numpy(np.concatenate(labels))


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size:
        return x
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", antialias=True,
                                           align_corners=False).clamp(-1, 1)


def make_extractor(kind: str, weights: str | None):
    from ddpm_nb import metrics

    if kind == "fashion":  # mechanics only (tests): its FashionMNIST features say little about flowers
        return metrics.FashionMNISTFeatures()
    return metrics.InceptionFeatures(weights, download=False)  # offline: the cache or `weights`


def real_flowers(size: int, n: int, pack: Path | None, *, prefer_pack: bool = False) -> torch.Tensor:
    """n real Flowers102 images (N, 3, size, size) in [-1, 1], a fixed random choice: from the data
    root ($DDPM_NB_DATA or data/), else from the packed file (first when `prefer_pack`)."""
    from ddpm_nb.config import DataConfig
    from ddpm_nb.data import DatasetNotFoundError, load_dataset

    packed = DataConfig(dataset="npy", path=str(pack), split="all", hflip=False) if pack and pack.is_file() else None
    if prefer_pack and packed is not None:
        ds = load_dataset(packed, size, train=False)
    else:
        try:
            ds = load_dataset(DataConfig(dataset="flowers102", split="all", hflip=False), size, train=False)
        except DatasetNotFoundError:
            if packed is None:
                raise
            ds = load_dataset(packed, size, train=False)
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n]
    return torch.stack([ds[int(i)][0] for i in idx])


def decide(gpu_fid: float | None, cpu_fid: float | None) -> bool:
    """Ship the GPU model only when both FIDs exist and the GPU one is lower as reported (2 decimals)."""
    return gpu_fid is not None and cpu_fid is not None and round(gpu_fid, 2) < round(cpu_fid, 2)


def compare_models(folder: Path, summary: dict, *, cpu_model: Path | None, extractor: str, weights: str | None,
                   n: int | None, real_pack: Path | None, prefer_pack: bool = False, device: str = "cpu") -> dict:
    """FID of the GPU run's samples and of the CPU model's, same n, sampler, labels, real images and extractor."""
    from ddpm_nb import metrics
    from ddpm_nb.sample import ddim_sample
    from ddpm_nb.checkpoint import load_model

    fl = summary.get("flowers")
    if not fl or "samples" not in fl:
        return {"ship": False, "summary": "no: the run brought back no Flowers samples to score"}
    if cpu_model is None or not cpu_model.is_file():
        return {"ship": False, "summary": f"no: there is no CPU Flowers model to compare with ({cpu_model}); "
                                          "rerun the import once it exists"}
    try:
        ext = make_extractor(extractor, weights)
    except (metrics.InceptionUnavailableError, FileNotFoundError) as exc:
        return {"ship": False, "summary": f"no: FID needs Inception features, which are not available here "
                                          f"({str(exc).splitlines()[0]}); rerun with --inception-weights FILE"}
    s = fl["samples"]
    gpu_x, gpu_y = load_samples(folder, s["files"])
    n = min(n or len(gpu_x), len(gpu_x))
    gpu_x, gpu_y = gpu_x[:n], gpu_y[:n]
    print(f"FID at n={n}: sampling the CPU model, then features of {4 * n} images (Inception on a CPU: "
          "about a minute per 100 images on one busy core)", file=sys.stderr)
    model, diffusion, cfg = load_model(cpu_model, device=device)
    size = min(gpu_x.shape[-1], cfg.unet.image_size)
    real = real_flowers(size, 2 * n, real_pack, prefer_pack=prefer_pack)
    g = torch.Generator(device).manual_seed(int(s.get("seed", 0)))
    batches = []
    batch = int(s.get("batch", 256))
    for start in range(0, n, batch):  # the protocol of gpu_run.py: DDIM, eta 0, guidance, labels, seed, batches
        y = gpu_y[start:start + batch].to(device)
        batches.append(ddim_sample(model, diffusion, (len(y), 3, cfg.unet.image_size, cfg.unet.image_size),
                                   steps=int(s["steps"]), y=y, guidance_scale=float(s["guidance_scale"]),
                                   generator=g, progress=False, device=device).cpu())
    cpu_x = torch.cat(batches)
    # the real images' features once, for both models: n references + n more for the real-vs-real baseline
    feats = metrics.compute_features(ext, real, 128, desc="real features")
    ref = metrics.ReferenceStats.from_features(feats, dataset="flowers102", split="all", image_size=size,
                                               extractor=str(getattr(ext, "name", type(ext).__name__)))
    kw = dict(num_samples=n, batch_size=128, verbose=False)
    gpu = metrics.evaluate(_resize(gpu_x, size), ref, ext, **kw)
    cpu = metrics.evaluate(_resize(cpu_x, size), ref, ext, **kw)
    ship = decide(gpu["fid"], cpu["fid"])
    verdict = "yes" if ship else "no"
    return {"ship": ship, "n": n, "image_size": size, "extractor": gpu["extractor"], "gpu": gpu, "cpu": cpu,
            "cpu_model": str(cpu_model),
            "summary": f"{verdict}: FID {gpu['fid']:.2f} (GPU run) vs {cpu['fid']:.2f} (CPU model {cpu_model.name}) "
                       f"at n={n}, {size} px, {gpu['extractor']} features, DDIM-{s['steps']} guidance "
                       f"{s['guidance_scale']}; real vs real {gpu['fid_real_vs_real']:.2f}"}


def ship_model(folder: Path, summary: dict, decision: dict, assets: Path, label: str) -> Path:
    """Copy the fp16 EMA weights into the package's assets with a JSON record beside them."""
    assets.mkdir(parents=True, exist_ok=True)
    dst = assets / f"{ASSET_NAME}.pt"
    shutil.copyfile(folder / "flowers_ema_fp16.pt", dst)
    fl = summary["flowers"]
    info = {"what": f"EMA weights (fp16) + RunConfig of a class-conditional Flowers102 UNet, "
                    f"{fl['config']['unet']['image_size']} px, {fl['params'] / 1e6:.2f}M parameters",
            "trained_with": "bash benchmarks/gpu_run.sh (its flowers stage)", "device": label,
            "steps": fl["steps"], "batch_size": fl["batch"], "train_seconds": fl["train_s"],
            "final_loss": fl["final_loss"], "fid": {k: decision[k] for k in ("n", "image_size", "extractor")} |
            {"gpu_run": decision["gpu"]["fid"], "cpu_model": decision["cpu"]["fid"],
             "real_vs_real": decision["gpu"]["fid_real_vs_real"]},
            "date": summary["started"],
            "load_with": f'ddpm_nb.checkpoint.load_model("ddpm_nb/assets/{ASSET_NAME}.pt")'}
    write_record(dst, info, keep=())
    return dst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/import_gpu_results.py",
                                description="Import a benchmarks/gpu_run.sh output folder into results/ (and "
                                            "ship its Flowers model when it beats the CPU one by FID).")
    p.add_argument("folder", help="the output folder of gpu_run.sh")
    p.add_argument("--results", default=None, help="results folder (default: the repository's results/)")
    p.add_argument("--assets", default=None, help="where a shipped model goes (default ddpm_nb/assets/)")
    p.add_argument("--cpu-model", default=None,
                   help="the CPU Flowers model to beat (default ddpm_nb/assets/flowers_cpu_cond.pt)")
    p.add_argument("--fid-n", type=int, default=None, help="samples per model for FID (default: all the run's)")
    p.add_argument("--extractor", choices=["inception", "fashion"], default="inception",
                   help="features for FID (fashion: mechanics only, for tests)")
    p.add_argument("--inception-weights", default=None, help="local Inception weights (offline)")
    p.add_argument("--real-pack", default=None, help="read the real images from this packed Flowers102 (default: "
                                                     "the data root, else .carry/flowers102.npz)")
    p.add_argument("--no-fid", action="store_true", help="import the numbers only; decide nothing about the model")
    args = p.parse_args(argv)
    from ddpm_nb.utils import set_threads
    set_threads()  # $DDPM_NB_THREADS, as everywhere in ddpm_nb
    folder = Path(args.folder)
    results = Path(args.results) if args.results else repo_root() / "results"
    try:
        summary, rows = read_output(folder)
        if args.fid_n is not None and args.fid_n < 2:
            raise NotARunFolder(f"--fid-n must be >= 2, got {args.fid_n}")
    except (NotARunFolder, json.JSONDecodeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    label, tag = device_label(summary)
    tag = f"gpu_run-{tag}"
    (results / "bench").mkdir(parents=True, exist_ok=True)
    jsonl = results / "bench" / f"{tag}.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    figures = {}
    for kind, name, suffix in (("grid", "flowers_samples.png", "samples.png"),
                               ("GIF", "flowers_chain.gif", "chain.gif")):
        if (folder / name).is_file():
            dst = results / "figures" / f"{tag}-flowers-{suffix}"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / name, dst)
            figures[kind] = f"figures/{dst.name}"
    if args.no_fid:
        decision = {"ship": False, "summary": "not decided (--no-fid)"}
    else:
        cpu_model = Path(args.cpu_model) if args.cpu_model else \
            Path(__file__).resolve().parents[1] / "ddpm_nb" / "assets" / "flowers_cpu_cond.pt"
        pack = Path(args.real_pack) if args.real_pack else repo_root() / ".carry" / "flowers102.npz"
        decision = compare_models(folder, summary, cpu_model=cpu_model, extractor=args.extractor,
                                  weights=args.inception_weights, n=args.fid_n, real_pack=pack,
                                  prefer_pack=args.real_pack is not None)
    if decision["ship"]:
        assets = Path(args.assets) if args.assets else Path(__file__).resolve().parents[1] / "ddpm_nb" / "assets"
        dst = ship_model(folder, summary, decision, assets, label)
        decision["summary"] += f"; shipped as {dst.name} (register it in ddpm_nb/shipped.py PRETRAINED to load it " \
                               "with ddpm_nb.pretrained)"
    md = results / "BENCHMARKS.md"
    text = md.read_text() if md.is_file() else "# Benchmarks\n"
    md.write_text(replace_section(text, tag, section(summary, rows, label=label, tag=tag, figures=figures,
                                                     decision=decision)))
    (results / "bench" / f"{tag}-decision.json").write_text(json.dumps(decision, indent=1, default=float) + "\n")
    print(f"imported {folder} ({label}): {len(rows)} benchmark rows -> {jsonl}; section '{tag}' of {md}")
    print(f"Flowers model shipped? {decision['summary']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
