"""The two shard formats behind one interface. Both hold the same encoded blobs (store/blob.py).

A shard holds ``shard_size`` consecutive samples; each field group of a shard is stored
separately, so that a reader asking for ``region`` never opens the ``fpn`` bytes. Inside a group
file a sample's fields are consecutive, in sorted field-name order, and the shard's receipt
records every blob's byte offset and size, so both backends serve random access by
(image_id, view) with one ranged read per sample and group.

Zarr v3 (``shards/NNNNNN.zarr/``, one zarr group per shard): each field group is a 1-D ``uint8``
array holding the concatenated blobs, stored with the sharding codec as a single shard file
(``shards/NNNNNN.zarr/fpn/c/0``) whose inner chunks are a few KiB to 1 MiB, sized from the
blobs. Why flat byte arrays: dense maps change size with every view's aspect ratio and zarr has
no ragged arrays; per-sample arrays would cost two files per field per sample and per-size
buckets would pad. A flat array per group gives few files (two per group and shard), stays within
the stable zarr v3 spec (``uint8``, ``sharding_indexed``, ``crc32c`` on the shard index), and a
ranged read fetches the shard index plus only the inner chunks that overlap the requested blobs
(at most one partial chunk of extra bytes at each end).

WebDataset (``shards/NNNNNN-GROUP.tar``, one tar per group and shard): members are
``KEY.FIELD.dkb`` with ``KEY = IIIIIIIIIIII_vV`` (image id, view index) in sample order, written
with ``webdataset.TarWriter``. Streaming reads the tars front to back (tar headers checked,
the whole file's sha256 compared with the receipt at its end); random access uses the recorded
member offsets.
"""
from __future__ import annotations

import hashlib
import io
import math
import tarfile
from collections import OrderedDict

import numpy as np

from . import fsutil
from .errors import CorruptShardError
from .layout import SHARDS, shard_name

BLOB_SUFFIX = ".dkb"
_WINDOW_BYTES = 64 << 20      # streaming reads of zarr groups in windows of about this size


class ReadStats:
    """Bytes fetched per file path (relative to the cache root): tests and benchmarks assert on it."""

    def __init__(self):
        self.bytes_by_path: dict[str, int] = {}

    def add(self, path: str, nbytes: int) -> None:
        self.bytes_by_path[path] = self.bytes_by_path.get(path, 0) + int(nbytes)

    def total(self, contains: str = "") -> int:
        return sum(v for k, v in self.bytes_by_path.items() if contains in k)

    def reset(self) -> None:
        self.bytes_by_path.clear()


def sample_key_text(image_id: int, view_index: int) -> str:
    return f"{image_id:012d}_v{view_index}"


class Backend:
    name = ""

    def __init__(self, fs, root: str, url: str, stats: ReadStats | None = None):
        self.fs, self.root, self.url = fs, root, url
        self.stats = stats or ReadStats()

    def path(self, rel: str) -> str:
        return fsutil.join(self.root, rel)

    # -- writing: returns {rel dir or file: payload} to commit, and the per-group layout
    def build(self, index: int, keys: list, groups: dict[str, tuple[list[str], list[list[bytes]]]]):
        raise NotImplementedError

    def commit(self, built) -> dict[str, dict]:
        """Write what ``build`` returned atomically; return {rel path: {nbytes, sha256}}."""
        raise NotImplementedError

    # -- reading
    def read_span(self, receipt: dict, group: str, start: int, end: int):
        raise NotImplementedError

    def read_rows(self, receipt: dict, group: str, rows: list[int], fields: list[str]):
        """Yield (row, {field: blob}) for the given rows, reading each row's fields as one span."""
        layout = receipt["groups"][group]
        cols = [layout["fields"].index(f) for f in fields]
        for row in rows:
            offsets, sizes = layout["offsets"][row], layout["nbytes"][row]
            start = min(offsets[c] for c in cols)
            end = max(offsets[c] + sizes[c] for c in cols)
            data = memoryview(self.read_span(receipt, group, start, end))
            yield row, {f: data[offsets[c] - start: offsets[c] - start + sizes[c]] for f, c in zip(fields, cols)}

    def stream(self, receipt: dict, group: str, fields: list[str]):
        """Yield (row, {field: blob}) for every row of the shard, in order: windows of whole rows
        when all the group's fields are asked for, else each row's span of the requested fields."""
        layout = receipt["groups"][group]
        rows = len(layout["offsets"])
        if sorted(fields) != sorted(layout["fields"]):
            yield from self.read_rows(receipt, group, list(range(rows)), fields)
            return
        cols = [layout["fields"].index(f) for f in fields]
        row = 0
        while row < rows:
            start = min(layout["offsets"][row])
            last = row
            while last + 1 < rows and _row_end(layout, last + 1) - start <= _WINDOW_BYTES:
                last += 1
            end = _row_end(layout, last)
            data = memoryview(self.read_span(receipt, group, start, end))
            for r in range(row, last + 1):
                offsets, sizes = layout["offsets"][r], layout["nbytes"][r]
                yield r, {f: data[offsets[c] - start: offsets[c] - start + sizes[c]] for f, c in zip(fields, cols)}
            row = last + 1


