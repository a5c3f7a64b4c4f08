"""Rule-based caption rewrites: other true captions of the same image, for `data.captions`.

LaCLIP rewrites captions with a language model and DreamLIP splits long captions into
sub-captions; these rules need neither, and only make changes that keep a caption true:

- `drop_att`: one adjective of a noun phrase left out ("a small red car" → "a small car"), a
  less specific description of the same thing, with "a"/"an" fixed to the next word;
- `swap_and`: two noun phrases joined by "and" trade places ("a cat and a dog" → "a dog and a
  cat");
- `invert_rel`: "X <relation> Y" with a spatial relation that has an inverse becomes "Y
  <inverse> X" ("a cup on top of a table" → "a table under a cup").

Noun phrases and relations are found as for hard negatives (`vlp.data.negatives`: rules by
default, or a spaCy parser). A rewrite equal to the caption (ignoring case, spaces and
punctuation) or to an earlier rewrite is never returned; a caption the rules do not apply to
gets none.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from vlp.data.negatives import Parsed, _join, _normal, _swap_spans, parse_rules

INVERSE_RELATIONS: dict[str, str] = {
    "left of": "right of", "right of": "left of", "above": "below", "below": "above",
    "in front of": "behind", "behind": "in front of", "on top of": "under", "under": "on top of",
    "over": "under",
}
"""Spatial relations whose inverse describes the same scene read from the other object."""
KINDS = ("drop_att", "swap_and", "invert_rel")


def _article_fixed(words: list[str]) -> list[str]:
    for i, word in enumerate(words[:-1]):
        if word.lower() in ("a", "an"):
            article = "an" if words[i + 1][:1].lower() in "aeiou" else "a"
            words[i] = article.capitalize() if word[0].isupper() else article
    return words


def _drop_att(parsed: Parsed) -> list[list[str]]:
    adjectives = [i for p in parsed.phrases for i in p.adjectives]
    return [_article_fixed([w for i, w in enumerate(parsed.words) if i != drop])
            for drop in adjectives]


def _swap_and(parsed: Parsed) -> list[list[str]]:
    words, phrases = parsed.words, parsed.phrases
    return [_article_fixed(_swap_spans(list(words), (a.start, a.end), (b.start, b.end)))
            for a, b in zip(phrases, phrases[1:], strict=False)
            if b.start == a.end + 1 and words[a.end].lower() == "and"]


def _invert_rel(parsed: Parsed) -> list[list[str]]:
    """Only a caption that is exactly `phrase relation phrase` (and end punctuation)."""
    words, phrases = parsed.words, parsed.phrases
    if len(phrases) != 2 or len(parsed.relations) != 1:
        return []
    (start, end), (a, b) = parsed.relations[0], phrases
    relation = " ".join(words[start:end]).lower()
    tail = words[b.end:]
    if (relation not in INVERSE_RELATIONS or a.start != 0 or a.end != start or b.start != end
            or any(w.isalnum() for w in tail)):
        return []
    first = words[b.start:b.end]
    first[0] = first[0].capitalize() if words[0][0].isupper() else first[0]
    second = words[a.start:a.end]
    second[0] = second[0].lower() if second[0].lower() in ("a", "an", "the") else second[0]
    return [[*first, *INVERSE_RELATIONS[relation].split(), *second, *tail]]


RULES: dict[str, Callable[[Parsed], list[list[str]]]] = {
    "drop_att": _drop_att, "swap_and": _swap_and, "invert_rel": _invert_rel}
"""Rewrite kinds → every rewrite the rule makes of a parsed caption (none where it does not
apply)."""


def rewrites(caption: str, *, num: int = 3, seed: int | str = 0,
             parse: Callable[[str], Parsed] = parse_rules) -> list[tuple[str, str]]:
    """Up to `num` distinct (rewrite, kind) pairs for `caption`: the kinds take turns in a
    seeded order, each giving its rewrites in a seeded order."""
    rng = random.Random(f"{seed}/{caption}")
    parsed = parse(caption)
    queues = []
    for kind in rng.sample(KINDS, len(KINDS)):
        texts = [_join(words) for words in RULES[kind](parsed)]
        rng.shuffle(texts)
        queues.append((kind, texts))
    seen = {_normal(caption)}
    out: list[tuple[str, str]] = []
    while len(out) < num and any(texts for _, texts in queues):
        for kind, texts in queues:
            while texts:
                text = texts.pop(0)
                if _normal(text) not in seen:
                    seen.add(_normal(text))
                    out.append((text, kind))
                    break
            if len(out) == num:
                break
    return out
