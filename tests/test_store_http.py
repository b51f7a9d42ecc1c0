"""A cache read over HTTP: a real server in a thread of the test (store/http_server.py), fsspec's
HTTPFileSystem on the client, both backends; and the trainer's read-ahead of teacher payloads.

The server answers byte ranges, lists no directories and refuses writes, as the stores training
nodes read from; a delay per request stands in for their round trip.
"""
import csv
import json
import re
import threading
import time
import urllib.error
import urllib.request
from http.server import SimpleHTTPRequestHandler
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from store import CacheError, CorruptShardError, IncompleteCacheError, Manifest, finalize, open_cache, open_writer
from store.http_server import RangeRequestHandler, parse_range, serve_directory
from store.lock import CacheLock
from store.synthetic import make_sample
from test_store_read_path import VIEWS, same, write

from detectors.data import CocoDetection
from detectors.views import ViewSpec
from train.student_data import ReadAhead, StudentBatches


class LoggingHandler(RangeRequestHandler):
    """Records every request (method, path, Range), when it was answered (start, end) and the body
    bytes sent per path."""

    requests: list = []
    times: list = []
    sent: dict = {}
    lock = threading.Lock()

    def read_range(self, path, start, end):
        data = super().read_range(path, start, end)
        with self.lock:
            self.sent[self.path] = self.sent.get(self.path, 0) + len(data)
        return data

    def _answer(self, send_body):
        self.requests.append((self.command, self.path, self.headers.get("Range")))
        start = time.perf_counter()
        super()._answer(send_body)
        self.times.append((self.command, self.path, start, time.perf_counter()))


def logging_handler():
    return type("Handler", (LoggingHandler,), {"requests": [], "times": [], "sent": {}})


def _all_at_once(spans) -> bool:
    """Whether every request of ``spans`` (start, end) was in flight at one moment."""
    return max(start for start, _ in spans) < min(end for _, end in spans)


# ---------------------------------------------------------------------------------------------- the server
@pytest.mark.parametrize("header,expected", [
    ("bytes=0-9", (0, 10)), ("bytes=90-", (90, 100)), ("bytes=-10", (90, 100)), ("bytes=95-200", (95, 100)),
    ("bytes=-500", (0, 100)), ("bytes=100-", None), ("bytes=5-2", None), ("bytes=-", None),
    ("bytes=0-1,5-6", (0, 100)), ("items=0-9", (0, 100))])
def test_parse_range(header, expected):
    assert parse_range(header, 100) == expected


def _fetch(url, method="GET", headers=None):
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), b""


