"""precompute.plan: view lists, task order, batches of one padded shape, codec choices."""
import pytest

from detectors.views import ViewSpec
from precompute.pipeline import field_codecs
from precompute.plan import TaskOrder, calibration_positions, parse_view_list, plan_batches, plan_windows
from precompute.fields import resolve_fields


def test_parse_view_list():
    assert parse_view_list("default") == [ViewSpec(False, 800, 1333), ViewSpec(True, 800, 1333)]
    assert parse_view_list("160:256,160:256:flip") == [ViewSpec(False, 160, 256), ViewSpec(True, 160, 256)]
    multi = parse_view_list("ms:4:640-800", seed=3)
    assert len(multi) == 4 and all(640 <= v.short <= 800 and v.max_size == 1333 for v in multi)
    assert multi == parse_view_list("ms:4:640-800", seed=3)  # deterministic
    assert not any(v.flip for v in parse_view_list("ms:3:640-800:1000:noflip"))
    with pytest.raises(ValueError, match="ms:K:LO-HI"):
        parse_view_list("ms:4:640")
    with pytest.raises(ValueError, match="repeat"):
        parse_view_list("800,800")


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
