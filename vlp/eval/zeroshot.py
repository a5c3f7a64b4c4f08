"""Zero-shot classification on CLIP_benchmark-layout benchmarks, scored as CLIP_benchmark does.

A class is the mean of its prompts' normalised text embeddings (one prompt per template),
re-normalised; an image's logits are `100 * image_features @ classifier`. Metric names and
definitions are those of `clip_benchmark.metrics.zeroshot_classification` so that numbers can be
compared with published ones: `acc1` and `acc5` are top-k accuracies with ties ordered by
`torch.topk`, and `mean_per_class_recall` is sklearn's balanced accuracy of the argmax, i.e. the
mean recall over the classes that occur among the targets. With fewer than five classes `acc5`
is NaN, as in CLIP_benchmark (a top-C accuracy would always be 1.0); result JSONs write it as
null and reports print it as "n/a (< 5 classes)".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from PIL import Image
from tqdm import tqdm

from vlp.eval.benchmark_data import CLASSIFICATION, read_benchmark
from vlp.eval.cache import active_cache, tokenize

Tokenizer = Callable[[list[str]], torch.Tensor]
Preprocess = Callable[[Image.Image], torch.Tensor]
Device = str | torch.device


class DualEncoder(Protocol):
    """What evaluation needs from a model: open_clip's `encode_image` and `encode_text`."""

    def encode_image(self, image: torch.Tensor) -> torch.Tensor: ...

    def encode_text(self, text: torch.Tensor) -> torch.Tensor: ...


@contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Run the block without gradients and, for an nn.Module, in eval mode (no dropout, no patch
    dropout); the module's training flag is restored afterwards so training can resume."""
    was_training = model.training if isinstance(model, torch.nn.Module) else None
    if was_training is not None:
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if was_training is not None:
            model.train(was_training)


def encode_images(model: DualEncoder, images: torch.Tensor, *, device: Device) -> torch.Tensor:
    """L2-normalised float32 image embeddings (B, D), left on `device`."""
    features = model.encode_image(images.to(device)).float()
    return F.normalize(features, dim=-1)


def encode_texts(
    model: DualEncoder, tokenizer: Tokenizer, texts: list[str], *, device: Device
) -> torch.Tensor:
    """L2-normalised float32 text embeddings (N, D), left on `device`. Inside a suite run
    (`vlp.eval.cache.suite_cache`) each distinct text is encoded once for all benchmarks."""
    cache = active_cache()
    if cache is None:
        return _encode_texts(model, tokenizer, list(texts), device)
    return cache.lookup_texts(
        list(texts), lambda missing: _encode_texts(model, tokenizer, missing, device)
    ).to(device)


def _encode_texts(model: DualEncoder, tokenizer: Tokenizer, texts: list[str], device: Device
                  ) -> torch.Tensor:
    features = text_features(model, tokenize(tokenizer, texts).to(device)).float()
    return F.normalize(features, dim=-1)


def text_features(model: DualEncoder, tokens: torch.Tensor) -> torch.Tensor:
    """`model.encode_text(tokens)`; for an open_clip `CLIP` whose text tower is causal and pools
    the end-of-text token (CLIP's, vlp's), computed on the tokens up to the batch's last
    end-of-text token only. With a causal mask no position attends to a later one, so the
    padding after it cannot change the pooled feature; dropping it saves most of the work on
    short captions (ShapesWorld's fill about a third of the context)."""
    if not _causal_argmax_clip(model):
        return model.encode_text(tokens)
    length = int(tokens.argmax(dim=-1).max()) + 1
    cast_dtype = model.transformer.get_cast_dtype()
    tokens = tokens[:, :length]
    x = model.token_embedding(tokens).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = text_global_pool(model.ln_final(x), tokens, "argmax")
    if model.text_projection is None:
        return x
    if isinstance(model.text_projection, torch.nn.Linear):
        return model.text_projection(x)
    return x @ model.text_projection


