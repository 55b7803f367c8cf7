"""Export a training run as a shipped model: EMA weights + config into ddpm_nb/assets/<file>.pt and
a JSON record beside it (command, steps, images seen, wall time, device, validation loss, date).

    python scripts/ship_model.py results/flowers-cpu flowers-cpu-cond \
        --command "DDPM_NB_DATA=... python -m ddpm_nb train --preset flowers-cpu --name flowers-cpu --threads 1"

The model must be listed in ddpm_nb.shipped.PRETRAINED (that is where its file name comes from).
Quality figures (FID/KID) are added to the JSON afterwards: python benchmarks/fid_table.py NAME --record.
"""
from __future__ import annotations

import argparse
import csv
import platform
import time
from pathlib import Path

import torch

from ddpm_nb.shipped import ASSETS, PRETRAINED, write_record
from ddpm_nb.checkpoint import export_weights, load_checkpoint


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="the run folder (results/<name>)")
    p.add_argument("name", help="the shipped model's name in ddpm_nb.shipped.PRETRAINED")
    p.add_argument("--command", required=True, help="the exact training command, for the record")
    p.add_argument("--device", default=f"CPU ({platform.processor() or platform.machine()}), 2 cores, "
                                        f"1 torch thread, bf16 autocast", help="where it was trained")
    p.add_argument("--note", default="", help="anything else a reader should know")
    args = p.parse_args(argv)
    run = Path(args.run)
    dst = ASSETS / PRETRAINED[args.name][0]
    state = load_checkpoint(run)
    export_weights(run, dst, ema=True)
    cfg = state["config"]
    rows = list(csv.DictReader(open(run / "log.csv")))
    val = list(csv.DictReader(open(run / "val.csv"))) if (run / "val.csv").exists() else []
    # time_s restarts at each (re)start of the run: sum the segments
    wall, last = 0.0, 0.0
    for r in rows:
        t = float(r["time_s"])
        wall += t - last if t >= last else t
        last = t
    record = {
        "what": PRETRAINED[args.name][1],
        "load_with": f'ddpm_nb.pretrained("{args.name}")',
        "trained_with": args.command,
        "exported_with": f"python scripts/ship_model.py {args.run} {args.name} --command ...",
        "steps": int(state["step"]),
        "steps_planned": int(cfg["train"]["steps"]),
        "batch_size": int(cfg["train"]["batch_size"]),
        "images_seen": int(state["step"]) * int(cfg["train"]["batch_size"]),
        "lr": cfg["train"]["lr"],
        "ema_decay": cfg["train"]["ema_decay"],
        "wall_minutes": round(wall / 60, 1),
        "device": args.device,
        "torch": torch.__version__,
        "final_val_loss": float(val[-1]["val_loss"]) if val else None,
        "final_val_loss_ema": float(val[-1]["val_loss_ema"]) if val else None,
        "val_step": int(val[-1]["step"]) if val else None,
        "date": time.strftime("%Y-%m-%d"),
    }
    if args.note:
        record["note"] = args.note
    out = write_record(dst, record, keep=("quality",))  # quality figures measured earlier stay
    print(f"wrote {dst} ({dst.stat().st_size / 1e6:.2f} MB) and {out}")


if __name__ == "__main__":
    main()
