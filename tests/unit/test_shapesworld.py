"""ShapesWorld: exact captions and hard negatives, held-out pairs, determinism, file formats."""

import json
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from vlp.data.shapesworld import (
    CLASSNAMES,
    HELD_OUT_COMBOS,
    NEGATIVE_KINDS,
    RELATIONS,
    SEEN_COMBOS,
    TRAIN_NEGATIVE_FALLBACK,
    TRAIN_NEGATIVE_KINDS,
    ZEROSHOT_TEMPLATES,
    Caption,
    Mention,
    Scene,
    ShapeObject,
    describe,
    describes,
    hard_negative,
    hard_negatives,
    make_train_sample,
    paraphrases,
    parse_caption,
    render_image,
    sample_rng,
    sample_scene,
    train_negatives,
)
from vlp.data.shapesworld_writer import SUGARCREPE_SUBSETS, write_shapesworld

TINY = {"num_train": 200, "num_eval": 60, "samples_per_shard": 50, "progress": False}
NUM_SAMPLES = 600
RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapesworld")
    write_shapesworld(out, seed=0, num_workers=2, **TINY)
    return out


def read_shards(paths) -> list[dict]:
    return list(wds.WebDataset([str(p) for p in paths], shardshuffle=False).decode("pil"))


def file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def two_object_scene(a: ShapeObject, b: ShapeObject, relation: str = "left of") -> Scene:
    return Scene((a, b), relation, ((10, 32), (50, 32)), (5, 5), ((255, 0, 0), (0, 0, 255)))


# --------------------------------------------------------------------------- captions


def test_train_captions_describe_their_scene():
    for index in range(NUM_SAMPLES):
        sample = make_train_sample(index, seed=0)
        assert describes(sample.scene, sample.caption), sample.caption


def test_train_samples_carry_two_to_four_other_true_captions():
    counts = Counter()
    for index in range(NUM_SAMPLES):
        sample = make_train_sample(index, seed=0)
        assert 2 <= len(sample.captions) <= 4, sample.captions
        assert len(set(sample.captions)) == len(sample.captions)
        assert sample.caption not in sample.captions
        for text in sample.captions:
            assert describes(sample.scene, text), text
        counts[len(sample.captions)] += 1
    assert set(counts) == {2, 3, 4}


def test_other_captions_leave_scene_caption_and_negatives_as_before():
    """The version-2 sample (scene, caption, negatives from the `train` stream alone) is
    unchanged: the paraphrases come from their own RNG stream."""
    for index in range(50):
        rng = sample_rng(0, "train", index)
        scene = sample_scene(rng, num_objects=1 + (rng.random() < 0.5), image_size=64)
        caption = describe(scene, rng)
        negatives = train_negatives(scene, caption, rng)
        sample = make_train_sample(index, seed=0)
        assert (sample.scene, sample.caption) == (scene, caption.render())
        assert list(sample.neg_captions) == [text for _, text in negatives]


def test_hard_negatives_never_describe_their_scene():
    for index in range(NUM_SAMPLES):
        sample = make_train_sample(index, seed=0)
        assert sample.neg_captions and len(sample.neg_captions) == len(sample.neg_kinds)
        for kind, negative in zip(sample.neg_kinds, sample.neg_captions, strict=True):
            assert negative != sample.caption
            assert not describes(sample.scene, negative), (kind, sample.caption, negative)


def test_every_negative_kind_occurs_in_the_evaluation_sets():
    scenes = [sample_scene(sample_rng(0, "kinds", i), num_objects=1 + i % 2) for i in range(200)]
    kinds = {kind for i, scene in enumerate(scenes)
             for kind, _ in hard_negatives(scene, describe(scene, sample_rng(1, "kinds", i)),
                                           sample_rng(2, "kinds", i))}
    assert kinds == set(NEGATIVE_KINDS)


def test_training_captions_carry_the_negatives_of_their_object_count():
    """In TRAIN_NEGATIVE_KINDS order, each kind or, for a swap that does not apply or repeats
    an earlier negative, its fallback; all distinct."""
    for index in range(NUM_SAMPLES):
        sample = make_train_sample(index, seed=0)
        intended = TRAIN_NEGATIVE_KINDS[len(sample.scene.objects)]
        assert len(sample.neg_kinds) == len(intended)
        for kind, wanted in zip(sample.neg_kinds, intended, strict=True):
            assert kind in (wanted, TRAIN_NEGATIVE_FALLBACK.get(wanted))
        if len(sample.scene.objects) == 2 and sample.neg_kinds[0] != "swap_att":
            a, b = sample.scene.objects
            assert a.color == b.color
        assert len(set(sample.neg_captions)) == len(intended)


