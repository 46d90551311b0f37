"""The notebooks run: their code cells are executed in order, outside a kernel, without the
repository's ``experiments/`` folder on the path (a notebook needs only the installed library)."""

import json
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "notebooks").glob("*.ipynb")), ids=lambda p: p.name)
def test_notebook_code_cells_run(path, monkeypatch):
    nb = json.loads(path.read_text())
    monkeypatch.chdir(REPO)
    scope: dict = {}
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), path.name, "exec"), scope)
