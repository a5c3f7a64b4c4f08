"""The table and plot of `benchmarks/objectives_shapesworld.py`, on hand-written results (no
training): one row per objective, mean ± sample std over seeds, missing metrics shown as such."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "objectives_shapesworld.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("objectives_shapesworld", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def fake_run(objective: str, seed: int, *, seen: float, swap_att: float, gap: float) -> dict:
    sugarcrepe = {s: 0.5 for s in ("swap_obj", "replace_att", "replace_rel", "replace_obj",
                                   "add_att", "add_obj")}
    return {"objective": objective, "seed": seed,
            "metrics": {"zeroshot": {"acc1": seen, "acc5": 1.0},
                        "zeroshot_heldout": {"acc1": seen / 2},
                        "sugarcrepe": {**sugarcrepe, "swap_att": swap_att, "mean": 0.5},
                        "gap": {"gap": gap, "matched_cosine": 0.3}}}


def rows(table: str) -> dict[str, list[str]]:
    lines = table.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    out = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        out[cells[0]] = dict(zip(header, cells, strict=True))
    return out


def test_table_has_one_row_per_objective_with_mean_and_sample_std_over_seeds(bench):
    runs = [fake_run("clip", 0, seen=0.5, swap_att=0.6, gap=0.8),
            fake_run("negclip", 0, seen=0.4, swap_att=0.9, gap=0.5),
            fake_run("clip", 1, seen=0.7, swap_att=0.6, gap=0.6),
            fake_run("negclip", 1, seen=0.4, swap_att=0.7, gap=0.7)]
    table = rows(bench.build_table(runs))
    assert list(table) == ["clip", "negclip"]
    clip, negclip = table["clip"], table["negclip"]
    assert clip["seeds"] == "2"
    assert clip["zero-shot seen"] == "60.0 ± 14.1"  # mean 0.6, stdev(0.5, 0.7) = 0.1414
    assert clip["zero-shot held-out"] == "30.0 ± 7.1"
    assert clip["swap_att"] == "60.0 ± 0.0"
    assert clip["gap ‖μx−μy‖"] == "0.700 ± 0.141"  # the gap is a distance, not a percentage
    assert negclip["swap_att"] == "80.0 ± 14.1"
    assert negclip["replace_rel"] == "50.0 ± 0.0"


def test_single_seed_shows_the_value_alone_and_a_missing_metric_as_a_dash(bench):
    siglip = fake_run("siglip", 3, seen=0.25, swap_att=0.55, gap=1.2)
    clip = fake_run("clip", 3, seen=0.25, swap_att=0.55, gap=1.2)
    del siglip["metrics"]["sugarcrepe"]["add_obj"]
    table = rows(bench.build_table([siglip, clip]))
    row = table["siglip"]
    assert row["seeds"] == "1"
    assert row["zero-shot seen"] == "25.0"
    assert row["swap_att"] == "55.0"
    assert row["gap ‖μx−μy‖"] == "1.200"
    assert row["add_obj"] == "–"
    assert table["clip"]["add_obj"] == "50.0"


def test_a_subset_no_run_scored_gets_no_column(bench):
    runs = [fake_run("clip", 0, seen=0.5, swap_att=0.6, gap=0.8)]
    del runs[0]["metrics"]["sugarcrepe"]["add_att"]
    header = bench.build_table(runs).splitlines()[0]
    assert "add_att" not in header
    assert "| swap_att | replace_rel | swap_obj |" in header


def test_every_training_override_is_the_same_for_every_objective(bench, tmp_path):
    overrides = bench.train_overrides(tmp_path, steps=7, seed=2, batch_size=16, cache_dir="c")
    assert f"output_dir={tmp_path}" in overrides
    assert {"train.steps=7", "train.seed=2", "data.batch_size=16", "data.cache_dir=c",
            "checkpoint.resume=never", "train.mixed_precision=no"} <= set(overrides)
    assert not any(o.startswith("model.") for o in overrides)  # each recipe's own model
    with_model = bench.train_overrides(tmp_path, steps=7, seed=2, batch_size=16, cache_dir="c",
                                       model="vlp-tiny")
    assert with_model == [*overrides, "model.name=vlp-tiny"]
    assert set(bench.RECIPES) == {"clip", "siglip", "negclip", "clip+align_uniform", "dcl",
                                  "fixed_temp", "lit", "cwcl", "multipos", "temp_schedule",
                                  "vit", "flip"}
    assert bench.parse_args([]).objectives == ["clip", "negclip", "clip+align_uniform", "siglip"]
    assert bench.parse_args(["--objectives", "lit", "cwcl"]).objectives == ["lit", "cwcl"]
    assert all(path.is_file() for path in bench.RECIPES.values())


def test_vit_is_the_flip_recipe_without_token_dropping(bench):
    from vlp.config import load_config

    assert bench.RECIPES["vit"] == bench.RECIPES["flip"]
    flip = load_config(bench.RECIPES["flip"])
    vit = load_config(bench.RECIPES["vit"], bench.RECIPE_OVERRIDES["vit"])
    assert (flip.model.patch_dropout, vit.model.patch_dropout) == (0.5, 0.0)
    assert dataclasses.replace(vit.model, patch_dropout=0.5) == flip.model


def test_plot_writes_a_png(bench, tmp_path):
    runs = [fake_run("clip", 0, seen=0.5, swap_att=0.6, gap=0.8),
            fake_run("clip", 1, seen=0.6, swap_att=0.6, gap=0.7),
            fake_run("negclip", 0, seen=0.4, swap_att=0.9, gap=0.5)]
    path = bench.plot_summary(runs, tmp_path / "objectives.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_gives_each_objective_its_colour_and_keeps_the_legend_off_the_bars(bench, tmp_path,
                                                                               monkeypatch):
    from matplotlib.figure import Figure

    figures = []
    original = Figure.savefig
    monkeypatch.setattr(Figure, "savefig",
                        lambda fig, *a, **k: (figures.append(fig), original(fig, *a, **k))[1])
    names = [f"objective{k}" for k in range(12)]
    runs = [fake_run(name, 0, seen=0.9, swap_att=0.9, gap=0.5) for name in names]
    bench.plot_summary(runs, tmp_path / "objectives.png")
    accuracy_axes = figures[0].axes[0]
    bars = [patch for patch in accuracy_axes.patches if patch.get_height() > 0]
    assert len({patch.get_facecolor() for patch in bars}) == len(names)
    renderer = figures[0].canvas.get_renderer()
    legend = accuracy_axes.get_legend().get_window_extent(renderer)
    assert [t.get_text() for t in accuracy_axes.get_legend().get_texts()] == names
    assert all(legend.y0 >= patch.get_window_extent(renderer).y1 for patch in bars)


def test_default_seeds_are_not_the_seed_the_recipes_were_chosen_on(bench):
    from vlp.config import load_config

    tuned = {load_config(recipe).train.seed for recipe in bench.RECIPES.values()}
    seeds = bench.parse_args([]).seeds
    assert len(seeds) >= 2 and not tuned & set(seeds)


def test_runs_train_jobs_at_a_time_and_a_trained_run_is_reused(bench, tmp_path, monkeypatch):
    import threading
    import time

    running, most, trained = [0], [0], []
    lock = threading.Lock()

    def fake_train(objective, overrides, run_dir):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            trained.append(objective)
        time.sleep(0.2)
        run_dir.mkdir(parents=True, exist_ok=True)
        with lock:
            running[0] -= 1
        return 0.2

    monkeypatch.setattr(bench, "train_run", fake_train)
    monkeypatch.setattr(bench, "last_logged", lambda run_dir: {"loss": 1.0})
    monkeypatch.setattr(bench, "evaluate_run", lambda run_dir, suite, batch_size: {
        "zeroshot": {"acc1": 0.5}})
    argv = ["--objectives", "clip", "siglip", "negclip", "--seeds", "1", "--out", str(tmp_path),
            "--jobs", "2"]
    runs = bench.run_all(bench.parse_args(argv), suite=None, data_root=tmp_path)
    assert [(r["objective"], r["seed"]) for r in runs] == [("clip", 1), ("siglip", 1),
                                                           ("negclip", 1)]
    assert most[0] == 2 and sorted(trained) == ["clip", "negclip", "siglip"]
    assert all(r["metrics"] == {"zeroshot": {"acc1": 0.5}} for r in runs)

    trained.clear()
    again = bench.run_all(bench.parse_args([*argv, "--seeds", "1", "2"]), suite=None,
                          data_root=tmp_path)
    assert sorted(trained) == ["clip", "negclip", "siglip"]  # only seed 2 trains
    assert len(again) == 6


def test_runs_train_as_long_as_the_objective_recipes_themselves(bench):
    from vlp.config import load_config

    steps = {name: load_config(bench.RECIPES[name]).train.steps
             for name in bench.DEFAULT_OBJECTIVES if name != "clip"}  # clip: the 400-step main job
    assert set(steps.values()) == {bench.parse_args([]).steps}, steps


def test_runs_train_in_bf16_autocast_unless_told_otherwise(bench, tmp_path):
    assert bench.parse_args([]).mixed_precision == "bf16"  # open_clip's default is amp too
    assert bench.parse_args(["--mixed-precision", "no"]).mixed_precision == "no"
    overrides = bench.train_overrides(tmp_path, steps=7, seed=2, batch_size=16, cache_dir="c",
                                      mixed_precision="bf16")
    assert "train.mixed_precision=bf16" in overrides


def test_jobs_must_be_positive(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--jobs", "0"])


def results_file(path: Path, runs: list[dict], *, steps: int = 600,
                 mixed_precision: str | None = "bf16") -> Path:
    """A results.json as the script writes it; `mixed_precision=None`: as written before the
    precision was recorded (those runs trained in fp32)."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    precision = {} if mixed_precision is None else {"mixed_precision": mixed_precision}
    path.write_text(json.dumps({"models": ["vlp-tiny-rn"], "steps": steps, "batch_size": 128,
                                **precision,
                                "seeds": sorted({r["seed"] for r in runs}),
                                "data": "/cache/shapesworld-x", "suite": "eval/suites/s.yaml",
                                "runs": runs}))
    return path


