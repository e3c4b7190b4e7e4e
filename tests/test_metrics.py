"""captune's scorer equals pycocoevalcap's own scorers, called directly."""

import random

import pytest

from captune.metrics import score_captions

WORDS = "a an the dog cat man woman red blue small large sits on near table street park with two".split()


def _caption(rng):
    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 10))]
    text = " ".join(words)
    if rng.random() < 0.4:
        text = text.capitalize()
    return text + rng.choice(["", ".", "!", " ,", "?"])


@pytest.fixture(scope="module")
def caption_set():
    rng = random.Random(7)
    preds, refs = {}, {}
    for i in range(40):
        key = f"img{i}"
        refs[key] = [_caption(rng) for _ in range(rng.randint(1, 5))]
        preds[key] = _caption(rng) if i % 7 else refs[key][0]
    return preds, refs


def test_equals_pycocoevalcap(caption_set):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    preds, refs = caption_set
    ours = score_captions(preds, refs)
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = tok.tokenize({k: [{"caption": preds[k]}] for k in refs})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    expected = {f"BLEU-{n + 1}": bleu[n] for n in range(4)}
    expected["METEOR"], _ = Meteor().compute_score(gts, res)
    expected["ROUGE-L"], _ = Rouge().compute_score(gts, res)
    expected["CIDEr"], _ = Cider().compute_score(gts, res)
    for key, value in expected.items():
        assert ours.corpus[key] == pytest.approx(value, abs=1e-9), key
    assert set(ours.corpus) == set(expected)


def test_per_image_cider_averages_to_corpus(caption_set):
    preds, refs = caption_set
    s = score_captions(preds, refs, metrics=("CIDEr",))
    assert sum(s.per_image["CIDEr"]) / len(preds) == pytest.approx(s.corpus["CIDEr"], abs=1e-12)
    assert set(s.corpus) == {"CIDEr"}


def test_more_references_raise_cider():
    refs1 = {"a": ["a dog on a couch"], "b": ["a red bus on a street"], "c": ["two cats sleeping"]}
    refs5 = {k: v + ["a dog lying on a sofa", "the dog rests on the couch"] for k, v in refs1.items()}
    preds = {"a": "a dog lying on a couch", "b": "a bus on the street", "c": "two cats on a bed"}
    assert score_captions(preds, refs5).corpus["BLEU-1"] >= score_captions(preds, refs1).corpus["BLEU-1"]


def test_missing_java_is_one_clear_error(monkeypatch):
    import captune.metrics as m
    from captune.errors import UserError

    m.java_executable.cache_clear()
    monkeypatch.setenv("CAPTUNE_JAVA", "/nonexistent/java")
    try:
        with pytest.raises(UserError, match="need Java"):
            score_captions({"a": "x"}, {"a": ["x"]})
    finally:
        m.java_executable.cache_clear()
