"""One conformance suite, run against both backends (zarr, wds) on memory:// and local paths
(the ``backend`` and ``url`` fixtures: tests/conftest.py)."""
import numpy as np
import pytest
import torch

from store import (CacheError, CorruptShardError, IncompleteCacheError, Manifest, SchemaError,
                   open_cache, open_writer)
from store.synthetic import make_sample
from store.torch_data import CacheIterableDataset, CacheMapDataset, collate_list

VIEWS = [{"flip": False, "short": 96, "max_size": 160}, {"flip": True, "short": 96, "max_size": 160}]
TEACHER = {"arch": "gfl-small", "checkpoint_sha256": "ab" * 32}
DATASET = {"annotation_sha256": "cd" * 32, "num_images": 9}
CODECS = {"fpn": "klt", "head.cls": "sparse", "head.box": "int8", "region": "fp16", "meta": "raw", "image": "stored"}
SIZES = [(64, 96), (96, 64), (64, 64)]           # views of different aspect ratios


def samples(n_images=9):
    return [make_sample(i + 100, v, valid_hw=SIZES[i % 3]) for i in range(n_images) for v in range(2)]


def manifest(backend, items, shard_size=4, codecs=CODECS, num_samples="all"):
    return Manifest.create(teacher=TEACHER, dataset=DATASET, views=VIEWS, fields=codecs, calibration=items[:3],
                           backend=backend, shard_size=shard_size,
                           num_samples=len(items) if num_samples == "all" else num_samples)


def write_all(backend, url):
    items = samples()
    m = manifest(backend, items)
    with open_writer(url, m) as writer:
        for item in items:
            writer.write(item)
    return url, m, items


@pytest.fixture
def written(backend, url):
    return write_all(backend, url)


@pytest.fixture
def written_on_disk(backend, tmp_path):
    """A cache in tmp_path/cache: the corruption tests edit its files."""
    return write_all(backend, str(tmp_path / "cache"))[0]


def expected(m, sample):
    """What the cache must return: each field through its codec (exact for lossless fields)."""
    return {name: m.codec(name).decode(m.codec(name).encode(value)) for name, value in sample.items()}


def assert_sample(got, want, fields=None):
    names = [n for n in want if fields is None or n in fields]
    assert sorted(n for n in got if not n.startswith("__")) == sorted(names)
    for name in names:
        g = got[name].numpy() if isinstance(got[name], torch.Tensor) else got[name]
        assert g.shape == want[name].shape, name
        assert g.dtype == want[name].dtype, name
        np.testing.assert_array_equal(g, want[name], err_msg=name)


def test_round_trip_random_access(written):
    url, m, items = written
    cache = open_cache(url, expect=dict(teacher=TEACHER, dataset=DATASET, views=VIEWS, fields=["fpn", "region"]))
    assert len(cache) == len(items) and cache.manifest["complete"]
    for item in items[::-1]:
        key = (int(item["meta.image_id"]), int(item["meta.view_index"]))
        got = cache.get(*key)
        assert got["__key__"] == key and got["__view__"] == VIEWS[key[1]]
        assert_sample(got, expected(m, item))
    # lossless fields are bit-exact with the input itself
    got = cache.get(101, 1, fields=["meta", "image", "region.index"])
    for name in ("meta.level_hw", "meta.gt_boxes_xyxy", "image.encoded", "region.index"):
        np.testing.assert_array_equal(got[name], items[3][name])


def test_streaming_yields_every_sample_once_in_shard_order(written):
    url, m, items = written
    cache = open_cache(url)
    got = list(cache.iter(fields=["fpn", "meta", "region"]))
    assert [s["__key__"] for s in got] == [(int(i["meta.image_id"]), int(i["meta.view_index"])) for i in items]
    for sample, item in zip(got, items):
        assert_sample(sample, expected(m, item), fields=set(cache.select(["fpn", "meta", "region"])["fpn"]
                                                              + cache.select(["meta", "region"])["meta"]
                                                              + cache.select(["region"])["region"]))


