"""ARO's word-order perturbations of a caption (COCO-Order, Flickr30k-Order), two protocols.

The four perturbations of ARO's `dataset_zoo/perturbations.py` (`TextShuffler`): shuffle the
nouns among themselves and the adjectives among themselves; shuffle every other word; shuffle
the words within each trigram; shuffle the trigrams.

`make_aro_case` is ARO's protocol (`COCO_Order`/`Flickr30k_Order` in `dataset_zoo/
aro_datasets.py`), the one comparable with published numbers: each perturbation is drawn once
from the raw caption's tokens (punctuation included), the tokens are joined with spaces and
then normalised by `pre_caption` (which may truncate the change away), and a draw that leaves
the caption unchanged is kept. Two unavoidable differences: the draws come from the seeded
`random.Random` passed in, not from the global NumPy/Python RNGs, and the trigram perturbations
split words with the tagger's tokenizer where ARO uses NLTK's `word_tokenize` (the same tokens
for ordinary captions).

`make_order_case` is vlp's strict protocol. Differences from ARO, all so that every negative is
a true permutation of the caption's tokens and differs from it:

- randomness comes from the `random.Random` passed in (a fixed seed per caption), not from
  the global NumPy and Python RNGs;
- a perturbation is redrawn until its result differs from the caption; where it cannot differ
  (a caption with one noun and one adjective, or a single trigram), ARO's fifth perturbation,
  `shuffle_all_words`, stands in and the case records the fallback; a caption whose words are
  all the same cannot be perturbed and is skipped;
- captions are normalised (`pre_caption`: lower case, ARO's punctuation removed, at most
  `max_words` words) before they are perturbed rather than after, so truncation never hides
  the change.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from vlp.eval.tagging import ADJ, NOUN, Tagged, Tagger

Perturbation = Callable[[Tagged, random.Random], list[str]]
MAX_DRAWS = 64
"""Redraws of a perturbation that can differ from the caption (each differs with p >= 1/2)."""


def pre_caption(caption: str, max_words: int = 30) -> str:
    """ARO's caption normalisation (`dataset_zoo/retrieval.py`): lower case, `.!"()*#:;~`
    replaced by spaces, whitespace collapsed, at most `max_words` words."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption).strip()
    return " ".join(caption.split(" ")[:max_words])


def shuffle_nouns_and_adj(tagged: Tagged, rng: random.Random) -> list[str]:
    """Nouns change places with nouns, adjectives with adjectives."""
    tokens = [t for t, _ in tagged]
    _permute(tokens, [i for i, (_, tag) in enumerate(tagged) if tag == NOUN], rng)
    _permute(tokens, [i for i, (_, tag) in enumerate(tagged) if tag == ADJ], rng)
    return tokens


def shuffle_allbut_nouns_and_adj(tagged: Tagged, rng: random.Random) -> list[str]:
    """Every word that is neither noun nor adjective changes places with another such word."""
    tokens = [t for t, _ in tagged]
    _permute(tokens, [i for i, (_, tag) in enumerate(tagged) if tag not in (NOUN, ADJ)], rng)
    return tokens


def shuffle_within_trigrams(tagged: Tagged, rng: random.Random) -> list[str]:
    """Words shuffled inside each consecutive trigram (the last may be shorter)."""
    out = []
    for trigram in _trigrams([t for t, _ in tagged]):
        rng.shuffle(trigram)
        out += trigram
    return out


def shuffle_trigrams(tagged: Tagged, rng: random.Random) -> list[str]:
    """Consecutive trigrams shuffled as blocks."""
    trigrams = _trigrams([t for t, _ in tagged])
    rng.shuffle(trigrams)
    return [t for trigram in trigrams for t in trigram]


def shuffle_all_words(tagged: Tagged, rng: random.Random) -> list[str]:
    """Every word shuffled (ARO's fifth perturbation, used here only as the fallback)."""
    tokens = [t for t, _ in tagged]
    rng.shuffle(tokens)
    return tokens


