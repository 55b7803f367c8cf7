"""Train the small FashionMNIST classifier whose features `ddpm_nb.metrics.FashionMNISTFeatures` uses.

    python scripts/train_fashion_classifier.py                # 3-6 minutes on 2 CPU cores, 92 % test accuracy
    python scripts/train_fashion_classifier.py --epochs 5 --out /tmp/clf.pt

Reads the four FashionMNIST .gz files with NumPy (no torchvision, no download) from --data,
else $DDPM_NB_DATA, else the repository's data/
(each either the folder that holds the .gz files or one with FashionMNIST/raw/ inside).
Prints the test accuracy after every epoch and writes, atomically,
  ddpm_nb/assets/fashion_mnist_classifier.pt    a state_dict (load with weights_only=True)
  ddpm_nb/assets/fashion_mnist_classifier.json  accuracy, epochs, date, sha256, sizes, settings
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from ddpm_nb.data import read_idx  # noqa: E402
from ddpm_nb.metrics import FASHION_MNIST_WEIGHTS, FashionMNISTClassifier  # noqa: E402
from ddpm_nb.utils import atomic_write_bytes, repo_root, seed_everything  # noqa: E402

FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

def find_raw_dir(explicit: str | None) -> Path:
    """The folder holding the four FashionMNIST .gz files."""
    candidates = []
    if explicit:
        candidates.append(Path(explicit))
    if os.environ.get("DDPM_NB_DATA"):
        candidates.append(Path(os.environ["DDPM_NB_DATA"]))
    candidates.append(repo_root() / "data")
    for base in candidates:
        base = base.expanduser()
        for folder in (base, base / "FashionMNIST" / "raw", base / "raw"):
            if all((folder / f).is_file() for f in FILES.values()):
                return folder
    raise SystemExit(
        "FashionMNIST .gz files not found in any of: " + ", ".join(str(c) for c in candidates)
        + f". Put {', '.join(FILES.values())} in one folder and pass --data FOLDER (or set DDPM_NB_DATA)."
    )

def load_split(raw: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 1, 28, 28) float32 in [-1, 1] and (N,) int64 labels, from the .gz files (`ddpm_nb.data.read_idx`)."""
    images, labels = read_idx(raw / FILES[f"{split}_images"]), read_idx(raw / FILES[f"{split}_labels"])
    x = torch.from_numpy(images.copy()).float().div_(127.5).sub_(1.0).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))

@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(x), batch_size))
    return correct / len(x)

def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=None, help="folder with the FashionMNIST .gz files")
    parser.add_argument("--epochs", type=int, default=3, help="passes over the 60k training images")
    parser.add_argument("--batch-size", type=int, default=128, help="training batch size")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the one-cycle schedule")
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="AdamW weight decay")
    parser.add_argument("--seed", type=int, default=0, help="seed for init, shuffling and flips")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", default=str(FASHION_MNIST_WEIGHTS), help="where to write the .pt state_dict")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    gen = seed_everything(args.seed)
    raw = find_raw_dir(args.data)
    x_train, y_train = load_split(raw, "train")
    x_test, y_test = load_split(raw, "test")
    print(f"data: {raw} ({len(x_train)} train, {len(x_test)} test)")

    from tqdm.auto import tqdm

    model = FashionMNISTClassifier()
    steps_per_epoch = -(-len(x_train) // args.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch)
    start = time.time()
    acc = 0.0
    for epoch in range(1, args.epochs + 1):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{args.epochs}")
        for step in bar:
            idx = perm[step * args.batch_size:(step + 1) * args.batch_size]
            x, y = x_train[idx], y_train[idx]
            flip = torch.rand(len(x), generator=gen) < 0.5  # clothes look the same mirrored
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = F.cross_entropy(model(x), y, label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
        acc = accuracy(model, x_test, y_test)
        print(f"epoch {epoch}: test accuracy {100 * acc:.2f}% ({time.time() - start:.0f} s)")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, buf)
    data = buf.getvalue()
    atomic_write_bytes(out, data)
    meta = {
        "file": out.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "parameters": sum(p.numel() for p in model.parameters()),
        "feature_dim": FashionMNISTClassifier.feature_dim,
        "test_accuracy": round(acc, 4),
        "test_images": len(x_test),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "seed": args.seed,
        "train_seconds": round(time.time() - start, 1),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "architecture": "ddpm_nb.metrics.FashionMNISTClassifier",
        "input": "(B, 1, 28, 28) in [-1, 1]",
        "trained_by": "scripts/train_fashion_classifier.py",
    }
    atomic_write_bytes(out.with_suffix(".json"), (json.dumps(meta, indent=2) + "\n").encode())
    print(f"test accuracy {100 * acc:.2f}% -> {out} ({len(data) / 1e6:.2f} MB, sha256 {meta['sha256'][:12]}...)")
    return acc

if __name__ == "__main__":
    main()
