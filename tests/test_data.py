"""CocoDetection on the shared COCO sets, and the bad-input policy on broken sets built here."""
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detectors.data import CocoDetection, DataError
from detectors.views import ViewSpec, view_size

VIEWS = (ViewSpec(False, 320, 533), ViewSpec(True, 256, 400))


def _check_samples(dataset: CocoDetection, num_classes: int = 80) -> int:
    """Asserts every sample is well formed; returns the number of training boxes."""
    total = 0
    for index in range(len(dataset.image_ids)):
        info = dataset.image_info(index)
        for view_index, view in enumerate(dataset.views):
            sample = dataset.load(index, view_index)
            h, w = view_size((info.height, info.width), view)
            assert sample.image.shape == (3, h, w) and sample.image.dtype == torch.float32
            assert sample.image_id == info.image_id and sample.orig_size == (info.height, info.width)
            boxes = sample.boxes_xyxy
            assert boxes.dtype == torch.float32 and sample.labels.dtype == torch.int64
            assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
            assert (boxes[:, 2] <= w + 1e-3).all() and (boxes[:, 3] <= h + 1e-3).all()
            assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
            assert ((sample.labels >= 0) & (sample.labels < num_classes)).all()
        total += len(sample.labels)
    return total


@pytest.mark.parametrize("split", ["train2017", "val2017"])
def test_tiny_coco_loads(tiny_coco, split):
    dataset = CocoDetection(tiny_coco, split, views=VIEWS, on_error="raise")
    assert dataset.num_classes == 80 and len(dataset.image_ids) == 50
    num_boxes = _check_samples(dataset)
    anns = dataset.coco.dataset["annotations"]
    assert num_boxes == sum(1 for a in anns if not a["iscrowd"])  # crowd kept for eval only
    assert dataset.report.crowd_annotations == sum(1 for a in anns if a["iscrowd"]) > 0
    assert dataset.report.images_without_annotations > 0  # kept as negative images


def test_coco128_loads(coco128):
    dataset = CocoDetection(coco128, "train2017", views=VIEWS[:1], on_error="raise")
    assert len(dataset) == 128
    _check_samples(dataset)


def test_sparse_category_ids_map_to_sorted_contiguous_labels(tiny_coco):
    dataset = CocoDetection(tiny_coco, "val2017")
    assert dataset.label_to_cat_id[0] == 1 and dataset.label_to_cat_id[-1] == 90
    assert dataset.cat_id_to_label[90] == 79 and dataset.cat_id_to_label[13] == 11  # 12 is unused
    assert all(dataset.cat_id_to_label[c] == i for i, c in enumerate(dataset.label_to_cat_id))


def test_view_policies_fingerprint_and_image_info(tiny_coco):
    every = CocoDetection(tiny_coco, "val2017", views=VIEWS, view_policy="all")
    assert len(every) == 100
    assert (every[3].image_id, every[3].view_index) == (every.image_ids[1], 1)
    one = CocoDetection(tiny_coco, "val2017", views=VIEWS, view_policy="random")
    assert len(one) == 50
    torch.manual_seed(0)
    first = [one[0].view_index for _ in range(8)]
    torch.manual_seed(0)
    assert [one[0].view_index for _ in range(8)] == first and set(first) == {0, 1}
    fingerprint = one.fingerprint()
    assert fingerprint["num_images"] == 50 and len(fingerprint["annotation_sha256"]) == 64
    info = one.image_info(0)
    assert info.path.is_file() and info.path.name == info.file_name and info.height > 0
    assert one.image_size(info.image_id) == (info.height, info.width)


# -- broken sets --------------------------------------------------------------------------------
def _write_set(root: Path, images: list[dict], annotations: list[dict], write_images: bool = True) -> Path:
    """A COCO-layout split 'train2017' under root with categories 3 and 7 (labels 0 and 1)."""
    (root / "annotations").mkdir(parents=True)
    (root / "train2017").mkdir()
    if write_images:
        for entry in images:
            pixels = np.full((entry["height"], entry["width"], 3), 120, np.uint8)
            Image.fromarray(pixels).save(root / "train2017" / entry["file_name"], quality=90)
    categories = [{"id": 7, "name": "b"}, {"id": 3, "name": "a"}]
    dataset = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(dataset))
    return root


def _image(image_id: int, h: int = 40, w: int = 60) -> dict:
    return {"id": image_id, "file_name": f"{image_id:06d}.jpg", "height": h, "width": w}


def _ann(ann_id: int, image_id: int, bbox: list, category_id: int = 3, iscrowd: int = 0) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, "iscrowd": iscrowd}


def test_missing_image_file_raises_or_is_skipped(tmp_path):
    root = _write_set(tmp_path, [_image(1), _image(2)], [_ann(1, 1, [1, 1, 5, 5])])
    (root / "train2017" / "000002.jpg").unlink()
    with pytest.raises(DataError, match=r"000002\.jpg.*image id 2"):
        CocoDetection(root, on_error="raise")
    with pytest.warns(UserWarning, match=r"(?s)left out \(file missing\): 1.*000002\.jpg"):
        dataset = CocoDetection(root, on_error="skip")
    assert dataset.image_ids == [1] and dataset.report.missing_files == 1
    assert dataset.fingerprint()["num_images"] == 1


