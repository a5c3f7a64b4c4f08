"""Caption embeddings skip the padding after the last end-of-text token, for causal CLIP text
towers only, and equal open_clip's `encode_text` (vlp.eval.zeroshot.text_features)."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch

from vlp.eval.zeroshot import text_features

NAME = "vlp-test-text-trim"
CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 32, "head_width": 16, "layers": 1},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
CAPTIONS = ["a red circle", "two small green stars to the left of a big blue square", "x"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / f"{NAME}.json"
    path.write_text(json.dumps(CFG))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    model = open_clip.create_model(NAME).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)  # every position matters, so a wrong trim would show
    return model, open_clip.get_tokenizer(NAME)


def test_trimmed_text_features_equal_open_clips_encode_text(clip):
    model, tokenizer = clip
    tokens = tokenizer(CAPTIONS)
    lengths = []
    hook = model.transformer.register_forward_pre_hook(
        lambda module, args: lengths.append(args[0].shape[1]))

    with torch.no_grad():
        trimmed = text_features(model, tokens)
        hook.remove()
        full = model.encode_text(tokens)

    assert lengths == [int(tokens.argmax(dim=1).max()) + 1] and lengths[0] < 24
    torch.testing.assert_close(trimmed, full, rtol=0, atol=1e-5)


def test_non_causal_text_towers_are_encoded_whole(clip):
    model, tokenizer = clip
    tokens = tokenizer(CAPTIONS)
    causal = model.attn_mask
    model.attn_mask = torch.zeros_like(causal)  # bidirectional: padding is attended
    lengths = []
    hook = model.transformer.register_forward_pre_hook(
        lambda module, args: lengths.append(args[0].shape[1]))
    try:
        with torch.no_grad():
            text_features(model, tokens)
    finally:
        hook.remove()
        model.attn_mask = causal

    assert lengths == [24]
