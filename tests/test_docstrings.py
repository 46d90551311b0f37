"""Every docstring example in fljax runs as a doctest (under conftest's strict JAX settings).

Each module's doctests run in one parametrized test; another checks that every
``Examples:`` section holds at least one ``>>>`` line and that the doctest finder reaches
every docstring that has one, so no example escapes execution; a last one that every public
module has an API reference page (``docs/api``) listed in ``mkdocs.yml``.
"""

import ast
import doctest
import importlib
import io
import pathlib
import pkgutil
import re

import pytest

import fljax

PACKAGE = pathlib.Path(fljax.__file__).parent
MODULES = sorted(["fljax"] + [m.name for m in pkgutil.walk_packages([str(PACKAGE)], "fljax.")])


def _doctests(name: str) -> list[doctest.DocTest]:
    module = importlib.import_module(name)
    return [t for t in doctest.DocTestFinder().find(module) if t.examples]


def _source(name: str) -> pathlib.Path:
    path = PACKAGE.joinpath(*name.split(".")[1:])
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _docstrings(path: pathlib.Path) -> list[str]:
    """Every module, class and function docstring in a file, nested ones included."""
    tree = ast.parse(path.read_text())
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return [d for n in ast.walk(tree) if isinstance(n, kinds) and (d := ast.get_docstring(n, clean=True))]


def _examples_sections(docstring: str) -> list[str]:
    """The body of each Google-style ``Examples:`` section (up to the next dedent)."""
    lines = docstring.splitlines()
    sections = []
    for i, line in enumerate(lines):
        if line.strip() not in ("Examples:", "Example:"):
            continue
        indent = len(line) - len(line.lstrip())
        body = []
        for nxt in lines[i + 1 :]:
            if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent:
                break
            body.append(nxt)
        sections.append("\n".join(body))
    return sections


MODULES_WITH_EXAMPLES = [name for name in MODULES if _doctests(name)]


def test_some_modules_have_examples():
    assert len(MODULES_WITH_EXAMPLES) >= 10


@pytest.mark.parametrize("name", MODULES_WITH_EXAMPLES)
def test_doctests(name):
    out = io.StringIO()
    runner = doctest.DocTestRunner(verbose=False)
    for test in _doctests(name):
        runner.run(test, out=out.write)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, out.getvalue()
    assert result.attempted > 0


@pytest.mark.parametrize("name", MODULES)
def test_every_example_is_executed(name):
    docstrings = _docstrings(_source(name))
    for docstring in docstrings:
        for section in _examples_sections(docstring):
            assert re.search(r"^\s*>>> ", section, re.M), (
                f"{name}: an Examples: section without a >>> line:\n{section}"
            )
    # The finder reaches every docstring holding an example (none hidden in nested or
    # wrapped functions).
    with_examples = sum(1 for d in docstrings if re.search(r"^\s*>>> ", d, re.M))
    assert len(_doctests(name)) == with_examples, name


def test_every_module_has_a_reference_page():
    repo = PACKAGE.parent
    pages = {p: p.read_text() for p in (repo / "docs" / "api").rglob("*.md")}
    documented = {m for text in pages.values() for m in re.findall(r"^::: (fljax[\w.]*)$", text, re.M)}
    public = {m for m in MODULES if not any(part.startswith("_") for part in m.split("."))} - {"fljax"}
    assert documented == public, public ^ documented
    nav = (repo / "mkdocs.yml").read_text()
    for page in pages:
        assert f" {page.relative_to(repo / 'docs').as_posix()}\n" in nav, f"{page} is not in mkdocs.yml's nav"
