"""Loading a model for evaluation (vlp.eval.loading): vlp checkpoint folders and open_clip specs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from vlp import checkpoint
from vlp.checkpoint import CheckpointError
from vlp.eval.loading import load_checkpoint_model, load_model
from vlp.models import build_model, model_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random vlp-tiny with a logit bias, saved as a checkpoint folder the way training does."""
    torch.manual_seed(0)
    bundle = build_model("vlp-tiny", init_logit_bias=-10.0)
    folder = tmp_path_factory.mktemp("ckpt") / "step-000000010"
    folder.mkdir()
    weights = {k: v.contiguous() for k, v in bundle.model.state_dict().items()}
    save_file(weights, folder / "model.safetensors")
    info = {"name": "vlp-tiny", "model_cfg": model_config("vlp-tiny"),
            "model_kwargs": {"init_logit_bias": -10.0}}
    (folder / "model_config.json").write_text(json.dumps(info))
    checkpoint.write_manifest(folder, step=10, milestone=False)
    return bundle, folder


def test_checkpoint_loads_the_saved_weights_transform_and_tokenizer(tiny):
    bundle, folder = tiny

    model, preprocess, tokenizer = load_checkpoint_model(folder)

    for name, tensor in bundle.model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=0)
    image = Image.radial_gradient("L").convert("RGB")
    torch.testing.assert_close(preprocess(image), bundle.preprocess_val(image), rtol=0, atol=0)
    texts = ["a small red circle above a blue star"]
    assert torch.equal(tokenizer(texts), bundle.tokenizer(texts))


def test_checkpoint_architecture_comes_from_model_config_json(tiny, tmp_path):
    """An architecture edited after training still loads the checkpoint as trained."""
    _, folder = tiny
    info = json.loads((folder / "model_config.json").read_text())
    info["name"] = "renamed-model"  # not registered anywhere: only model_cfg describes it
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    (copy / "model_config.json").write_text(json.dumps(info))

    model, _, tokenizer = load_checkpoint_model(copy, verify=False)  # assembled by hand

    assert model.logit_bias is not None
    assert tokenizer(["x"]).shape == (1, info["model_cfg"]["text_cfg"]["context_length"])


def test_load_model_names_the_checkpoint_and_puts_it_in_eval_mode(tiny):
    _, folder = tiny

    loaded = load_model(str(folder))

    assert loaded.name == str(folder) and loaded.pretrained is None
    assert not loaded.model.training


def test_weights_that_do_not_fit_the_architecture_raise_checkpoint_error(tiny, tmp_path):
    _, folder = tiny
    info = json.loads((folder / "model_config.json").read_text())
    info["model_kwargs"] = {}  # no logit bias: the checkpoint has an unexpected key
    (tmp_path / "model_config.json").write_text(json.dumps(info))
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())

    with pytest.raises(CheckpointError, match="does not fit the architecture"):
        load_checkpoint_model(tmp_path, verify=False)


def test_missing_or_bad_files_raise_errors_naming_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_checkpoint_model(tmp_path / "none")
    with pytest.raises(CheckpointError, match=r"checkpoint file missing: .*model_config\.json"):
        load_checkpoint_model(tmp_path)
    (tmp_path / "model_config.json").write_text(json.dumps({"name": "vlp-tiny"}))
    with pytest.raises(CheckpointError, match=r"checkpoint file missing: .*manifest\.json"):
        load_checkpoint_model(tmp_path)
    with pytest.raises(CheckpointError, match="'model_cfg' missing"):
        load_checkpoint_model(tmp_path, verify=False)


def test_a_tampered_checkpoint_is_refused_naming_the_file(tiny, tmp_path):
    _, folder = tiny
    copy = tmp_path / "step-000000010"
    shutil.copytree(folder, copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-200:-136] = bytes(b ^ 0xFF for b in data[-200:-136])  # 64 bytes of tensor data
    weights.write_bytes(bytes(data))

    with pytest.raises(CheckpointError, match=r"model\.safetensors: sha256 differs"):
        load_model(str(copy))
    assert load_model(str(copy), verify=False).name == str(copy)  # it would load unnoticed


def test_open_clip_spec_loads_a_local_weights_file(tiny, tmp_path):
    bundle, _ = tiny
    plain = build_model("vlp-tiny").model  # no logit bias, as open_clip:vlp-tiny builds it
    weights = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, weights)

    loaded = load_model(f"open_clip:vlp-tiny:{weights}")

    assert (loaded.name, loaded.pretrained) == ("vlp-tiny", str(weights))
    torch.testing.assert_close(loaded.model.state_dict()["text_projection"],
                               plain.state_dict()["text_projection"], rtol=0, atol=0)


def test_open_clip_spec_with_a_missing_weights_file_fails_without_downloading(tmp_path):
    with pytest.raises(FileNotFoundError, match="no weights file"):
        load_model(f"open_clip:vlp-tiny:{tmp_path / 'missing.bin'}")
    with pytest.raises(ValueError, match="unknown model"):
        load_model("open_clip:not-a-model:random")


def test_open_clip_spec_without_weights_is_refused_unless_random_is_asked_for():
    with pytest.raises(ValueError, match=r"open_clip:vlp-tiny names no weights.*"
                                         r"open_clip:vlp-tiny:random"):
        load_model("open_clip:vlp-tiny")

    loaded = load_model("open_clip:vlp-tiny:random")

    assert (loaded.name, loaded.pretrained) == ("vlp-tiny", None)



def test_a_run_folder_loads_its_latest_checkpoint(tiny):
    _, folder = tiny
    (folder.parent / "latest").write_text(folder.name + "\n")

    loaded = load_model(str(folder.parent))

    assert loaded.name == str(folder)


def test_a_random_open_clip_coca_has_no_uninitialised_weights():
    saved = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True  # torch.empty returns NaN
    try:
        model = load_model("open_clip:vlp-tiny-coca:random").model
    finally:
        torch.use_deterministic_algorithms(saved)
    assert all(torch.isfinite(p).all() for p in model.parameters())
