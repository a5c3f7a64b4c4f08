"""vlp.load, checkpoint self-description, export to open_clip / transformers, and importing back."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file

import vlp
from vlp import checkpoint
from vlp.checkpoint import CheckpointError
from vlp.cli import main
from vlp.config import ConfigError, load_config
from vlp.export import ExportError, build_clip_tokenizer, export_checkpoint
from vlp.models import build_model, model_config
from vlp.models.hf_clip import (
    ConversionError,
    clip_config,
    from_hf_state_dict,
    incompatibilities,
    to_hf_state_dict,
)
from vlp.train.checks import load_run_config

TEXTS = ["a small red circle above a blue star", "a large green square."]


def save(run_dir, bundle, step=1):
    optimizer = torch.optim.AdamW(bundle.model.parameters())
    return checkpoint.save_checkpoint(
        run_dir, step=step, model=bundle.model, optimizer=optimizer, trainer_state={},
        model_info=bundle.spec.model_info(), config_yaml="model: {}\n", keep_last=3,
        files=bundle.spec.checkpoint_files())


def embeddings(model, images, tokens):
    with torch.no_grad():
        return model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random vlp-tiny saved twice in one run folder (steps 1 and 2, different weights)."""
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    first = build_model("vlp-tiny")
    save(run, first, step=1)
    torch.manual_seed(1)
    bundle = build_model("vlp-tiny")
    ckpt = save(run, bundle, step=2)
    return bundle.model.eval(), bundle, ckpt


@pytest.fixture(scope="module")
def inputs():
    torch.manual_seed(2)
    return torch.randn(3, 3, 64, 64), open_clip.SimpleTokenizer(context_length=32)(TEXTS)


def test_load_gives_the_saved_models_normalised_embeddings(tiny, inputs):
    model, _, ckpt = tiny
    images, tokens = inputs

    loaded, preprocess, tokenizer = vlp.load(ckpt)

    expected = embeddings(model, images, tokens)
    with torch.no_grad():
        got = loaded.encode_image(images), loaded.encode_text(tokenizer(TEXTS))
        raw = loaded.encode_image(images, normalize=False)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a.norm(dim=-1), torch.ones(len(a)))
    with torch.no_grad():
        torch.testing.assert_close(raw, model.encode_image(images), rtol=0, atol=0)
    assert not loaded.training and loaded.embed_dim == 128
    assert torch.equal(tokenizer(TEXTS), tokens)
    assert preprocess.transforms[0].size == 64


def test_a_run_folder_loads_its_latest_checkpoint(tiny, inputs):
    model, _, ckpt = tiny
    images, _ = inputs

    loaded, _, _ = vlp.load(ckpt.parent)

    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images),
                                   model.encode_image(images, normalize=True), rtol=0, atol=0)


def test_checkpoint_records_preprocessing_and_tokenizer(tiny):
    model, _, ckpt = tiny
    preprocess = json.loads((ckpt / "preprocess.json").read_text())
    assert preprocess["image"] == json.loads(json.dumps(model.visual.preprocess_cfg))
    assert preprocess["text"] == {"type": "clip_bpe", "context_length": 32, "kwargs": {}}
    info = json.loads((ckpt / "model_config.json").read_text())
    assert info == {"name": "vlp-tiny", "model_cfg": model_config("vlp-tiny"), "model_kwargs": {}}


def test_a_checkpoint_without_preprocess_json_gets_open_clip_defaults(tiny, tmp_path, inputs):
    model, bundle, ckpt = tiny
    old = tmp_path / "old"
    shutil.copytree(ckpt, old)
    (old / "preprocess.json").unlink()
    checkpoint.write_manifest(old, step=2, milestone=False)  # as such a checkpoint was written

    loaded, preprocess, tokenizer = vlp.load(old)

    assert str(preprocess) == str(bundle.preprocess_val)
    assert torch.equal(tokenizer(TEXTS), inputs[1])


