"""Embeddings computed once per suite run, shared by every benchmark of the run.

A suite reads the same data several times: ShapesWorld's retrieval root feeds retrieval, order
and the modality gap; SugarCrepe and ARO repeat captions and images across subsets. Inside
`suite_cache()` (which `vlp.eval.runner.evaluate_suite` opens around a run):

- `encode_texts` encodes each distinct caption once: later calls look it up by its text;
- `root_embeddings` decodes, preprocesses and encodes a benchmark root's images once: later
  benchmarks on the same root (and split) get its image embeddings and labels without reading a
  shard;
- `vlp.eval.embedding.embed_images` encodes each distinct image file (and crop box) once.

The cache lives for one suite run on one model (a training run opens a new one at each
evaluation, so nothing outlives the weights it was computed with). Outside `suite_cache()`
no embedding is cached.

What does not depend on the weights outlives a suite run: `tokenize` keeps each text's token
ids for as long as its tokenizer lives, so a training run's periodic evaluations tokenize their
fixed captions once (open_clip's tokenizer cleans every text with ftfy: about a tenth of a
ShapesWorld suite's CPU time). Two more things outlive it, for the same reason:

- decoded images: `decoded_images(preprocess)` keeps each image's preprocessed tensor, by its
  source (a benchmark root's shards, an image file and crop box, with their sizes and
  modification times) for as long as the transform lives, so a suite run again in the same
  process (a training run's periodic evaluations, `evaluate_suite` on several checkpoints)
  reads and decodes no image. All transforms together keep at most `image_cache_limit()` bytes
  (768 MiB, or `VLP_EVAL_IMAGE_CACHE_MB`; 0 turns it off); past that, images are decoded each
  time instead of kept.
- caption features of a locked text tower: when every parameter of the model's text tower is
  frozen (LiT, `vlp.models.locking`), a suite run starts from the features of the model's
  previous run, provided the tower's weights hash the same (`text_tower_fingerprint`) and the
  tokenizer and device are the same; otherwise it starts empty. `keep_text_features` hands them
  on to another model of the same architecture (`vlp eval` on several checkpoints of a run).
"""

from __future__ import annotations

import hashlib
import os
import weakref
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch

_ACTIVE: ContextVar[SuiteCache | None] = ContextVar("vlp_eval_suite_cache", default=None)


@dataclass
class SuiteCache:
    """Normalised float32 embeddings on the CPU, by text, by root and by image file."""

    texts: dict[str, torch.Tensor] = field(default_factory=dict)
    roots: dict[Hashable, tuple[torch.Tensor, list[Any]]] = field(default_factory=dict)
    images: dict[Hashable, torch.Tensor] = field(default_factory=dict)
    hits: dict[str, int] = field(default_factory=lambda: {"texts": 0, "roots": 0, "images": 0})
    reused_texts: int = 0
    """Texts whose features came from the model's previous run (a locked text tower)."""

    def lookup_texts(
        self, texts: list[str], encode: Callable[[list[str]], torch.Tensor]
    ) -> torch.Tensor:
        """(len(texts), D) embeddings; only texts not seen in this run go to `encode`."""
        missing = list(dict.fromkeys(t for t in texts if t not in self.texts))
        self.hits["texts"] += len(texts) - len(missing)
        if missing:
            for text, row in zip(missing, encode(missing).cpu(), strict=True):
                self.texts[text] = row
        return torch.stack([self.texts[t] for t in texts])

    def lookup_images(
        self, keys: list[Hashable], encode: Callable[[list[Hashable]], torch.Tensor]
    ) -> torch.Tensor:
        """(len(keys), D) embeddings of image files; only new keys go to `encode`."""
        missing = list(dict.fromkeys(k for k in keys if k not in self.images))
        self.hits["images"] += len(keys) - len(missing)
        if missing:
            for key, row in zip(missing, encode(missing).cpu(), strict=True):
                self.images[key] = row
        return torch.stack([self.images[k] for k in keys])


