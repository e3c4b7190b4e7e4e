"""Numerics: text batches and labels, image features, the language-model loss, packing and decoding."""
