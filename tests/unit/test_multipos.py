"""Multi-positive InfoNCE (`multipos`): −mean over an image's own positives of the log softmax
over all the batch's captions, and each caption → its own image; with one positive it is CLIP."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from vlp.config import ConfigError, ObjectiveSpec
from vlp.distributed import build_backend
from vlp.distributed.dense_contrastive import local_multipos_loss
from vlp.models import DualEncoder, build_model
from vlp.objectives import build_objectives
from vlp.train.checks import load_run_config

B, K, D = 6, 4, 16


RING_TILE = 5  # divides neither B = 6 nor B·K = 24: the ring's partial tiles are used


def multipos(backend: str = "local"):
    return build_objectives([ObjectiveSpec("multipos")],
                            backend=build_backend(backend, tile_size=RING_TILE))


def clip():
    return build_objectives([ObjectiveSpec("clip")], backend=build_backend("local"))


def inputs(k: int = K, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(B, D, generator=g, dtype=dtype), dim=-1).requires_grad_()
    pos = F.normalize(torch.randn(B, k, D, generator=g, dtype=dtype), dim=-1).requires_grad_()
    mask = torch.arange(k)[None, :] < (torch.arange(B) % k + 1)[:, None]  # 1..k real positives
    log_scale = torch.tensor(math.log(20.0), dtype=dtype, requires_grad=True)
    return image, pos, mask, log_scale


def direct(image, pos, mask, scale):
    """The definition, one image and one caption at a time."""
    captions = [(i, pos[i, j]) for i in range(B) for j in range(pos.shape[1]) if mask[i, j]]
    texts = torch.stack([y for _, y in captions])
    image_to_text = []
    for i in range(B):
        log_prob = torch.log_softmax(scale * texts @ image[i], dim=0)
        image_to_text.append(-torch.stack(
            [log_prob[n] for n, (owner, _) in enumerate(captions) if owner == i]).mean())
    text_to_image = [-torch.log_softmax(scale * image @ y, dim=0)[owner] for owner, y in captions]
    return (torch.stack(image_to_text).mean() + torch.stack(text_to_image).mean()) / 2


def loss_of(objective, image, pos, mask, log_scale, text=None):
    output = {"image_features": image, "text_features": pos[:, 0] if text is None else text,
              "pos_text_features": pos, "logit_scale": log_scale.exp()}
    return objective(output, {"pos_mask": mask})


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


def test_multipos_matches_the_direct_definition_in_float64():
    image, pos, mask, log_scale = inputs()
    ours = loss_of(multipos(), image, pos, mask, log_scale)["multipos"]
    theirs = direct(image, pos, mask, log_scale.exp())
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads(ours, [image, pos, log_scale]),
                         grads(theirs, [image, pos, log_scale]), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["local", "ring"])
def test_padding_is_ignored_whatever_it_holds(backend):
    image, pos, mask, log_scale = inputs(seed=1)
    other = pos.detach().clone()
    other[~mask] = F.normalize(torch.randn(int((~mask).sum()), D, dtype=torch.float64), dim=-1)
    a = loss_of(multipos(backend), image, pos, mask, log_scale)["multipos"]
    b = loss_of(multipos(backend), image, other, mask, log_scale)["multipos"]
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert grads(a, [pos])[0][~mask].abs().max() == 0


@pytest.mark.parametrize("backend", ["local", "ring"])
def test_with_one_positive_per_image_it_is_the_clip_loss(backend):
    image, pos, _, log_scale = inputs(k=1, seed=2)
    mask = torch.ones(B, 1, dtype=torch.bool)
    ours = loss_of(multipos(backend), image, pos, mask, log_scale)["multipos"]
    theirs = clip()({"image_features": image, "text_features": pos[:, 0],
                     "logit_scale": log_scale.exp()}, {})["clip"]
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads(ours, [image, pos, log_scale]),
                         grads(theirs, [image, pos, log_scale]), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_more_positives_differ_from_clip_on_the_first_caption():
    image, pos, mask, log_scale = inputs(seed=3)
    ours = loss_of(multipos(), image, pos, mask, log_scale)["multipos"]
    first = clip()({"image_features": image, "text_features": pos[:, 0],
                    "logit_scale": log_scale.exp()}, {})["clip"]
    assert not torch.isclose(ours, first)


def test_gather_without_a_process_group_equals_local():
    image, pos, mask, log_scale = inputs(seed=4)
    torch.testing.assert_close(loss_of(multipos("gather"), image, pos, mask, log_scale),
                               loss_of(multipos("local"), image, pos, mask, log_scale),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tile_size", [RING_TILE, 1024], ids=["tiles", "one-tile"])
def test_ring_without_a_process_group_equals_local_values_and_gradients(tile_size):
    image, pos, mask, log_scale = inputs(seed=5)
    assert mask.sum(1).tolist() == [1, 2, 3, 4, 1, 2]  # 1 to K real captions per image
    ring = build_backend("ring", tile_size=tile_size)
    ours = ring.multi_positive(image, pos, mask, log_scale.exp())
    theirs = build_backend("local").multi_positive(image, pos, mask, log_scale.exp())
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads(ours, [image, pos, log_scale]),
                         grads(theirs, [image, pos, log_scale]), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_ring_tiles_in_float32_for_bfloat16_features():
    """Half-precision features are upcast once: the loss is the float32 loss of the rounded
    features, as the ring clip loss's."""
    image, pos, mask, log_scale = inputs(seed=6)
    image, pos = image.detach().bfloat16(), pos.detach().bfloat16()
    scale = log_scale.detach().float().exp()
    ours = build_backend("ring", tile_size=RING_TILE).multi_positive(image, pos, mask, scale)
    theirs = local_multipos_loss(image.double(), pos.double(), mask, scale.double())
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=1e-5)


