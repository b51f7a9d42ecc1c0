"""What binds every byte a reader relies on to the declaration it was written under.

- **Sealed JSON.** ``manifest.json``, each shard's receipt and each artefact record carry
  ``"checksum"``: the sha256 of their canonical JSON (sorted keys, no white space) without that
  key. Opening one recomputes it, so a flipped bit in a KLT basis, an offset or a hash is refused
  with the file's name instead of being read.
- **Declaration id.** The sha256 of the canonical declaration (store/manifest.py). Every receipt
  records the id it was written under; a receipt with another id, or none, is never adopted,
  so shards left by another run (a lost or replaced manifest) cannot pass for this cache's.
- **Blob checksums.** Each blob's crc32c, seeded with the sample key and field name it was
  written for, is kept in the receipt and checked on every read: a blob read for another sample
  (swapped offsets) or damaged in place fails there, naming the sample. crc32c runs at about
  20 GB/s (hardware instruction), so the check costs well under a millisecond per sample.

A complete manifest lists each receipt's checksum and the index's and artefacts' sha256, so the
manifest's own checksum covers the whole chain.
"""
from __future__ import annotations

import hashlib
import json

import google_crc32c

from .errors import CacheError, CorruptShardError

CHECKSUM = "checksum"


def canonical(data) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def seal(data: dict) -> dict:
    """``data`` with its checksum (any previous one replaced)."""
    body = {k: v for k, v in data.items() if k != CHECKSUM}
    return {**body, CHECKSUM: sha256_hex(canonical(body))}


def unseal(text: bytes | str, where: str) -> dict:
    """Parse sealed JSON and check its checksum; ``where`` names the file in errors. The returned
    dict keeps its checksum (a manifest lists the receipts' checksums to bind them)."""
    try:
        data = json.loads(text)
    except ValueError as e:
        raise CorruptShardError(f"{where}: not valid JSON ({e}); the file is damaged") from None
    if not isinstance(data, dict):
        raise CorruptShardError(f"{where}: not a JSON object; the file is damaged")
    stored = data.get(CHECKSUM)
    if stored is None:
        raise CacheError(f"{where}: has no checksum, so it was not written by this store (or by a version "
                         "without integrity checks); recompute the cache")
    body = {k: v for k, v in data.items() if k != CHECKSUM}
    if sha256_hex(canonical(body)) != stored:
        raise CorruptShardError(f"{where}: checksum mismatch, the file was changed or damaged after it was written")
    return data


def declaration_id(declaration: dict) -> str:
    return sha256_hex(canonical(declaration))


def blob_checksum(image_id: int, view_index: int, field: str, blob) -> int:
    """crc32c of the blob, seeded with the sample and field it belongs to."""
    seed = google_crc32c.value(f"{int(image_id)}/{int(view_index)}/{field}".encode())
    return google_crc32c.extend(seed, bytes(blob) if isinstance(blob, memoryview) else blob)
