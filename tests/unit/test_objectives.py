"""Objectives: parity with open_clip's losses and with direct formulas, registry-wide smoke
tests, recipe loading, config errors, and greedy CoCa captioning."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from open_clip.loss import ClipLoss, CoCaLoss, SigLipLoss

from vlp.config import ConfigError, ObjectiveSpec
from vlp.distributed import build_backend
from vlp.models import DualEncoder, build_model
from vlp.models.captioning import generate_captions
from vlp.objectives import OBJECTIVES, build_objectives
from vlp.objectives.align_uniform import AlignUniformObjective
from vlp.train.checks import load_run_config

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
TOL = {"rtol": 1e-5, "atol": 1e-5}
B, D, K, L, V = 8, 16, 3, 12, 50  # batch, feature dim, negatives, caption length, vocab


def objective(name: str, **params):
    return build_objectives([ObjectiveSpec(name, params=params)], backend=build_backend("local"))


def leaves(seed: int = 0, *, negatives: bool = False) -> dict[str, torch.Tensor]:
    """Normalised features and the scalar parameters, as leaves that collect gradients."""
    g = torch.Generator().manual_seed(seed)
    raw = {"image_features": torch.randn(B, D, generator=g),
           "text_features": torch.randn(B, D, generator=g)}
    if negatives:
        raw["neg_text_features"] = torch.randn(B, K, D, generator=g)
    out = {k: F.normalize(v, dim=-1).requires_grad_() for k, v in raw.items()}
    out["log_scale"] = torch.tensor(math.log(10.0), requires_grad=True)
    out["logit_bias"] = torch.tensor(-3.0, requires_grad=True)
    return out


def model_output(p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {k: v for k, v in p.items() if k != "log_scale"}
    out["logit_scale"] = p["log_scale"].exp()
    return out


def grads(loss: torch.Tensor, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    names = list(tensors)
    return dict(zip(names, torch.autograd.grad(loss, [tensors[n] for n in names]), strict=True))


def assert_same_loss_and_grads(ours, theirs, tensors):
    torch.testing.assert_close(ours, theirs, **TOL)
    got, want = grads(ours, tensors), grads(theirs, tensors)
    for name in tensors:
        torch.testing.assert_close(got[name], want[name], **TOL, msg=f"gradient of {name}")


# ---------------------------------------------------------------- parity with open_clip


def test_clip_matches_open_clip_loss_and_gradients():
    p = leaves()
    ours = objective("clip")(model_output(p), {})["loss"]
    theirs = ClipLoss()(p["image_features"], p["text_features"], p["log_scale"].exp())
    tensors = {k: p[k] for k in ("image_features", "text_features", "log_scale")}
    assert_same_loss_and_grads(ours, theirs, tensors)


def test_siglip_matches_open_clip_loss_and_gradients():
    p = leaves()
    terms = objective("siglip")(model_output(p), {})
    theirs = SigLipLoss()(p["image_features"], p["text_features"], p["log_scale"].exp(),
                          p["logit_bias"])
    assert set(terms) == {"siglip", "loss"}
    tensors = {k: p[k] for k in ("image_features", "text_features", "log_scale", "logit_bias")}
    assert_same_loss_and_grads(terms["loss"], theirs, tensors)


def caption_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder logits (B, L-1, V) and labels (B, L-1) padded with 0 after a per-row length."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, L - 1, V, generator=g).requires_grad_()
    labels = torch.randint(1, V, (B, L - 1), generator=g)
    for row, length in enumerate(torch.randint(2, L - 1, (B,), generator=g).tolist()):
        labels[row, length:] = 0
    return logits, labels


@pytest.mark.parametrize("contrastive_weight, caption_weight", [(1.0, 2.0), (0.5, 3.0), (0.0, 1.0)])
def test_coca_matches_open_clip_loss_and_gradients_with_padding(contrastive_weight, caption_weight):
    p = leaves()
    logits, labels = caption_batch()
    output = {**model_output(p), "logits": logits, "labels": labels}
    terms = objective("coca", contrastive_weight=contrastive_weight,
                      caption_weight=caption_weight)(output, {})
    clip_term, caption_term = CoCaLoss(caption_loss_weight=caption_weight,
                                       clip_loss_weight=contrastive_weight, pad_id=0)(
        p["image_features"], p["text_features"], logits, labels, p["log_scale"].exp())
    torch.testing.assert_close(terms["coca_contrastive"], clip_term.float(), **TOL)
    torch.testing.assert_close(terms["coca_caption"], caption_term, **TOL)
    tensors = {k: p[k] for k in ("image_features", "text_features", "log_scale")}
    tensors["logits"] = logits
    if not contrastive_weight:  # open_clip's zero term has no graph; only the caption term does
        tensors = {"logits": logits}
    assert_same_loss_and_grads(terms["loss"], clip_term + caption_term, tensors)


def test_coca_caption_loss_ignores_padded_positions():
    p = leaves()
    logits, labels = caption_batch()
    output = {**model_output(p), "logits": logits, "labels": labels}
    before = objective("coca")(output, {})["coca_caption"]
    changed = logits.detach().clone()
    changed[labels == 0] = 100.0 * torch.randn_like(changed[labels == 0])
    after = objective("coca")({**output, "logits": changed}, {})["coca_caption"]
    torch.testing.assert_close(before, after)
    (grad,) = torch.autograd.grad(before, logits)
    assert grad[labels == 0].abs().max() == 0 and grad[labels != 0].abs().max() > 0


# ---------------------------------------------------------------- direct formulas


def test_negclip_equals_negatives_as_extra_image_to_text_columns():
    p = leaves(negatives=True)
    ours = objective("negclip")(model_output(p), {"neg_text": None})["loss"]

    x, y, n, s = p["image_features"], p["text_features"], p["neg_text_features"], p["log_scale"]
    labels = torch.arange(B)
    columns = torch.cat([y, n.reshape(B * K, D)])  # (B + B·K, D): negatives of every image
    image_to_text = F.cross_entropy(s.exp() * x @ columns.T, labels)
    text_to_image = F.cross_entropy(s.exp() * y @ x.T, labels)  # negatives are never rows
    direct = (image_to_text + text_to_image) / 2

    tensors = {k: p[k] for k in ("image_features", "text_features", "neg_text_features",
                                 "log_scale")}
    assert_same_loss_and_grads(ours, direct, tensors)


def test_negclip_with_negatives_is_larger_than_clip_on_the_same_pairs():
    p = leaves(negatives=True)
    with torch.no_grad():
        negclip = objective("negclip")(model_output(p), {})["loss"]
        clip = objective("clip")(model_output(p), {})["loss"]
    assert negclip > clip


def test_negclip_without_negatives_in_the_output_raises_a_clear_error():
    p = leaves()
    with pytest.raises(ValueError, match="negclip.*neg_text_features.*data.num_negatives"):
        objective("negclip")(model_output(p), {})


def wang_isola(x, y, *, alpha, t):
    """Reference formulas (Wang & Isola's published code, plus cross pairs i != j)."""
    align = (x - y).norm(p=2, dim=1).pow(alpha).mean()
    uniform_x = torch.pdist(x, p=2).pow(2).mul(-t).exp().mean().log()
    uniform_y = torch.pdist(y, p=2).pow(2).mul(-t).exp().mean().log()
    off_diagonal = ~torch.eye(len(x), dtype=torch.bool)
    cross = torch.cdist(x, y, p=2).pow(2)[off_diagonal].mul(-t).exp().mean().log()
    return align, uniform_x, uniform_y, cross


@pytest.mark.parametrize("alpha, t", [(2.0, 2.0), (1.0, 3.0), (3.0, 0.5)])
def test_align_uniform_matches_the_direct_formulas(alpha, t):
    p = leaves()
    x, y = p["image_features"], p["text_features"]
    terms = objective("align_uniform", alpha=alpha, t=t, align_weight=0.7, uniform_weight=0.5,
                      cross_uniform_weight=2.0)(model_output(p), {})
    align, uniform_x, uniform_y, cross = wang_isola(x, y, alpha=alpha, t=t)
    expected = {"align": 0.7 * align, "uniform_image": 0.5 * uniform_x,
                "uniform_text": 0.5 * uniform_y, "uniform_cross": 2.0 * cross}
    assert set(terms) == {*expected, "loss"}
    for name, value in expected.items():
        torch.testing.assert_close(terms[name], value, **TOL, msg=name)
    assert_same_loss_and_grads(terms["loss"], sum(expected.values()), {"x": x, "y": y})


def test_align_uniform_defaults_are_alignment_plus_mean_uniformity_without_cross_term():
    p = leaves()
    terms = objective("align_uniform")(model_output(p), {})
    align, uniform_x, uniform_y, _ = wang_isola(p["image_features"], p["text_features"],
                                                alpha=2, t=2)
    assert set(terms) == {"align", "uniform_image", "uniform_text", "loss"}
    torch.testing.assert_close(terms["loss"], align + (uniform_x + uniform_y) / 2, **TOL)


def test_align_uniform_is_finite_on_identical_embeddings():
    x = F.normalize(torch.ones(4, D), dim=-1).requires_grad_()
    terms = objective("align_uniform", cross_uniform_weight=1.0)(
        {"image_features": x, "text_features": x}, {})
    (grad,) = torch.autograd.grad(terms["loss"], x)
    assert torch.isfinite(terms["loss"]) and torch.isfinite(grad).all()


def test_clip_plus_weighted_align_uniform_sums_as_the_recipe_says():
    p = leaves()
    both = build_objectives(
        [ObjectiveSpec("clip"), ObjectiveSpec("align_uniform", 0.5, {"alpha": 2, "t": 2})],
        backend=build_backend("local"))(model_output(p), {})
    extra = both["align"] + both["uniform_image"] + both["uniform_text"]
    torch.testing.assert_close(both["loss"], both["clip"] + 0.5 * extra)


# ---------------------------------------------------------------- every registered objective


@pytest.fixture(scope="module")
def tiny_coca():
    torch.manual_seed(0)
    return build_model("vlp-tiny-coca", init_logit_bias=-10.0)


@pytest.fixture(scope="module")
def tiny_step(tiny_coca):
    """A real batch for the tiny CoCa: every output any objective reads (bias, logits, negatives,
    positives: the first of each image's two is its caption, the second padding for one image)."""
    tokenizer = tiny_coca.tokenizer
    captions = ["a red square", "a small blue circle left of a green triangle",
                "a big yellow star", "a purple square above a red circle"]
    negatives = [["a blue square", "a red circle"]] * len(captions)
    positives = [[c, "a shape"] for c in captions]
    return {"image": torch.randn(len(captions), 3, 64, 64), "text": tokenizer(captions),
            "neg_text": torch.stack([tokenizer(n) for n in negatives]),
            "pos_text": torch.stack([tokenizer(p) for p in positives]),
            "pos_mask": torch.tensor([[True, True]] * 3 + [[True, False]]), "key": list("abcd")}


def step_output(model, step):
    return model(step["image"], step["text"], step["neg_text"], pos_text=step["pos_text"])


def test_objective_term_names_are_unique_across_objectives(tiny_coca, tiny_step):
    model = DualEncoder(tiny_coca.model)
    with torch.no_grad():
        output = step_output(model, tiny_step)
    seen: dict[str, str] = {}
    for name in OBJECTIVES:
        params = {"cross_uniform_weight": 1.0} if name == "align_uniform" else {}
        for term in objective(name, **params)(output, tiny_step):
            assert term == "loss" or term not in seen, f"{name} and {seen.get(term)}: {term}"
            seen[term] = name


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_objective_trains_a_tiny_model_one_step(name, tiny_coca, tiny_step):
    cls = OBJECTIVES[name]
    assert cls.requires <= {"neg_text", "neg_image", "pos_text"}
    assert getattr(cls, "requires_outputs", set()) <= {"logit_bias", "logits"}
    cls.Config()  # every parameter has a default

    model = DualEncoder(tiny_coca.model)
    model.zero_grad()
    output = step_output(model, tiny_step)
    terms = objective(name)(output, tiny_step)
    assert len(terms) >= 2  # at least one named term, plus "loss"
    for term, value in terms.items():
        assert value.dim() == 0 and torch.isfinite(value), (term, value)
    terms["loss"].backward()
    visual_grads = [p.grad for p in model.model.visual.parameters() if p.grad is not None]
    assert visual_grads and all(torch.isfinite(g).all() for g in visual_grads)
    assert any(g.abs().sum() > 0 for g in visual_grads)


# ---------------------------------------------------------------- recipes and config errors


def placeholder(recipe: Path, section: str, key: str) -> str | None:
    """The recipe's value of section.key when it is a /path/to/... the user must replace."""
    value = (yaml.safe_load(recipe.read_text()).get(section) or {}).get(key)
    return value if isinstance(value, str) and value.startswith("/path/to/") else None


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_loads(recipe, tmp_path):
    shards = placeholder(recipe, "data", "shards")
    if shards is None:
        load_run_config(recipe)
        return
    with pytest.raises(ConfigError, match=f"data.shards: shard not found: {shards.split('{')[0]}"):
        load_run_config(recipe)
    shard = tmp_path / "train-0.tar"
    shard.write_bytes(b"")
    overrides = [f"data.shards={shard}"]
    if placeholder(recipe, "model", "pretrained"):  # a weights file the user gives
        weights = tmp_path / "weights.safetensors"
        weights.write_bytes(b"")
        overrides.append(f"model.pretrained={weights}")
    cfg = load_run_config(recipe, overrides)
    assert cfg.data.shards == str(shard)


def test_objective_recipes_pick_their_objectives_and_model_outputs(tmp_path):
    shard, weights = tmp_path / "s.tar", tmp_path / "w.safetensors"
    shard.write_bytes(b"")
    weights.write_bytes(b"")
    over = [f"data.shards={shard}"]
    finetune = [*over, f"model.pretrained={weights}"]
    siglip = load_run_config(RECIPES / "siglip-vit-b16.yaml", over)
    assert siglip.model.init_logit_bias == -10 and math.isclose(
        siglip.model.init_logit_scale, math.log(10), rel_tol=1e-6)
    coca = load_run_config(RECIPES / "coca-vit-b32.yaml", over)
    assert coca.model.name == "coca_ViT-B-32"
    params = coca.objectives[0].params
    assert (params["contrastive_weight"], params["caption_weight"]) == (1.0, 2.0)
    negclip = load_run_config(RECIPES / "negclip-finetune.yaml", finetune)
    assert negclip.data.num_negatives >= 1 and negclip.optim.lr == 1e-6
    gap = load_run_config(RECIPES / "gap-cua.yaml", finetune)
    assert [o.name for o in gap.objectives] == ["clip", "align_uniform"]


def recipe(tmp_path: Path, objectives: list, **model) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"data": {"synth": {"num_train": 100}},
                                    "model": {"name": "vlp-tiny", **model},
                                    "objectives": objectives}))
    return path


