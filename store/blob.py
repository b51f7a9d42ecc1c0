"""The blob every field codec writes, and ``FieldCodec``, the base class that writes it.

A codec turns one field of one sample (a numpy array of any shape) into a self-describing *blob*,
and back:

    blob = b"DKB1" | crc32 (4 bytes, little endian, over everything after it)
                   | header length (4 bytes) | header (JSON: codec id, shape, dtype, part sizes,
                   | per-blob parameters such as scales) | parts (compressed payloads)

so a blob decodes without knowing the shape in advance, and a flipped byte anywhere in it raises
``CorruptShardError``. Compression itself is numcodecs' Blosc (Zstd inside, byte or bit shuffle:
``compress_part`` / ``decompress_part``); the codecs (store/codecs.py, store/klt.py) write only
their transforms.
"""
from __future__ import annotations

import json
import struct
import zlib

import numcodecs
import numpy as np
from numcodecs.abc import Codec

from .errors import CorruptShardError

MAGIC = b"DKB1"
_PREFIX = struct.Struct("<4sII")  # magic, crc32, header length


def pack_blob(header: dict, parts: list) -> bytes:
    parts = [memoryview(p).cast("B") if not isinstance(p, bytes) else p for p in parts]
    header = dict(header, parts=[len(p) for p in parts])
    head = json.dumps(header, separators=(",", ":")).encode()
    crc = zlib.crc32(head)
    for part in parts:
        crc = zlib.crc32(part, crc)
    return b"".join([_PREFIX.pack(MAGIC, crc, len(head)), head, *parts])


def unpack_blob(blob, where: str = "blob") -> tuple[dict, list[memoryview]]:
    view = memoryview(blob).cast("B")
    if len(view) < _PREFIX.size:
        raise CorruptShardError(f"{where}: truncated ({len(view)} bytes)")
    magic, crc, hlen = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise CorruptShardError(f"{where}: bad magic {bytes(magic)!r} (not a store blob, or corrupt)")
    body = view[_PREFIX.size:]
    if zlib.crc32(body) != crc:
        raise CorruptShardError(f"{where}: checksum mismatch (corrupt bytes)")
    try:
        header = json.loads(bytes(body[:hlen]))
    except ValueError as e:
        raise CorruptShardError(f"{where}: unreadable header ({e})") from None
    parts, pos = [], hlen
    for n in header["parts"]:
        parts.append(body[pos:pos + n])
        pos += n
    if pos != len(body):
        raise CorruptShardError(f"{where}: {len(body) - pos} trailing bytes")
    return header, parts


class FieldCodec(Codec):
    """Base: frames ``_encode``'s parts into a blob; subclasses set ``lossless`` and ``error_bound``."""

    codec_id = None
    lossless = False

    def error_bound(self) -> dict:
        raise NotImplementedError

    def encode(self, buf) -> bytes:
        arr = np.asarray(buf)
        header, parts = self._encode(arr)
        return pack_blob(dict(header, codec=self.codec_id, shape=list(arr.shape)), parts)

    def decode(self, buf, out=None):
        header, parts = self._unpack(buf)
        arr = self._decode(header, parts)
        if out is not None:
            np.copyto(np.asarray(out).reshape(arr.shape), arr)
            return out
        return arr

    def decode_compact(self, buf):
        """Decode into the form that should travel to the accelerator (see ``store.codecs.dequantize``)."""
        return self.decode(buf)

    def _unpack(self, buf):
        header, parts = unpack_blob(buf)
        if header.get("codec") != self.codec_id:
            raise CorruptShardError(f"blob was written by codec {header.get('codec')!r}, not {self.codec_id!r}")
        return header, parts

    def _encode(self, arr: np.ndarray) -> tuple[dict, list]:
        raise NotImplementedError

    def _decode(self, header: dict, parts: list) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self):
        cfg = {k: v for k, v in self.get_config().items() if k != "id" and not (isinstance(v, str) and len(v) > 40)}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in cfg.items())})"


def _blosc(cname: str, clevel: int, shuffle: str) -> Codec:
    mode = {"none": numcodecs.Blosc.NOSHUFFLE, "byte": numcodecs.Blosc.SHUFFLE,
            "bit": numcodecs.Blosc.BITSHUFFLE}[shuffle]
    return numcodecs.Blosc(cname=cname, clevel=clevel, shuffle=mode)


def compress_part(arr: np.ndarray, cname: str, clevel: int, shuffle: str):
    """One part of a blob: ``arr``'s bytes through Blosc (``cname="none"``: as they are)."""
    if arr.size == 0:
        return b""
    if cname == "none":
        return np.ascontiguousarray(arr).view(np.uint8).reshape(-1)
    return _blosc(cname, clevel, shuffle).encode(np.ascontiguousarray(arr))


def decompress_part(part, dtype, count: int, cname: str) -> np.ndarray:
    """Decompress into a new writable array of ``count`` values."""
    out = np.empty(count, dtype=dtype)
    if count == 0:
        if len(part):
            raise CorruptShardError(f"payload has {len(part)} bytes for an empty array")
        return out
    if cname == "none":
        if len(part) != out.nbytes:
            raise CorruptShardError(f"payload has {len(part)} bytes, header says {out.nbytes}")
        out.view(np.uint8)[:] = np.frombuffer(part, np.uint8)
        return out
    if len(part) < 16:
        raise CorruptShardError(f"Blosc payload of {len(part)} bytes is truncated")
    nbytes, _, cbytes = struct.unpack_from("<III", part, 4)   # Blosc header: nbytes, blocksize, cbytes
    if cbytes != len(part):
        raise CorruptShardError(f"Blosc payload is {len(part)} bytes, its header says {cbytes}")
    if nbytes != out.nbytes:
        raise CorruptShardError(f"payload decompresses to {nbytes} bytes, header says {out.nbytes}")
    numcodecs.Blosc().decode(part, out=out)   # Blosc frames carry their own settings
    return out
