"""Static checks of the lessons (nbmake executes them; see the Makefile's test target)."""
import json
import re

import pytest

import ddpm_nb
from ddpm_nb.utils import repo_root

NOTEBOOKS = sorted(p for p in (repo_root() / "notebooks").glob("[0-9][0-9]_*.ipynb"))
EXPECTED = ["01_forward_process", "02_unet", "03_training", "04_sampling", "05_animations"]


def test_all_lessons_exist():
    assert [p.stem for p in NOTEBOOKS][:5] == EXPECTED


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
    # exactly one parameters cell, with the visible tiny switch
    params = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1
    assert 'TINY = os.environ.get("DDPM_NB_TINY") == "1"' in "".join(params[0]["source"])
    # a check against the package, a summary and exercises
    assert "assert" in text
    assert re.search(r"#+\s*Summary", text) and re.search(r"#+\s*Exercises", text)