@pytest.mark.parametrize("world_size,num_workers", [(1, 2), (2, 1), (3, 2)])
def test_split_by_rank_and_worker_covers_everything_once(written, world_size, num_workers):
    url, _, items = written
    cache = open_cache(url)
    seen = []
    for rank in range(world_size):
        for worker in range(num_workers):
            seen += [s["__key__"] for s in cache.iter(fields=["meta.image_id"], rank=rank, world_size=world_size,
                                                      worker_id=worker, num_workers=num_workers, shuffle=True, epoch=3)]
    assert sorted(seen) == sorted(cache.keys()) and len(seen) == len(items)


def test_selective_reads_touch_only_the_requested_groups(written):
    url, _, items = written
    cache = open_cache(url)
    for item in items:
        cache.get(int(item["meta.image_id"]), int(item["meta.view_index"]), fields=["region"])
    list(cache.iter(fields=["region"]))
    touched = set(cache.stats.bytes_by_path)
    assert touched and all("region" in path for path in touched), touched
    region_blobs = sum(sum(map(sum, cache.receipt(i)["groups"]["region"]["nbytes"])) for i in cache.shards)
    assert cache.stats.total() < 2 * region_blobs + 64 * 1024 * len(cache.shards)
    # a prefix reads a part of a group: head.cls without the head.box bytes around it
    cache.stats.reset()
    cache.get(100, 0, fields=["head.cls.p3"])
    receipt = cache.receipt(0)
    head = receipt["groups"]["head"]
    p3 = head["nbytes"][0][head["fields"].index("head.cls.p3")]
    head_file = sum(info["nbytes"] for path, info in receipt["files"].items() if "head" in path)
    assert all("head" in p for p in cache.stats.bytes_by_path)
    assert cache.stats.total() < min(head_file, p3 + 2 * head.get("chunk", 1024) + 4096)


def test_decode_modes(written):
    url, m, items = written
    cache = open_cache(url)
    as_numpy = cache.get(100, 0, fields=["fpn.p3", "head.box.p3"])
    as_torch = cache.get(100, 0, fields=["fpn.p3", "head.box.p3"], decode="torch")
    compact = cache.get(100, 0, fields=["fpn.p3", "head.box.p3"], decode="compact")
    from store import dequantize
    for name in ("fpn.p3", "head.box.p3"):
        assert isinstance(as_torch[name], torch.Tensor)
        np.testing.assert_array_equal(as_torch[name].numpy(), as_numpy[name])
        np.testing.assert_allclose(dequantize(compact[name]).numpy(), as_numpy[name], rtol=1e-5, atol=1e-5)


def test_torch_loaders(written):
    url, _, items = written
    cache = open_cache(url)
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(CacheIterableDataset(url, fields=["meta", "fpn.p7"]), batch_size=None,
                                             num_workers=workers)
        keys = [tuple(s["__key__"]) for s in loader]          # default_convert makes lists
        assert sorted(keys) == sorted(cache.keys()), workers
    loader = torch.utils.data.DataLoader(CacheMapDataset(url, fields=["region"]), batch_size=4, num_workers=2,
                                         collate_fn=collate_list)
    assert sum(len(batch) for batch in loader) == len(items)


def test_open_ended_single_writer_and_artifacts(backend, url):
    items = samples(3)
    m = manifest(backend, items, shard_size=4, num_samples=None)
    with open_writer(url, m) as writer:
        for item in items:
            writer.write(item)
        writer.put_artifact("maskd_tokens", {"p3": np.arange(12, dtype=np.float32).reshape(6, 2)},
                            meta={"tokens": 6})
        writer.put_artifact("teacher_head", torch.nn.Linear(3, 2).state_dict())
    open_writer(url, m).put_artifact("late", np.ones(3))          # after finalize
    cache = open_cache(url)
    assert len(cache) == 6 and cache.manifest["complete"] and len(cache.shards) == 2
    np.testing.assert_array_equal(cache.artifact("late")["value"], np.ones(3))
    np.testing.assert_array_equal(cache.artifact("maskd_tokens")["p3"], np.arange(12).reshape(6, 2))
    assert set(cache.artifact("teacher_head")) == {"weight", "bias"}
    with pytest.raises(CacheError, match="no artifact"):
        cache.artifact("nope")


