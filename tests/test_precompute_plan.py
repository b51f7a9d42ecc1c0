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
    assert field_codecs(fields, {})["fpn.p5"] == "klt:0.25"   # the default the rate-distortion study chose (README)
    with pytest.raises(Exception, match="not a field"):
        field_codecs(fields, {"fnp": "int8"})


def test_codec_specs_are_canonical_and_bad_ones_name_field_and_spec():
    fields = resolve_fields("all")
    codecs = field_codecs(fields, {"fpn": "klt:0.040", "fpn.p7": "klt-dpcm:0.12,clevel=9", "head.cls": "sparse:0.001"})
    assert codecs["fpn.p3"] == "klt:0.04" and codecs["fpn.p7"] == "klt-dpcm:0.12,clevel=9"
    assert codecs["head.cls.p3"] == "sparse:0.001"
    with pytest.raises(Exception, match=r"codec 'klt:abc' for field fpn: max_rel_rmse must be"):
        field_codecs(fields, {"fpn": "klt:abc"})


def test_cli_codec_option_takes_field_equals_spec():
    from precompute.__main__ import parse_codecs
    assert parse_codecs(["fpn=klt:0.04", "fpn.p7 = klt-dct:0.12"]) == {"fpn": "klt:0.04", "fpn.p7": "klt-dct:0.12"}
    for item, message in (("fpn", "expected FIELD=SPEC"), ("fpn=klt:2", "codec 'klt:2' for field fpn: max_rel_rmse"),
                          ("fpn=int8:3", "int8 takes KEY=VALUE")):
        with pytest.raises(SystemExit, match=message):
            parse_codecs([item])