def _copy(ckpt, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(ckpt, folder)
    return folder


def test_flipped_header_bytes_are_rejected_naming_the_file(tiny, tmp_path):
    folder = _copy(tiny[2], tmp_path)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[9:19] = bytes(b ^ 0xFF for b in data[9:19])  # inside the JSON header
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: sha256 differs"):
        vlp.load(folder)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors"):
        vlp.load(folder, verify=False)


def test_truncated_weights_are_rejected_naming_the_file(tiny, tmp_path):
    folder = _copy(tiny[2], tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: \d+ bytes, the manifest"):
        vlp.load(folder)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors"):
        vlp.load(folder, verify=False)


def test_weights_of_the_wrong_shape_are_rejected_naming_the_file(tiny, tmp_path):
    folder = _copy(tiny[2], tmp_path)
    state = load_file(folder / "model.safetensors")
    state["text_projection"] = torch.zeros(128, 64)
    save_file(state, folder / "model.safetensors")
    checkpoint.write_manifest(folder, step=2, milestone=False)
    with pytest.raises(CheckpointError, match=r"model\.safetensors does not fit the architecture"):
        vlp.load(folder)


def test_a_folder_that_is_no_checkpoint_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"checkpoint file missing: .*model_config\.json"):
        vlp.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        vlp.load(tmp_path / "missing")


def test_weights_map_to_transformers_and_back_exactly(tiny):
    state = tiny[0].state_dict()

    hf = to_hf_state_dict(state)
    back = from_hf_state_dict(hf)

    assert len(hf) == len(state) + 4 * 8  # q/k/v (weight, bias) replace in_proj, 8 blocks
    assert back.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(back[key], value), key
    assert torch.equal(hf["visual_projection.weight"], state["visual.proj"].t())


def test_only_plain_clip_architectures_map_to_transformers():
    assert incompatibilities(model_config("vlp-tiny"), {}) == []
    coca = incompatibilities(model_config("vlp-tiny-coca"), {})
    assert any(p.startswith("multimodal_cfg") for p in coca)
    assert any(p.startswith("vision_cfg.attentional_pool=True") for p in coca)
    assert any(p.startswith("text_cfg.embed_cls=True") for p in coca)
    biased = incompatibilities(model_config("vlp-tiny"), {"init_logit_bias": -10.0})
    assert biased == ["model_kwargs.init_logit_bias=-10.0 (CLIPModel has no logit bias "
                      "(SigLIP-style sigmoid loss))"]


def test_activation_maps_to_hidden_act():
    plain = clip_config(model_config("vlp-tiny"))
    quick = clip_config({**model_config("vlp-tiny"), "quick_gelu": True})
    assert plain["text_config"]["hidden_act"] == plain["vision_config"]["hidden_act"] == "gelu"
    assert quick["text_config"]["hidden_act"] == quick["vision_config"]["hidden_act"] == \
        "quick_gelu"


def test_clip_tokenizer_written_for_transformers_matches_open_clip():
    texts = [*TEXTS, "Hello, WORLD! it's 3 o'clock", "naïve café  déjà-vu"]
    reference = open_clip.SimpleTokenizer(context_length=32)(texts)

    ids = build_clip_tokenizer(context_length=32)(texts)["input_ids"]

    for row, expected in zip(ids, reference, strict=True):
        assert row == expected[: len(row)].tolist()


@pytest.fixture(scope="module")
def hf_export(tiny, tmp_path_factory):
    return export_checkpoint(tiny[2], tmp_path_factory.mktemp("hf") / "clip", format="hf")


def test_hf_export_gives_the_same_embeddings(tiny, hf_export, inputs):
    from transformers import CLIPModel, CLIPProcessor

    images, tokens = inputs
    model = CLIPModel.from_pretrained(hf_export).eval()
    processor = CLIPProcessor.from_pretrained(hf_export)
    text = processor(text=TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        image_emb = _tensor(model.get_image_features(pixel_values=images))
        text_emb = _tensor(model.get_text_features(**text))
    expected = [e * 1 for e in embeddings(tiny[0], images, tokens)]
    torch.testing.assert_close(torch.nn.functional.normalize(image_emb, dim=-1), expected[0],
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.nn.functional.normalize(text_emb, dim=-1), expected[1],
                               rtol=0, atol=1e-5)
    assert json.loads((hf_export / "config.json").read_text())["text_config"]["hidden_act"] == \
        "gelu"


def _tensor(output):
    return output if torch.is_tensor(output) else output.pooler_output


def test_hf_clip_folder_imports_as_pretrained_weights(tiny, hf_export):
    bundle = build_model("vlp-tiny", pretrained=f"hf:{hf_export}")
    for key, value in tiny[0].state_dict().items():
        torch.testing.assert_close(bundle.model.state_dict()[key], value, rtol=0, atol=0)


def test_importing_hf_weights_with_another_activation_is_refused(hf_export, tmp_path):
    folder = tmp_path / "quick"
    shutil.copytree(hf_export, folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["hidden_act"] = config["vision_config"]["hidden_act"] = "quick_gelu"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="hidden_act is 'quick_gelu'.*uses 'gelu'"):
        build_model("vlp-tiny", pretrained=f"hf:{folder}")


def test_pretrained_weights_from_a_checkpoint_or_a_pt_file(tiny, tmp_path):
    model, _, ckpt = tiny
    from_folder = build_model("vlp-tiny", pretrained=str(ckpt.parent)).model
    pt = tmp_path / "weights.pt"
    torch.save(model.state_dict(), pt)
    from_pt = build_model("vlp-tiny", pretrained=str(pt)).model
    for key, value in model.state_dict().items():
        assert torch.equal(from_folder.state_dict()[key], value)
        assert torch.equal(from_pt.state_dict()[key], value)


class NotAWeight:
    """Anything a `weights_only` unpickler must refuse."""


def test_a_pt_file_holding_objects_is_not_unpickled(tmp_path):
    pt = tmp_path / "evil.pt"
    torch.save({"state_dict": NotAWeight()}, pt)
    with pytest.raises(ValueError, match=rf"cannot load {pt}"):
        build_model("vlp-tiny", pretrained=str(pt))


def test_hf_export_of_coca_names_what_does_not_map(tmp_path, capsys):
    torch.manual_seed(0)
    ckpt = save(tmp_path / "run", build_model("vlp-tiny-coca"))

    code = main(["export", "--checkpoint", str(ckpt), "--format", "hf",
                 "--out", str(tmp_path / "out")])

    err = capsys.readouterr().err
    assert code == 2 and err.startswith("vlp export: error: ")
    assert "multimodal_cfg" in err and "attentional_pool" in err and "--format open_clip" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_open_clip_export_loads_in_open_clip(tiny, inputs, tmp_path):
    out = export_checkpoint(tiny[2], tmp_path / "oc", format="open_clip")

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")

    images, tokens = inputs
    assert torch.equal(tokenizer(TEXTS), tokens)
    got = embeddings(model.eval(), images, tokenizer(TEXTS))
    for a, b in zip(got, embeddings(tiny[0], images, tokens), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert sorted(p.name for p in out.iterdir()) == ["open_clip_config.json",
                                                    "open_clip_model.safetensors"]


def test_export_into_a_non_empty_folder_needs_overwrite(tiny, tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="--overwrite"):
        export_checkpoint(tiny[2], tmp_path, format="open_clip")


def test_model_config_errors_name_the_key(tmp_path):
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "shapesworld-tiny.yaml"
    with pytest.raises(ConfigError, match="model.lock_text_unlocked_layers needs model.lock_text"):
        load_run_config(recipe, ["model.lock_text_unlocked_layers=2"])
    with pytest.raises(ConfigError, match="model.hf_text_pooler must be mean or cls"):
        load_run_config(recipe, ["model.hf_text_pooler=max"])
    with pytest.raises(ConfigError, match="model.pretrained: no such weights file or folder"):
        load_run_config(recipe, [f"model.pretrained=hf:{tmp_path / 'none'}"])
    with pytest.raises(ConfigError, match="model.hf_text_model: .*not a transformers model"):
        load_run_config(recipe, [f"model.hf_text_model={tmp_path}"])


# ---------------------------------------------------------------- checkpoints that are what they claim


def tamper(ckpt: Path) -> Path:
    """Flip 64 bytes of tensor data in the weights: the file still parses, sizes still match."""
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    weights.write_bytes(bytes(data))
    return weights


@pytest.fixture
def tampered(tiny, tmp_path):
    """A run folder whose only (and latest) checkpoint has 64 flipped bytes in its weights."""
    run = tmp_path / "run"
    shutil.copytree(tiny[2], run / tiny[2].name)
    (run / "latest").write_text(tiny[2].name + "\n")
    tamper(run / tiny[2].name)
    return run / tiny[2].name


SHA_MISMATCH = r"model\.safetensors: sha256 differs from the manifest"


def test_tampered_weights_load_silently_without_verification(tampered, tiny, inputs):
    """What the tests below guard against: the flipped bytes parse, and change the model."""
    model, _, _ = vlp.load(tampered, verify=False)
    changed = [k for k, v in model.model.state_dict().items()
               if not torch.equal(v, tiny[0].state_dict()[k])]
    assert changed


def test_vlp_load_refuses_a_tampered_checkpoint_or_run_folder(tampered):
    for path in (tampered, tampered.parent):
        with pytest.raises(CheckpointError, match=SHA_MISMATCH):
            vlp.load(path)


def test_vlp_eval_refuses_a_tampered_checkpoint_in_one_line(tampered, tmp_path, capsys):
    data = tmp_path / "zeroshot"
    data.mkdir()
    code = main(["eval", "--checkpoint", str(tampered), "--task", "zeroshot", "--data", str(data),
                 "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("vlp eval: error: ") and err.count("\n") == 1
    assert str(tampered / "model.safetensors") in err and "sha256 differs" in err
    assert not (tmp_path / "out").exists()


def test_vlp_export_refuses_a_tampered_checkpoint_in_one_line(tampered, tmp_path, capsys):
    out = tmp_path / "exported"
    code = main(["export", "--checkpoint", str(tampered), "--format", "open_clip",
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("vlp export: error: ") and err.count("\n") == 1
    assert str(tampered / "model.safetensors") in err and "sha256 differs" in err
    assert not out.exists() and not out.with_name("exported.tmp").exists()


def test_model_pretrained_refuses_a_tampered_checkpoint(tampered):
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "shapesworld-tiny.yaml"
    for pretrained in (tampered, tampered.parent):
        cfg = load_config(recipe, [f"model.pretrained={pretrained}"])
        with pytest.raises(CheckpointError, match=SHA_MISMATCH):
            build_model(cfg.model.name, pretrained=cfg.model.pretrained)


def test_every_model_file_is_checked_not_only_the_weights(tiny, tmp_path):
    folder = _copy(tiny[2], tmp_path)
    preprocess = json.loads((folder / "preprocess.json").read_text())
    preprocess["image"]["mean"] = [0.0, 0.0, 0.0]
    (folder / "preprocess.json").write_text(json.dumps(preprocess))
    with pytest.raises(CheckpointError, match=r"preprocess\.json: .*the manifest"):
        vlp.load(folder)


def test_loading_the_model_does_not_hash_the_optimizer(tiny, tmp_path):
    """vlp.load reads only the model's files; resuming checks the rest."""
    folder = _copy(tiny[2], tmp_path)
    (folder / "optimizer.safetensors").write_bytes(b"not read by vlp.load")
    vlp.load(folder)
    with pytest.raises(CheckpointError, match=r"optimizer\.safetensors"):
        checkpoint.verify_checkpoint(folder)


@pytest.mark.parametrize("fmt", ["open_clip", "hf"])
def test_exported_files_get_the_umask_mode_not_0600(tiny, tmp_path, fmt):
    previous = os.umask(0o002)  # a group-shared cluster folder
    try:
        out = export_checkpoint(tiny[2], tmp_path / fmt, format=fmt)
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()}
    assert any(name.endswith(".safetensors") for name in modes)
    assert set(modes.values()) == {0o664}, modes
