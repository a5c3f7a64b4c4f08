"""Word-class tagging for ARO's order perturbations: which tokens are nouns, which adjectives.

ARO tags captions with spaCy's `en_core_web_sm` (Penn tags NN* are nouns, JJ* adjectives). That
pipeline is used when it is installed; otherwise a small rule-based tagger stands in: a closed
list of function words, a list of common caption adjectives and verbs, suffix rules, and "noun"
for every other word (the open class that dominates captions). It is good enough for captions
(it tags all of ShapesWorld's vocabulary right) but not a general POS tagger; reports name the
tagger used, because order-benchmark numbers depend on it.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from vlp.data.shapesworld import COLORS, SIZES

NOUN, ADJ, OTHER = "NOUN", "ADJ", "OTHER"
Tagged = list[tuple[str, str]]
"""`(token, tag)` pairs, tag one of NOUN, ADJ, OTHER."""
Tagger = Callable[[str], Tagged]
TAGGERS = ("auto", "spacy", "rules")

_FUNCTION_WORDS = frozenset("""
a an the this that these those some any each every no another such both either neither all
i me my mine you your yours he him his she her hers it its we us our ours they them their theirs
who whom whose which what where when why how there here
of in on at to from with by for about above below over under beneath beside besides between
behind near into onto through across along around against among inside outside toward towards
up down off out next atop upon within without underneath via past beyond during until while
and or but nor so yet as if because than though although whether
is are was were be been being am has have had do does did can could will would may might shall
should must not very also just too still together almost only really quite even ever then now
one two three four five six seven eight nine ten eleven twelve much more most unless
""".split())
_ADJECTIVES = frozenset(COLORS) | frozenset(SIZES) | frozenset("""
black brown orange gray grey silver gold golden dark light bright pale colorful colourful
big little tiny huge giant tall short long wide narrow thick thin high low deep shallow
young old new empty full open closed clear sunny cloudy busy crowded dirty clean wet dry hot
cold warm cool pretty beautiful cute ugly nice fresh ripe raw fancy plain shiny fluffy furry
fat skinny heavy round square flat straight curly striped spotted wooden broken single double
different various same other several first second third last front back top bottom middle
left right upper lower outdoor indoor modern vintage antique professional large small
""".split()) - {"front", "back", "top", "bottom", "middle", "left", "right", "square"}
# Position words ("on the left of", "in front of") are nouns in Penn tagging, as is "square"
# the shape; they are taken out of the adjective list above so they fall through to NOUN.
_VERBS = frozenset("""
sit sits stand stands hold holds ride rides eat eats look looks walk walks play plays lie lies
lay lays fly flies wait waits carry carries wear wears show shows contain contains sleep sleeps
run runs watch watches pull pulls push pushes drive drives swim swims jump jumps
rest rests hang hangs lean leans use uses get gets go goes make makes take takes see sees
""".split())
_NOUNS_IN_ING = frozenset("""
building ceiling clothing painting evening morning wedding icing railing sibling pudding
stuffing topping frosting seasoning dressing rendering ring king thing wing string spring swing
""".split())
_NOUNS_IN_ED = frozenset("bed shed sled seed weed speed breed steed tweed hundred".split())
_NOUNS_IN_LY = frozenset("family fly belly jelly lily rally bully ally".split())
_NOUNS_WITH_ADJ_SUFFIX = frozenset("""
traffic music picnic clinic topic mechanic plastic fabric attic vegetable radish
""".split())
_ADJ_SUFFIXES = ("ous", "ful", "ive", "able", "ible", "ish", "less", "ic")
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")


def tokenize(text: str) -> list[str]:
    """Lower-cased word and punctuation tokens (`man's` stays one token)."""
    return _TOKEN.findall(text.lower())


def tag_word(word: str) -> str:
    """The rule-based tag of one lower-cased token."""
    if not word[0].isalpha():
        return OTHER
    if word in _FUNCTION_WORDS or word in _VERBS:
        return OTHER
    if word in _ADJECTIVES:
        return ADJ
    if word.endswith("ing") and len(word) > 5 and word not in _NOUNS_IN_ING:
        return OTHER  # gerund or participle (VBG): "a man riding a horse"
    if word.endswith("ed") and len(word) > 4 and word not in _NOUNS_IN_ED:
        return OTHER  # past participle (VBN): "a parked car"
    if word.endswith("ly") and word not in _NOUNS_IN_LY:
        return OTHER  # adverb
    if any(word.endswith(s) and len(word) >= len(s) + 3 for s in _ADJ_SUFFIXES):
        return NOUN if word in _NOUNS_WITH_ADJ_SUFFIX else ADJ
    return NOUN


def rule_tagger(text: str) -> Tagged:
    """Tag a caption with the rule-based tagger."""
    return [(token, tag_word(token)) for token in tokenize(text)]


def spacy_tagger(model: str = "en_core_web_sm") -> Tagger:
    """ARO's tagger: spaCy's `model`, Penn tags NN/NNS/NNP/NNPS → NOUN, JJ/JJR/JJS → ADJ."""
    import spacy

    nlp = spacy.load(model, disable=["parser", "ner", "lemmatizer"])

    def tag(text: str) -> Tagged:
        return [(t.text, NOUN if t.tag_.startswith("NN") else ADJ if t.tag_.startswith("JJ")
                 else OTHER) for t in nlp(text)]

    return tag


def build_tagger(name: str = "auto") -> tuple[Tagger, str]:
    """`(tagger, description)`: "spacy" (error if unavailable), "rules", or "auto" (spaCy's
    en_core_web_sm if it loads, else the rules)."""
    if name not in TAGGERS:
        raise ValueError(f"unknown tagger {name!r}; choose one of {TAGGERS}")
    if name in ("auto", "spacy"):
        try:
            return spacy_tagger(), "spaCy en_core_web_sm (as ARO)"
        except (ImportError, OSError) as err:
            if name == "spacy":
                raise ValueError(f"tagger 'spacy' needs spaCy and en_core_web_sm: {err}") from None
    return rule_tagger, "vlp rule-based tagger (spaCy not installed)"
