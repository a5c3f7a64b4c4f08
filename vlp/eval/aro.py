"""ARO's Visual Genome sets: VG-Relation and VG-Attribution (Yuksekgonul et al., ICLR 2023).

Data (docs/design.md §5), as released with mertyg/vision-language-models-are-bows: a JSON list of
`{image_path, bbox_x, bbox_y, bbox_w, bbox_h, true_caption, false_caption}` items, plus
`relation_name` (VG-Relation) or `attributes` (a pair, VG-Attribution); images under an image
root (`images/` beside the JSON). The official files are `visual_genome_relation.json` and
`visual_genome_attribution.json`; ShapesWorld writes `vg_relation.json` and
`vg_attribution.json`. Either name is read.

Scoring, as the official `evaluate_scores`: the image is cropped to the box; an item is right if
the true caption scores higher than the false one (the official argmax over [false, true] also
counts ties as wrong). VG-Relation is the macro accuracy over relations, leaving out the
relations in `EXCLUDED_RELATIONS`; VG-Attribution the macro accuracy over attribute pairs
(`"{a}_{b}"`) with at least 25 items. Micro accuracies over every item are reported beside them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlp.eval.embedding import ImageRef, embed_images, embed_texts
from vlp.eval.results import BenchmarkResult
from vlp.eval.zeroshot import Device, DualEncoder, Preprocess, Tokenizer

# The relations ARO leaves out of VG-Relation's macro accuracy: relations whose swapped caption
# may still be true (symmetric or spatial ones, "next to") or that are too rare or vague. Copied
# from the `symmetric` list in the official notebook "Replicate ARO! VG-Relation,
# VG-Attribution.ipynb" (github.com/mertyg/vision-language-models-are-bows, commit 42dbb5e, MIT
# licence), which filters `df[~df.Relation.isin(symmetric)]` before averaging. ShapesWorld's
# relations ("left of", "right of", "above", "below") are not in it.
EXCLUDED_RELATIONS: frozenset[str] = frozenset({
    "adjusting", "attached to", "between", "bigger than", "biting", "boarding", "brushing",
    "chewing", "cleaning", "climbing", "close to", "coming from", "coming out of", "contain",
    "crossing", "dragging", "draped over", "drinking", "drinking from", "driving", "driving down",
    "driving on", "eating from", "eating in", "enclosing", "exiting", "facing", "filled with",
    "floating in", "floating on", "flying", "flying above", "flying in", "flying over",
    "flying through", "full of", "going down", "going into", "going through", "grazing in",
    "growing in", "growing on", "guiding", "hanging from", "hanging in", "hanging off",
    "hanging over", "higher than", "holding onto", "hugging", "in between", "jumping off",
    "jumping on", "jumping over", "kept in", "larger than", "leading", "leaning over", "leaving",
    "licking", "longer than", "looking in", "looking into", "looking out", "looking over",
    "looking through", "lying next to", "lying on top of", "making", "mixed with", "mounted on",
    "moving", "on the back of", "on the edge of", "on the front of", "on the other side of",
    "opening", "painted on", "parked at", "parked beside", "parked by", "parked in",
    "parked in front of", "parked near", "parked next to", "perched on", "petting", "piled on",
    "playing", "playing in", "playing on", "playing with", "pouring", "reaching for", "reading",
    "reflected on", "riding on", "running in", "running on", "running through", "seen through",
    "sitting behind", "sitting beside", "sitting by", "sitting in front of", "sitting near",
    "sitting next to", "sitting under", "skiing down", "skiing on", "sleeping in", "sleeping on",
    "smiling at", "sniffing", "splashing", "sprinkled on", "stacked on", "standing against",
    "standing around", "standing behind", "standing beside", "standing in front of",
    "standing near", "standing next to", "staring at", "stuck in", "surrounding", "swimming in",
    "swinging", "talking to", "topped with", "touching", "traveling down", "traveling on", "tying",
    "typing on", "underneath", "wading in", "waiting for", "walking across", "walking by",
    "walking down", "walking next to", "walking through", "working in", "working on", "worn on",
    "wrapped around", "wrapped in", "by", "of", "near", "next to", "with", "beside",
    "on the side of", "around",
})
MIN_ATTRIBUTE_PAIR_COUNT = 25
"""VG-Attribution averages only attribute pairs with at least this many items (official)."""

RELATION_FILES = ("visual_genome_relation.json", "vg_relation.json")
ATTRIBUTION_FILES = ("visual_genome_attribution.json", "vg_attribution.json")
_FIELDS = ("image_path", "bbox_x", "bbox_y", "bbox_w", "bbox_h", "true_caption", "false_caption")


@dataclass(frozen=True)
class AroItem:
    """One test: a cropped image, the true and the false caption, and its group (the relation
    name, or the attribute pair joined by `_`)."""

    image: ImageRef
    true_caption: str
    false_caption: str
    group: str


def read_aro_file(path: str | Path, image_root: str | Path, *, kind: str) -> list[AroItem]:
    """Items of a VG-Relation (`kind="relation"`) or VG-Attribution (`"attribution"`) file; a
    malformed item or a missing image raises a ValueError naming the file and the item index."""
    path, image_root = Path(path), Path(image_root)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{path}: expected a non-empty list of items")
    return [_item(path, image_root, index, entry, kind) for index, entry in enumerate(raw)]


def _item(path: Path, image_root: Path, index: int, entry: Any, kind: str) -> AroItem:
    where = f"{path} item {index}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object")
    missing = [f for f in _FIELDS if f not in entry]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}")
    box = tuple(entry[f"bbox_{c}"] for c in "xywh")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
        raise ValueError(f"{where}: bbox_x/y/w/h must be numbers, got {box}")
    if box[2] <= 0 or box[3] <= 0:
        raise ValueError(f"{where}: bbox_w and bbox_h must be positive, got {box}")
    for name in ("true_caption", "false_caption"):
        if not isinstance(entry[name], str) or not entry[name].strip():
            raise ValueError(f"{where}: {name!r} must be a non-empty string")
    if kind == "relation":
        group = entry.get("relation_name")
        if not isinstance(group, str):
            raise ValueError(f"{where}: 'relation_name' missing or not a string")
    else:
        pair = entry.get("attributes")
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(a, str) for a in pair)):
            raise ValueError(f"{where}: 'attributes' must be a list of two strings")
        group = f"{pair[0]}_{pair[1]}"
    image = image_root / entry["image_path"]
    if not image.is_file():
        raise ValueError(f"{where}: image {image} not found")
    return AroItem(ImageRef(image, box), entry["true_caption"], entry["false_caption"], group)


def group_accuracies(correct: torch.Tensor, groups: Sequence[str]) -> dict[str, tuple[float, int]]:
    """`{group: (accuracy, count)}`, groups in sorted order."""
    out = {}
    for group in sorted(set(groups)):
        mask = torch.tensor([g == group for g in groups])
        out[group] = (correct[mask].float().mean().item(), int(mask.sum()))
    return out


def vg_relation_macro(
    per_relation: dict[str, tuple[float, int]], excluded: Iterable[str] = EXCLUDED_RELATIONS
) -> float:
    """Mean accuracy over the relations not excluded (NaN if none is left)."""
    excluded = set(excluded)
    kept = [acc for relation, (acc, _) in per_relation.items() if relation not in excluded]
    return sum(kept) / len(kept) if kept else float("nan")


def vg_attribution_macro(
    per_pair: dict[str, tuple[float, int]], min_count: int = MIN_ATTRIBUTE_PAIR_COUNT
) -> float:
    """Mean accuracy over attribute pairs with at least `min_count` items (NaN if none)."""
    kept = [acc for acc, count in per_pair.values() if count >= min_count]
    return sum(kept) / len(kept) if kept else float("nan")


def evaluate_aro(
    model: DualEncoder,
    tokenizer: Tokenizer,
    preprocess: Preprocess,
    root: str | Path,
    *,
    image_root: str | Path | None = None,
    min_attribute_count: int = MIN_ATTRIBUTE_PAIR_COUNT,
    device: Device = "cpu",
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
) -> BenchmarkResult:
    """VG-Relation and VG-Attribution on an ARO folder (either may be absent, not both):
    `vg_relation` / `vg_attribution` are the official macro accuracies, `*_micro` the
    accuracy over all items."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"ARO root {root} is not a directory")
    image_root = Path(image_root) if image_root is not None else root / "images"
    metrics: dict[str, float] = {}
    details: dict[str, Any] = {}
    notes: list[str] = []
    for kind, names in (("relation", RELATION_FILES), ("attribution", ATTRIBUTION_FILES)):
        path = next((root / n for n in names if (root / n).is_file()), None)
        if path is None:
            notes.append(f"VG-{kind.title()} skipped: none of {list(names)} in {root}")
            continue
        items = read_aro_file(path, image_root, kind=kind)
        correct = score_aro(model, tokenizer, preprocess, items, device=device,
                            batch_size=batch_size, num_workers=num_workers, progress=progress,
                            desc=f"vg-{kind}")
        per_group = group_accuracies(correct, [i.group for i in items])
        name = f"vg_{kind}"
        if kind == "relation":
            macro = vg_relation_macro(per_group)
            excluded = sorted(set(per_group) & EXCLUDED_RELATIONS)
            details["vg_relation_excluded"] = excluded
            if not excluded:
                notes.append("VG-Relation: none of its relations is on ARO's exclusion list")
        else:
            macro = vg_attribution_macro(per_group, min_attribute_count)
            kept = [g for g, (_, n) in per_group.items() if n >= min_attribute_count]
            details["vg_attribution_pairs_averaged"] = len(kept)
            if not kept:
                largest = max(n for _, n in per_group.values())
                notes.append(f"VG-Attribution: no attribute pair has >= {min_attribute_count} "
                             f"items (largest: {largest}); its macro accuracy is not reported")
        if macro == macro:  # not NaN
            metrics[name] = macro
        metrics[f"{name}_micro"] = correct.float().mean().item()
        details[f"{name}_count"] = len(items)
        details[f"{name}_per_group"] = {g: {"accuracy": a, "count": n}
                                        for g, (a, n) in per_group.items()}
    if not metrics:
        raise ValueError(f"no ARO files in {root}: expected one of "
                         f"{list(RELATION_FILES + ATTRIBUTION_FILES)}")
    return BenchmarkResult(metrics, details, notes)


def score_aro(
    model: DualEncoder,
    tokenizer: Tokenizer,
    preprocess: Preprocess,
    items: Sequence[AroItem],
    *,
    device: Device,
    batch_size: int,
    num_workers: int = 0,
    progress: bool = False,
    desc: str = "aro",
) -> torch.Tensor:
    """(N,) bool: does each item's cropped image score its true caption above the false one."""
    images = embed_images(model, preprocess, [i.image for i in items], device=device,
                          batch_size=batch_size, num_workers=num_workers, progress=progress,
                          desc=f"{desc} images")
    texts = embed_texts(model, tokenizer,
                        [t for i in items for t in (i.true_caption, i.false_caption)],
                        device=device, batch_size=batch_size, progress=progress,
                        desc=f"{desc} captions")
    true = (images * texts([i.true_caption for i in items])).sum(-1)
    false = (images * texts([i.false_caption for i in items])).sum(-1)
    return true > false