def test_merge_builds_one_table_from_runs_made_in_pieces(bench, tmp_path):
    import json

    first = results_file(tmp_path / "a" / "results.json",
                         [fake_run("negclip", 2, seen=1.0, swap_att=0.9, gap=0.07)])
    second = results_file(tmp_path / "b" / "results.json",
                          [fake_run("negclip", 1, seen=1.0, swap_att=0.92, gap=0.08),
                           fake_run("clip", 1, seen=1.0, swap_att=0.6, gap=0.06)])
    out = tmp_path / "merged"
    assert bench.main(["--merge", str(first), str(second), "--out", str(out)]) == 0
    table = rows((out / "table.md").read_text().split("\n\n")[1])
    assert list(table) == ["clip", "negclip"]  # the benchmark's order, not the files'
    assert table["negclip"]["seeds"] == "2"
    assert table["negclip"]["swap_att"] == "91.0 ± 1.4"
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [1, 2] and results["steps"] == 600
    assert results["merged_from"] == [str(first), str(second)]
    assert (out / "objectives.png").stat().st_size > 0


def test_merge_refuses_a_run_in_two_files_and_files_of_different_steps(bench, tmp_path):
    run = fake_run("clip", 1, seen=1.0, swap_att=0.6, gap=0.06)
    first = results_file(tmp_path / "a.json", [run])
    again = results_file(tmp_path / "b.json", [run])
    shorter = results_file(tmp_path / "c.json", [fake_run("clip", 2, seen=1.0, swap_att=0.6,
                                                          gap=0.06)], steps=300)
    with pytest.raises(SystemExit, match="clip seed 1 is in both"):
        bench.merge_results([first, again])
    with pytest.raises(SystemExit, match="differ in steps"):
        bench.merge_results([first, shorter])


