"""Serve a cache directory read-only over HTTP, with byte ranges and an optional delay per request.

    with serve_directory("runs/demo/cache", latency=0.02) as base:      # "http://127.0.0.1:PORT"
        cache = open_cache(base)           # or base + "/sub/dir" for a cache below the served root

A cache read over HTTP (fsspec's HTTPFileSystem) fetches byte ranges of its shard files, which
python's own ``http.server`` does not serve (it ignores the ``Range`` header and sends the whole
file). This server answers a single ``bytes=a-b`` range with 206, serves files only (no directory
listings, as an object store behind a CDN), refuses every method but GET and HEAD (501), and
keeps connections alive (HTTP/1.1) like the stores a training cluster reads from. ``latency``
seconds are waited before every answer, in the request's own thread, so concurrent requests wait
concurrently: the round trip of a remote store. The tests and ``bench/bench_http.py`` read caches
through it.
"""
from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """``(start, end)`` (end exclusive) of a single-range ``Range`` header on a file of ``size`` bytes;
    None when it cannot be satisfied; ``(0, size)`` for a header this server does not interpret
    (several ranges, other units), which HTTP allows to answer with the whole file."""
    match = _RANGE.fullmatch(header.strip())
    if match is None:
        return 0, size
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:                              # bytes=-N: the last N bytes
        start, end = max(0, size - int(last)), size
    else:
        start, end = int(first), size if not last else min(size, int(last) + 1)
    if start >= size or start >= end:
        return None
    return start, end


class RangeRequestHandler(SimpleHTTPRequestHandler):
    """GET and HEAD of the files under the served directory, single byte ranges included."""

    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: with Nagle's algorithm the body waits for the client's
    # delayed ACK (40 ms on Linux), a stall no real store adds.
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def read_range(self, path: str, start: int, end: int) -> bytes:
        """The bytes ``start:end`` of the file at ``path`` as they are sent (a test may damage them here)."""
        with open(path, "rb") as f:
            f.seek(start)
            return f.read(end - start)

    def _answer(self, send_body: bool) -> None:
        if self.server.latency:
            time.sleep(self.server.latency)
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            self.send_error(HTTPStatus.NOT_FOUND, "File not found")
            return
        size = os.path.getsize(path)
        start, end, status = 0, size, HTTPStatus.OK
        header = self.headers.get("Range")
        if header is not None:
            span = parse_range(header, size)
            if span is None:
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start, end = span
            status = HTTPStatus.PARTIAL_CONTENT if span != (0, size) else HTTPStatus.OK
        body = self.read_range(path, start, end) if send_body else b""
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        if status == HTTPStatus.PARTIAL_CONTENT:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # quiet: a training run makes thousands of requests
        pass


class CacheHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256     # many concurrent range requests: a short backlog would drop connections

    def __init__(self, address, handler, latency: float = 0.0):
        super().__init__(address, handler)
        self.latency = float(latency)


@contextmanager
def serve_directory(root, latency: float = 0.0, handler: type[SimpleHTTPRequestHandler] = RangeRequestHandler,
                    host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve ``root`` from a thread of this process while the block runs; yields its base URL."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: no such directory to serve")
    server = CacheHTTPServer((host, port), partial(handler, directory=str(root)), latency=latency)
    thread = threading.Thread(target=server.serve_forever, name=f"http-server-{root}", daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def main(argv=None) -> None:
    """``python -m store.http_server DIR [--port N] [--latency S]``: serve a cache directory until Ctrl-C."""
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="directory to serve (a cache, or a directory holding caches)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds waited before every answer [0]")
    args = parser.parse_args(argv)
    with serve_directory(args.root, latency=args.latency, host=args.host, port=args.port) as base:
        print(f"serving {args.root} read-only at {base} (python -m train --cache {base} ...); Ctrl-C stops")
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
