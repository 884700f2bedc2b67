"""One-way dependencies (shared/docs/ARCHITECTURE.md): a lower package never imports a higher one."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What each package may import of the others; anything it does not name here is above it.
ALLOWED = {
    "search_spaces": set(),
    "trainer": {"search_spaces"},
    "latency_tables": {"search_spaces"},
    "compress": {"search_spaces", "trainer", "latency_tables"},
    "nas": {"search_spaces", "trainer", "latency_tables", "compress"},
}


def imported_packages(source: str) -> list[tuple[int, str]]:
    """(line, top-level package) of every absolute import in `source`, inside functions too."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def test_the_scan_sees_imports_at_module_level_and_inside_functions():
    src = "import nas.cli\nfrom trainer import x\ndef f():\n    from compress.prune import p\nfrom . import y\n"
    assert imported_packages(src) == [(1, "nas"), (2, "trainer"), (4, "compress")]


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_package_imports_only_the_packages_below_it(package):
    higher = set(ALLOWED) - ALLOWED[package] - {package}
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no modules found under {package}/"
    wrong = [f"{f.relative_to(ROOT)}:{line} imports {top}"
             for f in files for line, top in imported_packages(f.read_text()) if top in higher]
    assert not wrong, "\n".join(wrong)