def test_ring_under_autocast_still_computes_in_the_features_dtype():
    image, pos, mask, log_scale = (t.detach().float() if t.is_floating_point() else t
                                   for t in inputs(seed=7))
    ring = build_backend("ring", tile_size=RING_TILE)
    expected = ring.multi_positive(image, pos, mask, log_scale.exp())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual = ring.multi_positive(image, pos, mask, log_scale.exp())
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)


def test_without_positive_captions_in_the_output_the_error_says_what_to_set():
    image, pos, mask, log_scale = inputs()
    with pytest.raises(ValueError, match="data.captions: all"):
        multipos()({"image_features": image, "text_features": pos[:, 0],
                    "logit_scale": log_scale.exp()}, {})


def test_the_model_encodes_positive_captions_like_the_text():
    bundle = build_model("vlp-tiny")
    model = DualEncoder(bundle.model).eval()
    tokens = bundle.tokenizer(["a red circle", "a blue square", "a green star", "a red star"])
    pos_text = tokens.reshape(2, 2, -1)
    image = torch.zeros(2, 3, 64, 64)
    with torch.no_grad():
        output = model(image, tokens[::2], pos_text=pos_text)
    assert output["pos_text_features"].shape[:2] == (2, 2)
    torch.testing.assert_close(output["pos_text_features"][:, 0], output["text_features"])


def recipe(tmp_path: Path, objectives: list, **data) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"data": {"synth": {"num_train": 100}, **data},
                                    "model": {"name": "vlp-tiny"}, "objectives": objectives}))
    return path


def test_multipos_needs_captions_all(tmp_path):
    with pytest.raises(ConfigError, match=r"objectives\[0\]: objective multipos needs several "
                                          "positive captions.*data.captions: all"):
        load_run_config(recipe(tmp_path, [{"name": "multipos"}], captions="sample"))
    cfg = load_run_config(recipe(tmp_path, [{"name": "multipos"}], captions="all",
                                 num_positives=3))
    assert cfg.data.num_positives == 3


def test_captions_all_without_a_reader_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="data.captions: all gives positive captions that no "
                                          "objective reads"):
        load_run_config(recipe(tmp_path, [{"name": "clip"}], captions="all", num_positives=2))


@pytest.mark.parametrize("backend", ["local", "gather", "ring", "auto"])
def test_multipos_is_accepted_on_every_backend(tmp_path, backend):
    path = recipe(tmp_path, [{"name": "multipos"}], captions="all", num_positives=2)
    assert load_run_config(path, [f"loss.backend={backend}"]).loss.backend == backend
