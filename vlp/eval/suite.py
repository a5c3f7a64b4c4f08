"""Eval suites: a YAML file naming the benchmarks to run, parsed strictly and checked up front.

    name: standard
    description: ...
    batch_size: 256            # images / captions per forward pass
    num_workers: 4             # DataLoader workers decoding images
    paths:                     # placeholders the data paths use; null = the user must give it
      imagenet1k: null
    shapesworld:               # optional: defines ${shapesworld}, generated and cached on use
      cache_dir: ~/.cache/vlp
      params: {num_train: 50000, num_eval: 2000, seed: 0, image_size: 64, samples_per_shard: 5000}
      root: null               # or an existing ShapesWorld folder (then nothing is generated)
    references: [../reference/clip-vit-b-32-openai.yaml]   # relative to this file
    benchmarks:
      - {name: imagenet1k, task: zeroshot, data: "${imagenet1k}", options: {...}}

A placeholder `${x}` is filled, in order of precedence, from `paths=` (`vlp eval --path x=DIR`),
the environment variable `VLP_PATH_X`, or the default under `paths:`. Literal relative paths in
the file are relative to the file; paths given on the command line or in the environment are
relative to the current directory. Unknown keys, unknown tasks or options, unfilled
placeholders and missing data folders all raise a ValueError that names the suite file and the
key, before anything is evaluated.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from vlp import resources
from vlp.eval.references import Reference, check_keys, load_reference
from vlp.eval.tasks import build_options, get_task

SUITES_DIR = resources.eval_dir() / "suites"
DEFAULT_SUITE = SUITES_DIR / "shapesworld.yaml"
"""The suite `vlp eval` runs when given neither `--suite` nor `--task`."""
SHAPESWORLD = "shapesworld"
ENV_PREFIX = "VLP_PATH_"
_PLACEHOLDER = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_TOP_KEYS = {"name", "description", "batch_size", "num_workers", "paths", "shapesworld",
             "references", "benchmarks"}
_BENCHMARK_KEYS = {"name", "task", "data", "options"}
_SHAPESWORLD_KEYS = {"root", "cache_dir", "params"}
_PATH_OPTIONS = {"image_root", "classnames_file", "templates_file"}


@dataclass(frozen=True)
class BenchmarkSpec:
    """One benchmark of a suite: a task run on a data root with its options."""

    name: str
    task: str
    data: Path
    options: Any
    """The task's options dataclass (see `vlp.eval.tasks`)."""


@dataclass(frozen=True)
class Suite:
    """A checked suite: every data path exists and every option is valid."""

    name: str
    benchmarks: tuple[BenchmarkSpec, ...]
    batch_size: int = 64
    num_workers: int = 0
    references: tuple[Reference, ...] = ()
    description: str = ""
    path: Path | None = None
    paths: dict[str, str] = field(default_factory=dict)
    """The placeholder values used, for the report."""


def load_suite(
    path: str | Path,
    *,
    overrides: Sequence[str] = (),
    paths: Mapping[str, str | Path] | None = None,
    only: Sequence[str] | None = None,
    progress: bool = True,
) -> Suite:
    """Read, check and resolve a suite file, given by path or by a shipped suite's name
    (`standard`, see `vlp.resources.suites`).

    `overrides` are dotted `key=value` edits applied before checking (`batch_size=32`,
    `shapesworld.params.num_eval=200`, `benchmarks.order.options.seed=1`); `paths` fills
    placeholders; `only` keeps the named benchmarks. ShapesWorld is generated (or found in its
    cache) only after everything else has been checked.
    """
    try:
        path = resources.find_suite(path)
    except FileNotFoundError as err:
        raise ValueError(str(err)) from None
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from None
    raw = apply_overrides(raw, overrides, where=str(path))
    return parse_suite(raw, where=str(path), base_dir=path.parent, paths=paths, only=only,
                       progress=progress, source=path)


