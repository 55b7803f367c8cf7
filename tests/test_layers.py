"""The package's modules form layers: each imports only modules of lower layers (at the top of the file or
inside a function alike; annotations under TYPE_CHECKING do not count), so there is no import cycle and a
newcomer can read the package bottom-up. The README's package section states the same order."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ddpm_nb"
LAYERS = [
    {"_version", "utils"},
    {"data"},                                  # the dataset registry: config's validation reads it
    {"config"},
    {"schedule"},
    {"diffusion", "unet"},
    {"sample", "metrics", "animate"},
    {"edit"},
    {"checkpoint"},
    {"train"},
    {"shipped"},
    {"lesson"},
    {"__main__", "__init__"},                  # the entry points
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def _imports(tree: ast.Module) -> list[tuple[str, int]]:
    """(imported ddpm_nb module, line) for every import outside `if TYPE_CHECKING:` blocks."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            skip |= {id(n) for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 1 or mod.startswith("ddpm_nb"):
                base = mod.removeprefix("ddpm_nb").lstrip(".") if node.level == 0 else mod
                if base:
                    found.append((base.split(".")[0], node.lineno))
                else:  # `from . import x`: x is a submodule, or something of the package entry point
                    found += [(a.name if a.name in LAYER else "__init__", node.lineno) for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(a.name.split(".")[1], node.lineno) for a in node.names
                      if a.name.startswith("ddpm_nb.") and a.name.count(".") >= 1]
    return found


def test_every_module_has_a_layer():
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert modules == set(LAYER), f"add {modules - set(LAYER)} to LAYERS (or drop {set(LAYER) - modules})"


def test_no_module_imports_one_from_its_own_layer_or_above():
    upward = []
    for path in sorted(PACKAGE.glob("*.py")):
        me = path.stem
        for target, line in _imports(ast.parse(path.read_text())):
            if target != me and LAYER[target] >= LAYER[me] and not (me == "__init__" and target == "__main__"):
                if me in ("__main__", "__init__") and LAYER[target] < LAYER[me]:
                    continue
                upward.append(f"{path.name}:{line} imports {target}")
    assert not upward, "imports at or above the importer's layer: " + "; ".join(upward)


def test_the_checker_sees_an_upward_import(tmp_path):
    tree = ast.parse("from . import __version__\nfrom .train import Trainer\n"
                     "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .config import RunConfig\n")
    assert _imports(tree) == [("__init__", 1), ("train", 2)]
