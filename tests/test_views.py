"""View geometry, canonical padding and collation."""
import pytest
import torch

from detectors.views import (
    IMAGENET_MEAN_RGB,
    Sample,
    ViewSpec,
    apply_view,
    collate,
    multiscale_views,
    padded_size,
    parse_view_list,
    view_boxes_to_original,
    view_size,
)


def test_view_size_follows_mmdet_keep_ratio_rule():
    # short side limits: 800 / 480 = 1.667 < 1333 / 640; w = int(640 * 1.667 + 0.5) = 1067
    assert view_size((480, 640), ViewSpec()) == (800, 1067)
    # long side limits: 1333 / 1000 < 800 / 100
    assert view_size((100, 1000), ViewSpec()) == (133, 1333)
    assert view_size((640, 480), ViewSpec(short=400, max_size=1000)) == (533, 400)


def test_apply_view_boxes_match_hand_computed_numbers():
    image = torch.zeros(3, 100, 200, dtype=torch.uint8)
    boxes = torch.tensor([[10.0, 20.0, 50.0, 60.0], [0.0, 0.0, 200.0, 100.0]])
    out, view_boxes = apply_view(image, boxes, ViewSpec(flip=False, short=50, max_size=1000))
    assert out.shape == (3, 50, 100) and out.dtype == torch.float32
    torch.testing.assert_close(view_boxes, torch.tensor([[5.0, 10.0, 25.0, 30.0], [0.0, 0.0, 100.0, 50.0]]))

    out, view_boxes = apply_view(image, boxes, ViewSpec(flip=True, short=50, max_size=1000))
    # flipped in a 100-wide view: x1' = 100 - 25, x2' = 100 - 5
    torch.testing.assert_close(view_boxes, torch.tensor([[75.0, 10.0, 95.0, 30.0], [0.0, 0.0, 100.0, 50.0]]))


def test_apply_view_flips_pixels_and_normalises():
    image = torch.empty(3, 32, 64, dtype=torch.uint8)
    for c, mean in enumerate(IMAGENET_MEAN_RGB):
        image[c] = round(mean)
    image[:, :, :8] = 255  # bright stripe on the left
    out, _ = apply_view(image, torch.zeros(0, 4), ViewSpec(flip=True, short=32, max_size=64))
    assert out.shape == (3, 32, 64)
    assert (out[:, :, -8:] > 1.5).all()  # stripe now on the right
    assert out[:, :, :48].abs().max() < 0.01  # mean colour -> ~0 after normalisation


def test_apply_view_is_deterministic():
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 37, 53), dtype=torch.uint8, generator=generator)
    a, _ = apply_view(image, torch.zeros(0, 4), ViewSpec(True, 70, 90))
    b, _ = apply_view(image, torch.zeros(0, 4), ViewSpec(True, 70, 90))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "view", [ViewSpec(), ViewSpec(True, 640, 1333), ViewSpec(True, 333, 500), ViewSpec(False, 97, 101)]
)
def test_view_boxes_to_original_inverts_apply_view(view):
    orig_hw = (427, 640)
    generator = torch.Generator().manual_seed(1)
    xy = torch.rand(20, 2, generator=generator) * torch.tensor([600.0, 400.0])
    wh = torch.rand(20, 2, generator=generator) * 40 + 1
    boxes = torch.cat([xy, xy + wh], dim=1)  # (20, 4) original pixels
    image = torch.zeros(3, *orig_hw, dtype=torch.uint8)
    _, view_boxes = apply_view(image, boxes, view)
    torch.testing.assert_close(view_boxes_to_original(view_boxes, view, orig_hw), boxes, rtol=0, atol=1e-3)


def test_padded_size_rounds_each_side_up_to_32():
    assert padded_size((800, 1067)) == (800, 1088)
    assert padded_size((33, 32)) == (64, 32)
    assert padded_size((1, 1)) == (32, 32)


def _sample(h: int, w: int, n: int, image_id: int) -> Sample:
    return Sample(
        image=torch.ones(3, h, w),
        boxes_xyxy=torch.zeros(n, 4),
        labels=torch.zeros(n, dtype=torch.int64),
        image_id=image_id,
        view_index=image_id % 2,
        view=ViewSpec(flip=bool(image_id % 2)),
        orig_size=(2 * h, 2 * w),
    )


def test_collate_pads_with_zeros_to_the_largest_canonical_size():
    batch = collate([_sample(50, 70, 2, 1), _sample(65, 40, 0, 2)])
    assert batch.images.shape == (2, 3, 96, 96)  # max(64, 96) x max(96, 64)
    assert batch.image_sizes == [(50, 70), (65, 40)]
    assert batch.images[0, :, :50, :70].eq(1).all() and batch.images[0, :, 50:].eq(0).all()
    assert batch.images[1, :, :, 40:].eq(0).all()
    assert [t["boxes"].shape[0] for t in batch.targets] == [2, 0]
    assert batch.image_ids == [1, 2] and batch.view_indices == [1, 0]
    assert batch.views == [ViewSpec(flip=True), ViewSpec()]
    assert batch.orig_sizes == [(100, 140), (130, 80)]
    moved = batch.to("cpu")
    assert moved.images.device.type == "cpu" and moved.targets[0]["labels"].dtype == torch.int64


def test_collate_of_one_sample_is_its_canonical_padding():
    assert collate([_sample(50, 70, 1, 3)]).images.shape[-2:] == padded_size((50, 70))


def test_viewspec_dict_round_trip_and_key():
    view = ViewSpec(True, 640, 1000)
    assert ViewSpec.from_dict(view.to_dict()) == view
    assert view.key() == "s640m1000f1"
    with pytest.raises(ValueError, match="unknown ViewSpec keys"):
        ViewSpec.from_dict({"flip": False, "short": 800, "max_size": 1333, "scale": 2})
    with pytest.raises(ValueError, match="short"):
        ViewSpec(short=0)


def test_parse_view_list():
    expected = [ViewSpec(False, 800, 1333), ViewSpec(True, 800, 1333)]
    assert parse_view_list("800:1333,800:1333:flip") == expected
    assert parse_view_list("default") == expected
    assert parse_view_list("160:213, 160:flip") == [ViewSpec(False, 160, 213), ViewSpec(True, 160, 1333)]
    assert parse_view_list("160:256,160:256:flip") == [ViewSpec(False, 160, 256), ViewSpec(True, 160, 256)]
    with pytest.raises(ValueError, match="800x1333"):
        parse_view_list("800x1333")
    with pytest.raises(ValueError, match="repeat"):
        parse_view_list("800,800")
    with pytest.raises(ValueError, match="no views"):
        parse_view_list(" , ")


def test_parse_view_list_multiscale():
    multi = parse_view_list("ms:4:640-800", seed=3)
    assert len(multi) == 4 and all(640 <= v.short <= 800 and v.max_size == 1333 for v in multi)
    assert multi == parse_view_list("ms:4:640-800", seed=3)  # deterministic
    assert not any(v.flip for v in parse_view_list("ms:3:640-800:1000:noflip"))
    with pytest.raises(ValueError, match="ms:K:LO-HI"):
        parse_view_list("ms:4:640")


def test_multiscale_views_are_deterministic_by_seed():
    views = multiscale_views(8, (640, 800), 1333, seed=3)
    assert views == multiscale_views(8, (640, 800), 1333, seed=3)
    assert views != multiscale_views(8, (640, 800), 1333, seed=4)
    assert all(640 <= v.short <= 800 and v.max_size == 1333 for v in views)
    assert not any(v.flip for v in multiscale_views(8, seed=3, flip=False))
