"""Reading a cache: random access by (image_id, view_index) and streaming, per field group.

    cache = open_cache(url, expect=dict(teacher={"checkpoint_sha256": sha}, dataset=fingerprint,
                                        views=[v.to_dict() for v in views], fields=["fpn", "head.cls"]))
    sample = cache.get(139, 0, fields=["fpn"])            # {"fpn.p3": array (C, H, W), ...}
    batch = cache.get_many([(139, 0), (139, 1)], fields=["fpn"])   # the same as get, one read call
    for sample in cache.iter(fields=["region", "meta"], rank=rank, world_size=world):
        ...

``fields`` takes field names ("fpn.p3"), groups ("fpn") or prefixes ("head.cls"). Only the files
of the groups asked for are read. ``decode``: "numpy" (float32 / exact ints), "torch" (the same as
tensors) or "compact" (uint8 + scales, int16 KLT coefficients, fp16: move those to the device and
call ``store.dequantize`` there). Every sample also carries ``__key__`` (image_id, view_index)
and ``__view__`` (its view spec from the manifest).
"""
from __future__ import annotations

import io
import os
import sys
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np

from . import fsutil
from .backends import ReadStats, make_backend, touch
from .errors import CacheError, CorruptShardError, IncompleteCacheError
from .integrity import blob_checksum
from .layout import MANIFEST, key_index, read_artifacts, read_receipt, read_receipts, receipt_name, shard_summary
from .manifest import Manifest, read_manifest
from .schema import FIELDS, expand_fields, group_of

DECODES = ("numpy", "torch", "compact")
RECEIPTS_KEPT = 256        # receipts kept in memory per process (a receipt is ~1 KiB per sample)
METADATA_THREADS = 16      # concurrent metadata reads of a batch from a remote store (get_many)


def open_cache(url: str, expect: dict | None = None, allow_incomplete: bool = False) -> "Cache":
    """Open a cache for reading; refuse it if it does not match ``expect`` (see
    ``Manifest.check``) or, unless ``allow_incomplete``, if shards are missing."""
    return Cache(url, expect=expect, allow_incomplete=allow_incomplete)


