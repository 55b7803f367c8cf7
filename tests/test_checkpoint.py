"""The run folder and checkpoints: nothing a run wrote is lost, one process owns a run, every
damaged or unwritable file ends in one clear message (ddpm_nb/checkpoint.py)."""
import csv
import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from ddpm_nb.__main__ import main
from ddpm_nb.checkpoint import (CheckpointError, RunFolder, RunInUseError, load_checkpoint, load_model,
                                load_weights)
from ddpm_nb.config import preset
from ddpm_nb.train import Trainer, TrainingDivergedError
from ddpm_nb.unet import UNet
from ddpm_nb.utils import DiskFullError, save_image


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 1, 16, 16, generator=g) * 2 - 1, torch.randint(0, 10, (n,), generator=g))


def _cfg(**over):
    base = {"train.steps": 8, "train.ckpt_every": 4, "train.sample_every": 8, "train.eval_every": 4,
            "train.log_every": 1, "train.num_samples": 4, "train.sample_steps": 3, "train.batch_size": 8,
            "train.ema_decay": 0.9}
    return preset("tiny", **{**base, **over})


def _trainer(run, cfg=None, resume=False):
    return Trainer(cfg or _cfg(), run_dir=run, device="cpu", resume=resume, progress=False,
                   train_dataset=_data(), val_dataset=_data(16, seed=1))


def _steps(path: Path) -> list[int]:
    with open(path, newline="") as fh:
        return [int(r["step"]) for r in csv.DictReader(fh)]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---- defect 1: a kill while resume trims the logs loses no row -------------------------------
def test_kill_during_log_trim_on_resume_keeps_every_row(tmp_path, monkeypatch):
    run = tmp_path / "run"
    tr = _trainer(run)
    tr.train(until=4)  # checkpoint at 4, rows 1..4 logged
    for step in (5, 6):  # rows of an attempt killed before its next checkpoint
        tr.folder.log.append({"step": step, "loss": 0.5})
    tr.close()
    before = (run / "log.csv").read_bytes()
    assert _steps(run / "log.csv") == [1, 2, 3, 4, 5, 6]

    def killed(self, rows):  # the process dies half way through rewriting the file
        raise KeyboardInterrupt("killed while trimming")

    monkeypatch.setattr(csv.DictWriter, "writerows", killed)
    with pytest.raises(KeyboardInterrupt):
        _trainer(run, resume=True)
    monkeypatch.undo()
    assert (run / "log.csv").read_bytes() == before  # untouched: the rewrite goes to a temp file
    assert not list(run.glob(".*.tmp-*"))
    tr = _trainer(run, resume=True)  # and a clean resume trims to the checkpoint
    assert tr.step == 4 and _steps(run / "log.csv") == [1, 2, 3, 4]


# ---- defect 2: one process owns a run folder --------------------------------------------------
HOLDER = textwrap.dedent("""
    import sys, time
    from ddpm_nb.checkpoint import RunFolder
    RunFolder(sys.argv[1]).open(resume=True)
    print("holding", flush=True)
    time.sleep(120)
""")


