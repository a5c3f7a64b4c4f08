"""SugarCrepe and SugarCrepe++: does the image prefer its caption to a hard negative?

Data (docs/design.md §5), as released by RAIVNLab/sugar-crepe: one JSON per subset,
`{subset}.json = {id: {filename, caption, negative_caption}}`, images under an image root (COCO
val2017 for the real benchmark, `images/` beside the JSON files for ShapesWorld). SugarCrepe++
(Dumpala et al., 2024) items add `caption2`, a second true caption worded differently; its JSON
files are lists of items rather than dicts, and both forms are read.

Scoring, as the official `main_eval.py`: an item is right only if
cos(image, caption) > cos(image, negative_caption), so ties are wrong. Groups (Replace, Swap,
Add) pool their subsets' items (sample-weighted, as the paper's group averages); `mean` is the
unweighted mean over the subsets evaluated. SugarCrepe++, as its `VLMs/test_*.py` scripts:
ITT (image-to-text) is right when both true captions beat the negative for the image; TOT
(text only) when cos(p1, p2) > cos(p1, n) and cos(p1, p2) > cos(p2, n).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlp.eval.embedding import ImageRef, TextEmbeddings, embed_images, embed_texts
from vlp.eval.results import BenchmarkResult
from vlp.eval.zeroshot import Device, DualEncoder, Preprocess, Tokenizer

SUBSETS: tuple[str, ...] = (
    "replace_obj", "replace_att", "replace_rel", "swap_obj", "swap_att", "add_obj", "add_att",
)
GROUPS: dict[str, tuple[str, ...]] = {
    "replace": ("replace_obj", "replace_att", "replace_rel"),
    "swap": ("swap_obj", "swap_att"),
    "add": ("add_obj", "add_att"),
}
_REQUIRED_FIELDS = ("filename", "caption", "negative_caption")


@dataclass(frozen=True)
class SugarCrepeItem:
    """One test: an image, its caption, a hard negative and, for SugarCrepe++, a paraphrase."""

    key: str
    image: Path
    caption: str
    negative: str
    caption2: str | None = None


def read_subset(path: str | Path, image_root: str | Path) -> list[SugarCrepeItem]:
    """Items of one subset file; a malformed item or a missing image raises a ValueError naming
    the file and the item's key."""
    path, image_root = Path(path), Path(image_root)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if isinstance(raw, list):
        entries = [(str(i), item) for i, item in enumerate(raw)]
    elif isinstance(raw, dict):
        entries = [(str(k), item) for k, item in raw.items()]
    else:
        raise ValueError(f"{path}: expected an object {{id: item}} or a list of items")
    items = [_item(path, image_root, key, entry) for key, entry in entries]
    if not items:
        raise ValueError(f"{path}: no items")
    return items


def _item(path: Path, image_root: Path, key: str, entry: Any) -> SugarCrepeItem:
    where = f"{path} item {key!r}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object with {', '.join(_REQUIRED_FIELDS)}")
    for name in _REQUIRED_FIELDS:
        if not isinstance(entry.get(name), str) or not entry[name].strip():
            raise ValueError(f"{where}: field {name!r} missing or not a non-empty string")
    caption2 = entry.get("caption2")
    if caption2 is not None and (not isinstance(caption2, str) or not caption2.strip()):
        raise ValueError(f"{where}: field 'caption2' must be a non-empty string")
    image = image_root / entry["filename"]
    if not image.is_file():
        raise ValueError(f"{where}: image {image} not found")
    return SugarCrepeItem(key, image, entry["caption"], entry["negative_caption"], caption2)


