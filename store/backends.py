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
the stable zarr v3 spec (``uint8``, ``sharding_indexed``, ``crc32c`` on the shard index). Reads of
such an array bypass zarr (``ZarrBackend.plan_span``): the shard index is read and its crc32c
checked once per file, then a span is ranged reads of just its bytes in the shard file; arrays
in any other layout are read through zarr.

WebDataset (``shards/NNNNNN-GROUP.tar``, one tar per group and shard): members are
``KEY.FIELD.dkb`` with ``KEY = IIIIIIIIIIII_vV`` (image id, view index) in sample order, written
with ``webdataset.TarWriter``. Streaming reads the tars front to back (tar headers checked,
the whole file's sha256 compared with the receipt at its end); random access uses the recorded
member offsets.

Both read any fsspec location, HTTP(S) included: every read is a byte range of a file the receipt
names. Over 500 lines because the backends and the read path they share are one concept: a new
backend stays a change of this file alone (docs/ARCHITECTURE.md).
"""
from __future__ import annotations

import hashlib
import io
import math
import tarfile
import threading
from collections import OrderedDict

import google_crc32c
import numpy as np

from . import fsutil
from .errors import CacheError, CorruptShardError
from .layout import SHARDS, shard_name

BLOB_SUFFIX = ".dkb"
_WINDOW_BYTES = 64 << 20      # streaming reads of zarr groups in windows of about this size


class ReadStats:
    """Bytes fetched per file path (relative to the cache root): tests and benchmarks assert on it."""

    def __init__(self):
        self.bytes_by_path: dict[str, int] = {}
        self._lock = threading.Lock()         # reads run in several threads (the trainer's read-ahead)

    def add(self, path: str, nbytes: int) -> None:
        with self._lock:
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
    def plan_span(self, receipt: dict, group: str, start: int, end: int):
        """How to read bytes ``start:end`` of a group's blobs: ``(ranges, assemble)``, where ranges
        are ``(rel path, file start, file end)`` byte ranges and ``assemble(parts)`` turns the bytes
        read for them into the span; None when this backend cannot say (then ``read_span``)."""
        return None

    def prepare(self, receipt: dict, group: str) -> None:
        """Read now what ``plan_span`` will need for this shard's group (its metadata), so that a batch
        can do it for all its shards concurrently (``Cache.get_many``); by default nothing."""

    def read_span(self, receipt: dict, group: str, start: int, end: int):
        plan = self.plan_span(receipt, group, start, end)
        if plan is None:
            raise NotImplementedError
        ranges, assemble = plan
        return assemble(self.fetch_ranges([(receipt["index"], *r) for r in ranges]))

    def fetch_ranges(self, ranges: list[tuple[int, str, int, int]]) -> list:
        """The bytes of each ``(shard index, rel path, start, end)``: one ``cat_ranges`` call over
        the lot on a remote filesystem (fsspec runs the requests of an async one concurrently),
        ranged reads locally. A short or failed read is a CorruptShardError naming the shard and file."""
        if not ranges:
            return []
        paths = [self.path(rel) for _, rel, _, _ in ranges]
        starts = [int(a) for _, _, a, _ in ranges]
        ends = [int(b) for _, _, _, b in ranges]
        if len(ranges) == 1 or fsutil.is_local(self.fs):
            out = []
            for path, a, b in zip(paths, starts, ends):
                try:
                    out.append(fsutil.read_bytes(self.fs, path, a, b))
                except (OSError, ValueError) as e:
                    out.append(e)
        else:
            out = self.fs.cat_ranges(paths, starts, ends, on_error="return")
        for (shard, rel, a, b), data in zip(ranges, out):
            if isinstance(data, BaseException):
                raise CorruptShardError(f"shard {shard}: cannot read {rel} bytes {a}:{b} ({data})")
            if len(data) > b - a:        # a whole file for a range: an HTTP server that ignores Range
                raise CacheError(f"{self.url}: asked for bytes {a}:{b} of {rel}, got {len(data)} bytes: the server "
                                 "does not serve byte ranges (HTTP Range requests), which reading a cache needs")
            if len(data) != b - a:
                raise CorruptShardError(f"shard {shard}: {rel} is truncated (wanted bytes {a}:{b})")
            self.stats.add(rel, len(data))
        return out

    def read_rows(self, receipt: dict, group: str, rows: list[int], fields: list[str]):
        """Yield (row, {field: blob}) for the given rows, reading each row's fields as one span."""
        layout = receipt["groups"][group]
        cols = [layout["fields"].index(f) for f in fields]
        for row in rows:
            start, end = _row_span(layout, row, cols)
            data = memoryview(self.read_span(receipt, group, start, end))
            yield row, _split(layout, row, fields, cols, start, data)

    def read_many(self, requests: list[tuple[dict, str, int, list[str]]]) -> list[dict]:
        """{field: blob} for each ``(receipt, group, row, fields)``, the same as ``read_rows`` gives,
        with the byte ranges of all requests fetched in one ``fetch_ranges`` call."""
        plans, ranges = [], []
        for receipt, group, row, fields in requests:
            layout = receipt["groups"][group]
            cols = [layout["fields"].index(f) for f in fields]
            start, end = _row_span(layout, row, cols)
            plan = self.plan_span(receipt, group, start, end)
            plans.append((start, end, cols, plan, len(ranges)))
            if plan is not None:
                ranges += [(receipt["index"], *r) for r in plan[0]]
        parts = self.fetch_ranges(ranges)
        out = []
        for (receipt, group, row, fields), (start, end, cols, plan, first) in zip(requests, plans):
            if plan is None:
                data = self.read_span(receipt, group, start, end)
            else:
                data = plan[1](parts[first:first + len(plan[0])])
            out.append(_split(receipt["groups"][group], row, fields, cols, start, memoryview(data)))
        return out

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


def touch(lru: OrderedDict, key) -> None:
    """Mark ``key`` recently used; another reading thread may have evicted it meanwhile."""
    try:
        lru.move_to_end(key)
    except KeyError:
        pass


def _row_span(layout: dict, row: int, cols: list[int]) -> tuple[int, int]:
    offsets, sizes = layout["offsets"][row], layout["nbytes"][row]
    return min(offsets[c] for c in cols), max(offsets[c] + sizes[c] for c in cols)


def _split(layout: dict, row: int, fields: list[str], cols: list[int], start: int, data: memoryview) -> dict:
    offsets, sizes = layout["offsets"][row], layout["nbytes"][row]
    return {f: data[offsets[c] - start: offsets[c] - start + sizes[c]] for f, c in zip(fields, cols)}


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
        self._layouts: OrderedDict = OrderedDict()     # group path -> direct-read layout, or None (use zarr)
        self._indexes: OrderedDict = OrderedDict()     # shard file key -> its index [(offset, nbytes)]

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

    # Random reads bypass zarr: its sync-to-async bridge cost about 3 ms per get (3/4 of a random
    # get's time), far more than the read. The group's zarr.json is parsed once; when the array is
    # the layout build() writes (one shard file, raw uint8 inner chunks, crc32c-checked index) the
    # shard index is read once per file, its crc32c checked as zarr checks it, and a span becomes
    # ranged reads of the shard file. Anything else goes through zarr.
    def plan_span(self, receipt, group, start, end):
        layout = self._direct_layout(receipt, group)
        if layout is None:
            return None
        key, size, chunk, nchunks, data_start, data_end = layout
        where = f"shard {receipt['index']}: {key}"
        if not 0 <= start <= end <= size:
            raise CorruptShardError(f"{where}: bytes {start}:{end} lie outside the array's {size} bytes")
        if start == end:
            return [], _empty_span
        index = self._shard_index(receipt, layout)
        segments = []            # (lo, hi, file offset or None for a chunk zarr left empty)
        for c in range(start // chunk, (end - 1) // chunk + 1):
            offset, nbytes = index[c]
            lo, hi = max(start, c * chunk), min(end, (c + 1) * chunk)
            if offset == _EMPTY and nbytes == _EMPTY:
                file_at = None
            elif nbytes != chunk or offset < data_start or offset + nbytes > data_end:
                raise CorruptShardError(f"{where}: the shard index puts inner chunk {c} at bytes "
                                        f"{offset}:{offset + nbytes}, outside the file's chunk area")
            else:
                file_at = offset + lo - c * chunk
            last = segments[-1] if segments else None
            if (last is not None and file_at is not None and last[2] is not None
                    and last[2] + last[1] - last[0] == file_at):
                segments[-1] = (last[0], hi, last[2])      # contiguous in the file: one read
            else:
                segments.append((lo, hi, file_at))
        ranges = [(key, f, f + hi - lo) for lo, hi, f in segments if f is not None]
        if len(segments) == 1 and ranges:
            return ranges, _only_part
        return ranges, lambda parts: _join_segments(segments, parts)

    def prepare(self, receipt, group):
        layout = self._direct_layout(receipt, group)
        if layout is not None:
            self._shard_index(receipt, layout)

    def _direct_layout(self, receipt, group):
        """(shard file key, array bytes, inner chunk, chunks, chunk area start, end) or None."""
        path = receipt["groups"][group]["path"]
        if path in self._layouts:
            return self._layouts[path]
        meta_key = fsutil.join(path, "zarr.json")
        layout = None
        if meta_key in receipt["files"]:
            data = self.fetch_ranges([(receipt["index"], meta_key, 0, receipt["files"][meta_key]["nbytes"])])[0]
            layout = _parse_direct_layout(path, data)
        if layout is not None and layout[0] not in receipt["files"]:
            layout = None
        if layout is not None:
            key, size, chunk, nchunks, index_at_end = layout
            file_size = int(receipt["files"][key]["nbytes"])
            index_bytes = 16 * nchunks + 4
            area = (0, file_size - index_bytes) if index_at_end else (index_bytes, file_size)
            layout = (key, size, chunk, nchunks) + area
        self._layouts[path] = layout
        if len(self._layouts) > 256:
            self._layouts.popitem(last=False)
        return layout

    def _shard_index(self, receipt, layout):
        key, _, _, nchunks, data_start, data_end = layout
        index = self._indexes.get(key)
        if index is None:
            at = data_end if data_start == 0 else 0
            if data_end < data_start:
                raise CorruptShardError(f"shard {receipt['index']}: {key} is smaller than its shard index")
            raw = bytes(self.fetch_ranges([(receipt["index"], key, at, at + 16 * nchunks + 4)])[0])
            if google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
                raise CorruptShardError(f"shard {receipt['index']}: {key}: the shard index fails its crc32c "
                                        "(damaged file)")
            index = np.frombuffer(raw[:-4], dtype="<u8").reshape(nchunks, 2).tolist()
            self._indexes[key] = index
            if len(self._indexes) > 64:
                self._indexes.popitem(last=False)
        else:
            touch(self._indexes, key)
        return index

    def read_span(self, receipt, group, start, end):
        if self._direct_layout(receipt, group) is not None:
            return super().read_span(receipt, group, start, end)
        path = receipt["groups"][group]["path"]
        try:
            return self._array(path)[start:end]
        except CorruptShardError:
            raise
        except Exception as e:   # zarr raises ValueError/KeyError/... on a bad shard index or file
            raise CorruptShardError(f"shard {receipt['index']}: cannot read {path} bytes {start}:{end} "
                                    f"({type(e).__name__}: {e})") from None


_EMPTY = 2 ** 64 - 1         # a shard index entry of a chunk that was never written (all fill value)


def _only_part(parts):
    return parts[0]


def _empty_span(parts):
    return b""


def _join_segments(segments, parts):
    out, it = [], iter(parts)
    for lo, hi, file_at in segments:
        out.append(bytes(hi - lo) if file_at is None else next(it))
    return b"".join(out)


def _parse_direct_layout(path: str, data):
    """(shard file key, array bytes, inner chunk bytes, inner chunks, index at the end) when the
    array's metadata is the layout ``ZarrBackend.build`` writes; None for anything else."""
    import json

    try:
        meta = json.loads(bytes(data))
        (size,) = meta["shape"]
        (shard,) = meta["chunk_grid"]["configuration"]["chunk_shape"]
        (codec,) = meta["codecs"]
        conf = codec["configuration"]
        (chunk,) = conf["chunk_shape"]
        ok = (meta.get("zarr_format") == 3 and meta.get("node_type") == "array" and meta["data_type"] == "uint8"
              and meta["chunk_grid"]["name"] == "regular" and meta["fill_value"] == 0
              and meta["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "/"}}
              and not meta.get("storage_transformers") and codec["name"] == "sharding_indexed"
              and [c["name"] for c in conf["codecs"]] == ["bytes"]
              and [c["name"] for c in conf["index_codecs"]] == ["bytes", "crc32c"]
              and conf["index_codecs"][0].get("configuration", {}).get("endian", "little") == "little"
              and conf.get("index_location", "end") in ("start", "end")
              and 0 < chunk and shard % chunk == 0 and size <= shard)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    if not ok:
        return None
    return fsutil.join(path, "c", "0"), int(size), int(chunk), shard // chunk, conf.get("index_location", "end") == "end"


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

    def plan_span(self, receipt, group, start, end):
        return [(receipt["groups"][group]["path"], start, end)], _only_part

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
