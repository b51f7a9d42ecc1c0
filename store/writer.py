"""Writing a cache: shards owned by one writer each, committed atomically, resumable.

Samples are numbered by *position* 0..num_samples-1 in an order the caller keeps fixed
(precompute: image index major, view index minor). Shard ``k`` holds positions
``[k * shard_size, (k + 1) * shard_size)``. Rank ``r`` of ``world_size`` writers owns shards
``r, r + world_size, ...`` (or the indices it is given). A shard is committed when its last
sample arrives: group files are written under temporary names, fsynced and renamed, then the
shard's receipt ``shards/NNNNNN.json`` (sample keys, per-blob offsets and sizes, file sizes and
sha256, a crc32c per blob, and the id of the declaration it was written under; sealed, see
store/integrity.py) is written the same way. A shard without a receipt does not exist for
readers; a resumed writer deletes what it left and writes it again. A receipt of another
declaration (or damaged) is never adopted: refused, or deleted with ``discard_foreign``. When every
shard has a receipt and every declared artefact is stored, ``close()`` folds the receipts into
``manifest.json`` and marks the cache complete.

    manifest = Manifest.create(teacher=..., dataset=..., views=..., fields=[...],
                               num_samples=N, shard_size=64, backend="zarr")
    with open_writer("s3://bucket/cache", manifest, rank=rank, world_size=world) as writer:
        for task in writer.pending_shards():               # skips complete shards (resume)
            with writer.shard(task.index) as shard:
                for position in task.positions:
                    shard.write(sample_at(position))        # dict: field name -> array

or, with samples arriving in any order (precompute), ``writer.put(position, sample)``: it routes
the sample to its shard and commits the shard with its last sample (``write(sample)`` is ``put`` at
the next position). File and directory names are in store/layout.py.
"""
from __future__ import annotations

import datetime
import io
import json
import os
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from . import fsutil
from .backends import make_backend
from .errors import CacheError, SchemaError
from .integrity import blob_checksum, seal
from .layout import (INDEX, MANIFEST, artifact_data_name, artifact_record_name, key_index, read_artifacts,
                     read_receipts, receipt_path, shard_files, shard_summary)
from .lock import check_owner
from .manifest import Manifest, read_manifest
from .schema import FIELDS, field_spec, group_of, sample_key, validate_sample

_ARTIFACT_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class ShardTask:
    index: int
    start: int   # first sample position
    stop: int    # one past the last

    @property
    def positions(self) -> range:
        return range(self.start, self.stop)


def _to_numpy(name: str, value) -> np.ndarray:
    spec = field_spec(name)
    if hasattr(value, "detach"):                       # torch tensor, possibly on an accelerator
        value = value.detach()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.cpu().numpy()
    if isinstance(value, (bytes, bytearray, memoryview)) and spec.kind == "bytes":
        value = np.frombuffer(value, dtype=np.uint8)
    arr = np.asarray(value)
    if spec.kind in ("int", "bytes") and arr.dtype != np.dtype(spec.dtype):
        if arr.dtype.kind not in "iub":
            raise SchemaError(f"field {name} must be integer, got {arr.dtype}")
        cast = arr.astype(spec.dtype)
        if not np.array_equal(cast, arr):
            raise SchemaError(f"field {name}: values do not fit {spec.dtype}")
        arr = cast
    return arr if arr.flags.c_contiguous else arr.copy(order="C")


def _raw_nbytes(name: str, arr: np.ndarray) -> int:
    """Reference size: fp16 for float fields, the exact dtype for the others."""
    return arr.size * 2 if FIELDS[name].kind == "float" else arr.nbytes


def load_manifest(url: str) -> Manifest | None:
    """The manifest of the cache at ``url``, or None if there is none yet. To resume a precompute,
    reuse it (its fitted codecs are what the written shards need) after ``manifest.check(expect)``:

        manifest = load_manifest(url)
        if manifest is None:
            manifest = Manifest.create(..., calibration=first_samples)
        else:
            manifest.check(dict(teacher=..., dataset=..., views=..., fields=[...]))
        writer = open_writer(url, manifest, rank=rank, world_size=world)
    """
    fs, root = fsutil.resolve(url)
    return read_manifest(fs, root)


