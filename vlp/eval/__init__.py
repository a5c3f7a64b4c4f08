"""Evaluation: zero-shot classification and retrieval on CLIP_benchmark-layout benchmarks."""

from vlp.eval.benchmark_data import Benchmark, iter_batches, read_benchmark, write_benchmark
from vlp.eval.retrieval import (
    RetrievalEmbeddings,
    embed_retrieval_set,
    evaluate_retrieval,
    retrieval_metrics,
)
from vlp.eval.zeroshot import (
    ZeroShotPredictions,
    classification_metrics,
    evaluate_zeroshot,
    predict_zeroshot,
    zero_shot_classifier,
)

__all__ = [
    "Benchmark",
    "RetrievalEmbeddings",
    "ZeroShotPredictions",
    "classification_metrics",
    "embed_retrieval_set",
    "evaluate_retrieval",
    "evaluate_zeroshot",
    "iter_batches",
    "predict_zeroshot",
    "read_benchmark",
    "retrieval_metrics",
    "write_benchmark",
    "zero_shot_classifier",
]
