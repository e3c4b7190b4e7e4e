"""The word-level tokenizer of captune's built models: the demo base model and the benchmark's.

All need a fast tokenizer over a known word list, with OPT's conventions (BOS = EOS = </s> before
the text), T5's (no BOS, </s> after the text) or LLaMA's (<s> before the text, no </s> after it,
left padding); one builder makes them.
"""

from __future__ import annotations

from collections.abc import Iterable

DEMO_SPECIALS = ("<pad>", "</s>", "<unk>")
OPT_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # OPT's own ids: pad 1, eos 2


LLAMA_SPECIALS = ("<unk>", "<s>", "</s>")  # LLaMA's ids 0, 1, 2; Vicuna's pad [PAD] is added after the vocabulary


def word_tokenizer(words: Iterable[str], *, seq2seq: bool = False, specials: tuple[str, ...] = DEMO_SPECIALS,
                   size: int = 0, max_length: int = 64, llama: bool = False):  # fmt: skip
    """A ``PreTrainedTokenizerFast`` over ``specials`` then ``words`` (ids in that order), filled with
    ``<unusedN>`` tokens up to ``size`` ids when given. Words are joined with spaces and punctuation
    back onto the word before it ("left, small"), the way captions are written. ``llama``: LLaMA's
    conventions (specials ``LLAMA_SPECIALS``, ``[PAD]`` added at id ``size``, left padding)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(specials)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    while len(vocab) < size:
        vocab[f"<unused{len(vocab)}>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    # the WordPiece decoder's cleanup is exactly that join; no word starts with its "##" prefix
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    if llama:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
        )
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
            model_max_length=max_length, padding_side="left",
        )  # fmt: skip
        fast.add_special_tokens({"pad_token": "[PAD]"})
        return fast
    single, pair = ("$A </s>", "$A </s> $B </s>") if seq2seq else ("</s> $A", "</s> $A </s> $B")
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None if seq2seq else "</s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=max_length,
    )