def test_second_process_is_refused_and_a_stale_lock_is_taken_over(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(RunInUseError, match=rf"in use by another training process \(PID {holder.pid}\)"):
            _trainer(run)
        with pytest.raises(RunInUseError, match=str(holder.pid)):
            _trainer(run, resume=True)
        assert not (run / "config.yaml").exists() and not (run / "log.csv").exists()
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind with its PID, the lock itself dies
        holder.wait()
    assert (run / ".lock").read_text().strip() == str(holder.pid)
    tr = _trainer(run)  # the stale lock is taken over
    assert (run / ".lock").read_text().strip() == str(os.getpid())
    tr.train(until=2)
    tr.close()


def test_the_same_process_may_open_its_run_again(tmp_path):
    """A notebook cell that builds a Trainer twice must not lock itself out."""
    run = tmp_path / "run"
    _trainer(run).train(until=4)
    tr = _trainer(run, resume=True)
    assert tr.step == 4


# ---- defect 3: temp files of killed writes are removed ----------------------------------------
def test_temp_files_of_killed_writes_are_removed_on_start_and_resume(tmp_path):
    run = tmp_path / "run"
    tr = _trainer(run)
    tr.train(until=4)
    tr.close()
    dead = _dead_pid()
    litter = [run / "checkpoints" / f".latest.tmp-{dead}.pt", run / "checkpoints" / f".step_0000008.tmp-{dead}.pt",
              run / f".log.tmp-{dead}.csv", run / f".config.tmp-{dead}.yaml",
              run / "samples" / f".step_0000008_ema.tmp-{dead}.png"]
    for p in litter:
        p.write_bytes(b"x" * 1000)
    alive = run / "checkpoints" / f".latest.tmp-{os.getppid()}.pt"  # a live writer's file is left alone
    alive.write_bytes(b"y")
    _trainer(run, resume=True)
    assert not any(p.exists() for p in litter) and alive.exists()


# ---- defect 8: the NaN guard names a good checkpoint ------------------------------------------
def test_nan_guard_names_a_checkpoint_from_before_the_blow_up(tmp_path):
    run = tmp_path / "run"
    tr = _trainer(run, _cfg(**{"train.steps": 20, "train.keep_last": 1}))
    tr.train(until=4)  # a good checkpoint at step 4
    good = run / "checkpoints" / "step_0000004.pt"
    with torch.no_grad():  # the weights explode (as with a huge lr); the loss follows
        tr.raw_model.conv_out.weight.add_(1e3)
    tr.train(until=8)  # checkpoint at 8: finite weights of ~1e6 and a loss far above 1
    assert (run / "checkpoints" / "step_0000008.pt").exists()  # written, for inspection
    assert load_checkpoint(run)["step"] == 4  # latest.pt, what --resume starts from, stays good
    assert good.exists()  # kept from rotation (keep_last=1) because it is the last good one
    with torch.no_grad():
        tr.raw_model.conv_out.bias.fill_(float("nan"))
    with pytest.raises(TrainingDivergedError, match=r"Last good checkpoint: .*step_0000004\.pt"):
        tr.train_step(tr.batches.stream(tr.micro_batches_seen))
        tr.check_finite()  # the guard is read on the device at the next log row (issue 13); here, at once
    state = load_checkpoint(good)
    assert all(torch.isfinite(v).all() and v.abs().max() < 1e3 for v in state["model"].values()
               if v.is_floating_point())


# ---- defect 9: a zero-byte checkpoint is one clear error everywhere ---------------------------
def test_empty_checkpoint_is_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(empty)
    for argv in (["sample", str(empty), "--num", "1", "--steps", "1"], ["export", str(empty), "--out",
                                                                        str(tmp_path / "x.pt")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "empty (0 bytes)" in err and len(err.strip().splitlines()) == 1
    run = tmp_path / "run"
    _trainer(run).train(until=4)
    (run / "checkpoints" / "latest.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty.*step_0000004\.pt"):
        _trainer(run, resume=True)


# ---- defect 10: a full disk names the file and says nothing was lost --------------------------
def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_during_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    run = tmp_path / "run"
    tr = _trainer(run)
    tr.train(until=4)
    before = (run / "checkpoints" / "latest.pt").read_bytes()

    real_write = Path.write_bytes

    def full(self, data):  # the disk fills after 2,000 bytes of the new checkpoint (sample grids still fit)
        if self.suffix != ".pt":
            return real_write(self, data)
        real_write(self, bytes(data)[:2000])
        _enospc()

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(DiskFullError) as err:
        tr.train(until=8)
    msg = str(err.value)
    assert "latest.pt" in msg and "no space left" in msg and "needs about" in msg and "MB" in msg
    assert "Nothing was lost" in msg and "previous latest.pt is intact" in msg
    monkeypatch.undo()
    assert (run / "checkpoints" / "latest.pt").read_bytes() == before
    assert not list((run / "checkpoints").glob(".*.tmp-*"))


def test_disk_full_for_images_and_exports_is_one_line(tmp_path, monkeypatch, capsys):

    monkeypatch.setattr(Path, "write_bytes", _enospc)
    with pytest.raises(DiskFullError, match=r"could not write .*grid\.png.*Nothing was lost"):
        save_image(torch.zeros(1, 1, 4, 4), tmp_path / "grid.png")
    assert not list(tmp_path.iterdir())
    monkeypatch.undo()
    run = tmp_path / "run"
    _trainer(run).train(until=4)

    monkeypatch.setattr(Path, "write_bytes", _enospc)
    assert main(["export", str(run), "--out", str(tmp_path / "slim.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: could not write") and "slim.pt" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "slim.pt").exists()


# ---- the format stays loadable ----------------------------------------------------------------
def test_runs_started_by_the_previous_trainer_resume(tmp_path):
    """A run folder written before checkpoint.py (no .lock, no note) resumes: same format, version 1."""
    run = tmp_path / "run"
    tr = _trainer(run)
    tr.train(until=4)
    tr.close()
    (run / ".lock").unlink()
    state = torch.load(run / "checkpoints" / "latest.pt", weights_only=True)
    assert state["format"] == "ddpm_nb-checkpoint" and state["version"] == 1
    tr = _trainer(run, resume=True)
    assert tr.step == 4 and tr.last_checkpoint == run / "checkpoints" / "latest.pt"
    tr.train()
    assert load_checkpoint(run)["step"] == 8


def test_run_folder_rotation_keeps_the_protected_one(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.open(resume=False)
    state = {"format": "ddpm_nb-checkpoint", "version": 1, "w": torch.zeros(2)}
    first = folder.save(state, 1, keep_last=1)
    for step in (2, 3):
        folder.save(state, step, keep_last=1, protect=first)
    assert sorted(p.name for p in folder.ckpt_dir.glob("step_*.pt")) == ["step_0000001.pt", "step_0000003.pt"]
    folder.release()


# ---- the checkpoint file -------------------------------------------------------------------------------
def test_checkpoint_is_weights_only_and_complete(tmp_path):
    tr = _trainer(tmp_path / "run", _cfg(**{"train.steps": 4, "train.sample_every": 4}))
    tr.train()
    path = tmp_path / "run" / "checkpoints" / "latest.pt"
    state = torch.load(path, weights_only=True)
    assert state["format"] == "ddpm_nb-checkpoint" and state["version"] == 1 and state["step"] == 4
    assert {"model", "ema", "optimizer", "scheduler", "scaler", "rng", "config"} <= set(state)
    assert (tmp_path / "run" / "checkpoints" / "step_0000004.pt").exists()
    model, diffusion, cfg = load_model(path, device="cpu")
    assert cfg.unet == tr.cfg.unet and not model.training
    for p1, p2 in zip(model.parameters(), tr.ema.model.parameters()):
        assert torch.equal(p1, p2)


def test_checkpoint_rotation_keeps_last_k(tmp_path):
    tr = _trainer(tmp_path / "run", _cfg(**{"train.steps": 8, "train.ckpt_every": 2, "train.keep_last": 2}))
    tr.train()
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*.pt"))
    assert kept == ["step_0000006.pt", "step_0000008.pt"]


def test_crash_during_checkpoint_write_keeps_previous_latest(tmp_path, monkeypatch):
    tr = _trainer(tmp_path / "run", _cfg(**{"train.steps": 8}))
    tr.train(until=4)
    latest = tmp_path / "run" / "checkpoints" / "latest.pt"
    before = latest.read_bytes()

    real_write = Path.write_bytes

    def crashing_write(self, data):  # half the new checkpoint reaches the disk, then the process dies
        real_write(self, bytes(data)[: len(data) // 2])
        raise OSError("simulated crash")

    monkeypatch.setattr(Path, "write_bytes", crashing_write)
    tr.train_step(tr.batches.stream(tr.micro_batches_seen))
    with pytest.raises(OSError, match="simulated crash"):
        tr.write_checkpoint()
    monkeypatch.undo()
    assert latest.read_bytes() == before
    assert load_checkpoint(latest)["step"] == 4
    assert not [p for p in latest.parent.iterdir() if ".tmp" in p.name]


def test_bad_checkpoints_give_one_clear_error(tmp_path):
    tr = _trainer(tmp_path / "run", _cfg(**{"train.steps": 4, "train.sample_every": 4}))
    tr.train()
    good = tmp_path / "run" / "checkpoints" / "latest.pt"
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a ddpm_nb checkpoint"):
        load_checkpoint(foreign)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(1000))
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(junk)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt")
    # a checkpoint loaded into a network with other channels
    state = load_checkpoint(good)
    rgb = UNet(tr.cfg.unet.replace(in_channels=3))
    with pytest.raises(CheckpointError, match="in_channels: checkpoint 1 vs now 3"):
        load_weights(rgb, state["model"], state["config"]["unet"], str(good))
    # resuming with a changed network
    bigger = tr.cfg.override({"unet.base_channels": 32})
    with pytest.raises(CheckpointError, match="base_channels"):
        _trainer(tmp_path / "run", bigger, resume=True)


def test_a_checkpoint_written_before_the_trainer_split_still_resumes_and_samples(tmp_path):
    """tests/data/checkpoint_v1_tiny.pt was written by the trainer of commit ebe8d39 (format version 1, before
    label_dropout and input_perturbation existed): it loads, samples and resumes with today's defaults."""
    old = Path(__file__).parent / "data" / "checkpoint_v1_tiny.pt"
    state = load_checkpoint(old)
    assert state["version"] == 1 and "label_dropout" not in state["config"]["train"]
    model, diffusion, cfg = load_model(old, device="cpu")
    assert cfg.train.label_dropout == 0.1 and cfg.diffusion.input_perturbation == 0.0
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest.pt").write_bytes(old.read_bytes())
    tr = Trainer(cfg.override({"train.steps": 4}), run_dir=run, device="cpu", resume=True, progress=False,
                 train_dataset=_data(), val_dataset=_data(16, seed=1))
    # the only change reported is the one made: fields the old file lacks take their defaults silently
    assert tr.step == 2 and tr.notes == ["resuming step 2 with changed settings, applied from here on: "
                                         "train.steps: 2 -> 4"]
    for p1, p2 in zip(tr.raw_model.state_dict().values(), state["model"].values()):
        assert torch.equal(p1, p2)
    tr.train()
    assert tr.step == 4 and load_checkpoint(run)["step"] == 4


def test_resuming_with_another_dataset_or_formulation_is_refused(tmp_path):
    run = tmp_path / "run"
    _trainer(run, _cfg(**{"train.steps": 4})).train()
    for change, name in (({"data.dataset": "npy", "data.path": "images.npy"}, "data.dataset"),
                         ({"diffusion.objective": "v"}, "diffusion.objective")):
        with pytest.raises(CheckpointError, match=rf"cannot resume .*another network, diffusion or dataset "
                                                  rf"\({name}: checkpoint"):
            _trainer(run, _cfg(**{"train.steps": 8, **change}), resume=True)
