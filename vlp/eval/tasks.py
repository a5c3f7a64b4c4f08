"""The eval task registry: task name → its options and the runner that scores one data root.

A suite entry `{name, task, data, options}` names a task here; `options` is checked against the
task's options dataclass (unknown keys and wrong types are errors), so a typo fails when the
suite is loaded, not after an hour of evaluation.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlp.eval.results import BenchmarkResult
from vlp.eval.zeroshot import Device, DualEncoder, Preprocess, Tokenizer


@dataclass
class EvalContext:
    """The model and how to run it, shared by every benchmark of a suite."""

    model: DualEncoder
    tokenizer: Tokenizer
    preprocess: Preprocess
    device: Device = "cpu"
    batch_size: int = 64
    num_workers: int = 0
    progress: bool = True

    @property
    def common(self) -> dict[str, Any]:
        """Keyword arguments every `evaluate_*` function takes."""
        return {"device": self.device, "batch_size": self.batch_size,
                "num_workers": self.num_workers, "progress": self.progress}


@dataclass(frozen=True)
class ZeroShotOptions:
    split: str = "test"
    """Benchmark split folder."""
    classnames_file: str | None = None
    """Replace the root's classnames.txt."""
    templates_file: str | None = None
    """Replace the root's prompt templates (e.g. eval/templates/imagenet_templates.txt)."""
    gap_removal: bool = False
    """Also score with the modality gap removed (`vlp.eval.gap_removal`, GR-CLIP): each metric
    again as `<metric>_gap_removed`, the reference set being this benchmark's images and class
    embeddings."""


@dataclass(frozen=True)
class RetrievalOptions:
    split: str = "test"
    """Benchmark split folder."""
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    """Recall@k cut-offs."""
    modality: bool = True
    """Also score intra-modal (text→text, image→image) and mixed-modality retrieval
    (`vlp.eval.modality_retrieval`)."""
    gap_removal: bool = False
    """Also score with the modality gap removed (`vlp.eval.gap_removal`, GR-CLIP): each metric
    again as `<metric>_gap_removed`, the reference set being this benchmark's images and
    captions."""


@dataclass(frozen=True)
class SugarCrepeOptions:
    image_root: str | None = None
    """Folder the items' `filename`s are relative to (default: `images/` under the data root;
    COCO val2017 for the real SugarCrepe)."""
    subsets: list[str] | None = None
    """Subsets to evaluate (default: all seven); missing files are skipped with a note."""


@dataclass(frozen=True)
class AroOptions:
    image_root: str | None = None
    """Folder the items' `image_path`s are relative to (default: `images/` under the data root)."""
    min_attribute_count: int = 25
    """VG-Attribution averages attribute pairs with at least this many items (ARO: 25)."""


@dataclass(frozen=True)
class OrderOptions:
    seed: int = 0
    """Seed of the perturbations (each caption gets its own RNG derived from it)."""
    tagger: str = "auto"
    """Word classes from `spacy` (ARO's), `rules` (vlp's), or `auto` (spaCy when installed)."""
    max_words: int = 30
    """Captions are cut to this many words (ARO: 30)."""
    captions_per_image: int | None = None
    """Use the first k captions of each image; None = all (ARO)."""
    split: str = "test"
    """Benchmark split folder."""


@dataclass(frozen=True)
class GapOptions:
    max_pairs: int | None = None
    """Use at most this many (image, text) pairs; None = all."""
    seed: int = 0
    """Seed of the separability train/test split."""
    test_fraction: float = 0.2
    """Fraction of pairs held out to score separability."""
    split: str = "test"
    """Benchmark split folder."""


Runner = Callable[[EvalContext, Path, Any, Path], BenchmarkResult]


@dataclass(frozen=True)
class Task:
    """How to run one kind of benchmark and how to present it."""

    clip_benchmark_task: str
    """The `task` field of the result JSON (CLIP_benchmark's names where it has the task)."""
    options: type
    run: Runner
    """`run(context, data_root, options, plot_dir) -> BenchmarkResult`."""
    headline: str
    """The metric the report's summary shows."""
    bar_metrics: tuple[str, ...] = ()
    """Metrics drawn as a bar chart (with reference models beside them), if present."""
    chance: float | dict[str, float] | None = None
    """Chance level of the bar chart's metrics: one for all, or one per metric."""


def _zeroshot(ctx: EvalContext, data: Path, o: ZeroShotOptions, plot_dir: Path) -> BenchmarkResult:
    from vlp.eval.gap_removal import ModalityMeans, side_by_side
    from vlp.eval.zeroshot import embed_zeroshot_set

    embeddings = embed_zeroshot_set(ctx.model, ctx.tokenizer, ctx.preprocess, data,
                                    split=o.split, classnames_file=o.classnames_file,
                                    templates_file=o.templates_file, **ctx.common)
    metrics = embeddings.predictions().metrics()
    if not o.gap_removal:
        return BenchmarkResult(metrics)
    means = ModalityMeans.of(embeddings.image_features, embeddings.class_features)
    centred = dataclasses.replace(
        embeddings, image_features=means.centre_images(embeddings.image_features),
        class_features=means.centre_texts(embeddings.class_features))
    metrics, note = side_by_side(metrics, centred.predictions().metrics(), means,
                                 headline="acc1")
    return BenchmarkResult(metrics, notes=[note])