def test_negclip_without_negatives_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"objectives\[0\]: objective 'negclip' needs "
                                          r"hard-negative captions.*data.num_negatives > 0"):
        load_run_config(recipe(tmp_path, [{"name": "negclip"}]), ["data.num_negatives=0"])
    load_run_config(recipe(tmp_path, [{"name": "negclip"}]), ["data.num_negatives=2"])


def test_siglip_without_logit_bias_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"objectives\[0\]: objective 'siglip' needs the model "
                                          r"output 'logit_bias'.*model.init_logit_bias"):
        load_run_config(recipe(tmp_path, [{"name": "siglip"}]))
    load_run_config(recipe(tmp_path, [{"name": "siglip"}], init_logit_bias=-10))


def test_coca_with_a_non_coca_model_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"objectives\[1\]: objective 'coca' needs the model "
                                          r"output 'logits'.*vlp-tiny-coca"):
        load_run_config(recipe(tmp_path, [{"name": "clip"}, {"name": "coca"}]))
    load_run_config(recipe(tmp_path, [{"name": "coca"}]), ["model.name=vlp-tiny-coca"])


@pytest.mark.parametrize("params, message", [
    ({"caption_wieght": 2}, r"unknown key 'objectives\[0\].caption_wieght'"),
    ({"caption_weight": "two"}, r"objectives\[0\].caption_weight: expected float"),
])
def test_bad_coca_parameter_is_named(tmp_path, params, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(recipe(tmp_path, [{"name": "coca", **params}]),
                    ["model.name=vlp-tiny-coca"])


def test_non_positive_align_uniform_scale_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"objectives\[0\]: .*align_uniform: t must be > 0, got 0"):
        load_run_config(recipe(tmp_path, [{"name": "align_uniform", "t": 0}]))
    with pytest.raises(ValueError, match="align_uniform: alpha must be > 0"):
        AlignUniformObjective.Config(alpha=-1.0)