def parse_suite(
    raw: Any,
    *,
    where: str,
    base_dir: Path,
    paths: Mapping[str, str | Path] | None = None,
    only: Sequence[str] | None = None,
    progress: bool = True,
    source: Path | None = None,
) -> Suite:
    """A suite from its parsed YAML mapping (see `load_suite`); `where` names it in errors."""
    check_keys(raw, _TOP_KEYS, where, required={"name", "benchmarks"})
    name = _typed(raw, "name", str, where)
    batch_size = _typed(raw, "batch_size", int, where, default=64)
    num_workers = _typed(raw, "num_workers", int, where, default=0)
    if batch_size < 1 or num_workers < 0:
        raise ValueError(f"{where}: batch_size must be >= 1 and num_workers >= 0")
    declared = _declared_paths(raw, where)
    specs = _benchmark_entries(raw, where)
    references = tuple(load_reference(base_dir / p) for p in _typed(raw, "references", list,
                                                                     where, default=[]))
    if only:
        unknown = sorted(set(only) - {s["name"] for s in specs})
        if unknown:
            raise ValueError(f"{where}: --only names unknown benchmark(s) {unknown}; suite has "
                             f"{[s['name'] for s in specs]}")
        specs = [s for s in specs if s["name"] in only]
    given = {k: str(Path(v).expanduser().resolve()) for k, v in (paths or {}).items()}
    undeclared = sorted(set(given) - set(declared) - {SHAPESWORLD})
    if undeclared:
        raise ValueError(f"{where}: --path names {undeclared}, which the suite does not declare; "
                         f"declared: {sorted(declared)}")
    values = _resolve_placeholders(specs, declared, given, where)
    if SHAPESWORLD in _used_placeholders(specs) and SHAPESWORLD not in values:
        values[SHAPESWORLD] = str(_shapesworld_root(raw, base_dir, where, progress))
    benchmarks = tuple(_benchmark(s, values, base_dir) for s in specs)
    return Suite(name, benchmarks, batch_size, num_workers, references,
                 _typed(raw, "description", str, where, default=""), source, values)


def single_task_suite(
    task: str,
    data: str | Path,
    *,
    name: str | None = None,
    options: Mapping[str, Any] | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
) -> Suite:
    """A one-benchmark suite, as `vlp eval --task TASK --data PATH` runs."""
    data = Path(data).expanduser()
    name = name or task
    if not data.exists():
        raise ValueError(f"--data: {data} does not exist")
    spec = BenchmarkSpec(name, task, data, build_options(task, options, f"--task {task} options"))
    return Suite(name, (spec,), batch_size, num_workers)


def apply_overrides(raw: Any, overrides: Sequence[str], *, where: str) -> Any:
    """Apply dotted `key=value` overrides (values parsed as YAML) to a suite mapping; list
    entries of `benchmarks` are addressed by their `name`."""
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key:
            raise ValueError(f"override {override!r}: expected key=value, e.g. batch_size=32")
        node, parts = raw, key.split(".")
        for depth, part in enumerate(parts[:-1]):
            node = _child(node, part, ".".join(parts[: depth + 1]), where)
        if not isinstance(node, dict):
            raise ValueError(f"{where}: override {key!r}: {'.'.join(parts[:-1])} is not a mapping")
        node[parts[-1]] = yaml.safe_load(text) if text else None
    return raw


def _child(node: Any, part: str, key: str, where: str) -> Any:
    if isinstance(node, list):
        match = [e for e in node if isinstance(e, dict) and e.get("name") == part]
        if not match:
            raise ValueError(f"{where}: override {key!r}: no benchmark named {part!r}")
        return match[0]
    if not isinstance(node, dict):
        raise ValueError(f"{where}: override {key!r}: cannot descend into {node!r}")
    if node.get(part) is None:
        node[part] = {}
    return node[part]


def _typed(raw: dict, key: str, kind: type, where: str, *, default: Any = None) -> Any:
    value = raw.get(key, default)
    if value is None and default is not None:
        value = default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{where}: {key} must be a {kind.__name__}, got {value!r}")
    return value


def _declared_paths(raw: dict, where: str) -> dict[str, str | None]:
    declared = raw.get("paths") or {}
    if not isinstance(declared, dict):
        raise ValueError(f"{where}: paths must be a mapping of placeholder → default (or null)")
    for key, value in declared.items():
        if not _PLACEHOLDER.fullmatch(f"${{{key}}}") or not (value is None
                                                             or isinstance(value, str)):
            raise ValueError(f"{where}: paths.{key}: expected a name and a path or null")
    if SHAPESWORLD in declared:
        raise ValueError(f"{where}: paths.{SHAPESWORLD} is reserved; use the shapesworld section")
    if raw.get(SHAPESWORLD) is not None:
        declared = {**declared, SHAPESWORLD: None}
    return declared


