"""The checkpoint format: self-describing, written atomically, read without unpickling.

A checkpoint is a folder `step-{step:09d}` (zero-padded, so name order is step order):

    model.safetensors        unwrapped model weights
    optimizer.safetensors    optimizer tensors, flattened as `state.{param name}.{name}`
    trainer_state.json       step, optimizer param groups, scheduler, grad scaler, data position
    rng.rank{R}.safetensors  RNG states of rank R (python, numpy, torch CPU, CUDA), one per rank
    model_config.json        the open_clip architecture (`model_cfg`), model name, overrides
    preprocess.json          image preprocessing (open_clip `PreprocessCfg`) and tokenizer spec
    text_tower/              a transformers text tower's config and tokenizer files (no weights)
    config.yaml              the resolved run config
    manifest.json            size and sha256 of every other file, and whether it is a milestone

`model_config.json`, `preprocess.json` and `text_tower/` come from the model's `ModelSpec`
(`vlp.models`); with the weights they are all that `vlp.load` and `vlp export` read.

Writing goes to `step-N.tmp/` and is renamed into place only when complete; the run folder's
`latest` file (also replaced atomically) names the newest complete checkpoint. With several
processes, every rank writes its own RNG file into the staging folder (a filesystem all ranks
share) before the main process completes and renames it. Weights and optimizer state are
gathered unsharded and keyed by parameter name (torch's distributed state-dict API), so the
same files serve plain, DDP and FSDP runs. Files are written with the mode any new file gets
under the umask (safetensors alone writes 0600, unreadable to others on a shared filesystem).

Every load checks the manifest first, so a truncated or altered file is found before anything
is read: resuming checks every file, `vlp.load`, `vlp eval`, `vlp export` and `model.pretrained`
the model's files (`verify_checkpoint(model_only=True)`: all but the optimizer, trainer state
and RNG files, which they do not read). A manifest that is not what `write_manifest` writes is a
broken checkpoint too. Pruning keeps the newest `keep_last` checkpoints and every milestone.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

LATEST = "latest"
PREFIX = "step-"
MODEL_WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model_config.json"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER = "optimizer.safetensors"
REQUIRED_FILES = (MODEL_WEIGHTS, OPTIMIZER, TRAINER_STATE, MODEL_CONFIG)
MODEL_FILES = (MODEL_WEIGHTS, MODEL_CONFIG)
"""What the manifest of a checkpoint loaded for its model alone must list."""


class CheckpointError(ValueError):
    """A checkpoint folder is missing a file or holds something unreadable."""


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:09d}"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _umask() -> int:
    """The process umask, read without changing it (`os.umask` can only read by setting, which
    would race with files other threads create meanwhile)."""
    try:
        with open("/proc/self/status") as status:  # Linux
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    probe = Path(tempfile.gettempdir()) / f"vlp-umask-{os.getpid()}-{threading.get_ident()}"
    fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o777)  # the kernel applies it
    try:
        return 0o777 & ~os.fstat(fd).st_mode
    finally:
        os.close(fd)
        probe.unlink()


def give_default_mode(*paths: str | Path) -> None:
    """chmod `paths` to what a new file gets (0o666 less the umask): writers that create
    files 0600 (safetensors' `save_file`) would hide them from the rest of a shared cluster."""
    mode = 0o666 & ~_umask()
    for path in paths:
        os.chmod(path, mode)


def save_tensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """safetensors' `save_file`, with the file mode every other new file gets."""
    save_file(tensors, path, metadata=metadata)
    give_default_mode(path)


def full_state_dicts(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, prefix: str = ""
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Unsharded model and optimizer state dicts on CPU, both keyed by parameter name (without
    `prefix`), whether `model` is plain, DDP or FSDP: a collective under FSDP, call it on every
    rank (only rank 0 then gets the tensors)."""
    weights, optim = get_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def strip(name: str) -> str:
        return name[len(prefix):] if name.startswith(prefix) else name

    weights = {strip(k): v for k, v in weights.items() if k.startswith(prefix)}
    optim = {"state": {strip(k): v for k, v in optim.get("state", {}).items()},
             "param_groups": [{**g, "params": [strip(p) for p in g["params"]]}
                              for g in optim.get("param_groups", [])]}  # {} off rank 0
    return weights, optim


def set_full_state_dicts(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor],
    optim: dict[str, Any], *, prefix: str = ""
) -> None:
    """Load `full_state_dicts` output into `model` and `optimizer` (every rank, FSDP shards it)."""
    optim = {"state": {prefix + k: v for k, v in optim["state"].items()},
             "param_groups": [{**g, "params": [prefix + p for p in g["params"]]}
                              for g in optim["param_groups"]]}
    set_state_dict(model, optimizer, model_state_dict={prefix + k: v for k, v in weights.items()},
                   optim_state_dict=optim, options=StateDictOptions(full_state_dict=True))


def flatten_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    """Split a name-keyed optimizer state dict into tensors `state.{param}.{name}`
    (safetensors) and the rest (JSON)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param, pstate in state_dict["state"].items():
        for name, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(param, {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        param, name = key.removeprefix("state.").rsplit(".", 1)
        state.setdefault(param, {})[name] = value
    for param, values in meta["scalars"].items():
        state.setdefault(param, {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_file(rank: int) -> str:
    return f"rng.rank{rank}.safetensors"


def rng_states() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """This process's python, numpy, torch CPU and current-CUDA-device RNG states, as tensors
    plus the few scalars they need (safetensors metadata)."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {
        "python": torch.tensor(py_state, dtype=torch.int64),
        "numpy": torch.from_numpy(np_keys.astype(np.int64)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    scalars = {"python": [py_version, py_gauss], "numpy": [np_kind, np_pos, np_has_gauss, np_gauss]}
    return tensors, {"scalars": json.dumps(scalars)}


def set_rng_states(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    scalars = json.loads(metadata["scalars"])
    py_version, py_gauss = scalars["python"]
    random.setstate((py_version, tuple(tensors["python"].tolist()), py_gauss))
    np_kind, np_pos, np_has_gauss, np_gauss = scalars["numpy"]
    np.random.set_state((np_kind, tensors["numpy"].numpy().astype(np.uint32), np_pos,
                         np_has_gauss, np_gauss))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


def start_checkpoint(run_dir: str | Path, step: int) -> Path:
    """A fresh, empty staging folder for the checkpoint of `step` (main process only)."""
    tmp = Path(run_dir) / (checkpoint_name(step) + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def save_rng_state(staging: Path, *, rank: int) -> None:
    """Write this rank's RNG states into the staging folder (every rank, after `start_checkpoint`)."""
    tensors, metadata = rng_states()
    save_tensors(tensors, staging / rng_file(rank), metadata=metadata)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, *, step: int, milestone: bool) -> None:
    files = {
        p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST
    }
    manifest = {"format": 1, "step": step, "milestone": milestone, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))


def is_training_state(name: str) -> bool:
    """Whether manifest entry `name` is read only to resume training (optimizer, trainer state,
    RNG), not to use the model."""
    return name in (OPTIMIZER, TRAINER_STATE) or (name.startswith("rng.rank")
                                                  and name.endswith(".safetensors"))


def read_manifest(ckpt: Path) -> dict[str, tuple[int, str]]:
    """`{relative name: (bytes, sha256)}` from `ckpt/manifest.json`; anything else than what
    `write_manifest` writes (a list, a string entry, a missing key, a name outside the folder)
    raises `CheckpointError` naming the file."""
    path = ckpt / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path} (without it the checkpoint's "
                              "files cannot be checked)")
    manifest = read_json(path)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise CheckpointError(f"{path}: malformed, expected an object with a 'files' table")
    entries = {}
    for name, entry in files.items():
        size = entry.get("bytes") if isinstance(entry, dict) else None
        digest = entry.get("sha256") if isinstance(entry, dict) else None
        if type(size) is not int or not isinstance(digest, str):
            raise CheckpointError(f"{path}: malformed entry for {name!r}, expected "
                                  "{'bytes': N, 'sha256': HEX}")
        if not name or Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(f"{path}: names a file outside the checkpoint: {name}")
        entries[name] = (size, digest)
    return entries


def verify_checkpoint(ckpt: str | Path, *, model_only: bool = False) -> None:
    """Raise `CheckpointError` naming the first file that is missing, truncated or altered
    since the checkpoint was written (checked against its manifest).

    `model_only` checks what loading the model reads (all but `is_training_state` files), and
    also refuses such a file that the manifest does not list. Hashing streams each file in
    1 MiB blocks; it costs about as much as reading the file (see README, Checkpoints).
    """
    ckpt = Path(ckpt)
    files = read_manifest(ckpt)
    required = MODEL_FILES if model_only else REQUIRED_FILES
    missing = [name for name in required if name not in files]
    if missing:
        raise CheckpointError(f"{ckpt / MANIFEST}: does not list {', '.join(missing)}")
    if model_only:
        files = {name: entry for name, entry in files.items() if not is_training_state(name)}
        for path in sorted(ckpt.rglob("*")):
            name = path.relative_to(ckpt).as_posix()
            if path.is_file() and name != MANIFEST and not is_training_state(name) \
                    and name not in files:
                raise CheckpointError(f"{path}: not listed in {ckpt / MANIFEST} (added after "
                                      "the checkpoint was written)")
    for name, (size, digest) in files.items():
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint file missing: {path}")
        if path.stat().st_size != size:
            raise CheckpointError(f"{path}: {path.stat().st_size} bytes, the manifest says "
                                  f"{size} (truncated or replaced)")
        if _sha256(path) != digest:
            raise CheckpointError(f"{path}: sha256 differs from the manifest (altered or corrupt)")


def is_milestone(ckpt: Path) -> bool:
    try:
        return bool(json.loads((ckpt / MANIFEST).read_text()).get("milestone"))
    except (OSError, ValueError, AttributeError):
        return False


def checkpoint_step(ckpt: Path) -> int:
    return int(ckpt.name[len(PREFIX):])


def prune_checkpoints(run_dir: str | Path, *, keep_last: int, newest: int) -> None:
    """Of the checkpoints up to step `newest` (the one just written), delete all but the last
    `keep_last`, except milestones. Later steps (a timeline abandoned by resuming from an
    earlier checkpoint) are left alone, so a fresh checkpoint is never the one pruned."""
    current = [c for c in list_checkpoints(run_dir) if checkpoint_step(c) <= newest]
    for old in current[:-keep_last]:
        if not is_milestone(old):
            shutil.rmtree(old)


def save_checkpoint(
    run_dir: str | Path,
    *,
    step: int,
    model: torch.nn.Module | Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | Mapping[str, Any],
    trainer_state: dict[str, Any],
    model_info: dict[str, Any],
    config_yaml: str,
    keep_last: int,
    files: Mapping[str, Any] | None = None,
    milestone: bool = False,
    staged: bool = False,
) -> Path:
    """Write a complete checkpoint for `step` atomically; prune all but the newest `keep_last`
    and the milestones (a `milestone` checkpoint is never pruned).

    `model` and `optimizer` are the (unwrapped) module and its optimizer, or their
    `full_state_dicts` (what several processes pass). `files` adds files by relative
    name: a `Path` value is copied, anything else is written as JSON
    (`ModelSpec.checkpoint_files()`: `preprocess.json`, `text_tower/...`). `staged=True` means
    `start_checkpoint` made the staging folder and every rank already wrote its RNG file there;
    otherwise this (single) process is rank 0 and writes its own.
    """
    run_dir = Path(run_dir)
    final = run_dir / checkpoint_name(step)
    if staged:
        tmp = run_dir / (checkpoint_name(step) + ".tmp")
    else:
        tmp = start_checkpoint(run_dir, step)
        save_rng_state(tmp, rank=0)

    if isinstance(model, torch.nn.Module):
        model, optimizer = full_state_dicts(model, optimizer)
    weights = {k: v.detach().contiguous().cpu() for k, v in model.items()}
    save_tensors(weights, tmp / MODEL_WEIGHTS, metadata={"format": "pt", "step": str(step)})
    opt_tensors, opt_meta = flatten_optimizer_state(optimizer)
    save_tensors(opt_tensors, tmp / OPTIMIZER)
    state = {"step": step, "optimizer": opt_meta, **trainer_state}
    (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=1))
    (tmp / MODEL_CONFIG).write_text(json.dumps(model_info, indent=1))
    (tmp / "config.yaml").write_text(config_yaml)
    for name, content in (files or {}).items():
        target = tmp / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            shutil.copyfile(content, target)
        else:
            target.write_text(json.dumps(content, indent=1))
    write_manifest(tmp, step=step, milestone=milestone)

    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _atomic_write_text(run_dir / LATEST, final.name + "\n")
    prune_checkpoints(run_dir, keep_last=keep_last, newest=step)
    return final


def is_checkpoint_name(name: str) -> bool:
    """`step-N`: a checkpoint folder's own name (no separators, so always inside its run)."""
    return name.startswith(PREFIX) and name[len(PREFIX):].isdigit()


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `run_dir`, oldest first (folders, not links to elsewhere)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(
        p for p in run_dir.iterdir()
        if is_checkpoint_name(p.name) and p.is_dir() and not p.is_symlink()
    )


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint the `latest` pointer names, else the newest complete one, else None.
    A pointer to anything but a `step-N` folder of `run_dir` raises `CheckpointError`."""
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST
    found = list_checkpoints(run_dir)
    if pointer.is_file():
        name = pointer.read_text().strip()
        if not is_checkpoint_name(name):
            raise CheckpointError(f"{pointer}: names {name!r}, not a {PREFIX}N checkpoint "
                                  "folder of this run")
        if run_dir / name in found:
            return run_dir / name
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or a run folder's latest checkpoint; errors name the path."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder (expected a vlp checkpoint folder, "
                                f"which holds {MODEL_CONFIG} and {MODEL_WEIGHTS}, or a run folder)")
    if (path / MODEL_CONFIG).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"checkpoint file missing: {path / MODEL_CONFIG} (and no "
                              f"{PREFIX}* checkpoint inside: {path} is neither a vlp checkpoint "
                              "nor a run folder)")
    return latest


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file missing: {path}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def load_model_weights(ckpt: str | Path) -> dict[str, torch.Tensor]:
    return _read_tensors(Path(ckpt) / MODEL_WEIGHTS)


def _read_rng(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = _read_tensors(path)
    with safe_open(path, "pt") as f:
        metadata = f.metadata() or {}
    if "scalars" not in metadata:
        raise CheckpointError(f"{path}: no RNG scalars in its metadata")
    return tensors, metadata


def load_checkpoint(
    ckpt: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    rank: int = 0,
    verify: bool = True,
    prefix: str = "",
) -> dict[str, Any]:
    """Restore model, optimizer and this rank's RNG states in place; return the trainer state
    (step, scheduler, grad scaler, ...). `model` may be wrapped (DDP, FSDP); `prefix` is where
    the checkpoint's module sits in it (`model.` in a `DualEncoder`).

    Everything is read (and, with `verify`, checked against the manifest) before anything is
    changed, so a bad checkpoint raises `CheckpointError` and leaves model and optimizer as they
    were. A rank without an RNG file (the run now has more processes) keeps its seeded RNG.
    """
    ckpt = Path(ckpt)
    if verify:
        verify_checkpoint(ckpt)
    state = read_json(ckpt / TRAINER_STATE)
    weights = load_model_weights(ckpt)
    try:
        optim_state = unflatten_optimizer_state(_read_tensors(ckpt / OPTIMIZER), state["optimizer"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{ckpt / TRAINER_STATE}: bad optimizer entry ({e})") from None
    rng_path = ckpt / rng_file(rank)
    rng = _read_rng(rng_path) if rng_path.is_file() else None

    set_full_state_dicts(model, optimizer, weights, optim_state, prefix=prefix)
    if rng is not None:
        set_rng_states(*rng)
    state["rng_restored"] = rng is not None
    return state


def resume_candidates(run_dir: str | Path) -> list[Path]:
    """Checkpoints a run may resume from, best first: the one `latest` names, then the older
    ones, newest first. Later steps than `latest` belong to an abandoned timeline."""
    found = list_checkpoints(run_dir)
    pointer = Path(run_dir) / LATEST
    named = Path(run_dir) / pointer.read_text().strip() if pointer.is_file() else None
    if named in found:
        found = [c for c in found if checkpoint_step(c) <= checkpoint_step(named)]
    return found[::-1]


def newest_verified_checkpoint(
    run_dir: str | Path,
) -> tuple[Path | None, list[tuple[Path, CheckpointError]]]:
    """The best `resume_candidates` checkpoint whose files match its manifest, and the ones
    passed over with the reason."""
    skipped = []
    for ckpt in resume_candidates(run_dir):
        try:
            verify_checkpoint(ckpt)
        except CheckpointError as e:
            skipped.append((ckpt, e))
            continue
        return ckpt, skipped
    return None, skipped


def set_aside(ckpt: Path) -> Path:
    """Rename a checkpoint that failed to verify to `step-N.broken` (kept for inspection, out
    of the way of pruning and resuming)."""
    target = ckpt.with_name(ckpt.name + ".broken")
    n = 1
    while target.exists():
        n += 1
        target = ckpt.with_name(f"{ckpt.name}.broken{n}")
    os.replace(ckpt, target)
    return target