def active_cache() -> SuiteCache | None:
    """The cache of the suite run in progress, or None."""
    return _ACTIVE.get()


@contextmanager
def suite_cache(model: Any = None, tokenizer: Any = None, device: Any = None
                ) -> Iterator[SuiteCache]:
    """Share embeddings between the benchmarks run inside the block (one model, one run).

    Given the `model` (with the `tokenizer` and `device` the run encodes with), captions start
    from the features of this model's previous run if its text tower is locked and unchanged
    (see `locked_text_features`), and the features computed in this run are kept for its next.
    """
    texts = locked_text_features(model, tokenizer, device) if model is not None else None
    cache = SuiteCache(texts=texts if texts is not None else {})
    cache.reused_texts = len(cache.texts)
    token = _ACTIVE.set(cache)
    try:
        yield cache
    finally:
        _ACTIVE.reset(token)


_TOKENS: weakref.WeakKeyDictionary[Any, dict[str, torch.Tensor]] = weakref.WeakKeyDictionary()


def tokenize(tokenizer: Callable[[list[str]], torch.Tensor], texts: Sequence[str]) -> torch.Tensor:
    """`tokenizer(texts)`, tokenizing only the texts this tokenizer has not seen before (a
    tokenizer is a pure function of the text; rows are kept while the tokenizer object lives)."""
    if not texts:
        return tokenizer([])
    try:
        known = _TOKENS.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable or not hashable: nothing to keep
        return tokenizer(list(texts))
    missing = list(dict.fromkeys(t for t in texts if t not in known))
    if missing:
        for text, row in zip(missing, tokenizer(missing), strict=True):
            known[text] = row
    return torch.stack([known[t] for t in texts])


DEFAULT_IMAGE_CACHE_MB = 768
IMAGE_CACHE_ENV = "VLP_EVAL_IMAGE_CACHE_MB"


def image_cache_limit() -> int:
    """Bytes of decoded images kept over all transforms: `VLP_EVAL_IMAGE_CACHE_MB` MiB if set
    (0 = keep none), else 768 MiB: room for the default ShapesWorld suite's 12,000 images
    (48 KiB each at 64 px, 562 MiB) but not for a 224 px ImageNet validation set (28 GiB)."""
    value = os.environ.get(IMAGE_CACHE_ENV, "").strip()
    if not value:
        return DEFAULT_IMAGE_CACHE_MB * 2**20
    try:
        megabytes = float(value)
    except ValueError:
        raise ValueError(f"{IMAGE_CACHE_ENV} must be a number of MiB, got {value!r}") from None
    return max(0, int(megabytes * 2**20))


class DecodedImages:
    """Preprocessed images of one transform, by source: an image tensor, or for a benchmark
    root its batches and labels (any value whose tensors `add` counts)."""

    def __init__(self) -> None:
        self.entries: dict[Hashable, Any] = {}
        self.nbytes = 0

    def get(self, key: Hashable) -> Any:
        return self.entries.get(key)

    def add(self, key: Hashable, value: Any, nbytes: int) -> bool:
        """Keep `value` (holding `nbytes` of tensors) if every transform's images together stay
        within `image_cache_limit()`; False (nothing kept) otherwise."""
        if key in self.entries:
            return True
        if decoded_bytes() + nbytes > image_cache_limit():
            return False
        self.entries[key] = value
        self.nbytes += nbytes
        return True

    def room(self) -> int:
        """Bytes that can still be added."""
        return max(0, image_cache_limit() - decoded_bytes())


_DECODED: weakref.WeakKeyDictionary[Any, DecodedImages] = weakref.WeakKeyDictionary()


def decoded_images(preprocess: Any) -> DecodedImages | None:
    """The decoded images kept for `preprocess` (released with it), or None if it cannot be
    weakly referenced or the limit is 0. The transform must be deterministic, as an evaluation
    transform is."""
    if image_cache_limit() == 0:
        return None
    try:
        return _DECODED.setdefault(preprocess, DecodedImages())
    except TypeError:  # not weak-referenceable or not hashable: nothing to keep
        return None


