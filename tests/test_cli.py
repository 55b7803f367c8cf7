"""The command line end to end at tiny size, its errors, and a SIGKILL followed by --resume."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import imageio.v3 as iio
import pytest
import yaml
import torch

from ddpm_nb.__main__ import build_config, make_parser, main
from ddpm_nb.checkpoint import load_checkpoint


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


# ---- typed values and one-line errors (issue 8) ----------------------------------------------
def _config(argv, tmp_path=None):
    return build_config(make_parser().parse_args(["train", "--preset", "tiny", *argv]))


def test_flag_and_yaml_values_are_converted_to_the_fields_types(tmp_path):
    cfg = _config(["--train.lr", "1e-4", "--train.amp", "off", "--train.grad_clip", "none", "--steps", "1e2",
                   "--unet.channel_mults", "1,2", "--train.betas", "[0.8, 0.99]", "--data.hflip", "no"])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float) and cfg.train.amp == "off"
    assert cfg.train.grad_clip is None and cfg.train.steps == 100 and isinstance(cfg.train.steps, int)
    assert cfg.unet.channel_mults == (1, 2) and cfg.train.betas == (0.8, 0.99) and cfg.data.hflip is False
    yml = tmp_path / "c.yaml"  # PyYAML reads 2e-4 (no dot) as a string, and '16' is one
    yml.write_text("train:\n  lr: 2e-4\n  batch_size: '16'\n  amp: off\n")
    cfg = _config(["--config", str(yml)])
    assert cfg.train.lr == 2e-4 and cfg.train.batch_size == 16 and cfg.train.amp == "off"
    assert isinstance(cfg.train.batch_size, int)


def test_a_quoted_yaml_value_that_does_not_convert_is_refused_in_one_line(tmp_path, capsys):
    yml = tmp_path / "c.yaml"  # the README's rule: YAML values get the flags' conversion, exactly
    yml.write_text("train:\n  batch_size: '16.5'\n")
    assert main(["train", "--preset", "tiny", "--config", str(yml)]) == 2
    err = capsys.readouterr().err
    assert err == "error: TrainConfig.batch_size: cannot use '16.5': expected an integer\n"


@pytest.mark.parametrize("argv, message", [
    (["--train.steps", "many"], "TrainConfig.steps: cannot use 'many': expected an integer"),
    (["--train.batch_size", "2.5"], "TrainConfig.batch_size: cannot use 2.5: expected an integer"),
    (["--unet.channel_mults", "abc"], "UNetConfig.channel_mults: cannot use 'abc': expected a list of integers"),
    (["--train.betas", "[2,0.999]"], "TrainConfig.betas: must be two numbers in [0, 1)"),
    (["--train.lr", "inf"], "TrainConfig.lr: cannot use 'inf': expected a finite number"),
    (["--train.lr", ".inf"], "TrainConfig.lr: cannot use inf: expected a finite number"),
    (["--train.lr", "abc"], "TrainConfig.lr: cannot use 'abc': expected a finite number"),
    (["--train.grad_clip", "big"], "TrainConfig.grad_clip: cannot use 'big': expected a finite number (e.g. 2e-4) "
                                   "or none"),
    (["--data.class_cond", "maybe"], "DataConfig.class_cond: cannot use 'maybe': expected true or false"),
    (["--train.sample_steps", "100"], "TrainConfig.sample_steps: 100 DDIM steps"),
    (["--unet.num_classes", "[1"], "UNetConfig.num_classes: cannot use '[1'"),
])
def test_bad_values_name_field_value_and_type(argv, message, capsys):
    assert main(["train", "--preset", "tiny", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished 2-step tiny run (unconditional, T = 50) to sample from."""
    import torch
    from torch.utils.data import TensorDataset

    from ddpm_nb.config import preset
    from ddpm_nb.train import Trainer

    run = tmp_path_factory.mktemp("cli") / "run"
    ds = TensorDataset(torch.rand(32, 1, 16, 16) * 2 - 1, torch.zeros(32, dtype=torch.long))
    cfg = preset("tiny", **{"train.steps": 2, "train.batch_size": 8, "train.sample_every": 0, "train.eval_every": 0,
                            "train.num_samples": 2, "train.sample_steps": 2})
    tr = Trainer(cfg, run_dir=run, device="cpu", progress=False, train_dataset=ds, val_dataset=ds)
    tr.train()
    tr.close()
    return run


