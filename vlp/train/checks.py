"""Checks of a run config against what the config module cannot know: the model, objective and
backend registries, weights files and text towers. `train()` runs them before it makes the run
folder, so a mistake fails in second 1 with one `ConfigError` line naming the key.

`vlp.config` checks types, ranges and combinations of its own fields and imports nothing of
vlp's upper layers; each check here belongs to the component it protects.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vlp.config import ConfigError, ModelConfig, ObjectiveSpec, RunConfig, build_typed, load_config
from vlp.distributed import BACKENDS
from vlp.models import HF_PREFIX, model_config, model_spec
from vlp.objectives import OBJECTIVES
from vlp.train.grad_cache import CACHEABLE_OUTPUTS

HOW_TO_GET = {"logit_bias": "set model.init_logit_bias (SigLIP: -10)",
              "logits": "use a captioning (CoCa) model, e.g. model.name=vlp-tiny-coca"}
"""What to change when an objective needs a model output the model does not give."""


def check_config(cfg: RunConfig) -> None:
    """Every registry check; objective parameters are replaced by their typed values."""
    outputs = check_model(cfg.model)
    for i, spec in enumerate(cfg.objectives):
        check_objective(spec, f"objectives[{i}]", outputs=outputs,
                        num_negatives=cfg.data.num_negatives, model_name=cfg.model.name)
        check_objective_recipe(spec, f"objectives[{i}]", cfg)
        if cfg.train.grad_cache:
            check_cacheable(spec, f"objectives[{i}]")
    if cfg.loss.backend not in BACKENDS and cfg.loss.backend != "auto":
        raise ConfigError(
            f"loss.backend: unknown {cfg.loss.backend!r}; known: auto, {', '.join(BACKENDS)}")
    check_positives(cfg)


def check_positives(cfg: RunConfig) -> None:
    """Positive captions (`pos_text`) are not read for nothing (the objectives that need them
    check the data gives them: `check_recipe`)."""
    if cfg.data.captions == "all" and not any(
            "pos_text" in OBJECTIVES[s.name].requires for s in cfg.objectives):
        raise ConfigError(
            "data.captions: all gives positive captions that no objective reads: add the "
            "multipos objective, or use data.captions: sample (one caption per read)")


def check_model(cfg: ModelConfig) -> set[str]:
    """The model exists, its weights and text tower are found and fit; returns the optional
    outputs (`logit_bias`, `logits`) it gives."""
    try:
        arch = model_config(cfg.name)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.pretrained is not None:
        check_pretrained(cfg.pretrained)
    if cfg.hf_text_model is not None or cfg.patch_dropout:
        try:
            model_spec(cfg.name, hf_text_model=cfg.hf_text_model,
                       hf_text_pooler=cfg.hf_text_pooler, hf_text_proj=cfg.hf_text_proj,
                       patch_dropout=cfg.patch_dropout)
        except (OSError, ValueError) as e:
            message = str(e)
            raise ConfigError(message if message.startswith("model.")
                              else f"model.hf_text_model: {message}") from None
    return ({"logit_bias"} if cfg.init_logit_bias is not None else set()) | (
        {"logits"} if "multimodal_cfg" in arch else set())


def check_pretrained(pretrained: str) -> None:
    from vlp.checkpoint import resolve_checkpoint

    where = pretrained.removeprefix(HF_PREFIX)
    if not Path(where).exists():
        raise ConfigError(f"model.pretrained: no such weights file or folder {where}")
    if pretrained.startswith(HF_PREFIX) and not Path(where).is_dir():
        raise ConfigError(f"model.pretrained: {where} is not a transformers folder")
    if not pretrained.startswith(HF_PREFIX) and Path(where).is_dir():
        try:
            resolve_checkpoint(where)
        except ValueError as e:
            raise ConfigError(f"model.pretrained: {e}") from None


def check_objective(spec: ObjectiveSpec, key: str, *, outputs: set[str], num_negatives: int,
                    model_name: str) -> None:
    """A known objective with valid parameters, whose inputs the model and data give."""
    if spec.name not in OBJECTIVES:
        raise ConfigError(
            f"{key}.name: unknown objective {spec.name!r}; known: {sorted(OBJECTIVES)}")
    objective = OBJECTIVES[spec.name]
    built = build_typed(objective.Config, spec.params, key)
    spec.params = {k: getattr(built, k) for k in spec.params}  # typed values
    for needed in sorted(getattr(objective, "requires_outputs", set()) - outputs):
        raise ConfigError(
            f"{key}: objective {spec.name!r} needs the model output {needed!r}, which model "
            f"{model_name!r} does not give: {HOW_TO_GET[needed]}")
    if "neg_text" in objective.requires and num_negatives == 0:
        raise ConfigError(
            f"{key}: objective {spec.name!r} needs hard-negative captions (batch field "
            "neg_text): set data.num_negatives > 0 and use shards whose json has "
            "'neg_captions'")


def check_objective_recipe(spec: ObjectiveSpec, key: str, cfg: RunConfig) -> None:
    """The objective's own check of the rest of the recipe, if it has one (`check_recipe(its
    Config, the RunConfig)` raising ValueError; e.g. cwcl needs a locked tower)."""
    objective = OBJECTIVES[spec.name]
    check = getattr(objective, "check_recipe", None)
    if check is None:
        return
    try:
        check(objective.Config(**spec.params), cfg)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None


def check_cacheable(spec: ObjectiveSpec, key: str) -> None:
    """With `train.grad_cache`, the objective reads only outputs the cache keeps."""
    uncached = sorted(getattr(OBJECTIVES[spec.name], "requires_outputs", set())
                      - CACHEABLE_OUTPUTS)
    if uncached:
        raise ConfigError(
            f"{key}: objective {spec.name!r} reads the model output(s) {uncached} per sample, "
            "which train.grad_cache does not cache (it caches features, logit scale and bias); "
            "drop train.grad_cache (use plain train.grad_accum) or this objective")


def load_run_config(recipe: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """`vlp.config.load_config` followed by `check_config`: everything `vlp train` checks
    before it starts."""
    cfg = load_config(recipe, list(overrides))
    check_config(cfg)
    return cfg
