"""ShapesWorld: a procedural image-text world with exact hard negatives (docs/design.md §6).

A scene holds one or two coloured shapes on a black background; a two-object scene has one
spatial relation of object 0 to object 1. Captions come in several phrasings and are built
from a structured :class:`Caption`, so every hard negative is an edit of that structure whose
falsity is checked against the scene, never assumed. :func:`parse_caption` reads the caption
grammar back, and :func:`describes` says whether a caption is true of a scene: tests use it
to prove that positives hold and negatives do not.

Everything is a pure function of ``(seed, stream, index)`` (see :func:`sample_rng`), so shards
can be generated in any order, in parallel, with byte-identical results.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass, replace
from typing import NamedTuple

from PIL import Image, ImageDraw

VERSION = "3"
"""Generator output version, in the manifest (3: training samples' json has `captions`)."""

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 190, 40),
    "blue": (40, 90, 255),
    "yellow": (250, 225, 25),
    "purple": (150, 50, 230),
    "cyan": (20, 220, 230),
    "white": (245, 245, 245),
    "pink": (255, 140, 200),
}
"""Colour names and RGB values, far apart in RGB and bright on black. No name starts with a
vowel, so the CLIP_benchmark template "a {c}." is grammatical for every class."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "hexagon", "cross")
SIZES: tuple[str, ...] = ("small", "large")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
INVERSE_RELATION: dict[str, str] = {
    "left of": "right of",
    "right of": "left of",
    "above": "below",
    "below": "above",
}

ALL_COMBOS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)
HELD_OUT_COMBOS: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("green", "star"),
    ("blue", "hexagon"),
    ("yellow", "cross"),
    ("purple", "circle"),
    ("cyan", "square"),
)
"""Colour-shape pairs never drawn in training scenes. Each colour and each shape appears at
most once here, so every colour and every shape is still seen in training in other pairs."""
SEEN_COMBOS: tuple[tuple[str, str], ...] = tuple(c for c in ALL_COMBOS if c not in HELD_OUT_COMBOS)

CLASSNAMES: tuple[str, ...] = tuple(f"{c} {s}" for c, s in ALL_COMBOS)
"""Zero-shot classes: every colour-shape pair, colour-major ("red circle", "red square", ...)."""
ZEROSHOT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {c}.",
    "a {c}.",
    "there is a {c}.",
    "an image of a {c}.",
    "a picture of a {c}.",
    "a rendering of a {c}.",
)

NEGATIVE_KINDS: tuple[str, ...] = (
    "replace_att",
    "replace_obj",
    "replace_rel",
    "swap_att",
    "swap_obj",
    "add_obj",
    "add_att",
    "shuffle",
)
"""Hard-negative kinds, named after the SugarCrepe subsets where one exists:

- ``replace_att``: one mention's colour, or its size if the caption names sizes, replaced;
- ``replace_obj``: one mention's shape replaced;
- ``replace_rel``: the relation replaced by another (two objects);
- ``swap_att``: the two mentions' colours swapped, or their sizes if the colours are equal;
- ``swap_obj``: the two mentions swapped around the relation ("B left of A");
- ``add_obj``: a colour-shape pair absent from the scene added (one object: "A left of X";
  two objects: "... and X");
