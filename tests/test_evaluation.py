"""COCO evaluation: ground truth fed back as detections scores 100 AP, through views and back."""
import math

import pytest
import torch

from detectors.data import CocoDetection
from detectors.evaluation import CocoEvaluator, view_boxes_to_original
from detectors.synth import SynthConfig, generate
from detectors.views import ViewSpec

ODD_VIEW = ViewSpec(flip=True, short=333, max_size=500)  # non-integer scale and a flip


@pytest.fixture(scope="module")
def synth_val(tmp_path_factory) -> CocoDetection:
    config = SynthConfig(size=96, max_side=60)
    root = generate(tmp_path_factory.mktemp("synth"), num_train=0, num_val=12, config=config, seed=5,
                    progress=False)
    return CocoDetection(root, "val2017", views=(ODD_VIEW,), on_error="raise")


def _ground_truth_as_detections(dataset: CocoDetection, box_shift: float = 0.0, label_shift: int = 0):
    """Per image: (image_id, detections in original pixels) made from the view's targets."""
    for index in range(len(dataset.image_ids)):
        sample = dataset.load(index, 0)
        boxes = view_boxes_to_original(sample.boxes_xyxy, sample.view, sample.orig_size)  # (n, 4)
        widths = boxes[:, 2] - boxes[:, 0]
        boxes = boxes + torch.stack([widths, torch.zeros_like(widths)] * 2, dim=1) * box_shift
        labels = (sample.labels + label_shift) % dataset.num_classes
        yield sample.image_id, {"boxes": boxes, "scores": torch.ones(len(boxes)), "labels": labels}


def _evaluate(dataset: CocoDetection, **shifts) -> dict:
    evaluator = CocoEvaluator(dataset)
    for image_id, det in _ground_truth_as_detections(dataset, **shifts):
        evaluator.process([image_id], [det])
    return evaluator.evaluate()


def test_ground_truth_scores_100_on_tiny_coco(tiny_coco):
    dataset = CocoDetection(tiny_coco, "val2017", views=(ODD_VIEW,), on_error="raise")
    metrics = _evaluate(dataset)
    assert set(metrics) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    for name, value in metrics.items():
        assert value == pytest.approx(100.0), name


def test_ground_truth_scores_100_on_synthetic_set(synth_val):
    metrics = _evaluate(synth_val)
    assert metrics["AP"] == pytest.approx(100.0) and metrics["APs"] == pytest.approx(100.0)
    assert math.isnan(metrics["APl"])  # no large objects: pycocotools' -1 reported as NaN


def test_iou_thresholds_and_labels_matter(synth_val):
    # shifting x by a quarter of the width gives IoU 0.75 / 1.25 = 0.6: a hit at 0.5, a miss at 0.75
    shifted = _evaluate(synth_val, box_shift=0.25)
    assert shifted["AP50"] == pytest.approx(100.0) and shifted["AP75"] == pytest.approx(0.0)
    assert _evaluate(synth_val, label_shift=1)["AP"] == pytest.approx(0.0)


def test_empty_detections_give_zero_not_a_crash(synth_val, capsys):
    evaluator = CocoEvaluator(synth_val)
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
    evaluator.process(synth_val.image_ids, [empty] * len(synth_val.image_ids))
    metrics = evaluator.evaluate()
    assert metrics["AP"] == 0.0 and metrics["AP50"] == 0.0
    assert capsys.readouterr().out == ""  # pycocotools is silenced unless verbose
    evaluator.reset()
    with pytest.raises(ValueError, match="before any process"):
        evaluator.evaluate()


def test_verbose_prints_the_pycocotools_table(synth_val, capsys):
    evaluator = CocoEvaluator(synth_val, verbose=True)
    image_id, det = next(_ground_truth_as_detections(synth_val))
    evaluator.process([image_id], [det])
    evaluator.evaluate()
    assert "Average Precision" in capsys.readouterr().out


def test_process_rejects_out_of_range_labels(synth_val):
    evaluator = CocoEvaluator(synth_val)
    bad = {"boxes": torch.zeros(1, 4), "scores": torch.ones(1), "labels": torch.tensor([8])}
    with pytest.raises(ValueError, match=r"labels must be in \[0, 8\)"):
        evaluator.process([synth_val.image_ids[0]], [bad])
