"""The notebooks run: their code cells are executed in order, in quick mode, outside a kernel,
without the repository's ``experiments/`` folder on the path (a notebook needs only the
installed library). A notebook that needs an offline data set names it in its metadata
(``"fljax": {"data": [...]}``) and is skipped, with the reason, where the loaders cannot find it.

Every notebook also follows one convention: an "Open in Colab" badge, a first code cell that
installs fljax on Colab from ``FLJAX_REPO`` and sets ``QUICK = True`` (the mode run here),
outputs stripped, and a last markdown cell that points to a docs page and to the results."""

import json
import pathlib
import re

import pytest

from fljax.data.datasets import paths

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
NUMBERED = re.compile(r"^\d\d_[a-z0-9_]+\.ipynb$")
# Notebooks that end on their last example instead of a "Where to go next" cell (their guide in
# docs/ points to them).
WITHOUT_NEXT_STEPS = {"07_federated_analytics.ipynb"}


def _load(path: pathlib.Path) -> dict:
    return json.loads(path.read_text())


def _source(cell: dict) -> str:
    return "".join(cell["source"])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_code_cells_run(path, monkeypatch):
    nb = _load(path)
    monkeypatch.chdir(REPO)  # ../shared/data, where the loaders look, is the repository's sibling
    for name in nb["metadata"].get("fljax", {}).get("data", []):
        if not any(folder.is_dir() for folder in paths.candidates(name)):
            searched = ", ".join(str(f.resolve()) for f in paths.candidates(name))
            pytest.skip(f"{path.name} needs the offline data set {name!r}, not found in {searched}")
    scope: dict = {}
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            exec(compile(_source(cell), path.name, "exec"), scope)
    assert scope["QUICK"] is True


def test_notebooks_are_numbered_and_complete():
    names = [p.name for p in NOTEBOOKS]
    assert all(NUMBERED.match(n) for n in names), names
    prefixes = [n[:2] for n in names]
    assert prefixes == [f"{i:02d}" for i in range(1, len(names) + 1)], prefixes


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_convention(path):
    nb = _load(path)
    cells = nb["cells"]
    first_markdown = _source(cells[0])
    assert cells[0]["cell_type"] == "markdown" and first_markdown.startswith(f"# {path.name[:2]} ")
    assert "[![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)]" in first_markdown
    install = next(c for c in cells if c["cell_type"] == "code")
    text = _source(install)
    assert '"google.colab" in sys.modules' in text and 'os.environ.get("FLJAX_REPO")' in text
    assert re.search(r"^QUICK = True\b", text, re.MULTILINE), "the first code cell sets QUICK = True"
    for cell in cells:  # outputs stripped
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, path.name
    if path.name in WITHOUT_NEXT_STEPS:
        return
    last = _source(cells[-1])
    assert cells[-1]["cell_type"] == "markdown" and "Where to go next" in last
    assert "docs/" in last and ("experiments/results/" in last or "README" in last), path.name
    for ref in re.findall(r"`((?:docs|experiments/results|experiments/configs)/[\w./]+)`", last):
        assert (REPO / ref).exists(), f"{path.name} points to {ref}, which does not exist"
