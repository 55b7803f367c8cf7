"""Packaging: environment.yml lists what pyproject.toml lists; the CI script runs the README's test command."""
import re

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