def test_several_writers_own_disjoint_shards(backend, url):
    items = samples()
    m = manifest(backend, items)
    writers = [open_writer(url, m, rank=r, world_size=2) for r in range(2)]
    assert [t.index for t in writers[1].pending_shards()] == [1, 3]
    for writer in writers:
        for task in writer.pending_shards():
            with writer.shard(task.index) as shard:
                for position in task.positions:
                    shard.write(items[position])
    assert writers[0].close() and writers[1].close()
    cache = open_cache(url)
    assert [s["__key__"] for s in cache.iter(fields=["meta.image_id"])] == \
           [(int(i["meta.image_id"]), int(i["meta.view_index"])) for i in items]


def test_incomplete_cache_is_refused_and_names_the_missing_shards(backend, url):
    items = samples()
    m = manifest(backend, items)
    writer = open_writer(url, m)
    for task in writer.pending_shards()[:2]:
        with writer.shard(task.index) as shard:
            for position in task.positions:
                shard.write(items[position])
    with pytest.raises(IncompleteCacheError, match=r"2, 3, 4"):
        open_cache(url)
    partial = open_cache(url, allow_incomplete=True)
    assert len(partial) == 8
    assert [t.index for t in open_writer(url, m).pending_shards()] == [2, 3, 4]


def test_put_routes_samples_in_any_order_and_commits_each_shard_with_its_last(backend, url):
    items = samples(2)
    m = manifest(backend, items, shard_size=2)
    writer = open_writer(url, m)
    receipts = {position: writer.put(position, items[position]) for position in [2, 0, 3]}  # shard 0 lacks 1
    assert [p for p, r in receipts.items() if r is not None] == [3]
    assert receipts[3]["index"] == 1 and writer.unfinished_shards() == [0]
    with pytest.raises(CacheError, match="shard 1 is already complete"):
        writer.put(2, items[2])
    assert writer.close(finalize=False) is False and writer.unfinished_shards() == [0]   # left uncommitted
    resumed = open_writer(url, m)
    assert [task.index for task in resumed.pending_shards()] == [0]
    assert resumed.put(1, items[1]) is None
    with pytest.raises(CacheError, match=r"shard 0: 1 samples written, 2 expected; not committed"):
        resumed.close()
    resumed = open_writer(url, m)
    assert resumed.put(1, items[1]) is None and resumed.put(0, items[0])["index"] == 0
    assert resumed.close()
    cache = open_cache(url)
    for item in items:
        key = (int(item["meta.image_id"]), int(item["meta.view_index"]))
        assert cache.locate(*key)[0] == items.index(item) // 2             # in the shard of its position
        np.testing.assert_array_equal(cache.get(*key, fields=["meta"])["meta.valid_hw"], item["meta.valid_hw"])


def test_writer_refuses_bad_samples(backend, url):
    items = samples(2)
    m = manifest(backend, items, num_samples=None)
    writer = open_writer(url, m)
    bad = dict(items[0])
    bad["head.cls.p3"] = bad["head.cls.p3"][:, :-1]                     # H/W differ from fpn.p3
    with pytest.raises(SchemaError, match="head.cls.p3"):
        writer.write(bad)
    extra = dict(items[0], **{"fpn.p8": items[0]["fpn.p7"]})
    with pytest.raises(SchemaError, match="unknown field 'fpn.p8'"):
        writer.write(extra)
    missing = {k: v for k, v in items[0].items() if k != "region.cls"}
    with pytest.raises(SchemaError, match="region.cls"):
        writer.write(missing)
    writer.write(items[0])
    with pytest.raises(CacheError, match="written twice"):
        writer.write(items[0])
    with pytest.raises(CacheError, match="view index out of range"):
        writer.write(make_sample(5, 7))