def committed_shards(fs, root: str, declaration: str, only=None, discard: bool = False) -> set[int]:
    """Indices of the shards with a valid receipt of this declaration (see ``read_receipts``)."""
    return set(read_receipts(fs, root, declaration, only, discard))


def finalize(url: str) -> Manifest:
    """Fold shard receipts and artifacts into manifest.json and mark the cache complete.

    Requires every declared shard (num_samples known) to be committed."""
    fs, root = fsutil.resolve(url, write=True)
    manifest = read_manifest(fs, root)
    if manifest is None:
        raise CacheError(f"{url}: no {MANIFEST}")
    receipts = read_receipts(fs, root, manifest.declaration_id)
    _finalize(fs, root, manifest, receipts, expected=manifest.num_shards)
    return manifest


def totals(receipts) -> dict:
    """Stored and raw (fp16) bytes per field and per view, sample count per view, and the writers'
    wall seconds (receipts' ``seconds``, summed over shards and ranks: what computing the cache cost)."""
    fields: dict[str, list[int]] = {}
    views: dict[str, list[int]] = {}
    for receipt in receipts:
        row_views = [str(v) for _, v in receipt["keys"]]
        for view in row_views:
            views.setdefault(view, [0, 0, 0])[0] += 1
        for layout in receipt["groups"].values():
            for row, (sizes, raws) in enumerate(zip(layout["nbytes"], layout["raw_nbytes"])):
                for name, stored, raw in zip(layout["fields"], sizes, raws):
                    entry = fields.setdefault(name, [0, 0])
                    entry[0] += stored
                    entry[1] += raw
                    views[row_views[row]][1] += stored
                    views[row_views[row]][2] += raw
    seconds = sum(receipt.get("seconds", 0.0) for receipt in receipts)
    return dict(fields=fields, views=dict(sorted(views.items(), key=lambda kv: int(kv[0]))),
                seconds=round(seconds, 3))


def _finalize(fs, root, manifest: Manifest, receipts: dict, expected: int | None) -> None:
    indices = sorted(receipts)
    wanted = range(expected) if expected is not None else range(len(indices))
    missing = [i for i in wanted if i not in receipts]
    if missing:
        raise CacheError(f"{root}: cannot finalize, shards {missing[:10]}{'...' if len(missing) > 10 else ''} "
                         "are not committed")
    artifacts = read_artifacts(fs, root)
    lacking = [name for name in manifest["declared_artifacts"] if name not in artifacts]
    if lacking:
        raise CacheError(f"{root}: cannot finalize, declared artefact(s) {lacking} were not written (an "
                         "interrupted MasKD stage 1?); rerun the precompute command to finish the cache")
    ordered = [receipts[i] for i in indices]
    out = io.BytesIO()
    np.save(out, key_index(ordered))
    data = out.getvalue()
    fsutil.write_atomic(fs, fsutil.join(root, INDEX), data)
    manifest.data["index"] = dict(path=INDEX, nbytes=len(data), sha256=fsutil.sha256_bytes(data))
    manifest.data["shards"] = [shard_summary(r) for r in ordered]
    manifest.data["totals"] = totals(ordered)
    manifest.data["artifacts"] = artifacts
    manifest.data["complete"] = True
    fsutil.write_atomic(fs, fsutil.join(root, MANIFEST), manifest.to_json().encode())


