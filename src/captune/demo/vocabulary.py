"""How much of a caption set the built-in demo model can spell.

The demo model's tokenizer is word-level over the synthetic world's few hundred words;
any other word becomes ``<unk>``. Fine-tuning it on one's own captions then trains
and scores mostly ``<unk>``, silently: this says so, with the share and the commonest
unknown words, once the data cache exists.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from captune.config import Config

WARN_ABOVE = 0.05  # the demo's own captions have no unknown word at all


def unknown_words(captions: Iterable[str]) -> tuple[int, Counter]:
    """(words seen, Counter of the words the demo tokenizer maps to <unk>)."""
    from tokenizers import Tokenizer

    from captune.model.load import demo_model_dir

    tok = Tokenizer.from_file(str(demo_model_dir() / "tokenizer.json"))
    unk = tok.token_to_id("<unk>")
    seen, unknown = 0, Counter()
    for caption in captions:
        enc = tok.encode(caption, add_special_tokens=False)
        seen += len(enc.ids)
        for token_id, (start, end) in zip(enc.ids, enc.offsets, strict=True):
            if token_id == unk:
                unknown[caption[start:end].lower()] += 1
    return seen, unknown


def _train_captions(data_dir: Path) -> Iterator[str]:
    """Every training caption, one shard in memory at a time (a large cache is never held whole)."""
    import pyarrow.parquet as pq

    for shard in sorted(Path(data_dir).glob("train-*.parquet")):
        for row in pq.read_table(shard, columns=["captions"]).column("captions").to_pylist():
            yield from row


def warn_unknown_words(cfg: Config, data_dir: Path, log: Callable[[str], None]) -> float | None:
    """With model builtin:demo, warn when many training words are unknown to it; returns the share."""
    from captune.model.load import BUILTIN_DEMO

    if cfg.model.name_or_path != BUILTIN_DEMO:
        return None
    seen, unknown = unknown_words(_train_captions(data_dir))
    share = sum(unknown.values()) / seen if seen else 0.0
    if share > WARN_ABOVE:
        common = ", ".join(w for w, _ in unknown.most_common(5))
        log(
            f"warning: {share:.0%} of the training words are unknown to the builtin:demo model and become <unk> "
            f"(e.g. {common}); it only knows the demo's shape words: use a real model "
            "(model.name_or_path=Salesforce/blip2-opt-2.7b) for your own captions"
        )
    return share