class Cache:
    def __init__(self, url: str, expect: dict | None = None, allow_incomplete: bool = False):
        self.url = str(url)
        self.fs, self.root = fsutil.resolve(self.url)
        manifest = read_manifest(self.fs, self.root)
        if manifest is None:
            raise CacheError(f"{self.url}: no {MANIFEST} (not a cache, or precompute has not started)")
        self.manifest: Manifest = manifest
        manifest.check(expect, where=self.url)
        self._receipts: OrderedDict[int, dict] = OrderedDict()     # LRU of receipts read
        if manifest["complete"]:
            self.shards = {int(s["index"]): s for s in manifest["shards"]}     # summaries; receipts on demand
            keys = self._load_index()
        elif fsutil.is_read_only(self.fs):     # HTTP: files by name only; an unfinished cache's are found by listing
            raise IncompleteCacheError(f"{self.url} is not finalized: over HTTP(S) only a complete cache can be read "
                                       "(its manifest names every file; HTTP lists no directories)")
        else:
            receipts = read_receipts(self.fs, self.root, manifest.declaration_id)
            self.shards = {i: shard_summary(r) for i, r in receipts.items()}
            expected = manifest.num_shards
            missing = ([i for i in range(expected) if i not in self.shards] if expected is not None
                       else ["(open-ended cache not finalized)"])
            if missing and not allow_incomplete:
                raise IncompleteCacheError(
                    f"{self.url} is incomplete: {len(missing)} shard(s) not committed "
                    f"({', '.join(map(str, missing[:8]))}{'...' if len(missing) > 8 else ''}); "
                    "resume the precompute, or pass allow_incomplete=True")
            keys = key_index([receipts[i] for i in sorted(receipts)])
        self.stats = ReadStats()
        self.backend = make_backend(manifest.backend, self.fs, self.root, self.url, self.stats)
        # (image_id, view_index) lookup: one sorted int64 array, a few bytes per sample
        self._keys = keys
        combined = _combine(keys["image_id"], keys["view_index"])
        self._order = np.argsort(combined, kind="stable")
        self._sorted = combined[self._order]
        duplicate = np.flatnonzero(self._sorted[1:] == self._sorted[:-1])
        if duplicate.size:
            a, b = keys[self._order[duplicate[0]]], keys[self._order[duplicate[0] + 1]]
            raise CacheError(f"{self.url}: sample (image_id={a['image_id']}, view={a['view_index']}) is in shard "
                             f"{a['shard']} and shard {b['shard']}")
        self._checked_files: set[str] = set()
        self._prepared: set[tuple[int, str]] = set()      # (shard, group) whose metadata were read (_read_metadata)
        self._pool: tuple[int, ThreadPoolExecutor] | None = None     # (pid, pool) reading metadata

    def _load_index(self) -> np.ndarray:
        info = self.manifest["index"]
        try:
            data = self.fs.cat_file(fsutil.join(self.root, info["path"]))
        except FileNotFoundError:
            raise CorruptShardError(f"{self.url}: {info['path']} is missing") from None
        if fsutil.sha256_bytes(data) != info["sha256"]:
            raise CorruptShardError(f"{self.url}: {info['path']} does not match its sha256 in the manifest")
        return np.load(io.BytesIO(data), allow_pickle=False)

    def receipt(self, index: int) -> dict:
        """A shard's receipt (keys, blob offsets and sizes), read once per process."""
        receipt = self._receipts.get(index)
        if receipt is None:
            if index not in self.shards:
                raise CacheError(f"{self.url}: no shard {index}")
            receipt = read_receipt(self.fs, self.root, index, self.manifest.declaration_id)
            if receipt["checksum"] != self.shards[index]["receipt"]:
                raise CorruptShardError(f"shard {index}: receipt {receipt_name(index)} is "
                                        "not the one the manifest lists (replaced after the cache was written)")
            self._receipts[index] = receipt
            if len(self._receipts) > RECEIPTS_KEPT:
                self._receipts.popitem(last=False)
        else:
            touch(self._receipts, index)
        return receipt

    # ------------------------------------------------------------------ index
    def __len__(self) -> int:
        return len(self._keys)

    def keys(self) -> list[tuple[int, int]]:
        """Every (image_id, view_index), in shard order."""
        return list(zip(self._keys["image_id"].tolist(), self._keys["view_index"].tolist()))

    def __contains__(self, key) -> bool:
        try:
            self.locate(*key)
        except CacheError:
            return False
        return True

    @property
    def views(self) -> list[dict]:
        return self.manifest["views"]

    def locate(self, image_id: int, view_index: int) -> tuple[int, int]:
        """(shard index, row) of a sample."""
        wanted = _combine(np.int64(image_id), np.int64(view_index))
        pos = int(np.searchsorted(self._sorted, wanted))
        if pos == len(self._sorted) or self._sorted[pos] != wanted:
            raise CacheError(f"{self.url}: no sample (image_id={image_id}, view={view_index})")
        entry = self._keys[self._order[pos]]
        return int(entry["shard"]), int(entry["row"])

    # ------------------------------------------------------------------ selection and decoding
    def select(self, fields=None) -> dict[str, list[str]]:
        """group -> field names (sorted) for a selection of names, groups or prefixes."""
        wanted = self.manifest.fields if fields is None else expand_fields(_as_list(fields))
        lacking = [n for n in wanted if n not in self.manifest.fields]
        if lacking:
            raise CacheError(f"{self.url} has no field(s) {', '.join(lacking)} "
                             f"(it has {', '.join(self.manifest.fields)})")
        groups: dict[str, list[str]] = {}
        for name in sorted(wanted):
            groups.setdefault(group_of(name), []).append(name)
        return groups

    def _check_files(self, receipt: dict, group: str) -> None:
        """Cheap truncation check the first time a shard's group files are touched: sizes only."""
        for rel in self._unchecked_files(receipt, group):
            self._check_file(receipt, rel)

    def _unchecked_files(self, receipt: dict, group: str) -> list[str]:
        prefix = receipt["groups"][group]["path"]
        return [rel for rel in receipt["files"] if rel.startswith(prefix) and rel not in self._checked_files]

    def _check_file(self, receipt: dict, rel: str) -> None:
        try:
            size = self.fs.size(fsutil.join(self.root, rel))
        except FileNotFoundError:
            raise CorruptShardError(f"shard {receipt['index']}: file {rel} is missing") from None
        if size != receipt["files"][rel]["nbytes"]:
            raise CorruptShardError(f"shard {receipt['index']}: file {rel} has {size} bytes, "
                                    f"the receipt says {receipt['files'][rel]['nbytes']} (truncated or replaced)")
        self._checked_files.add(rel)

    def _decode(self, receipt: dict, group: str, row: int, field: str, blob, decode: str):
        layout = receipt["groups"][group]
        image_id, view_index = receipt["keys"][row]
        if blob_checksum(image_id, view_index, field, blob) != layout["crc32c"][row][layout["fields"].index(field)]:
            raise CorruptShardError(f"shard {receipt['index']} ({layout['path']}), field {field}, sample "
                                    f"(image_id={image_id}, view={view_index}): checksum mismatch, the bytes read "
                                    "are damaged or belong to another sample")
        codec = self.manifest.codec(field)
        try:
            if decode == "compact":
                value = codec.decode_compact(blob)
            else:
                value = codec.decode(blob)
        except CorruptShardError as e:
            image_id, view_index = receipt["keys"][row]
            raise CorruptShardError(f"shard {receipt['index']} ({receipt['groups'][group]['path']}), field {field}, "
                                    f"sample (image_id={image_id}, view={view_index}): {e}") from None
        if decode == "torch":
            import torch
            value = torch.from_numpy(np.asarray(value, order="C"))
        return value

    def _sample(self, receipt, row, blobs_by_group: dict, decode: str) -> dict:
        image_id, view_index = receipt["keys"][row]
        out = {"__key__": (int(image_id), int(view_index)), "__view__": self.manifest["views"][int(view_index)],
               "__nbytes__": 0}  # stored (compressed) bytes of the fields read: what the run pulls from storage
        for group, blobs in blobs_by_group.items():
            for field, blob in blobs.items():
                out["__nbytes__"] += blob.nbytes if isinstance(blob, memoryview) else len(blob)
                out[field] = self._decode(receipt, group, row, field, blob, decode)
        return out

    # ------------------------------------------------------------------ random access
    def get(self, image_id: int, view_index: int, fields=None, decode: str = "numpy") -> dict:
        """One sample's fields (random access; reads only the groups asked for)."""
        _check_decode(decode)
        receipt, row = self._locate_checked(image_id, view_index)
        blobs = {}
        for group, names in self.select(fields).items():
            self._check_files(receipt, group)
            for _, found in self.backend.read_rows(receipt, group, [row], names):
                blobs[group] = found
        return self._sample(receipt, row, blobs, decode)

    def get_many(self, keys, fields=None, decode: str = "numpy") -> list[dict]:
        """``[get(image_id, view_index, fields, decode) for image_id, view_index in keys]``, with the
        byte ranges of every sample and group fetched in one backend call (``Backend.read_many``:
        concurrent on a remote filesystem); every check of ``get`` is made, for every sample."""
        _check_decode(decode)
        groups = self.select(fields)
        keys = [(int(image_id), int(view_index)) for image_id, view_index in keys]
        if not fsutil.is_local(self.fs):
            self._read_metadata({self.locate(*key)[0] for key in keys}, groups)
        located, requests = [], []
        for image_id, view_index in keys:
            receipt, row = self._locate_checked(int(image_id), int(view_index))
            located.append((receipt, row))
            for group, names in groups.items():
                self._check_files(receipt, group)
                requests.append((receipt, group, row, names))
        found = iter(self.backend.read_many(requests))
        return [self._sample(receipt, row, {group: next(found) for group in groups}, decode)
                for receipt, row in located]

    def _read_metadata(self, shards: set[int], groups) -> None:
        """What a batch's reads need that this process has not read yet, in a pool of threads: the
        shards' receipts, then at once every file's size check and every group's backend metadata
        (zarr's array metadata and shard index). Each is a round trip to a remote store; one after
        the other, a batch over shards not read before would wait for all of them in turn."""
        if self._pool is None or self._pool[0] != os.getpid():     # threads do not survive a fork
            self._pool = (os.getpid(), ThreadPoolExecutor(METADATA_THREADS, thread_name_prefix="cache-metadata"))
        pool = self._pool[1]
        for _ in pool.map(self.receipt, sorted(s for s in shards if s not in self._receipts)):
            pass
        checks, prepares = [], []       # the file checks first: theirs is the error a damaged file gets
        for index in sorted(shards):
            receipt = self.receipt(index)
            for group in groups:
                checks += [partial(self._check_file, receipt, rel) for rel in self._unchecked_files(receipt, group)]
                if (index, group) not in self._prepared:
                    prepares.append(partial(self._prepare, receipt, group))
        for _ in pool.map(_call, checks + prepares):
            pass

    def _prepare(self, receipt: dict, group: str) -> None:
        self.backend.prepare(receipt, group)
        self._prepared.add((receipt["index"], group))

    def _locate_checked(self, image_id: int, view_index: int) -> tuple[dict, int]:
        shard, row = self.locate(image_id, view_index)
        receipt = self.receipt(shard)
        if tuple(receipt["keys"][row]) != (image_id, view_index):
            raise CorruptShardError(f"{self.url}: the index puts (image_id={image_id}, view={view_index}) at row {row} "
                                    f"of shard {shard}, whose receipt holds {tuple(receipt['keys'][row])} there")
        return receipt, row

    # ------------------------------------------------------------------ streaming
    def shards_for(self, rank: int = 0, world_size: int = 1, worker_id: int = 0, num_workers: int = 1,
                   shuffle: bool = False, seed: int = 0, epoch: int = 0) -> list[int]:
        """Shard indices read by one loader worker of one rank: split by rank, then by worker."""
        order = sorted(self.shards)
        if shuffle:
            order = [order[i] for i in np.random.default_rng([seed, epoch]).permutation(len(order))]
        return order[rank::world_size][worker_id::num_workers]

    def iter(self, fields=None, rank: int = 0, world_size: int = 1, worker_id: int | None = None,
             num_workers: int | None = None, shuffle: bool = False, seed: int = 0, epoch: int = 0,
             decode: str = "numpy"):
        """Stream samples shard by shard. Inside a torch DataLoader worker the worker id and
        count are taken from ``torch.utils.data.get_worker_info()`` unless given."""
        _check_decode(decode)
        if worker_id is None or num_workers is None:
            worker_id, num_workers = _worker_info()
        groups = self.select(fields)
        for index in self.shards_for(rank, world_size, worker_id, num_workers, shuffle, seed, epoch):
            receipt = self.receipt(index)
            streams = []
            for group, names in groups.items():
                self._check_files(receipt, group)
                streams.append((group, self.backend.stream(receipt, group, names)))
            for items in zip(*(s for _, s in streams)):
                rows = {row for row, _ in items}
                if len(rows) != 1:
                    raise CorruptShardError(f"shard {index}: group files disagree on the sample order")
                yield self._sample(receipt, items[0][0], {g: b for (g, _), (_, b) in zip(streams, items)}, decode)
            for group, stream in streams:       # run each stream to its end: tail checks (sha256)
                for _ in stream:
                    raise CorruptShardError(f"shard {index}: group {group} has more samples than the others")

    def dequantize(self, sample: dict, device=None, dtype=None) -> dict:
        """Float tensors on ``device`` for every decoded field of a sample (any decode mode);
        integer fields (meta, region indices) are moved as they are."""
        import torch

        from .codecs import dequantize
        out = {}
        for name, value in sample.items():
            if name.startswith("__"):
                out[name] = value
            elif FIELDS[name].kind == "float":
                out[name] = dequantize(value, device=device, dtype=dtype, codec=self.manifest.codec(name))
            else:
                out[name] = torch.as_tensor(value).to(device, non_blocking=True)
        return out

    # ------------------------------------------------------------------ artifacts
    def artifacts(self) -> dict:
        if self.manifest["complete"]:
            return dict(self.manifest["artifacts"])
        return read_artifacts(self.fs, self.root)

    def artifact(self, name: str) -> dict[str, np.ndarray]:
        info = self.artifacts().get(name)
        if info is None:
            raise CacheError(f"{self.url} has no artifact {name!r} (it has {sorted(self.artifacts())})")
        try:
            data = self.fs.cat_file(fsutil.join(self.root, info["path"]))
        except FileNotFoundError:
            raise CorruptShardError(f"{self.url}: artifact {info['path']} is missing") from None
        if fsutil.sha256_bytes(data) != info["sha256"]:
            raise CorruptShardError(f"{self.url}: artifact {info['path']} does not match its sha256")
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}


def _combine(image_id, view_index):
    """One sortable int64 per key (view indices < 2**16, image ids < 2**47)."""
    return (np.asarray(image_id, np.int64) << 16) | np.asarray(view_index, np.int64)


def _call(task):
    return task()


def _as_list(fields) -> list:
    return [fields] if isinstance(fields, str) else list(fields)


def _check_decode(decode: str) -> None:
    if decode not in DECODES:
        raise CacheError(f"decode must be one of {DECODES}, got {decode!r}")


def _worker_info() -> tuple[int, int]:
    if "torch" not in sys.modules:          # no torch imported: not inside a DataLoader worker
        return 0, 1
    import torch.utils.data
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)

