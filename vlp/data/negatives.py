"""NegCLIP-style hard-negative captions: the caption's words, rearranged so it is false.

Kinds (as in NegCLIP and SugarCrepe): `swap_np` (two noun phrases trade places), `swap_att`
(two noun phrases trade adjectives), `swap_obj` (two noun phrases trade nouns), `replace_att`
(an adjective replaced by another of its group: colour, size, material, ...), `replace_rel`
(a relation replaced by another: on → under) and `shuffle` (the word order shuffled). A negative
equal to the caption (ignoring case, spaces and punctuation) is never returned.

Noun phrases come from spaCy (`noun_chunks`, POS tags) when a pipeline such as
`en_core_web_sm` is installed and named; otherwise from rules: a determiner or number, then
adjectives from the vocabulary below, then the noun. The rules need no download, so the tool
works offline; spaCy finds phrases the rules miss ("a man's hat", no determiner, ...).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

ADJECTIVE_GROUPS: dict[str, tuple[str, ...]] = {
    "colour": ("red", "blue", "green", "yellow", "black", "white", "brown", "orange", "purple",
               "pink", "gray", "grey", "silver", "golden"),
    "size": ("big", "small", "large", "little", "tiny", "huge", "tall", "short", "long"),
    "material": ("wooden", "metal", "plastic", "glass", "stone", "leather", "paper"),
    "age": ("young", "old", "new"),
    "state": ("empty", "full", "open", "closed", "wet", "dry", "clean", "dirty"),
}
RELATIONS: tuple[str, ...] = (
    "in front of", "on top of", "next to", "left of", "right of", "behind", "under", "below",
    "above", "on", "in", "inside", "near", "beside", "over", "holding", "riding", "wearing",
    "carrying", "eating",
)
DETERMINERS = frozenset(
    "a an the this that these those two three four five some many several his her their its "
    "my your our one".split())
KINDS = ("swap_np", "swap_att", "swap_obj", "replace_att", "replace_rel", "shuffle")

_GROUP_OF = {adj: group for group, adjs in ADJECTIVE_GROUPS.items() for adj in adjs}
_WORD = re.compile(r"[A-Za-z0-9']+|[^\sA-Za-z0-9']")


@dataclass(frozen=True)
class Phrase:
    """A noun phrase as word positions: adjectives and the head noun."""

    start: int
    end: int  # exclusive
    adjectives: tuple[int, ...]
    noun: int


@dataclass
class Parsed:
    words: list[str]
    phrases: list[Phrase]
    relations: list[tuple[int, int]]  # (start, end) word spans


def _relation_spans(words: list[str]) -> list[tuple[int, int]]:
    lower = [w.lower() for w in words]
    spans, i = [], 0
    by_length = sorted(RELATIONS, key=lambda r: -len(r.split()))
    while i < len(lower):
        for relation in by_length:
            parts = relation.split()
            if lower[i:i + len(parts)] == parts:
                spans.append((i, i + len(parts)))
                i += len(parts) - 1
                break
        i += 1
    return spans


def parse_rules(caption: str) -> Parsed:
    """Determiner (or number) + known adjectives + one more word = a noun phrase."""
    words = _WORD.findall(caption)
    lower = [w.lower() for w in words]
    phrases, i = [], 0
    while i < len(words):
        if lower[i] in DETERMINERS or lower[i].isdigit():
            j = i + 1
            while j < len(words) and lower[j] in _GROUP_OF:
                j += 1
            if j < len(words) and words[j].isalpha() and lower[j] not in DETERMINERS:
                phrases.append(Phrase(i, j + 1, tuple(range(i + 1, j)), j))
                i = j + 1
                continue
        i += 1
    return Parsed(words, phrases, _relation_spans(words))


def spacy_parser(model: str) -> Callable[[str], Parsed]:
    """A parser backed by an installed spaCy pipeline (`spacy.load(model)`)."""
    import spacy

    nlp = spacy.load(model, disable=["ner", "lemmatizer"])

    def parse(caption: str) -> Parsed:
        doc = nlp(caption)
        words = [t.text for t in doc]
        phrases = []
        for chunk in doc.noun_chunks:
            adjectives = tuple(t.i for t in chunk if t.pos_ == "ADJ")
            phrases.append(Phrase(chunk.start, chunk.end, adjectives, chunk.root.i))
        return Parsed(words, phrases, _relation_spans(words))

    return parse


def _join(words: Sequence[str]) -> str:
    text = " ".join(words)
    return re.sub(r" ([,.;:!?])", r"\1", text)


def _normal(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9']+", text.lower()))


def _swap_spans(words: list[str], a: tuple[int, int], b: tuple[int, int]) -> list[str]:
    (a0, a1), (b0, b1) = sorted([a, b])
    return words[:a0] + words[b0:b1] + words[a1:b0] + words[a0:a1] + words[b1:]


def _negative(kind: str, parsed: Parsed, rng: random.Random) -> list[str] | None:
    words, phrases = list(parsed.words), parsed.phrases
    if kind == "swap_np" and len(phrases) >= 2:
        a, b = rng.sample(phrases, 2)
        return _swap_spans(words, (a.start, a.end), (b.start, b.end))
    if kind == "swap_obj" and len(phrases) >= 2:
        a, b = rng.sample(phrases, 2)
        words[a.noun], words[b.noun] = words[b.noun], words[a.noun]
        return words
    if kind == "swap_att":
        with_adjs = [p for p in phrases if p.adjectives]
        if len(with_adjs) >= 2:
            a, b = rng.sample(with_adjs, 2)
            i, j = rng.choice(a.adjectives), rng.choice(b.adjectives)
            words[i], words[j] = words[j], words[i]
            return words
    if kind == "replace_att":
        known = [i for p in phrases for i in p.adjectives if words[i].lower() in _GROUP_OF]
        if known:
            i = rng.choice(known)
            group = ADJECTIVE_GROUPS[_GROUP_OF[words[i].lower()]]
            words[i] = rng.choice([a for a in group if a != words[i].lower()])
            return words
    if kind == "replace_rel" and parsed.relations:
        start, end = rng.choice(parsed.relations)
        current = " ".join(words[start:end]).lower()
        words[start:end] = rng.choice([r for r in RELATIONS if r != current]).split()
        return words
    if kind == "shuffle" and len([w for w in words if w.isalnum()]) >= 3:
        shuffled = words[:]
        rng.shuffle(shuffled)
        return shuffled
    return None


def hard_negatives(caption: str, *, num: int = 3, seed: int | str = 0,
                   kinds: Iterable[str] = KINDS,
                   parse: Callable[[str], Parsed] = parse_rules) -> list[tuple[str, str]]:
    """Up to `num` distinct (negative, kind) pairs for `caption`, structural kinds first
    (shuffles only fill up); none equals the caption."""
    rng = random.Random(f"{seed}/{caption}")
    parsed = parse(caption)
    original = _normal(caption)
    kinds = list(kinds)
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown negative kinds {sorted(unknown)}; known: {', '.join(KINDS)}")
    structural = [k for k in kinds if k != "shuffle"]
    rng.shuffle(structural)
    order = structural + (["shuffle"] if "shuffle" in kinds else [])
    out: list[tuple[str, str]] = []
    seen = {original}
    for kind in order:
        for _attempt in range(4 if kind != "shuffle" else 8):
            words = _negative(kind, parsed, rng)
            if words is None:
                break
            text = _join(words)
            if _normal(text) not in seen:
                seen.add(_normal(text))
                out.append((text, kind))
                break
        if len(out) >= num:
            break
    return out
