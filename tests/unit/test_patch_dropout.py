"""FLIP token dropping (`model.patch_dropout`): a ViT image tower trains on a random share of its
patches and evaluates on all of them, also after a checkpoint is saved and loaded."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.transformer import PatchDropout

import vlp
from vlp import checkpoint
from vlp.cli import main
from vlp.config import ConfigError, dump_config, load_config
from vlp.eval import load_model
from vlp.export import export_checkpoint
from vlp.models import build_model, model_spec
from vlp.train.checks import check_config
from vlp.train.grad_cache import RngState

ROOT = Path(__file__).resolve().parents[2]
FLIP = ROOT / "recipes" / "shapesworld-tiny-flip.yaml"
PATCHES = (64 // 8) ** 2  # vlp-tiny: 64 px images, 8 px patches


def tokens_seen(model: torch.nn.Module, images: torch.Tensor) -> int:
    """How many tokens (class token included) the image tower's transformer gets."""
    seen = []
    hook = model.visual.transformer.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].shape[1]))  # batch first: (B, tokens, width)
    try:
        with torch.no_grad():
            model.encode_image(images)
    finally:
        hook.remove()
    (count,) = seen
    return count


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_in_training_the_vit_sees_the_kept_share_of_patches_and_in_eval_all(ratio, images):
    model = build_model("vlp-tiny", patch_dropout=ratio).model

    assert tokens_seen(model.train(), images) == int(PATCHES * (1 - ratio)) + 1
    assert tokens_seen(model.eval(), images) == PATCHES + 1


def test_each_training_forward_drops_other_patches(images):
    model = build_model("vlp-tiny", patch_dropout=0.5).model.train()
    with torch.no_grad():
        first, second = model.encode_image(images), model.encode_image(images)
    assert not torch.allclose(first, second)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), model.encode_image(images))


def test_zero_builds_no_patch_dropout_and_leaves_the_architecture_as_it_was(images):
    model = build_model("vlp-tiny", patch_dropout=0.0).model
    assert not any(isinstance(m, PatchDropout) for m in model.modules())
    assert tokens_seen(model.train(), images) == PATCHES + 1
    assert "patch_dropout" not in model_spec("vlp-tiny").model_cfg["vision_cfg"]


def test_the_recipe_drops_half_the_patches_of_the_tiny_vit():
    cfg = load_config(FLIP)
    check_config(cfg)
    assert (cfg.model.name, cfg.model.patch_dropout) == ("vlp-tiny", 0.5)
    assert load_config(FLIP, ["model.patch_dropout=0"]).model.patch_dropout == 0.0


@pytest.mark.parametrize("value", ["1", "1.5", "-0.1", ".nan", "half"])
def test_a_ratio_outside_0_to_1_is_one_line_naming_the_key(value):
    with pytest.raises(ConfigError) as err:
        load_config(FLIP, [f"model.patch_dropout={value}"])
    message = str(err.value)
    assert "model.patch_dropout" in message and "\n" not in message, message


def test_a_model_without_a_vit_image_tower_is_refused_in_one_line():
    cfg = load_config(ROOT / "recipes" / "shapesworld-tiny.yaml", ["model.patch_dropout=0.5"])
    assert cfg.model.name == "vlp-tiny-rn"
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    message = str(err.value)
    assert message.startswith("model.patch_dropout: 'vlp-tiny-rn' has no ViT image tower")
    assert "\n" not in message
    with pytest.raises(ValueError, match="model.patch_dropout"):
        build_model("vlp-tiny-rn", patch_dropout=0.5)


@pytest.mark.parametrize("recipe, ratio", [("shapesworld-tiny-flip", "1.0"),
                                            ("shapesworld-tiny", "0.5")])
def test_vlp_train_stops_before_the_run_with_one_line(recipe, ratio, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", recipe, f"model.patch_dropout={ratio}", f"output_dir={run}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("vlp train: error: model.patch_dropout") and err.count("\n") == 1, err
    assert not run.exists()


def test_a_fully_locked_image_tower_is_refused_and_a_partly_locked_one_is_not():
    with pytest.raises(ConfigError, match="model.patch_dropout has no effect"):
        load_config(FLIP, ["model.lock_image=true"])
    cfg = load_config(FLIP, ["model.lock_image=true", "model.lock_image_unlocked_groups=1"])
    assert cfg.model.patch_dropout == 0.5


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """(the model in eval mode, its checkpoint), built and saved as training does from the
    flip recipe."""
    cfg = load_config(FLIP)
    torch.manual_seed(0)
    bundle = build_model(cfg.model)
    ckpt = checkpoint.save_checkpoint(
        tmp_path_factory.mktemp("run"), step=1, model=bundle.model,
        optimizer=torch.optim.AdamW(bundle.model.parameters()), trainer_state={},
        model_info=bundle.spec.model_info(), config_yaml=dump_config(cfg), keep_last=1,
        files=bundle.spec.checkpoint_files())
    return bundle.model.eval(), ckpt


def test_a_loaded_checkpoint_evaluates_on_every_patch_and_keeps_the_ratio(saved, images):
    model, ckpt = saved
    with torch.no_grad():
        expected = model.encode_image(images, normalize=True)

    loaded, _, _ = vlp.load(ckpt)
    for_eval = load_model(str(ckpt)).model  # what `vlp eval` runs

    assert not loaded.training and not for_eval.training
    assert tokens_seen(loaded.model, images) == tokens_seen(for_eval, images) == PATCHES + 1
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(images), expected, atol=1e-6)
    # the architecture and the run config both still carry the ratio
    assert loaded.spec.model_cfg["vision_cfg"]["patch_dropout"] == 0.5
    assert tokens_seen(loaded.model.train(), images) == PATCHES // 2 + 1
    assert load_config(ckpt / "config.yaml").model == load_config(FLIP).model


def test_the_open_clip_export_keeps_the_ratio_and_the_hf_export_is_allowed(saved, images,
                                                                           tmp_path):
    model, ckpt = saved
    out = export_checkpoint(ckpt, tmp_path / "oc", format="open_clip")
    exported = open_clip.create_model_and_transforms(f"local-dir:{out}")[0]
    assert exported.visual.patch_dropout.prob == 0.5
    assert tokens_seen(exported.train(), images) == PATCHES // 2 + 1
    with torch.no_grad():
        assert torch.allclose(exported.eval().encode_image(images, normalize=True),
                              model.encode_image(images, normalize=True), atol=1e-6)
    # a transformers CLIPModel has no patch dropout, and needs none for inference
    assert (export_checkpoint(ckpt, tmp_path / "hf", format="hf") / "config.json").is_file()


def test_the_gradient_cache_replays_the_same_patches(images):
    """The gradient cache embeds each micro-batch twice, without and then with grad, replaying
    the RNG state of the first forward: the second must drop the same patches."""
    model = build_model("vlp-tiny", patch_dropout=0.5).model.train()
    state = RngState.capture(torch.device("cpu"))
    with torch.no_grad():
        recorded = model.encode_image(images)
        other = model.encode_image(images)
        with state.replay():
            replayed = model.encode_image(images)
    assert torch.equal(replayed, recorded)
    assert not torch.allclose(other, recorded)