class ShardWriter:
    """Collects the samples of one shard, encodes them, and commits them atomically."""

    def __init__(self, writer: "CacheWriter", task: ShardTask | None, index: int, expected: int | None):
        self.writer, self.index, self.expected = writer, index, expected
        self.start = task.start if task is not None else None
        self.keys: list[tuple[int, int]] = []
        self._rows: list[dict] = []      # field -> blob bytes (or a Future of it)
        self._raw: list[dict] = []
        self.committed = False

    def __len__(self):
        return len(self.keys)

    @property
    def full(self) -> bool:
        return self.expected is not None and len(self.keys) >= self.expected

    def write(self, sample: dict) -> None:
        if self.committed:
            raise CacheError(f"shard {self.index} is already committed")
        if self.full:
            raise CacheError(f"shard {self.index} already holds its {self.expected} samples")
        manifest = self.writer.manifest
        arrays = {name: _to_numpy(name, value) for name, value in sample.items() if not name.startswith("__")}
        validate_sample(arrays, manifest.fields)
        key = sample_key(arrays)
        if key in self.writer._keys_written or key in self.keys:
            raise CacheError(f"shard {self.index}: sample (image_id={key[0]}, view={key[1]}) written twice")
        if not 0 <= key[0] < 2 ** 47:
            raise CacheError(f"sample (image_id={key[0]}, view={key[1]}): image ids must be in [0, 2**47)")
        if not 0 <= key[1] < len(manifest["views"]):
            raise CacheError(f"sample (image_id={key[0]}, view={key[1]}): view index out of range "
                             f"(the manifest declares {len(manifest['views'])} views)")
        pool = self.writer._pool
        row = {}
        for name, arr in arrays.items():
            codec = manifest.codec(name)
            row[name] = pool.submit(codec.encode, arr) if pool else codec.encode(arr)
        self.keys.append(key)
        self._rows.append(row)
        self._raw.append({name: _raw_nbytes(name, arr) for name, arr in arrays.items()})

    def commit(self) -> dict:
        if self.committed:
            raise CacheError(f"shard {self.index} is already committed")
        if self.expected is not None and len(self.keys) != self.expected:
            raise CacheError(f"shard {self.index}: {len(self.keys)} samples written, {self.expected} expected; "
                             "not committed")
        if not self.keys:
            raise CacheError(f"shard {self.index}: no samples; not committed")
        writer, manifest = self.writer, self.writer.manifest
        groups = {}
        for name in sorted(manifest.fields):
            groups.setdefault(group_of(name), []).append(name)
        built_groups, checksums = {}, {}
        for group, fields in groups.items():
            rows = [[_result(row[f]) for f in fields] for row in self._rows]
            built_groups[group] = (fields, rows)
            checksums[group] = [[blob_checksum(*key, f, blob) for f, blob in zip(fields, blobs)]
                                for key, blobs in zip(self.keys, rows)]
        writer.check_owner()
        backend = writer.backend
        for rel in shard_files(writer.fs, writer.root, self.index):    # what an interrupted writer left
            fsutil.remove(writer.fs, backend.path(rel))
        built, layout = backend.build(self.index, self.keys, built_groups)
        for group, fields in groups.items():
            layout[group]["raw_nbytes"] = [[raw[f] for f in fields] for raw in self._raw]
            layout[group]["crc32c"] = checksums[group]
        files = backend.commit(built)
        now = time.perf_counter()
        # Wall time since this writer's previous commit (or its opening): the shard's share of the
        # cache's cost; summed over receipts it survives resumes and adds up across ranks.
        seconds, writer._clock = now - writer._clock, now
        receipt = dict(index=self.index, start=self.start, num_samples=len(self.keys), backend=backend.name,
                       keys=[list(k) for k in self.keys], groups=layout, files=files, seconds=round(seconds, 3),
                       writer=dict(host=socket.gethostname(), pid=os.getpid(), rank=writer.rank),
                       committed=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       declaration=manifest.declaration_id)
        receipt = seal(receipt)
        path = receipt_path(writer.root, self.index)
        writer.check_owner()               # the last moment a writer that lost its run can be stopped
        fsutil.write_atomic(writer.fs, path, json.dumps(receipt, separators=(",", ":")).encode())
        writer.committed.add(self.index)
        writer._keys_written.update(self.keys)
        self.committed = True
        self._rows, self._raw = [], []
        return receipt

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None and not self.committed:
            self.commit()
        return False


def _result(value):
    return value.result() if hasattr(value, "result") else value