def _row_end(layout: dict, row: int) -> int:
    return max(o + n for o, n in zip(layout["offsets"][row], layout["nbytes"][row]))


def _file_info(data) -> dict:
    return dict(nbytes=len(data), sha256=fsutil.sha256_bytes(data))


# ================================================================================================ zarr
def _chunk_bytes(total: int, blobs: int) -> int:
    mean = total / max(1, blobs)
    return int(min(1 << 20, max(4096, 2 ** round(math.log2(max(1.0, mean / 8))))))


class ZarrBackend(Backend):
    name = "zarr"

    def __init__(self, fs, root, url, stats=None):
        super().__init__(fs, root, url, stats)
        self._store = None
        self._arrays: OrderedDict = OrderedDict()

    def build(self, index, keys, groups):
        import zarr

        store_dict: dict = {}
        mem = zarr.storage.MemoryStore(store_dict)
        top = zarr.open_group(mem, mode="w", attributes=dict(shard=index, samples=len(keys)))
        layout = {}
        base = fsutil.join(SHARDS, shard_name(index) + ".zarr")
        for group, (fields, rows) in groups.items():
            offsets, sizes, pos = [], [], 0
            for blobs in rows:
                offsets.append([pos + sum(len(b) for b in blobs[:i]) for i in range(len(blobs))])
                sizes.append([len(b) for b in blobs])
                pos += sum(sizes[-1])
            buffer = np.frombuffer(b"".join(b for blobs in rows for b in blobs), dtype=np.uint8)
            chunk = _chunk_bytes(buffer.size, sum(len(r) for r in rows))
            padded = max(chunk, -(-buffer.size // chunk) * chunk)
            array = top.create_array(group, shape=(buffer.size,), dtype="uint8", chunks=(chunk,),
                                     shards=(padded,), compressors=None, filters=None, fill_value=0,
                                     attributes=dict(fields=fields, rows=len(rows)))
            array[:] = buffer
            layout[group] = dict(path=fsutil.join(base, group), fields=fields, offsets=offsets, nbytes=sizes,
                                 chunk=chunk)
        files = {key: value.to_bytes() for key, value in store_dict.items()}
        return (base, files), layout

    def commit(self, built):
        base, files = built
        fsutil.commit_dir(self.fs, self.path(base), files)
        return {fsutil.join(base, rel): _file_info(data) for rel, data in sorted(files.items())}

    def _zarr_store(self):
        if self._store is None:
            from zarr.storage import FsspecStore, LocalStore

            inner = (LocalStore(self.root, read_only=True) if fsutil.is_local(self.fs)
                     else FsspecStore.from_url(self.url, read_only=True))
            self._store = _CountingStore(inner, self.stats)
        return self._store

    def _array(self, path: str):
        import zarr

        array = self._arrays.get(path)
        if array is None:
            array = zarr.open_array(self._zarr_store(), path=path, mode="r")
            self._arrays[path] = array
            if len(self._arrays) > 64:
                self._arrays.popitem(last=False)
        return array

    def read_span(self, receipt, group, start, end):
        path = receipt["groups"][group]["path"]
        try:
            return self._array(path)[start:end]
        except CorruptShardError:
            raise
        except Exception as e:   # zarr raises ValueError/KeyError/... on a bad shard index or file
            raise CorruptShardError(f"shard {receipt['index']}: cannot read {path} bytes {start}:{end} "
                                    f"({type(e).__name__}: {e})") from None


_COUNTING_STORE = None


def _CountingStore(store, stats):
    """Wrap a zarr store so that the bytes zarr fetches are counted per key (defined lazily:
    importing zarr costs a few hundred ms that ``python -m store --help`` should not pay)."""
    global _COUNTING_STORE
    if _COUNTING_STORE is None:
        from zarr.storage import WrapperStore

        class CountingStore(WrapperStore):
            def __init__(self, store, stats):
                super().__init__(store)
                self._stats = stats

            def _with_store(self, store):
                return type(self)(store, self._stats)

            async def get(self, key, prototype, byte_range=None):
                buf = await self._store.get(key, prototype, byte_range)
                if buf is not None:
                    self._stats.add(key, len(buf))
                return buf

            async def get_partial_values(self, prototype, key_ranges):
                key_ranges = list(key_ranges)
                out = await self._store.get_partial_values(prototype, key_ranges)
                for (key, _), buf in zip(key_ranges, out):
                    if buf is not None:
                        self._stats.add(key, len(buf))
                return out

        _COUNTING_STORE = CountingStore
    return _COUNTING_STORE(store, stats)


# ================================================================================================ wds
class _HashingReader(io.RawIOBase):
    def __init__(self, f, stats: ReadStats, rel: str):
        self.f, self.stats, self.rel = f, stats, rel
        self.digest, self.nbytes = hashlib.sha256(), 0

    def readable(self):
        return True

    def readinto(self, b):
        data = self.f.read(len(b))
        n = len(data)
        b[:n] = data
        self.digest.update(data)
        self.nbytes += n
        self.stats.add(self.rel, n)
        return n

    def drain(self):
        while self.read(1 << 20):
            pass


class WdsBackend(Backend):
    name = "wds"

    def build(self, index, keys, groups):
        import webdataset

        files, layout = {}, {}
        for group, (fields, rows) in groups.items():
            rel = fsutil.join(SHARDS, f"{shard_name(index)}-{group}.tar")
            out = io.BytesIO()
            writer = webdataset.TarWriter(out, encoder=False, mtime=0, user="detkd", group="detkd")
            for (image_id, view_index), blobs in zip(keys, rows):
                record = {"__key__": sample_key_text(image_id, view_index)}
                record.update({field + BLOB_SUFFIX: bytes(blob) for field, blob in zip(fields, blobs)})
                writer.write(record)
            writer.close()
            data = out.getvalue()
            member_offsets = {}
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
                for member in tar.getmembers():
                    member_offsets[member.name] = (member.offset_data, member.size)
            offsets, sizes = [], []
            for (image_id, view_index), blobs in zip(keys, rows):
                key = sample_key_text(image_id, view_index)
                found = [member_offsets[f"{key}.{field}{BLOB_SUFFIX}"] for field in fields]
                offsets.append([o for o, _ in found])
                sizes.append([n for _, n in found])
            files[rel] = data
            layout[group] = dict(path=rel, fields=fields, offsets=offsets, nbytes=sizes)
        return files, layout

    def commit(self, built):
        for rel, data in built.items():
            fsutil.write_atomic(self.fs, self.path(rel), data)
        return {rel: _file_info(data) for rel, data in sorted(built.items())}

    def read_span(self, receipt, group, start, end):
        rel = receipt["groups"][group]["path"]
        try:
            data = fsutil.read_bytes(self.fs, self.path(rel), start, end)
        except (OSError, ValueError) as e:
            raise CorruptShardError(f"shard {receipt['index']}: cannot read {rel} bytes {start}:{end} ({e})") from None
        if len(data) != end - start:
            raise CorruptShardError(f"shard {receipt['index']}: {rel} is truncated (wanted bytes {start}:{end})")
        self.stats.add(rel, len(data))
        return data

    def stream(self, receipt, group, fields):
        """Read the group's tar front to back and check its sha256 against the receipt at the end
        (ranged reads of the requested members instead when only some of the group's fields are asked for)."""
        layout = receipt["groups"][group]
        if sorted(fields) != sorted(layout["fields"]):
            yield from super().stream(receipt, group, fields)
            return
        rel = layout["path"]
        expected_keys = [sample_key_text(i, v) for i, v in receipt["keys"]]
        wanted = set(fields)
        where = f"shard {receipt['index']} ({rel})"
        try:
            with self.fs.open(self.path(rel), "rb") as f:
                reader = _HashingReader(f, self.stats, rel)
                buffered = io.BufferedReader(reader, buffer_size=1 << 20)
                row, current, blobs = -1, None, {}
                with tarfile.open(fileobj=buffered, mode="r|") as tar:
                    for member in tar:
                        key, _, rest = member.name.partition(".")
                        field = rest[: -len(BLOB_SUFFIX)]
                        if key != current:
                            if current is not None:
                                yield row, blobs
                            row, current, blobs = row + 1, key, {}
                            if row >= len(expected_keys) or key != expected_keys[row]:
                                raise CorruptShardError(f"{where}: member {member.name} out of order")
                        if field in wanted:
                            blobs[field] = tar.extractfile(member).read()
                    if current is not None:
                        yield row, blobs
                buffered.read()
                reader.drain()
        except tarfile.TarError as e:
            raise CorruptShardError(f"{where}: unreadable tar ({e})") from None
        if row + 1 != len(expected_keys):
            raise CorruptShardError(f"{where}: {row + 1} samples, the receipt says {len(expected_keys)}")
        info = receipt["files"][rel]
        if reader.digest.hexdigest() != info["sha256"] or reader.nbytes != info["nbytes"]:
            raise CorruptShardError(f"{where}: sha256 differs from the receipt (corrupt or replaced file)")


_BACKEND_CLASSES: dict[str, type[Backend]] = {cls.name: cls for cls in (ZarrBackend, WdsBackend)}
# The backend names a manifest's "backend" and precompute's --format accept, the one list.
BACKENDS: tuple[str, ...] = tuple(_BACKEND_CLASSES)


def make_backend(name: str, fs, root: str, url: str, stats: ReadStats | None = None) -> Backend:
    return _BACKEND_CLASSES[name](fs, root, url, stats)
