"""Data sources, grouping, splitting, the cache and bad input."""

import io
import json

import pytest
from PIL import Image

from captune.config import DataConfig
from captune.data.images import check_image, load_rgb
from captune.data.prepare import load_split, prepare
from captune.errors import UserError
from tests.conftest import jpeg_bytes


def _prep(tmp_path, **kw):
    cfg = DataConfig(**kw)
    return prepare(cfg, tmp_path / "cache", progress=False, log=lambda m: None), tmp_path / "cache"


def _all(cache):
    return {s: load_split(cache, s) for s in ("train", "validation", "test")}


def test_coco_source_keeps_every_reference_and_splits_by_image(tmp_path, image_folder):
    manifest, cache = _prep(tmp_path, source=f"coco:{image_folder / 'captions.json'}", num_images=0)
    splits = _all(cache)
    ids = [e.image_id for s in splits.values() for e in s]
    assert len(ids) == len(set(ids)) == 6
    assert all(len(e.captions) == 3 for s in splits.values() for e in s)
    assert manifest["references"] == 18
    assert sum(manifest["counts"].values()) == 6


def test_split_is_seeded_and_disjoint(tmp_path, image_folder):
    src = f"coco:{image_folder / 'captions.json'}"
    m1, c1 = _prep(tmp_path / "a", source=src, num_images=0, seed=3)
    m2, c2 = _prep(tmp_path / "b", source=src, num_images=0, seed=3)
    s1, s2 = _all(c1), _all(c2)
    assert {k: [e.image_id for e in v] for k, v in s1.items()} == {k: [e.image_id for e in v] for k, v in s2.items()}
    sets = [set(e.image_id for e in v) for v in s1.values()]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])


def test_first_n_images_in_source_order(tmp_path, image_folder):
    manifest, cache = _prep(tmp_path, source=f"coco:{image_folder / 'captions.json'}", num_images=4)
    ids = {e.image_id for s in _all(cache).values() for e in s}
    assert ids == {"100", "101", "102", "103"}