def test_truncated_jpeg_raises_or_is_skipped(tmp_path):
    root = _write_set(tmp_path, [_image(1), _image(2)], [_ann(1, 2, [1, 1, 5, 5], category_id=7)])
    path = root / "train2017" / "000001.jpg"
    path.write_bytes(path.read_bytes()[:200])
    strict = CocoDetection(root, on_error="raise")
    with pytest.raises(DataError, match=r"cannot decode image file .*000001\.jpg \(image id 1\)"):
        strict.load(0, 0)
    lenient = CocoDetection(root, on_error="skip")
    with pytest.warns(UserWarning, match=r"000001\.jpg"):
        sample = lenient.load(0, 0)
    assert sample.image_id == 2 and sample.labels.tolist() == [1]  # the next good image
    assert lenient.report.corrupt_images == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the bad image is remembered: no second warning
        assert lenient.load(0, 0).image_id == 2


def test_not_an_image_and_size_mismatch_are_bad_images(tmp_path):
    root = _write_set(tmp_path, [_image(1), _image(2, h=30)], [])
    (root / "train2017" / "000001.jpg").write_text("not a jpeg")
    dataset = CocoDetection(root, on_error="raise")
    with pytest.raises(DataError, match=r"000001\.jpg"):
        dataset.load(0, 0)
    Image.new("RGB", (60, 40)).save(root / "train2017" / "000002.jpg")  # annotation says 30 x 60
    with pytest.raises(DataError, match=r"000002\.jpg.*40x60.*30x60"):
        dataset.load(1, 0)


def test_image_without_annotations_is_kept_as_negative(tmp_path):
    root = _write_set(tmp_path, [_image(1, h=40, w=60)], [])
    dataset = CocoDetection(root, views=(ViewSpec(False, 20, 100),), on_error="raise")
    sample = dataset[0]
    assert sample.boxes_xyxy.shape == (0, 4) and sample.labels.shape == (0,)
    assert sample.image.shape == (3, 20, 30)
    assert dataset.report.images_without_annotations == 1


def test_degenerate_outside_and_crowd_boxes(tmp_path):
    annotations = [
        _ann(1, 1, [10, 10, 0, 5]),  # zero width: dropped
        _ann(2, 1, [10, 10, 5, 0]),  # zero height: dropped
        _ann(3, 1, [50, -5, 20, 15]),  # partly outside (w=60, h=40): clipped to [50, 0, 60, 10]
        _ann(4, 1, [70, 10, 5, 5]),  # entirely outside: dropped
        _ann(5, 1, [1, 2, 3, 4], category_id=7),  # fine
        _ann(6, 1, [0, 0, 30, 30], iscrowd=1),  # crowd: not a training target
    ]
    root = _write_set(tmp_path, [_image(1, h=40, w=60)], annotations)
    with pytest.warns(UserWarning, match="zero-size boxes dropped: 2"):
        dataset = CocoDetection(root, views=(ViewSpec(False, 40, 60),), on_error="raise")
    report = dataset.report
    assert (report.degenerate_boxes, report.clipped_boxes, report.outside_boxes) == (2, 1, 1)
    assert report.crowd_annotations == 1
    sample = dataset[0]
    torch.testing.assert_close(sample.boxes_xyxy, torch.tensor([[50.0, 0.0, 60.0, 10.0], [1.0, 2.0, 4.0, 6.0]]))
    assert sample.labels.tolist() == [0, 1]  # category 3 -> 0, 7 -> 1


def test_unknown_category_names_annotation_and_category(tmp_path):
    root = _write_set(tmp_path, [_image(1)], [_ann(41, 1, [1, 1, 5, 5], category_id=99)])
    with pytest.raises(DataError, match=r"annotation 41 has unknown category id 99"):
        CocoDetection(root, on_error="skip")


def test_annotation_for_unknown_image_is_an_error(tmp_path):
    root = _write_set(tmp_path, [_image(1)], [_ann(5, 8, [1, 1, 5, 5])])
    with pytest.raises(DataError, match=r"annotation 5 refers to image id 8"):
        CocoDetection(root)


def test_annotation_file_that_is_not_coco(tmp_path):
    root = _write_set(tmp_path, [_image(1)], [])
    ann_file = root / "annotations" / "instances_train2017.json"
    ann_file.write_text(json.dumps({"annotations": [], "categories": []}))
    with pytest.raises(DataError, match=r"instances_train2017\.json is not COCO: missing key 'images'"):
        CocoDetection(root)
    ann_file.write_text(json.dumps({"images": [{"id": 1}], "annotations": [], "categories": []}))
    with pytest.raises(DataError, match=r"instances_train2017\.json: image 1 missing key 'file_name'"):
        CocoDetection(root)
    ann_file.write_text(json.dumps({"images": [], "annotations": [{"id": 4, "image_id": 1}], "categories": []}))
    with pytest.raises(DataError, match=r"annotation 4 missing key 'category_id'"):
        CocoDetection(root)
    ann_file.write_text("{not json")
    with pytest.raises(DataError, match=r"instances_train2017\.json is not valid JSON"):
        CocoDetection(root)
    with pytest.raises(DataError, match=r"cannot read annotation file .*instances_val2017\.json"):
        CocoDetection(root, split="val2017")
