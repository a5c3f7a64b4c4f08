"""Why an objective does or does not show its effect on ShapesWorld: six measurements.

    python benchmarks/shapesworld_diagnostics.py kinds [--samples 4000] [--num-negatives 3]
    python benchmarks/shapesworld_diagnostics.py forms [--samples 2000]
    python benchmarks/shapesworld_diagnostics.py probe RUN_OR_random [--scenes 3000]
    python benchmarks/shapesworld_diagnostics.py negatives RUN_OR_random [--samples 1000]
    python benchmarks/shapesworld_diagnostics.py pairs RUN_OR_random [--samples 2048] [--batch-size 128]
    python benchmarks/shapesworld_diagnostics.py geometry RUN_OR_random [--samples 1024] [--seed 0]

- `kinds`: which hard-negative kinds the sampled negatives of a training caption contain (the
  data pipeline's `pick_negatives`, as negclip training draws them), per kind and how often a
  swap (swap_att or swap_obj) or a relation edit is among them.
- `forms`: whether the evaluation set's swap_att negatives have the form of the training ones
  (colours swapped vs sizes swapped, sizes named or not), from the generator itself.
- `probe`: can the image tower bind colour to shape at 64 px? Logistic-regression probes on
  frozen image embeddings of two-object scenes (distinct colours and shapes): the colour of the
  object with the first shape in `SHAPES` order (50% for a probe that knows which two colours
  are present but not which shape wears which), and the relation of that object to the other
  (4 classes, 25%). A run folder, or `random` for the untrained tower (`--model`).
- `negatives`: on training samples, per kind, how often the model scores the caption above
  the hard negative (image-to-text cosine): what negclip's extra columns ask of it.
- `pairs`: in training batches, how each image relates to the batch's captions (its own, one
  naming the same objects, one sharing an object, none), their mean cosine and the share of
  the run's loss each kind carries (softmax mass for clip; the sigmoid terms for siglip, at the
  run's learned temperature and bias): where a loss spends itself.
- `geometry`: where each modality's embeddings sit on the sphere: the norm of each mean
  (‖μ‖ near 1: every input maps to nearly the same direction, a collapsed tower), the angle
  between the two means, the gap ‖μx − μy‖, matched and unmatched cosines, and the cosine of a
  matched pair once each modality's mean is removed (what the pair shares beyond the offset).
  `random` is the untrained model of `--model`, initialised with `--seed`.
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
from collections.abc import Sequence

from vlp.data.shapesworld import (
    COLORS,
    NEGATIVE_KINDS,
    RELATIONS,
    SHAPES,
    describe,
    hard_negative,
    make_train_sample,
    render_image,
    sample_rng,
    sample_scene,
)

SWAPS = ("swap_att", "swap_obj")
RELATION_KINDS = ("replace_rel", "swap_obj")


def kind_rates(samples: int, num_negatives: int, seed: int = 0) -> dict[str, float]:
    """Fractions over `samples` training captions (first `samples` indices of data seed
    `seed`) of negatives drawn as the pipeline draws them."""
    import json

    from vlp.data.pipeline import pick_negatives

    rng = random.Random(0)
    per_kind: collections.Counter = collections.Counter()
    with_swap = with_swap_att = with_rel = two_objects = picked = 0
    for index in range(samples):
        sample = make_train_sample(index, seed=seed)
        meta = json.dumps({"neg_captions": list(sample.neg_captions)})
        kinds_of = dict(zip(sample.neg_captions, sample.neg_kinds, strict=True))
        chosen = [kinds_of[t] for t in pick_negatives({"json": meta}, num_negatives, rng)]
        per_kind.update(chosen)
        picked += len(chosen)
        if len(sample.scene.objects) == 2:
            two_objects += 1
            with_swap += any(k in SWAPS for k in chosen)
            with_swap_att += "swap_att" in chosen
            with_rel += any(k in RELATION_KINDS for k in chosen)
    out = {f"share of picked negatives: {k}": per_kind[k] / picked for k in NEGATIVE_KINDS}
    out["two-object captions"] = two_objects / samples
    out["two-object captions with a swap among the picks"] = with_swap / max(1, two_objects)
    out["two-object captions with swap_att among the picks"] = with_swap_att / max(1, two_objects)
    out["two-object captions with a relation edit among the picks"] = with_rel / max(1, two_objects)
    out["all captions with swap_att among the picks"] = with_swap_att / samples
    return out


def swap_forms(samples: int) -> dict[str, dict[str, float]]:
    """How swap_att negatives are made in training samples and in the SugarCrepe-format set."""
    from vlp.data.shapesworld import parse_caption

    def form(caption: str, negative: str) -> str:
        a, b = parse_caption(caption).mentions, parse_caption(negative).mentions
        what = "colours" if a[0].color != b[0].color else "sizes"
        return f"{what} swapped, sizes {'named' if a[0].size else 'not named'}"

    train: collections.Counter = collections.Counter()
    for index in range(samples):
        s = make_train_sample(index, seed=0)
        for text, kind in zip(s.neg_captions, s.neg_kinds, strict=True):
            if kind == "swap_att":
                train[form(s.caption, text)] += 1
    evaluation: collections.Counter = collections.Counter()
    for index in range(samples):
        rng = sample_rng(0, "sugarcrepe", index)
        scene = sample_scene(rng, num_objects=1 + (rng.random() < 2 / 3))
        caption = describe(scene, rng)
        negative = hard_negative("swap_att", scene, caption, rng)
        if negative is not None:
            evaluation[form(caption.render(), negative)] += 1
    return {name: {k: v / sum(c.values()) for k, v in sorted(c.items())}
            for name, c in (("train", train), ("eval", evaluation))}


def _encoder(run: str, model_name: str, seed: int = 0):
    import torch

    if run == "random":
        from vlp.models import build_tokenizer, create_model, model_spec
        from vlp.models.loading import Encoder

        torch.manual_seed(seed)
        spec = model_spec(model_name)
        model, _, preprocess = create_model(spec)
        return Encoder(model, spec).eval(), preprocess, build_tokenizer(spec.text)
    from vlp.models.loading import load

    return load(run)


def _embed_images(encoder, preprocess, images, batch: int = 256):
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = torch.stack([preprocess(im) for im in images[i:i + batch]])
            out.append(encoder.encode_image(x))
    return torch.cat(out).numpy()


def binding_probe(run: str, scenes: int, model_name: str) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression

    encoder, preprocess, _ = _encoder(run, model_name)
    images, colour, relation = [], [], []
    index = 0
    while len(images) < scenes:
        rng = sample_rng(7, "probe", index)
        index += 1
        scene = sample_scene(rng, num_objects=2)
        a, b = scene.objects
        if a.color == b.color or a.shape == b.shape:
            continue
        first = 0 if SHAPES.index(a.shape) < SHAPES.index(b.shape) else 1
        rel = scene.relation if first == 0 else _inverse(scene.relation)
        images.append(render_image(scene))
        colour.append(list(COLORS).index(scene.objects[first].color))
        relation.append(RELATIONS.index(rel))
    features = _embed_images(encoder, preprocess, images)
    split = int(0.75 * len(images))
    out = {}
    for name, labels in (("colour of the first shape (bound colour)", colour),
                         ("relation of the first shape to the other", relation)):
        probe = LogisticRegression(max_iter=2000, C=10.0)
        probe.fit(features[:split], labels[:split])
        out[name] = float(probe.score(features[split:], labels[split:]))
    return out


def _inverse(relation: str) -> str:
    from vlp.data.shapesworld import INVERSE_RELATION

    return INVERSE_RELATION[relation]


def training_negatives(run: str, samples: int, model_name: str) -> dict[str, float]:
    import torch

    encoder, preprocess, tokenizer = _encoder(run, model_name)
    data = [make_train_sample(i, seed=0) for i in range(samples)]
    image_features = torch.from_numpy(
        _embed_images(encoder, preprocess, [render_image(s.scene) for s in data]))
    right: collections.Counter = collections.Counter()
    total: collections.Counter = collections.Counter()
    text_cos: collections.Counter = collections.Counter()
    with torch.no_grad():
        for s, x in zip(data, image_features, strict=True):
            texts = tokenizer([s.caption, *s.neg_captions])
            y = encoder.encode_text(texts)
            scores = y @ x
            for kind, score, neg in zip(s.neg_kinds, scores[1:], y[1:], strict=True):
                total[kind] += 1
                right[kind] += bool(scores[0] > score)
                text_cos[kind] += float(neg @ y[0])
    return {kind: f"caption ranked above it {right[kind] / total[kind]:.3f}, "
                  f"cos(caption, negative) {text_cos[kind] / total[kind]:.3f}"
            for kind in NEGATIVE_KINDS if total[kind]}


def _names(scene) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((o.color, o.shape) for o in scene.objects))


PAIR_KINDS = ("matched", "same names", "one name shared", "disjoint")
"""How an image and another sample's caption in its batch relate: the caption is its own
(`matched`), names the same colour-shape objects (`same names`: naming alone cannot reject
it; it differs only in sizes, relation or wording), shares one colour-shape object, or none."""


def _pair_kind(a, b) -> str:
    if a == b:
        return "same names"
    return "one name shared" if set(a) & set(b) else "disjoint"


def batch_pairs(run: str, samples: int, batch: int, model_name: str) -> dict[str, str]:
    """On training batches of `batch` samples: per image, how many of the batch's other
    captions are of each `PAIR_KINDS`, their mean cosine, and the share each kind takes of the
    run's own loss: softmax probability mass (clip) or the sigmoid terms' sum (siglip, with the
    model's learned temperature and bias)."""
    import torch

    encoder, preprocess, tokenizer = _encoder(run, model_name)
    data = [make_train_sample(i, seed=0) for i in range(samples - samples % batch)]
    x = torch.from_numpy(_embed_images(encoder, preprocess, [render_image(s.scene) for s in data]))
    with torch.no_grad():
        y = torch.cat([encoder.encode_text(tokenizer([s.caption for s in data[i:i + batch]]))
                       for i in range(0, len(data), batch)])
        scale = encoder.logit_scale.exp().item()
        bias = getattr(encoder.model, "logit_bias", None)
    bias = None if bias is None else float(bias)
    count: collections.Counter = collections.Counter()
    cos: collections.Counter = collections.Counter()
    share: collections.Counter = collections.Counter()
    for start in range(0, len(data), batch):
        names = [_names(s.scene) for s in data[start:start + batch]]
        sims = x[start:start + batch] @ y[start:start + batch].T
        logits = scale * sims
        if bias is None:  # softmax over the row: each caption's probability
            weight = logits.softmax(dim=1)
        else:  # each pair's own sigmoid loss term
            labels = 2 * torch.eye(len(names)) - 1
            weight = -torch.nn.functional.logsigmoid(labels * (logits + bias))
        for i, a in enumerate(names):
            for j, b in enumerate(names):
                kind = "matched" if i == j else _pair_kind(a, b)
                count[kind] += 1
                cos[kind] += float(sims[i, j])
                share[kind] += float(weight[i, j])
    rows = len(data)
    total = sum(share.values())
    what = "softmax mass" if bias is None else "share of the sigmoid loss"
    out = {"temperature (logit scale)": f"{scale:.2f}"
           + ("" if bias is None else f", bias {bias:.2f} (a pair scores positive above "
                                       f"cosine {-bias / scale:.3f})")}
    for kind in PAIR_KINDS:
        out[kind] = (f"{count[kind] / rows:.2f} per row, mean cosine {cos[kind] / count[kind]:.3f}, "
                     f"{what} {share[kind] / total:.3f}")
    return out


def embedding_geometry(x, y) -> dict[str, float]:
    """Geometry of matched, L2-normalised embeddings x[i] <-> y[i] (torch tensors, (N, D))."""
    import torch

    mx, my = x.mean(0), y.mean(0)
    sims = x @ y.T
    off_diagonal = ~torch.eye(len(x), dtype=torch.bool)
    residual = torch.nn.functional.cosine_similarity(x - mx, y - my, dim=1)
    return {"image mean norm ‖μx‖": float(mx.norm()), "text mean norm ‖μy‖": float(my.norm()),
            "cos(μx, μy)": float(torch.nn.functional.cosine_similarity(mx, my, dim=0)),
            "gap ‖μx − μy‖": float((mx - my).norm()),
            "matched cosine": float(sims.diagonal().mean()),
            "unmatched cosine": float(sims[off_diagonal].mean()),
            "matched cosine after removing each mean": float(residual.mean())}


def geometry(run: str, samples: int, model_name: str, seed: int) -> dict[str, float]:
    """`embedding_geometry` of a run (or an untrained model) on the first `samples` training
    samples of data seed 0."""
    import torch

    encoder, preprocess, tokenizer = _encoder(run, model_name, seed)
    if run == "random":  # as training sees it: BatchNorm on batch statistics, not on the
        encoder.train()  # untrained running ones (which map every image to one point)
    data = [make_train_sample(i, seed=0) for i in range(samples)]
    x = torch.from_numpy(_embed_images(encoder, preprocess, [render_image(s.scene) for s in data]))
    with torch.no_grad():
        y = torch.cat([encoder.encode_text(tokenizer([s.caption for s in data[i:i + 256]]))
                       for i in range(0, len(data), 256)])
    return embedding_geometry(x, y)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    kinds = sub.add_parser("kinds")
    kinds.add_argument("--samples", type=int, default=4000)
    kinds.add_argument("--num-negatives", type=int, default=3)
    forms = sub.add_parser("forms")
    forms.add_argument("--samples", type=int, default=2000)
    for name, default in (("probe", 3000), ("negatives", 1000), ("pairs", 2048),
                          ("geometry", 1024)):
        p = sub.add_parser(name)
        p.add_argument("run", help="a run or checkpoint folder, or 'random'")
        p.add_argument("--model", default="vlp-tiny-rn", help="architecture for 'random'")
        p.add_argument("--scenes" if name == "probe" else "--samples", type=int,
                       default=default, dest="count")
        if name == "pairs":
            p.add_argument("--batch-size", type=int, default=128)
        if name == "geometry":
            p.add_argument("--seed", type=int, default=0, help="initialisation of 'random'")
    args = parser.parse_args(argv)
    commands = {
        "kinds": lambda: kind_rates(args.samples, args.num_negatives),
        "forms": lambda: swap_forms(args.samples),
        "probe": lambda: binding_probe(args.run, args.count, args.model),
        "negatives": lambda: training_negatives(args.run, args.count, args.model),
        "pairs": lambda: batch_pairs(args.run, args.count, args.batch_size, args.model),
        "geometry": lambda: geometry(args.run, args.count, args.model, args.seed),
    }
    result = commands[args.command]()
    for key, value in result.items():
        print(f"{key}: {f'{value:.3f}' if isinstance(value, float) else value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
