"""A fast CIDEr-D for rewards: n-gram counts as integer arrays, document frequencies fixed once.

Self-critical training scores K sampled captions per image every step, against that
image's references, with document frequencies taken from the training references
(Rennie et al. 2017; ruotianluo/self-critical.pytorch does the same). pycocoevalcap's
``CiderScorer`` recomputes the reference vectors and the document frequencies on every
call and runs dictionaries of tuples per n-gram, far too slow for that. This module
computes the same numbers from precomputed arrays:

- every n-gram of the reference corpus gets an integer id (built level by level: an
  n-gram's key is its (n-1)-gram prefix id times the word count plus its last word, so
  keys never overflow), with its document frequency and idf;
- each (image, reference, n-gram) of the corpus is one row of a table sorted by
  ``image * n_grams + n_gram``, so the references matching a candidate's n-grams are
  found with one ``searchsorted`` for a whole batch;
- a batch of candidates is turned into the same ids (n-grams absent from the corpus get
  batch-local ids: they count in the candidate's norm, never in a match), and the
  clipped dot products, norms and length penalties are summed with ``bincount``.

The arithmetic is pycocoevalcap 1.2's ``CiderScorer`` (CIDEr-D): idf
``log(N) - log(max(1, df))`` with N the number of corpus images, tf-idf vectors per
n = 1..4, clipped dot product ``min(h, r) * r`` over cosine norms, Gaussian length
penalty with sigma 6, mean over n, mean over references, times 10. One quirk is kept
on purpose: pycocoevalcap's "length" is the number of *bigrams* (``len(words) - 1``,
0 for an empty or one-word caption), not of words. When the corpus is the scored set
the per-image scores equal ``Cider().compute_score`` to 1e-9 (tests/test_cider.py).

Tokenization: evaluation scores PTB-tokenized text (Stanford's Java tokenizer, see
``metrics.ptb_tokenize``). Starting Java per step is out of the question, so rewards
use ``fast_tokenize``, a regular expression that gives the PTB tokenizer's output on
plain captions (lower-cased, punctuation removed as PTBTokenizer + pycocoevalcap do,
clitics split: "man's" -> "man 's", "don't" -> "do n't"; brackets kept as "-lrb-" etc.,
since pycocoevalcap's upper-case "-LRB-" never matches the lower-cased output). Where
it differs (rare in captions; tests/test_cider.py compares the two on plain captions):
PTB's special cases ("cannot" -> "can not", "gonna" -> "gon na", "rock 'n' roll"),
abbreviations keeping their period ("u.s." and "mr." stay so in PTB, become "u.s" and
"mr" here), and non-ASCII quotes and dashes. The references can be tokenized with the Java tokenizer
once (pass ``tokenize=None`` with tokenized strings) so only the samples use the regex.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import numpy as np

from captune.errors import UserError

N = 4
SIGMA = 6.0

# pycocoevalcap 1.2 removes these after PTB tokenization; it compares the lower-cased output with
# its list, so its upper-case entries ("-LRB-"...) never match and brackets survive as "-lrb-" etc.
_DROP = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", '"'}  # '"' becomes `` or ''
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-", "[": "-lsb-", "]": "-rsb-"}
_CLITIC = re.compile(r"(?<=[a-z0-9])(n't|'s|'re|'ve|'ll|'d|'m)\b")
_TOKEN = re.compile(
    r"n't|'(?:s|re|ve|ll|d|m)\b"  # clitics
    r"|[a-z0-9]+(?:[-&'./][a-z0-9]+|(?<=[0-9])[:,][0-9]+)*"  # words, hyphenated words, 6.5, 3:30, 1,000
    r"|\.\.\.|--|[^\sa-z0-9]"  # punctuation, one token each
)


def fast_tokenize(text: str) -> str:
    """PTB-like tokenization of one caption: lower case, clitics split, punctuation dropped."""
    text = _CLITIC.sub(r" \1", text.lower())
    return " ".join(_BRACKETS.get(t, t) for t in _TOKEN.findall(text) if t not in _DROP)


class CiderD:
    """CIDEr-D of candidate captions against a fixed reference corpus (one entry per image).

    Build it once from the training references; ``score(captions, images)`` then gives
    each caption's CIDEr-D against the references of ``images[i]`` (an index into the
    corpus), with the corpus's document frequencies.
    """

    def __init__(self, references: Sequence[Sequence[str]], *, tokenize: Callable[[str], str] | None = fast_tokenize):
        if not references or any(len(r) == 0 for r in references):
            raise UserError("CIDEr-D rewards need at least one reference for every image")
        self.tokenize = tokenize
        self.n_images = len(references)
        self.ref_len = math.log(float(self.n_images))
        refs = [[self._tok(s) for s in rs] for rs in references]
        self.words: dict[str, int] = {}
        for rs in refs:
            for toks in rs:
                for w in toks:
                    self.words.setdefault(w, len(self.words))
        self.n_refs = np.array([len(rs) for rs in refs], dtype=np.int64)
        self.max_refs = int(self.n_refs.max())
        flat = [toks for rs in refs for toks in rs]
        ref_image = np.repeat(np.arange(self.n_images), self.n_refs)
        ref_slot = np.concatenate([np.arange(k) for k in self.n_refs])
        word_ids, owner, lengths = self._flatten(flat, self.words, len(self.words))
        self._build(word_ids, owner, lengths, ref_image, ref_slot)

    def _tok(self, text: str) -> list[str]:
        return (self.tokenize(text) if self.tokenize is not None else text).split()

    @staticmethod
    def _flatten(token_lists: Sequence[list[str]], vocab: dict[str, int], base: int):
        """Word ids of every position (unknown words get ids from ``base`` on), owner caption, lengths."""
        oov: dict[str, int] = {}
        ids: list[int] = []
        for toks in token_lists:
            for w in toks:
                i = vocab.get(w)
                if i is None:
                    i = oov.setdefault(w, base + len(oov))
                ids.append(i)
        lengths = np.array([len(t) for t in token_lists], dtype=np.int64)
        owner = np.repeat(np.arange(len(token_lists)), lengths)
        return np.array(ids, dtype=np.int64), owner, lengths

    @staticmethod
    def _levels(word_ids: np.ndarray, owner: np.ndarray, lengths: np.ndarray, base: int):
        """Per order n: the positions where an n-gram starts and its dense id (unique keys, sorted)."""
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else np.zeros(0, np.int64)
        pos = np.arange(len(word_ids)) - starts[owner] if len(word_ids) else np.zeros(0, np.int64)
        remaining = lengths[owner] - pos if len(word_ids) else np.zeros(0, np.int64)
        out = []
        ids = word_ids
        for n in range(1, N + 1):
            at = np.nonzero(remaining >= n)[0]
            if n == 1:
                keys, local = np.unique(word_ids, return_inverse=True)
            else:
                keys, local = np.unique(ids[at] * base + word_ids[at + n - 1], return_inverse=True)
            full = np.full(len(word_ids), -1, dtype=np.int64)
            full[at] = local
            out.append((at, local, keys))
            ids = full
        return out

    def _build(self, word_ids, owner, lengths, ref_image, ref_slot) -> None:
        base = len(self.words)
        levels = self._levels(word_ids, owner, lengths, base)
        self.level_keys = [keys for _, _, keys in levels]  # per order: sorted (prefix id * words + last word)
        sizes = [len(k) for k in self.level_keys]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.n_grams = int(sum(sizes))
        ref_n = len(lengths)
        gid_parts, ref_parts = [], []
        for n, (at, local, _) in enumerate(levels):
            gid_parts.append(self.offsets[n] + local)
            ref_parts.append(owner[at])
        gid = np.concatenate(gid_parts)
        ref = np.concatenate(ref_parts)
        # tf per (reference, n-gram)
        pair, tf = np.unique(ref * self.n_grams + gid, return_counts=True)
        ref, gid = pair // self.n_grams, pair % self.n_grams
        # df: images whose references hold the n-gram
        img_pair = np.unique(ref_image[ref] * self.n_grams + gid)
        df = np.bincount(img_pair % self.n_grams, minlength=self.n_grams).astype(np.float64)
        self.idf = self.ref_len - np.log(np.maximum(1.0, df))
        weight = tf * self.idf[gid]
        order_of = np.searchsorted(self.offsets, gid, side="right") - 1
        norms = np.zeros((ref_n, N))
        np.add.at(norms, (ref, order_of), weight**2)
        self.ref_norm = np.zeros((self.n_images, self.max_refs, N))
        self.ref_norm[ref_image, ref_slot] = np.sqrt(norms)
        self.ref_length = np.zeros((self.n_images, self.max_refs))
        self.ref_length[ref_image, ref_slot] = np.maximum(lengths - 1, 0)
        key = ref_image[ref] * self.n_grams + gid
        order = np.argsort(key, kind="stable")
        self.table_key = key[order]
        self.table_weight = weight[order]
        self.table_slot = ref_slot[ref][order]

    def score(self, captions: Sequence[str], images: Sequence[int] | np.ndarray) -> np.ndarray:
        """CIDEr-D of ``captions[i]`` against the references of corpus image ``images[i]``."""
        images = np.asarray(images, dtype=np.int64)
        if len(images) != len(captions):
            raise ValueError("one image index per caption")
        if len(images) and (images.min() < 0 or images.max() >= self.n_images):
            raise ValueError("image index outside the reference corpus")
        c = len(captions)
        if c == 0:
            return np.zeros(0)
        base = len(self.words)
        toks = [self._tok(s) for s in captions]
        word_ids, owner, lengths = self._flatten(toks, self.words, base)
        width = max(base, int(word_ids.max(initial=-1)) + 1, 1)  # corpus words, then this batch's unknown ones
        levels = self._levels(word_ids, owner, lengths, width)
        cap_parts, gid_parts, h_parts, order_parts = [], [], [], []
        prev_corpus = None  # batch-local (n-1)-gram id -> corpus id (or -1)
        for n, (at, local, keys) in enumerate(levels):
            corpus_id = self._corpus_ids(n, keys, prev_corpus, width)
            prev_corpus = corpus_id
            pair, tf = np.unique(owner[at] * max(len(keys), 1) + local, return_counts=True)
            cap, u = pair // max(len(keys), 1), pair % max(len(keys), 1)
            cid = corpus_id[u]
            gid = np.where(cid >= 0, self.offsets[n] + cid, -1)
            idf = np.where(cid >= 0, self.idf[np.maximum(gid, 0)], self.ref_len)
            cap_parts.append(cap)
            gid_parts.append(gid)
            h_parts.append(tf * idf)
            order_parts.append(np.full(len(cap), n))
        cap, gid, h, order = (np.concatenate(p) for p in (cap_parts, gid_parts, h_parts, order_parts))
        hyp_norm = np.sqrt(np.bincount(cap * N + order, weights=h**2, minlength=c * N)).reshape(c, N)
        dot = self._clipped_dots(images, cap, gid, h, order, c)
        ref_norm = self.ref_norm[images]  # (c, R, N)
        denom = hyp_norm[:, None, :] * ref_norm
        val = np.where(denom != 0, dot / np.where(denom != 0, denom, 1.0), dot)
        delta = np.maximum(lengths - 1, 0)[:, None] - self.ref_length[images]
        val = val * np.e ** (-(delta**2) / (2 * SIGMA**2))[:, :, None]
        return val.sum(axis=1).mean(axis=1) / self.n_refs[images] * 10.0

    def _corpus_ids(self, n: int, keys: np.ndarray, prev: np.ndarray | None, width: int) -> np.ndarray:
        """Corpus id of each batch-local n-gram key (-1 where the corpus lacks it)."""
        base = len(self.words)
        if n == 0:
            return np.where(keys < base, keys, -1)
        prefix, last = keys // width, keys % width
        pc = prev[prefix]
        ok = (pc >= 0) & (last < base)
        query = np.where(ok, pc * base + last, -1)
        table = self.level_keys[n]
        at = np.minimum(np.searchsorted(table, query), max(len(table) - 1, 0))
        found = ok & (len(table) > 0) & (table[at] == query) if len(table) else np.zeros(len(keys), bool)
        return np.where(found, at, -1)

    def _clipped_dots(self, images, cap, gid, h, order, c: int) -> np.ndarray:
        """sum over shared n-grams of min(h, r) * r, per (caption, reference slot, order)."""
        dot = np.zeros(c * self.max_refs * N)
        hit = gid >= 0
        if not hit.any():
            return dot.reshape(c, self.max_refs, N)
        cap, gid, h, order = cap[hit], gid[hit], h[hit], order[hit]
        query = images[cap] * self.n_grams + gid
        lo = np.searchsorted(self.table_key, query, side="left")
        hi = np.searchsorted(self.table_key, query, side="right")
        count = hi - lo
        rows = np.repeat(lo - np.cumsum(np.concatenate([[0], count[:-1]])), count) + np.arange(count.sum())
        which = np.repeat(np.arange(len(query)), count)
        r = self.table_weight[rows]
        contrib = np.minimum(h[which], r) * r
        flat = (cap[which] * self.max_refs + self.table_slot[rows]) * N + order[which]
        dot += np.bincount(flat, weights=contrib, minlength=len(dot))
        return dot.reshape(c, self.max_refs, N)
