"""ARO's COCO/Flickr30k-Order: perturbations (vlp.eval.perturbations), word-class tagging
(vlp.eval.tagging) and precision@1 scoring (vlp.eval.order), under ARO's protocol and vlp's
strict one."""

from __future__ import annotations

import importlib.util
import itertools
import random

import pytest
import torch
from PIL import Image

from vlp.data.shapesworld import (
    COLORS,
    PREFIXES,
    RELATION_PHRASES,
    SHAPES,
    SIZES,
    SUFFIXES,
    describe,
    sample_rng,
    sample_scene,
)
from vlp.eval.benchmark_data import write_benchmark
from vlp.eval.order import aro_precision_at_1, evaluate_order, strict_order_metrics
from vlp.eval.perturbations import (
    PERTURBATIONS,
    make_aro_case,
    make_order_case,
    pre_caption,
    shuffle_allbut_nouns_and_adj,
    shuffle_nouns_and_adj,
    shuffle_trigrams,
    shuffle_within_trigrams,
)
from vlp.eval.tagging import ADJ, NOUN, OTHER, build_tagger, rule_tagger, tokenize

CAPTIONS = [
    "A man riding a wave on top of a surfboard.",
    "Two small dogs are playing with a red frisbee in the green grass",
    "a photo of a small red circle to the left of a large blue star on a black background",
    "there is a cyan square over a pink hexagon",
    "A kitchen with wooden cabinets, a white stove and a big silver refrigerator.",
]


def shapesworld_captions(count: int = 200) -> list[str]:
    out = []
    for i in range(count):
        rng = sample_rng(0, "order-test", i)
        out.append(describe(sample_scene(rng, num_objects=1 + i % 2), rng).render())
    return out


@pytest.mark.parametrize("caption", CAPTIONS + shapesworld_captions(40))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_negative_is_a_permutation_of_the_caption_that_differs_from_it(caption, seed):
    case = make_order_case(caption, rule_tagger, random.Random(seed))

    assert case is not None and len(case.negatives) == 4
    for negative in case.negatives:
        assert sorted(tokenize(negative)) == sorted(tokenize(case.caption))
        assert tokenize(negative) != tokenize(case.caption)


def test_nouns_and_adjectives_swap_only_among_their_own_class():
    tagged = rule_tagger("a small red circle left of a large blue star")

    shuffled = shuffle_nouns_and_adj(tagged, random.Random(3))

    for (token, tag), new in zip(tagged, shuffled, strict=True):
        if tag == OTHER:
            assert new == token
        else:
            assert dict(tagged)[new] == tag


def test_allbut_keeps_nouns_and_adjectives_in_place():
    tagged = rule_tagger("there is a small red circle to the left of a large blue star")

    shuffled = shuffle_allbut_nouns_and_adj(tagged, random.Random(0))

    for (token, tag), new in zip(tagged, shuffled, strict=True):
        if tag in (NOUN, ADJ):
            assert new == token
    assert sorted(shuffled) == sorted(t for t, _ in tagged)


def test_trigram_perturbations_work_on_consecutive_trigrams():
    tagged = [(w, OTHER) for w in "a b c d e f g".split()]
    trigrams = ["a b c", "d e f", "g"]

    within = shuffle_within_trigrams(tagged, random.Random(1))
    blocks = shuffle_trigrams(tagged, random.Random(1))

    assert [sorted(within[i: i + 3]) for i in (0, 3, 6)] == [t.split() for t in trigrams]
    assert " ".join(blocks) in {" ".join(p) for p in itertools.permutations(trigrams)}


def test_a_perturbation_that_cannot_change_the_caption_falls_back_to_shuffling_all_words():
    case = make_order_case("a red circle", rule_tagger, random.Random(0))

    assert case is not None
    # one noun and one adjective; a single trigram: three of the four cannot move anything
    assert set(case.fallbacks) == {"shuffle_nouns_and_adj", "shuffle_allbut_nouns_and_adj",
                                   "shuffle_trigrams"}
    assert all(n != "a red circle" for n in case.negatives)


def test_a_caption_of_one_repeated_word_is_skipped():
    assert make_order_case("dog dog dog", rule_tagger, random.Random(0)) is None


