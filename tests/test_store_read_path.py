"""The batched random-read path (Cache.get_many, zarr's direct ranged reads) against the per-sample one.

On every backend, in memory and on disk (the ``backend`` and ``url`` fixtures: tests/conftest.py)."""
import numpy as np
import pytest

from store import CorruptShardError, Manifest, open_cache, open_writer
from store.synthetic import make_sample

VIEWS = [{"flip": False, "short": 96, "max_size": 160}, {"flip": True, "short": 96, "max_size": 160}]
CODECS = {"fpn": "klt", "head.cls": "sparse", "head.box": "int8", "region": "fp16", "meta": "raw", "image": "stored"}
SIZES = [(64, 96), (96, 64), (64, 64)]


def write(url, backend, codecs=CODECS, zero_images=False):
    items = [make_sample(i + 100, v, valid_hw=SIZES[i % 3]) for i in range(9) for v in range(2)]
    if zero_images:        # long runs of zero bytes: zarr leaves whole inner chunks unwritten
        for k, item in enumerate(items):
            item["image.encoded"] = np.zeros(40_000 + 997 * k, np.uint8)
            item["image.encoded"][::5000] = 7
    m = Manifest.create(teacher={"arch": "gfl-small", "checkpoint_sha256": "ab" * 32},
                        dataset={"annotation_sha256": "cd" * 32, "num_images": 9}, views=VIEWS, fields=codecs,
                        calibration=items[:3], backend=backend, shard_size=4, num_samples=len(items))
    with open_writer(url, m) as writer:
        for item in items:
            writer.write(item)
    return items


def same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        x, y = a[name], b[name]
        if hasattr(x, "__dict__") and not isinstance(x, np.ndarray):      # compact payloads (Affine, KLTCoeffs)
            x, y = vars(x), vars(y)
        if isinstance(x, dict):
            same(x, y)
        elif isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y, equal_nan=True), name
        else:
            assert x == y, name


@pytest.mark.parametrize("fields", [None, ["fpn"], ["head.cls.p3"], ["region", "meta.valid_hw"]])
@pytest.mark.parametrize("decode", ["numpy", "compact"])
def test_get_many_returns_what_get_returns(backend, url, fields, decode):
    write(url, backend)
    cache = open_cache(url)
    keys = cache.keys()
    order = [keys[i] for i in np.random.default_rng(1).permutation(len(keys))] + keys[:3]   # repeats too
    old = [open_cache(url).get(*key, fields=fields, decode=decode) for key in order]
    new = cache.get_many(order, fields=fields, decode=decode)
    assert len(new) == len(old)
    for a, b in zip(new, old):
        same(a, b)
    assert cache.get_many([], fields=fields) == []


def test_zarr_direct_reads_equal_zarr_reads(url):
    items = write(url, "zarr", zero_images=True)
    cache = open_cache(url)
    backend = cache.backend
    empty = 0
    rng = np.random.default_rng(0)
    for index in cache.shards:
        receipt = cache.receipt(index)
        for group, layout in receipt["groups"].items():
            assert backend._direct_layout(receipt, group) is not None, group
            key = backend._direct_layout(receipt, group)[0]
            empty += sum(o == 2 ** 64 - 1 for o, _ in backend._shard_index(receipt, backend._direct_layout(receipt, group)))
            array = backend._array(layout["path"])
            size = array.shape[0]
            spans = [(0, size), (size, size)] + [tuple(sorted(rng.integers(0, size + 1, 2))) for _ in range(20)]
            for start, end in spans:
                assert bytes(backend.read_span(receipt, group, start, end)) == array[start:end].tobytes(), (key, start, end)
    assert empty > 0           # the zero runs of image.encoded made zarr skip inner chunks
    got = {s["__key__"]: s["image.encoded"] for s in cache.get_many(cache.keys(), fields=["image"])}
    for item in items:
        assert np.array_equal(got[(int(item["meta.image_id"]), int(item["meta.view_index"]))], item["image.encoded"])


def _flip_byte_in_blob(cache, root, key, field):
    """Flip one byte in the middle of ``field``'s blob of sample ``key``, where the backend stores it."""
    shard, row = cache.locate(*key)
    receipt = cache.receipt(shard)
    group = field.split(".")[0]
    layout = receipt["groups"][group]
    col = layout["fields"].index(field)
    at = layout["offsets"][row][col] + layout["nbytes"][row][col] // 2
    (rel, file_at, _), = cache.backend.plan_span(receipt, group, at, at + 1)[0]
    path = root / rel
    data = bytearray(path.read_bytes())
    data[file_at] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_damaged_blob_is_refused_naming_the_sample(backend, tmp_path):
    url = str(tmp_path / "cache")
    write(url, backend)
    cache = open_cache(url)
    keys = cache.keys()
    victim = keys[5]
    _flip_byte_in_blob(cache, tmp_path / "cache", victim, "fpn.p3")
    pattern = rf"field fpn\.p3, sample \(image_id={victim[0]}, view={victim[1]}\): checksum mismatch"
    for fresh in (False, True):
        reader = open_cache(url) if fresh else cache
        with pytest.raises(CorruptShardError, match=pattern):
            reader.get_many(keys[3:8], fields=["fpn"], decode="compact")
        with pytest.raises(CorruptShardError, match=pattern):
            reader.get(*victim, fields=["fpn"])
    # the others still read, and fields of the damaged sample outside the damaged blob too
    reader = open_cache(url)
    reader.get_many(keys[:5] + keys[6:], fields=["fpn"])
    reader.get_many([victim], fields=["region", "head"])


def test_a_damaged_zarr_shard_index_is_refused(tmp_path):
    url = str(tmp_path / "cache")
    write(url, "zarr")
    cache = open_cache(url)
    receipt = cache.receipt(1)
    path = tmp_path / "cache" / receipt["groups"]["fpn"]["path"] / "c" / "0"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01                  # inside the shard index (at the end of the file)
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=r"shard 1: .*fpn/c/0: the shard index fails its crc32c"):
        open_cache(url).get_many([tuple(receipt["keys"][0])], fields=["fpn"])
    with pytest.raises(CorruptShardError, match=r"shard 1: .*fpn/c/0: the shard index fails its crc32c"):
        open_cache(url).get(*receipt["keys"][0], fields=["fpn"])
    open_cache(url).get(*cache.receipt(0)["keys"][0], fields=["fpn"])


def test_cached_teacher_prefetch_many_equals_prefetch(backend, tmp_path):
    import torch

    from train.sources import CachedTeacher

    url = str(tmp_path / "cache")
    write(url, backend)
    source = CachedTeacher(url, ["fpn", "head.cls", "region"])
    keys = source.cache.keys()[::-1][:5]
    many = source.prefetch_many(keys)
    for payload, key in zip(many, keys):
        single = source.prefetch(*key)
        assert payload.keys() == single.keys()
        for name, value in single.items():
            other = payload[name]
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other), name
            elif hasattr(value, "__dict__"):
                for k, v in vars(value).items():
                    w = vars(other)[k]
                    assert (torch.equal(v, w) if isinstance(v, torch.Tensor) else
                            np.array_equal(v, w) if isinstance(v, np.ndarray) else v == w), (name, k)
            else:
                assert value == other, name
