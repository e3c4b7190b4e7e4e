"""A prepared split read as a stream: examples whose image bytes stay in the parquet shards.

``Split`` is a read-only sequence of ``Example``. Up to ``WHOLE_TEXT_ROWS`` images, its ids and
captions are read once, on first use, into Arrow arrays (the text and its offsets: about 300
bytes an image with 5 captions, so training can look up any image's captions at once); a larger
split reads them a shard at a time as they are asked for, through a cache of ``TEXT_SHARDS``
shards, so its memory does not grow with it (``caption_counts`` gives every image's number of
captions, 4 bytes an image, for grouping). Digests and image bytes are read from the shards on
demand, through a small cache of decoded row groups. Iterating a million images keeps at most
``ROW_GROUP_CACHE`` row groups of images in memory.
"""

from __future__ import annotations

import bisect
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import overload

from captune.data.files import chunks

# Row groups kept decoded per split; a row group is at most prepare.ROW_GROUP_ROWS rows.
ROW_GROUP_CACHE = 4
WHOLE_TEXT_ROWS = 200_000  # above this, ids and captions are read by shard as asked (COCO's 113k: whole)
TEXT_SHARDS = 64  # shards of ids and captions kept read when reading by shard


class Example:
    """One image of a split: id, every reference, content digest; bytes read on demand.

    ``Example(id, bytes, captions)`` holds its bytes (tests, in-memory data); an example from
    ``load_split`` reads them from its shard each time ``image`` is asked for.
    """

    __slots__ = ("_digest", "_image", "_where", "captions", "image_id")

    def __init__(
        self,
        image_id: str,
        image: bytes | None = None,
        captions: list[str] | None = None,
        *,
        digest: str | None = None,
        where: tuple[Split, int, int] | None = None,
    ):
        if image is None and where is None:
            raise ValueError("an Example needs its image bytes or where to read them")
        self.image_id = image_id
        self.captions = list(captions or [])
        self._image = image
        self._digest = digest
        self._where = where

    @property
    def image(self) -> bytes:
        """The image's encoded bytes, as they came from the source."""
        if self._image is not None:
            return self._image
        split, group, row = self._where
        return split.image_bytes(group, row)

    @property
    def digest(self) -> str:
        """SHA-256 (hex) of the image bytes; from the cache, so asking for it reads no image."""
        if self._digest is None and self._where is not None:
            split, group, row = self._where
            self._digest = split.digest_of(group, row)
        if self._digest is None:
            self._digest = hashlib.sha256(self.image).hexdigest()
        return self._digest

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Example):
            return NotImplemented
        return (self.image_id, self.captions, self.digest) == (other.image_id, other.captions, other.digest)

    def __repr__(self) -> str:
        return f"Example({self.image_id!r}, captions={self.captions!r})"


def _shard_starts(groups: list, shards: int) -> list[int]:
    """The first row of each shard (and the total last), from the (shard, group, rows) list."""
    rows = [0] * shards
    for shard, _, n in groups:
        rows[shard] += n
    starts = [0]
    for n in rows:
        starts.append(starts[-1] + n)
    return starts


class _GroupCache:
    """A bounded LRU of decoded row groups, shared by the threads that read one split."""

    def __init__(self, size: int):
        self.size = size
        self.items: OrderedDict = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key, load):
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        value = load()
        with self.lock:
            self.items[key] = value
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return value


