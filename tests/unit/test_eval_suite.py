"""Eval suites (vlp.eval.suite), reference files (vlp.eval.references), the task registry
(vlp.eval.tasks) and running a suite (vlp.eval.runner) with a stub model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from vlp.eval.benchmark_data import write_benchmark
from vlp.eval.references import load_reference
from vlp.eval.runner import evaluate_suite, run_suite
from vlp.eval.suite import SUITES_DIR, load_suite, single_task_suite
from vlp.eval.tasks import TASKS, OrderOptions, build_options

REPO = Path(__file__).resolve().parents[2]
REFERENCES = REPO / "eval" / "reference"


def write_suite(tmp_path: Path, suite: dict) -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


@pytest.fixture
def data(tmp_path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    return folder


def minimal(data: Path, **extra) -> dict:
    return {"name": "mini", "benchmarks": [{"name": "z", "task": "zeroshot", "data": str(data)}],
            **extra}


# --------------------------------------------------------------------------- strict parsing

def test_minimal_suite_loads_with_defaults(tmp_path, data):
    suite = load_suite(write_suite(tmp_path, minimal(data)))

    assert suite.name == "mini" and suite.batch_size == 64 and suite.num_workers == 0
    (bench,) = suite.benchmarks
    assert (bench.name, bench.task, bench.data) == ("z", "zeroshot", data.resolve())
    assert bench.options == TASKS["zeroshot"].options()


def test_unknown_top_level_key_is_an_error_naming_it(tmp_path, data):
    path = write_suite(tmp_path, minimal(data, batchsize=8))

    with pytest.raises(ValueError, match=r"suite\.yaml: unknown key\(s\) \['batchsize'\]"):
        load_suite(path)


def test_unknown_benchmark_key_is_an_error_naming_the_entry(tmp_path, data):
    suite = minimal(data)
    suite["benchmarks"][0]["opts"] = {}

    with pytest.raises(ValueError, match=r"benchmarks\[0\]: unknown key\(s\) \['opts'\]"):
        load_suite(write_suite(tmp_path, suite))


def test_unknown_task_lists_the_known_ones(tmp_path, data):
    suite = minimal(data)
    suite["benchmarks"][0]["task"] = "winoground"

    with pytest.raises(ValueError, match=r"benchmarks\[0\] \(z\)\.task: unknown eval task "
                                         r"'winoground'; known: \['aro'"):
        load_suite(write_suite(tmp_path, suite))


def test_unknown_or_mistyped_option_is_an_error_naming_the_key(tmp_path, data):
    suite = minimal(data)
    suite["benchmarks"][0]["options"] = {"templates": "x.txt"}
    with pytest.raises(ValueError, match=r"\(z\)\.options: unknown option\(s\) \['templates'\]"):
        load_suite(write_suite(tmp_path, suite))

    suite["benchmarks"][0] = {"name": "o", "task": "order", "data": str(data),
                              "options": {"seed": "zero"}}
    with pytest.raises(ValueError, match=r"\(o\)\.options\.seed: expected int"):
        load_suite(write_suite(tmp_path, suite))


def test_duplicate_benchmark_names_are_an_error(tmp_path, data):
    suite = minimal(data)
    suite["benchmarks"] *= 2

    with pytest.raises(ValueError, match="duplicate benchmark name 'z'"):
        load_suite(write_suite(tmp_path, suite))


def test_missing_data_folder_is_an_error_naming_the_key(tmp_path):
    path = write_suite(tmp_path, minimal(tmp_path / "nowhere"))

    with pytest.raises(ValueError, match=r"benchmarks\[0\] \(z\)\.data: .*nowhere does not exist"):
        load_suite(path)


def test_options_are_built_into_the_tasks_dataclass():
    options = build_options("order", {"seed": 3, "captions_per_image": None}, "here")

    assert options == OrderOptions(seed=3, captions_per_image=None)
    assert build_options("gap", {"test_fraction": 1}, "here").test_fraction == 1


# --------------------------------------------------------------------------- placeholders

def placeholder_suite(data_text: str = "${coco}") -> dict:
    return {"name": "p", "paths": {"coco": None},
            "benchmarks": [{"name": "coco_ret", "task": "retrieval", "data": data_text}]}


def test_unset_placeholder_fails_naming_the_suite_key_and_the_path(tmp_path, monkeypatch):
    monkeypatch.delenv("VLP_PATH_COCO", raising=False)
    path = write_suite(tmp_path, placeholder_suite())

    with pytest.raises(ValueError, match=r"suite\.yaml: benchmarks\[0\] \(coco_ret\)\.data is "
                                         r"'\$\{coco\}', but path 'coco' is not set: pass "
                                         r"--path coco=DIR"):
        load_suite(path)


def test_placeholder_filled_from_paths_argument(tmp_path, data):
    (data / "sub").mkdir()
    path = write_suite(tmp_path, placeholder_suite("${coco}/sub"))

    suite = load_suite(path, paths={"coco": str(data)})

    assert suite.benchmarks[0].data == (data / "sub").resolve()
    assert suite.paths == {"coco": str(data.resolve())}


def test_placeholder_filled_from_the_environment(tmp_path, data, monkeypatch):
    monkeypatch.setenv("VLP_PATH_COCO", str(data))

    suite = load_suite(write_suite(tmp_path, placeholder_suite()))

    assert suite.benchmarks[0].data == data.resolve()


def test_undeclared_placeholder_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"unknown placeholder \$\{flickr\}"):
        load_suite(write_suite(tmp_path, placeholder_suite("${flickr}")))


def test_placeholder_in_a_path_option_is_filled_and_checked(tmp_path, data, monkeypatch):
    monkeypatch.setenv("VLP_PATH_COCO", str(data))
    suite = {"name": "s", "paths": {"coco": None, "images": None},
             "benchmarks": [{"name": "sc", "task": "sugarcrepe", "data": "${coco}",
                             "options": {"image_root": "${images}"}}]}

    with pytest.raises(ValueError, match=r"\(sc\)\.options\.image_root is '\$\{images\}', but "
                                         r"path 'images' is not set"):
        load_suite(write_suite(tmp_path, suite))
    loaded = load_suite(write_suite(tmp_path, suite), paths={"images": data})
    assert loaded.benchmarks[0].options.image_root == str(data.resolve())


# --------------------------------------------------------------------------- overrides, only

def test_dotted_overrides_edit_the_suite_before_checking(tmp_path, data):
    suite = minimal(data)
    suite["benchmarks"].append({"name": "o", "task": "order", "data": str(data)})
    path = write_suite(tmp_path, suite)

    loaded = load_suite(path, overrides=["batch_size=8", "benchmarks.o.options.seed=3"])

    assert loaded.batch_size == 8
    assert loaded.benchmarks[1].options.seed == 3


def test_override_of_an_unknown_benchmark_or_key_fails(tmp_path, data):
    path = write_suite(tmp_path, minimal(data))

    with pytest.raises(ValueError, match="no benchmark named 'nope'"):
        load_suite(path, overrides=["benchmarks.nope.options.seed=1"])
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['batch'\]"):
        load_suite(path, overrides=["batch=1"])
    with pytest.raises(ValueError, match="expected key=value"):
        load_suite(path, overrides=["batch_size"])


def test_only_keeps_the_named_benchmarks_and_skips_checking_the_others(tmp_path, data):
    suite = minimal(data)
    suite["benchmarks"].append({"name": "gone", "task": "gap", "data": str(tmp_path / "x")})
    path = write_suite(tmp_path, suite)

    assert [b.name for b in load_suite(path, only=["z"]).benchmarks] == ["z"]
    with pytest.raises(ValueError, match=r"--only names unknown benchmark\(s\) \['y'\]"):
        load_suite(path, only=["y"])


# --------------------------------------------------------------------------- shipped files

def fake_shapesworld(root: Path) -> Path:
    for name in ("zeroshot", "zeroshot_heldout", "retrieval", "sugarcrepe", "aro"):
        (root / name).mkdir(parents=True)
    (root / "manifest.json").write_text("{}")
    return root


def test_shipped_shapesworld_suite_parses_with_an_existing_root(tmp_path):
    root = fake_shapesworld(tmp_path / "sw")

    suite = load_suite(SUITES_DIR / "shapesworld.yaml", overrides=[f"shapesworld.root={root}"])

    assert [b.task for b in suite.benchmarks] == ["zeroshot", "zeroshot", "retrieval",
                                                   "sugarcrepe", "aro", "order", "gap"]
    assert all(b.data.is_relative_to(root.resolve()) for b in suite.benchmarks)
    assert suite.references == ()


def test_shipped_shapesworld_suite_uses_the_training_recipes_cache_key():
    recipe = yaml.safe_load((REPO / "recipes" / "shapesworld-tiny.yaml").read_text())
    suite = yaml.safe_load((SUITES_DIR / "shapesworld.yaml").read_text())
    from vlp.config import SynthConfig

    synth = {**SynthConfig().__dict__, **recipe["data"]["synth"]}
    assert suite["shapesworld"]["params"] == synth


def test_shapesworld_root_without_manifest_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"shapesworld\.root: .*\(no manifest\.json\)"):
        load_suite(SUITES_DIR / "shapesworld.yaml", overrides=[f"shapesworld.root={tmp_path}"])


def test_shipped_standard_suite_needs_every_path_and_loads_its_references(tmp_path, monkeypatch):
    names = ["imagenet1k", "mscoco", "flickr30k", "sugarcrepe", "coco_val2017", "aro"]
    for name in names:
        monkeypatch.delenv(f"VLP_PATH_{name.upper()}", raising=False)
    with pytest.raises(ValueError, match=r"standard\.yaml: benchmarks\[0\] \(imagenet1k\)\.data "
                                         r".*path 'imagenet1k' is not set"):
        load_suite(SUITES_DIR / "standard.yaml")
    paths = {}
    for name in names:
        paths[name] = tmp_path / name
        paths[name].mkdir()

    suite = load_suite(SUITES_DIR / "standard.yaml", paths=paths)

    assert {r.model for r in suite.references} == {"CLIP ViT-B/32 (openai)", "NegCLIP"}
    sugarcrepe = next(b for b in suite.benchmarks if b.name == "sugarcrepe")
    assert sugarcrepe.options.image_root == str(paths["coco_val2017"].resolve())


@pytest.mark.parametrize("path", sorted(REFERENCES.glob("*.yaml")), ids=lambda p: p.name)
def test_reference_files_cite_a_source_for_each_benchmark(path):
    reference = load_reference(path)

    assert set(reference.sources) == set(reference.metrics)
    assert all(len(source) > 20 for source in reference.sources.values())


def test_reference_numbers_sit_beside_the_benchmarks_they_name():
    clip = load_reference(REFERENCES / "clip-vit-b-32-openai.yaml")
    negclip = load_reference(REFERENCES / "negclip.yaml")

    assert clip.metrics["imagenet1k"] == {"acc1": 0.6332}
    assert clip.metrics["aro"] == {"vg_relation": 0.59, "vg_attribution": 0.62}
    assert negclip.metrics["coco_order"] == {"precision@1": 0.86}
    assert set(negclip.metrics["sugarcrepe"]) == {
        "replace_obj", "replace_att", "replace_rel", "swap_obj", "swap_att", "add_obj", "add_att",
        "replace", "swap", "add"}


def test_unverified_numbers_are_marked_and_data_changes_are_noted():
    clip = load_reference(REFERENCES / "clip-vit-b-32-openai.yaml")
    negclip = load_reference(REFERENCES / "negclip.yaml")

    assert ("coco_order", "precision@1") in clip.unverified
    assert ("sugarcrepe", "swap_obj") not in clip.unverified
    assert ("sugarcrepe", "replace") not in negclip.unverified
    assert ("sugarcrepe", "replace_obj") in negclip.unverified
    assert "unverified" in clip.sources["aro"]
    assert "245 items" in clip.sources["sugarcrepe"] and "246" in clip.sources["sugarcrepe"]


@pytest.mark.parametrize("path", sorted(REFERENCES.glob("*.yaml")), ids=lambda p: p.name)
def test_sample_weighted_group_references_agree_with_their_subsets(path):
    """SugarCrepe's groups pool their subsets' items (today's counts; swap_obj lost one)."""
    counts = {"replace_obj": 1652, "replace_att": 788, "replace_rel": 1406, "swap_obj": 245,
              "swap_att": 666, "add_obj": 2062, "add_att": 692}
    groups = {"replace": ("replace_obj", "replace_att", "replace_rel"),
              "swap": ("swap_obj", "swap_att"), "add": ("add_obj", "add_att")}
    ref = load_reference(path).metrics["sugarcrepe"]
    for group, subsets in groups.items():
        if group in ref and all(s in ref for s in subsets):
            pooled = sum(ref[s] * counts[s] for s in subsets) / sum(counts[s] for s in subsets)
            assert pooled == pytest.approx(ref[group], abs=1e-3), group


def test_reference_values_must_be_fractions(tmp_path):
    path = tmp_path / "ref.yaml"
    path.write_text(yaml.safe_dump({"model": "m", "results": [
        {"benchmark": "imagenet1k", "source": "a paper", "verified": True,
         "metrics": {"acc1": 63.2}}]}))

    with pytest.raises(ValueError, match=r"results\[0\]\.metrics\.acc1: expected a fraction"):
        load_reference(path)


def test_reference_entries_must_say_whether_they_were_verified(tmp_path):
    path = tmp_path / "ref.yaml"
    path.write_text(yaml.safe_dump({"model": "m", "results": [
        {"benchmark": "imagenet1k", "source": "a paper", "metrics": {"acc1": 0.6}}]}))

    with pytest.raises(ValueError, match=r"results\[0\]: missing key\(s\) \['verified'\]"):
        load_reference(path)


# --------------------------------------------------------------------------- running a suite

class TableModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))  # something to have a device
        self.vocab = ["cat", "dog"]

    def tokenizer(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([self.vocab.index(t) for t in texts])

    def encode_image(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.eye(2)[ids]

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.eye(2)[ids]


def red_value(image: Image.Image) -> torch.Tensor:
    return torch.tensor(image.getpixel((0, 0))[0])


@pytest.fixture
def stub_suite(tmp_path):
    """Zero-shot: images 0, 1 of classes cat, dog (both right); SugarCrepe: one right item."""
    images = [(Image.new("RGB", (4, 4), (i, 0, 0)), i) for i in (0, 1)]
    zeroshot = write_benchmark(tmp_path / "zs", images, classnames=["cat", "dog"],
                               templates=["{c}"])
    sugarcrepe = tmp_path / "sc"
    (sugarcrepe / "images").mkdir(parents=True)
    Image.new("RGB", (4, 4), (1, 0, 0)).save(sugarcrepe / "images" / "1.png")
    (sugarcrepe / "swap_att.json").write_text(json.dumps(
        {"0": {"filename": "1.png", "caption": "dog", "negative_caption": "cat"}}))
    path = write_suite(tmp_path, {
        "name": "stub", "batch_size": 2, "references": [str(REFERENCES / "negclip.yaml")],
        "benchmarks": [{"name": "zs", "task": "zeroshot", "data": str(zeroshot)},
                       {"name": "sugarcrepe", "task": "sugarcrepe", "data": str(sugarcrepe)}]})
    return load_suite(path)


def test_run_suite_returns_flat_tracker_metrics_and_restores_training_mode(tmp_path, stub_suite):
    model = TableModel().train()

    metrics = run_suite(model, model.tokenizer, red_value, stub_suite, tmp_path / "out", step=10)

    assert metrics["eval/zs/acc1"] == 1.0
    assert metrics["eval/sugarcrepe/swap_att"] == 1.0
    assert all(isinstance(v, float) for v in metrics.values())
    assert model.training


def test_suite_run_writes_clip_benchmark_jsons_results_and_report(tmp_path, stub_suite):
    model = TableModel()
    out = tmp_path / "out"

    result = evaluate_suite(model, model.tokenizer, red_value, stub_suite, out,
                            model_name="stub-model", progress=False)

    record = json.loads((out / "zs.json").read_text())
    assert {k: record[k] for k in ("dataset", "model", "pretrained", "task")} == {
        "dataset": "zs", "model": "stub-model", "pretrained": None,
        "task": "zeroshot_classification"}
    assert record["metrics"]["acc1"] == 1.0
    summary = json.loads((out / "results.json").read_text())
    assert summary["benchmarks"]["sugarcrepe"]["metrics"]["swap_att"] == 1.0
    report = (out / "report.md").read_text()
    assert "| swap_att | 1.0000 | 0.7540 † |" in report  # NegCLIP's (unverified) number beside ours
    assert "| swap | 1.0000 | 0.7533 |" in report  # its verified group accuracy
    assert "plots/sugarcrepe/sugarcrepe.png" in report
    assert (out / "plots" / "sugarcrepe" / "sugarcrepe.png").stat().st_size > 1000
    assert result.files["report"] == out / "report.md"


def test_single_task_suite_checks_its_data_and_options(tmp_path):
    with pytest.raises(ValueError, match="--data: .* does not exist"):
        single_task_suite("aro", tmp_path / "nope")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['sed'\]"):
        single_task_suite("order", tmp_path, options={"sed": 1})


def test_a_path_the_suite_does_not_declare_is_an_error(tmp_path, data):
    path = write_suite(tmp_path, placeholder_suite())

    with pytest.raises(ValueError, match=r"--path names \['cocoo'\].*declared: \['coco'\]"):
        load_suite(path, paths={"coco": data, "cocoo": data})
