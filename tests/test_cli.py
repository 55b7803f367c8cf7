"""The command line end to end at tiny size, its errors, and a SIGKILL followed by --resume."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import imageio.v3 as iio
import pytest

from ddpm_nb.__main__ import build_config, make_parser, main
from ddpm_nb.train import load_checkpoint


def _env(tmp_path):
    return {**os.environ, "DDPM_NB_RESULTS": str(tmp_path / "results"), "DDPM_NB_OFFLINE": "1",
            "PYTHONWARNINGS": "ignore"}


def _cli(args, tmp_path, **kw):
    return subprocess.run([sys.executable, "-m", "ddpm_nb", *args], capture_output=True, text=True,
                          env=_env(tmp_path), timeout=600, **kw)


def test_flags_yaml_and_presets_compose(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("train:\n  lr: 0.0005\n  steps: 7\nunet:\n  channel_mults: [1, 2]\n")
    args = make_parser().parse_args(["train", "--preset", "tiny", "--config", str(yml), "--steps", "9",
                                     "--unet.dropout", "0.2", "--data.class_cond", "true",
                                     "--unet.num_classes", "10", "--train.grad_clip", "null", "--name", "x"])
    cfg = build_config(args)
    assert cfg.train.lr == 0.0005 and cfg.train.steps == 9 and cfg.unet.dropout == 0.2
    assert cfg.unet.channel_mults == (1, 2) and cfg.data.class_cond and cfg.train.grad_clip is None
    assert cfg.name == "x"


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--train.lr" in out and "peak learning rate" in out and "--resume" in out and "--unet.num_classes" in out


@pytest.mark.parametrize("args, message", [
    (["train", "--preset", "nope"], "unknown preset 'nope'"),
    (["train", "--preset", "tiny", "--diffusion.schedule", "exp"], "DiffusionConfig.schedule"),
    (["train", "--preset", "tiny", "--diffusion.timesteps", "-3"], "DiffusionConfig.timesteps"),
    (["train", "--preset", "tiny", "--unet.image_size", "28", "--unet.channel_mults", "[1,2,2,2]"], "pad the images"),
    (["train", "--preset", "tiny", "--train.bogus", "1"], "unrecognized arguments"),
    (["train", "--preset", "tiny", "--data.dataset", "imagefolder", "--data.path", "/nonexistent/imgs"],
     "/nonexistent/imgs"),
    (["sample", "/nonexistent/run"], "no checkpoint at"),
])
def test_bad_input_gets_one_clear_error(tmp_path, args, message):
    proc = _cli(args, tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unwritable_results_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = subprocess.run([sys.executable, "-m", "ddpm_nb", "train", "--preset", "tiny", "--results-dir",
                           str(blocker / "results")], capture_output=True, text=True, env=_env(tmp_path), timeout=300)
    assert proc.returncode == 2 and "cannot write to the run folder" in proc.stderr


@pytest.mark.slow
def test_train_sample_animate_end_to_end(tmp_path):
    proc = _cli(["train", "--preset", "tiny", "--steps", "12", "--train.ckpt_every", "6", "--no-progress"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "results" / "tiny"
    assert (run / "config.yaml").exists() and (run / "log.csv").exists() and (run / "val.csv").exists()
    assert load_checkpoint(run)["step"] == 12
    assert sorted(p.name for p in (run / "samples").glob("*.png"))  # grids during training
    proc = _cli(["sample", str(run), "--num", "4", "--steps", "5", "--no-progress"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    grid = next((run / "samples_cli").glob("grid_*.png"))
    assert iio.imread(grid).ndim == 3 and len(list((run / "samples_cli" / "images").glob("*.png"))) == 4
    proc = _cli(["animate", str(run / "checkpoints" / "latest.pt"), "--num", "4", "--steps", "6", "--frames", "5",
                 "--no-progress"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    gif = next((run / "animations").glob("*.gif"))
    mp4 = next((run / "animations").glob("*.mp4"))
    assert iio.imread(gif, index=None).shape[0] >= 2
    assert mp4.stat().st_size > 0
    proc = _cli(["fid", str(run), "--num", "8", "--steps", "3", "--split", "test", "--no-progress"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json
    row = json.loads((run / "fid.jsonl").read_text().splitlines()[-1])
    assert row["n"] == 8 and row["fid"] > 0 and row["fid_real_vs_real"] >= 0 and row["extractor"]
    proc = _cli(["export", str(run), "--out", str(tmp_path / "slim.pt")], tmp_path)
    assert proc.returncode == 0 and load_checkpoint(tmp_path / "slim.pt")["ema"] is None
    # a finished run asked to train again without --resume is refused, not overwritten
    proc = _cli(["train", "--preset", "tiny", "--steps", "12"], tmp_path)
    assert proc.returncode == 2 and "--resume" in proc.stderr


@pytest.mark.slow
def test_sigkill_then_resume_loses_at_most_one_interval(tmp_path):
    args = ["train", "--preset", "tiny", "--steps", "40", "--train.ckpt_every", "5", "--train.sample_every", "20",
            "--train.eval_every", "20", "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "ddpm_nb", *args], env=_env(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = tmp_path / "results" / "tiny" / "checkpoints" / "latest.pt"
    deadline = time.time() + 300
    while time.time() < deadline:
        if latest.exists() and load_checkpoint(latest)["step"] >= 10:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(latest)["step"]
    assert 10 <= killed_at < 40
    done = _cli(args + ["--resume"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed at step {killed_at}" in done.stderr
    assert load_checkpoint(latest)["step"] == 40
    rows = (tmp_path / "results" / "tiny" / "log.csv").read_text().splitlines()[1:]
    steps = [int(r.split(",")[0]) for r in rows]
    assert steps == sorted(set(steps)) and steps[-1] == 40


def test_sampling_commands_take_run_names(tmp_path, monkeypatch, capsys):
    """`sample fm32` means results/fm32 wherever you stand; a shipped model's name works too and
    writes under results/<name>/, never into the package; an unknown name lists the runs."""
    from ddpm_nb.__main__ import resolve_checkpoint
    from ddpm_nb.shipped import pretrained_path

    monkeypatch.setenv("DDPM_NB_RESULTS", str(tmp_path / "results"))
    run = tmp_path / "results" / "fm32"
    (run / "checkpoints").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert resolve_checkpoint("fm32") == (run, run)
    ckpt = run / "checkpoints" / "latest.pt"
    ckpt.write_bytes(b"")
    assert resolve_checkpoint(str(ckpt)) == (ckpt, run)
    assert resolve_checkpoint("fashion-quick-cond") == (pretrained_path("fashion-quick-cond"),
                                                        tmp_path / "results" / "fashion-quick-cond")
    assert main(["sample", "nope", "--num", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no run named 'nope'" in err and "fm32" in err
    assert main(["sample", "fashion-quick-cond", "--num", "2", "--steps", "2", "--no-progress", "--device", "cpu"]) == 0
    assert len(list((tmp_path / "results" / "fashion-quick-cond" / "samples_cli" / "images").glob("*.png"))) == 2
