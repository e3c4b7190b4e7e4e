"""The reward CIDEr-D equals pycocoevalcap's CIDEr-D; its tokenizer matches PTB on plain captions."""

import random

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider

from captune.errors import UserError
from captune.evaluation.cider import CiderD, fast_tokenize

WORDS = "a the man dog cat on of in with red blue sitting table sits two at near white".split()


def _caption(rng: random.Random, longest: int = 14) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, longest)))


def _official(refs: list[list[str]], cands: list[str]) -> np.ndarray:
    gts = {i: r for i, r in enumerate(refs)}
    res = {i: [c] for i, c in enumerate(cands)}
    return np.asarray(Cider().compute_score(gts, res)[1])


@pytest.mark.parametrize("seed", range(6))
def test_equals_pycocoevalcap_on_random_corpora(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 80)
    refs = [[_caption(rng) for _ in range(rng.randint(1, 7))] for _ in range(n)]
    cands = [_caption(rng) for _ in range(n)]
    got = CiderD(refs, tokenize=None).score(cands, range(n))
    np.testing.assert_allclose(got, _official(refs, cands), rtol=0, atol=1e-9)
    assert got.max() > 0  # not a corpus of zeros


def test_edge_cases():
    refs = [
        ["a man on a horse"],  # one reference
        ["a dog", "a dog", "a dog on a dog"],  # repeated references
        ["", "a cat"],  # an empty reference
        ["the red table " * 20, "a table"],  # a long reference
        ["two men near a white table", "two men at a table"],
        ["x"],
    ]
    cands = [
        "",  # empty candidate
        "a dog a dog a dog a dog",  # repeats, clipped
        "a cat",  # exact match of one reference
        "the red table " * 25,  # long
        "zebra unicorn zebra two men",  # words the corpus never saw
        "x",  # one word (no bigrams: pycocoevalcap's length 0)
    ]
    got = CiderD(refs, tokenize=None).score(cands, range(len(refs)))
    np.testing.assert_allclose(got, _official(refs, cands), rtol=0, atol=1e-9)
    assert got[0] == 0.0 and got[2] > 0


def test_several_samples_per_image_each_equal_the_official_score():
    """K samples per image scored in one batch: each equals pycocoevalcap on the same corpus."""
    rng = random.Random(7)
    refs = [[_caption(rng) for _ in range(5)] for _ in range(20)]
    k = 4
    samples = [[_caption(rng) for _ in range(20)] for _ in range(k)]
    flat = [samples[j][i] for i in range(20) for j in range(k)]
    got = CiderD(refs, tokenize=None).score(flat, np.repeat(np.arange(20), k)).reshape(20, k)
    for j in range(k):
        np.testing.assert_allclose(got[:, j], _official(refs, samples[j]), rtol=0, atol=1e-9)


def test_scores_do_not_depend_on_the_batch():
    """Document frequencies come from the fixed corpus: a caption scores the same alone or in any batch."""
    rng = random.Random(3)
    refs = [[_caption(rng) for _ in range(5)] for _ in range(30)]
    scorer = CiderD(refs, tokenize=None)
    cands = [_caption(rng) + " zebra" * (i % 3) for i in range(30)]
    whole = scorer.score(cands, range(30))
    alone = np.array([scorer.score([c], [i])[0] for i, c in enumerate(cands)])
    np.testing.assert_allclose(whole, alone, rtol=0, atol=1e-12)
    rev = scorer.score(cands[::-1], list(range(30))[::-1])
    np.testing.assert_allclose(rev[::-1], whole, rtol=0, atol=1e-12)


def test_tokenizes_raw_captions_before_scoring():
    refs = [["A man, riding a horse!", "The man's horse."]]
    scorer = CiderD(refs)
    assert scorer.score(["a man riding a horse"], [0])[0] == pytest.approx(
        CiderD([["a man riding a horse", "the man 's horse"]], tokenize=None).score(["a man riding a horse"], [0])[0],
        abs=1e-12,
    )


def test_refuses_images_without_references_and_bad_indices():
    with pytest.raises(UserError):
        CiderD([["a cat"], []])
    scorer = CiderD([["a cat"]])
    with pytest.raises(ValueError):
        scorer.score(["a cat"], [1])
    assert scorer.score([], []).shape == (0,)


PLAIN = [
    "A man riding a wave on top of a surfboard.",
    "Two dogs, one black and one white, play in the snow!",
    "A black-and-white photo of a man's bicycle.",
    "The cat doesn't like the dog's bed.",
    "There's a clock tower (very tall) in the city.",
    "A woman holding an umbrella; it is raining",
    "Kids playing frisbee at the park at 3:30 pm",
    "An old-fashioned train on the tracks...",
    "A 10-year-old boy and his mother's dog",
    "Pizza with cheese & tomatoes",
    'A "stop" sign on the corner',
    "It's a sunny day, isn't it?",
    "They're sitting on a bench they've painted",
    "The man is 6.5 feet tall",
    "a person on skis going down a hill -- fast",
    "Cars parked near a building w/ a sign, and/or a tree",
    "I'm sure we'll see what you'd like",
    "a cat laying on a laptop keyboard .",
    "the year 1,000 and 100 % cotton",
]


def test_fast_tokenize_matches_the_ptb_tokenizer_on_plain_captions():
    from captune.evaluation.metrics import ptb_tokenize

    ptb = ptb_tokenize({str(i): [c] for i, c in enumerate(PLAIN)})
    assert [fast_tokenize(c) for c in PLAIN] == [ptb[str(i)][0] for i in range(len(PLAIN))]