class Split(Sequence[Example]):
    """The examples of one split, in shard order, read on demand (see the module docstring)."""

    def __init__(self, shards: list[Path], *, _groups: list | None = None, _range: range | None = None):
        import pyarrow.parquet as pq

        self.shards = shards
        if _groups is None:
            _groups = []  # (shard index, row group index, rows) in order
            for s, path in enumerate(shards):
                meta = pq.ParquetFile(path).metadata
                _groups += [(s, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
        self._groups = _groups
        self._starts = [0]
        for _, _, rows in _groups:
            self._starts.append(self._starts[-1] + rows)
        self._range = range(self._starts[-1]) if _range is None else _range
        self._meta = _GroupCache(ROW_GROUP_CACHE)
        self._columns: list = []  # [ids, captions] of the whole split, read on first use
        self._text = _GroupCache(TEXT_SHARDS)  # (ids, captions) by shard, for a large split
        self._counts: list = []  # [every row's caption count] of the whole split, read on first use
        self._shard_starts = _shard_starts(_groups, len(shards)) if _range is None else []  # a view: its split's
        self._images = _GroupCache(ROW_GROUP_CACHE)
        self._files = _GroupCache(ROW_GROUP_CACHE)
        self._read_lock = threading.Lock()  # one parquet read at a time (threads hash images)

    def __len__(self) -> int:
        return len(self._range)

    @overload
    def __getitem__(self, i: int) -> Example: ...
    @overload
    def __getitem__(self, i: slice) -> Split: ...
    def __getitem__(self, i):
        if isinstance(i, slice):
            sub = self._range[i]
            if sub.step != 1:
                return [self._example(j) for j in sub]
            view = Split(self.shards, _groups=self._groups, _range=sub)
            view._meta, view._images, view._files = self._meta, self._images, self._files
            view._columns = self._columns  # shared: filled once for the split and its views
            view._text, view._shard_starts = self._text, self._shard_starts
            view._counts = self._counts  # shared like the columns
            view._read_lock = self._read_lock
            return view
        return self._example(self._range[i])

    def __iter__(self) -> Iterator[Example]:
        for j in self._range:
            yield self._example(j)

    def batches(self, size: int) -> Iterator[list[Example]]:
        """The split in lists of ``size`` examples (the last may be shorter), shard by shard."""
        return chunks(self, size)

    def images(self) -> ImageColumn:
        """The split's image bytes as a lazy sequence (slices read only the rows they name), with the
        cache's digests."""
        return ImageColumn(self)

    def images_by_id(self) -> ImagesById:
        """A mapping image id -> bytes that reads an image only when it is looked up."""
        return ImagesById(self)

    def digests(self) -> list[str]:
        """Every image's SHA-256 (hex), read from the cache without reading an image."""
        return [e.digest for e in self]

    def _example(self, j: int) -> Example:
        group = bisect.bisect_right(self._starts, j) - 1
        where = (self, group, j - self._starts[group])
        if self._starts[-1] > WHOLE_TEXT_ROWS:
            shard = bisect.bisect_right(self._shard_starts, j) - 1
            ids, captions = self._text.get(shard, lambda: self._read_text(shard))
            row = j - self._shard_starts[shard]
            return Example(ids[row].as_py(), None, captions[row].as_py(), where=where)
        ids, captions = self._ids_and_captions()
        return Example(ids[j].as_py(), None, captions[j].as_py(), where=where)

    def _digest_bytes(self) -> Iterator[bytes]:
        """The rows' digests (bytes) in order, read from the digest column a shard at a time."""
        import pyarrow.parquet as pq

        first, stop = self._range.start, self._range.stop
        for shard in range(len(self.shards)):
            lo, hi = self._shard_starts[shard], self._shard_starts[shard + 1]
            if hi <= first or lo >= stop:
                continue
            with self._read_lock:
                column = pq.read_table(self.shards[shard], columns=["digest"]).column("digest")
            yield from (
                bytes.fromhex(d) for d in column.slice(max(first - lo, 0), min(stop, hi) - max(first, lo)).to_pylist()
            )

    def _read_text(self, shard: int):
        import pyarrow.parquet as pq

        with self._read_lock:
            table = pq.read_table(self.shards[shard], columns=["image_id", "captions"])
        return table.column("image_id"), table.column("captions")

    def caption_counts(self):
        """Each image's number of captions (a numpy array in split order), read without the text."""
        import numpy as np
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        if not self._counts:
            parts = [
                pc.list_value_length(pq.read_table(p, columns=["captions"]).column("captions")) for p in self.shards
            ]
            whole = np.concatenate([np.asarray(c.to_numpy(), dtype=np.int32) for c in parts]) if parts else []
            self._counts.append(np.asarray(whole, dtype=np.int32))
        return self._counts[0][self._range.start : self._range.stop]

    def _ids_and_captions(self):
        if not self._columns:
            import pyarrow as pa
            import pyarrow.parquet as pq

            with self._read_lock:
                if not self._columns:
                    tables = [pq.read_table(path, columns=["image_id", "captions"]) for path in self.shards]
                    if tables:
                        table = pa.concat_tables(tables)
                        ids, captions = table.column("image_id"), table.column("captions")
                    else:
                        ids, captions = pa.chunked_array([], pa.string()), pa.chunked_array([], pa.list_(pa.string()))
                    # kept in their shards' chunks: joining them would copy the split's captions
                    # once more (at a million images, a second few hundred MB at the peak)
                    self._columns += [ids, captions]
        return self._columns

    def digest_of(self, group: int, row: int) -> str | None:
        """One row's digest from its row group (None in a cache written before digests were kept)."""
        return self._meta.get(group, lambda: self._read_digests(group))[row] if self._has_digests() else None

    def _has_digests(self) -> bool:
        return bool(self.shards) and "digest" in self._file(0).schema_arrow.names

    def _file(self, shard: int):
        import pyarrow.parquet as pq

        return self._files.get(shard, lambda: pq.ParquetFile(self.shards[shard]))

    def _read_digests(self, group: int) -> list[str]:
        shard, g, _ = self._groups[group]
        pf = self._file(shard)
        with self._read_lock:
            return pf.read_row_group(g, columns=["digest"]).column("digest").to_pylist()

    def image_bytes(self, group: int, row: int) -> bytes:
        """The bytes of one row, through the bounded cache of decoded row groups."""

        def load():
            shard, g, _ = self._groups[group]
            pf = self._file(shard)
            with self._read_lock:
                return pf.read_row_group(g, columns=["image"]).column("image").combine_chunks()

        return self._images.get(group, load)[row].as_py()


class ImageColumn(Sequence[bytes]):
    """The images of a list of examples, read only when indexed (a lazily read ``Example.image`` stays
    unread until its batch), and their SHA-256 digests: the examples' own (``digest``, hex) where
    they carry one, else computed from the bytes."""

    def __init__(self, examples: Sequence):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i):
        if isinstance(i, slice):  # a Split's slice is a view of its rows: nothing read until asked
            return [e.image for e in self.examples[i]]
        return self.examples[i].image

    def digests(self) -> list[bytes]:
        """Each image's SHA-256, all in a list (``iter_digests`` gives them one batch at a time)."""
        return list(self.iter_digests())

    def iter_digests(self) -> Iterator[bytes]:
        """Each image's SHA-256 in order: the example's own where it has one (no read), else of its
        bytes, read a batch at a time and hashed in threads (hashlib lets go of the GIL). Nothing is
        kept: a million images' key costs one batch of digests, not a list of them."""
        from concurrent.futures import ThreadPoolExecutor

        from captune.ops.features import _workers

        if isinstance(self.examples, Split) and self.examples._has_digests():
            yield from self.examples._digest_bytes()  # the digest column alone, a shard at a time
            return
        with ThreadPoolExecutor(_workers()) as pool:
            for start in range(0, len(self.examples), 256):
                part = self.examples[start : start + 256]
                known = [getattr(e, "digest", None) for e in part]
                if all(isinstance(k, str) for k in known):
                    yield from (bytes.fromhex(k) for k in known)
                    continue
                data = [None if isinstance(k, str) else e.image for e, k in zip(part, known, strict=True)]
                yield from pool.map(_digest_of, known, data)


def _digest_of(known: str | None, data: bytes | None) -> bytes:
    return bytes.fromhex(known) if data is None else hashlib.sha256(data).digest()


class ImagesById(Mapping[str, bytes]):
    """Image bytes by id, read on lookup (a report shows a few images of a large split)."""

    def __init__(self, split: Split):
        self.split = split
        self.index = {e.image_id: j for j, e in enumerate(split)}

    def __getitem__(self, image_id: str) -> bytes:
        return self.split[self.index[image_id]].image

    def __iter__(self) -> Iterator[str]:
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)


def open_split(data_dir: Path, split: str) -> Split:
    """The shards of ``split`` in ``data_dir`` as one ``Split`` (read lazily)."""
    return Split(sorted(Path(data_dir).glob(f"{split}-*.parquet")))


def as_images(examples: Sequence[Example]) -> ImageColumn:
    """The image bytes of ``examples``, read a batch at a time as asked, with their digests (the
    cache's where the examples come from one: no image hashed again for the feature cache's key)."""
    return ImageColumn(examples)


def sample_examples(examples: Sequence[Example], n: int, seed: int) -> Sequence[Example]:
    """At most ``n`` of ``examples`` (0 = all): a seeded sample, in split order; nothing is read."""
    if n <= 0 or n >= len(examples):
        return examples
    import random

    keep = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in keep]