- ``add_att``: a wrong size named on one mention of a caption that names no size;
- ``shuffle``: the caption's words shuffled (ARO's COCO/Flickr-Order perturbation).
"""

PREFIXES: tuple[str, ...] = ("", "a photo of ", "there is ", "an image of ", "a picture of ",
                             "a rendering of ")
SUFFIXES: tuple[str, ...] = ("", " on a black background")
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left of": ("left of", "to the left of", "on the left of"),
    "right of": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}

_SIZE_FRACTION = {"small": 0.12, "large": 0.2}
_MIN_IMAGE_SIZE = 32
_COLOR_JITTER = 10
_ARTICLES = ("a", "an", "the")
_REL_FORMS = math.lcm(*(len(p) for p in RELATION_PHRASES.values()))  # uniform for any relation


@dataclass(frozen=True)
class ShapeObject:
    """One object as it is in the scene."""

    color: str
    shape: str
    size: str


@dataclass(frozen=True)
class Scene:
    """Objects, the relation of object 0 to object 1 (None for one object), and the layout:
    integer centres, half-extents (every shape lies inside its centre ± radius box) and the
    jittered RGB each object is drawn in."""

    objects: tuple[ShapeObject, ...]
    relation: str | None
    centers: tuple[tuple[int, int], ...]
    radii: tuple[int, ...]
    rgbs: tuple[tuple[int, int, int], ...]

    @property
    def boxes(self) -> tuple[tuple[int, int, int, int], ...]:
        """Pixel boxes ``(x, y, w, h)`` of the objects."""
        return tuple((x - r, y - r, 2 * r + 1, 2 * r + 1)
                     for (x, y), r in zip(self.centers, self.radii, strict=True))

    def union_box(self) -> tuple[int, int, int, int]:
        """The smallest ``(x, y, w, h)`` box holding every object (ARO crops to it)."""
        x0 = min(b[0] for b in self.boxes)
        y0 = min(b[1] for b in self.boxes)
        x1 = max(b[0] + b[2] for b in self.boxes)
        y1 = max(b[1] + b[3] for b in self.boxes)
        return x0, y0, x1 - x0, y1 - y0

    @classmethod
    def from_json(cls, meta: dict) -> Scene:
        """The scene of a sample's metadata (see :meth:`to_json`); colours are the nominal RGB."""
        objects = tuple(ShapeObject(o["color"], o["shape"], o["size"]) for o in meta["objects"])
        boxes = [o["bbox"] for o in meta["objects"]]
        return cls(
            objects=objects,
            relation=meta["relation"],
            centers=tuple((x + (w - 1) // 2, y + (h - 1) // 2) for x, y, w, h in boxes),
            radii=tuple((w - 1) // 2 for _, _, w, _ in boxes),
            rgbs=tuple(COLORS[o.color] for o in objects),
        )

    def to_json(self) -> dict:
        """Metadata for a sample's ``.json``: objects with boxes, and the relation."""
        return {
            "objects": [
                {"color": o.color, "shape": o.shape, "size": o.size, "bbox": list(box)}
                for o, box in zip(self.objects, self.boxes, strict=True)
            ],
            "relation": self.relation,
        }


class Mention(NamedTuple):
    """An object as a caption names it; ``size`` is None when the caption leaves it out.
    (A named tuple: hard-negative search builds many of them.)"""

    color: str
    shape: str
    size: str | None = None

    def matches(self, obj: ShapeObject) -> bool:
        return (self.color == obj.color and self.shape == obj.shape
                and self.size in (None, obj.size))

    @property
    def words(self) -> str:
        return f"{self.size} {self.color} {self.shape}" if self.size else f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Caption:
    """A caption as structure: mentions, the relation of mention 0 to mention 1, and the
    phrasing (prefix, relation wording, copula, suffix). Further mentions join with "and"."""

    mentions: tuple[Mention, ...]
    relation: str | None = None
    prefix: str = ""
    suffix: str = ""
    rel_form: int = 0
    copula: bool = False

    def render(self) -> str:
        phrases = [f"{_article(m.words)} {m.words}" for m in self.mentions]
        if self.relation is None:
            clause, rest = phrases[0], phrases[1:]
        else:
            forms = RELATION_PHRASES[self.relation]
            verb = "is " if self.copula else ""
            clause = f"{phrases[0]} {verb}{forms[self.rel_form % len(forms)]} {phrases[1]}"
            rest = phrases[2:]
        for phrase in rest:
            clause += f" and {phrase}"
        return f"{self.prefix}{clause}{self.suffix}"


def _article(words: str) -> str:
    return "an" if words[0] in "aeiou" else "a"


def sample_rng(seed: int, stream: str, index: int) -> random.Random:
    """The RNG of one sample. Seeding from a string is stable across processes and Python
    runs (it hashes with SHA-512, not ``hash()``), and streams never share a seed."""
    return random.Random(f"shapesworld/{seed}/{stream}/{index}")


def radius_of(size: str, image_size: int) -> int:
    """Half-extent in pixels of an object of ``size`` in an ``image_size`` image."""
    return max(3, round(_SIZE_FRACTION[size] * image_size))


def sample_scene(
    rng: random.Random,
    *,
    num_objects: int,
    image_size: int = 64,
    combos: tuple[tuple[str, str], ...] = SEEN_COMBOS,
) -> Scene:
    """A random scene of one or two objects whose colour-shape pairs come from ``combos``.

    Two objects never overlap (their boxes are ``gap`` pixels apart along the relation's axis)
    and their offset across that axis is at most a quarter of the offset along it, so the
    relation is unambiguous and the other three relations are false.
    """
    if image_size < _MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {_MIN_IMAGE_SIZE}, got {image_size}")
    if num_objects not in (1, 2):
        raise ValueError(f"num_objects must be 1 or 2, got {num_objects}")
    objects = tuple(ShapeObject(*rng.choice(combos), rng.choice(SIZES)) for _ in range(num_objects))
    radii = tuple(radius_of(o.size, image_size) for o in objects)
    if num_objects == 1:
        relation = None
        centers = ((rng.randint(radii[0] + 1, image_size - radii[0] - 2),
                    rng.randint(radii[0] + 1, image_size - radii[0] - 2)),)
    else:
        relation = rng.choice(RELATIONS)
        centers = _place_pair(rng, radii, relation, image_size)
    rgbs = tuple(_jitter(rng, COLORS[o.color]) for o in objects)
    return Scene(objects, relation, centers, radii, rgbs)


def _place_pair(
    rng: random.Random, radii: tuple[int, ...], relation: str, image_size: int
) -> tuple[tuple[int, int], tuple[int, int]]:
    margin, gap = 1, max(2, image_size // 16)
    first = 0 if relation in ("left of", "above") else 1  # the one nearer the origin
    r_a, r_b = radii[first], radii[1 - first]
    hi = image_size - 1 - margin
    along = rng.randint(r_a + r_b + gap, hi - margin - r_a - r_b)
    a_along = rng.randint(margin + r_a, hi - r_b - along)
    across = rng.randint(-(along // 4), along // 4)
    a_across = rng.randint(max(margin + r_a, margin + r_b - across),
                           min(hi - r_a, hi - r_b - across))
    a, b = (a_along, a_across), (a_along + along, a_across + across)
    if relation in ("above", "below"):
        a, b = (a[1], a[0]), (b[1], b[0])
    return (a, b) if first == 0 else (b, a)


def _jitter(rng: random.Random, rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    j = _COLOR_JITTER
    return tuple(min(255, max(0, v + rng.randint(-j, j))) for v in rgb)  # type: ignore[return-value]


# --------------------------------------------------------------------------- rendering

_UNIT_POLYGONS: dict[str, list[tuple[float, float]]] = {
    "triangle": [(0.0, -1.0), (1.0, 0.8), (-1.0, 0.8)],
    "diamond": [(0.0, -1.0), (1.0, 0.0), (0.0, 1.0), (-1.0, 0.0)],
    "cross": [(-0.33, -1.0), (0.33, -1.0), (0.33, -0.33), (1.0, -0.33), (1.0, 0.33),
              (0.33, 0.33), (0.33, 1.0), (-0.33, 1.0), (-0.33, 0.33), (-1.0, 0.33),
              (-1.0, -0.33), (-0.33, -0.33)],
}


def _star(points: int = 5, inner: float = 0.45) -> list[tuple[float, float]]:
    out = []
    for k in range(2 * points):
        radius = 1.0 if k % 2 == 0 else inner
        angle = -math.pi / 2 + k * math.pi / points
        out.append((radius * math.cos(angle), radius * math.sin(angle)))
    return out


def _hexagon() -> list[tuple[float, float]]:
    return [(math.cos(k * math.pi / 3), math.sin(k * math.pi / 3)) for k in range(6)]


_UNIT_POLYGONS["star"] = _star()
_UNIT_POLYGONS["hexagon"] = _hexagon()


def render_image(scene: Scene, image_size: int = 64) -> Image.Image:
    """Draw the scene on a black ``image_size`` square (RGB, no antialiasing)."""
    image = Image.new("RGB", (image_size, image_size))
    draw = ImageDraw.Draw(image)
    for obj, (x, y), r, rgb in zip(scene.objects, scene.centers, scene.radii, scene.rgbs,
                                   strict=True):
        if obj.shape == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=rgb)
        elif obj.shape == "square":
            h = round(0.85 * r)
            draw.rectangle((x - h, y - h, x + h, y + h), fill=rgb)
        else:
            draw.polygon([(x + u * r, y + v * r) for u, v in _UNIT_POLYGONS[obj.shape]], fill=rgb)
    return image


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes with fast, deterministic compression (lossless keeps colours exact)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


# --------------------------------------------------------------------------- captions


def describe(
    scene: Scene,
    rng: random.Random,
    *,
    mention_size: bool | None = None,
) -> Caption:
    """A random true caption of ``scene``.

    ``mention_size`` None lets the RNG decide (sizes are named 70% of the time). A two-object
    scene is described either as "A <rel> B" or as "B <inverse rel> A".
    """
    if mention_size is None:
        mention_size = rng.random() < 0.7
    mentions = tuple(Mention(o.color, o.shape, o.size if mention_size else None)
                     for o in scene.objects)
    relation = scene.relation
    if relation is not None and rng.random() < 0.5:
        mentions, relation = mentions[::-1], INVERSE_RELATION[relation]
    prefix = rng.choice(PREFIXES)
    suffix = "" if rng.random() < 0.85 else SUFFIXES[1]
    copula = relation is not None and prefix == "" and rng.random() < 0.5
    return Caption(mentions, relation, prefix, suffix, rng.randrange(_REL_FORMS), copula)


def paraphrases(scene: Scene, rng: random.Random, count: int) -> list[str]:
    """Up to ``count`` distinct true captions of ``scene`` that all name every size."""
    texts: list[str] = []
    for _ in range(20 * count):
        text = describe(scene, rng, mention_size=True).render()
        if text not in texts:
            texts.append(text)
            if len(texts) == count:
                break
    return texts


def hard_negative(
    kind: str, scene: Scene, caption: Caption, rng: random.Random
) -> str | None:
    """One exact hard negative of ``kind`` for ``caption``, or None where the kind does not
    apply (e.g. ``swap_att`` between two same-coloured objects).

    The negative keeps the caption's phrasing and changes one thing; it is returned only if it
    differs from the caption and :func:`matches` says it is false of the scene.
    """
    text = caption.render()
    if kind == "shuffle":
        return _shuffled(scene, text, rng)
    candidates = _CANDIDATES[kind](scene, caption, rng)
    rng.shuffle(candidates)
    for mentions, relation in candidates:
        if not matches(scene, mentions, relation):
            negative = replace(caption, mentions=mentions, relation=relation).render()
            if negative != text:
                return negative
    return None


def hard_negatives(
    scene: Scene, caption: Caption, rng: random.Random, kinds: tuple[str, ...] = NEGATIVE_KINDS
) -> list[tuple[str, str]]:
    """Every applicable hard negative as ``(kind, text)`` pairs, in ``kinds`` order."""
    out = []
    for kind in kinds:
        negative = hard_negative(kind, scene, caption, rng)
        if negative is not None:
            out.append((kind, negative))
    return out


_Candidate = tuple[tuple[Mention, ...], str | None]
"""An edited caption content: its mentions and relation (the phrasing stays the same)."""


def _swap_in(mentions: tuple[Mention, ...], i: int, mention: Mention) -> tuple[Mention, ...]:
    return mentions[:i] + (mention,) + mentions[i + 1:]


def _replace_att(scene: Scene, caption: Caption, rng: random.Random) -> list[_Candidate]:
    ms, rel, out = caption.mentions, caption.relation, []
    for i, m in enumerate(ms):
        out += [(_swap_in(ms, i, Mention(c, m.shape, m.size)), rel) for c in COLORS if c != m.color]
        if m.size is not None:
            out += [(_swap_in(ms, i, Mention(m.color, m.shape, s)), rel)
                    for s in SIZES if s != m.size]
    return out


def _replace_obj(scene: Scene, caption: Caption, rng: random.Random) -> list[_Candidate]:
    ms, rel = caption.mentions, caption.relation
    return [(_swap_in(ms, i, Mention(m.color, s, m.size)), rel)
            for i, m in enumerate(ms) for s in SHAPES if s != m.shape]


def _replace_rel(scene: Scene, caption: Caption, rng: random.Random) -> list[_Candidate]:
    if caption.relation is None:
        return []
    return [(caption.mentions, r) for r in RELATIONS if r != caption.relation]


def _swap_att(scene: Scene, caption: Caption, rng: random.Random) -> list[_Candidate]:
    if len(caption.mentions) != 2:
        return []
    a, b = caption.mentions
    if a.color != b.color:
        swapped = (Mention(b.color, a.shape, a.size), Mention(a.color, b.shape, b.size))
    elif a.size is not None and a.size != b.size:
        swapped = (Mention(a.color, a.shape, b.size), Mention(b.color, b.shape, a.size))
    else:
        return []
    return [(swapped, caption.relation)]


def _swap_obj(scene: Scene, caption: Caption, rng: random.Random) -> list[_Candidate]:
    if len(caption.mentions) != 2:
        return []
    return [(caption.mentions[::-1], caption.relation)]


def _add_obj(scene: Scene, caption: Caption, rng: random.Random) -> list[_Candidate]:
    present = {(o.color, o.shape) for o in scene.objects}
    color, shape = rng.choice([c for c in ALL_COMBOS if c not in present])
    sized = caption.mentions[0].size is not None
    extra = Mention(color, shape, rng.choice(SIZES) if sized else None)
    if len(caption.mentions) == 2:
        return [(caption.mentions + (extra,), caption.relation)]
    first = caption.mentions[0]
    mentions = (first, extra) if rng.random() < 0.5 else (extra, first)
    return [(mentions, rng.choice(RELATIONS))]


def _add_att(scene: Scene, caption: Caption, rng: random.Random) -> list[_Candidate]:
    """Name a wrong size on one mention of a caption that names no size."""
    ms = caption.mentions
    return [(_swap_in(ms, i, Mention(m.color, m.shape, s)), caption.relation)
            for i, m in enumerate(ms) if m.size is None for s in SIZES]


_CANDIDATES = {
    "replace_att": _replace_att,
    "replace_obj": _replace_obj,
    "replace_rel": _replace_rel,
    "swap_att": _swap_att,
    "swap_obj": _swap_obj,
    "add_obj": _add_obj,
    "add_att": _add_att,
}


def _shuffled(scene: Scene, text: str, rng: random.Random, tries: int = 10) -> str | None:
    words = text.split()
    for _ in range(tries):
        rng.shuffle(words)
        candidate = " ".join(words)
        if candidate != text and not describes(scene, candidate):
            return candidate
    return None


# --------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class ParsedCaption:
    """What a caption claims: the mentioned objects and the relation of mention 0 to 1."""

    mentions: tuple[Mention, ...]
    relation: str | None


def _token_table(phrases: dict[str, tuple[str, ...]]) -> list[tuple[tuple[str, ...], str]]:
    table = [(tuple(p.split()), name) for name, forms in phrases.items() for p in forms]
    return sorted(table, key=lambda entry: -len(entry[0]))


_RELATION_TOKENS = _token_table(RELATION_PHRASES)
_PREFIX_TOKENS = [tuple(p.split()) for p in PREFIXES]
_SUFFIX_TOKENS = [tuple(s.split()) for s in SUFFIXES]


def parse_caption(text: str) -> ParsedCaption | None:
    """Read a ShapesWorld caption back into mentions and relation; None if it is not one.

    Grammar: ``[prefix] NP [["is"] REL NP] {"and" NP} [suffix] ["."]`` where
    ``NP = ("a"|"an"|"the") [size] colour shape``. Zero-shot prompts ("a photo of a red
    circle.") and ARO captions ("the red circle is left of the blue star") parse too.
    """
    tokens = tuple(text.lower().strip().rstrip(".").split())
    for prefix in _PREFIX_TOKENS:
        if tokens[: len(prefix)] != prefix:
            continue
        for suffix in _SUFFIX_TOKENS:
            end = len(tokens) - len(suffix)
            if end <= len(prefix) or (suffix and tokens[end:] != suffix):
                continue
            parsed = _parse_clause(tokens[len(prefix):end])
            if parsed is not None:
                return parsed
    return None


def _parse_clause(tokens: tuple[str, ...]) -> ParsedCaption | None:
    first = _parse_mention(tokens, 0)
    if first is None:
        return None
    mentions, i, relation = [first[0]], first[1], None
    copula = tokens[i: i + 1] == ("is",)
    for phrase, name in _RELATION_TOKENS:
        start = i + copula
        if tokens[start: start + len(phrase)] == phrase:
            second = _parse_mention(tokens, start + len(phrase))
            if second is not None:
                relation, i = name, second[1]
                mentions.append(second[0])
                break
    if copula and relation is None:
        return None
    while i < len(tokens):
        if tokens[i] != "and":
            return None
        nxt = _parse_mention(tokens, i + 1)
        if nxt is None:
            return None
        mentions.append(nxt[0])
        i = nxt[1]
    return ParsedCaption(tuple(mentions), relation)


def _parse_mention(tokens: tuple[str, ...], i: int) -> tuple[Mention, int] | None:
    if i >= len(tokens) or tokens[i] not in _ARTICLES:
        return None
    i += 1
    size = None
    if i < len(tokens) and tokens[i] in SIZES:
        size, i = tokens[i], i + 1
    if i + 1 < len(tokens) and tokens[i] in COLORS and tokens[i + 1] in SHAPES:
        return Mention(tokens[i], tokens[i + 1], size), i + 2
    return None


def matches(scene: Scene, mentions: tuple[Mention, ...], relation: str | None) -> bool:
    """Whether the mentions (and relation, if any) describe exactly the scene's objects.

    A caption must name as many objects as the scene has. "A <rel> B" is true of a scene
    "B <inverse rel> A"; an unnamed size or relation matches any.
    """
    objects = scene.objects
    if len(mentions) != len(objects):
        return False
    if len(objects) == 1:
        return mentions[0].matches(objects[0])
    for order, scene_relation in (((0, 1), scene.relation),
                                  ((1, 0), INVERSE_RELATION[scene.relation])):
        if (mentions[0].matches(objects[order[0]]) and mentions[1].matches(objects[order[1]])
                and relation in (None, scene_relation)):
            return True
    return False


def describes(scene: Scene, caption: str) -> bool:
    """True iff ``caption`` parses and is an exact description of ``scene``."""
    parsed = parse_caption(caption)
    return parsed is not None and matches(scene, parsed.mentions, parsed.relation)


# --------------------------------------------------------------------------- samples


TRAIN_NEGATIVE_KINDS: dict[int, tuple[str, ...]] = {
    1: ("replace_att", "replace_obj", "add_obj"),
    2: ("swap_att", "swap_obj", "replace_rel"),
}
"""The hard negatives a training caption carries, by number of objects in its scene: three,
the number negclip's recipe draws, so each is in every batch at a fixed rate. A one-object
caption gets an edit of its colour (or size), of its shape and an added object; a two-object
caption gets the edits that only binding and relations can reject, where most kinds (added
objects, shuffled words, replaced colours or shapes) can be rejected by naming alone. Where a
swap does not apply (two objects of the same colour; two identical objects, whose swap is a
paraphrase) or repeats an earlier negative (swapping the colours of two objects of the same
shape swaps the objects), its :data:`TRAIN_NEGATIVE_FALLBACK` stands in. Measured with ``benchmarks/shapesworld_diagnostics.py kinds``:
drawing 3 of all applicable kinds gave only a third of two-object captions a swap_att."""
TRAIN_NEGATIVE_FALLBACK: dict[str, str] = {"swap_att": "replace_att", "swap_obj": "replace_obj"}


def train_negatives(scene: Scene, caption: Caption, rng: random.Random) -> list[tuple[str, str]]:
    """``(kind, text)`` of the :data:`TRAIN_NEGATIVE_KINDS` of the scene, in that order, with
    :data:`TRAIN_NEGATIVE_FALLBACK` standing in for a swap that does not apply."""
    out = []
    for kind in TRAIN_NEGATIVE_KINDS[len(scene.objects)]:
        negative = hard_negative(kind, scene, caption, rng)
        if negative in (None, *(text for _, text in out)) and kind in TRAIN_NEGATIVE_FALLBACK:
            kind = TRAIN_NEGATIVE_FALLBACK[kind]
            negative = hard_negative(kind, scene, caption, rng)
        if negative is not None:
            out.append((kind, negative))
    return out


@dataclass(frozen=True)
class TrainSample:
    """One training pair with its hard negatives (``neg_kinds`` parallel to ``neg_captions``)
    and other true captions of its scene (``captions``, read with ``data.captions``)."""

    key: str
    scene: Scene
    caption: str
    neg_captions: tuple[str, ...]
    neg_kinds: tuple[str, ...]
    captions: tuple[str, ...] = ()

    def metadata(self) -> dict:
        return {**self.scene.to_json(), "caption": self.caption,
                "neg_captions": list(self.neg_captions), "neg_kinds": list(self.neg_kinds),
                "captions": list(self.captions)}


def sample_key(index: int) -> str:
    return f"sw{index:08d}"


TRAIN_PARAPHRASES = (2, 4)
"""How many other true captions (``captions``) a training sample carries: uniform in this range."""


def other_captions(scene: Scene, caption: str, rng: random.Random) -> list[str]:
    """2–4 :func:`paraphrases` of ``scene``, each different from ``caption``."""
    count = rng.randint(*TRAIN_PARAPHRASES)
    return [text for text in paraphrases(scene, rng, count + 1) if text != caption][:count]


def make_train_sample(index: int, *, seed: int, image_size: int = 64) -> TrainSample:
    """Training sample ``index``: one or two objects (50/50), seen combos only, with the
    hard negatives of :func:`train_negatives` and the paraphrases of :func:`other_captions`
    (drawn from their own RNG stream, so scene, caption and negatives are those of version 2)."""
    rng = sample_rng(seed, "train", index)
    scene = sample_scene(rng, num_objects=1 + (rng.random() < 0.5), image_size=image_size)
    caption = describe(scene, rng)
    negatives = train_negatives(scene, caption, rng)
    return TrainSample(
        key=sample_key(index),
        scene=scene,
        caption=caption.render(),
        neg_captions=tuple(text for _, text in negatives),
        neg_kinds=tuple(kind for kind, _ in negatives),
        captions=tuple(other_captions(scene, caption.render(),
                                      sample_rng(seed, "train-captions", index))),
    )