def test_the_server_serves_ranges_of_files_only_and_waits_its_latency(tmp_path):
    data = bytes(range(256)) * 4
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f.bin").write_bytes(data)
    with serve_directory(tmp_path, latency=0.05) as base:
        start = time.perf_counter()
        status, headers, body = _fetch(f"{base}/sub/f.bin", headers={"Range": "bytes=10-19"})
        assert time.perf_counter() - start >= 0.05
        assert (status, body, headers["Content-Range"]) == (206, data[10:20], "bytes 10-19/1024")
        assert _fetch(f"{base}/sub/f.bin")[2] == data
        status, headers, body = _fetch(f"{base}/sub/f.bin", method="HEAD")
        assert (status, headers["Content-Length"], body) == (200, "1024", b"")
        assert _fetch(f"{base}/sub/f.bin", headers={"Range": "bytes=2000-"})[0] == 416
        assert _fetch(f"{base}/sub/")[0] == 404                 # no listings
        assert _fetch(f"{base}/sub/f.bin", method="PUT")[0] == 501
        # concurrent requests wait concurrently
        threads = [threading.Thread(target=_fetch, args=(f"{base}/sub/f.bin",)) for _ in range(8)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert time.perf_counter() - start < 8 * 0.05


# ---------------------------------------------------------------------------------------------- reading
def _served_cache(tmp_path, backend):
    write(str(tmp_path / "cache"), backend)
    return open_cache(str(tmp_path / "cache"))


@pytest.mark.parametrize("fields", [None, ["fpn"], ["region", "meta.valid_hw"]])
def test_get_get_many_and_iter_over_http_equal_the_local_cache(backend, tmp_path, fields):
    local = _served_cache(tmp_path, backend)
    handler = logging_handler()
    with serve_directory(tmp_path, handler=handler) as base:
        remote = open_cache(f"{base}/cache")
        keys = local.keys()
        order = [keys[i] for i in np.random.default_rng(2).permutation(len(keys))]
        for decode in ("numpy", "compact"):
            for a, b in zip(remote.get_many(order, fields=fields, decode=decode),
                            local.get_many(order, fields=fields, decode=decode)):
                same(a, b)
        same(remote.get(*keys[7], fields=fields), local.get(*keys[7], fields=fields))
        streamed = list(remote.iter(fields=fields))
        assert [s["__key__"] for s in streamed] == keys
        for a, b in zip(streamed, local.iter(fields=fields)):
            same(a, b)
    assert {method for method, _, _ in handler.requests} == {"GET", "HEAD"}
    assert not [path for _, path, _ in handler.requests if path.endswith("/")]        # nothing listed


def test_a_random_read_fetches_byte_ranges_not_whole_shard_files(backend, tmp_path):
    local = _served_cache(tmp_path, backend)
    handler = logging_handler()
    with serve_directory(tmp_path, handler=handler) as base:
        remote = open_cache(f"{base}/cache")
        key = local.keys()[5]
        receipt = local.receipt(local.locate(*key)[0])
        remote.get_many([key], fields=["fpn"])
    group_files = [rel for rel in receipt["files"] if rel.startswith(receipt["groups"]["fpn"]["path"])]
    shard_bytes = sum(receipt["files"][rel]["nbytes"] for rel in group_files)
    sent = sum(n for path, n in handler.sent.items() if path.startswith("/cache/shards/") and
               not path.endswith(".json"))
    blob_bytes = sum(receipt["groups"]["fpn"]["nbytes"][local.locate(*key)[1]])
    assert blob_bytes <= sent < shard_bytes / 2
    assert all(rng is not None for _, path, rng in handler.requests
               if path.endswith((".tar", "/c/0")) and _ == "GET")


def test_a_batch_reads_the_metadata_of_its_shards_concurrently(backend, tmp_path):
    """Receipts, file sizes and zarr's metadata of shards not read before: at once, not one after another."""
    local = _served_cache(tmp_path, backend)
    first = [tuple(local.receipt(index)["keys"][0]) for index in sorted(local.shards)]
    assert len(first) == 5
    handler = logging_handler()
    with serve_directory(tmp_path, latency=0.1, handler=handler) as base:
        remote = open_cache(f"{base}/cache")
        handler.times.clear()
        for a, b in zip(remote.get_many(first, fields=["fpn"]), local.get_many(first, fields=["fpn"])):
            same(a, b)
    receipts = [(a, b) for _, path, a, b in handler.times if re.fullmatch(r"/cache/shards/\d{6}\.json", path)]
    sizes = [(a, b) for method, _, a, b in handler.times if method == "HEAD"]
    assert len(receipts) == 5 and _all_at_once(receipts)
    assert len(sizes) == {"zarr": 10, "wds": 5}[backend] and _all_at_once(sizes)     # zarr: zarr.json and c/0


def test_a_corrupted_byte_in_transit_is_refused_naming_the_shard_and_sample(backend, tmp_path):
    local = _served_cache(tmp_path, backend)
    keys = local.keys()
    victim = keys[5]
    shard, row = local.locate(*victim)
    receipt = local.receipt(shard)
    layout = receipt["groups"]["fpn"]
    col = layout["fields"].index("fpn.p3")
    at = layout["offsets"][row][col] + layout["nbytes"][row][col] // 2
    (rel, file_at, _), = local.backend.plan_span(receipt, "fpn", at, at + 1)[0]

    class Damaging(RangeRequestHandler):
        def read_range(self, path, start, end):
            data = bytearray(super().read_range(path, start, end))
            if path == str(tmp_path / "cache" / rel) and start <= file_at < end:
                data[file_at - start] ^= 0x10
            return bytes(data)

    pattern = rf"shard {shard} \({layout['path']}\), field fpn\.p3, sample \(image_id={victim[0]}, " \
              rf"view={victim[1]}\): checksum mismatch"
    with serve_directory(tmp_path, handler=Damaging) as base:
        remote = open_cache(f"{base}/cache")
        with pytest.raises(CorruptShardError, match=pattern):
            remote.get_many(keys[3:8], fields=["fpn"])
        with pytest.raises(CorruptShardError, match=pattern):
            remote.get(*victim, fields=["fpn"])
        remote.get_many(keys[:5] + keys[6:], fields=["fpn"])       # the others still read
    local.get(*victim, fields=["fpn"])                            # the file itself is intact


def test_zarr_arrays_read_through_zarr_over_http_too(tmp_path):
    """Arrays in another layout than the writer's go through zarr's FsspecStore: over HTTP as well."""
    local = _served_cache(tmp_path, "zarr")
    with serve_directory(tmp_path) as base:
        remote = open_cache(f"{base}/cache")
        receipt = remote.receipt(0)
        path = receipt["groups"]["fpn"]["path"]
        assert np.array_equal(remote.backend._array(path)[:], local.backend._array(path)[:])


def test_a_server_without_byte_ranges_is_named(backend, tmp_path):
    _served_cache(tmp_path, backend)

    class Plain(SimpleHTTPRequestHandler):          # python -m http.server: ignores Range
        def log_message(self, *args):
            pass

    with serve_directory(tmp_path, handler=Plain) as base:
        remote = open_cache(f"{base}/cache")
        with pytest.raises(CacheError, match=rf"^{base}/cache: asked for bytes \d+:\d+ of shards/.*: the server "
                                             r"does not serve byte ranges"):
            remote.get_many(remote.keys()[:3], fields=["fpn"])


def test_http_caches_are_read_only_and_must_be_complete(tmp_path):
    items = [make_sample(i + 100, v, fields=["fpn", "meta"]) for i in range(3) for v in range(2)]
    manifest = Manifest.create(teacher={"arch": "gfl-small", "checkpoint_sha256": "ab" * 32},
                               dataset={"annotation_sha256": "cd" * 32, "num_images": 3}, views=VIEWS,
                               fields={"fpn": "fp16", "meta": "raw"}, calibration=items[:2], backend="wds",
                               shard_size=4, num_samples=len(items))
    writer = open_writer(str(tmp_path / "cache"), manifest)
    for item in items[:4]:
        writer.write(item)
    writer.close(finalize=False)                   # one shard of two: not finalized
    with serve_directory(tmp_path) as base:
        with pytest.raises(IncompleteCacheError, match=rf"^{base}/cache is not finalized: over HTTP\(S\) only a "
                                                       r"complete cache can be read"):
            open_cache(f"{base}/cache", allow_incomplete=True)
        read_only = rf"^{base}/\w+: an HTTP\(S\) location is read-only"
        with pytest.raises(CacheError, match=read_only):
            open_writer(f"{base}/other", manifest)
        with pytest.raises(CacheError, match=read_only):
            CacheLock.acquire(f"{base}/other")
        with pytest.raises(CacheError, match=read_only):
            finalize(f"{base}/cache")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


# ---------------------------------------------------------------------------------------------- read-ahead
def test_prefetch_batches_is_a_training_option_that_a_resumed_run_may_change():
    import argparse

    from train.checkpoint import RESUME_FREE_KEYS
    from train.config import TrainConfig, add_train_options, config_from_args

    parser = argparse.ArgumentParser()
    add_train_options(parser)
    args = parser.parse_args(["--data", "d", "--out", "o", "--cache", "c", "--prefetch-batches", "4"])
    assert config_from_args(args)["prefetch_batches"] == 4
    assert TrainConfig(data="d", out="o", cache="c").prefetch_batches == 2
    assert "prefetch_batches" in RESUME_FREE_KEYS          # the same batches either way
    with pytest.raises(ValueError, match="prefetch_batches must be >= 0, got -1"):
        TrainConfig(data="d", out="o", cache="c", prefetch_batches=-1)


class RecordingSource:
    """prefetch_many returns the keys it was asked for, after ``delay`` s; records how many ran at once."""

    def __init__(self, delay=0.0):
        self.delay, self.calls, self.running, self.most = delay, [], 0, 0
        self.lock = threading.Lock()

    def prefetch_many(self, keys):
        with self.lock:
            self.calls.append(list(keys))
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(self.delay)
        with self.lock:
            self.running -= 1
        return [("payload", *key) for key in keys]


def test_read_ahead_reads_the_next_batches_concurrently_and_cancels_skipped_ones():
    keys = [[(k, 0), (k, 1)] for k in range(10)]
    source = RecordingSource(delay=0.05)
    ahead = ReadAhead(source, keys, depth=3)
    assert ahead.take(0).result() == [("payload", 0, 0), ("payload", 0, 1)]
    assert source.most > 1                                  # batches 0..3 were read at once
    assert sorted(call[0][0] for call in source.calls) == [0, 1, 2, 3]
    assert ahead.take(1).result() == [("payload", 1, 0), ("payload", 1, 1)]
    assert sorted(ahead._pending) == [2, 3, 4]
    # a loader worker of two takes every second batch: 5, 7, 9 (no read past the plan's end)
    assert ahead.take(5, stride=2).result()[0] == ("payload", 5, 0)
    assert sorted(ahead._pending) == [7, 9]                 # 2, 3, 4 were never taken: dropped
    assert ahead.take(9, stride=2).result()[0] == ("payload", 9, 0) and not ahead._pending


def _image_set(root: Path) -> CocoDetection:
    (root / "annotations").mkdir(parents=True)
    (root / "train2017").mkdir()
    images = [{"id": i, "file_name": f"{i:06d}.jpg", "height": 40, "width": 60} for i in (1, 2, 3)]
    for entry in images:
        Image.fromarray(np.full((40, 60, 3), 120, np.uint8)).save(root / "train2017" / entry["file_name"])
    (root / "annotations" / "instances_train2017.json").write_text(
        json.dumps({"images": images, "annotations": [], "categories": [{"id": 3, "name": "a"}]}))
    return CocoDetection(root, views=(ViewSpec(False, 40, 60), ViewSpec(True, 40, 60)), view_policy="all",
                         on_error="skip")


def test_student_batches_with_read_ahead_pair_each_batch_with_its_own_views(tmp_path):
    dataset = _image_set(tmp_path)
    plan = [[(0, 0), (1, 1)], [(2, 0), (0, 1)], [(1, 0), (2, 1)]]
    source = RecordingSource()
    batches = StudentBatches(dataset, plan, source, prefetch_batches=2)
    for k, batch in enumerate(plan):
        item = batches[k]
        assert item.teacher == [("payload", dataset.image_ids[i], v) for i, v in batch]
    assert len(source.calls) == 3                           # each batch read once
    # an image the skip policy replaces: the batch's actual views are read, not the planned ones
    bad = dataset.image_info(1).path
    bad.write_bytes(bad.read_bytes()[:100])
    source = RecordingSource()
    with pytest.warns(UserWarning, match="skipping bad image"):
        item = StudentBatches(dataset, plan, source, prefetch_batches=2)[0]
    assert item.batch.image_ids == [1, 3]
    assert item.teacher == [("payload", 1, 0), ("payload", 3, 1)]


# ---------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A synthetic set, a random gfl-small teacher and its FRS cache (fpn, head) in each backend."""
    from detectors import build_detector, save_checkpoint
    from detectors.synth import SynthConfig, generate
    from precompute.config import PrecomputeConfig
    from precompute.pipeline import run_precompute

    root = tmp_path_factory.mktemp("http")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generate(root / "data", 6, 2, SynthConfig(size=64, max_side=48), seed=3, progress=False)
        torch.manual_seed(0)
        save_checkpoint(root / "teacher.pt", build_detector("gfl-small", num_classes=8))
        for backend in ("zarr", "wds"):
            run_precompute(PrecomputeConfig(ckpt=str(root / "teacher.pt"), data=str(root / "data"),
                                            cache=str(root / "served" / backend), views="64:96,64:96:flip",
                                            fields="frs", format=backend, device="cpu", shard_size=4, batch_size=4,
                                            workers=0, calibration=4, progress=False))
    finally:
        torch.set_num_threads(threads)
    return root


def _run(world, out, cache, **options):
    """The log rows (6 significant digits, timings left out), the last step's values and the final weights."""
    from train.config import TrainConfig
    from train.trainer import StudentTrainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = TrainConfig(data=str(world / "data"), out=str(out), cache=cache, method="frs", student="gfl-nano",
                             batch_size=2, epochs=2, warmup_iters=1, log_every=1, eval=False, tensorboard=False,
                             progress=False, overrides={"frs.warmup_iters": 0}, **options)
        trainer = StudentTrainer(config)
        trainer.train()
    finally:
        torch.set_num_threads(threads)
    with (Path(out) / "log.csv").open() as f:
        rows = [{k: v for k, v in row.items() if k not in ("sec_per_iter", "data_sec")} for row in csv.DictReader(f)]
    return rows, trainer.last_values, trainer.model.state_dict()


def _same_run(a, b):
    assert a[0] == b[0] and a[1] == b[1]
    assert a[2].keys() == b[2].keys()
    for name, value in a[2].items():
        assert torch.equal(value, b[2][name]), name


@pytest.mark.parametrize("backend", ["zarr", "wds"])
def test_training_from_an_http_cache_gives_the_local_caches_losses(world, tmp_path, backend):
    """Six steps over two epochs: from the local path without read-ahead, and over HTTP (20 ms per
    request) with read-ahead inline and in a loader worker (forked: it opens its own HTTP filesystem):
    the same losses, row for row, and bit for bit the same weights."""
    local = _run(world, tmp_path / "local", str(world / "served" / backend), workers=0, prefetch_batches=0)
    assert len(local[0]) == 6 and all(float(row["frs_feat"]) > 0 for row in local[0])
    with serve_directory(world / "served", latency=0.02) as base:
        url = f"{base}/{backend}"
        _same_run(_run(world, tmp_path / "inline", url, workers=0, prefetch_batches=2), local)
        _same_run(_run(world, tmp_path / "worker", url, workers=1, prefetch_batches=3), local)