def test_negclip_batches_contain_each_negative_kind_at_the_intended_rate():
    """What negclip's recipe draws (data.num_negatives of each json's neg_captions, as the
    pipeline picks them): every two-object caption comes with a swap of objects and a replaced
    relation, and almost every one (unless its two colours are equal) with swapped colours."""
    from vlp.config import load_config
    from vlp.data.pipeline import pick_negatives

    k = load_config(RECIPES / "shapesworld-tiny-negclip.yaml").data.num_negatives
    assert k == 3
    rng = __import__("random").Random(0)
    per_caption = []
    for index in range(512):
        sample = make_train_sample(index, seed=0)
        kinds = dict(zip(sample.neg_captions, sample.neg_kinds, strict=True))
        picked = pick_negatives({"json": json.dumps(sample.metadata())}, k, rng)
        per_caption.append((len(sample.scene.objects), Counter(kinds[t] for t in picked)))
    two = [c for n, c in per_caption if n == 2]
    one = [c for n, c in per_caption if n == 1]
    assert 0.4 < len(two) / len(per_caption) < 0.6
    assert all(c["replace_rel"] == 1 and sum(c.values()) == k for c in two)
    assert sum(c["swap_obj"] for c in two) / len(two) > 0.8  # not for objects of one shape
    assert sum(c["swap_att"] for c in two) / len(two) > 0.9  # not for equal colours and sizes
    assert all(c == Counter(TRAIN_NEGATIVE_KINDS[1]) for c in one)


def test_two_object_negatives_change_what_their_kind_names():
    for index in range(NUM_SAMPLES):
        sample = make_train_sample(index, seed=0)
        truth = parse_caption(sample.caption)
        for kind, negative in zip(sample.neg_kinds, sample.neg_captions, strict=True):
            parsed = parse_caption(negative)
            if kind == "shuffle":
                continue
            assert parsed is not None, negative
            if kind == "replace_rel":
                assert parsed.mentions == truth.mentions and parsed.relation != truth.relation
            elif kind == "swap_obj":
                assert parsed.mentions == truth.mentions[::-1]
            elif kind == "add_obj":
                assert len(parsed.mentions) == len(truth.mentions) + 1
            elif kind == "replace_obj":
                changed = [a != b for a, b in zip(parsed.mentions, truth.mentions, strict=True)]
                assert sum(changed) == 1


def test_paraphrases_are_distinct_and_true():
    rng = sample_rng(0, "test", 0)
    for _ in range(50):
        scene = sample_scene(rng, num_objects=2)
        texts = paraphrases(scene, rng, 5)
        assert len(texts) == len(set(texts)) == 5
        assert all(describes(scene, t) for t in texts)


def test_caption_without_size_matches_either_size():
    scene = sample_scene(sample_rng(0, "test", 1), num_objects=1)
    obj = scene.objects[0]
    assert describes(scene, f"a photo of a {obj.color} {obj.shape}")
    other = "small" if obj.size == "large" else "large"
    assert not describes(scene, f"a photo of a {other} {obj.color} {obj.shape}")


def test_describes_reads_relations_in_both_directions():
    scene = two_object_scene(ShapeObject("red", "circle", "small"),
                             ShapeObject("blue", "star", "large"), "left of")
    assert describes(scene, "a red circle to the left of a large blue star")
    assert describes(scene, "there is a blue star right of a small red circle")
    assert describes(scene, "the red circle and the blue star")
    for false in ("a red circle right of a blue star", "a blue star left of a red circle",
                  "a red circle above a blue star", "a red circle", "a large red circle left of "
                  "a blue star", "a red circle left of a blue star and a green square"):
        assert not describes(scene, false), false


def test_describes_rejects_text_outside_the_grammar():
    scene = sample_scene(sample_rng(0, "test", 2), num_objects=1)
    obj = scene.objects[0]
    for text in ("", "red", f"{obj.color} {obj.shape} a", f"a {obj.color} {obj.shape} is"):
        assert not describes(scene, text)


def test_zeroshot_prompts_parse_to_their_class():
    for template in ZEROSHOT_TEMPLATES:
        for name in CLASSNAMES:
            parsed = parse_caption(template.format(c=name))
            assert parsed is not None and len(parsed.mentions) == 1
            mention = parsed.mentions[0]
            assert f"{mention.color} {mention.shape}" == name and mention.size is None