def test_merge_refuses_runs_trained_in_different_precisions(bench, tmp_path):
    bf16 = results_file(tmp_path / "a.json", [fake_run("clip", 1, seen=1.0, swap_att=0.6,
                                                       gap=0.06)])
    older = results_file(tmp_path / "b.json", [fake_run("clip", 2, seen=1.0, swap_att=0.6,
                                                        gap=0.06)], mixed_precision=None)
    fp32 = results_file(tmp_path / "c.json", [fake_run("siglip", 2, seen=1.0, swap_att=0.6,
                                                       gap=0.06)], mixed_precision="no")
    with pytest.raises(SystemExit, match="differ in mixed_precision"):
        bench.merge_results([bf16, older])
    merged = bench.merge_results([older, fp32])  # a file that does not say trained in fp32
    assert merged["mixed_precision"] == "no"
    assert "(fp32)" in bench.write_results(merged, tmp_path / "out").splitlines()[0]


def test_a_merged_results_file_can_be_merged_again(bench, tmp_path):
    first = results_file(tmp_path / "a.json", [fake_run("clip", 1, seen=1.0, swap_att=0.6,
                                                        gap=0.06)])
    second = results_file(tmp_path / "b.json", [fake_run("clip", 2, seen=1.0, swap_att=0.62,
                                                         gap=0.05)])
    bench.main(["--merge", str(first), str(second), "--out", str(tmp_path / "m")])
    third = results_file(tmp_path / "c.json", [fake_run("siglip", 1, seen=0.9, swap_att=0.55,
                                                        gap=1.0)])
    merged = bench.merge_results([tmp_path / "m" / "results.json", third])
    assert merged["data"] == ["/cache/shapesworld-x"]
    assert [(r["objective"], r["seed"]) for r in merged["runs"]] == [
        ("clip", 1), ("clip", 2), ("siglip", 1)]
