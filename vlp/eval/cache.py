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
ShapesWorld suite's CPU time).
"""

from __future__ import annotations

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
def suite_cache() -> Iterator[SuiteCache]:
    """Share embeddings between the benchmarks run inside the block (one model, one run)."""
    cache = SuiteCache()
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