def test_swap_att_is_skipped_when_colours_and_sizes_are_equal():
    scene = two_object_scene(ShapeObject("red", "circle", "small"),
                             ShapeObject("red", "star", "small"))
    caption = Caption((Mention("red", "circle", "small"), Mention("red", "star", "small")),
                      "left of")
    assert hard_negative("swap_att", scene, caption, sample_rng(0, "test", 3)) is None


def test_relation_negatives_skip_identical_objects_when_reversing_is_a_paraphrase():
    twin = ShapeObject("blue", "square", "large")
    scene = two_object_scene(twin, twin)
    caption = Caption((Mention("blue", "square"), Mention("blue", "square")), "left of")
    assert describes(scene, "a blue square right of a blue square")
    for seed in range(20):
        negative = hard_negative("replace_rel", scene, caption, sample_rng(seed, "test", 4))
        assert negative is not None and "right" not in negative
    assert hard_negative("swap_obj", scene, caption, sample_rng(0, "test", 4)) is None


# --------------------------------------------------------------------------- scenes


def test_two_objects_never_overlap_and_relation_is_unambiguous():
    rng = sample_rng(0, "test", 5)
    for image_size in (32, 64, 224):
        for _ in range(300):
            scene = sample_scene(rng, num_objects=2, image_size=image_size)
            axis = 0 if scene.relation in ("left of", "right of") else 1
            (a, b), (ca, cb) = scene.boxes, scene.centers
            gap = max(b[axis] - (a[axis] + a[axis + 2]), a[axis] - (b[axis] + b[axis + 2]))
            assert gap >= 1, scene
            along, across = cb[axis] - ca[axis], cb[1 - axis] - ca[1 - axis]
            assert abs(across) <= abs(along) / 4
            assert (along > 0) == (scene.relation in ("left of", "above")), scene
            for x, y, w, h in scene.boxes:
                assert 0 <= x and 0 <= y and x + w <= image_size and y + h <= image_size


def test_render_draws_each_object_in_its_colour():
    scene = sample_scene(sample_rng(0, "test", 6), num_objects=2)
    image = render_image(scene, 64)
    assert image.size == (64, 64) and image.mode == "RGB"
    for (x, y), rgb in zip(scene.centers, scene.rgbs, strict=True):
        assert image.getpixel((x, y)) == rgb
    assert image.getpixel((0, 0)) == (0, 0, 0)


def test_image_size_below_minimum_is_rejected():
    with pytest.raises(ValueError, match="image_size"):
        sample_scene(sample_rng(0, "test", 7), num_objects=1, image_size=16)


def test_held_out_combos_keep_every_colour_and_shape_in_training():
    colors = {c for c, _ in SEEN_COMBOS}
    shapes = {s for _, s in SEEN_COMBOS}
    assert all(c in colors and s in shapes for c, s in HELD_OUT_COMBOS)
    assert not set(HELD_OUT_COMBOS) & set(SEEN_COMBOS)


# --------------------------------------------------------------------------- files


def test_same_seed_gives_identical_bytes_whatever_the_worker_count(world, tmp_path):
    write_shapesworld(tmp_path, seed=0, num_workers=1, **TINY)
    assert file_bytes(tmp_path) == file_bytes(world)


def test_different_seed_gives_different_data(world, tmp_path):
    write_shapesworld(tmp_path, seed=1, **TINY)
    for name in ("train/shard-000000.tar", "zeroshot/test/0.tar", "sugarcrepe/replace_att.json"):
        assert (tmp_path / name).read_bytes() != (world / name).read_bytes()


def test_train_shards_read_back_with_plain_webdataset(world):
    samples = read_shards(sorted((world / "train").glob("shard-*.tar")))
    assert len(samples) == TINY["num_train"]
    assert len({s["__key__"] for s in samples}) == len(samples)
    sizes = Counter()
    for sample in samples:
        assert isinstance(sample["png"], Image.Image) and sample["png"].size == (64, 64)
        meta = sample["json"]
        assert sample["txt"] and meta["caption"] == sample["txt"]
        assert isinstance(meta["neg_captions"], list) and meta["neg_captions"]
        assert len(meta["neg_kinds"]) == len(meta["neg_captions"])
        scene = Scene.from_json(meta)
        assert describes(scene, sample["txt"])
        assert not any(describes(scene, n) for n in meta["neg_captions"])
        assert 2 <= len(meta["captions"]) <= 4
        assert all(describes(scene, c) for c in meta["captions"])
        sizes[len(meta["objects"])] += 1
    assert sizes[1] > 0.3 * len(samples) and sizes[2] > 0.3 * len(samples)


def test_held_out_combos_never_appear_in_training_shards(world):
    samples = read_shards(sorted((world / "train").glob("shard-*.tar")))
    combos = {(o["color"], o["shape"]) for s in samples for o in s["json"]["objects"]}
    assert combos and not combos & set(HELD_OUT_COMBOS)