def decoded_bytes() -> int:
    """Bytes of decoded images kept now, over every live transform."""
    return sum(store.nbytes for store in list(_DECODED.values()))


def file_source(path: os.PathLike | str) -> tuple[str, int, int]:
    """A file's identity for the image cache: resolved path, size and modification time, so
    that a rewritten file is read again."""
    stat = os.stat(path)
    return (str(os.path.realpath(path)), stat.st_size, stat.st_mtime_ns)


def _text_tower_tensors(model: Any) -> list[tuple[str, torch.Tensor]] | None:
    """Parameters and buffers `encode_text` reads: the `text` module of an open_clip
    CustomTextCLIP/CoCa, everything but `visual` and the logit scale/bias of a CLIP; None for a
    model of another kind. A loaded `Encoder`'s open_clip model is looked at through `.model`."""
    while isinstance(getattr(model, "model", None), torch.nn.Module):
        model = model.model
    if not isinstance(model, torch.nn.Module):
        return None
    tower = getattr(model, "text", None)
    if isinstance(tower, torch.nn.Module):
        return [*tower.named_parameters(), *tower.named_buffers()]
    if not isinstance(getattr(model, "visual", None), torch.nn.Module):
        return None
    return [(name, tensor) for name, tensor in [*model.named_parameters(), *model.named_buffers()]
            if not name.startswith("visual.") and name not in ("logit_scale", "logit_bias")]


def text_tower_fingerprint(model: Any) -> str | None:
    """A hash of the text tower's weights (names, dtypes, shapes and bytes) if every one of its
    parameters is frozen (`requires_grad` False), else None: a trainable tower changes at each
    step, so its features are not worth hashing."""
    tensors = _text_tower_tensors(model)
    if not tensors or any(t.requires_grad for _, t in tensors):
        return None
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in tensors:
        tensor = tensor.detach()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


@dataclass
class _TextFeatures:
    fingerprint: str
    tokenizer: weakref.ref
    device: str
    texts: dict[str, torch.Tensor]


_LOCKED_TEXTS: weakref.WeakKeyDictionary[Any, _TextFeatures] = weakref.WeakKeyDictionary()


def locked_text_features(model: Any, tokenizer: Any, device: Any) -> dict[str, torch.Tensor] | None:
    """The caption features (by text) a suite run of `model` starts from and adds to: those of
    its previous run if its text tower is locked and hashes the same and the tokenizer and
    device are the same; a new dict kept for the next run if only the lock holds; None (keep
    nothing) for a trainable tower or a model or tokenizer that cannot be weakly referenced."""
    fingerprint = text_tower_fingerprint(model)
    try:
        kept = _LOCKED_TEXTS.get(model)
        if fingerprint is None:
            _LOCKED_TEXTS.pop(model, None)
            return None
        tokenizer_ref = weakref.ref(tokenizer)
    except TypeError:
        return None
    if (kept is not None and kept.fingerprint == fingerprint and kept.tokenizer() is tokenizer
            and kept.device == str(device)):
        return kept.texts
    kept = _TextFeatures(fingerprint, tokenizer_ref, str(device), {})
    _LOCKED_TEXTS[model] = kept
    return kept.texts


def kept_text_features(model: Any) -> Any:
    """What is kept for `model`'s locked text tower (an opaque object, or None), for
    `keep_text_features` to hand to another model."""
    try:
        return _LOCKED_TEXTS.get(model)
    except TypeError:
        return None


def keep_text_features(model: Any, kept: Any) -> None:
    """Let `model` start from the caption features `kept_text_features` returned for another
    model: another checkpoint of the same architecture (the caller vouches for that: the
    fingerprint covers the tower's weights, not its code). They are used only if `model`'s text
    tower is locked and hashes the same, with the same tokenizer object and device."""
    if kept is not None:
        try:
            _LOCKED_TEXTS[model] = kept
        except TypeError:
            pass
