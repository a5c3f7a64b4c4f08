"""Write ShapesWorld to disk: training shards and every evaluation set, in the formats of docs/design.md §5.

Layout under ``out_dir``::

    train/shard-000000.tar ...     webdataset: KEY.png, KEY.txt (caption), KEY.json (scene,
                                   neg_captions, neg_kinds)
    zeroshot/                      CLIP_benchmark classification, seen colour-shape pairs
    zeroshot_heldout/              the same classes, held-out pairs only (compositional test)
        classnames.txt  zeroshot_classification_templates.txt  test/{0..N-1}.tar  test/nshards.txt
    retrieval/                     CLIP_benchmark retrieval: dataset_type.txt, test/*.tar with
                                   KEY.png + KEY.txt (one caption per line)
    sugarcrepe/images/*.png, sugarcrepe/{subset}.json
    aro/images/*.png, aro/vg_relation.json, aro/vg_attribution.json
    manifest.json                  written last: counts, seed, version, held-out pairs, paths

Every sample is a pure function of ``(seed, stream, index)``, so the output is byte-identical
for a seed whatever the number of worker processes.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from vlp.data.shapesworld import (
    CLASSNAMES,
    COLORS,
    HELD_OUT_COMBOS,
    INVERSE_RELATION,
    NEGATIVE_KINDS,
    RELATIONS,
    SEEN_COMBOS,
    SHAPES,
    SIZES,
    VERSION,
    ZEROSHOT_TEMPLATES,
    Scene,
    describe,
    encode_png,
    hard_negative,
    make_train_sample,
    paraphrases,
    render_image,
    sample_key,
    sample_rng,
    sample_scene,
)

SUGARCREPE_SUBSETS: tuple[str, ...] = (
    "replace_obj", "replace_att", "replace_rel", "swap_obj", "swap_att", "add_obj", "add_att",
)
NUM_RETRIEVAL_CAPTIONS = 5
_TAR_MTIME = 0  # fixed member time for reproducible bytes; an int keeps headers plain ustar


def write_shapesworld(
    out_dir: str | os.PathLike,
    *,
    num_train: int = 50_000,
    num_eval: int = 2_000,
    seed: int = 0,
    image_size: int = 64,
    samples_per_shard: int = 5_000,
    num_workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Generate ShapesWorld under ``out_dir`` and return its manifest (also ``manifest.json``).

    ``num_eval`` is the size of each evaluation set (zero-shot seen and held-out, retrieval,
    and the scenes behind the SugarCrepe and ARO files). ``num_workers`` processes write the
    training shards (default: all CPUs); the bytes do not depend on it.
    """
    for name, value in (("num_train", num_train), ("num_eval", num_eval),
                        ("samples_per_shard", samples_per_shard)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    workers = num_workers or os.cpu_count() or 1
    common = {"seed": seed, "image_size": image_size}

    train_shards = _write_shards(out / "train", "shard-{:06d}.tar", "train", num_train,
                                 samples_per_shard, common, workers, progress)
    splits = {
        "train": {
            "shards": [str(p.relative_to(out)) for p in train_shards],
            "pattern": f"train/shard-{{000000..{len(train_shards) - 1:06d}}}.tar",
            "num_samples": num_train,
        },
        "zeroshot": _write_zeroshot(out / "zeroshot", "zeroshot", num_eval,
                                    samples_per_shard, common, workers, progress),
        "zeroshot_heldout": _write_zeroshot(out / "zeroshot_heldout", "zeroshot_heldout",
                                            num_eval, samples_per_shard, common, workers,
                                            progress),
        "retrieval": _write_retrieval(out / "retrieval", num_eval, samples_per_shard, common,
                                      progress),
        "sugarcrepe": _write_sugarcrepe(out / "sugarcrepe", num_eval, common, progress),
        "aro": _write_aro(out / "aro", num_eval, common, progress),
    }
    for name, split in splits.items():
        split["path"] = name
    manifest = {
        "name": "shapesworld",
        "version": VERSION,
        "seed": seed,
        "image_size": image_size,
        "image_format": "png",
        "num_train": num_train,
        "num_eval": num_eval,
        "samples_per_shard": samples_per_shard,
        "colors": list(COLORS),
        "shapes": list(SHAPES),
        "sizes": list(SIZES),
        "relations": list(RELATIONS),
        "held_out_combos": [list(c) for c in HELD_OUT_COMBOS],
        "negative_kinds": list(NEGATIVE_KINDS),
        "counts": _counts(splits),
        "splits": splits,
    }
    _write_text(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


# --------------------------------------------------------------------------- tar shards


def _train_record(index: int, seed: int, image_size: int) -> dict:
    sample = make_train_sample(index, seed=seed, image_size=image_size)
    return {
        "__key__": sample.key,
        "png": encode_png(render_image(sample.scene, image_size)),
        "txt": sample.caption.encode(),
        "json": _json_bytes(sample.metadata()),
    }


def _zeroshot_record(index: int, seed: int, image_size: int, stream: str) -> dict:
    combos = SEEN_COMBOS if stream == "zeroshot" else HELD_OUT_COMBOS
    combo = combos[index % len(combos)]
    scene = sample_scene(sample_rng(seed, stream, index), num_objects=1, image_size=image_size,
                         combos=(combo,))
    return {
        "__key__": sample_key(index),
        "png": encode_png(render_image(scene, image_size)),
        "cls": str(CLASSNAMES.index(" ".join(combo))).encode(),
    }


_RECORD_MAKERS: dict[str, Callable[..., dict]] = {
    "train": _train_record,
    "zeroshot": lambda i, seed, image_size: _zeroshot_record(i, seed, image_size, "zeroshot"),
    "zeroshot_heldout": lambda i, seed, image_size: _zeroshot_record(
        i, seed, image_size, "zeroshot_heldout"),
}


def _write_tar(path: Path, records: Iterable[dict]) -> int:
    count = 0
    tmp = path.with_suffix(".tar.tmp")
    with wds.TarWriter(str(tmp), encoder=False, mtime=_TAR_MTIME) as writer:
        for record in records:
            writer.write(record)
            count += 1
    os.replace(tmp, path)
    return count


def _write_shard_job(job: tuple[str, str, int, int, int, int]) -> int:
    path, stream, start, stop, seed, image_size = job
    make = _RECORD_MAKERS[stream]
    return _write_tar(Path(path), (make(i, seed, image_size) for i in range(start, stop)))


def _write_shards(
    folder: Path,
    name_format: str,
    stream: str,
    num_samples: int,
    samples_per_shard: int,
    common: dict,
    workers: int,
    progress: bool,
) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    jobs = []
    for shard, start in enumerate(range(0, num_samples, samples_per_shard)):
        stop = min(start + samples_per_shard, num_samples)
        jobs.append((str(folder / name_format.format(shard)), stream, start, stop,
                     common["seed"], common["image_size"]))
    bar = tqdm(total=num_samples, desc=f"shapesworld {stream}", unit="sample",
               disable=not progress)
    with bar:
        if workers > 1 and len(jobs) > 1:
            with multiprocessing.get_context().Pool(min(workers, len(jobs))) as pool:
                for count in pool.imap_unordered(_write_shard_job, jobs):
                    bar.update(count)
        else:
            for job in jobs:
                bar.update(_write_shard_job(job))
    return [Path(job[0]) for job in jobs]


def _write_nshards(folder: Path, shard_paths: list[Path]) -> None:
    _write_text(folder / "test" / "nshards.txt", f"{len(shard_paths)}\n")


def _write_zeroshot(
    folder: Path, stream: str, num_eval: int, samples_per_shard: int, common: dict,
    workers: int, progress: bool,
) -> dict:
    shards = _write_shards(folder / "test", "{}.tar", stream, num_eval, samples_per_shard,
                           common, workers, progress)
    _write_nshards(folder, shards)
    _write_text(folder / "classnames.txt", "".join(f"{c}\n" for c in CLASSNAMES))
    _write_text(folder / "zeroshot_classification_templates.txt",
                "".join(f"{t}\n" for t in ZEROSHOT_TEMPLATES))
    combos = SEEN_COMBOS if stream == "zeroshot" else HELD_OUT_COMBOS
    return {"num_samples": num_eval, "num_shards": len(shards),
            "num_classes": len(CLASSNAMES),
            "classes_present": sorted({CLASSNAMES.index(" ".join(c)) for c in combos})}


# --------------------------------------------------------------------------- retrieval


def _retrieval_scenes(num_eval: int, seed: int, image_size: int) -> list[tuple[Scene, list[str]]]:
    """Scenes that differ in meaning from one another (so each caption has one right image):
    one object 20% of the time, drawn again while a scene repeats an earlier one."""
    seen: set = set()
    out = []
    for index in range(num_eval):
        for attempt in range(1000):
            rng = sample_rng(seed, f"retrieval/{attempt}", index)
            num_objects = 1 if rng.random() < 0.2 and attempt < 10 else 2
            scene = sample_scene(rng, num_objects=num_objects, image_size=image_size)
            meaning = _meaning(scene)
            if meaning not in seen:
                break
        seen.add(meaning)
        out.append((scene, paraphrases(scene, rng, NUM_RETRIEVAL_CAPTIONS)))
    return out


def _meaning(scene: Scene) -> tuple:
    if scene.relation in ("right of", "below"):
        return (scene.objects[::-1], INVERSE_RELATION[scene.relation])
    return (scene.objects, scene.relation)


def _write_retrieval(
    folder: Path, num_eval: int, samples_per_shard: int, common: dict, progress: bool
) -> dict:
    seed, image_size = common["seed"], common["image_size"]
    scenes = _retrieval_scenes(num_eval, seed, image_size)
    records = [
        {"__key__": sample_key(i), "png": encode_png(render_image(scene, image_size)),
         "txt": "\n".join(captions).encode()}
        for i, (scene, captions) in enumerate(tqdm(scenes, desc="shapesworld retrieval",
                                                   unit="sample", disable=not progress))
    ]
    (folder / "test").mkdir(parents=True, exist_ok=True)
    shards = []
    for shard, start in enumerate(range(0, num_eval, samples_per_shard)):
        shards.append(folder / "test" / f"{shard}.tar")
        _write_tar(shards[-1], records[start: start + samples_per_shard])
    _write_nshards(folder, shards)
    _write_text(folder / "dataset_type.txt", "retrieval\n")
    return {"num_samples": num_eval, "num_shards": len(shards),
            "captions_per_image": NUM_RETRIEVAL_CAPTIONS}


# --------------------------------------------------------------------------- SugarCrepe, ARO


def _write_sugarcrepe(folder: Path, num_eval: int, common: dict, progress: bool) -> dict:
    """One image per scene (two objects 2/3 of the time); each scene adds an item to every
    subset that applies to it. Items also carry ``caption2``, a second true phrasing, for
    SugarCrepe++-style scoring."""
    seed, image_size = common["seed"], common["image_size"]
    (folder / "images").mkdir(parents=True, exist_ok=True)
    subsets: dict[str, dict] = {name: {} for name in SUGARCREPE_SUBSETS}
    for index in tqdm(range(num_eval), desc="shapesworld sugarcrepe", disable=not progress):
        rng = sample_rng(seed, "sugarcrepe", index)
        scene = sample_scene(rng, num_objects=1 + (rng.random() < 2 / 3), image_size=image_size)
        filename = f"{sample_key(index)}.png"
        (folder / "images" / filename).write_bytes(encode_png(render_image(scene, image_size)))
        for name, items in subsets.items():
            item = _sugarcrepe_item(name, scene, rng)
            if item is not None:
                items[str(len(items))] = {"filename": filename, **item}
    for name, items in subsets.items():
        _write_text(folder / f"{name}.json", json.dumps(items, indent=1) + "\n")
    return {"image_root": "images", "num_images": num_eval,
            "subsets": {name: len(items) for name, items in subsets.items()}}


def _sugarcrepe_item(kind: str, scene: Scene, rng) -> dict | None:
    mention_size = False if kind == "add_att" else None
    caption = describe(scene, rng, mention_size=mention_size)
    negative = hard_negative(kind, scene, caption, rng)
    if negative is None:
        return None
    text = caption.render()
    sized = caption.mentions[0].size is not None
    for _ in range(20):
        caption2 = describe(scene, rng, mention_size=sized).render()
        if caption2 != text:
            break
    return {"caption": text, "negative_caption": negative, "caption2": caption2}


def _write_aro(folder: Path, num_eval: int, common: dict, progress: bool) -> dict:
    """VG-Relation ("the A is left of the B" vs "the B is left of the A") and VG-Attribution
    ("the red circle and the blue square" vs "the blue circle and the red square") over
    two-object scenes whose objects differ in colour and shape."""
    seed, image_size = common["seed"], common["image_size"]
    (folder / "images").mkdir(parents=True, exist_ok=True)
    relation_items, attribution_items = [], []
    for index in tqdm(range(num_eval), desc="shapesworld aro", disable=not progress):
        for name, items, make in (("rel", relation_items, _aro_relation_item),
                                  ("att", attribution_items, _aro_attribution_item)):
            rng = sample_rng(seed, f"aro_{name}", index)
            scene = _distinct_pair_scene(rng, image_size)
            filename = f"{name}_{sample_key(index)}.png"
            (folder / "images" / filename).write_bytes(encode_png(render_image(scene, image_size)))
            x, y, w, h = scene.union_box()
            items.append({"image_path": filename, "bbox_x": x, "bbox_y": y, "bbox_w": w,
                          "bbox_h": h, **make(scene, rng)})
    _write_text(folder / "vg_relation.json", json.dumps(relation_items, indent=1) + "\n")
    _write_text(folder / "vg_attribution.json", json.dumps(attribution_items, indent=1) + "\n")
    return {"image_root": "images", "vg_relation": len(relation_items),
            "vg_attribution": len(attribution_items)}


def _distinct_pair_scene(rng, image_size: int) -> Scene:
    while True:
        scene = sample_scene(rng, num_objects=2, image_size=image_size)
        a, b = scene.objects
        if a.color != b.color and a.shape != b.shape:
            return scene


def _aro_relation_item(scene: Scene, rng) -> dict:
    (a, b), relation = scene.objects, scene.relation
    if rng.random() < 0.5:
        (a, b), relation = (b, a), INVERSE_RELATION[relation]
    first, second = f"the {a.color} {a.shape}", f"the {b.color} {b.shape}"
    return {"true_caption": f"{first} is {relation} {second}",
            "false_caption": f"{second} is {relation} {first}",
            "relation_name": relation}


def _aro_attribution_item(scene: Scene, rng) -> dict:
    a, b = scene.objects if rng.random() < 0.5 else scene.objects[::-1]
    return {"true_caption": f"the {a.color} {a.shape} and the {b.color} {b.shape}",
            "false_caption": f"the {b.color} {a.shape} and the {a.color} {b.shape}",
            "attributes": [a.color, b.color]}


# --------------------------------------------------------------------------- helpers


def _counts(splits: dict) -> dict[str, int]:
    counts = {name: splits[name]["num_samples"]
              for name in ("train", "zeroshot", "zeroshot_heldout", "retrieval")}
    counts.update({f"sugarcrepe/{k}": v for k, v in splits["sugarcrepe"]["subsets"].items()})
    counts.update({f"aro/{k}": splits["aro"][k] for k in ("vg_relation", "vg_attribution")})
    return counts


def _json_bytes(value: dict) -> bytes:
    return json.dumps(value, sort_keys=True).encode()


def _write_text(path: Path, text: str) -> None:
    """Write atomically, so a crash never leaves a half-written manifest or index."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
