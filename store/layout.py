"""A cache on disk: the names of its files, and reading the records among them.

    CACHE/
      manifest.json                  MANIFEST: the declaration; once complete also shards, index, totals, artefacts
      index.npy                      INDEX: (image_id, view_index, shard, row) per sample, written by finalize
      writer.lock                    LOCK: the writer run that owns the cache (store/lock.py)
      shards/NNNNNN.json             a shard's receipt, written last: a shard without one does not exist
      shards/NNNNNN.zarr/, shards/NNNNNN-GROUP.tar    a shard's group files (store/backends.py)
      artifacts/NAME.npz             an artefact's arrays
      artifacts/NAME.json            its record (path, sha256, arrays, meta; sealed)

Every store module names these paths through this one. The readers here (receipts, artefact
records; the manifest's is ``store.manifest.read_manifest``) are what the writer (resume,
finalize), the reader and ``verify``/``inspect`` share; they refuse a record whose seal
(store/integrity.py) does not hold.
"""
from __future__ import annotations

import re

import numpy as np

from . import fsutil
from .errors import CacheError, CorruptShardError, ForeignShardError
from .integrity import unseal

MANIFEST = "manifest.json"
INDEX = "index.npy"
LOCK = "writer.lock"
SHARDS = "shards"
ARTIFACTS = "artifacts"

INDEX_DTYPE = np.dtype([("image_id", "<i8"), ("view_index", "<i4"), ("shard", "<i4"), ("row", "<i4")])
RECEIPT_KEYS = ("index", "start", "num_samples", "keys", "groups", "files", "committed", "declaration")


# ---------------------------------------------------------------------------------------------
# names (relative to the cache root)


def shard_name(index: int) -> str:
    """The stem every file of shard ``index`` starts with."""
    return f"{index:06d}"


def receipt_name(index: int) -> str:
    return fsutil.join(SHARDS, shard_name(index) + ".json")


def receipt_path(root: str, index: int) -> str:
    return fsutil.join(root, receipt_name(index))


def artifact_data_name(name: str) -> str:
    return fsutil.join(ARTIFACTS, name + ".npz")


def artifact_record_name(name: str) -> str:
    return fsutil.join(ARTIFACTS, name + ".json")


def shard_files(fs, root: str, index: int) -> list[str]:
    """A shard's group files and whatever an interrupted writer of it left (not its receipt)."""
    prefix = shard_name(index)
    return [fsutil.join(SHARDS, name) for name in fsutil.list_names(fs, fsutil.join(root, SHARDS))
            if name[:len(prefix) + 1] in (prefix + ".", prefix + "-") and name != prefix + ".json"]


# ---------------------------------------------------------------------------------------------
# records


def receipt_indices(fs, root: str) -> list[int]:
    """Indices of the shards that have a receipt file, checked or not."""
    return sorted(int(name[:-5]) for name in fsutil.list_names(fs, fsutil.join(root, SHARDS))
                  if re.fullmatch(r"\d{6,}\.json", name))


def read_receipt(fs, root: str, index: int, declaration: str) -> dict:
    """A shard's receipt, checked: sealed (store/integrity.py), complete, and written under
    ``declaration`` (the cache's declaration id); anything else is refused naming the file."""
    path = receipt_path(root, index)
    try:
        text = fs.cat_file(path)
    except FileNotFoundError:
        raise CacheError(f"shard {index}: receipt {path} is missing") from None
    receipt = unseal(text, where=f"shard {index}: receipt {path}")
    missing = [k for k in RECEIPT_KEYS if k not in receipt]
    if missing:
        raise CorruptShardError(f"shard {index}: receipt {path} lacks {missing}")
    if receipt["index"] != index:
        raise CorruptShardError(f"shard {index}: receipt {path} describes shard {receipt['index']}")
    if receipt["declaration"] != declaration:
        raise ForeignShardError(f"shard {index}: receipt {path} was written under another cache declaration "
                                f"({str(receipt['declaration'])[:12]}, this cache's is {declaration[:12]})")
    return receipt


def read_receipts(fs, root: str, declaration: str, only=None, discard: bool = False) -> dict[int, dict]:
    """The committed shards' receipts (of the indices in ``only``, default all), each checked by
    ``read_receipt``. A receipt that fails (damaged, of another declaration, or with none) is never
    adopted: it is refused with ForeignShardError naming the files, or, with ``discard``, deleted
    with its shard's files so that the shard is computed again."""
    wanted = None if only is None else set(only)
    receipts, bad = {}, []
    for index in receipt_indices(fs, root):
        if wanted is not None and index not in wanted:
            continue
        try:
            receipts[index] = read_receipt(fs, root, index, declaration)
        except CacheError as e:           # damaged, foreign, or not written by this store version
            bad.append((index, str(e)))
    if bad and discard:
        for index, _ in bad:
            for rel in shard_files(fs, root, index):
                fsutil.remove(fs, fsutil.join(root, rel))
            fsutil.remove(fs, receipt_path(root, index))
    elif bad:
        listed = "; ".join(text for _, text in bad[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise ForeignShardError(f"{root}: {len(bad)} shard receipt(s) cannot be adopted by this cache: {listed}. "
                                "Nothing was read or written. Write to a new location, or rerun with "
                                "--discard-foreign-shards (python -m precompute) to delete those shards and "
                                "compute them again")
    return receipts


def shard_summary(receipt: dict) -> dict:
    """What the manifest keeps of a receipt: enough to verify files, not the per-blob layout."""
    summary = {k: receipt[k] for k in ("index", "start", "num_samples", "files", "committed")}
    return dict(summary, receipt=receipt["checksum"])


def key_index(receipts) -> np.ndarray:
    """The INDEX table of the receipts' samples, in the order given."""
    rows = [(image_id, view_index, r["index"], row) for r in receipts for row, (image_id, view_index) in
            enumerate(r["keys"])]
    return np.array(rows, dtype=INDEX_DTYPE)


def read_artifacts(fs, root: str) -> dict:
    """Artefact records (``artifacts/NAME.json``, sealed) by name."""
    out = {}
    for name in fsutil.list_names(fs, fsutil.join(root, ARTIFACTS)):
        if name.endswith(".json") and fsutil.TMP_MARK not in name:
            path = fsutil.join(root, ARTIFACTS, name)
            out[name[:-5]] = unseal(fs.cat_file(path), where=f"artefact record {path}")
    return out
