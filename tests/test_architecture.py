"""docs/architecture.md stays true: the modules it names exist, every module is named, and the layers
import only downwards (the core never imports the app or the benchmarks; the app never the benchmarks)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"
PACKAGES = ("sv2v_core", "ui", "bench")
NAMED = re.compile(r"(?<![\w/.])((?:sv2v_core|ui|bench)/[\w/]+\.(?:py|js|html)|app\.py)\b")


def named() -> set[str]:
    return set(NAMED.findall(DOC.read_text(encoding="utf-8")))


def modules() -> set[str]:
    return {path.relative_to(ROOT).as_posix() for package in PACKAGES for path in (ROOT / package).rglob("*.py")}


def test_every_module_the_page_names_exists():
    missing = sorted(name for name in named() if not (ROOT / name).is_file())
    assert not missing, f"docs/architecture.md names modules that do not exist: {missing}"


def test_every_module_of_the_packages_is_on_the_page():
    absent = sorted(modules() - named())
    assert not absent, f"docs/architecture.md does not name: {absent}"


def imported_packages(path: Path) -> set[str]:
    """The top-level packages among PACKAGES that a module imports (relative imports: its own)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(PACKAGES)


def test_the_layers_import_only_downwards():
    allowed = {"sv2v_core": {"sv2v_core"}, "ui": {"sv2v_core", "ui"}, "bench": set(PACKAGES)}
    wrong = [(name, sorted(imported_packages(ROOT / name) - allowed[name.split("/")[0]]))
             for name in sorted(modules())]
    assert not [item for item in wrong if item[1]], [item for item in wrong if item[1]]