class CacheWriter:
    """See the module docstring. ``encode_threads`` > 0 encodes fields in a thread pool.

    ``run_id``: the writer run that holds the cache's lock (store/lock.py); every commit first
    checks that the lock still names it. ``discard_foreign``: delete shards whose receipts this
    cache cannot adopt (damaged, or written under another declaration) instead of refusing."""

    def __init__(self, url: str, manifest: Manifest, rank: int = 0, world_size: int = 1,
                 shards=None, encode_threads: int = 0, run_id: str | None = None, discard_foreign: bool = False):
        self.url = str(url)
        self.fs, self.root = fsutil.resolve(self.url, write=True)
        if not 0 <= rank < world_size:
            raise CacheError(f"rank {rank} is not in [0, {world_size})")
        self.rank, self.world_size, self.run_id = rank, world_size, run_id
        existing = read_manifest(self.fs, self.root)
        if existing is not None:
            manifest.check_same_declaration(existing, where=self.url)
            self.manifest = existing
        else:
            # shards without a manifest were written under some other declaration: never adopted
            committed_shards(self.fs, self.root, manifest.declaration_id, discard=discard_foreign)
            self.check_owner()
            self.fs.makedirs(self.root, exist_ok=True)
            fsutil.write_atomic(self.fs, fsutil.join(self.root, MANIFEST), manifest.to_json().encode())
            self.manifest = read_manifest(self.fs, self.root)      # another rank may have won the race
            manifest.check_same_declaration(self.manifest, where=self.url)
        self.backend = make_backend(self.manifest.backend, self.fs, self.root, self.url)
        num_shards = self.manifest.num_shards
        if shards is not None:
            self.owned = sorted(int(i) for i in shards)
        elif num_shards is not None:
            self.owned = list(range(rank, num_shards, world_size))
        elif world_size > 1:
            raise CacheError("several writers need num_samples in the manifest (to agree on the shards)")
        else:
            self.owned = None                                   # open-ended single writer
        if num_shards is not None and self.owned and self.owned[-1] >= num_shards:
            raise CacheError(f"shard {self.owned[-1]} is beyond the {num_shards} shards of "
                             f"{num_samples_text(self.manifest)}")
        self.committed = committed_shards(self.fs, self.root, self.manifest.declaration_id, only=self.owned,
                                          discard=discard_foreign)
        self._keys_written: set = set()
        self._pool = ThreadPoolExecutor(encode_threads) if encode_threads > 0 else None
        self._position = 0
        self._clock = time.perf_counter()
        self._open: dict[int, ShardWriter] = {}         # shards put() has begun and not committed
        self.skipped = 0

    def check_owner(self) -> None:
        if self.run_id is not None:
            check_owner(self.fs, self.root, self.run_id, where=self.url)

    # ------------------------------------------------------------------ shard-level API
    def task(self, index: int) -> ShardTask:
        size, n = self.manifest.shard_size, self.manifest.num_samples
        start = index * size
        stop = start + size if n is None else min(n, start + size)
        if stop <= start:
            raise CacheError(f"shard {index} is empty: {num_samples_text(self.manifest)}")
        return ShardTask(index, start, stop)

    def is_complete(self, index: int) -> bool:
        return index in self.committed

    def pending_shards(self) -> list[ShardTask]:
        """The shards this writer owns that are not committed yet, in order."""
        if self.owned is None:
            raise CacheError("pending_shards() needs num_samples in the manifest; use write() instead")
        return [self.task(i) for i in self.owned if i not in self.committed]

    def shard(self, index: int) -> ShardWriter:
        if self.owned is not None and index not in self.owned:
            raise CacheError(f"shard {index} is not owned by this writer (rank {self.rank} of {self.world_size})")
        if index in self.committed:
            raise CacheError(f"shard {index} is already complete")
        task = self.task(index)
        expected = task.stop - task.start if self.manifest.num_samples is not None else None
        return ShardWriter(self, task, index, expected)

    # ------------------------------------------------------------------ positioned API
    def put(self, position: int, sample: dict) -> dict | None:
        """Write the sample at ``position`` into its shard (begun on its first sample) and commit
        the shard when this is its last: returns that shard's receipt, else None. Positions may
        come in any order and several shards may be open at once (precompute batches views of a
        few shards together); each shard must be owned by this writer and not committed."""
        index = position // self.manifest.shard_size
        shard = self._open.get(index)
        if shard is None:
            shard = self.shard(index)
            task = self.task(index)
            shard.expected = task.stop - task.start    # open-ended too: close() commits the trailing one
        shard.write(sample)
        self._open[index] = shard                       # only once it holds a sample: a refused one opens none
        if not shard.full:
            return None
        del self._open[index]
        return shard.commit()

    def unfinished_shards(self) -> list[int]:
        """Shards that put() has begun and that still lack samples."""
        return sorted(self._open)

    # ------------------------------------------------------------------ sequential API
    def write(self, sample: dict) -> bool:
        """Write the sample at the next position (single writer). Returns False when that
        position belongs to a shard committed by an earlier run (resume), True otherwise."""
        if self.world_size != 1:
            raise CacheError("write() is for a single writer; with several ranks use pending_shards()/shard()")
        position = self._position
        if self.manifest.num_samples is not None and position >= self.manifest.num_samples:
            raise CacheError(f"sample at position {position} is beyond {num_samples_text(self.manifest)}")
        if position // self.manifest.shard_size in self.committed:
            self._position += 1
            self.skipped += 1
            return False
        self.put(position, sample)            # a refused sample does not take the position
        self._position += 1
        return True

    # ------------------------------------------------------------------ global artifacts
    def put_artifact(self, name: str, arrays, meta: dict | None = None) -> dict:
        """Store arrays once per cache (MasKD tokens, teacher neck+head weights): ``arrays`` is an
        array or a dict name -> array (a state dict works); read back with ``Cache.artifact``."""
        if not _ARTIFACT_NAME.match(name):
            raise CacheError(f"artifact name {name!r} must match {_ARTIFACT_NAME.pattern}")
        if not isinstance(arrays, dict):
            arrays = {"value": arrays}
        plain = {}
        for key, value in arrays.items():
            if hasattr(value, "detach"):
                value = value.detach().cpu()
                value = (value.float() if str(value.dtype) == "torch.bfloat16" else value).numpy()
            plain[key] = np.asarray(value)
        out = io.BytesIO()
        np.savez(out, **plain)
        data = out.getvalue()
        self.check_owner()
        rel = artifact_data_name(name)
        fsutil.write_atomic(self.fs, fsutil.join(self.root, rel), data)
        info = dict(path=rel, nbytes=len(data), sha256=fsutil.sha256_bytes(data),
                    arrays={k: dict(shape=list(v.shape), dtype=v.dtype.str) for k, v in plain.items()},
                    meta=meta or {})
        info = seal(info)
        fsutil.write_atomic(self.fs, fsutil.join(self.root, artifact_record_name(name)),
                            json.dumps(info, indent=1).encode())
        current = read_manifest(self.fs, self.root)
        if current["complete"]:                    # already finalized: list the artifact there too
            current.data["artifacts"] = read_artifacts(self.fs, self.root)
            fsutil.write_atomic(self.fs, fsutil.join(self.root, MANIFEST), current.to_json().encode())
        return info

    # ------------------------------------------------------------------ closing
    def close(self, finalize: bool = True) -> bool:
        """Commit a trailing partial shard (open-ended writer), and finalize the cache if every
        shard is committed. Returns whether the cache is complete. ``finalize=False`` leaves the
        finalization to one process (``store.finalize(url)`` once every rank has closed), and
        leaves a begun shard that lacks samples uncommitted (``unfinished_shards()``; a rerun
        computes it again) where ``close()`` refuses it."""
        open_ended = self.manifest.num_samples is None
        if finalize or open_ended:
            for index in self.unfinished_shards():
                shard = self._open.pop(index)
                if open_ended:
                    shard.expected = len(shard)      # the trailing shard holds what arrived
                shard.commit()                       # refuses a shard that lacks samples
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        if not finalize:
            return False
        receipts = read_receipts(self.fs, self.root, self.manifest.declaration_id)  # other ranks' too
        self.committed = set(receipts)
        expected = self.manifest.num_shards
        if expected is None:                                          # open-ended: shards 0..last, no gap
            expected = max(self.committed) + 1 if self.committed else None
        if expected is None or any(i not in self.committed for i in range(expected)):
            return False
        stored = read_artifacts(self.fs, self.root)
        if any(name not in stored for name in self.manifest["declared_artifacts"]):
            return False                                              # finalize() once they are stored
        self.check_owner()
        _finalize(self.fs, self.root, self.manifest, receipts, expected)
        return True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        elif self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
        return False


def num_samples_text(manifest: Manifest) -> str:
    return f"the manifest's num_samples={manifest.num_samples} with shard_size={manifest.shard_size}"


def open_writer(url: str, manifest: Manifest, rank: int = 0, world_size: int = 1, shards=None,
                encode_threads: int = 0, run_id: str | None = None, discard_foreign: bool = False) -> CacheWriter:
    """Create a cache at ``url`` (or resume one with the same declaration) and return its writer
    (see ``CacheWriter`` for ``run_id`` and ``discard_foreign``)."""
    return CacheWriter(url, manifest, rank=rank, world_size=world_size, shards=shards,
                       encode_threads=encode_threads, run_id=run_id, discard_foreign=discard_foreign)