def test_bad_items_are_skipped_with_reasons(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    (root / "ok1.jpg").write_bytes(jpeg_bytes((1, 2, 3)))
    (root / "ok2.jpg").write_bytes(jpeg_bytes((90, 2, 3)))
    (root / "ok3.png").write_bytes(jpeg_bytes(mode="RGBA"))
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpg").write_bytes(b"not an image at all")
    (root / "trunc.jpg").write_bytes(jpeg_bytes((5, 5, 5), size=(300, 300))[:400])
    rows = [
        {"image": "ok1.jpg", "caption": ["  a  dog ", "a dog", "", "a brown dog"]},
        {"image": "ok2.jpg", "caption": "a cat"},
        {"image": "ok3.png", "caption": "a grey square"},
        {"image": "empty.jpg", "caption": "x"},
        {"image": "text.jpg", "caption": "x"},
        {"image": "trunc.jpg", "caption": "x"},
        {"image": "missing.jpg", "caption": "x"},
        {"image": "ok1.jpg", "caption": "   "},
    ]
    (root / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    manifest, cache = _prep(tmp_path, source=f"manifest:{root / 'm.jsonl'}", num_images=0)
    reasons = " | ".join(s["reason"] for s in manifest["skipped"])
    assert "zero-byte" in reasons and "not an image" in reasons and "not found" in reasons
    assert "cannot be decoded" in reasons
    assert manifest["images"] == 3
    by_id = {e.image_id: e for s in _all(cache).values() for e in s}
    assert by_id["ok1.jpg"].captions == ["a dog", "a brown dog"]  # cleaned and deduplicated


def test_strict_turns_skips_into_an_error(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    for i in range(3):
        (root / f"{i}.jpg").write_bytes(jpeg_bytes((i * 50, 0, 0)))
    (root / "m.csv").write_text("image,caption\n0.jpg,a\n1.jpg,b\n2.jpg,c\nnope.jpg,d\n")
    with pytest.raises(UserError, match="--strict: 1 item"):
        prepare(
            DataConfig(source=f"manifest:{root / 'm.csv'}", num_images=0),
            tmp_path / "c",
            strict=True,
            progress=False,
            log=lambda m: None,
        )
    assert not (tmp_path / "c").exists()


def test_identical_bytes_under_two_ids_are_one_image(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    same = jpeg_bytes((10, 20, 30))
    for name in ("a.jpg", "b.jpg"):
        (root / name).write_bytes(same)
    for i in range(3):
        (root / f"o{i}.jpg").write_bytes(jpeg_bytes((100 + i * 40, 0, 0)))
    lines = ["file_name,caption", "a.jpg,first ref", "b.jpg,second ref"] + [f"o{i}.jpg,other {i}" for i in range(3)]
    (root / "metadata.csv").write_text("\n".join(lines))
    manifest, cache = _prep(tmp_path, source=f"imagefolder:{root}", num_images=0)
    assert manifest["images"] == 4 and manifest["merged_duplicate_images"] == 1
    by_id = {e.image_id: e for s in _all(cache).values() for e in s}
    assert by_id["a.jpg"].captions == ["first ref", "second ref"]


def test_parquet_source_and_cache_reuse(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {"image": {"bytes": jpeg_bytes((i * 30, 0, 0)), "path": None}, "cocoid": i % 4, "caption": f"cap {i}"}
        for i in range(12)
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    manifest, cache = _prep(tmp_path, source=f"parquet:{tmp_path / 'd.parquet'}", id_column="cocoid", num_images=0)
    assert manifest["images"] == 4 and manifest["references"] == 12
    again = prepare(
        DataConfig(source=f"parquet:{tmp_path / 'd.parquet'}", id_column="cocoid", num_images=0),
        cache,
        progress=False,
        log=lambda m: None,
    )
    assert again == manifest
    with pytest.raises(UserError, match="other settings"):
        prepare(
            DataConfig(source=f"parquet:{tmp_path / 'd.parquet'}", id_column="cocoid", num_images=0, seed=9),
            cache,
            progress=False,
            log=lambda m: None,
        )


def test_malformed_jsonl_names_file_and_line(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"image": "a.jpg", "caption": "x"}\n{broken\n')
    with pytest.raises(UserError, match=r"m\.jsonl line 2: malformed JSON"):
        _prep(tmp_path, source=f"manifest:{tmp_path / 'm.jsonl'}", num_images=0)


@pytest.mark.parametrize("mode", ["CMYK", "P", "L", "I;16", "RGBA", "LA"])
def test_every_mode_converts_to_rgb(mode):
    img = Image.new(mode, (8, 8))
    buf = io.BytesIO()
    img.save(buf, format="TIFF" if mode in ("CMYK", "I;16") else "PNG")
    assert check_image(buf.getvalue(), 10_000) is None
    assert load_rgb(buf.getvalue()).mode == "RGB"


def test_pixel_limit():
    assert "over data.max_pixels" in check_image(jpeg_bytes(size=(100, 100)), 5000)


def _coco_captions_copy(root, n_images=5):
    """A local copy of the jxie/coco_captions schema: image, filename, cocoid, caption; 5 rows per image."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for i in range(n_images):
        data = jpeg_bytes((i * 40, 80, 160))
        for j in range(5):
            rows.append(
                {
                    "image": {"bytes": data, "path": f"COCO_{i}.jpg"},
                    "filename": f"COCO_{i}.jpg",
                    "cocoid": 1000 + i,
                    "caption": f"image {i} caption {j}.",
                }
            )
    (root / "data").mkdir(parents=True)
    table = pa.Table.from_pylist(rows)
    pq.write_table(table.slice(0, 13), root / "data" / "train-00000-of-00002.parquet")
    pq.write_table(table.slice(13), root / "data" / "train-00001-of-00002.parquet")
    return root


def test_hub_source_streams_a_local_copy_of_coco_captions(tmp_path):
    repo = _coco_captions_copy(tmp_path / "coco_captions")
    manifest, cache = _prep(tmp_path, source=f"hub:{repo}", id_column="cocoid", num_images=3)
    ids = {e.image_id: e for s in _all(cache).values() for e in s}
    assert set(ids) == {"1000", "1001", "1002"}
    assert all(len(e.captions) == 5 for e in ids.values())  # every reference, across shard borders
    assert manifest["references"] == 15


def test_split_column_is_honoured(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    lines = ["image,caption,karpathy"]
    for i, split in enumerate(["train", "restval", "val", "test", "test"]):
        (root / f"{i}.jpg").write_bytes(jpeg_bytes((i * 40, 0, 0)))
        lines.append(f"{i}.jpg,cap {i},{split}")
    (root / "m.csv").write_text("\n".join(lines))
    manifest, cache = _prep(tmp_path, source=f"manifest:{root / 'm.csv'}", num_images=0, split_column="karpathy")
    assert manifest["counts"] == {"train": 2, "validation": 1, "test": 2}
    assert [e.image_id for e in load_split(cache, "validation")] == ["2.jpg"]


def test_non_utf8_metadata_names_the_file(tmp_path):
    (tmp_path / "m.csv").write_bytes(b"image,caption\nx.jpg,caf\xe9\n")
    with pytest.raises(UserError, match=r"m\.csv: not UTF-8"):
        _prep(tmp_path, source=f"manifest:{tmp_path / 'm.csv'}", num_images=0)


def test_cli_prepare_and_inspect(tmp_path, image_folder, capsys):
    from captune.cli import main

    out = tmp_path / "cache"
    assert (
        main(
            [
                "data",
                "prepare",
                "--source",
                f"coco:{image_folder / 'captions.json'}",
                "--out",
                str(out),
                "--num-images",
                "5",
                "--ratios",
                "0.6,0.2,0.2",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["data", "inspect", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert sum(len(v) for v in doc["splits"].values()) == 5
    assert set(doc["references"].values()) == {3}
    assert main(["data", "inspect", str(out)]) == 0
    assert "references 15" in capsys.readouterr().out
    assert main(["data", "prepare", "--source", "nope:x", "--out", str(out)]) == 2


def test_arrow_source_save_to_disk(tmp_path):
    import datasets

    rows = {
        "image": [{"bytes": jpeg_bytes((i * 50, 9, 9)), "path": None} for i in range(4)],
        "caption": [[f"a {i}", f"b {i}"] for i in range(4)],
    }
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Sequence(datasets.Value("string"))})
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(tmp_path / "ds")
    manifest, cache = _prep(tmp_path, source=f"arrow:{tmp_path / 'ds'}", num_images=0)
    assert manifest["images"] == 4 and manifest["references"] == 8


def test_image_without_captions_is_skipped_and_malformed_coco_json(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    images = []
    for i in range(4):
        (root / f"{i}.jpg").write_bytes(jpeg_bytes((i * 60, 1, 1)))
        images.append({"id": i, "file_name": f"{i}.jpg"})
    anns = [{"image_id": i, "caption": f"cap {i}"} for i in range(3)] + [{"image_id": 3, "caption": "  "}]
    (root / "a.json").write_text(json.dumps({"images": images, "annotations": anns}))
    manifest, _ = _prep(tmp_path, source=f"coco:{root / 'a.json'}", num_images=0)
    assert manifest["images"] == 3
    assert {"item": "image 3", "reason": "no non-empty caption"} in manifest["skipped"]
    (root / "bad.json").write_text('{"images": [\n{"id": 1,,}]}')
    with pytest.raises(UserError, match=r"bad\.json line 2: malformed JSON"):
        _prep(tmp_path / "x", source=f"coco:{root / 'bad.json'}", num_images=0)


def _list_pairs(examples, mode, rng):
    """The list-based pairs the compact ones replaced: the reference for their order."""
    if mode == "all":
        return [(i, c) for i, ex in enumerate(examples) for c in ex.captions]
    if mode == "first":
        return [(i, ex.captions[0]) for i, ex in enumerate(examples)]
    return [(i, rng.choice(ex.captions)) for i, ex in enumerate(examples)]


def _list_groups(counts, order, batch_pairs):
    groups, current, pairs = [], [], 0
    for i in order:
        current.append(i)
        pairs += counts[i]
        if pairs >= batch_pairs:
            groups.append(current)
            current, pairs = [], 0
    return groups + ([current] if current else [])


def test_training_pair_modes():
    import random

    from captune.data.pairs import caption_counts, pair_batches, pair_stride, training_pairs
    from captune.data.prepare import Example

    ex = [Example("a", b"", ["a1", "a2", "a3"]), Example("b", b"", ["b1"])]
    counts = caption_counts(ex)

    def decoded(mode, rng):
        codes = training_pairs(counts, mode, rng)
        return [p for batch in pair_batches(ex, codes, 3, pair_stride(counts)) for p in batch]

    assert decoded("all", random.Random(0)) == [(0, "a1"), (0, "a2"), (0, "a3"), (1, "b1")]
    assert decoded("first", random.Random(0)) == [(0, "a1"), (1, "b1")]
    picks = {decoded("random", random.Random(s))[0][1] for s in range(20)}
    assert picks == {"a1", "a2", "a3"}


@pytest.mark.parametrize("packed,mode", [(True, "all"), (False, "all"), (False, "first"), (False, "random")])
def test_compact_micro_batches_are_the_list_based_ones(packed, mode):
    """Same seed, same micro-batches as shuffling Python lists gave (golden runs and resumes rely on it)."""
    import random

    from captune.config import TrainConfig
    from captune.data.prepare import Example
    from captune.training.plan import Plan

    rng = random.Random(4)
    ex = [Example(f"i{i}", b"", [f"c{i}-{j}" for j in range(rng.randint(1, 6))]) for i in range(203)]
    plan = Plan.make(ex, TrainConfig(batch_size=16, epochs=1), mode, packed)
    for seed in range(3):
        got, rng = plan.micro_batches(ex, random.Random(seed)), random.Random(seed)
        if packed:
            order = list(range(len(ex)))
            rng.shuffle(order)
            want = _list_groups([len(e.captions) for e in ex], order, 16)
        else:
            pairs = _list_pairs(ex, mode, rng)
            rng.shuffle(pairs)
            want = [pairs[i : i + 16] for i in range(0, len(pairs), 16)]
        assert list(got) == want and len(got) == len(want) == plan.steps_per_epoch
        assert list(got[5:]) == want[5:] and got[-1] == want[-1] and list(got[len(want) :]) == []


def test_split_is_read_lazily_in_order_with_digests(tmp_path):
    import hashlib

    from captune.data import cache

    _, root = _prep(tmp_path, source="demo:shapes-catalog", num_images=260)
    split = load_split(root, "train")
    assert len(split) == 208 and len(list((root).glob("train-*.parquet"))) == 1
    examples = list(split)
    assert all(e._image is None for e in examples)  # no bytes held
    import pyarrow.parquet as pq

    rows = pq.read_table(root / "train-00000.parquet").to_pylist()
    assert [(e.image_id, e.captions, e.image) for e in examples] == [
        (r["image_id"], r["captions"], r["image"]) for r in rows
    ]
    assert all(e.digest == hashlib.sha256(e.image).hexdigest() for e in examples[:20])
    assert [e.image_id for b in split.batches(50) for e in b] == [e.image_id for e in examples]
    assert [len(b) for b in split.batches(50)] == [50, 50, 50, 50, 8]
    view = split[100:110]
    assert [e.image_id for e in view] == [e.image_id for e in examples[100:110]]
    assert view.images()[2:4] == [examples[102].image, examples[103].image]
    assert split.images_by_id()[examples[150].image_id] == examples[150].image
    assert len(split._images.items) <= cache.ROW_GROUP_CACHE  # a bounded number of row groups decoded
    assert split[7].digest == examples[7].digest and split[7]._image is None


_KILLED_PREPARE = """
import os, signal, sys
from captune.config import DataConfig
from captune.data import prepare as p
from captune.data.sources import read_source
p.COMMIT_ITEMS, p.SHARD_ROWS = 40, 30
cfg = DataConfig(source="demo:shapes-catalog", num_images=150)
stop_at, shards = int(sys.argv[2]), int(sys.argv[3])
def items():
    for n, item in enumerate(read_source(cfg)):
        if n == stop_at:
            os.kill(os.getpid(), signal.SIGKILL)
        yield item
import pyarrow.parquet as pq
real, count = pq.write_table, [0]
def write_table(*a, **k):
    count[0] += 1
    if count[0] > shards:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*a, **k)
pq.write_table = write_table
p.prepare(cfg, sys.argv[1], items=items(), progress=False, log=lambda m: None)
"""


def _cache_content(root):
    import pyarrow.parquet as pq

    manifest = json.loads((root / "manifest.json").read_text())
    manifest.pop("seconds")
    shards = {f.name: pq.read_table(f).to_pylist() for f in sorted(root.glob("*.parquet"))}
    return manifest, shards


def test_killed_prepare_restarts_from_completed_work(tmp_path):
    """Killed in the first pass (after some committed chunks), then in the second (after some
    shards): each re-run goes on from there, and the cache equals an uninterrupted run's."""
    import os
    import subprocess
    import sys

    from captune.data import prepare as p

    out = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for stop_at, shards in ((95, 99), (10_000, 2)):
        done = subprocess.run([sys.executable, "-c", _KILLED_PREPARE, str(out), str(stop_at), str(shards)], env=env)
        assert done.returncode == -9
        assert not out.exists() and (tmp_path / ".cache.partial").is_dir()
    partial = tmp_path / ".cache.partial"
    assert len(list(partial.glob("*.parquet"))) == 2  # the second kill came after two shards
    done = subprocess.run([sys.executable, "-c", _KILLED_PREPARE, str(out), "10000", "99"], env=env)
    assert done.returncode == 0 and not partial.exists()
    old = (p.COMMIT_ITEMS, p.SHARD_ROWS)
    try:
        p.COMMIT_ITEMS, p.SHARD_ROWS = 40, 30
        p.prepare(
            DataConfig(source="demo:shapes-catalog", num_images=150),
            tmp_path / "whole",
            progress=False,
            log=lambda m: None,
        )
    finally:
        p.COMMIT_ITEMS, p.SHARD_ROWS = old
    assert _cache_content(out) == _cache_content(tmp_path / "whole")


def test_cache_written_before_digests_reads_the_same(tmp_path):
    """A cache from before the digest column (same CACHE_VERSION) reads as before; digests are hashed."""
    import hashlib

    import pyarrow.parquet as pq

    _, root = _prep(tmp_path, source="demo:shapes-catalog", num_images=40)
    path = root / "train-00000.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["digest"]), path)
    split = load_split(root, "train")
    rows = pq.read_table(path).to_pylist()
    assert [(e.image_id, e.captions, e.image) for e in split] == [
        (r["image_id"], r["captions"], r["image"]) for r in rows
    ]
    assert split[3].digest == hashlib.sha256(rows[3]["image"]).hexdigest()


def test_progress_line_says_images_per_second_and_eta():
    from captune.data.prepare import _Progress

    out = io.StringIO()
    bar = _Progress("writing", 1000, True, stream=out)
    bar.shown -= 60  # a line is due (every 30 s when not on a terminal)
    bar.update(250)
    bar.update(1000, last=True)
    first, last = out.getvalue().splitlines()
    assert first.startswith("  writing: 250/1000 images, ") and "images/s, ETA " in first
    assert last.startswith("  writing: 1000/1000 images, ") and "ETA" not in last
    quiet = io.StringIO()
    _Progress("reading", 0, False, stream=quiet).update(5, last=True)
    assert quiet.getvalue() == ""
    short = io.StringIO()  # a pass under 30 s off a terminal: no line (a failing run's stderr stays one line)
    _Progress("reading", 5, True, stream=short).update(5, last=True)
    assert short.getvalue() == ""


def test_demo_vocabulary_check_streams_the_training_captions(tmp_path):
    """The data phase's unknown-word check reads the captions shard by shard, never as one list."""
    import types

    from captune.demo.vocabulary import _train_captions

    _, root = _prep(tmp_path, source="demo:shapes-catalog", num_images=40)
    captions = _train_captions(root)
    assert isinstance(captions, types.GeneratorType)
    assert list(captions) == [c for e in load_split(root, "train") for c in e.captions]


def _coco_captions_with_splits(root):
    """A local copy of jxie/coco_captions with its three Hub splits (train/validation/test parquet files)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "data").mkdir(parents=True)
    for split, first, count in (("train", 0, 6), ("validation", 6, 3), ("test", 9, 2)):
        rows = [
            {
                "image": {"bytes": jpeg_bytes((i * 20, 90, 160)), "path": f"COCO_{i}.jpg"},
                "filename": f"COCO_{i}.jpg",
                "cocoid": 1000 + i,
                "caption": f"image {i} caption {j}.",
            }
            for i in range(first, first + count)
            for j in range(5)
        ]
        pq.write_table(pa.Table.from_pylist(rows), root / "data" / f"{split}-00000-of-00001.parquet")
    return root


def test_joined_hub_splits_keep_each_image_in_its_own_split(tmp_path):
    """data.split=train+validation+test (the coco-karpathy recipe): every Hub split is read and each
    image lands in the split its Hub split names, not by the ratios."""
    repo = _coco_captions_with_splits(tmp_path / "coco_captions")
    manifest, cache = _prep(
        tmp_path, source=f"hub:{repo}", split="train+validation+test", id_column="cocoid", num_images=0
    )
    splits = _all(cache)
    assert sorted(int(e.image_id) for e in splits["train"]) == list(range(1000, 1006))
    assert sorted(int(e.image_id) for e in splits["validation"]) == [1006, 1007, 1008]
    assert sorted(int(e.image_id) for e in splits["test"]) == [1009, 1010]
    assert manifest["references"] == 55


def test_joined_splits_are_checked():
    from captune.config import ConfigError

    for bad in (
        {"source": "manifest:m.csv", "split": "train+test"},
        {"source": "hub:a/b", "split": "train+dev2"},
        {"source": "hub:a/b", "split": "train+test", "split_column": "karpathy"},
    ):
        with pytest.raises(ConfigError, match="data.split"):
            DataConfig(**bad).check()


def test_validation_sample_is_seeded_and_in_split_order():
    from captune.data.cache import Example, sample_examples

    examples = [Example(str(i), b"x", ["c"]) for i in range(50)]
    a, b = sample_examples(examples, 10, 3), sample_examples(examples, 10, 3)
    assert [e.image_id for e in a] == [e.image_id for e in b]
    assert [int(e.image_id) for e in a] == sorted(int(e.image_id) for e in a) and len(a) == 10
    assert sample_examples(examples, 0, 3) is examples and sample_examples(examples, 80, 3) is examples


def test_a_large_split_reads_its_text_by_shard_with_the_same_rows(tmp_path, monkeypatch):
    """Above WHOLE_TEXT_ROWS a split reads ids and captions a shard at a time (memory bounded by
    TEXT_SHARDS shards): every row, view, caption count and digest equals the whole-split reading."""
    import hashlib

    from captune.data import cache, prepare
    from captune.data.cache import ImageColumn
    from captune.data.pairs import caption_counts, image_groups

    monkeypatch.setattr(prepare, "SHARD_ROWS", 40)
    _, root = _prep(tmp_path, source="demo:shapes-catalog", num_images=260)
    whole = load_split(root, "train")
    rows = [(e.image_id, e.captions, e.digest) for e in whole]
    assert len(list(root.glob("train-*.parquet"))) == 6
    monkeypatch.setattr(cache, "WHOLE_TEXT_ROWS", 0)
    monkeypatch.setattr(cache, "TEXT_SHARDS", 2)
    by_shard = load_split(root, "train")
    assert [(e.image_id, e.captions, e.digest) for e in by_shard] == rows and not by_shard._columns
    assert len(by_shard._text.items) <= 2
    order = list(range(len(rows)))[::-1]
    assert [by_shard[i].captions for i in order] == [rows[i][1] for i in order]  # random access
    assert caption_counts(by_shard).tolist() == [len(r[1]) for r in rows] == caption_counts(list(whole)).tolist()
    assert list(image_groups(caption_counts(by_shard), order, 32)) == _list_groups([len(r[1]) for r in rows], order, 32)
    view = by_shard[45:130]
    assert [(e.image_id, e.captions) for e in view] == [r[:2] for r in rows[45:130]]
    assert caption_counts(view).tolist() == [len(r[1]) for r in rows[45:130]]
    digests = [hashlib.sha256(e.image).digest() for e in whole]
    assert list(ImageColumn(view).iter_digests()) == digests[45:130]  # the digest column, sliced per shard
    assert ImageColumn(by_shard).digests() == digests == ImageColumn(list(whole)).digests()