def read_sugarcrepe(
    root: str | Path,
    *,
    image_root: str | Path | None = None,
    subsets: Sequence[str] = SUBSETS,
) -> tuple[dict[str, list[SugarCrepeItem]], list[str]]:
    """`{subset: items}` for each `{subset}.json` under `root`, and notes on subsets skipped
    because their file is absent; images resolve against `image_root` (default `root/images`)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"SugarCrepe root {root} is not a directory")
    unknown = [s for s in subsets if s not in SUBSETS]
    if unknown:
        raise ValueError(f"unknown SugarCrepe subsets {unknown}; known: {list(SUBSETS)}")
    image_root = Path(image_root) if image_root is not None else root / "images"
    found, notes = {}, []
    for subset in subsets:
        # early releases of SugarCrepe named the object subsets *_ent ("entity")
        candidates = [root / f"{subset}.json", root / f"{subset.replace('_obj', '_ent')}.json"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is not None:
            found[subset] = read_subset(path, image_root)
        else:
            notes.append(f"subset {subset} skipped: {candidates[0]} not found")
    if not found:
        raise ValueError(f"no SugarCrepe subset files ({', '.join(subsets)}.json) in {root}")
    return found, notes


def accuracy_metrics(correct: dict[str, torch.Tensor], *, suffix: str = "") -> dict[str, float]:
    """Per-subset accuracy, sample-weighted group accuracy over the subsets present, and the
    unweighted mean over subsets; `correct[subset]` is a bool tensor, one entry per item."""
    metrics = {f"{s}{suffix}": _mean(c) for s, c in correct.items()}
    for group, members in GROUPS.items():
        present = [correct[s] for s in members if s in correct]
        if present:
            metrics[f"{group}{suffix}"] = _mean(torch.cat(present))
    metrics[f"mean{suffix}"] = sum(_mean(c) for c in correct.values()) / len(correct)
    return metrics


def _mean(correct: torch.Tensor) -> float:
    return correct.float().mean().item()


@dataclass(frozen=True)
class ItemScores:
    """Cosine similarities of one subset's items (each a (N,) tensor)."""

    caption: torch.Tensor
    negative: torch.Tensor
    caption2: torch.Tensor | None = None
    """cos(image, caption2); None when the items have no paraphrase."""
    text_pp: torch.Tensor | None = None
    """cos(caption, caption2)."""
    text_pn: torch.Tensor | None = None
    """cos(caption, negative)."""
    text_p2n: torch.Tensor | None = None
    """cos(caption2, negative)."""

    def sugarcrepe(self) -> torch.Tensor:
        """Right iff the caption beats the negative (strictly: ties are wrong)."""
        return self.caption > self.negative

    def itt(self) -> torch.Tensor:
        """SugarCrepe++ image-to-text: both true captions beat the negative for the image."""
        assert self.caption2 is not None
        return (self.caption > self.negative) & (self.caption2 > self.negative)

    def tot(self) -> torch.Tensor:
        """SugarCrepe++ text only: the paraphrases are closer to each other than either is to
        the negative."""
        assert self.text_pp is not None and self.text_pn is not None and self.text_p2n is not None
        return (self.text_pp > self.text_pn) & (self.text_pp > self.text_p2n)


def score_items(
    items: Sequence[SugarCrepeItem], image_features: torch.Tensor, texts: TextEmbeddings
) -> ItemScores:
    """Similarities for `items` given their images' embeddings (N, D) and a text lookup."""
    caption = texts([i.caption for i in items])
    negative = texts([i.negative for i in items])
    scores = {"caption": _rowdot(image_features, caption),
              "negative": _rowdot(image_features, negative)}
    if all(i.caption2 is not None for i in items):
        caption2 = texts([i.caption2 for i in items])
        scores |= {"caption2": _rowdot(image_features, caption2),
                   "text_pp": _rowdot(caption, caption2),
                   "text_pn": _rowdot(caption, negative),
                   "text_p2n": _rowdot(caption2, negative)}
    return ItemScores(**scores)


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(dim=-1)


def evaluate_sugarcrepe(
    model: DualEncoder,
    tokenizer: Tokenizer,
    preprocess: Preprocess,
    root: str | Path,
    *,
    image_root: str | Path | None = None,
    subsets: Sequence[str] = SUBSETS,
    device: Device = "cpu",
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
) -> BenchmarkResult:
    """SugarCrepe accuracies (per subset, per group, mean) and, for subsets whose items all
    carry `caption2`, SugarCrepe++ `*_itt` and `*_tot` accuracies."""
    data, notes = read_sugarcrepe(root, image_root=image_root, subsets=subsets)
    all_items = [item for items in data.values() for item in items]
    image_features = embed_images(
        model, preprocess, [ImageRef(i.image) for i in all_items], device=device,
        batch_size=batch_size, num_workers=num_workers, progress=progress, desc="sugarcrepe images",
    )
    texts = [t for i in all_items for t in (i.caption, i.negative, i.caption2) if t is not None]
    text_embeddings = embed_texts(model, tokenizer, texts, device=device, batch_size=batch_size,
                                  progress=progress, desc="sugarcrepe captions")
    correct, itt, tot, start = {}, {}, {}, 0
    for subset, items in data.items():
        scores = score_items(items, image_features[start: start + len(items)], text_embeddings)
        start += len(items)
        correct[subset] = scores.sugarcrepe()
        if scores.caption2 is not None:
            itt[subset], tot[subset] = scores.itt(), scores.tot()
        elif any(i.caption2 is not None for i in items):
            notes.append(f"subset {subset}: SugarCrepe++ skipped, only some items have caption2")
    metrics = accuracy_metrics(correct)
    if itt:
        metrics |= accuracy_metrics(itt, suffix="_itt") | accuracy_metrics(tot, suffix="_tot")
    details = {"counts": {s: len(items) for s, items in data.items()},
               "sugarcrepe_pp_subsets": list(itt)}
    return BenchmarkResult(metrics, details, notes)
