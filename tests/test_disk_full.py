"""A full disk, at every place the package writes: one `error:` line naming the file, the space needed and
free, and what was kept; exit status 2, no traceback; nothing already written lost; a run that resumes.

Where the test may mount a small tmpfs (root on Linux), the filesystem really fills up. Elsewhere the
in-process sites are checked with a writer that raises ENOSPC part-way (`full_writes`), which is also
what the tmpfs cannot show: a write that fails after some of its bytes went out.
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm_nb.checkpoint import CsvLog, load_checkpoint, save_checkpoint
from ddpm_nb.utils import DiskFullError, append_text, atomic_write_bytes, save_image

ROOT = Path(__file__).resolve().parents[1]


def _mount(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    if sys.platform != "linux" or os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A function size -> folder on a fresh tmpfs of that size (skips where mounting is not allowed)."""
    mounted = []

    def make(size: str) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        if not _mount(folder, size):
            pytest.skip("needs root on Linux to mount a small tmpfs (the ENOSPC-writer tests cover the rest)")
        mounted.append(folder)
        return folder

    yield make
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def _fill(folder: Path) -> None:
    """Take every free byte of `folder`'s filesystem (a file `filler`)."""
    with open(folder / "filler", "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def _cli(*args, cwd=None):
    env = {**os.environ, "DDPM_NB_THREADS": "1", "DDPM_NB_TINY": ""}
    return subprocess.run([sys.executable, "-m", "ddpm_nb", *args], capture_output=True, text=True, env=env,
                          cwd=cwd)


def _one_error_line(proc, *, names: str) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and proc.stderr.rstrip().endswith(errors[0]), proc.stderr
    line = errors[0]
    assert "could not write" in line and names in line and "no space left on the device" in line, line
    assert "free there" in line and "nothing was lost" in line.lower(), line
    return line


# ---- the real thing: a filesystem that fills up -------------------------------------------------------------
@pytest.mark.slow
def test_train_on_a_full_disk_stops_in_one_line_and_resumes_once_there_is_space(small_disk):
    disk = small_disk("3m")   # the tiny preset's checkpoint is 3.0 MB: step 10's fits, step 20's does not
    args = ["train", "--preset", "tiny", "--results-dir", str(disk), "--name", "t", "--no-progress"]
    proc = _cli(*args)
    line = _one_error_line(proc, names="latest.pt")
    assert "Training stopped at step 20" in line and "last good checkpoint, step 10" in line, line
    assert "continue with: python -m ddpm_nb train" in line and line.endswith("--resume"), line
    run = disk / "t"
    assert load_checkpoint(run)["step"] == 10          # the last good checkpoint loads
    assert not list((run / "checkpoints").glob(".*tmp*"))
    # resuming into the same full disk: the same one line, the checkpoint still step 10
    again = _one_error_line(_cli(*args, "--resume"), names="latest.pt")
    assert "last good checkpoint, step 10" in again and load_checkpoint(run)["step"] == 10
    subprocess.run(["mount", "-o", "remount,size=20m", str(disk)], check=True)
    done = _cli(*args, "--resume")
    assert done.returncode == 0, done.stderr
    assert "resumed at step 10" in done.stderr
    steps = [int(r["step"]) for r in CsvLog(run / "log.csv", []).rows()]
    assert steps == [5, 10, 15, 20, 25, 30]            # the log stayed consistent with the checkpoint: no duplicates
    assert load_checkpoint(run)["step"] == 30


@pytest.mark.slow
def test_sample_animate_and_fid_on_a_full_disk_are_one_line(small_disk):
    disk = small_disk("40k")   # room for the sample grid, not for the 16 single images after it
    common = ["fashion-quick-cond", "--num", "16", "--steps", "2", "--no-progress"]
    _one_error_line(_cli("sample", *common, "--out", str(disk / "s")), names=".png")
    assert not list(disk.rglob(".*tmp*"))
    full = small_disk("64k")
    (full / "f").mkdir()
    _fill(full)                # nothing fits
    _one_error_line(_cli("animate", *common, "--frames", "4", "--out", str(full / "a")), names="chain_dpm++2m-sde2_seed0.gif")
    _one_error_line(_cli("fid", "fashion-quick-cond", "--num", "10", "--steps", "2", "--batch", "10",
                         "--no-progress", "--out", str(full / "f")), names="fid.jsonl")
    assert (full / "f" / "fid.jsonl").read_text() == ""  # no half-written row


@pytest.mark.slow
def test_an_mp4_that_ffmpeg_could_not_finish_is_not_kept(small_disk):
    from ddpm_nb.animate import write_gif, write_mp4

    disk = small_disk("12k")
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(8)]  # noise: MP4 > 12 kB
    with pytest.raises(DiskFullError, match=r"could not write .*clip\.mp4.*Nothing was lost: no partial file"):
        write_mp4(frames, disk / "clip.mp4")
    assert not list(disk.iterdir())
    with pytest.raises(DiskFullError, match=r"clip\.gif"):
        write_gif(frames, disk / "clip.gif")
    assert not list(disk.iterdir())