def test_the_same_seed_gives_the_same_negatives():
    first = make_order_case(CAPTIONS[1], rule_tagger, random.Random("s/1"))
    again = make_order_case(CAPTIONS[1], rule_tagger, random.Random("s/1"))
    other = make_order_case(CAPTIONS[1], rule_tagger, random.Random("s/2"))

    assert first == again
    assert first != other


def test_pre_caption_normalises_like_aro():
    assert pre_caption('A "big" dog!  Runs (fast); ok.', max_words=4) == "a big dog runs"


def test_rule_tagger_tags_all_of_shapesworlds_vocabulary():
    tags = dict(rule_tagger(" ".join([*COLORS, *SIZES, "black"])))
    assert set(tags.values()) == {ADJ}
    assert {t for _, t in rule_tagger(" ".join(SHAPES))} == {NOUN}
    scaffolding = " ".join([*PREFIXES, *SUFFIXES, "is and the a an"])
    tagged = dict(rule_tagger(scaffolding))
    for noun in ("photo", "image", "picture", "rendering", "background"):
        assert tagged.pop(noun) == NOUN
    assert tagged.pop("black") == ADJ  # " on a black background"
    assert set(tagged.values()) == {OTHER}
    for phrases in RELATION_PHRASES.values():
        for phrase in phrases:
            for word, tag in rule_tagger(phrase):
                assert tag == (NOUN if word in ("left", "right") else OTHER), (phrase, word)


def test_rule_tagger_on_common_caption_words():
    tagged = dict(rule_tagger("a man riding a wooden surfboard near two beautiful dogs"))

    assert (tagged["man"], tagged["surfboard"], tagged["dogs"]) == (NOUN, NOUN, NOUN)
    assert (tagged["wooden"], tagged["beautiful"]) == (ADJ, ADJ)
    assert (tagged["riding"], tagged["near"], tagged["two"], tagged["a"]) == (OTHER,) * 4


@pytest.mark.skipif(importlib.util.find_spec("spacy") is not None, reason="spaCy is installed")
def test_build_tagger_auto_falls_back_to_rules_without_spacy():
    tagger, name = build_tagger("auto")

    assert tagger is rule_tagger and "rule-based" in name
    with pytest.raises(ValueError, match="needs spaCy"):
        build_tagger("spacy")


def test_build_tagger_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown tagger"):
        build_tagger("nltk")


def test_strict_precision_at_1_needs_the_caption_to_beat_all_four_and_ties_are_wrong():
    true = torch.tensor([0.9, 0.9, 0.5, 0.5])
    negatives = torch.tensor([[0.1, 0.2, 0.3, 0.4],   # right
                              [0.1, 0.95, 0.3, 0.4],  # one negative wins
                              [0.5, 0.1, 0.1, 0.1],   # tie with the first
                              [0.1, 0.1, 0.1, 0.1]])  # right

    metrics = strict_order_metrics(true, negatives)

    assert metrics["strict_precision@1"] == 0.5
    assert metrics["strict_pairwise_shuffle_nouns_and_adj"] == 0.75
    assert metrics["strict_pairwise_shuffle_allbut_nouns_and_adj"] == 0.75
    assert list(metrics)[1:] == [f"strict_pairwise_{name}" for name in PERTURBATIONS]


def test_aro_precision_at_1_credits_ties_to_the_true_caption_as_argmax_does():
    true = torch.tensor([0.9, 0.9, 0.5, 0.5])
    negatives = torch.tensor([[0.1, 0.2, 0.3, 0.4],   # right
                              [0.1, 0.95, 0.3, 0.4],  # one negative wins: wrong
                              [0.5, 0.1, 0.1, 0.1],   # tie with the first: argmax picks index 0
                              [0.5, 0.5, 0.5, 0.5]])  # all five tie: right

    assert aro_precision_at_1(true, negatives) == 0.75


class ReversingRandom(random.Random):
    """`shuffle` reverses, so every perturbation can be worked out by hand."""

    def shuffle(self, x):
        x.reverse()


TAGS = {"the": OTHER, "small": ADJ, "dog": NOUN, "sees": OTHER, "a": OTHER, "red": ADJ,
        "ball": NOUN, ".": OTHER}


def table_tagger(text: str):
    """Spaces split words, a full stop is a token; tags from TAGS; case kept, as spaCy keeps it."""
    tokens = text.replace(".", " .").split()
    return [(t, TAGS.get(t.lower(), OTHER)) for t in tokens]