# ---------------------------------------------------------------- CoCa captioning


def test_generate_captions_returns_one_string_per_image(tiny_coca):
    images = torch.randn(3, 3, 64, 64)
    captions = generate_captions(tiny_coca.model, tiny_coca.tokenizer, images, max_length=5)
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
    assert captions == generate_captions(tiny_coca.model, tiny_coca.tokenizer, images,
                                         max_length=5)
    assert tiny_coca.model.training  # the model's mode is restored


def test_generate_captions_matches_open_clip_greedy_generate(tiny_coca, monkeypatch):
    coca_model = pytest.importorskip("open_clip.coca_model")
    if not coca_model._has_transformers:
        # open_clip switches generation off when transformers lacks BeamSearchScorer (>= 5),
        # though top-k generation needs only the logits processors, which still import.
        transformers = pytest.importorskip("transformers")
        if not all(hasattr(coca_model, n) for n in ("LogitsProcessorList", "MaxLengthCriteria")):
            pytest.skip("open_clip's generation helpers are unavailable")
        monkeypatch.setattr(coca_model, "_has_transformers", True)
        monkeypatch.setitem(coca_model.GENERATION_TYPES, "top_k", transformers.TopKLogitsWarper)
    model = tiny_coca.model
    with torch.no_grad():  # random init leaves the decoder's output projection at zero
        saved = model.text_decoder.text_projection.detach().clone()
        model.text_decoder.text_projection.normal_(std=0.5)
    try:
        images = torch.randn(2, 3, 64, 64)
        ours = generate_captions(model, tiny_coca.tokenizer, images, max_length=7)
        tokens = model.generate(images, seq_len=7, max_seq_len=model.context_length,
                                generation_type="top_k", top_k=1, min_seq_len=0)
    finally:
        with torch.no_grad():
            model.text_decoder.text_projection.copy_(saved)
    eot = tiny_coca.tokenizer.eot_token_id
    theirs = []
    for row in tokens[:, 1:].tolist():
        row = row[: row.index(eot)] if eot in row else row
        theirs.append(tiny_coca.tokenizer.decode(row).strip())
    assert ours == theirs and all(ours)


def test_generate_captions_rejects_a_model_without_a_caption_decoder(tiny_coca):
    with pytest.raises(TypeError, match="CoCa model"):
        generate_captions(DualEncoder(tiny_coca.model), tiny_coca.tokenizer,
                          torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="max_length"):
        generate_captions(tiny_coca.model, tiny_coca.tokenizer, torch.randn(1, 3, 64, 64),
                          max_length=100)