def test_each_in_process_write_site_on_a_real_full_disk(small_disk):
    disk = small_disk("8k")
    (disk / "keep.bin").write_bytes(b"x" * 4096)
    (disk / "log.csv").write_text("step,loss\n1,0.5\n")
    sites = {
        "checkpoint": lambda: save_checkpoint({"w": torch.zeros(10_000)}, disk / "latest.pt"),
        "image": lambda: save_image(torch.rand(16, 3, 32, 32) * 2 - 1, disk / "grid.png"),
        "bytes": lambda: atomic_write_bytes(disk / "keep.bin", b"y" * 20_000),
        "csv": lambda: CsvLog(disk / "log.csv", ["step", "loss"]).append({"step": 2, "loss": "9" * 9000}),
        "jsonl": lambda: append_text(disk / "log.csv", "z" * 9000),
    }
    for name, write in sites.items():
        with pytest.raises(DiskFullError, match=r"could not write .*no space left.*free there.*Nothing was lost"):
            write()
    assert (disk / "keep.bin").read_bytes() == b"x" * 4096      # the old file, whole
    assert (disk / "log.csv").read_text() == "step,loss\n1,0.5\n"  # no partial row appended
    assert sorted(p.name for p in disk.iterdir()) == ["keep.bin", "log.csv"]


def test_the_scripts_write_atomically_on_a_full_disk(small_disk):
    sys.path.insert(0, str(ROOT / "scripts"))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import fid_table
        import make_site
    finally:
        sys.path[:2] = []
    disk = small_disk("4k")
    with pytest.raises(DiskFullError, match=r"real\.npy.*Nothing was lost"):
        fid_table.save_atomic(disk / "real.npy", np.zeros((100, 2048), np.float32))
    with pytest.raises(DiskFullError, match=r"big\.html"):
        make_site._atomic_write(disk / "big.html", "x" * 100_000)
    assert not (disk / "big.html").exists()


# ---- without a small filesystem: a writer that fails part-way ----------------------------------------------
def test_a_failed_append_leaves_no_partial_line(tmp_path, monkeypatch):
    path = tmp_path / "log.csv"
    log = CsvLog(path, ["step", "loss"])
    log.append({"step": 1, "loss": 0.5})
    before = path.read_bytes()
    real_write, calls = os.write, []

    def full(fd, data):  # the first chunk goes out, the second finds the disk full
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data)[:3])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(DiskFullError, match=r"log\.csv.*keeps every line written before"):
        log.append({"step": 2, "loss": 0.25})
    monkeypatch.undo()
    assert len(calls) == 2 and path.read_bytes() == before
    assert [r["step"] for r in log.rows()] == [1]


def test_the_fid_command_appends_whole_rows(tmp_path, monkeypatch):
    path = tmp_path / "fid.jsonl"
    append_text(path, json.dumps({"fid": 1.0}) + "\n")
    monkeypatch.setattr(os, "write", lambda fd, data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(DiskFullError, match=r"fid\.jsonl.*needs about 0 kB"):
        append_text(path, json.dumps({"fid": 2.0}) + "\n")
    monkeypatch.undo()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"fid": 1.0}]
