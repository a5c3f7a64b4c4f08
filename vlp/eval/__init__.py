"""Evaluation: zero-shot classification and retrieval on CLIP_benchmark-layout benchmarks,
SugarCrepe(++), ARO (VG-Relation, VG-Attribution, COCO/Flickr30k-Order), modality-gap metrics,
and suites of them with reports (`vlp eval`, `run_suite` during training)."""

from vlp.eval.aro import EXCLUDED_RELATIONS, evaluate_aro
from vlp.eval.benchmark_data import Benchmark, iter_batches, read_benchmark, write_benchmark
from vlp.eval.gap import evaluate_gap, modality_gap_metrics
from vlp.eval.loading import LoadedModel, load_checkpoint_model, load_model
from vlp.eval.order import evaluate_order
from vlp.eval.results import BenchmarkResult
from vlp.eval.retrieval import (
    RetrievalEmbeddings,
    embed_retrieval_set,
    evaluate_retrieval,
    retrieval_metrics,
)
from vlp.eval.runner import SuiteResult, evaluate_suite, run_suite
from vlp.eval.sugarcrepe import evaluate_sugarcrepe
from vlp.eval.suite import Suite, load_suite, single_task_suite
from vlp.eval.tasks import TASKS
from vlp.eval.zeroshot import (
    ZeroShotPredictions,
    classification_metrics,
    evaluate_zeroshot,
    predict_zeroshot,
    zero_shot_classifier,
)

__all__ = [
    "EXCLUDED_RELATIONS",
    "TASKS",
    "Benchmark",
    "BenchmarkResult",
    "LoadedModel",
    "RetrievalEmbeddings",
    "Suite",
    "SuiteResult",
    "ZeroShotPredictions",
    "classification_metrics",
    "embed_retrieval_set",
    "evaluate_aro",
    "evaluate_gap",
    "evaluate_order",
    "evaluate_retrieval",
    "evaluate_sugarcrepe",
    "evaluate_suite",
    "evaluate_zeroshot",
    "iter_batches",
    "load_checkpoint_model",
    "load_model",
    "load_suite",
    "modality_gap_metrics",
    "predict_zeroshot",
    "read_benchmark",
    "retrieval_metrics",
    "run_suite",
    "single_task_suite",
    "write_benchmark",
    "zero_shot_classifier",
]
