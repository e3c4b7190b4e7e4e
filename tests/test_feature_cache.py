"""The on-disk feature cache: reused when valid, invalidated by model, preprocessing or image changes."""

import torch

from captune.config import ModelConfig
from captune.demo import world
from captune.model.load import load_model
from captune.ops.features import image_features
from captune.run.feature_cache import FeatureStore, model_fingerprint


def _images(seed, n=3):
    return [it["image"] for it in world.make_items("plain", n, seed=seed)]


def test_cache_hits_equal_fresh_features(tmp_path):
    loaded = load_model(ModelConfig(device="cpu"))
    key = model_fingerprint(loaded.model, loaded.processor, loaded.source)
    store = FeatureStore(tmp_path, key)
    images = _images(1)
    first = store.get(loaded.model, loaded.processor, images)
    assert torch.equal(store.get(loaded.model, loaded.processor, images), first)
    again = FeatureStore(tmp_path, key).get(loaded.model, loaded.processor, images)
    assert torch.equal(first, again)
    assert torch.equal(first, image_features(loaded.model, loaded.processor, images))
    assert store.misses == 1 and store.hits == 1 and len(list((tmp_path / key).glob("*/manifest.json"))) == 1
    assert not list((tmp_path / key).rglob(".*"))  # no temporary left behind
    streamed = store.get(loaded.model, loaded.processor, images, stream=True)
    assert torch.equal(streamed.rows([2, 0]), first[[2, 0]]) and store.hits == 2


def test_changed_image_changes_the_entry(tmp_path):
    loaded = load_model(ModelConfig(device="cpu"))
    store = FeatureStore(tmp_path, "k")
    images = _images(2)
    changed = [images[0], images[1], _images(3, 1)[0]]
    assert store.path_for(images) != store.path_for(changed)
    store.get(loaded.model, loaded.processor, images)
    store.get(loaded.model, loaded.processor, changed)
    assert store.misses == 2


def test_fingerprint_tracks_model_and_preprocessing(tmp_path, tiny_model_dir):
    import shutil

    from transformers import Blip2Processor

    demo = load_model(ModelConfig(device="cpu"))
    tiny = load_model(ModelConfig(name_or_path=str(tiny_model_dir), device="cpu"))
    base = model_fingerprint(demo.model, demo.processor, demo.source)
    assert base == model_fingerprint(demo.model, demo.processor, demo.source)
    assert base != model_fingerprint(tiny.model, tiny.processor, tiny.source)
    other = Blip2Processor.from_pretrained(demo.source)
    other.image_processor.image_mean = [0.4, 0.4, 0.4]
    assert base != model_fingerprint(demo.model, other, demo.source)
    copy = tmp_path / "copy"
    shutil.copytree(demo.source, copy)
    (copy / "model.safetensors").write_bytes((copy / "model.safetensors").read_bytes() + b"")
    import os

    os.utime(copy / "model.safetensors", (1, 1))
    assert base != model_fingerprint(demo.model, demo.processor, str(copy))


def test_map_key_streams_the_digests_and_matches_hashing_the_bytes(tmp_path):
    """The feature map's key over a lazy image column (the cache's own digests, a batch at a time,
    nothing kept) equals the key over the images' bytes hashed here."""
    import hashlib

    from captune.data.cache import ImageColumn

    images = _images(4, n=300)  # more than one 256-image batch
    column = ImageColumn([type("E", (), {"image": b, "digest": hashlib.sha256(b).hexdigest()})() for b in images])
    it = column.iter_digests()
    assert next(it) == hashlib.sha256(images[0]).digest() and list(it) == column.digests()[1:]
    store = FeatureStore(tmp_path, "fp")
    assert store.path_for(column) == store.path_for(images)
    assert store.path_for(images, digests=[hashlib.sha256(b).digest() for b in images]) == store.path_for(images)
