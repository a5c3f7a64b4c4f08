"""The parts of a run that come before its model: the accelerator, the data sources and the
eval suites, each from its own slice of the config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from vlp.config import ConfigError, EvalConfig, RunConfig
from vlp.data.cache import prepare_shapesworld, train_shards_spec
from vlp.eval.suite import Suite, load_suite, parse_suite
from vlp.train.metrics import JSONLTracker


@dataclass
class DataSources:
    train_shards: str
    zeroshot_sets: dict[str, Path]
    """The zero-shot sets of the end-of-run evaluation when no `eval.suite` is given."""
    binding_set: Path | None = None
    """A SugarCrepe-format set whose binding subsets (`BINDING_SUBSETS`) join that evaluation."""
    shapesworld_root: Path | None = None
    """The generated ShapesWorld folder when training on it (eval suites reuse its sets)."""

    def describe(self) -> str:
        if self.shapesworld_root is not None:
            return f"ShapesWorld in {self.shapesworld_root}"
        return self.train_shards or "a Hugging Face dataset"


@dataclass
class EvalSuites:
    periodic: Suite | None
    """`eval.suite`, run every `eval.every` steps (None: no evaluation during training)."""
    final: Suite | None
    """Run once after the last step: `eval.suite`, else the zero-shot sets and the binding
    subsets (None: nothing)."""


def has_accelerator_device() -> bool:
    xpu = getattr(torch, "xpu", None)
    return (torch.cuda.is_available() or torch.backends.mps.is_available()
            or (xpu is not None and xpu.is_available()))


def build_accelerator(cfg: RunConfig, run_dir: Path) -> Accelerator:
    trackers = [JSONLTracker("vlp", run_dir) if t == "jsonl" else t for t in cfg.train.trackers]
    accelerator = Accelerator(
        # Without a GPU, `accelerate launch --multi_gpu` processes must still form a (gloo)
        # process group; accelerate does that only when told it runs on CPU.
        cpu=not has_accelerator_device(),
        # The gradient cache accumulates by itself: accelerate must not divide its loss.
        gradient_accumulation_steps=1 if cfg.train.grad_cache else cfg.train.grad_accum,
        mixed_precision=cfg.train.mixed_precision,
        log_with=trackers or None,
        project_dir=str(run_dir),
    )
    if trackers:
        accelerator.init_trackers("tensorboard")
    return accelerator


def resolve_data(cfg: RunConfig, accelerator: Accelerator) -> DataSources:
    """User shards, or ShapesWorld generated on first use (main process first, others wait)."""
    if cfg.data.shards is not None or cfg.data.hf is not None:
        sets = {"zeroshot": Path(cfg.eval.zeroshot)} if cfg.eval.zeroshot else {}
        return DataSources(cfg.data.shards or "", sets)
    params = dataclasses.asdict(cfg.data.synth)
    with accelerator.main_process_first():
        root = prepare_shapesworld(
            cfg.data.cache_dir, params, progress=accelerator.is_local_main_process
        )
    sets = {"zeroshot": root / "zeroshot", "zeroshot_heldout": root / "zeroshot_heldout"}
    if cfg.eval.zeroshot:
        sets = {"zeroshot": Path(cfg.eval.zeroshot)}
    return DataSources(train_shards_spec(root), sets, binding_set=root / "sugarcrepe",
                       shapesworld_root=root)


def build_eval_suites(cfg: EvalConfig, data: DataSources, accelerator: Accelerator) -> EvalSuites:
    """Load and check the suites before the first step (a ShapesWorld suite reuses the
    training run's ShapesWorld folder)."""
    if cfg.suite is None:
        return EvalSuites(None, end_of_run_suite(data, batch_size=cfg.batch_size))
    paths = {"shapesworld": data.shapesworld_root} if data.shapesworld_root else None
    with accelerator.main_process_first():
        try:
            suite = load_suite(cfg.suite, overrides=cfg.overrides, paths=paths,
                               progress=accelerator.is_local_main_process)
        except ValueError as err:
            raise ConfigError(f"eval.suite: {err}") from None
    return EvalSuites(suite, suite)


# Does the model bind each colour to its own shape, and tell the relation's two sides apart?
# Naming every object right is not enough for these: the negative has the same words.
BINDING_SUBSETS = ("swap_att", "swap_obj", "replace_rel")


def end_of_run_suite(data: DataSources, *, batch_size: int) -> Suite | None:
    """The end-of-run evaluation without `eval.suite`: one zero-shot benchmark per set, and the
    binding subsets of the compositional set (ShapesWorld's, a few seconds)."""
    benchmarks = [{"name": name, "task": "zeroshot", "data": str(root)}
                  for name, root in data.zeroshot_sets.items()]
    if data.binding_set is not None:
        benchmarks.append({"name": "sugarcrepe", "task": "sugarcrepe", "data": str(data.binding_set),
                           "options": {"subsets": list(BINDING_SUBSETS)}})
    if not benchmarks:
        return None
    raw = {"name": "end-of-run", "batch_size": batch_size, "benchmarks": benchmarks}
    try:
        return parse_suite(raw, where="eval.zeroshot", base_dir=Path.cwd(), progress=False)
    except ValueError as err:
        raise ConfigError(str(err)) from None
