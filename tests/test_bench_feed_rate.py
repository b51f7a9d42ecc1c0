"""bench/bench_feed_rate.py: the view geometry, the table's arithmetic, real sizes from a cache or
from ratios, and a tiny run end to end through the real write and read paths."""
import os

import numpy as np
import pytest
import torch

from bench import bench_feed_rate as feed
from store import load_manifest


def test_the_coco_view_geometry_and_its_raw_bytes():
    sizes = feed.level_sizes(800, 1333)
    assert sizes == [(100, 167), (50, 84), (25, 42), (13, 21), (7, 11)]
    locations = 100 * 167 + 50 * 84 + 25 * 42 + 13 * 21 + 7 * 11          # 22300
    assert feed.raw_fp16_bytes(sizes, 256, 80) == {"fpn": 2 * 256 * locations, "head.cls": 2 * 80 * locations,
                                                   "head.box": 2 * 68 * locations}
    assert feed.raw_fp16_bytes(sizes, 256, 80)["fpn"] == 11_417_600


def test_cores_and_train2017_disk():
    assert feed.cores_needed(20, 40) == pytest.approx(0.5)
    assert feed.cores_needed(20, 8) == pytest.approx(2.5)
    assert feed.train2017_bytes(1_000_000) == 236_574_000_000                # 118,287 images x 2 views


def test_ratios_on_the_command_line():
    fpn, head = feed.parse_sizes(["klt:0.04=0.293,fp16=0.912", "head.cls=0.35"])
    assert fpn == {"klt:0.04": (0.293, "given"), "fp16": (0.912, "given")}
    assert head == {"head.cls": (0.35, "given")}


@pytest.mark.parametrize("item, message", [
    ("klt=0.4", "give klt's bound"),
    ("klt:0.04=big", "needs a ratio"),
    ("klt:0.04=0", "needs a ratio"),
    ("zstd=0.5", "unknown codec 'zstd'"),
    ("/nowhere/cache", "not a complete cache"),
])
def test_bad_sizes_are_refused_naming_the_item(item, message):
    with pytest.raises(SystemExit, match=message):
        feed.parse_sizes([item])


@pytest.fixture(scope="module")
def small_views():
    return feed.synthetic_views(feed.level_sizes(128, 192), channels=16, classes=4, count=3)


def test_sizes_from_a_cache_are_its_manifest_totals(tmp_path, small_views):
    url = str(tmp_path / "cache")
    feed.write_cache(url, "wds", "klt:0.04", small_views, 4, (128, 192))
    fpn, head = feed.parse_sizes([url])
    totals = load_manifest(url)["totals"]["fields"]

    def ratio(prefix):
        rows = [v for name, v in totals.items() if name.startswith(prefix + ".")]
        return sum(s for s, _ in rows) / sum(r for _, r in rows)

    assert list(fpn) == ["klt:0.04"] and fpn["klt:0.04"] == (pytest.approx(ratio("fpn")), url)
    assert head == {"head.cls": (pytest.approx(ratio("head.cls")), url),
                    "head.box": (pytest.approx(ratio("head.box")), url)}
    assert 0 < ratio("fpn") < 0.6


def test_a_tiny_run_end_to_end(tmp_path):
    threads, affinity = torch.get_num_threads(), os.sched_getaffinity(0)
    out = tmp_path / "feed.md"
    assert feed.main(["--views", "4", "--codec", "klt:0.04", "--size", "128:192", "--channels", "16",
                      "--classes", "4", "--passes", "1", "--batch", "3", "--sizes-from", "klt:0.04=0.3",
                      "--out", str(out)]) == 0
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith(("| zarr", "| wds"))]
    assert [(r[0], r[1]) for r in rows] == [("| zarr", "klt:0.04"), ("| wds", "klt:0.04")]
    raw_fpn = feed.raw_fp16_bytes(feed.level_sizes(128, 192), 16, 4)["fpn"]
    for row in rows:
        assert row[2] == f"{0.3 * raw_fpn / 1e6:.2f} (0.300)"              # the given ratio, not marked synthetic
        assert row[3].endswith("*")                                           # head sizes: synthetic
        fpn_rate, full_rate = (float(v) for v in row[4].split(" / "))
        cores = [float(v) for v in row[6].split(" / ")]
        assert cores == pytest.approx([20 / fpn_rate, 20 / full_rate], rel=0.02, abs=0.01)
    assert torch.get_num_threads() == threads and os.sched_getaffinity(0) == affinity     # restored


def test_the_synthetic_maps_have_the_shapes_of_the_view(small_views):
    view = small_views[0]
    assert view["fpn.p3"].shape == (16, 16, 24) and view["fpn.p7"].shape == (16, 1, 2)
    assert view["head.cls.p4"].shape == (4, 8, 12) and view["head.box.p5"].shape == (68, 4, 6)
    assert all(v.dtype == np.float32 for v in view.values())


@pytest.mark.parametrize("codec", ["int8", "klt:0.25"])
def test_device_half_counts_what_crosses_and_matches_the_cpu(tmp_path, small_views, codec):
    """The dequantise-on-device measurement, run on the CPU: the compact bytes per view are those of
    the payload's arrays (one-byte KLT codes at a loose bound; no basis), the expanded ones float32
    of every field, and the device path equals the CPU path."""
    url = str(tmp_path / "cache")
    feed.write_cache(url, "zarr", codec, small_views, 4, (128, 192))
    rate = feed.device_rate(url, feed.READS["fpn"], 2, 1, torch.device("cpu"))
    locations = sum(h * w for h, w in feed.level_sizes(128, 192))
    assert rate["expanded"] == 4 * 16 * locations
    if codec == "int8":                             # uint8 values + a float32 scale and offset per channel
        assert rate["compact"] == 16 * locations + 5 * 2 * 16 * 4
    else:
        from train.sources import CachedTeacher
        payload = CachedTeacher(url, feed.READS["fpn"]).prefetch_many([(0, 0)])[0]
        codes = [payload[f"fpn.{level}"].codes for level in ("p3", "p4", "p5", "p6", "p7")]
        assert all(c.dtype == torch.uint8 for c in codes)
        assert rate["compact"] == sum(c.numel() + 8 * len(payload[f"fpn.{lv}"].components)
                                      for c, lv in zip(codes, ("p3", "p4", "p5", "p6", "p7")))
    assert rate["max_diff"] == 0 and rate["views_per_s"] > 0 and rate["ms_per_batch"] > 0


def test_device_cuda_is_refused_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="torch sees no CUDA device"):
        feed.main(["--device", "cuda", "--views", "1"])