def test_aro_case_perturbs_the_raw_tokens_then_normalises_as_aro_does():
    case = make_aro_case("The small dog sees a red ball.", table_tagger, ReversingRandom())

    assert case.caption == "the small dog sees a red ball"
    assert case.negatives == (
        "the red ball sees a small dog",   # nouns (dog, ball) and adjectives (small, red) swapped
        "small dog a sees red ball the",   # ". small dog a sees red ball The", "." dropped
        "dog small the red a sees ball",   # [dog small The] [red a sees] [. ball]
        "ball sees a red the small dog",   # [ball .] [sees a red] [The small dog]
    )


def test_aro_case_keeps_unchanged_shuffles_and_truncates_after_perturbing():
    case = make_aro_case("a b c d e f", table_tagger, ReversingRandom(), max_words=3)

    assert case.caption == "a b c"
    assert case.negatives == (
        "a b c",  # no nouns or adjectives: unchanged, and kept (vlp's strict protocol redraws)
        "f e d",  # "f e d c b a" truncated to three words
        "c b a",  # "c b a f e d"
        "d e f",  # "d e f a b c"
    )


# --------------------------------------------------------------------------- end to end

def red_value(image: Image.Image) -> torch.Tensor:
    return torch.tensor(image.getpixel((0, 0))[0])


class OrderAwareModel(torch.nn.Module):
    """Texts that are one of `truths` point along the image direction, every other text
    (a shuffled one) is orthogonal to it."""

    def __init__(self, truths: set[str]):
        super().__init__()
        self.truths = truths

    def tokenizer(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([[1.0, 0.0] if t in self.truths else [0.0, 1.0] for t in texts])

    def encode_image(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.tensor([[1.0, 0.0]] * len(ids))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens


class BagOfWordsModel(torch.nn.Module):
    """A text is the count vector of its words: blind to order, so all five options tie."""

    def __init__(self, vocab: list[str]):
        super().__init__()
        self.vocab = vocab

    def tokenizer(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([[float(t.split().count(w)) for w in self.vocab] for t in texts])

    def encode_image(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.ones(len(ids), len(self.vocab))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens


@pytest.fixture
def captions_root(tmp_path):
    samples = [(Image.new("RGB", (4, 4), (i, 0, 0)), [CAPTIONS[i], CAPTIONS[i + 1]])
               for i in range(3)]
    return write_benchmark(tmp_path / "retrieval", samples, dataset_type="retrieval")


def test_order_aware_model_scores_one_and_bag_of_words_model_scores_zero(captions_root):
    truths = {pre_caption(c) for c in CAPTIONS}
    vocab = sorted({w for c in truths for w in c.split()} | {","})
    aware, bow = OrderAwareModel(truths), BagOfWordsModel(vocab)

    aware_result = evaluate_order(aware, aware.tokenizer, red_value, captions_root, batch_size=2,
                                  tagger="rules", progress=False)
    bow_result = evaluate_order(bow, bow.tokenizer, red_value, captions_root, batch_size=2,
                                tagger="rules", progress=False)

    assert aware_result.metrics["strict_precision@1"] == 1.0
    assert bow_result.metrics["strict_precision@1"] == 0.0
    # ARO's protocol: every option of a bag-of-words model ties, and ties go to the caption
    assert bow_result.metrics["precision@1"] == 1.0
    assert aware_result.metrics["precision@1"] == 1.0
    assert aware_result.details["num_cases"] == 6
    assert any("ARO's protocol" in note for note in bow_result.notes)
    assert any("rule-based" in note for note in aware_result.notes)


def test_captions_per_image_limits_the_cases(captions_root):
    truths = {pre_caption(c) for c in CAPTIONS}
    model = OrderAwareModel(truths)

    result = evaluate_order(model, model.tokenizer, red_value, captions_root, batch_size=2,
                            tagger="rules", captions_per_image=1, progress=False)

    assert result.details["num_cases"] == 3


def test_order_needs_a_retrieval_root(tmp_path):
    root = write_benchmark(tmp_path / "cls", [(Image.new("RGB", (4, 4)), 0)], classnames=["x"],
                           templates=["{c}"])
    model = OrderAwareModel(set())

    with pytest.raises(ValueError, match="needs a retrieval root"):
        evaluate_order(model, model.tokenizer, red_value, root, progress=False)