PERTURBATIONS: dict[str, Perturbation] = {
    "shuffle_nouns_and_adj": shuffle_nouns_and_adj,
    "shuffle_allbut_nouns_and_adj": shuffle_allbut_nouns_and_adj,
    "shuffle_within_trigrams": shuffle_within_trigrams,
    "shuffle_trigrams": shuffle_trigrams,
}
"""The four perturbations, in ARO's order of the caption options."""


def can_differ(name: str, tagged: Tagged) -> bool:
    """Whether some draw of perturbation `name` yields a token order unlike the caption's."""
    tokens = [t for t, _ in tagged]
    if name == "shuffle_nouns_and_adj":
        return any(len({t for t, tag in tagged if tag == c}) > 1 for c in (NOUN, ADJ))
    if name == "shuffle_allbut_nouns_and_adj":
        return len({t for t, tag in tagged if tag not in (NOUN, ADJ)}) > 1
    if name == "shuffle_within_trigrams":
        return any(len(set(trigram)) > 1 for trigram in _trigrams(tokens))
    if name == "shuffle_trigrams":
        return len({tuple(trigram) for trigram in _trigrams(tokens)}) > 1
    if name == "shuffle_all_words":
        return len(set(tokens)) > 1
    raise ValueError(f"unknown perturbation {name!r}")


@dataclass(frozen=True)
class OrderCase:
    """A caption and its four perturbed negatives (in `PERTURBATIONS` order)."""

    caption: str
    negatives: tuple[str, ...]
    fallbacks: tuple[str, ...] = ()
    """Perturbations replaced by `shuffle_all_words` because they could not change the caption."""


def make_order_case(
    caption: str, tagger: Tagger, rng: random.Random, *, max_words: int = 30
) -> OrderCase | None:
    """The normalised caption and its four negatives, or None if no word order differs."""
    caption = pre_caption(caption, max_words)
    tagged = tagger(caption)
    tokens = [t for t, _ in tagged]
    if not can_differ("shuffle_all_words", tagged):
        return None
    negatives, fallbacks = [], []
    for name, perturb in PERTURBATIONS.items():
        if not can_differ(name, tagged):
            fallbacks.append(name)
            perturb = shuffle_all_words
        for _ in range(MAX_DRAWS):
            shuffled = perturb(tagged, rng)
            if shuffled != tokens:
                break
        else:  # practically unreachable: MAX_DRAWS draws that each differ with p >= 1/2
            shuffled = _rotate_distinct(tokens)
        negatives.append(" ".join(shuffled))
    return OrderCase(caption, tuple(negatives), tuple(fallbacks))


def make_aro_case(
    caption: str, tagger: Tagger, rng: random.Random, *, max_words: int = 30
) -> OrderCase:
    """ARO's options for `caption`: `pre_caption(caption)` and `pre_caption(perturbation)` for
    each of the four perturbations, one draw each, kept even when it equals the caption."""
    tagged = tagger(caption)
    negatives = tuple(pre_caption(" ".join(perturb(tagged, rng)), max_words)
                      for perturb in PERTURBATIONS.values())
    return OrderCase(pre_caption(caption, max_words), negatives)


def _rotate_distinct(tokens: list[str]) -> list[str]:
    """A deterministic different order: swap the first two tokens that differ."""
    out = list(tokens)
    j = next(i for i in range(1, len(out)) if out[i] != out[0])
    out[0], out[j] = out[j], out[0]
    return out


def _permute(tokens: list[str], positions: list[int], rng: random.Random) -> None:
    values = [tokens[i] for i in positions]
    rng.shuffle(values)
    for i, value in zip(positions, values, strict=True):
        tokens[i] = value


def _trigrams(tokens: list[str]) -> list[list[str]]:
    return [tokens[i: i + 3] for i in range(0, len(tokens), 3)]
