"""The sharded feature map: raw shards written as computed, read through a memory map, resumed
from complete shards after a kill, and looked up by digests without reading an image."""

import hashlib
import json

import pytest
import torch

from captune.config import ModelConfig
from captune.data.cache import ImageColumn
from captune.demo import world
from captune.model.load import load_model
from captune.ops import feature_map
from captune.ops.feature_map import FeatureMap, ShardWriter, write_map
from captune.ops.features import feature_row_bytes, image_features
from captune.run.feature_cache import FeatureStore


@pytest.fixture(scope="module")
def demo():
    return load_model(ModelConfig(device="cpu"))


class _Lazy:
    """An example whose image is read on demand (as a streamed split's is), counting reads."""

    reads: list = []

    def __init__(self, i, image, digest=None):
        self.i, self._image, self.captions = i, image, ["a"]
        if digest is not None:
            self.digest = digest

    @property
    def image(self):
        _Lazy.reads.append(self.i)
        return self._image


def _images(n, seed=1):
    return [it["image"] for it in world.make_items("plain", n, seed=seed)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rows_written_in_pieces_read_back_exactly(tmp_path, dtype):
    x = torch.randn(11, 3, 5).to(dtype)
    w = ShardWriter(tmp_path, 11, 4)
    for lo, hi in [(0, 3), (3, 9), (9, 11)]:  # pieces that cross shard boundaries
        w.write_rows(lo, x[lo:hi])
    w.finish()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["layout.json", "manifest.json", "shard-00000.bin", "shard-00001.bin", "shard-00002.bin"]
    assert (tmp_path / "shard-00002.bin").stat().st_size == 3 * 5 * 3 * x.element_size()  # raw, no header
    m = FeatureMap(tmp_path)
    assert m.shape == (11, 3, 5) and m.dtype == dtype and len(m) == 11
    assert torch.equal(m.whole(), x)
    index = [10, 0, 5, 5, 3, 8]  # across shards, repeated, out of order
    assert torch.equal(m.rows(index), x[index])
    assert torch.equal(m.rows([6, 5]), x[[6, 5]])  # within one shard
    out = torch.empty(2, 3, 5, dtype=dtype)
    assert m.rows([1, 9], out=out) is out and torch.equal(out, x[[1, 9]])


def test_no_manifest_until_every_shard_is_whole(tmp_path):
    w = ShardWriter(tmp_path, 8, 4)
    w.write_rows(0, torch.ones(6, 2))  # shard 0 whole, shard 1 half-written
    w.abandon()
    assert w.missing() == [1] and not list(tmp_path.glob(".*"))  # the half shard's temporary is gone
    with pytest.raises(RuntimeError, match="missing"):
        w.finish()
    assert not (tmp_path / "manifest.json").exists()
    (tmp_path / "shard-00000.bin").write_bytes(b"\0" * 8)  # a truncated shard is never trusted
    assert ShardWriter(tmp_path, 8, 4).missing() == [0, 1]
    with pytest.raises(ValueError, match="must start at row 4"):
        w.write_rows(5, torch.ones(1, 2))


def test_another_layout_starts_afresh(tmp_path):
    w = ShardWriter(tmp_path, 8, 4)
    w.write_rows(0, torch.ones(4, 2))
    assert ShardWriter(tmp_path, 9, 4).missing() == [0, 1, 2]
    assert not list(tmp_path.glob("shard-*"))


def test_write_map_equals_image_features_and_resumes_from_complete_shards(tmp_path, demo, monkeypatch):
    images = _images(9)
    whole = image_features(demo.model, demo.processor, images, batch_size=2)
    assert whole[0].numel() * whole.element_size() == feature_row_bytes(demo.model)
    calls = {"n": 0}
    real = ShardWriter.write_rows

    def dies_in_third_shard(self, start, rows):
        calls["n"] += 1
        if start >= 8:
            raise KeyboardInterrupt  # the process killed while shard 2 is written
        real(self, start, rows)

    monkeypatch.setattr(ShardWriter, "write_rows", dies_in_third_shard)
    with pytest.raises(KeyboardInterrupt):
        write_map(demo.model, demo.processor, images, tmp_path, rows_per_shard=4, batch_size=2)
    monkeypatch.setattr(ShardWriter, "write_rows", real)
    assert ShardWriter(tmp_path, 9, 4).missing() == [2] and not (tmp_path / "manifest.json").exists()
    assert not list(tmp_path.glob(".*"))
    (tmp_path / ".shard-00002.bin.k1ll3d").write_bytes(b"half")  # what a SIGKILL leaves behind
    seen = []
    monkeypatch.setattr(feature_map, "image_features", lambda m, p, imgs, **kw: seen.append(len(imgs)) or
                        image_features(m, p, imgs, **kw))  # fmt: skip
    write_map(demo.model, demo.processor, images, tmp_path, rows_per_shard=4, batch_size=2)
    assert seen == [1]  # only the missing shard's one image was computed again
    assert torch.equal(FeatureMap(tmp_path).whole(), whole)
    assert not list(tmp_path.glob(".*"))  # the killed attempt's half shard is gone


def test_images_read_once_in_order_and_digests_spare_the_reads(tmp_path, demo):
    images = _images(5, seed=3)
    _Lazy.reads = []
    column = ImageColumn([_Lazy(i, b) for i, b in enumerate(images)])
    store = FeatureStore(tmp_path, "k", rows_per_shard=2)
    fmap = store.get(demo.model, demo.processor, column, batch_size=2, stream=True)
    assert _Lazy.reads == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]  # digests once, then features batch by batch
    assert torch.equal(fmap.whole(), image_features(demo.model, demo.processor, images, batch_size=2))
    known = ImageColumn([_Lazy(i, b, hashlib.sha256(b).hexdigest()) for i, b in enumerate(images)])
    assert store.path_for(known) == store.path_for(images) == store.path_for(images, column.digests())
    _Lazy.reads = []
    assert isinstance(store.get(demo.model, demo.processor, known, batch_size=2, stream=True), FeatureMap)
    assert _Lazy.reads == [] and store.hits == 1  # a hit reads no image at all
    layout = json.loads((store.path_for(images) / "manifest.json").read_text())
    assert layout["rows_per_shard"] == 2 and len(layout["shards"]) == 3


def _rss_file_kb() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile")


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="Linux only")
def test_reading_a_whole_map_keeps_resident_memory_bounded(tmp_path):
    rows, width = 4096, 4096  # 64 MiB of float32 in 8 shards
    w = ShardWriter(tmp_path, rows, 512)
    for start in range(0, rows, 512):
        w.write_rows(start, torch.full((512, width), float(start)))
    w.finish()
    m = FeatureMap(tmp_path)
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(0))
    m.rows(order[:64])  # the first gather pages in torch's own code (RssFile counts libraries too)
    m.release()
    before = _rss_file_kb()
    for part in order.split(64):
        got = m.rows(part)
        assert torch.equal(got[:, 0], (part // 512 * 512).float())
    assert _rss_file_kb() - before < 16 << 10  # under 16 MiB of map pages held, not the 64 MiB read
    hold = FeatureMap(tmp_path, release=False)  # never released: the same reads hold them all
    for part in order.split(64):
        hold.rows(part)
    assert _rss_file_kb() - before > 48 << 10
