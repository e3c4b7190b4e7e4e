"""captune's scorer equals pycocoevalcap's own scorers, called directly."""

import random

import pytest

from captune.evaluation.metrics import score_captions

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
    import captune.evaluation.metrics as m
    from captune.errors import UserError

    m.java_executable.cache_clear()
    monkeypatch.setenv("CAPTUNE_JAVA", "/nonexistent/java")
    try:
        with pytest.raises(UserError, match="need Java"):
            score_captions({"a": "x"}, {"a": ["x"]})
    finally:
        m.java_executable.cache_clear()


def test_bleu_statistics_reproduce_corpus_bleu(caption_set):
    import numpy as np

    from captune.evaluation.metrics import corpus_bleu_from_stats

    preds, refs = caption_set
    s = score_captions(preds, refs, metrics=("BLEU-4",))
    again = corpus_bleu_from_stats(np.asarray(s.bleu_stats).sum(axis=0))
    for k in range(4):
        assert float(again[k]) == pytest.approx(s.corpus[f"BLEU-{k + 1}"], abs=1e-12)


def test_spice_is_reported_unavailable_offline(caption_set):
    preds, refs = caption_set
    s = score_captions(dict(list(preds.items())[:3]), refs, metrics=("CIDEr",), spice=True)
    assert "SPICE" in s.unavailable and "SPICE" not in s.corpus


def test_scoring_never_writes_into_the_scorer_package(caption_set, monkeypatch):
    import os
    import tempfile

    import pycocoevalcap

    package = os.path.abspath(list(pycocoevalcap.__path__)[0])
    real = tempfile.NamedTemporaryFile

    def guarded(*args, **kwargs):
        where = kwargs.get("dir") or tempfile.gettempdir()
        assert not os.path.abspath(where).startswith(package), "temp file inside pycocoevalcap"
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", guarded)
    preds, refs = caption_set
    assert score_captions(preds, refs, metrics=("CIDEr",)).corpus["CIDEr"] >= 0


def test_concurrent_scoring_processes_agree(tmp_path, caption_set):
    import json
    import subprocess
    import sys

    preds, refs = caption_set
    p = tmp_path / "p.jsonl"
    p.write_text("\n".join(json.dumps({"image_id": k, "caption": preds[k], "references": refs[k]}) for k in preds))
    cmd = [sys.executable, "-m", "captune.cli", "score", str(p), "--json"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [json.loads(proc.communicate(timeout=300)[0])["metrics"] for proc in procs]
    assert outs[0] == outs[1] == outs[2]


# ------------------------------------------------------------------ seed-comparable


def test_13a_tokenizer():
    from captune.evaluation.seed_metrics import tokenize_13a

    assert tokenize_13a("A dog, sitting (on) a couch.") == [
        "A",
        "dog",
        ",",
        "sitting",
        "(",
        "on",
        ")",
        "a",
        "couch",
        ".",
    ]
    assert tokenize_13a("costs 3.50 and 1,000-2") == ["costs", "3.50", "and", "1,000", "-", "2"]
    assert tokenize_13a("Tom&amp;Jerry") == ["Tom", "&", "Jerry"]


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_seed_bleu_equals_reference_formula(caption_set, order):
    """HF evaluate's bleu on one reference equals NLTK's unsmoothed corpus BLEU on the same tokens."""
    from nltk.translate.bleu_score import corpus_bleu

    from captune.evaluation.seed_metrics import hf_bleu, tokenize_13a

    preds, refs = caption_set
    # NLTK counts one possible n-gram for a hypothesis shorter than n; the NMT formula counts none.
    # On hypotheses of at least n tokens the two formulas are the same.
    ids = sorted(i for i in preds if len(tokenize_13a(preds[i])) >= order)
    ours = hf_bleu([preds[i] for i in ids], [[refs[i][0]] for i in ids], max_order=order)
    theirs = corpus_bleu(
        [[tokenize_13a(refs[i][0])] for i in ids],
        [tokenize_13a(preds[i]) for i in ids],
        weights=tuple([1.0 / order] * order),
    )
    assert ours == pytest.approx(theirs, abs=1e-12)


def test_seed_compatible_block(caption_set):
    from captune.evaluation.seed_metrics import seed_compatible

    preds, refs = caption_set
    doc = seed_compatible(preds, refs)
    assert set(doc["metrics"]) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-1", "ROUGE-2", "CIDEr"}
    assert "WordNet" in doc["unavailable"]["METEOR"]
    # one reference scores no higher on BLEU-1 than all references (official scorer)
    assert doc["metrics"]["BLEU-1"] <= score_captions(preds, refs, metrics=("BLEU-1",)).corpus["BLEU-1"] + 0.05


# ------------------------------------------------------------------ METEOR statistics


def test_corpus_meteor_of_each_resample_equals_the_jars_eval(caption_set):
    """Our aggregation of METEOR statistics equals the jar's own EVAL, on the full set and on resamples."""
    import numpy as np

    from captune.evaluation.metrics import _meteor_server, corpus_meteor_from_stats, meteor_summable

    preds, refs = caption_set
    s = score_captions(preds, refs, metrics=("METEOR",))
    stats = s.meteor_stats
    assert len(stats) == len(preds) and all(len(row) == 23 for row in stats)
    summable = meteor_summable(stats)
    assert float(corpus_meteor_from_stats(summable.sum(axis=0))) == pytest.approx(s.corpus["METEOR"], abs=1e-12)
    each = corpus_meteor_from_stats(np.asarray(stats))
    assert np.allclose(each, s.per_image["METEOR"], rtol=0, atol=1e-12)
    # some captions equal a reference, so the perfect-match rule for chunks is exercised
    assert (summable[:, 20] != np.asarray(stats)[:, 20]).any()
    rng = np.random.default_rng(0)
    server = _meteor_server()
    for _ in range(8):
        idx = rng.integers(0, len(stats), size=len(stats))
        _, jar = server.evaluate([stats[i] for i in idx])
        ours = float(corpus_meteor_from_stats(summable[idx].sum(axis=0)))
        assert ours == pytest.approx(jar, abs=1e-12)


def test_scoring_in_chunks_equals_scoring_at_once(caption_set, monkeypatch, tmp_path):
    """Chunked scoring (CIDEr-D's frequencies and N over the whole set, corpus BLEU/METEOR from all
    statistics) gives every number of one-chunk scoring, bit for bit; so does scoring from a file."""
    import json

    from captune.evaluation import metrics

    preds, refs = caption_set
    whole = score_captions(preds, refs)
    monkeypatch.setattr(metrics, "SCORE_CHUNK", 7)
    chunked = score_captions(preds, refs)
    path = tmp_path / "predictions.jsonl"
    path.write_text(
        "".join(json.dumps({"image_id": i, "caption": preds[i], "references": refs[i]}) + "\n" for i in preds)
    )
    from_file = metrics.score_file(path)
    for got in (chunked, from_file):
        assert got.corpus == whole.corpus
        assert got.per_image == whole.per_image
        assert (got.image_ids, got.bleu_stats, got.meteor_stats) == (
            whole.image_ids,
            whole.bleu_stats,
            whole.meteor_stats,
        )
