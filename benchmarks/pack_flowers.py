"""Pack Oxford Flowers102 into one compact file that travels with the working tree to a GPU machine.

    python benchmarks/pack_flowers.py                     # -> .carry/flowers102.npz (about 31 MiB)
    python benchmarks/pack_flowers.py --limit 64 --out /tmp/f.npz   # a small one, for tests
    python benchmarks/pack_flowers.py --quality 90        # re-encoded 64x64 crops: about 22 MiB, lossy

The file is an .npz of the JPEG files' own bytes (no re-encoding: the course's copy of Flowers102
is already stored at 64 px on the shorter side, so packing them is lossless and smaller than
decoded pixels, which would be 8,189 x 64 x 64 x 3 = 96 MiB):

    jpeg        (total bytes,) uint8   the JPEG files, one after another, in Flowers102's image order
    offsets     (N + 1,) int64         image i is jpeg[offsets[i]:offsets[i + 1]]
    labels      (N,) int64             class index 0..101
    image_size  ()  int64              the side the loader crops/resizes every image to (64)

ddpm_nb reads it as dataset 'npy' (`DataConfig(dataset="npy", path=".carry/flowers102.npz")`):
every image is decoded, center-cropped to a square and resized to `image_size` when needed.
"""
from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # `python benchmarks/pack_flowers.py` in a clone: this clone's ddpm_nb first
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddpm_nb.utils import atomic_write_bytes, data_root, repo_root  # noqa: E402

DEFAULT_OUT = repo_root() / ".carry" / "flowers102.npz"


def find_flowers(root: Path) -> Path:
    """The Flowers102 folder (setid.mat, imagelabels.mat, jpg/) under `root`, as ddpm_nb.data looks for it."""
    from ddpm_nb.data import _flowers_dirs, _flowers_ok

    for d in _flowers_dirs(root):
        if _flowers_ok(d):
            return d
    raise FileNotFoundError(f"no Flowers102 under {root} (looked for flowers-102/ and flowers/flowers-102/ holding "
                            "setid.mat, imagelabels.mat and jpg/); pass --data DIR or set DDPM_NB_DATA")


def _reencode(data: bytes, size: int, quality: int) -> bytes:
    """The center square of a JPEG, resized to size x size, as a new JPEG of `quality`."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        if s != size:
            im = im.resize((size, size), Image.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=quality)
        return buf.getvalue()


def pack(folder: Path, out: Path, *, limit: int | None = None, image_size: int = 64,
         quality: int | None = None) -> dict:
    """Write the packed .npz of the Flowers102 images in `folder` (all splits, image order); returns its summary.

    quality=None keeps every JPEG's own bytes (lossless); a number re-encodes the center crop at
    image_size with that JPEG quality (smaller, lossy)."""
    from scipy.io import loadmat

    labels = loadmat(folder / "imagelabels.mat", squeeze_me=True)["labels"].astype(np.int64) - 1
    n = len(labels) if limit is None else min(limit, len(labels))
    chunks, offsets = [], [0]
    for i in range(n):
        b = (folder / "jpg" / f"image_{i + 1:05d}.jpg").read_bytes()
        if quality is not None:
            b = _reencode(b, image_size, quality)
        chunks.append(np.frombuffer(b, np.uint8))
        offsets.append(offsets[-1] + len(b))
    buf = io.BytesIO()
    np.savez(buf, jpeg=np.concatenate(chunks), offsets=np.asarray(offsets, np.int64), labels=labels[:n],
             image_size=np.int64(image_size))
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, buf.getvalue())
    return {"path": str(out), "images": n, "classes": int(labels[:n].max()) + 1, "bytes": out.stat().st_size}


def head(src: Path, out: Path, n: int) -> dict:
    """Write the first `n` images of a packed file to `out` (the CPU rehearsal's small copy); returns its summary."""
    with np.load(src, allow_pickle=False) as z:
        offsets = z["offsets"][:n + 1]
        arrays = dict(jpeg=z["jpeg"][:offsets[-1]], offsets=offsets, labels=z["labels"][:len(offsets) - 1],
                      image_size=z["image_size"])
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, buf.getvalue())
    return {"path": str(out), "images": len(offsets) - 1, "bytes": out.stat().st_size}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/pack_flowers.py", description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None, help="dataset root holding Flowers102 (default: $DDPM_NB_DATA or data/)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="the packed file (default: .carry/flowers102.npz)")
    p.add_argument("--limit", type=int, default=None, help="pack only the first N images (tests)")
    p.add_argument("--image-size", type=int, default=64, help="side the loader crops/resizes to (default 64)")
    p.add_argument("--quality", type=int, default=None,
                   help="re-encode the center crops at this JPEG quality (1-95; default: keep the files' bytes)")
    args = p.parse_args(argv)
    for flag, value, lo, hi in (("--limit", args.limit, 1, None), ("--image-size", args.image_size, 1, None),
                                ("--quality", args.quality, 1, 95)):
        if value is not None and (value < lo or (hi is not None and value > hi)):
            print(f"error: {flag} must be {'in ' + str(lo) + '..' + str(hi) if hi else '>= ' + str(lo)}, "
                  f"got {value}", file=sys.stderr)
            return 2
    try:
        folder = find_flowers(Path(args.data).expanduser() if args.data else data_root())
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    info = pack(folder, Path(args.out), limit=args.limit, image_size=args.image_size, quality=args.quality)
    print(f"packed {info['images']} Flowers102 images ({info['classes']} classes) into {info['path']}: "
          f"{info['bytes'] / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
