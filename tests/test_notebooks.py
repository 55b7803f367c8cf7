"""Static checks of the lessons (nbmake executes them; see the Makefile's test target)."""
import json
import re

import pytest

import ddpm_nb
from ddpm_nb.utils import repo_root

NOTEBOOKS = sorted(p for p in (repo_root() / "notebooks").glob("[0-9][0-9]_*.ipynb"))
EXPECTED = ["01_forward_process", "02_unet", "03_training", "04_sampling", "05_animations", "06_guidance",
            "07_evaluation", "08_diffusers", "09_fast_samplers", "10_editing"]


def test_all_lessons_exist():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED


def _exercises_and_solutions(cells):
    """(exercise numbers listed under '## Exercises', {solution number: cell}) of one lesson."""
    text = next("".join(c["source"]) for c in cells if c["cell_type"] == "markdown"
                and re.search(r"^## Exercises", "".join(c["source"]), re.M))
    text = text[re.search(r"^## Exercises", text, re.M).end():]
    numbers = [int(n) for n in re.findall(r"^(\d+)\. \*\*", text, re.M)]
    solutions = {}
    for c in cells:
        if c["cell_type"] == "code" and "solution" in c.get("metadata", {}).get("tags", []):
            m = re.match(r"# @title Solution (\d+):", "".join(c["source"]))
            assert m, "a solution cell starts with '# @title Solution N: ...'"
            assert int(m.group(1)) not in solutions, f"two solutions for exercise {m.group(1)}"
            solutions[int(m.group(1))] = c
    return numbers, solutions


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_exercise_has_a_worked_solution(path):
    """Each exercise N has one code cell tagged `solution` (so nbmake runs it in CI), collapsed in JupyterLab
    (source_hidden) and Colab (cellView form + '# @title'), after the exercises; no solution without an exercise."""
    cells = json.loads(path.read_text())["cells"]
    numbers, solutions = _exercises_and_solutions(cells)
    assert numbers == list(range(1, len(numbers) + 1)) and numbers, f"exercises numbered 1..n, got {numbers}"
    missing = sorted(set(numbers) - set(solutions))
    assert not missing, f"exercise(s) {missing} of {path.name} have no worked solution"
    assert sorted(solutions) == numbers, f"solutions {sorted(solutions)} without an exercise"
    exercises_at = next(i for i, c in enumerate(cells) if re.search(r"^## Exercises", "".join(c["source"]), re.M))
    for n, cell in solutions.items():
        assert cells.index(cell) > exercises_at, f"solution {n} comes before the exercises"
        meta = cell["metadata"]
        assert meta.get("jupyter", {}).get("source_hidden") is True and meta.get("cellView") == "form", \
            f"solution {n} is not collapsed"
        assert len("".join(cell["source"]).splitlines()) > 2, f"solution {n} is empty"


def test_solution_check_fails_without_a_solution():
    """The check above must notice a removed solution (guards against a regex that matches nothing)."""
    cells = json.loads(NOTEBOOKS[0].read_text())["cells"]
    numbers, solutions = _exercises_and_solutions(cells)
    first = solutions[numbers[0]]
    numbers_after, solutions_after = _exercises_and_solutions([c for c in cells if c is not first])
    assert numbers_after == numbers and numbers[0] not in solutions_after


def test_diffusers_lesson_is_installed_by_ci():
    """08_diffusers needs the `diffusers` extra; `make test` (CI) installs it with the dev extra."""
    import tomllib

    root = repo_root()
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(r.startswith("diffusers") for r in extras["diffusers"])
    dev_line = next(line for line in (root / "Makefile").read_text().splitlines() if "pip install" in line and "dev" in line)
    assert "diffusers" in re.search(r'\.\[([^\]]*)\]', dev_line).group(1).split(",")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_lesson_is_clean_and_follows_the_skeleton(path):
    nb = json.loads(path.read_text())
    cells = nb["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    # committed without outputs
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), "strip outputs"
    text = "".join("".join(c["source"]) for c in cells)
    # the Colab badge and install cell use the one repository address
    urls = set(re.findall(r"https://github\.com/[\w.-]+/[\w.-]+", text))
    assert urls == {ddpm_nb.REPO_URL}, urls
    assert f"colab.research.google.com/github/{ddpm_nb.REPO_URL.split('github.com/')[1]}/blob/main/notebooks/" \
           f"{path.name}" in text
    setup = "".join(code[0]["source"])
    assert '"google.colab" in sys.modules' in setup
    assert not re.search(r"install[^\n]*\b(torch|torchvision)\b", setup), "never reinstall Colab's torch"
    assert "--no-deps" in setup
    # a failed clone says what failed (not an opaque pip error later)
    assert "check=False" not in setup and "returncode" in setup and "raise RuntimeError" in setup
    # exactly one parameters cell, with the visible tiny switch
    params = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1
    assert 'TINY = os.environ.get("DDPM_NB_TINY") == "1"' in "".join(params[0]["source"])
    # a check against the package, a summary and exercises
    # checks that can fail: assertion statements in the lesson's own cells (solutions not counted)
    checks = sum(len(re.findall(r"^\s*(?:assert |torch\.testing\.assert_close|np\.testing\.assert_)", "".join(c["source"]),
                                re.M)) for c in code if "solution" not in c.get("metadata", {}).get("tags", []))
    assert checks >= 3, f"{path.name}: {checks} assertion statements outside the solutions"
    assert re.search(r"#+\s*Summary", text) and re.search(r"#+\s*Exercises", text)