def test_corrupt_byte_is_named_by_reader_and_verify(written_on_disk, tmp_path):
    from store.report import verify

    url = written_on_disk
    cache = open_cache(url)
    receipt = cache.receipt(1)
    path = tmp_path / "cache" / max((p for p in receipt["files"] if "fpn" in p),
                                    key=lambda p: receipt["files"][p]["nbytes"])
    data = bytearray(path.read_bytes())
    data[len(data) // 4] ^= 0x01
    path.write_bytes(bytes(data))
    report = verify(url)
    assert not report.ok and any("shard 1" in p and str(path.relative_to(tmp_path / "cache")) in p
                                 for p in report.problems), report.problems
    with pytest.raises(CorruptShardError, match="shard 1"):
        for key in cache.receipt(1)["keys"]:
            open_cache(url).get(*key, fields=["fpn"])
    with pytest.raises(CorruptShardError, match="shard 1"):
        list(open_cache(url).iter(fields=["fpn"]))
    # other shards and groups still read
    open_cache(url).get(*cache.receipt(0)["keys"][0])
    open_cache(url).get(*cache.receipt(1)["keys"][0], fields=["region"])


def test_truncated_shard_is_named(written_on_disk, tmp_path):
    from store.report import verify

    url = written_on_disk
    receipt = open_cache(url).receipt(2)
    rel = max((p for p in receipt["files"] if "head" in p), key=lambda p: receipt["files"][p]["nbytes"])
    path = tmp_path / "cache" / rel
    path.write_bytes(path.read_bytes()[:-100])
    assert any("shard 2" in p and "truncated" in p for p in verify(url).problems)
    with pytest.raises(CorruptShardError, match=f"shard 2.*{rel}.*truncated"):
        open_cache(url).get(*receipt["keys"][0], fields=["head"])


def test_compact_samples_cross_loader_workers_and_dequantize(written):
    url, m, items = written
    cache = open_cache(url)
    loader = torch.utils.data.DataLoader(CacheIterableDataset(url, fields=["fpn", "head.box", "meta.valid_hw"],
                                                              decode="compact"), batch_size=None, num_workers=2)
    count = 0
    for sample in loader:
        dense = cache.dequantize(sample, device="cpu")
        want = cache.get(*sample["__key__"], fields=["fpn", "head.box", "meta.valid_hw"])
        for name, value in want.items():
            if not name.startswith("__"):
                np.testing.assert_allclose(dense[name].numpy(), value, rtol=1e-5, atol=1e-5, err_msg=name)
        count += 1
    assert count == len(items)


def test_streaming_a_part_of_a_group_reads_only_those_fields(written, backend):
    url, _, _ = written
    cache = open_cache(url)
    list(cache.iter(fields=["head.cls.p7"]))
    assert all("head" in path for path in cache.stats.bytes_by_path)
    allowed = 0
    for i, summary in cache.shards.items():
        layout = cache.receipt(i)["groups"]["head"]
        column = layout["fields"].index("head.cls.p7")
        total = sum(map(sum, layout["nbytes"]))
        for row in range(summary["num_samples"]):
            allowed += layout["nbytes"][row][column]
            if backend == "zarr":   # whole inner chunks, and the shard index, per ranged read
                allowed += 2 * layout["chunk"] + 16 * -(-total // layout["chunk"]) + 4
        allowed += 2048             # zarr.json
    assert cache.stats.total() <= allowed
    if backend == "wds":
        head_files = sum(info["nbytes"] for s in cache.shards.values() for p, info in s["files"].items() if "head" in p)
        assert cache.stats.total() < head_files / 4
