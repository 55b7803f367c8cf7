#!/usr/bin/env bash
# Prepare the GPU run (= make gpu-prep), on a machine with the data and internet for pip:
#   1. pack Flowers102 into .carry/flowers102.npz (benchmarks/pack_flowers.py; $DDPM_NB_DATA or data/);
#   2. download the peers' wheels into .whl/: diffusers, denoising-diffusion-pytorch and the three
#      packages they need that the GPU image lacks (its list: torch, torchvision, einops, accelerate,
#      huggingface-hub, safetensors, scipy, ... are there);
#   3. print the size of what travels: the working tree (tracked + untracked, not ignored) + .whl + .carry.
# Both folders are ignored by git; name them in the device tool's `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS="diffusers==0.42.1 denoising-diffusion-pytorch==2.3.4 ema-pytorch==0.8.3 pytorch-fid==0.3.0 importlib_metadata==8.9.0"
# The JPEGs' own bytes (lossless, ~31 MiB) while they fit beside the tree; with the rendered site/ in the tree
# they do not, so then re-encoded 64x64 crops at JPEG quality 90 (~22 MiB): PACK_QUALITY=0 forces lossless.
tree_mib=$(( $(git ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1) / 1048576 ))
PACK_QUALITY=${PACK_QUALITY:-$([ "$tree_mib" -gt 26 ] && echo 90 || echo 0)}
[ -f .carry/flowers102.npz ] || "$PYTHON" benchmarks/pack_flowers.py $([ "$PACK_QUALITY" != 0 ] && echo --quality "$PACK_QUALITY")
mkdir -p .whl
# pure-Python wheels: any platform tag works; the GPU image runs CPython 3.12 on x86-64
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 -d .whl $WHEELS
tree=$(git ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
whl=$(du -cb .whl/*.whl | tail -1 | cut -f1)
carry=$(du -cb .carry | tail -1 | cut -f1)
total=$((tree + whl + carry))
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
echo "travels: tree $(mib $tree) + .whl $(mib $whl) + .carry $(mib $carry) = $(mib $total) (limit 64 MiB)"
if [ "$total" -gt $((64 * 1048576)) ]; then echo "error: over the 64 MiB that may travel: rm .carry/flowers102.npz and rerun with PACK_QUALITY=85" >&2; exit 2; fi
if [ "$total" -gt $((60 * 1048576)) ]; then echo "warning: less than 4 MiB left under the 64 MiB limit"; fi