def _causal_argmax_clip(model: Any) -> bool:
    mask = getattr(model, "attn_mask", None)
    return (type(model) is open_clip.CLIP and model.text_pool_type == "argmax"
            and mask is not None and mask.ndim == 2 and bool(torch.isinf(mask[0, 1:]).all())
            and not bool(torch.isinf(mask.diagonal()).any()))


def zero_shot_classifier(
    model: DualEncoder,
    tokenizer: Tokenizer,
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    device: Device,
    batch_size: int,
    progress: bool = False,
) -> torch.Tensor:
    """Class weights (D, C) on `device`: per class, the re-normalised mean of its normalised
    prompt embeddings (`template.format(c=classname)` for every template)."""
    if not classnames or not templates:
        raise ValueError("zero-shot classification needs at least one class name and template")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompts = [template.format(c=name) for name in classnames for template in templates]
    starts = range(0, len(prompts), batch_size)
    with eval_mode(model):
        chunks = [
            encode_texts(model, tokenizer, prompts[i : i + batch_size], device=device)
            for i in tqdm(starts, desc="class prompts", unit="batch", disable=not progress)
        ]
    per_class = torch.cat(chunks).view(len(classnames), len(templates), -1).mean(dim=1)
    per_class = per_class / per_class.norm(dim=-1, keepdim=True)
    return per_class.T.contiguous()


@dataclass(frozen=True)
class ZeroShotPredictions:
    """Per-sample zero-shot scores, kept so callers can score any subset of the samples."""

    logits: torch.Tensor
    """(N, C) float32, `100 * cosine(image, class)`."""
    targets: torch.Tensor
    """(N,) int64 class indices."""
    classnames: list[str]

    @property
    def predictions(self) -> torch.Tensor:
        """(N,) predicted class indices (argmax of the logits)."""
        return self.logits.argmax(dim=1)

    def metrics(self) -> dict[str, float]:
        """CLIP_benchmark's metrics over these samples (see `classification_metrics`)."""
        return classification_metrics(self.logits, self.targets)

    def select_classes(self, classes: Iterable[int | str]) -> ZeroShotPredictions:
        """The samples whose true class is among `classes` (indices or names); predictions
        still range over every class, so this scores e.g. held-out classes in the full task."""
        indices = [self._class_index(c) for c in classes]
        keep = torch.isin(self.targets, torch.tensor(indices, dtype=self.targets.dtype))
        return ZeroShotPredictions(self.logits[keep], self.targets[keep], self.classnames)

    def _class_index(self, cls: int | str) -> int:
        if isinstance(cls, str):
            if cls not in self.classnames:
                raise ValueError(f"unknown class name {cls!r}")
            return self.classnames.index(cls)
        if not 0 <= cls < len(self.classnames):
            raise ValueError(f"class index {cls} is outside the {len(self.classnames)} classes")
        return cls


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """`acc1`, `acc5` and `mean_per_class_recall` of logits (N, C), targets (N,); `acc5` is NaN
    when C < 5, as CLIP_benchmark reports it."""
    num_samples, num_classes = logits.shape
    if num_samples == 0:
        raise ValueError("no samples to score")
    if num_classes >= 5:
        acc1, acc5 = topk_accuracy(logits, targets, ks=(1, 5))
    else:
        (acc1,) = topk_accuracy(logits, targets, ks=(1,))
        acc5 = float("nan")
    recall = mean_per_class_recall(logits.argmax(dim=1), targets)
    return {"acc1": acc1, "acc5": acc5, "mean_per_class_recall": recall}


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, *, ks: Sequence[int]) -> list[float]:
    """Fraction of samples whose target is among the k highest logits, for each k; one
    `torch.topk(max(ks))` call orders ties, as in CLIP_benchmark."""
    top = logits.topk(max(ks), dim=1, largest=True, sorted=True).indices
    hits = top == targets.view(-1, 1)
    return [hits[:, :k].sum().item() / len(targets) for k in ks]


