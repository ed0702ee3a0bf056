"""The shape of the tree: what a non-editable install contains, and the size limits of the developer guide
(functions <= 80 lines, modules <= 500 lines in par_deploy/, export/, bench/, train/)."""

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMITED = ("par_deploy", "export", "bench", "train")
MAX_FUNCTION_LINES, MAX_MODULE_LINES = 80, 500


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_directory_is_listed_in_pyproject():
    st = _setuptools()
    found = set()
    for package, folder in st["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((package, *rel)))
    missing = sorted(found - set(st["packages"]))
    assert not missing, f"pyproject.toml [tool.setuptools] packages lacks {missing}: a wheel would not contain them"
    assert not sorted(set(st["packages"]) - found), "pyproject.toml lists packages that have no __init__.py"


def function_lengths(path: Path) -> list[tuple[int, str, int]]:
    """``(lines, qualified name, first line)`` of every function and method in a file."""
    out = []

    def visit(node, prefix=""):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    out.append((child.end_lineno - child.lineno + 1, name, child.lineno))
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(path.read_text()))
    return out


def _sources():
    for folder in LIMITED:
        yield from sorted((ROOT / folder).rglob("*.py"))


def test_functions_and_modules_stay_short():
    long_functions = [
        f"{p.relative_to(ROOT)}:{line} {name} ({n} lines)"
        for p in _sources()
        for n, name, line in function_lengths(p)
        if n > MAX_FUNCTION_LINES
    ]
    long_modules = [
        f"{p.relative_to(ROOT)} ({n} lines)"
        for p in _sources()
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    ]
    assert not long_functions, (
        f"functions over {MAX_FUNCTION_LINES} lines (split them into named steps): {long_functions}"
    )
    assert not long_modules, f"modules over {MAX_MODULE_LINES} lines (split them by role): {long_modules}"


def test_function_lengths_counts_what_it_should(tmp_path):
    f = tmp_path / "m.py"
    f.write_text(
        "def a():\n    x = 1\n    return x\n\n\nclass C:\n    def b(self):\n        def inner():\n            pass\n"
    )
    assert sorted(function_lengths(f)) == [(2, "C.b.inner", 8), (3, "C.b", 7), (3, "a", 1)]
