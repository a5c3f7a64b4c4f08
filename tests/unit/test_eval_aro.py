"""ARO's VG-Relation and VG-Attribution scoring (vlp.eval.aro) on hand-made official files.

Images hold two regions of different red values; the model reads the red value of the
top-left pixel of what it is given, so an item can only be right if the image was cropped to
its box. Caption vectors are chosen per string, so every expected accuracy is counted by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlp.data.shapesworld import RELATIONS
from vlp.eval.aro import (
    EXCLUDED_RELATIONS,
    evaluate_aro,
    group_accuracies,
    read_aro_file,
    vg_attribution_macro,
    vg_relation_macro,
)

E0, E1 = [1.0, 0.0], [0.0, 1.0]


class TableModel(torch.nn.Module):
    def __init__(self, images: dict[int, list[float]], texts: dict[str, list[float]]):
        super().__init__()
        self.images = images
        self.vocab = list(texts)
        self.texts = torch.tensor(list(texts.values()))

    def encode_image(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.tensor([self.images[int(i)] for i in ids])

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.texts[ids]

    def tokenizer(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([self.vocab.index(t) for t in texts])


def top_left_red(image: Image.Image) -> torch.Tensor:
    return torch.tensor(image.getpixel((0, 0))[0])


# two.png: left half red value 1, right half red value 2. Region 2 looks along e1, region 1
# along e0. "yes" captions point along e1 (right for region 2), "no" along e0.
IMAGES = {1: E0, 2: E1}
TEXTS = {"yes": E1, "no": E0, "same a": E1, "same b": E1}
RIGHT_HALF = {"bbox_x": 10, "bbox_y": 0, "bbox_w": 10, "bbox_h": 10}
WHOLE = {"bbox_x": 0, "bbox_y": 0, "bbox_w": 20, "bbox_h": 10}


def write_image(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (20, 10), (1, 0, 0))
    image.paste((2, 0, 0), (10, 0, 20, 10))
    image.save(folder / "two.png")


def entry(true: str, false: str, *, box: dict = RIGHT_HALF, **group) -> dict:
    return {"image_path": "two.png", **box, "true_caption": true, "false_caption": false,
            **group}


def relation(name: str, right: bool, **kw) -> dict:
    return entry("yes", "no", relation_name=name, **kw) if right else entry(
        "no", "yes", relation_name=name, **kw)


def attribution(pair: list[str], right: bool) -> dict:
    return entry("yes", "no", attributes=pair) if right else entry("no", "yes", attributes=pair)


def write_aro(root: Path, relations: list[dict] | None, attributions: list[dict] | None,
              *, official_names: bool = True) -> Path:
    write_image(root / "images")
    names = (("visual_genome_relation.json", "visual_genome_attribution.json") if official_names
             else ("vg_relation.json", "vg_attribution.json"))
    for name, items in zip(names, (relations, attributions), strict=True):
        if items is not None:
            (root / name).write_text(json.dumps(items))
    return root


def evaluate(root: Path, **kwargs):
    model = TableModel(IMAGES, TEXTS)
    return evaluate_aro(model, model.tokenizer, top_left_red, root, batch_size=3,
                        progress=False, **kwargs)


def test_vg_relation_is_macro_over_relations_without_the_excluded_ones(tmp_path):
    items = ([relation("left of", r) for r in (True, True, True, False)]
             + [relation("above", True)]
             + [relation("next to", False), relation("next to", False)])  # excluded by ARO
    root = write_aro(tmp_path / "aro", items, None)

    result = evaluate(root)

    assert result.metrics["vg_relation"] == pytest.approx((3 / 4 + 1) / 2)
    assert result.metrics["vg_relation_micro"] == pytest.approx(4 / 7)
    assert result.details["vg_relation_excluded"] == ["next to"]
    assert result.details["vg_relation_per_group"]["left of"] == {"accuracy": 0.75, "count": 4}


def test_vg_attribution_averages_only_pairs_with_at_least_25_items(tmp_path):
    items = ([attribution(["red", "blue"], True)] * 25
             + [attribution(["green", "pink"], False)] * 24)
    root = write_aro(tmp_path / "aro", None, items, official_names=False)

    result = evaluate(root)

    assert result.metrics["vg_attribution"] == 1.0  # green_pink has only 24 items
    assert result.metrics["vg_attribution_micro"] == pytest.approx(25 / 49)
    assert result.details["vg_attribution_pairs_averaged"] == 1
    assert any("VG-Relation skipped" in note for note in result.notes)


def test_vg_attribution_macro_is_not_reported_when_no_pair_is_large_enough(tmp_path):
    root = write_aro(tmp_path / "aro", None, [attribution(["red", "blue"], True)] * 3)

    result = evaluate(root)

    assert "vg_attribution" not in result.metrics
    assert result.metrics["vg_attribution_micro"] == 1.0
    assert any(">= 25" in note for note in result.notes)


def test_min_attribute_count_option_changes_the_threshold(tmp_path):
    items = [attribution(["red", "blue"], True)] * 3 + [attribution(["a", "b"], False)] * 2
    root = write_aro(tmp_path / "aro", None, items)

    result = evaluate(root, min_attribute_count=2)

    assert result.metrics["vg_attribution"] == pytest.approx(0.5)


def test_image_is_cropped_to_the_box_before_scoring(tmp_path):
    # Uncropped, the top-left pixel is region 1 (e0) and "yes" (e1) would lose to "no" (e0).
    items = [relation("above", True), relation("below", True, box=WHOLE)]
    root = write_aro(tmp_path / "aro", items, None)

    result = evaluate(root)

    assert result.details["vg_relation_per_group"]["above"]["accuracy"] == 1.0
    assert result.details["vg_relation_per_group"]["below"]["accuracy"] == 0.0


def test_a_tie_between_true_and_false_caption_is_wrong(tmp_path):
    root = write_aro(tmp_path / "aro", [entry("same a", "same b", relation_name="on")], None)

    assert evaluate(root).metrics["vg_relation"] == 0.0


def test_macro_functions_by_hand():
    per_relation = {"on": (0.5, 10), "next to": (0.0, 99), "wearing": (1.0, 1)}
    per_pair = {"red_blue": (0.8, 25), "big_small": (0.0, 24), "old_new": (0.6, 30)}

    assert vg_relation_macro(per_relation) == pytest.approx(0.75)
    assert vg_relation_macro(per_relation, excluded=()) == pytest.approx(0.5)
    assert vg_attribution_macro(per_pair) == pytest.approx(0.7)


def test_group_accuracies_counts_items_per_group():
    correct = torch.tensor([True, False, True, True])

    assert group_accuracies(correct, ["b", "a", "b", "a"]) == {"a": (0.5, 2), "b": (1.0, 2)}


def test_exclusion_list_is_aros_and_leaves_shapesworld_relations_in():
    assert len(EXCLUDED_RELATIONS) == 157
    assert {"next to", "on the side of", "near", "with", "by", "leaning over", "leaving"} <= (
        EXCLUDED_RELATIONS)
    assert {"on", "in", "wearing", "holding"}.isdisjoint(EXCLUDED_RELATIONS)
    assert set(RELATIONS).isdisjoint(EXCLUDED_RELATIONS)


def test_malformed_item_raises_value_error_naming_file_and_index(tmp_path):
    path = tmp_path / "visual_genome_relation.json"
    write_image(tmp_path / "images")
    path.write_text(json.dumps([relation("on", True), {**relation("on", True), "bbox_w": "x"}]))

    with pytest.raises(ValueError, match=r"visual_genome_relation\.json item 1: bbox"):
        read_aro_file(path, tmp_path / "images", kind="relation")


def test_attribution_item_needs_an_attribute_pair(tmp_path):
    path = tmp_path / "vg_attribution.json"
    write_image(tmp_path / "images")
    path.write_text(json.dumps([entry("yes", "no", attributes=["red"])]))

    with pytest.raises(ValueError, match=r"item 0: 'attributes' must be a list of two"):
        read_aro_file(path, tmp_path / "images", kind="attribution")


def test_folder_without_aro_files_raises(tmp_path):
    with pytest.raises(ValueError, match="no ARO files"):
        evaluate(tmp_path)