@pytest.mark.parametrize("name, combos", [("zeroshot", SEEN_COMBOS),
                                          ("zeroshot_heldout", HELD_OUT_COMBOS)])
def test_zeroshot_sets_follow_clip_benchmark_layout(world, name, combos):
    root = world / name
    classnames = (root / "classnames.txt").read_text().splitlines()
    templates = (root / "zeroshot_classification_templates.txt").read_text().splitlines()
    assert classnames == list(CLASSNAMES) and all("{c}" in t for t in templates)
    nshards = int((root / "test" / "nshards.txt").read_text())
    samples = read_shards(root / "test" / f"{i}.tar" for i in range(nshards))
    assert len(samples) == TINY["num_eval"]
    allowed = {CLASSNAMES.index(f"{c} {s}") for c, s in combos}
    labels = {s["cls"] for s in samples}
    assert labels <= allowed and all(0 <= c < len(classnames) for c in labels)
    assert all(isinstance(s["png"], Image.Image) for s in samples)


def test_retrieval_set_follows_clip_benchmark_layout(world):
    root = world / "retrieval"
    assert (root / "dataset_type.txt").read_text().strip() == "retrieval"
    nshards = int((root / "test" / "nshards.txt").read_text())
    samples = read_shards(root / "test" / f"{i}.tar" for i in range(nshards))
    assert len(samples) == TINY["num_eval"]
    for sample in samples:
        captions = sample["txt"].splitlines()
        assert len(captions) >= 3 and len(set(captions)) == len(captions)
        assert all(parse_caption(c) is not None for c in captions)


def test_sugarcrepe_subsets_load_and_negatives_differ(world):
    root = world / "sugarcrepe"
    for subset in SUGARCREPE_SUBSETS:
        items = json.loads((root / f"{subset}.json").read_text())
        assert items and sorted(items, key=int) == [str(i) for i in range(len(items))]
        for item in items.values():
            assert (root / "images" / item["filename"]).is_file()
            assert item["negative_caption"] not in (item["caption"], item["caption2"])
            assert item["caption"] != item["caption2"]
            assert parse_caption(item["caption"]) is not None


def test_aro_files_load_with_valid_boxes_and_swapped_captions(world):
    root = world / "aro"
    relation = json.loads((root / "vg_relation.json").read_text())
    attribution = json.loads((root / "vg_attribution.json").read_text())
    assert len(relation) == len(attribution) == TINY["num_eval"]
    for item in relation + attribution:
        image = Image.open(root / "images" / item["image_path"])
        assert item["true_caption"] != item["false_caption"]
        assert 0 <= item["bbox_x"] and item["bbox_x"] + item["bbox_w"] <= image.width
        assert 0 <= item["bbox_y"] and item["bbox_y"] + item["bbox_h"] <= image.height
    for item in relation:
        assert item["relation_name"] in RELATIONS
        assert f" is {item['relation_name']} " in item["true_caption"]
    for item in attribution:
        first, second = item["attributes"]
        assert first != second and item["true_caption"].startswith(f"the {first} ")


def test_manifest_records_counts_and_held_out_combos(world):
    manifest = json.loads((world / "manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["num_train"] == TINY["num_train"]
    assert [tuple(c) for c in manifest["held_out_combos"]] == list(HELD_OUT_COMBOS)
    assert set(manifest["splits"]["sugarcrepe"]["subsets"]) == set(SUGARCREPE_SUBSETS)
    for shard in manifest["splits"]["train"]["shards"]:
        assert (world / shard).is_file()
    assert manifest["counts"]["train"] == TINY["num_train"]


def test_describe_is_deterministic_for_a_seeded_rng():
    scene = sample_scene(sample_rng(3, "test", 8), num_objects=2)
    first = describe(scene, sample_rng(3, "test", 9)).render()
    assert first == describe(scene, sample_rng(3, "test", 9)).render()


def test_a_cache_of_another_generator_format_is_not_reused(monkeypatch, tmp_path):
    """Caches are keyed on SHAPESWORLD_FORMAT (3 added the training `captions`): a set made
    by an earlier format sits in another folder and is regenerated, not read."""
    from vlp.data import cache

    params = {"seed": 0, "num_train": 10}
    current = cache.shapesworld_dir(tmp_path, params)
    monkeypatch.setattr(cache, "SHAPESWORLD_FORMAT", cache.SHAPESWORLD_FORMAT - 1)
    assert cache.shapesworld_dir(tmp_path, params) != current