def _benchmark_entries(raw: dict, where: str) -> list[dict[str, Any]]:
    entries = raw["benchmarks"]
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{where}: benchmarks must be a non-empty list")
    out, names = [], set()
    for i, entry in enumerate(entries):
        key = f"{where}: benchmarks[{i}]"
        check_keys(entry, _BENCHMARK_KEYS, key, required={"name", "task", "data"})
        name, task, data = entry["name"], entry["task"], entry["data"]
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"{key}.name: expected letters, digits, '_', '-' or '.', got {name!r}")
        key = f"{where}: benchmarks[{i}] ({name})"
        if name in names:
            raise ValueError(f"{key}: duplicate benchmark name {name!r}")
        names.add(name)
        try:
            get_task(task)
        except ValueError as err:
            raise ValueError(f"{key}.task: {err}") from None
        if not isinstance(data, str) or not data:
            raise ValueError(f"{key}.data: expected a path, got {data!r}")
        options = entry.get("options") or {}
        build_options(task, options, f"{key}.options")  # fail early, before any path is filled
        out.append({"name": name, "task": task, "data": data, "options": options, "key": key})
    return out


def _strings(spec: dict[str, Any]) -> list[tuple[str, str]]:
    """(suite key, string) of every value that may hold a placeholder."""
    out = [(f"{spec['key']}.data", spec["data"])]
    out += [(f"{spec['key']}.options.{k}", v) for k, v in spec["options"].items()
            if k in _PATH_OPTIONS and isinstance(v, str)]
    return out


def _used_placeholders(specs: list[dict[str, Any]]) -> set[str]:
    return {m for s in specs for _, text in _strings(s) for m in _PLACEHOLDER.findall(text)}


def _resolve_placeholders(
    specs: list[dict[str, Any]], declared: dict[str, str | None], given: dict[str, str],
    where: str,
) -> dict[str, str]:
    values: dict[str, str] = {}
    for spec in specs:
        for key, text in _strings(spec):
            for placeholder in _PLACEHOLDER.findall(text):
                if placeholder not in declared:
                    raise ValueError(f"{key}: unknown placeholder ${{{placeholder}}}; declare "
                                     f"it under paths: (declared: {sorted(declared)})")
                if placeholder in values or (placeholder == SHAPESWORLD
                                             and placeholder not in given):
                    continue
                env = os.environ.get(ENV_PREFIX + placeholder.upper())
                value = given.get(placeholder) or (str(Path(env).expanduser().resolve()) if env
                                                   else declared[placeholder])
                if value is None:
                    raise ValueError(
                        f"{key} is {text!r}, but path {placeholder!r} is not set: pass "
                        f"--path {placeholder}=DIR to vlp eval (paths={{'{placeholder}': ...}} "
                        f"in Python) or set {ENV_PREFIX}{placeholder.upper()}"
                    )
                values[placeholder] = value
    return values


def _shapesworld_root(raw: dict, base_dir: Path, where: str, progress: bool) -> Path:
    from vlp.data.cache import prepare_shapesworld
    from vlp.data.shapesworld_writer import write_shapesworld

    section = raw[SHAPESWORLD]
    key = f"{where}: {SHAPESWORLD}"
    check_keys(section, _SHAPESWORLD_KEYS, key)
    if section.get("root") is not None:
        root = (base_dir / Path(str(section["root"])).expanduser()).resolve()
        if not (root / "manifest.json").is_file():
            raise ValueError(f"{key}.root: {root} is not a ShapesWorld folder (no manifest.json)")
        return root
    params = section.get("params") or {}
    allowed = {p for p in inspect.signature(write_shapesworld).parameters
               if p not in ("out_dir", "num_workers", "progress")}
    check_keys(params, allowed, f"{key}.params")
    cache_dir = Path(str(section.get("cache_dir") or "~/.cache/vlp")).expanduser()
    try:
        return prepare_shapesworld(base_dir / cache_dir, params, progress=progress)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{key}.params: {err}") from None


def _benchmark(spec: dict[str, Any], values: dict[str, str], base_dir: Path) -> BenchmarkSpec:
    def fill(text: str) -> Path:
        filled = _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)
        return (base_dir / Path(filled).expanduser()).resolve()

    data = fill(spec["data"])
    if not data.exists():
        raise ValueError(f"{spec['key']}.data: {data} does not exist")
    options = build_options(spec["task"], spec["options"], f"{spec['key']}.options")
    changes = {}
    for f in fields(options):
        value = getattr(options, f.name)
        if f.name in _PATH_OPTIONS and isinstance(value, str):
            changes[f.name] = str(fill(value))
            if not Path(changes[f.name]).exists():
                raise ValueError(f"{spec['key']}.options.{f.name}: {changes[f.name]} does not "
                                 "exist")
    return BenchmarkSpec(spec["name"], spec["task"], data, replace(options, **changes))
