"""The files vlp ships beside its code: eval suites, prompt templates, reference numbers
(`eval/`) and training recipes (`recipes/`).

In the repository they are the top-level `eval/` and `recipes/` folders; a wheel carries the
same files inside this package, as `vlp/resources/eval/` and `vlp/resources/recipes/`
(pyproject.toml maps the folders there). This module is the one place that knows both layouts:
everything else asks it for a folder or a named file.
"""

from __future__ import annotations

from pathlib import Path

_INSTALLED = Path(__file__).resolve().parent
"""Where a wheel puts the files."""
_CHECKOUT = _INSTALLED.parents[1]
"""The repository root, when vlp runs from a source checkout (editable install, PYTHONPATH)."""


def resource_dir(name: str) -> Path:
    """The shipped folder `name` (`eval` or `recipes`), wherever this vlp was installed from."""
    if (_INSTALLED / name).is_dir():
        return _INSTALLED / name
    if (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / name).is_dir():
        return _CHECKOUT / name
    raise FileNotFoundError(f"vlp's {name}/ folder is missing from {_INSTALLED} and "
                            f"{_CHECKOUT}: reinstall vlp")


def eval_dir() -> Path:
    """`eval/`: `suites/*.yaml`, `templates/`, `reference/*.yaml`."""
    return resource_dir("eval")


def suites() -> dict[str, Path]:
    """The shipped eval suites by name (`shapesworld`, `standard`, ...)."""
    return {p.stem: p for p in sorted((eval_dir() / "suites").glob("*.yaml"), key=_stem)}


def recipes() -> dict[str, Path]:
    """The shipped training recipes by name (`shapesworld-tiny`, `clip-vit-b32`, ...)."""
    return {p.stem: p for p in sorted(resource_dir("recipes").glob("*.yaml"), key=_stem)}


def _stem(path: Path) -> str:
    return path.stem


def _find(kind: str, spec: str | Path, shipped: dict[str, Path]) -> Path:
    """`spec` if it is an existing file, else the shipped file it names (`NAME` or
    `NAME.yaml`); a FileNotFoundError otherwise, listing what ships."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    name = path.name.removesuffix(".yaml")
    if str(path.parent) == "." and name in shipped:
        return shipped[name]
    raise FileNotFoundError(f"{kind} file {spec} not found, and it names no shipped {kind} "
                            f"(shipped: {', '.join(shipped) or 'none'})")


def find_recipe(spec: str | Path) -> Path:
    """A recipe file by path, or by the name of a shipped one (`vlp train shapesworld-tiny`)."""
    return _find("recipe", spec, recipes())


def find_suite(spec: str | Path) -> Path:
    """A suite file by path, or by the name of a shipped one (`vlp eval --suite standard`)."""
    return _find("suite", spec, suites())


def summary(path: Path) -> str:
    """The first comment line of a YAML file: what a recipe or suite is for."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip().rstrip(":")
        if line.strip():
            break
    return ""
