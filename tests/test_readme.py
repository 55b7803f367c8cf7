"""The README's command-line examples run as written: each cheap one at tiny size (flags appended
after the README's own only shrink sizes; later flags win), the expensive ones as a parse check."""
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from ddpm_nb.checkpoint import load_checkpoint
from ddpm_nb.utils import repo_root

# appended to README training commands: the same command at tiny size (2-3 steps of 8 images)
TINY_TRAIN = ["--steps", "2", "--batch-size", "8", "--data.limit", "64", "--train.warmup_steps", "1",
              "--train.sample_every", "0", "--train.eval_every", "0", "--train.num_samples", "2",
              "--train.sample_steps", "2", "--train.eval_batches", "1", "--no-progress"]
TINY_SAMPLE = ["--num", "2", "--steps", "3", "--no-progress"]


def readme_commands() -> list[str]:
    """The `python -m ddpm_nb ...` lines of the README's command-line block, comments removed."""
    text = (repo_root() / "README.md").read_text()
    block = text.split("## The command line", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.startswith("python -m ddpm_nb")]


def test_readme_lists_the_commands_this_test_runs():
    cmds = readme_commands()
    assert len(cmds) >= 8 and any(" sample " in c for c in cmds) and any(" export " in c for c in cmds)


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path):
    env = {**os.environ, "DDPM_NB_RESULTS": str(tmp_path / "results"), "DDPM_NB_OFFLINE": "1",
           "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(repo_root())}
    env.pop("DDPM_NB_DATA", None)  # FashionMNIST falls back to the bundled split, as on a fresh clone

    def run(args: list[str]) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "ddpm_nb", *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, f"{shlex.join(args)}\n{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr
        return proc

    (tmp_path / "my.yaml").write_text("train:\n  lr: 1e-4\n  warmup_steps: 100\n")
    # `results/cond` in the README is a class-conditional run: make one
    run(["train", "--preset", "tiny", "--name", "cond", "--data.class_cond", "true", "--unet.num_classes", "10",
         *TINY_TRAIN])
    ran = []
    for line in readme_commands():
        args = shlex.split(line)[3:]
        if args[0] == "train" and "--help" in args:
            extra = []
        elif args[0] == "train" and "--train.compile" in args:  # compiling takes minutes on a CPU: parse only
            extra = ["--print-config"]
        elif args[0] == "train":
            extra = TINY_TRAIN + (["--steps", "3"] if "--resume" in args else [])
        elif args[0] in ("sample", "animate"):
            extra = TINY_SAMPLE + (["--frames", "4"] if args[0] == "animate" else [])
        else:
            extra = []
        ran.append(run(args + extra))
    assert len(ran) == len(readme_commands())
    fm32 = tmp_path / "results" / "fm32"
    assert load_checkpoint(fm32)["step"] == 3 and "resumed at step 2" in ran[1].stderr
    assert "lr: 0.0001" in ran[2].stdout and "compile: true" in ran[2].stdout
    assert list((fm32 / "samples_cli").glob("grid_*.png")) and list((tmp_path / "results" / "cond" /
                                                                    "samples_cli").glob("grid_*.png"))
    assert list((fm32 / "animations").glob("*.gif")) and load_checkpoint(tmp_path / "fm32.pt")["ema"] is None
