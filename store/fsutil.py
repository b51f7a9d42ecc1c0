"""fsspec paths and atomic commits.

A cache is read from any fsspec location, HTTP(S) included (``http://host/path/cache``: files by
name and byte ranges, never a directory listing); it is written only where files can be put:
``resolve(url, write=True)`` refuses an HTTP(S) URL.

On a local file system a file or directory is written under a temporary name
(``NAME.tmp-PID-RANDOM``), fsynced, renamed into place, and its parent directory fsynced. On other
file systems (memory in tests, object stores) each file is one atomic put. Either way, what makes
a shard *complete* is its receipt ``shards/NNNNNN.json``, written last and atomically: a shard
without a receipt is ignored by readers and rewritten by a resumed writer.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .errors import CacheError

TMP_MARK = ".tmp-"
READ_ONLY_PROTOCOLS = ("http", "https")     # fsspec's HTTPFileSystem: GET and HEAD only


def resolve(url: str, write: bool = False) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of a cache URL; with ``write``, refused when that location is read-only."""
    fs, path = fsspec.core.url_to_fs(str(url))
    if write and is_read_only(fs):
        raise CacheError(f"{url}: an HTTP(S) location is read-only: write the cache to a directory or an object "
                         "store (s3://, gs://, ...) and serve it over HTTP from there")
    return fs, path.rstrip("/") or "/"


def is_read_only(fs) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return any(p in READ_ONLY_PROTOCOLS for p in protocols)


def join(*parts: str) -> str:
    return posixpath.join(*parts)


def is_local(fs) -> bool:
    return isinstance(fs, LocalFileSystem)


def sha256_bytes(data) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(url_or_fs, path: str | None = None, chunk: int = 1 << 23) -> tuple[str, int]:
    """(sha256 hex, size) of a file, read in chunks. Accepts a URL or (fs, path)."""
    if path is None:
        fs, path = resolve(url_or_fs)
    else:
        fs = url_or_fs
    digest, size = hashlib.sha256(), 0
    with fs.open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def _tmp_name(path: str) -> str:
    return f"{path}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_local(path: str, data) -> None:
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:          # a full disk says "No space left on device" and names no file
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror, path) from None


def write_atomic(fs, path: str, data) -> None:
    """Write one file so that a reader sees either nothing (or the old file) or all of it."""
    if is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = _tmp_name(path)
        try:
            _write_local(tmp, data)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        _fsync_dir(os.path.dirname(path))
    else:
        fs.pipe_file(path, bytes(data))


def commit_dir(fs, path: str, files: dict[str, bytes]) -> None:
    """Write a directory of files (relative names) that appears at ``path`` all at once."""
    if is_local(fs):
        tmp = _tmp_name(path)
        try:
            for rel, data in files.items():
                target = os.path.join(tmp, rel)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                _write_local(target, data)
            for dirpath, _, _ in os.walk(tmp):
                _fsync_dir(dirpath)
            if os.path.exists(path):          # left by a writer killed after its rename, before its receipt
                remove(fs, path)
            os.rename(tmp, path)
        except BaseException:
            remove(fs, tmp)
            raise
        _fsync_dir(os.path.dirname(path))
    else:
        if fs.exists(path):
            remove(fs, path)
        for rel, data in files.items():
            fs.pipe_file(join(path, rel), bytes(data))


def remove(fs, path: str) -> None:
    if is_local(fs):
        import shutil
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.remove(path)
        return
    if fs.exists(path):
        fs.rm(path, recursive=True)


def list_names(fs, directory: str) -> list[str]:
    """Base names in a directory ([] if it does not exist)."""
    try:
        return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(directory, detail=False))
    except FileNotFoundError:
        return []


def read_bytes(fs, path: str, start: int | None = None, end: int | None = None) -> bytes:
    return fs.cat_file(path, start=start, end=end)
