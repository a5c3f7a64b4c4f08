"""The top-level command line: `vlp --version`, `vlp train NAME` and its help, `vlp data`."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

import vlp
from vlp import resources
from vlp.cli import main
from vlp.eval.benchmark_data import read_benchmark
from vlp.eval.suite import DEFAULT_SUITE

ROOT = Path(__file__).resolve().parents[2]


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"vlp {vlp.__version__}"


def test_train_help_lists_every_shipped_recipe_with_what_it_is_for(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = capsys.readouterr().out
    assert "vlp/config.py" in help_text and "README" in help_text
    listed = dict(line.split(maxsplit=1) for line in
                  help_text.split("shipped recipes (vlp train NAME):\n")[1].splitlines())
    assert set(listed) == {p.stem for p in (ROOT / "recipes").glob("*.yaml")}
    assert listed["shapesworld-tiny"].startswith("The main job: a tiny CLIP")


def test_a_shipped_recipe_is_found_by_name_and_a_path_still_wins(tmp_path, monkeypatch):
    assert resources.find_recipe("shapesworld-tiny") == ROOT / "recipes" / "shapesworld-tiny.yaml"
    assert resources.find_recipe("shapesworld-tiny.yaml").parent == ROOT / "recipes"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shapesworld-tiny.yaml").write_text("output_dir: mine\n")
    assert resources.find_recipe("shapesworld-tiny.yaml") == Path("shapesworld-tiny.yaml")


def test_an_unknown_recipe_is_one_line_listing_the_shipped_ones(capsys):
    assert main(["train", "no-such-recipe"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vlp train: error: recipe file no-such-recipe")
    assert "shapesworld-tiny," in err


def test_shipped_suites_come_from_the_repository_in_a_checkout():
    assert resources.suites()["standard"] == ROOT / "eval" / "suites" / "standard.yaml"
    assert DEFAULT_SUITE == ROOT / "eval" / "suites" / "shapesworld.yaml"
    assert resources.find_suite("standard") == ROOT / "eval" / "suites" / "standard.yaml"


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I",
                                                                    *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_vlp_data_runs_a_converter_with_its_own_options(tmp_path, capsys):
    source = tmp_path / "idx"
    source.mkdir()
    write_idx(source / "t10k-images-idx3-ubyte.gz", np.arange(12 * 28 * 28).reshape(12, 28, 28))
    write_idx(source / "t10k-labels-idx1-ubyte.gz", np.arange(12) % 10)

    code = main(["data", "fashion-mnist", "--source", str(source), "--out", str(tmp_path / "fm"),
                 "--num-shards", "3", "--limit", "9"])

    assert code == 0
    benchmark = read_benchmark(tmp_path / "fm")
    assert len(benchmark.shard_paths) == 3 and benchmark.classnames[9] == "ankle boot"
    assert '"samples": 9' in capsys.readouterr().out


def test_fashion_mnist_without_the_debian_package_says_what_to_install(tmp_path, capsys):
    code = main(["data", "fashion-mnist", "--source", str(tmp_path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("vlp data fashion-mnist: error: no Fashion-MNIST files in")
    assert "apt-get install dataset-fashion-mnist" in err


def test_vlp_data_help_is_the_converters_own(capsys):
    with pytest.raises(SystemExit):
        main(["data", "karpathy", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: vlp data karpathy") and "--karpathy" in out


def test_unknown_arguments_are_still_refused_outside_vlp_data(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--checkpoint", "c", "--format", "hf", "--out", "o", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
