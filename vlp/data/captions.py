"""Which true captions of a sample a batch carries (`data.captions`).

A sample's `txt` member is its caption; its json may add more true captions as `captions:
[...]` (rewrites such as LaCLIP's, sub-captions such as DreamLIP's, ShapesWorld's paraphrases).
The `txt` caption is always one of the positives. Modes:

- `first`: the `txt` caption only; `captions` is not read (the default, as before it existed).
- `sample`: one of {txt} ∪ captions, uniformly, drawn with the sample's RNG each time the
  sample is read (LaCLIP's per-step choice of a rewrite).
- `all`: K = `data.num_positives` positives: txt first, then K−1 of the captions (drawn without
  replacement when there are more); a sample with fewer is padded by repeating its positives,
  and its mask marks the padding False.

Malformed `captions` (not a list of non-empty strings, or one over data.max_caption_chars)
raise ValueError naming the field: the pipeline skips and counts the sample.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

from vlp.data.limits import DEFAULT_LIMITS, SampleLimits


def extra_captions(sample: dict[str, Any], limits: SampleLimits = DEFAULT_LIMITS) -> list[str]:
    """The json's `captions` (stripped); [] without a json member or without the field."""
    if "json" not in sample:
        return []
    try:
        captions = json.loads(sample["json"]).get("captions", [])
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError) as e:
        raise ValueError(f"json member is not a JSON object: {e}") from None
    if not isinstance(captions, list) or not all(
            isinstance(c, str) and c.strip() for c in captions):
        raise ValueError(f"json 'captions' must be a list of non-empty strings, got "
                         f"{json.dumps(captions)[:80]}")
    too_long = [len(c) for c in captions if len(c.strip()) > limits.max_caption_chars]
    if too_long:
        raise ValueError(f"json 'captions' has a caption of {too_long[0]} characters, over "
                         f"data.max_caption_chars={limits.max_caption_chars}")
    return [c.strip() for c in captions]


Positives = dict[str, Any]
"""`text`: the caption the batch's `text` holds; with mode all also `positives` (K strings)
and `mask` (K bools, False = padding)."""


def _first(caption: str, sample: dict[str, Any], rng: random.Random, num_positives: int,
           limits: SampleLimits) -> Positives:
    return {"text": caption}


def _sample(caption: str, sample: dict[str, Any], rng: random.Random, num_positives: int,
            limits: SampleLimits) -> Positives:
    return {"text": rng.choice([caption, *extra_captions(sample, limits)])}


def _all(caption: str, sample: dict[str, Any], rng: random.Random, num_positives: int,
         limits: SampleLimits) -> Positives:
    extras = extra_captions(sample, limits)
    if len(extras) > num_positives - 1:
        extras = rng.sample(extras, num_positives - 1)
    found = [caption, *extras]
    padded = [found[i % len(found)] for i in range(num_positives)]
    return {"text": caption, "positives": padded,
            "mask": [i < len(found) for i in range(num_positives)]}


CAPTION_MODES: dict[str, Callable[..., Positives]] = {"first": _first, "sample": _sample,
                                                      "all": _all}
"""`data.captions` values → how a sample's positives are chosen."""


def choose_positives(mode: str, caption: str, sample: dict[str, Any], *, rng: random.Random,
                     num_positives: int = 0, limits: SampleLimits = DEFAULT_LIMITS) -> Positives:
    """The sample's positives under `mode` (`caption`: its `txt` caption, already read)."""
    return CAPTION_MODES[mode](caption, sample, rng, num_positives, limits)
