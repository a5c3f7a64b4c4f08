"""SugarCrepe and SugarCrepe++ scoring (vlp.eval.sugarcrepe) on hand-made official-format files.

The model is a lookup table: an image's id is its red value, a caption's vector is chosen per
string, so every similarity — and every right answer — is fixed by the test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlp.eval.sugarcrepe import accuracy_metrics, evaluate_sugarcrepe, read_sugarcrepe

S = 1 / math.sqrt(2)


class TableModel(torch.nn.Module):
    """Images: row `id` of `images`; texts: row `index in vocab` of `texts`."""

    def __init__(self, images: list[list[float]], texts: dict[str, list[float]]):
        super().__init__()
        self.images = torch.tensor(images)
        self.vocab = list(texts)
        self.texts = torch.tensor(list(texts.values()))

    def encode_image(self, ids: torch.Tensor) -> torch.Tensor:
        return self.images[ids]

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.texts[ids]

    def tokenizer(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([self.vocab.index(t) for t in texts])


def red_value(image: Image.Image) -> torch.Tensor:
    return torch.tensor(image.getpixel((0, 0))[0])


def write_images(folder: Path, ids: list[int]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in ids:
        Image.new("RGB", (4, 4), (i, 0, 0)).save(folder / f"{i}.png")


def item(image: int, caption: str, negative: str, caption2: str | None = None) -> dict:
    out = {"filename": f"{image}.png", "caption": caption, "negative_caption": negative}
    return out if caption2 is None else {**out, "caption2": caption2}


def write_subset(root: Path, subset: str, items: list[dict], *, as_list: bool = False) -> None:
    data = items if as_list else {str(100 + i): it for i, it in enumerate(items)}
    (root / f"{subset}.json").write_text(json.dumps(data))


# Image 0 looks along e0. "right" captions point along e0, "wrong" ones along e1; "tie" and
# "tie2" are different strings with the same vector.
TEXTS = {
    "right": [1.0, 0.0, 0.0],
    "wrong": [0.0, 1.0, 0.0],
    "tie": [S, S, 0.0],
    "tie2": [S, S, 0.0],
}


@pytest.fixture
def sugarcrepe_root(tmp_path):
    root = tmp_path / "sugarcrepe"
    write_images(root / "images", [0])
    write_subset(root, "replace_obj", [item(0, "right", "wrong"), item(0, "right", "tie"),
                                       item(0, "tie", "tie2")])
    write_subset(root, "replace_att", [item(0, "right", "wrong")])
    write_subset(root, "swap_obj", [item(0, "wrong", "right")])
    return root


def evaluate(root: Path, texts: dict[str, list[float]], **kwargs):
    model = TableModel([[1.0, 0.0, 0.0]], texts)
    return evaluate_sugarcrepe(model, model.tokenizer, red_value, root, batch_size=2,
                               progress=False, **kwargs)


def test_item_is_right_only_when_caption_beats_negative_and_ties_are_wrong(sugarcrepe_root):
    result = evaluate(sugarcrepe_root, TEXTS)

    assert result.metrics["replace_obj"] == pytest.approx(2 / 3)  # right, right, tie
    assert result.metrics["replace_att"] == 1.0
    assert result.metrics["swap_obj"] == 0.0


def test_groups_pool_items_but_mean_weighs_subsets_equally(sugarcrepe_root):
    result = evaluate(sugarcrepe_root, TEXTS)

    assert result.metrics["replace"] == pytest.approx((2 + 1) / (3 + 1))
    assert result.metrics["swap"] == 0.0
    assert "add" not in result.metrics
    assert result.metrics["mean"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert result.details["counts"] == {"replace_obj": 3, "replace_att": 1, "swap_obj": 1}


def test_missing_subsets_are_skipped_with_a_note(sugarcrepe_root):
    result = evaluate(sugarcrepe_root, TEXTS)

    skipped = {"replace_rel", "swap_att", "add_obj", "add_att"}
    assert skipped.isdisjoint(result.metrics)
    assert sum(any(s in note for s in skipped) for note in result.notes) == 4


def test_accuracy_metrics_weighting_by_hand():
    correct = {"add_obj": torch.tensor([True] * 9 + [False]), "add_att": torch.tensor([False])}

    metrics = accuracy_metrics(correct)

    assert metrics == pytest.approx({"add_obj": 0.9, "add_att": 0.0, "add": 9 / 11,
                                     "mean": 0.45})


# SugarCrepe++ (image e0): p1, p2 true captions, n the negative. Expected by hand:
#   case  cos(i,p1) cos(i,p2) cos(i,n)  cos(p1,p2) cos(p1,n) cos(p2,n)   SC  ITT  TOT
#   1     1         1         0         1          0         0           yes yes  yes
#   2     1         0         .71       0          .71       0           yes no   no
#   3     0         0         1         1          0         0           no  no   yes
#   4     1         0         0         0          0         0 (ties)    yes no   no
PP_TEXTS = {
    "1 p1": [1.0, 0.0, 0.0], "1 p2": [1.0, 0.0, 0.0], "1 n": [0.0, 1.0, 0.0],
    "2 p1": [1.0, 0.0, 0.0], "2 p2": [0.0, 0.0, 1.0], "2 n": [S, S, 0.0],
    "3 p1": [0.0, 1.0, 0.0], "3 p2": [0.0, 1.0, 0.0], "3 n": [1.0, 0.0, 0.0],
    "4 p1": [1.0, 0.0, 0.0], "4 p2": [0.0, 1.0, 0.0], "4 n": [0.0, 0.0, 1.0],
}


@pytest.fixture
def pp_root(tmp_path):
    root = tmp_path / "scpp"
    write_images(root / "images", [0])
    items = [item(0, f"{k} p1", f"{k} n", f"{k} p2") for k in (1, 2, 3, 4)]
    write_subset(root, "swap_att", items, as_list=True)  # SugarCrepe++ files are lists
    return root


def test_sugarcrepe_pp_itt_needs_both_positives_to_beat_the_negative(pp_root):
    result = evaluate(pp_root, PP_TEXTS)

    assert result.metrics["swap_att"] == 0.75
    assert result.metrics["swap_att_itt"] == 0.25
    assert result.metrics["swap_itt"] == 0.25


def test_sugarcrepe_pp_tot_compares_the_positives_with_each_other(pp_root):
    result = evaluate(pp_root, PP_TEXTS)

    assert result.metrics["swap_att_tot"] == 0.5
    assert result.details["sugarcrepe_pp_subsets"] == ["swap_att"]


def test_items_without_caption2_get_no_pp_metrics(sugarcrepe_root):
    result = evaluate(sugarcrepe_root, TEXTS)

    assert not any(k.endswith(("_itt", "_tot")) for k in result.metrics)


def test_image_root_option_points_at_a_separate_image_folder(tmp_path):
    root, images = tmp_path / "json", tmp_path / "coco" / "val2017"
    root.mkdir()
    write_images(images, [0])
    write_subset(root, "add_obj", [item(0, "right", "wrong")])

    result = evaluate(root, TEXTS, image_root=images)

    assert result.metrics["add_obj"] == 1.0


def test_bad_item_raises_value_error_naming_file_and_key(tmp_path):
    root = tmp_path / "bad"
    write_images(root / "images", [0])
    (root / "replace_rel.json").write_text(json.dumps({"7": {"filename": "0.png",
                                                             "caption": "right"}}))

    with pytest.raises(ValueError, match=r"replace_rel\.json item '7'.*negative_caption"):
        read_sugarcrepe(root)


def test_invalid_json_raises_value_error_naming_the_file(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "swap_obj.json").write_text("{not json")

    with pytest.raises(ValueError, match=r"swap_obj\.json: not valid JSON"):
        read_sugarcrepe(root)


def test_missing_image_raises_value_error_naming_the_item(tmp_path):
    root = tmp_path / "bad"
    (root / "images").mkdir(parents=True)
    write_subset(root, "add_att", [item(5, "right", "wrong")])

    with pytest.raises(ValueError, match=r"add_att\.json item '100'.*5\.png not found"):
        read_sugarcrepe(root)


def test_root_without_any_subset_raises(tmp_path):
    with pytest.raises(ValueError, match="no SugarCrepe subset files"):
        read_sugarcrepe(tmp_path)


def test_early_release_entity_file_names_are_read_as_object_subsets(tmp_path):
    root = tmp_path / "old"
    write_images(root / "images", [0])
    write_subset(root, "swap_ent", [item(0, "right", "wrong")])

    data, _ = read_sugarcrepe(root)

    assert list(data) == ["swap_obj"]
