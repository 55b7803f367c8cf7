#!/usr/bin/env bash
# The one-command GPU run (benchmarks/gpu_run.py says what each stage does). On any CUDA machine:
#
#   make gpu-prep                 # here, once: pack Flowers102 into .carry/, the peers' wheels into .whl/
#   bash benchmarks/gpu_run.sh    # there (= make gpu): <= 9 minutes, <= 8 files <= 16 MiB in $OUT
#   bash benchmarks/gpu_run.sh --cpu   # the tiny CPU rehearsal of every stage (< 2 minutes; CI runs it)
#
# Output folder: $OUT when set, else results/gpu_run (results/gpu_run_cpu with --cpu).
# Wheels in .whl/ (diffusers, denoising-diffusion-pytorch and what they need that the machine lacks)
# are installed into a temporary folder first, offline, and put on PYTHONPATH for this run only.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
cpu=0
for a in "$@"; do [ "$a" = "--cpu" ] && cpu=1; done
if [ -z "${OUT:-}" ]; then
  if [ $cpu = 1 ]; then OUT=results/gpu_run_cpu; else OUT=results/gpu_run; fi
fi
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
site=""
if compgen -G ".whl/*.whl" >/dev/null; then
  site=$(mktemp -d "${TMPDIR:-/tmp}/gpu_run_site.XXXXXX")
  if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl \
      >"$site.log" 2>&1; then
    export PYTHONPATH="$PYTHONPATH:$site"   # after the clone: the machine's own torch etc. stay first
  else
    echo "[gpu_run] could not install the wheels in .whl/ (the peers will be skipped):"; cat "$site.log"
  fi
fi
# gpu_run.py budgets 515 s from its start to the end of its last stage (110 s on the CPU); this
# backstop, with the wheels' install (~5-10 s) before it, keeps the whole command under 9 minutes
limit=528; [ $cpu = 1 ] && limit=118
timeout --signal=TERM --kill-after=5 $limit "$PYTHON" benchmarks/gpu_run.py "$@" 2>&1 | tee "$OUT/run.log"
status=${PIPESTATUS[0]}
[ -n "$site" ] && rm -rf "$site" "$site.log"
exit "$status"
