"""Loading weights never unpickles: a pickle payload is refused before it can run."""

import json
import pathlib

import pytest
import torch

import vlp
from vlp import checkpoint
from vlp.models import build_model
from vlp.models.hf_clip import ConversionError, read_hf_clip_folder


class Payload:
    """Unpickling this creates `marker`: the proof that code from the file ran."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def write_payload(path: pathlib.Path, marker: pathlib.Path) -> pathlib.Path:
    torch.save({"state_dict": {"weight": torch.zeros(1)}, "extra": Payload(marker)}, path)
    return path


def test_the_payload_would_run_if_unpickled(tmp_path):
    marker = tmp_path / "ran"
    torch.load(write_payload(tmp_path / "w.pt", marker), weights_only=False)
    assert marker.exists()  # so the tests below, where it must not exist, mean something


def test_pretrained_pt_file_with_a_pickle_payload_is_refused(tmp_path):
    marker = tmp_path / "ran"
    weights = write_payload(tmp_path / "open_clip_weights.pt", marker)
    with pytest.raises(ValueError, match=r"model.pretrained: cannot load .*open_clip_weights.pt"):
        build_model("vlp-tiny", pretrained=str(weights))
    assert not marker.exists()


def test_transformers_bin_with_a_pickle_payload_is_refused(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
    write_payload(tmp_path / "pytorch_model.bin", marker)
    with pytest.raises(ConversionError, match="pytorch_model.bin: not a readable weights file"):
        read_hf_clip_folder(tmp_path)
    assert not marker.exists()


def test_checkpoint_weights_replaced_by_a_pickle_are_refused(tmp_path):
    marker = tmp_path / "ran"
    bundle = build_model("vlp-tiny")
    optimizer = torch.optim.SGD(bundle.model.parameters(), lr=0.1)
    ckpt = checkpoint.save_checkpoint(
        tmp_path / "run", step=1, model=bundle.model, optimizer=optimizer, trainer_state={},
        model_info=bundle.spec.model_info(), config_yaml="", keep_last=1,
        files=bundle.spec.checkpoint_files())
    write_payload(ckpt / "model.safetensors", marker)
    with pytest.raises(checkpoint.CheckpointError, match="model.safetensors"):
        vlp.load(ckpt)
    with pytest.raises(checkpoint.CheckpointError, match="model.safetensors"):
        checkpoint.load_checkpoint(ckpt, model=bundle.model, optimizer=optimizer, verify=False)
    assert not marker.exists()
