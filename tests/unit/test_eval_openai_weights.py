"""OpenAI's CLIP weights are evaluated with the QuickGELU they were trained with
(vlp.eval.openai_weights), whichever way the file says it is OpenAI's; other files build as named.

Models are tiny and random: an "OpenAI-format" file is a TorchScript archive of an open_clip
CLIP, as OpenAI released theirs; nothing is downloaded."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU
from safetensors.torch import save_file

from vlp.eval.loading import load_model

NAME = "vlp-test-openai-tiny"
TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 32, "head_width": 16, "layers": 1},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def trained_weights(tmp_path_factory):
    """Registers NAME and NAME-quickgelu (open_clip's naming) and returns random weights."""
    folder = tmp_path_factory.mktemp("configs")
    for name, cfg in ((NAME, TINY), (f"{NAME}-quickgelu", {**TINY, "quick_gelu": True})):
        (folder / f"{name}.json").write_text(json.dumps(cfg))
        open_clip.add_model_config(folder / f"{name}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(f"{NAME}-quickgelu")
    return model


def activations(model: torch.nn.Module) -> set[type]:
    return {type(m) for m in model.modules() if isinstance(m, (QuickGELU, torch.nn.GELU))}


def assert_same_weights(model: torch.nn.Module, source: torch.nn.Module) -> None:
    for key, value in source.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)


def save_safetensors(model: torch.nn.Module, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


def test_plain_weights_build_the_named_gelu_architecture(trained_weights, tmp_path):
    weights = save_safetensors(trained_weights, tmp_path / "open_clip_model.safetensors")

    loaded = load_model(f"open_clip:{NAME}:{weights}")

    assert activations(loaded.model) == {torch.nn.GELU}
    assert loaded.name == NAME


def test_weights_whose_path_names_openai_build_quickgelu(trained_weights, tmp_path):
    weights = save_safetensors(trained_weights, tmp_path / "vit-tiny-openai.safetensors")

    loaded = load_model(f"open_clip:{NAME}:{weights}")

    assert activations(loaded.model) == {QuickGELU}
    assert loaded.name == f"{NAME}-quickgelu"
    assert_same_weights(loaded.model, trained_weights)


def test_openai_torchscript_release_loads_with_quickgelu(trained_weights, tmp_path):
    weights = tmp_path / "ViT-tiny.pt"  # nothing in the name: the format says it is OpenAI's
    torch.jit.save(torch.jit.script(trained_weights), str(weights))

    loaded = load_model(f"open_clip:{NAME}:{weights}")

    assert activations(loaded.model) == {QuickGELU}
    assert_same_weights(loaded.model, trained_weights)
    image = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.model.encode_image(image),
                               trained_weights.eval().encode_image(image))


def test_hub_config_beside_the_weights_decides_the_activation(trained_weights, tmp_path):
    snapshot = tmp_path / "hub" / "snapshot"
    weights = save_safetensors(trained_weights, snapshot / "open_clip_model.safetensors")
    (snapshot / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": {**TINY, "quick_gelu": True}}))

    assert activations(load_model(f"open_clip:{NAME}:{weights}").model) == {QuickGELU}

    (snapshot / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY | {
        "quick_gelu": False}}))
    with pytest.raises(ValueError, match="trained with GELU.*without -quickgelu"):
        load_model(f"open_clip:{NAME}-quickgelu:{weights}")


def test_openai_pretrained_tag_is_refused_in_one_line_naming_quickgelu():
    with pytest.raises(ValueError, match="'openai' is open_clip's pretrained tag.*QuickGELU"):
        load_model("open_clip:ViT-B-32:openai")
