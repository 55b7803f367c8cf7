"""A sampler's own work per step against the network call it wraps, at batch 64 on the CPU.

    python benchmarks/sampler_overhead.py fashion-quick-cond --batch 64 --steps 20

For each registered sampler: the chain timed twice in the same process, once with the shipped network
and once with a stand-in that returns a precomputed output of the right shape at no cost. The second
time is the sampler's own work (levels, predict, the update, noise, the loop); the first minus the second
is the network's. Their ratio per network call is the overhead (the goal: <= 5 %). Repeated --repeat
times, interleaved, medians printed, so both sides see the same machine load.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

import ddpm_nb
from ddpm_nb.sample import SAMPLERS, sample
from ddpm_nb.train import cpu_native_bf16


class Free(nn.Module):
    """A network that costs nothing: the same output tensor every call (cloned, as a real output is new)."""

    def __init__(self, model, out):
        super().__init__()
        self.cfg, self.out, self.p = model.cfg, out, nn.Parameter(torch.zeros(1))

    def forward(self, x, t, y=None):
        return self.out.clone()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default="fashion-quick-cond")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="append the rows to this JSONL file")
    args = p.parse_args(argv)
    ddpm_nb.utils.set_threads(args.threads)
    model, diffusion, cfg = ddpm_nb.pretrained(args.model, device="cpu")
    dtype = torch.bfloat16 if cpu_native_bf16() else None
    c = cfg.unet
    y = torch.arange(args.batch) % c.num_classes if c.num_classes else None
    out = 0.1 * torch.randn(args.batch, c.in_channels, c.image_size, c.image_size)
    free = Free(model, out)
    rows = []
    for name, s in SAMPLERS.items():
        steps = args.steps
        times = {"network": [], "free": []}
        for _ in range(args.repeat):
            for which, net in (("network", model), ("free", free)):
                t0 = time.perf_counter()
                sample(net, diffusion, args.batch, sampler=name, steps=steps, y=y, progress=False, device="cpu",
                       generator=torch.Generator().manual_seed(0), dtype=dtype)
                times[which].append(time.perf_counter() - t0)
        calls = s.nfe(steps)
        full, own = statistics.median(times["network"]), statistics.median(times["free"])
        row = dict(model=args.model, sampler=name, batch=args.batch, steps=steps, nfe=calls,
                   network_dtype="bf16" if dtype else "fp32", threads=torch.get_num_threads(),
                   ms_per_call=1e3 * (full - own) / calls, sampler_ms_per_call=1e3 * own / calls,
                   overhead=own / (full - own), date=time.strftime("%Y-%m-%d"))
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("| sampler | NFE | network ms/call | sampler's own ms/call | overhead |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['sampler']} | {r['nfe']} | {r['ms_per_call']:.1f} | {r['sampler_ms_per_call']:.2f} | "
              f"{100 * r['overhead']:.1f} % |")
    if args.out:
        from ddpm_nb.utils import append_text
        append_text(args.out, "".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