def _retrieval(ctx: EvalContext, data: Path, o: RetrievalOptions, plot_dir: Path) -> BenchmarkResult:
    from vlp.eval.gap_removal import ModalityMeans, side_by_side
    from vlp.eval.modality_retrieval import modality_retrieval_metrics
    from vlp.eval.retrieval import embed_retrieval_set, retrieval_metrics

    embeddings = embed_retrieval_set(ctx.model, ctx.tokenizer, ctx.preprocess, data,
                                     split=o.split, **ctx.common)

    def score(embeddings: Any) -> dict[str, float]:
        metrics = retrieval_metrics(embeddings, ks=tuple(o.ks))
        if o.modality:
            metrics |= modality_retrieval_metrics(embeddings, embeddings.captions,
                                                  ks=tuple(o.ks))
        return metrics

    metrics = score(embeddings)
    notes = ["image_retrieval_recall@k and text_retrieval_recall@k follow CLIP_benchmark"]
    if o.modality:
        notes.append("text_to_text, image_to_image and mixed_* metrics: vlp's intra-modal and "
                     "mixed-modality retrieval (vlp.eval.modality_retrieval), no published "
                     "reference")
    if o.gap_removal:
        means = ModalityMeans.of(embeddings.image_features, embeddings.text_features)
        centred = dataclasses.replace(
            embeddings, image_features=means.centre_images(embeddings.image_features),
            text_features=means.centre_texts(embeddings.text_features))
        metrics, note = side_by_side(metrics, score(centred), means,
                                     headline=TASKS["retrieval"].headline)
        notes.append(note)
    return BenchmarkResult(metrics, notes=notes)


def _sugarcrepe(ctx: EvalContext, data: Path, o: SugarCrepeOptions, plot_dir: Path
                ) -> BenchmarkResult:
    from vlp.eval.sugarcrepe import SUBSETS, evaluate_sugarcrepe

    return evaluate_sugarcrepe(ctx.model, ctx.tokenizer, ctx.preprocess, data,
                               image_root=o.image_root, subsets=o.subsets or SUBSETS,
                               **ctx.common)


def _aro(ctx: EvalContext, data: Path, o: AroOptions, plot_dir: Path) -> BenchmarkResult:
    from vlp.eval.aro import evaluate_aro

    return evaluate_aro(ctx.model, ctx.tokenizer, ctx.preprocess, data, image_root=o.image_root,
                        min_attribute_count=o.min_attribute_count, **ctx.common)


def _order(ctx: EvalContext, data: Path, o: OrderOptions, plot_dir: Path) -> BenchmarkResult:
    from vlp.eval.order import evaluate_order

    return evaluate_order(ctx.model, ctx.tokenizer, ctx.preprocess, data, seed=o.seed,
                          tagger=o.tagger, max_words=o.max_words,
                          captions_per_image=o.captions_per_image, split=o.split, **ctx.common)


def _gap(ctx: EvalContext, data: Path, o: GapOptions, plot_dir: Path) -> BenchmarkResult:
    from vlp.eval.gap import evaluate_gap

    return evaluate_gap(ctx.model, ctx.tokenizer, ctx.preprocess, data, max_pairs=o.max_pairs,
                        seed=o.seed, test_fraction=o.test_fraction, split=o.split,
                        plot_dir=plot_dir, **ctx.common)


_SUGARCREPE_BARS = ("replace_obj", "replace_att", "replace_rel", "swap_obj", "swap_att",
                    "add_obj", "add_att", "replace", "swap", "add")
_ORDER_BARS = ("precision@1", "strict_precision@1", "strict_pairwise_shuffle_nouns_and_adj",
               "strict_pairwise_shuffle_allbut_nouns_and_adj",
               "strict_pairwise_shuffle_within_trigrams", "strict_pairwise_shuffle_trigrams")

TASKS: dict[str, Task] = {
    "zeroshot": Task("zeroshot_classification", ZeroShotOptions, _zeroshot, "acc1"),
    "retrieval": Task("zeroshot_retrieval", RetrievalOptions, _retrieval,
                      "image_retrieval_recall@5"),
    "sugarcrepe": Task("sugarcrepe", SugarCrepeOptions, _sugarcrepe, "mean",
                       _SUGARCREPE_BARS, chance=0.5),
    "aro": Task("aro", AroOptions, _aro, "vg_relation",
                ("vg_relation", "vg_attribution", "vg_relation_micro", "vg_attribution_micro"),
                chance=0.5),
    "order": Task("aro_order", OrderOptions, _order, "precision@1", _ORDER_BARS,
                  chance={m: 0.2 if m.endswith("precision@1") else 0.5 for m in _ORDER_BARS}),
    "gap": Task("modality_gap", GapOptions, _gap, "gap"),
}
"""Every task a suite or `vlp eval --task` can name."""


def get_task(name: str) -> Task:
    """The task called `name`; an unknown name raises a ValueError listing the known ones."""
    if name not in TASKS:
        raise ValueError(f"unknown eval task {name!r}; known: {sorted(TASKS)}")
    return TASKS[name]


def build_options(task: str, raw: Mapping[str, Any] | None, where: str) -> Any:
    """The options dataclass of `task` from a mapping, strictly: an unknown key or a value of
    the wrong type raises a ValueError naming `where` and the key."""
    cls = get_task(task).options
    raw = dict(raw or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {unknown} for task {task!r}; "
                         f"known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    for key, value in raw.items():
        if not _has_type(value, hints[key]):
            raise ValueError(f"{where}.{key}: expected {_type_name(hints[key])}, got {value!r}")
    return cls(**raw)


def _has_type(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_has_type(v, item) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`device` if given, else CUDA when available, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
