"""What pyproject.toml declares: every module vlp imports is a dependency, every module the tests
import is a dependency or in the `test` extra, so a fresh `pip install -e '.[test]'` runs them."""

import ast
import importlib
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# Imported only by an optional feature that says how to install it when it is missing.
OPTIONAL = {"spacy": "vlp shards negatives --spacy MODEL"}


def distribution_name(requirement: str) -> str:
    return canonical(re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0])


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def third_party_imports(folder: Path) -> dict[str, str]:
    """Top-level module → a file importing it, for every absolute import under `folder`."""
    found = {}
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("vlp", "data_tools", "tests"):
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def undeclared(imports: dict[str, str], declared: set[str]) -> list[str]:
    providers = importlib.metadata.packages_distributions()
    missing = []
    for module, where in sorted(imports.items()):
        dists = {canonical(d) for d in providers.get(module, [])}
        if not dists & declared:
            missing.append(f"{module} (imported by {where}; installed from {sorted(dists)})")
    return missing


def test_every_module_vlp_imports_is_a_declared_dependency():
    declared = {distribution_name(r) for r in PYPROJECT["dependencies"]}
    imports = {m: w for m, w in {**third_party_imports(ROOT / "vlp"), **third_party_imports(ROOT / "data_tools")}.items() if m not in OPTIONAL}
    assert undeclared(imports, declared) == []


def test_every_module_the_tests_import_is_declared_by_vlp_or_its_test_extra():
    declared = {distribution_name(r) for r in PYPROJECT["dependencies"]
                + PYPROJECT["optional-dependencies"]["test"]}
    assert undeclared(third_party_imports(ROOT / "tests"), declared) == []


def test_the_clip_benchmark_modules_the_parity_tests_use_import():
    # clip-benchmark imports requests without declaring it; the test extra declares it
    importlib.import_module("clip_benchmark.datasets.builder")
    importlib.import_module("clip_benchmark.metrics.zeroshot_retrieval")

