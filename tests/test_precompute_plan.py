"""precompute.plan: task order, batches of one padded shape, codec choices."""
import pytest

from precompute.pipeline import field_codecs
from precompute.plan import TaskOrder, calibration_positions, plan_batches, plan_windows
from precompute.fields import resolve_fields


def test_task_order_is_image_major():
    order = TaskOrder(num_images=3, num_views=2)
    assert [order.task(p) for p in range(order.num_samples)] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert order.position(2, 1) == 5


def test_batches_hold_one_padded_shape_and_are_deterministic():
    shapes = {0: (64, 96), 1: (64, 96), 2: (96, 64), 3: (64, 96), 4: (96, 64), 5: (64, 128), 6: (64, 96)}
    batches = plan_batches(range(7), shapes.__getitem__, batch_size=2)
    assert batches == [[0, 1], [2, 4], [3, 6], [5]]
    assert all(len({shapes[p] for p in b}) == 1 for b in batches)
    assert sorted(p for b in batches for p in b) == list(range(7))
    windows = plan_windows([[0, 1], [2, 3], [4, 5], [6]], shapes.__getitem__, batch_size=4, window=2)
    assert windows == [[0, 1, 3], [2], [4], [5], [6]]  # batches never cross a window of 2 shards


def test_calibration_positions_spread_over_the_order():
    assert calibration_positions(100, 5) == [0, 25, 50, 74, 99]
    assert calibration_positions(3, 16) == [0, 1, 2]


def test_codec_overrides_pick_the_most_specific_key():
    fields = resolve_fields("all")
    codecs = field_codecs(fields, {"fpn": "int8", "fpn.p3": "fp16", "head": "fp16", "region": "bf16"})
    assert codecs["fpn.p3"] == "fp16" and codecs["fpn.p4"] == "int8" and codecs["head.cls.p3"] == "fp16"
    assert codecs["region.cls"] == "bf16" and codecs["region.index"] == "raw"  # integer fields stay exact
    assert codecs["meta.image_id"] == "raw"
    assert field_codecs(fields, {})["fpn.p5"] == "klt"
    with pytest.raises(Exception, match="not a field"):
        field_codecs(fields, {"fnp": "int8"})