@pytest.mark.parametrize("argv, message", [
    (["sample", "{run}", "--steps", "0"], "--steps must be at least 1, got 0"),
    (["sample", "{run}", "--num", "-3"], "--num must be at least 1, got -3"),
    (["sample", "{run}", "--num", "0"], "--num must be at least 1, got 0"),
    (["sample", "{run}", "--eta", "-1"], "--eta must be a number >= 0"),
    (["sample", "{run}", "--steps", "51"], "--steps: 51 DDIM steps, but the diffusion has T = 50 steps; use 1 to 50"),
    (["sample", "{run}", "--guidance-scale", "3"], "--guidance-scale 3.0 has no effect: this checkpoint's model is "
                                                   "unconditional"),
    (["sample", "{run}", "--class", "1"], "--class given but this checkpoint's model is unconditional"),
    (["animate", "{run}", "--frames", "0"], "--frames must be at least 2, got 0"),
    (["animate", "{run}", "--fps", "0"], "--fps must be at least 1, got 0"),
    (["fid", "{run}", "--num", "0"], "--num must be at least 2"),
    (["sample", "{run}", "--device", "banana"], "--device 'banana'"),
    (["sample", "{run}", "--threads", "0"], "threads must be a positive integer"),
    (["export", "{run}/nothing.pt", "--out", "x.pt"], "no checkpoint at"),
])
def test_bad_sampling_flags_are_one_line_before_any_work(tiny_run, argv, message, capsys):
    assert main([a.format(run=tiny_run) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tiny_run / "samples_cli").exists() and not (tiny_run / "animations").exists()


def test_device_without_cuda_is_one_line(tiny_run, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for argv in (["sample", str(tiny_run), "--device", "cuda"], ["train", "--preset", "tiny", "--device", "cuda"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --device 'cuda'") and "CUDA is not available" in err


def test_yaml_syntax_error_is_one_line(tmp_path, capsys):
    yml = tmp_path / "bad.yaml"
    yml.write_text("train:\n  lr: [1e-4\n  steps: 3\n")
    assert main(["train", "--preset", "tiny", "--config", str(yml)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --config {yml}: not valid YAML (line") and len(err.strip().splitlines()) == 1
    yml.write_text("train: 5\n")
    assert main(["train", "--preset", "tiny", "--config", str(yml)]) == 2
    assert "RunConfig.train: expected a mapping" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["missing", "file", "empty"])
def test_explicit_data_root_that_is_wrong_is_an_error(tmp_path, monkeypatch, capsys, kind):
    root = tmp_path / "data"
    if kind == "file":
        root.write_text("not a folder")
    elif kind == "empty":
        root.mkdir()
    monkeypatch.setenv("DDPM_NB_DATA", str(root))
    monkeypatch.setenv("DDPM_NB_OFFLINE", "1")
    assert main(["train", "--preset", "tiny", "--results-dir", str(tmp_path / "results"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(root) in err and len(err.strip().splitlines()) == 1, err
    assert "bundled" not in err


@pytest.mark.slow
def test_two_trainings_with_one_name_the_second_stops(tmp_path):
    args = ["train", "--preset", "tiny", "--steps", "60", "--no-progress"]
    first = subprocess.Popen([sys.executable, "-m", "ddpm_nb", *args], env=_env(tmp_path),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "results" / "tiny"
    deadline = time.time() + 120
    while not (run / "config.yaml").exists() and time.time() < deadline:
        time.sleep(0.1)
    seconds = [subprocess.Popen([sys.executable, "-m", "ddpm_nb", *args, *extra], env=_env(tmp_path),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
               for extra in ([], ["--resume"])]  # a fresh start and a resume, both while the first runs
    for second in seconds:
        err = second.stderr.read()
        assert second.wait(timeout=300) == 2 and "Traceback" not in err
        assert f"in use by another training process (PID {first.pid})" in err
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    steps = [int(r.split(",")[0]) for r in (run / "log.csv").read_text().splitlines()[1:]]
    assert steps == list(range(5, 61, 5))  # the first run's rows, each once
    assert load_checkpoint(run)["step"] == 60


@pytest.mark.slow
def test_kills_at_any_moment_of_resume_lose_no_checkpointed_row(tmp_path):
    """SIGKILL `train --resume` during startup, the log trim and training: every logged row up to
    the last checkpoint survives, no row is doubled, and no temp file is left once it finishes."""
    args = ["train", "--preset", "tiny", "--train.ckpt_every", "5", "--train.sample_every", "0",
            "--train.eval_every", "0", "--no-progress"]
    assert _cli(args + ["--steps", "10"], tmp_path).returncode == 0
    run = tmp_path / "results" / "tiny"
    for delay in (0.2, 0.8, 1.5, 2.5, 3.5):
        proc = subprocess.Popen([sys.executable, "-m", "ddpm_nb", *args, "--steps", "30", "--resume"],
                                env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        saved = load_checkpoint(run)["step"]
        steps = [int(r.split(",")[0]) for r in (run / "log.csv").read_text().splitlines()[1:]]
        assert steps == sorted(set(steps)) and set(range(5, saved + 1, 5)) <= set(steps), (delay, saved, steps)
        assert yaml.safe_load((run / "config.yaml").read_text())["name"] == "tiny"
    done = _cli(args + ["--steps", "30", "--resume"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [int(r.split(",")[0]) for r in (run / "log.csv").read_text().splitlines()[1:]]
    assert steps == list(range(5, 31, 5))
    assert not list(run.rglob(".*.tmp-*"))


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
def test_busy_cpu_warning(monkeypatch, capsys, tmp_path):
    """One line when the load average plus our threads exceed the cores and fewer threads would fit;
    nothing on an idle machine, with one thread, or on a GPU."""
    from ddpm_nb import utils

    monkeypatch.setattr(utils.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(utils.os, "getloadavg", lambda: (1.2, 1.0, 1.0))
    msg = utils.busy_cpu_warning(2, "cpu")
    assert msg.startswith("warning: the CPU is busy (load 1.2 on 2 cores)") and msg.endswith("--threads 1 "
                                                                                              "(or DDPM_NB_THREADS=1)")
    assert "\n" not in msg
    assert utils.busy_cpu_warning(1, "cpu") is None  # one thread: nothing to gain
    assert utils.busy_cpu_warning(2, "cuda") is None
    monkeypatch.setattr(utils.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    assert utils.busy_cpu_warning(2, "cpu") is None
    # the command line prints it once its input checked out, before the work; errors stay one line
    monkeypatch.setattr(utils.os, "getloadavg", lambda: (3.0, 3.0, 3.0))
    threads = torch.get_num_threads()
    try:
        assert main(["sample", "no-such-run.pt", "--threads", "2", "--device", "cpu"]) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("error:")
        assert main(["sample", "fashion-quick-cond", "--num", "1", "--steps", "2", "--threads", "2", "--device", "cpu",
                     "--no-progress", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == ("warning: the CPU is busy (load 3.0 on 2 cores) and torch uses 2 threads; threads waiting for "
                      "a busy core can make a run several times slower: use --threads 1 (or DDPM_NB_THREADS=1)")
    assert not any(line.startswith("warning: the CPU") for line in err[1:])

def test_a_shipped_name_still_resolves_after_its_outputs_folder_exists(tmp_path, monkeypatch):
    """`sample fashion-quick-cond` writes results/fashion-quick-cond/ (no checkpoint in it); `animate
    fashion-quick-cond` afterwards must load the shipped model, not fail on that folder."""
    from ddpm_nb.__main__ import resolve_checkpoint
    from ddpm_nb.shipped import pretrained_path

    monkeypatch.setenv("DDPM_NB_RESULTS", str(tmp_path))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    (tmp_path / "fashion-quick-cond" / "samples_cli").mkdir(parents=True)
    assert resolve_checkpoint("fashion-quick-cond") == (pretrained_path("fashion-quick-cond"),
                                                        tmp_path / "fashion-quick-cond")
    run = tmp_path / "myrun"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest.pt").write_bytes(b"x")
    assert resolve_checkpoint("myrun") == (run, run)


def test_log_every_zero_trains_and_logs_once_at_the_end(tmp_path):
    proc = _cli(["train", "--preset", "tiny", "--train.log_every", "0", "--steps", "4", "--train.eval_every", "0",
                 "--train.sample_every", "0", "--train.ckpt_every", "0", "--results-dir", str(tmp_path),
                 "--name", "r", "--no-progress"], tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    rows = (tmp_path / "r" / "log.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("4,")              # the header and one row, at step 4
    assert load_checkpoint(tmp_path / "r")["step"] == 4