def mean_per_class_recall(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean over the classes present in `targets` of the fraction of their samples predicted
    right (sklearn's `balanced_accuracy_score`)."""
    counts = torch.bincount(targets)
    hits = torch.bincount(targets[predictions == targets], minlength=len(counts))
    present = counts > 0
    return (hits[present].double() / counts[present]).mean().item()


def predict_zeroshot(
    model: DualEncoder,
    tokenizer: Tokenizer,
    preprocess: Preprocess,
    root: str | Path,
    *,
    device: Device = "cpu",
    batch_size: int = 64,
    progress: bool = True,
    split: str = "test",
    classnames_file: str | Path | None = None,
    templates_file: str | Path | None = None,
    num_workers: int = 0,
) -> ZeroShotPredictions:
    """Zero-shot logits and targets for every sample of a classification benchmark root."""
    embeddings = embed_zeroshot_set(
        model, tokenizer, preprocess, root, device=device, batch_size=batch_size,
        progress=progress, split=split, classnames_file=classnames_file,
        templates_file=templates_file, num_workers=num_workers)
    return embeddings.predictions()


@dataclass(frozen=True)
class ZeroShotEmbeddings:
    """A classification benchmark's image embeddings and its zero-shot classifier."""

    image_features: torch.Tensor
    """(N, D) normalised image embeddings."""
    class_features: torch.Tensor
    """(C, D) normalised class embeddings (the mean of each class's prompts)."""
    targets: torch.Tensor
    """(N,) int64 class indices."""
    classnames: list[str]

    def predictions(self) -> ZeroShotPredictions:
        logits = 100.0 * self.image_features @ self.class_features.T
        return ZeroShotPredictions(logits, self.targets, self.classnames)


def embed_zeroshot_set(
    model: DualEncoder,
    tokenizer: Tokenizer,
    preprocess: Preprocess,
    root: str | Path,
    *,
    device: Device = "cpu",
    batch_size: int = 64,
    progress: bool = True,
    split: str = "test",
    classnames_file: str | Path | None = None,
    templates_file: str | Path | None = None,
    num_workers: int = 0,
) -> ZeroShotEmbeddings:
    """Embed every image of a classification benchmark root and build its classifier."""
    benchmark = read_benchmark(
        root, split=split, classnames_file=classnames_file, templates_file=templates_file
    )
    if benchmark.dataset_type != CLASSIFICATION:
        raise ValueError(
            f"{root} is a {benchmark.dataset_type} benchmark; use vlp.eval.evaluate_retrieval"
        )
    classnames, templates = benchmark.classnames or [], benchmark.templates or []
    with eval_mode(model):
        classifier = zero_shot_classifier(
            model,
            tokenizer,
            classnames,
            templates,
            device=device,
            batch_size=batch_size,
            progress=progress,
        )
    from vlp.eval.embedding import root_embeddings

    features, targets = root_embeddings(model, preprocess, benchmark, device=device,
                                        batch_size=batch_size, num_workers=num_workers,
                                        progress=progress, desc="zero-shot images")
    return ZeroShotEmbeddings(features, classifier.cpu().T, torch.tensor(targets, dtype=torch.long),
                              classnames)


def evaluate_zeroshot(
    model: DualEncoder,
    tokenizer: Tokenizer,
    preprocess: Preprocess,
    root: str | Path,
    *,
    device: Device = "cpu",
    batch_size: int = 64,
    progress: bool = True,
    split: str = "test",
    classnames_file: str | Path | None = None,
    templates_file: str | Path | None = None,
    num_workers: int = 0,
) -> dict[str, float]:
    """CLIP_benchmark's zero-shot metrics (`acc1`, `acc5`, `mean_per_class_recall`) on a root."""
    predictions = predict_zeroshot(
        model,
        tokenizer,
        preprocess,
        root,
        device=device,
        batch_size=batch_size,
        progress=progress,
        split=split,
        classnames_file=classnames_file,
        templates_file=templates_file,
        num_workers=num_workers,
    )
    return predictions.metrics()
