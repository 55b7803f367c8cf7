"""Packaging: environment.yml lists what pyproject.toml lists; the CI script runs the README's test command;
paths outside a checkout; the wheel, installed into a fresh venv and used from another folder."""
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from ddpm_nb.utils import repo_root

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the package itself supports 3.10
ROOT = repo_root()
CONDA_NAMES = {"torch": "pytorch"}  # PyPI name -> conda-forge name where they differ


def _split(req: str) -> tuple[str, str]:
    m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", req)
    return m.group(1).lower(), m.group(2).replace(" ", "")


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["channels"] == ["conda-forge"]
    deps = env["dependencies"]
    assert "python=3.11" in deps
    conda = dict(_split(d) for d in deps if isinstance(d, str) and not d.startswith(("python", "pip")))
    wanted = {CONDA_NAMES.get(name, name): spec for name, spec in map(_split, project["dependencies"])}
    assert conda == wanted  # same packages, same version bounds
    pip = next(d["pip"] for d in deps if isinstance(d, dict))
    extras = re.search(r'-e\s+"?\.\[([^\]]*)\]', pip[0]).group(1).split(",")
    assert set(extras) <= set(project["optional-dependencies"]) and {"notebooks", "dev"} <= set(extras)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    quick = re.search(r"## Quickstart.*?```(?:bash|sh)?\n(.*?)```", readme, re.S).group(1)
    commands = [line.strip() for line in quick.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert len(commands) == 2, commands   # exactly two commands: the main job and the tests
    assert commands[1] in ci.splitlines()
    makefile = (ROOT / "Makefile").read_text()
    assert "--nbmake" in makefile and "DDPM_NB_TINY=1" in makefile and "tests notebooks" in makefile


def test_torch_pins_are_a_compatible_pair():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {n for n, _ in map(_split, project["dependencies"])}
    assert {"torch", "torchvision", "einops", "matplotlib", "imageio", "tqdm"} <= names
    assert "jupyterlab" not in names  # heavy things stay in extras
    import torch
    import torchvision  # noqa: F401  (the pinned pair imports together)
    assert int(torch.__version__.split(".")[0]) == 2


# --------------------------------------------------------------------------- outside a checkout
def test_paths_outside_a_checkout(tmp_path, monkeypatch):
    """Installed from a wheel: runs go to ./results, data to the per-user cache, never site-packages."""
    from ddpm_nb import utils

    for var in ("DDPM_NB_ROOT", "DDPM_NB_RESULTS", "DDPM_NB_DATA", "DDPM_NB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    assert utils.repo_root() == ROOT and (ROOT / "pyproject.toml").is_file()   # this checkout is recognised
    assert utils.results_dir(create=False) == ROOT / "results" and utils.data_root() == ROOT / "data"
    monkeypatch.setattr(utils, "_is_checkout", lambda folder: False)           # as in site-packages
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert utils.repo_root() is None
    assert utils.results_dir("run") == tmp_path / "results" / "run" and (tmp_path / "results" / "run").is_dir()
    assert utils.data_root() == utils.cache_dir() == tmp_path / "home" / ".cache" / "ddpm_nb"
    monkeypatch.setenv("DDPM_NB_CACHE", str(tmp_path / "cache"))
    assert utils.data_root() == tmp_path / "cache"
    monkeypatch.setenv("DDPM_NB_DATA", str(tmp_path / "d"))
    monkeypatch.setenv("DDPM_NB_RESULTS", str(tmp_path / "r"))
    assert utils.data_root() == tmp_path / "d" and utils.results_dir(create=False) == tmp_path / "r"
    assert not utils._is_checkout(tmp_path)


def _copy_source(dest: Path) -> Path:
    """What a source distribution holds, copied out so that building leaves the checkout untouched."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(ROOT / "ddpm_nb", dest / "ddpm_nb", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def _run(cmd, cwd, env, timeout=300):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_repository(tmp_path):
    """Build the wheel, install it into a fresh venv, and use it from an empty folder as a learner would:
    `presets`, a tiny `train` (results land in that folder), `sample` by run name, and notebook 04 in
    tiny mode copied alone into another empty folder. Offline: the venv gets torch & co. from the
    running environment through a .pth line (plain path, so that environment's editable install of
    this checkout is not activated); the wheel itself must carry the models and the data."""
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w", dist,
          _copy_source(tmp_path / "src")], tmp_path, os.environ)
    (wheel,) = dist.glob("ddpm_nb-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert {"ddpm_nb/assets/FashionMNIST-test/t10k-images-idx3-ubyte.gz", "ddpm_nb/assets/fashion_quick_cond.pt",
            "ddpm_nb/assets/FashionMNIST-test/LICENSE"} <= names
    assert not any(n.startswith(("tests/", "notebooks/", "results/", "data/")) for n in names)
    assert wheel.stat().st_size < 40e6, f"wheel is {wheel.stat().st_size / 1e6:.1f} MB"

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path, os.environ)
    python = venv / "bin" / "python"
    site_dir = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp_path,
                         os.environ).stdout.strip())
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", site_dir, wheel],
         tmp_path, os.environ)
    base = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (site_dir / "zz_base_environment.pth").write_text("\n".join(base) + "\n")

    env = {k: v for k, v in os.environ.items() if not k.startswith(("DDPM_NB_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(DDPM_NB_OFFLINE="1", DDPM_NB_CACHE=str(tmp_path / "cache"), DDPM_NB_THREADS="1",
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", MPLBACKEND="Agg")
    work = tmp_path / "work"
    work.mkdir()
    where = _run([python, "-c", "import ddpm_nb, ddpm_nb.utils as u; print(ddpm_nb.__file__); print(u.repo_root())"],
                 work, env).stdout.split()
    assert Path(where[0]).is_relative_to(site_dir) and where[1] == "None", where

    assert "quick" in _run([python, "-m", "ddpm_nb", "presets"], work, env).stdout
    out = _run([python, "-m", "ddpm_nb", "train", "--preset", "tiny", "--name", "wheel-run", "--steps", "4",
                "--train.sample_every", "4", "--train.num_samples", "2", "--train.eval_batches", "1"], work, env).stdout
    assert "step 4/4 | loss " in out and "| checkpoint " in out, out   # stdout is a pipe: plain log lines
    assert (work / "results" / "wheel-run" / "checkpoints" / "latest.pt").is_file()
    assert not (site_dir / "results").exists() and not (site_dir / "data").exists()
    _run([python, "-m", "ddpm_nb", "sample", "wheel-run", "--num", "2", "--steps", "2", "--no-progress"], work, env)
    assert len(list((work / "results" / "wheel-run" / "samples_cli" / "images").glob("*.png"))) == 2

    notebook = ROOT / "notebooks" / "04_sampling.ipynb"
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy2(notebook, alone / notebook.name)
    runner = (
        "import sys, nbformat, nbclient\n"
        "nb = nbformat.read(sys.argv[1], as_version=4)\n"
        "nb.cells.append(nbformat.v4.new_code_cell('import ddpm_nb; print(\"PACKAGE\", ddpm_nb.__file__)'))\n"
        "nbclient.NotebookClient(nb, timeout=300, kernel_name='python3',\n"
        "                        resources={'metadata': {'path': sys.argv[2]}}).execute()\n"
        "print(nb.cells[-1].outputs[0]['text'])\n"
    )
    out = _run([python, "-c", runner, alone / notebook.name, alone], alone, {**env, "DDPM_NB_TINY": "1"}, 600).stdout
    assert f"PACKAGE {site_dir}" in out, out[-2000:]
    assert list((alone / "results").rglob("*.png")), "the notebook's figures land beside it"
